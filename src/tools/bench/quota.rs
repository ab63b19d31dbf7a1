//! `bench --qonto-quota [N]`: N Qonto decisions drained by a worker with its
//! default Qonto rate limit, against a simulator that enforces Qonto's
//! documented quota. What it shows is a count of 429s (a worker that keeps
//! to the quota meets none) and the rate achieved against the best the
//! quota allows for N calls; it runs for minutes, never in CI.

use std::time::Duration;

use serde_json::{Value, json};

use super::feed::{Drained, Feed};
use super::{BenchError, alternate, round2, sample_bodies};
use crate::tools::sim::{ProviderStats, Quota, SimHandle};

const PROVIDER: &str = "qonto";

/// Qonto's documented per-IP quota (PROVIDERS.md section 1.4).
const QONTO_QUOTA: &str = "1000/10s,10000/10m";

/// Beyond the least time the quota allows, how long the phase may take
/// before it is called stuck: a worker that keeps to the quota needs about
/// that least time, one that does not is slower but must still finish.
fn deadline(min: Duration) -> Duration {
    min * 2 + Duration::from_secs(300)
}

/// Runs the phase with a worker started by `spawn` (and stopped by
/// `stop`) once the simulator enforces the quota.
pub(super) async fn phase<W, S, F>(
    feed: &mut Feed,
    sim: &SimHandle,
    decisions: usize,
    spawn: S,
    stop: impl FnOnce(W) -> F,
) -> Result<Value, BenchError>
where
    S: FnOnce() -> Result<W, BenchError>,
    F: Future<Output = ()>,
{
    let quota: Quota = QONTO_QUOTA
        .parse()
        .map_err(|e| BenchError::Setup(format!("Qonto's quota: {e}")))?;
    let n = decisions.max(1);
    // One call per decision when nothing is refused.
    let min = quota.min_duration(n);
    eprintln!(
        "bench: quota phase: {n} Qonto decisions against the simulator enforcing {quota} \
         (the quota allows them in {:.0} s at best), the worker with its default Qonto \
         rate limit",
        min.as_secs_f64()
    );
    sim.set_quota(PROVIDER, quota.clone());
    let before = sim.stats().provider(PROVIDER).cloned().unwrap_or_default();
    let worker = spawn()?;
    let bodies = sample_bodies(&[PROVIDER], "q", n, alternate);
    let drained = feed.phase_outcomes("quota", bodies, deadline(min)).await;
    stop(worker).await;
    let after = sim.stats().provider(PROVIDER).cloned().unwrap_or_default();
    sim.set_quota(PROVIDER, Quota::default());
    let drained = drained?;

    let answered_429 = |s: &ProviderStats| s.by_status.get(&429).copied().unwrap_or_default();
    // Token exchanges are not provider calls the quota counts.
    let calls = |s: &ProviderStats| s.calls.saturating_sub(s.token_issued);
    let mut report = report(&quota, n, min, &drained);
    report["responses_429"] = json!(answered_429(&after).saturating_sub(answered_429(&before)));
    report["throttled"] = json!(after.throttled.saturating_sub(before.throttled));
    report["provider_calls"] = json!(calls(&after).saturating_sub(calls(&before)));
    report["max_in_window"] = json!(after.max_in_window);
    eprintln!("bench: quota phase: {report}");
    Ok(report)
}

fn report(quota: &Quota, n: usize, min: Duration, drained: &Drained) -> Value {
    let span = drained
        .first
        .map(|first| drained.last.duration_since(first))
        .unwrap_or_default();
    let wall = drained.last.duration_since(drained.published);
    let per_s = |d: Duration| (d > Duration::ZERO).then(|| round2(n as f64 / d.as_secs_f64()));
    json!({
        "decisions": n,
        "quota": quota.to_string(),
        "worker_rate_limit": std::env::var("APPROVAL_PROVIDERS__QONTO__RATE_LIMIT")
            .unwrap_or_else(|_| "default".to_owned()),
        "outcomes": drained.statuses,
        // First to last outcome: the span the quota governs (first call to
        // last call), without the worker's start.
        "duration_s": round2(span.as_secs_f64()),
        "wall_s": round2(wall.as_secs_f64()),
        "per_s": per_s(span),
        "quota_min_duration_s": round2(min.as_secs_f64()),
        // The best rate the quota allows for this many calls; null when it
        // admits them all at once.
        "quota_best_per_s": per_s(min),
        "quota_long_run_per_s": quota.long_run_per_s().map(round2),
        // The least time the quota allows over the time taken: 1.0 is a
        // worker that loses nothing to its limiter.
        "share_of_quota": (span > Duration::ZERO)
            .then(|| round2(min.as_secs_f64() / span.as_secs_f64())),
    })
}
