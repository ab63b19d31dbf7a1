//! `approval-worker bench`: the worker's throughput, latency and memory,
//! beside the broker's own ceiling measured in the same run.
//!
//! - ceiling: a bare relay loop with the worker's broker settings (quorum
//!   queue, persistent messages, publisher confirms, manual acks, same
//!   prefetch, one task per delivery): consume, publish a result, ack.
//! - worker: the real `run` command as a child process (so its RSS and CPU
//!   are its own) against the in-process simulator, with zero and then with
//!   added provider latency.
//!
//! - quota (`--qonto-quota`): Qonto decisions against the simulator
//!   enforcing Qonto's documented quota, a worker with its default limit.
//!
//! Elsewhere providers run without limits: no simulator quota, and the
//! worker's `RATE_LIMIT` off for every provider.
//!
//! Every rate is measured the same way: the consumer (relay or worker) is
//! already running when the bench publishes the batch with pipelined
//! confirms, and the rate runs from the first result to the last, whether
//! the first arrives during the load or after it. Latency is measured on a
//! paced stream, publish to outcome.

mod auth;
mod ceiling;
mod feed;
mod process;
mod quota;

use std::{collections::HashMap, path::Path, time::Duration};

use lapin::Connection;
use serde_json::{Value, json};

use crate::{
    broker::{self, Topology},
    providers::REGISTRY,
    settings::Settings,
    tools::{
        signer::Signer,
        sim::{self, Faults, SimConfig, samples},
    },
};
use ceiling::Ceiling;
use feed::{Feed, paced_latency};
use process::{process_usage, spawn_worker, terminate};

const PHASE_DEADLINE: Duration = Duration::from_secs(600);

#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub decisions: usize,
    /// Providers the decisions are spread over (default: all).
    pub providers: Vec<String>,
    pub provider_latency_ms: u64,
    pub prefetch: Option<u16>,
    /// Rounds of the ceiling, zero-latency and added-latency phases.
    pub rounds: usize,
    /// How the decisions are signed and verified.
    pub auth: BenchAuth,
    /// Decisions of the Qonto quota phase; `None` skips it.
    pub qonto_quota: Option<usize>,
    /// Also measure unsigned, HMAC and Ed25519 decisions side by side.
    pub compare_auth: bool,
}

/// `--auth`: the signature every decision carries and the worker checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BenchAuth {
    Ed25519,
    Hmac,
    /// Unsigned, and the worker checks nothing (`APPROVAL_AUTH__MODE=off`).
    Off,
}

impl BenchAuth {
    fn as_str(self) -> &'static str {
        match self {
            BenchAuth::Ed25519 => "ed25519",
            BenchAuth::Hmac => "hmac",
            BenchAuth::Off => "off",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("RabbitMQ is not reachable at {0}")]
    BrokerUnreachable(String),
    #[error("broker error: {0}")]
    Broker(#[from] lapin::Error),
    #[error("{0}")]
    Topology(#[from] crate::broker::TopologyError),
    #[error("{0}")]
    Setup(String),
    #[error("timed out in phase {0}: {1} of {2} results arrived")]
    Timeout(&'static str, usize, usize),
}

pub async fn run(config: Option<&Path>, options: BenchOptions) -> Result<Value, BenchError> {
    let settings = Settings::load(config).map_err(|e| BenchError::Setup(e.to_string()))?;
    let prefetch = options.prefetch.unwrap_or(settings.amqp.prefetch.get());
    let n = options.decisions.max(10);
    let url = settings.amqp_url_redacted();
    let conn = broker::Nodes::new(&settings)
        .connect("approval-worker bench")
        .await
        .map_err(|_| BenchError::BrokerUnreachable(url))?;

    // The simulator shares the machine; each unit sheds the work a real
    // provider would not take from the worker's machine (signature checks).
    let mut sim_config = SimConfig::default();
    for unit in REGISTRY {
        unit.sim.for_bench(&mut sim_config.units);
    }
    let sim = sim::start_per_provider(sim_config, std::net::Ipv4Addr::LOCALHOST.into())
        .await
        .map_err(|e| BenchError::Setup(format!("simulator: {e}")))?;
    let prefix = format!("bench-w-{}", short_id());
    let ceiling_topology = Topology::new(&format!("bench-c-{}", short_id()), 20);
    let topology = Topology::new(&prefix, settings.amqp.delivery_limit);
    // Signed before each phase's clock starts: the bench plays upstream,
    // whose signing cost is not the worker's.
    let signer = match options.auth {
        BenchAuth::Ed25519 => Some(Signer::generate()),
        BenchAuth::Hmac => Some(Signer::generate_hmac()),
        BenchAuth::Off => None,
    };
    let mut auth_env = match &signer {
        Some(signer) => vec![signer.trusted()],
        None => vec![("APPROVAL_AUTH__MODE".to_owned(), "off".to_owned())],
    };
    auth_env.extend(sim.worker_env());
    // The phases measure the worker, not a provider's quota: the simulator
    // has none, and the worker's limiter is off for every provider.
    let mut worker_env = auth_env.clone();
    worker_env.extend(
        REGISTRY
            .iter()
            .map(|unit| (rate_limit_key(unit.name), "off".to_owned())),
    );
    eprintln!("bench: providers run without limits (no simulator quota, worker RATE_LIMIT=off)");
    let mut feed = Feed::declare(&conn, &topology, signer).await?;

    let known = sim::providers();
    let mix: Vec<&str> = if options.providers.is_empty() {
        known.to_vec()
    } else {
        options.providers.iter().map(String::as_str).collect()
    };
    if let Some(bad) = mix.iter().find(|p| !known.contains(p)) {
        return Err(BenchError::Setup(format!(
            "unknown provider {bad}; expected some of {}",
            known.join(",")
        )));
    }
    // The phases compared with the ceiling use providers whose decision is
    // one HTTP call. A unit that makes more (a challenge, then the signed
    // decision) is measured on its own and reported beside.
    let multi_call: Vec<&'static str> = REGISTRY
        .iter()
        .filter(|unit| unit.sim.calls_per_decision() > 1)
        .map(|unit| unit.name)
        .collect();
    let one_call: Vec<&str> = mix
        .iter()
        .copied()
        .filter(|p| !multi_call.contains(p))
        .collect();
    let alone: Vec<&'static str> = multi_call
        .iter()
        .copied()
        .filter(|p| mix.contains(p))
        .collect();
    let mix = if one_call.is_empty() { mix } else { one_call };

    // The worker starts and warms up (connections, provider tokens) first:
    // the phases measure it running, not starting.
    let mut worker = spawn_worker(config, &prefix, prefetch, &worker_env)?;
    let latency = options.provider_latency_ms;
    let rounds = options.rounds.max(1);
    // Whatever happens in the phases, the worker stops and the bench's
    // queues and exchanges are removed before the result is returned.
    let measured = async {
        let warm = n.min(2_000);
        feed.phase("warm-up", sample_bodies(&mix, "w", warm, alternate))
            .await?;
        // The ceiling relays what the worker publishes: a real outcome event
        // of this run, so both move the same bytes through the broker.
        let event = feed
            .one_event(sample_bodies(&mix, "e", 1, alternate))
            .await?;
        let event_bytes = event.len();
        eprintln!("bench: the ceiling relays a {event_bytes}-byte outcome event of this run");
        let mut ceiling = Ceiling::declare(&conn, &ceiling_topology, n, event, mix[0]).await?;

        // Latency: a paced stream at a third of a first measured rate, so it
        // shows the time through the worker rather than time spent queueing.
        let first_rate = feed
            .phase("pacing", sample_bodies(&mix, "p", n, alternate))
            .await?;
        let paced = n.min(5_000);
        let (p50, p99) = paced_latency(&mut feed, &mix, paced, first_rate / 3.0).await?;
        eprintln!("bench: latency p50 {p50:.1} ms, p99 {p99:.1} ms");

        // Rounds of (ceiling, worker, worker with provider latency), back to
        // back, so each ratio compares phases run under the same conditions.
        // On a shared machine single phases swing widely from run to run;
        // the medians over rounds are what the bench reports.
        let mut ceilings = Vec::new();
        let mut worker_rates = Vec::new();
        let mut latency_rates = Vec::new();
        let mut ratios = Vec::new();
        let mut latency_shares = Vec::new();
        for round in 1..=rounds {
            let ceiling = ceiling.measure(&conn, prefetch).await?;

            set_latency(&sim, 0);
            let bodies = sample_bodies(&mix, &format!("a{round}"), n, alternate);
            let worker_rate = feed.phase("worker", bodies).await?;

            set_latency(&sim, latency);
            let bodies = sample_bodies(&mix, &format!("b{round}"), n, |_| "reject");
            let latency_rate = feed.phase("latency", bodies).await?;
            let theoretical = latency_cap(prefetch, latency, worker_rate);
            eprintln!(
                "bench: round {round}/{rounds}: ceiling {ceiling:.0}/s, worker {worker_rate:.0}/s \
                 (ratio {:.2}), with {latency} ms provider latency {latency_rate:.0}/s of \
                 {theoretical:.0}/s",
                worker_rate / ceiling
            );
            ratios.push(worker_rate / ceiling);
            latency_shares.push(latency_rate / theoretical);
            ceilings.push(ceiling);
            worker_rates.push(worker_rate);
            latency_rates.push(latency_rate);
        }
        set_latency(&sim, 0);
        let worker_rate = median(&mut worker_rates);
        let ceiling = median(&mut ceilings);
        let latency_rate = median(&mut latency_rates);

        // Each multi-call unit alone, without added latency.
        let mut processed = (2 * rounds + 1) * n + paced + warm;
        let mut alone_rates = HashMap::new();
        for name in &alone {
            let count = (n / 4).max(10);
            let bodies = sample_bodies(&[name], &format!("m-{name}"), count, alternate);
            eprintln!("bench: worker, {count} {name} decisions (more than one call each)");
            processed += count;
            alone_rates.insert(*name, feed.phase("multi-call", bodies).await?);
        }
        Ok::<_, BenchError>(Figures {
            processed,
            p50,
            p99,
            ceiling,
            worker_rate,
            latency_rate,
            ratios,
            latency_shares,
            alone_rates,
            event_bytes,
        })
    }
    .await;

    let usage = process_usage(worker.id().unwrap_or_default());
    terminate(&mut worker).await;
    // Each mode's own worker on the same queues, the providers still
    // unlimited; the worker's signature checks are what differs.
    let auth_phase = match (&measured, options.compare_auth) {
        (Ok(_), true) => {
            let sim_env: Vec<_> = worker_env
                .iter()
                .filter(|(k, _)| !k.starts_with("APPROVAL_AUTH__"))
                .cloned()
                .collect();
            let spawn = |mode_env: &[(String, String)]| {
                let mut env = sim_env.clone();
                env.extend(mode_env.iter().cloned());
                spawn_worker(config, &prefix, prefetch, &env)
            };
            Some(auth::phase(&mut feed, &mix, n, rounds, spawn).await)
        }
        _ => None,
    };
    // Its own worker on the same queues (the first one is gone), limited
    // as configured, with the other providers still off.
    let quota_phase = match (&measured, options.qonto_quota) {
        (Ok(_), Some(decisions)) => {
            let mut env = auth_env.clone();
            env.extend(
                REGISTRY
                    .iter()
                    .filter(|unit| unit.name != "qonto")
                    .map(|unit| (rate_limit_key(unit.name), "off".to_owned())),
            );
            let spawn = || spawn_worker(config, &prefix, prefetch, &env);
            let stop = |mut child: tokio::process::Child| async move {
                terminate(&mut child).await;
            };
            Some(quota::phase(&mut feed, &sim, decisions, spawn, stop).await)
        }
        _ => None,
    };
    let stats = sim.stats();
    let total = stats.total();
    remove(&conn, &topology).await;
    remove(&conn, &ceiling_topology).await;
    let _ = conn.close(200, "bench done".into()).await;
    sim.shutdown();
    let mut f = measured?;
    let quota_report = quota_phase.transpose()?;
    let auth_report = auth_phase.transpose()?;
    let processed = f.processed as f64;
    let mut report = json!({
        "decisions": n,
        "providers": mix,
        "prefetch": prefetch,
        "rounds": rounds,
        "auth": options.auth.as_str(),
        "ceiling_per_s": f.ceiling.round(),
        "worker_per_s": f.worker_rate.round(),
        "ratio": round2(median(&mut f.ratios)),
        "ratio_range": [round2(min(&f.ratios)), round2(max(&f.ratios))],
        "p50_ms": (f.p50 * 10.0).round() / 10.0,
        "p99_ms": (f.p99 * 10.0).round() / 10.0,
        "provider_latency_ms": latency,
        "latency_50ms_per_s": f.latency_rate.round(),
        "latency_theoretical_per_s": latency_cap(prefetch, latency, f.worker_rate).round(),
        "latency_share": round2(median(&mut f.latency_shares)),
        "latency_share_range": [round2(min(&f.latency_shares)), round2(max(&f.latency_shares))],
        "peak_rss_mib": usage.map(|u| (u.peak_rss_kib as f64 / 1024.0 * 10.0).round() / 10.0),
        "cpu_us_per_decision": usage.map(|u| (u.cpu_us as f64 / processed).round()),
        "outcome_event_bytes": f.event_bytes,
        "provider_http": match total.http2_calls {
            0 => "HTTP/1.1",
            n if n == total.calls => "HTTP/2",
            _ => "mixed",
        },
        "double_state_changes": total.double_state_changes,
        "provider_limits": "off",
        "qonto_quota": quota_report,
        "auth_comparison": auth_report,
    });
    // `<name>_per_s` for every multi-call unit, null when not in the mix.
    for name in multi_call {
        report[format!("{name}_per_s")] = json!(f.alone_rates.get(name).map(|r| r.round()));
    }
    Ok(report)
}

/// What the phases measured, before it is summarised.
struct Figures {
    /// Decisions the worker handled in all phases (for CPU per decision).
    processed: usize,
    p50: f64,
    p99: f64,
    ceiling: f64,
    worker_rate: f64,
    latency_rate: f64,
    ratios: Vec<f64>,
    latency_shares: Vec<f64>,
    /// Rates of the multi-call units, each measured alone.
    alone_rates: HashMap<&'static str, f64>,
    /// Size of the outcome event the ceiling relays.
    event_bytes: usize,
}

/// Deletes a phase's queues and exchanges on a channel of its own, so an
/// error on a busy channel cannot leave them behind; a second try follows
/// a failure, and a failure to clean up is reported without discarding
/// figures already taken.
async fn remove(conn: &Connection, topology: &Topology) {
    for attempt in 1..=2 {
        let result = async { topology.delete(&conn.create_channel().await?).await }.await;
        match result {
            Ok(()) => return,
            Err(e) => eprintln!(
                "bench: removing {}.* failed (attempt {attempt} of 2): {e}",
                topology.prefix()
            ),
        }
    }
}

/// `APPROVAL_PROVIDERS__<P>__RATE_LIMIT` (CONTRACT.md section 2).
fn rate_limit_key(provider: &str) -> String {
    format!(
        "APPROVAL_PROVIDERS__{}__RATE_LIMIT",
        provider.to_uppercase()
    )
}

/// Every provider answers after `latency_ms` from now on.
fn set_latency(sim: &sim::SimHandle, latency_ms: u64) {
    for p in sim::providers() {
        sim.set_faults(
            p,
            Faults {
                latency_ms,
                ..Faults::default()
            },
        );
    }
}

/// The most a worker can do with `prefetch` decisions in flight, each
/// waiting `latency_ms` at the provider, and never more than it does with
/// no latency at all.
fn latency_cap(prefetch: u16, latency_ms: u64, zero_latency_rate: f64) -> f64 {
    if latency_ms == 0 {
        return zero_latency_rate;
    }
    (f64::from(prefetch) * 1000.0 / latency_ms as f64).min(zero_latency_rate)
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let mid = values.len() / 2;
    if values.len().is_multiple_of(2) {
        (values[mid - 1] + values[mid]) / 2.0
    } else {
        values[mid]
    }
}

fn min(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::INFINITY, f64::min)
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// Half approvals, half rejections.
fn alternate(i: usize) -> &'static str {
    if i.is_multiple_of(2) {
        "approve"
    } else {
        "reject"
    }
}

fn sample_bodies(
    mix: &[&str],
    tag: &str,
    n: usize,
    action: impl Fn(usize) -> &'static str,
) -> Vec<Vec<u8>> {
    (0..n)
        .map(|i| {
            samples::decision(mix[i % mix.len()], action(i), &format!("{tag}-{i}"))
                .to_string()
                .into_bytes()
        })
        .collect()
}

fn short_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
}
