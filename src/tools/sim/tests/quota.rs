//! Quotas: the rolling rule itself on explicit instants, then the answer
//! every unit gives over its quota, through the worker's own clients.

use std::time::Duration;

use serde_json::json;
use tokio::time::Instant;

use crate::tools::sim::quota::{Quota, QuotaState, Refusal, Window, period_label};
use crate::tools::sim::testkit::{apply, client, clients, parts, sample, sim};
use crate::tools::sim::{providers, unit};

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn state(text: &str) -> QuotaState {
    QuotaState::new(text.parse().unwrap())
}

#[test]
fn quotas_parse_as_the_workers_rate_limit() {
    let qonto: Quota = "1000/10s, 10000/10m".parse().unwrap();
    assert_eq!(
        qonto.0,
        vec![
            Window {
                limit: 1000,
                period: Duration::from_secs(10)
            },
            Window {
                limit: 10_000,
                period: Duration::from_secs(600)
            },
        ]
    );
    assert_eq!(qonto.to_string(), "1000/10s,10000/10m");
    assert_eq!("50/1000ms".parse::<Quota>().unwrap().to_string(), "50/1s");
    assert_eq!("7/1500ms".parse::<Quota>().unwrap().to_string(), "7/1500ms");
    assert_eq!("1/2h".parse::<Quota>().unwrap().to_string(), "1/2h");
    for off in ["off", "OFF", "none", "", "  "] {
        assert!(off.parse::<Quota>().unwrap().is_off(), "{off:?}");
    }
    for bad in [
        "0/1s",
        "10/0s",
        "10/1d",
        "10",
        "x/1s",
        "10/s",
        "10/1",
        "-1/1s",
        "10/8d",
        "1/1s,",
        "99999999999999999999/1s",
        "1/99999999999999999h",
        "1/1s,1/2s,1/3s,1/4s,1/5s,1/6s,1/7s,1/8s,1/9s",
    ] {
        assert!(bad.parse::<Quota>().is_err(), "{bad:?} was accepted");
    }
    assert_eq!(period_label(ms(600_000)), "10m");
    assert_eq!(period_label(ms(90_000)), "90s");
    assert_eq!(period_label(ms(250)), "250ms");
}

/// At most N admitted calls in any `(t - D, t]`: a call at exactly `D`
/// after the oldest one is admitted, one a millisecond earlier is not, and
/// the wait it is told is exact.
#[test]
fn a_window_admits_n_in_any_rolling_period_and_says_when_a_slot_frees() {
    let t0 = Instant::now();
    let mut quota = state("3/1s");
    for at in [0, 100, 200] {
        assert_eq!(quota.arrive(t0 + ms(at)), Ok(()), "{at}");
    }
    assert_eq!(
        quota.arrive(t0 + ms(999)),
        Err(Refusal {
            wait: ms(1),
            limit: 3
        })
    );
    // The refused call used no slot.
    assert_eq!(quota.arrive(t0 + ms(1000)), Ok(()));
    // (0 s, 1 s] now holds 100, 200 and 1000: the next slot frees at 1.1 s.
    assert_eq!(
        quota.arrive(t0 + ms(1000)),
        Err(Refusal {
            wait: ms(100),
            limit: 3
        })
    );
    assert_eq!(quota.arrive(t0 + ms(1100)), Ok(()));
    assert_eq!(quota.used(t0 + ms(1100)).get("1s"), Some(&3));
    assert_eq!(quota.used(t0 + ms(5000)).get("1s"), Some(&0));
}

/// Every window must have room; the wait is the longest, and its N is the
/// one reported.
#[test]
fn several_windows_all_hold() {
    let t0 = Instant::now();
    let mut quota = state("2/1s,3/10s");
    assert_eq!(quota.arrive(t0), Ok(()));
    assert_eq!(quota.arrive(t0), Ok(()));
    assert_eq!(
        quota.arrive(t0),
        Err(Refusal {
            wait: ms(1000),
            limit: 2
        })
    );
    assert_eq!(quota.arrive(t0 + ms(1000)), Ok(()));
    assert_eq!(
        quota.arrive(t0 + ms(2000)),
        Err(Refusal {
            wait: ms(8000),
            limit: 3
        })
    );
    assert_eq!(quota.arrive(t0 + ms(10_000)), Ok(()));
}

#[test]
fn retry_after_rounds_the_wait_up_to_whole_seconds() {
    let secs = |wait| Refusal { wait, limit: 1 }.retry_after_secs();
    assert_eq!(secs(ms(1)), 1);
    assert_eq!(secs(ms(1000)), 1);
    assert_eq!(secs(ms(2000)), 2);
    assert_eq!(secs(ms(2001)), 3);
}

/// The most arrivals in any rolling window, refused ones included: what a
/// client sent, not what it was allowed.
#[test]
fn max_in_window_counts_every_arrival_exactly() {
    let t0 = Instant::now();
    let mut quota = state("1000/1s,1000/10s");
    // (0.299 s, 1.299 s] holds 300, 600, 900, 1000 and 1299: five; no
    // other one-second window holds more.
    for at in [0, 300, 600, 900, 1000, 1299, 2299, 2300] {
        quota.arrive(t0 + ms(at)).unwrap();
    }
    let max = quota.max_in_window();
    assert_eq!(max.get("1s"), Some(&5));
    assert_eq!(max.get("10s"), Some(&8));

    let mut strict = state("1/1s");
    let refused = (0..5)
        .filter(|i| strict.arrive(t0 + ms(*i)).is_err())
        .count();
    assert_eq!(refused, 4);
    assert_eq!(strict.max_in_window().get("1s"), Some(&5));
    strict.reset();
    assert_eq!(strict.max_in_window().get("1s"), Some(&0));
    assert_eq!(
        strict.arrive(t0 + ms(5)),
        Ok(()),
        "reset empties the windows"
    );
}

/// The figure the bench compares its quota phase with.
#[test]
fn min_duration_is_the_greedy_schedule() {
    let qonto: Quota = "1000/10s,10000/10m".parse().unwrap();
    assert_eq!(qonto.min_duration(1000), Duration::ZERO);
    assert_eq!(qonto.min_duration(1001), Duration::from_secs(10));
    assert_eq!(qonto.min_duration(10_000), Duration::from_secs(90));
    // The 10,001st call waits for the first to leave the 10-minute window;
    // the 20,000th for the 10,000th (sent at 90 s).
    assert_eq!(qonto.min_duration(10_001), Duration::from_secs(600));
    assert_eq!(qonto.min_duration(20_000), Duration::from_secs(690));
    assert_eq!(Quota::default().min_duration(20_000), Duration::ZERO);
    assert_eq!(
        qonto.long_run_per_s().map(|r| (r * 100.0).round()),
        Some(1667.0)
    );
}

/// Over its quota every unit answers its rate-limit status with a
/// `Retry-After` the worker's client reads, and applies nothing.
#[tokio::test]
async fn over_quota_each_unit_answers_its_throttling_status_and_applies_nothing() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    for &name in providers() {
        // Two decisions fit, whatever a decision costs in calls.
        let calls = u64::from(unit(name).unwrap().sim.calls_per_decision());
        let quota: Quota = format!("{}/2s", 2 * calls).parse().unwrap();
        sim.set_quota(name, quota);
        for _ in 0..2 {
            let reply = apply(&clients, &sample(name, "reject").0, &new_key()).await;
            assert!(reply.is_ok(), "{name}: {reply:?}");
        }
        let (decision, target) = sample(name, "reject");
        let err = apply(&clients, &decision, &new_key()).await.unwrap_err();
        assert!(
            matches!(err.http_status, Some(429 | 420)),
            "{name}: {err:?}"
        );
        // Within the same second: the oldest call leaves the window in
        // more than one second and at most two.
        assert_eq!(err.retry_after, Some(Duration::from_secs(2)), "{name}");
        assert_eq!(sim.target_state(name, &target), None, "{name}");
        let stats = sim.stats().provider(name).unwrap().clone();
        assert_eq!(stats.throttled, 1, "{name}");
        assert_eq!(
            stats.max_in(Duration::from_secs(2)),
            Some(2 * calls + 1),
            "{name}"
        );
        assert_eq!(stats.state_changes, 2, "{name}");
        let (quota, used) = sim.quota(name);
        assert_eq!(quota.to_string(), format!("{}/2s", 2 * calls));
        assert_eq!(used.get("2s"), Some(&(2 * calls)), "{name}");
        sim.set_quota(name, Quota::default());
        assert!(
            apply(&clients, &decision, &new_key()).await.is_ok(),
            "{name}"
        );
    }
    // A provider without a quota reports no windows.
    sim.reset();
    assert!(sim.stats().0.values().all(|p| p.max_in_window.is_empty()));
}

#[tokio::test]
async fn quota_control_endpoint_sets_reads_and_clears() {
    let sim = sim().await;
    let name = one_call_unit();
    let url = format!("{}/_sim/quota/{name}", sim.root_url());
    let put = |body: serde_json::Value| client().put(&url).json(&body).send();

    let (status, body) = parts(put(json!({"windows": "1/1h, 5/1m"})).await.unwrap()).await;
    assert_eq!((status, body), (200, json!({"windows": "1/1h,5/1m"})));
    let clients = clients(&sim, &[]);
    apply(&clients, &sample(name, "reject").0, &new_key())
        .await
        .unwrap();
    let (status, body) = parts(client().get(&url).send().await.unwrap()).await;
    assert_eq!(status, 200);
    assert_eq!(
        body,
        json!({"windows": "1/1h,5/1m", "used": {"1h": 1, "1m": 1}})
    );
    for bad in [
        json!({"windows": "1/1d"}),
        json!({"windows": 5}),
        json!({"window": "1/1s"}),
    ] {
        let response = put(bad.clone()).await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    let (status, body) = parts(put(json!({})).await.unwrap()).await;
    assert_eq!((status, body), (200, json!({"windows": "off"})));
    assert!(sim.quota(name).0.is_off());
    let unknown = client()
        .put(format!("{}/_sim/quota/nobody", sim.root_url()))
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(unknown.status(), 404);
}

/// A unit whose decision is one call.
pub(super) fn one_call_unit() -> &'static str {
    providers()
        .iter()
        .copied()
        .find(|name| unit(name).unwrap().sim.calls_per_decision() == 1)
        .expect("a one-call unit")
}

fn new_key() -> String {
    crate::tools::sim::testkit::new_id()
}
