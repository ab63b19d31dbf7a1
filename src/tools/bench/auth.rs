//! `bench --compare-auth`: the worker's throughput and CPU per decision with
//! unsigned, HMAC-signed and Ed25519-signed decisions, in one run. Rounds
//! go through the three modes in turn, so each meets the machine as the
//! others do; separate runs on a shared machine differ by more than what
//! is measured here.

use serde_json::{Value, json};

use super::feed::Feed;
use super::process::{process_usage, terminate};
use super::{BenchAuth, BenchError, alternate, median, round2, sample_bodies};
use crate::tools::signer::Signer;

const MODES: [BenchAuth; 3] = [BenchAuth::Off, BenchAuth::Hmac, BenchAuth::Ed25519];

/// Runs `rounds` rounds of `n` decisions per mode, each mode with its own
/// worker started by `spawn` with the mode's environment added.
pub(super) async fn phase(
    feed: &mut Feed,
    mix: &[&str],
    n: usize,
    rounds: usize,
    spawn: impl Fn(&[(String, String)]) -> Result<tokio::process::Child, BenchError>,
) -> Result<Value, BenchError> {
    // One key per mode for the whole phase: what the worker verifies is the
    // same work in every round.
    let mut signers: Vec<Option<Signer>> = MODES
        .iter()
        .map(|mode| match mode {
            BenchAuth::Off => None,
            BenchAuth::Hmac => Some(Signer::generate_hmac()),
            BenchAuth::Ed25519 => Some(Signer::generate()),
        })
        .collect();
    let mut rates = vec![Vec::new(); MODES.len()];
    let mut cpu = vec![Vec::new(); MODES.len()];
    let mut shares = vec![Vec::new(); MODES.len()];
    // The feed's own signer is put back whatever happens.
    let original = feed.swap_signer(None);
    let measured = async {
        for round in 1..=rounds {
            let mut off_rate = None;
            for (i, mode) in MODES.iter().enumerate() {
                let env = match &signers[i] {
                    Some(signer) => vec![signer.trusted()],
                    None => vec![("APPROVAL_AUTH__MODE".to_owned(), "off".to_owned())],
                };
                let signer = signers[i].take();
                let previous = feed.swap_signer(signer);
                let run = measure(feed, mix, n, &format!("{}{round}", mode.as_str()), || {
                    spawn(&env)
                })
                .await;
                signers[i] = feed.swap_signer(previous);
                let (rate, cpu_us) = run?;
                let off = *off_rate.get_or_insert(rate);
                eprintln!(
                    "bench: auth round {round}/{rounds}: {} {rate:.0}/s ({:.0} % of off), \
                     {cpu_us:.0} us CPU per decision",
                    mode.as_str(),
                    100.0 * rate / off
                );
                rates[i].push(rate);
                cpu[i].push(cpu_us);
                shares[i].push(rate / off);
            }
        }
        Ok::<_, BenchError>(())
    }
    .await;
    feed.swap_signer(original);
    measured?;
    let mut report = json!({ "decisions": n, "rounds": rounds });
    for (i, mode) in MODES.iter().enumerate() {
        report[mode.as_str()] = json!({
            "per_s": median(&mut rates[i]).round(),
            "cpu_us_per_decision": median(&mut cpu[i]).round(),
            "share_of_off": round2(median(&mut shares[i])),
        });
    }
    Ok(report)
}

/// One mode's worker: started, warmed up, then measured over `n` decisions
/// (throughput, and its CPU time over exactly that phase), then stopped.
async fn measure(
    feed: &mut Feed,
    mix: &[&str],
    n: usize,
    tag: &str,
    spawn: impl FnOnce() -> Result<tokio::process::Child, BenchError>,
) -> Result<(f64, f64), BenchError> {
    let mut worker = spawn()?;
    let result = async {
        let warm = n.min(2_000);
        feed.phase(
            "auth warm-up",
            sample_bodies(mix, &format!("aw{tag}"), warm, alternate),
        )
        .await?;
        let pid = worker.id().unwrap_or_default();
        let before = process_usage(pid);
        let bodies = sample_bodies(mix, &format!("am{tag}"), n, alternate);
        let rate = feed.phase("auth", bodies).await?;
        let after = process_usage(pid);
        let cpu_us = match (before, after) {
            (Some(b), Some(a)) => a.cpu_us.saturating_sub(b.cpu_us) as f64 / n as f64,
            _ => f64::NAN,
        };
        Ok((rate, cpu_us))
    }
    .await;
    terminate(&mut worker).await;
    result
}
