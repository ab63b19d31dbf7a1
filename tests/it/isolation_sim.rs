//! Per-provider isolation against the project's simulator made a hard
//! provider (issue 15's acceptance tests): a quota kept without a 429, an
//! outage that holds nobody else's decisions, concurrency that follows the
//! provider's latency, and what `/status` and `/metrics` show meanwhile.
//! The worker is the real binary (the admin endpoint lives there); the
//! simulator runs in this process. Plus issue 16's held-then-`unauthorized`
//! Qonto decision under a revoked OAuth grant.
//! They print their figures (`cargo test --test it isolation_sim -- --nocapture`).

use std::{
    cell::Cell,
    path::PathBuf,
    time::{Duration, Instant},
};

use approval_worker::tools::sim::{
    self, Faults, Outage, OutageMode, ProviderStats, QontoOptions, Quota, SimConfig, SimHandle,
    qonto_oauth::OAuthOptions, samples,
};
use serde_json::Value;

use crate::helpers::{
    app::{App, TestApp, series, spawn_app},
    broker::{Outcome, TestBroker},
    wait::{DEADLINE, wait_for},
};

async fn get_json(url: &str) -> Option<Value> {
    reqwest::get(url).await.ok()?.json().await.ok()
}

async fn status(app: &TestApp) -> Option<Value> {
    get_json(&format!("{}/status", app.admin_url())).await
}

fn stats(sim: &SimHandle, provider: &str) -> ProviderStats {
    sim.stats().provider(provider).cloned().unwrap_or_default()
}

/// Publishes `n` decisions for `provider`, ids `{tag}-{i}`.
async fn publish(broker: &TestBroker, provider: &str, tag: &str, n: usize) {
    for i in 0..n {
        let d = samples::decision(provider, "approve", &format!("{tag}-{i}"));
        broker.publish(&d).await;
    }
}

fn ours<'a>(outcomes: &'a [Outcome], tag: &str) -> impl Iterator<Item = &'a Outcome> {
    let prefix = format!("{tag}-");
    outcomes
        .iter()
        .filter(move |o| o.decision_id().starts_with(&prefix))
}

/// Waits for `n` applied outcomes of decisions tagged `tag`.
async fn applied(broker: &TestBroker, tag: &str, n: usize, deadline: Duration) -> Vec<Outcome> {
    let prefix = format!("{tag}-");
    broker
        .wait_outcomes_within(n, deadline, |o| {
            o.decision_id().starts_with(&prefix) && o.status() == "applied"
        })
        .await
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Qonto held to 50 calls per rolling second by the simulator and by the
/// worker: 400 decisions published at once are all applied, each at its
/// first attempt, without one 429, and no rolling second at the simulator
/// holds more than 50 calls; `/status` shows the window in use. Then the
/// simulator alone tightens its quota: its 429 with `Retry-After` pauses
/// Qonto, which `/status` and `/metrics` show, and the decisions are applied
/// once the pause ends.
#[tokio::test]
async fn qonto_at_50_per_second_drains_400_decisions_without_a_429() {
    let (limit, n) = (50u64, 400usize);
    let app = spawn_app(
        App::simulator("isosim-quota", Faults::default())
            .env("APPROVAL_PROVIDERS__QONTO__RATE_LIMIT", "50/1s")
            .without_worker(),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());
    let quota: Quota = "50/1s".parse().unwrap();
    let fastest = quota.min_duration(n);
    sim.set_quota("qonto", quota);
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    let started = Instant::now();
    publish(broker, "qonto", "q", n).await;
    // The window in use, seen while the decisions drain.
    let busy = wait_for("Qonto's window in use in /status", DEADLINE, || async {
        let s = status(&app).await?;
        let window = s["providers"]["qonto"]["rate_limit"][0].clone();
        (window["used"].as_u64()? >= limit * 4 / 5).then_some(window)
    })
    .await;
    let metrics_busy = app.metrics().await;
    let outcomes = applied(broker, "q", n, Duration::from_secs(60)).await;
    let drained = started.elapsed();
    let qonto = stats(sim, "qonto");
    let busiest = qonto.max_in(Duration::from_secs(1));
    let waits = series(
        &metrics_busy,
        r#"approval_provider_limiter_waits_total{provider="qonto"}"#,
    );
    println!(
        "quota 50/1s: {n} Qonto decisions applied in {drained:?} (the quota allows {fastest:?} at best); \
         {} calls, {} throttled, at most {busiest:?} in a rolling second, {waits} limiter waits seen mid-drain",
        qonto.calls, qonto.throttled
    );
    assert_eq!(qonto.throttled, 0, "{qonto:?}");
    assert_eq!(qonto.by_status.get(&429), None, "{qonto:?}");
    assert!(busiest.is_some_and(|b| b <= limit), "{qonto:?}");
    assert_eq!(qonto.state_changes, n as u64, "{qonto:?}");
    assert_eq!(qonto.double_state_changes, 0, "{qonto:?}");
    assert!(
        outcomes.iter().all(|o| o.body["attempts"] == 1),
        "a deferral spent an attempt"
    );
    assert!(drained >= fastest, "faster than the quota allows");
    assert_eq!(busy["limit"], limit, "{busy}");
    assert_eq!(busy["window_ms"], 1000, "{busy}");
    assert!(busy["used"].as_u64() <= Some(limit), "{busy}");
    assert!(waits >= 1.0, "{metrics_busy}");

    // The simulator alone now allows one call per two seconds: its 429
    // names the wait, and the worker pauses every Qonto call for it.
    sim.set_quota("qonto", "1/2s".parse().unwrap());
    publish(broker, "qonto", "p", 3).await;
    let paused = wait_for("Qonto paused in /status", DEADLINE, || async {
        let s = status(&app).await?;
        s["providers"]["qonto"]["paused_until"]
            .is_string()
            .then_some(s)
    })
    .await;
    let metrics_paused = app.metrics().await;
    let pause_seen = Instant::now();
    applied(broker, "p", 3, DEADLINE).await;
    let after = stats(sim, "qonto");
    let throttled = after.throttled;
    println!(
        "quota 1/2s at the simulator only: 3 decisions applied {:?} after the pause was seen, {throttled} throttled",
        pause_seen.elapsed()
    );
    // Each 429 paused every Qonto call: the decisions that met one came
    // back after it (a retry in process, or a deferral) instead of
    // spending their attempts on more 429s.
    assert!((1..=4).contains(&throttled), "{after:?}");
    assert_eq!(after.by_status.get(&429), Some(&throttled), "{after:?}");
    assert_eq!(after.state_changes, n as u64 + 3, "{after:?}");
    assert!(
        paused["providers"]["ledger_v1"]["paused_until"].is_null(),
        "{paused}"
    );
    assert_eq!(
        series(
            &metrics_paused,
            r#"approval_provider_paused{provider="qonto"}"#
        ),
        1.0,
        "{metrics_paused}"
    );
    assert_eq!(
        series(
            &metrics_paused,
            r#"approval_provider_paused{provider="ledger_v1"}"#
        ),
        0.0
    );
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(DEADLINE).await.code(), Some(0));
}

/// FlexPay out for 30 s (`mode`) while 100 FlexPay and 300 Ledger v1
/// decisions arrive at prefetch 30, with the default breaker (5 failures,
/// 15 s cool-down doubling): every Ledger v1 decision is applied within the
/// outage, FlexPay sees the calls in flight when its breaker opened and a
/// probe per cool-down, and every FlexPay decision is applied after it
/// recovers, none exhausted nor parked.
async fn an_outage_of_one_provider(name: &str, mode: OutageMode) {
    let outage = Duration::from_secs(30);
    let (prefetch, failures, cool_down) = (30usize, 5usize, Duration::from_secs(15));
    // The worker's share of the prefetch window per provider (a quarter
    // stays for the others).
    let share = prefetch - prefetch / 4;
    let (n_flexpay, n_ledger) = (100usize, 300usize);
    let app = spawn_app(
        App::simulator(name, Faults::default())
            .env("APPROVAL_AMQP__PREFETCH", prefetch)
            .without_worker(),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    sim.set_outage("flexpay", Some(Outage::new(mode).lasting(outage)));
    let started = Instant::now();
    let outage_ends = started + outage;
    for i in 0..n_flexpay {
        let d = samples::decision("flexpay", "approve", &format!("f-{i}"));
        broker.publish(&d).await;
        for j in 0..n_ledger / n_flexpay {
            let id = format!("l-{}", i * n_ledger / n_flexpay + j);
            broker
                .publish(&samples::decision("ledger_v1", "approve", &id))
                .await;
        }
    }
    let published = started.elapsed();
    applied(broker, "l", n_ledger, outage).await;
    let ledger_done = started.elapsed();
    let open = wait_for("FlexPay's breaker open in /status", DEADLINE, || async {
        let s = status(&app).await?;
        (s["providers"]["flexpay"]["breaker"]["state"] == "open").then_some(s)
    })
    .await;
    let metrics_open = app.metrics().await;
    let seen_open = Instant::now();

    let flexpay_outcomes = applied(broker, "f", n_flexpay, outage + Duration::from_secs(60)).await;
    let last_applied = Instant::now();
    let recovery = last_applied.saturating_duration_since(outage_ends);
    let fx = stats(sim, "flexpay");
    let ledger = stats(sim, "ledger_v1");
    let attempts: Vec<u64> = flexpay_outcomes
        .iter()
        .filter_map(|o| o.body["attempts"].as_u64())
        .collect();
    let probes_allowed = outage.as_millis().div_ceil(cool_down.as_millis()) as usize;
    let most = failures + share + probes_allowed;
    println!(
        "outage ({mode:?}, {outage:?}): Ledger v1's {n_ledger} applied {ledger_done:?} after it began \
         (all {} published within {published:?}); \
         FlexPay saw {} calls during it (bound {most}: {failures} failures + a share of {share} in flight + {probes_allowed} probes), \
         {} answered 429; all {n_flexpay} FlexPay applied {recovery:?} after it ended, attempts at most {}",
        n_flexpay + n_ledger,
        fx.outage_calls,
        fx.by_status.get(&429).copied().unwrap_or(0),
        attempts.iter().max().copied().unwrap_or(0),
    );

    assert!(
        ledger_done < outage && seen_open < outage_ends,
        "Ledger v1 waited for FlexPay: {ledger_done:?}"
    );
    assert!(
        (failures as u64..=most as u64).contains(&fx.outage_calls),
        "{} FlexPay calls met the outage, expected {failures}..={most}",
        fx.outage_calls
    );
    assert_eq!(fx.throttled, 0, "{fx:?}");
    assert_eq!(fx.state_changes, n_flexpay as u64, "{fx:?}");
    assert_eq!(fx.double_state_changes, 0, "{fx:?}");
    assert_eq!(ledger.state_changes, n_ledger as u64, "{ledger:?}");
    let all = broker.outcomes();
    let settled: Vec<_> = ours(&all, "f").collect();
    assert!(
        settled.iter().all(|o| o.status() == "applied"),
        "a FlexPay decision did not end applied: {settled:#?}"
    );
    assert_eq!(settled.len(), n_flexpay, "one outcome per decision");
    assert_eq!(
        broker.queue_counts(&broker.topology.dead()).await.0,
        0,
        "nothing parked"
    );
    assert_eq!(attempts.len(), n_flexpay);

    // Seen during the outage: FlexPay's breaker open since a known time,
    // Ledger v1's closed, and the gauges to match.
    let f = &open["providers"]["flexpay"]["breaker"];
    assert!(f["since"].is_string(), "{open}");
    assert!(f["cool_down_ms"].as_u64() >= Some(ms(cool_down)), "{open}");
    assert_eq!(
        open["providers"]["ledger_v1"]["breaker"]["state"], "closed",
        "{open}"
    );
    assert_eq!(
        series(
            &metrics_open,
            r#"approval_provider_breaker_state{provider="ledger_v1"}"#
        ),
        0.0
    );
    assert!(
        series(
            &metrics_open,
            r#"approval_provider_breaker_state{provider="flexpay"}"#
        ) >= 1.0,
        "{metrics_open}"
    );
    assert!(
        series(
            &metrics_open,
            r#"approval_deferrals_total{provider="flexpay",reason="breaker_open"}"#
        ) >= 1.0,
        "{metrics_open}"
    );
    // Closed again, and every transition counted and logged.
    let closed = status(&app).await.expect("/status answers");
    assert_eq!(
        closed["providers"]["flexpay"]["breaker"]["state"], "closed",
        "{closed}"
    );
    let metrics = app.metrics().await;
    let transitions = |provider: &str, to: &str| {
        series(
            &metrics,
            &format!(
                r#"approval_provider_breaker_transitions_total{{provider="{provider}",to="{to}"}}"#
            ),
        )
    };
    assert!(transitions("flexpay", "open") >= 1.0, "{metrics}");
    assert!(transitions("flexpay", "closed") >= 1.0, "{metrics}");
    assert_eq!(transitions("ledger_v1", "open"), 0.0, "{metrics}");
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(DEADLINE).await.code(), Some(0));
    let logs = worker.output();
    let opened: Vec<_> = logs
        .lines()
        .filter(|l| l.contains("circuit breaker opened"))
        .collect();
    assert!(!opened.is_empty(), "no log line on opening");
    assert!(opened.iter().all(|l| l.contains("flexpay")), "{opened:?}");
    assert!(
        logs.lines()
            .any(|l| l.contains("circuit breaker closed") && l.contains("flexpay")),
        "no log line on closing"
    );
}

#[tokio::test]
async fn flexpay_answering_503_for_30s_holds_neither_ledger_nor_its_own_decisions() {
    an_outage_of_one_provider("isosim-503", OutageMode::Unavailable).await;
}

#[tokio::test]
async fn flexpay_down_for_30s_holds_neither_ledger_nor_its_own_decisions() {
    an_outage_of_one_provider("isosim-down", OutageMode::Down).await;
}

/// Ledger v1 slows down with load (each call waits 50 ms more per call
/// already in flight): a burst makes the worker's concurrency limit for it
/// go down, and once the latency law is cleared and load continues, back
/// up. `/status` and `/metrics` show the limit and the calls in flight.
// The simulator runs on this test's runtime: on one thread, the test's
// own polling would slow the provider it measures.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrency_follows_a_provider_whose_latency_grows_with_load() {
    let initial = 32u64;
    let app = spawn_app(
        App::simulator("isosim-aimd", Faults::default())
            .env("APPROVAL_ISOLATION__CONCURRENCY_INITIAL", initial)
            .without_worker(),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());
    let fast = Faults {
        latency_ms: 20,
        ..Faults::default()
    };
    sim.set_faults(
        "ledger_v1",
        Faults {
            latency_per_in_flight_ms: 50.0,
            ..fast
        },
    );
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    let limit = |s: &Value| s["providers"]["ledger_v1"]["concurrency"]["limit"].as_u64();

    // One call at a time: the provider's unloaded round trip, the baseline.
    for i in 0..3 {
        let id = format!("w-{i}");
        broker
            .publish(&samples::decision("ledger_v1", "approve", &id))
            .await;
        broker.outcome(&id, "applied").await;
    }
    let before = status(&app).await.expect("/status answers");
    assert_eq!(limit(&before), Some(initial), "{before}");

    let burst = 300;
    let started = Instant::now();
    publish(broker, "ledger_v1", "a", burst).await;
    let lowest = Cell::new(initial);
    let low = wait_for("the limit to go down", DEADLINE, || async {
        let s = status(&app).await?;
        lowest.set(lowest.get().min(limit(&s)?));
        (lowest.get() <= initial / 4).then_some(s)
    })
    .await;
    let down_after = started.elapsed();
    let low_limit = lowest.get();
    let metrics_low = app.metrics().await;

    // The provider recovers; load continues. The answers of calls sent
    // under the law still arrive slow, so the limit may dip further first;
    // then it grows by one per round trip.
    sim.set_faults("ledger_v1", fast);
    let cleared = Instant::now();
    let metrics_cleared = app.metrics().await;
    let more = 2 * burst;
    publish(broker, "ledger_v1", "b", more).await;
    let seen = std::cell::RefCell::new(Vec::new());
    let high = wait_for(
        "the limit to go back up",
        Duration::from_secs(40),
        || async {
            let s = status(&app).await?;
            let l = limit(&s)?;
            lowest.set(lowest.get().min(l));
            let mut seen = seen.borrow_mut();
            if seen.last().is_none_or(|&(_, last)| last != l) {
                seen.push((ms(cleared.elapsed()), l));
            }
            (l >= initial / 2).then_some(s)
        },
    )
    .await;
    let up_after = cleared.elapsed();
    let metrics_high = app.metrics().await;
    let outcomes = applied(broker, "a", burst, Duration::from_secs(90)).await;
    let outcomes_more = applied(broker, "b", more, Duration::from_secs(90)).await;
    let lowest = lowest.get();
    let highest = limit(&high).unwrap_or_default();
    // The mean duration of the calls made between two scrapes.
    let mean_call = |from: &str, to: &str| {
        let of = |m: &str, what: &str| {
            series(
                m,
                &format!(
                    r#"approval_provider_call_duration_seconds_{what}{{provider="ledger_v1"}}"#
                ),
            )
        };
        let count = of(to, "count") - of(from, "count");
        let sum = of(to, "sum") - of(from, "sum");
        Duration::from_secs_f64(if count > 0.0 { sum / count } else { 0.0 })
    };
    let ledger = stats(sim, "ledger_v1");
    println!(
        "adaptive concurrency: limit {initial} -> {low_limit} within {down_after:?} of the burst \
         (lowest {lowest}), back to {highest} within {up_after:?} of the latency law's end; \
         {} calls, mean call {:?} under the law, {:?} after it; limit after the law (ms, limit): {:?}",
        ledger.calls,
        mean_call("", &metrics_cleared),
        mean_call(&metrics_cleared, &metrics_high),
        seen.borrow()
    );
    let gauge = |m: &str| {
        series(
            m,
            r#"approval_provider_concurrency_limit{provider="ledger_v1"}"#,
        )
    };
    // Calls sent before a decrease stay in flight above the new limit.
    assert_eq!(
        low["providers"]["ledger_v1"]["concurrency"]["adaptive"], true,
        "{low}"
    );
    assert!(gauge(&metrics_low) < initial as f64, "{metrics_low}");
    assert!(gauge(&metrics_high) > gauge(&metrics_low), "{metrics_high}");
    assert!(
        high["providers"]["ledger_v1"]["concurrency"]["ceiling"] == 256,
        "{high}"
    );
    assert!(
        series(
            &metrics_low,
            r#"approval_provider_in_flight{provider="ledger_v1"}"#
        ) >= 1.0,
        "{metrics_low}"
    );
    // Other providers' limits are their own.
    assert_eq!(
        high["providers"]["flexpay"]["concurrency"]["limit"], initial,
        "{high}"
    );
    // A place not found within the wait moved a decision to a retry tier,
    // without spending an attempt.
    assert!(
        series(
            &metrics_high,
            r#"approval_deferrals_total{provider="ledger_v1",reason="concurrency"}"#
        ) >= 1.0,
        "{metrics_high}"
    );
    assert!(
        outcomes
            .iter()
            .chain(&outcomes_more)
            .all(|o| o.body["attempts"] == 1),
        "a deferral spent an attempt"
    );
    assert_eq!(ledger.double_state_changes, 0, "{ledger:?}");
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(DEADLINE).await.code(), Some(0));
}

/// Issue 16: a Qonto decision held because the OAuth grant is revoked (no
/// call to Qonto) ends `unauthorized` once the retry horizon passes, parked
/// with that kind and the provider code `credentials_unusable`; not
/// `exhausted`, which would tell operators to retry what needs a login.
#[tokio::test]
async fn a_decision_held_by_a_revoked_grant_ends_unauthorized_at_the_horizon() {
    // The token source holds a decision 10 s at a time: a 12 s horizon
    // holds it once, then ends it.
    let horizon = Duration::from_secs(12);
    let options = OAuthOptions::default();
    let sim = sim::start(
        SimConfig::default().with(QontoOptions {
            oauth: options.clone(),
            ..QontoOptions::default()
        }),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let dir = TempDir::new();
    let store = dir.0.join("qonto-oauth.json");
    // A stored pair whose refresh token the server never issued and whose
    // access token expired: its refresh is answered invalid_grant.
    crate::helpers::qonto::write_token_file(
        &store,
        &serde_json::json!({
            "access_token": "it-stale-access",
            "access_issued_at": "2026-01-01T00:00:00Z",
            "access_expires_at": "2026-01-01T01:00:00Z",
            "refresh_token": "it-unknown-refresh",
            "generation": 1,
            "refreshed_at": "2026-01-01T00:00:00Z",
            "refreshed_by": "it:1"
        }),
    );
    let mut app = App::without_providers("isosim-revoked")
        .env("APPROVAL_RETRY__HORIZON_MS", ms(horizon))
        .env(
            "APPROVAL_PROVIDERS__QONTO__OAUTH__TOKEN_STORE",
            format!("file:{}", store.display()),
        );
    for (k, v) in sim
        .worker_env()
        .into_iter()
        .chain(sim::qonto_oauth::worker_env(
            &sim.base_url("qonto"),
            &options,
        ))
    {
        app = app.env(&k, v);
    }
    let app = spawn_app(app).await;
    let broker = &app.broker;

    let d = samples::decision("qonto", "approve", "revoked-1");
    let published = Instant::now();
    broker.publish(&d).await;
    let o = broker
        .wait_outcomes_within(1, horizon + DEADLINE, |o| o.decision_id() == "revoked-1")
        .await
        .remove(0);
    let took = published.elapsed();
    let parked = broker.wait_parked(1).await;
    let qonto = stats(&sim, "qonto");
    println!(
        "revoked grant, horizon {horizon:?}: ended {} ({}) after {took:?}",
        o.status(),
        o.body["error"]["kind"]
    );
    assert_eq!(o.status(), "failed", "{:#}", o.body);
    assert_eq!(o.body["error"]["kind"], "unauthorized", "{:#}", o.body);
    assert_eq!(
        o.body["error"]["provider_code"], "credentials_unusable",
        "{:#}",
        o.body
    );
    assert_eq!(o.body["attempts"], 0, "no call was made: {:#}", o.body);
    assert_eq!(parked.len(), 1);
    assert_eq!(parked[0].headers["x-approval-error-kind"], "unauthorized");
    // Held first (one hold of the token source), ended by the horizon.
    assert!(
        took >= Duration::from_secs(9),
        "ended before it was held: {took:?}"
    );
    assert_eq!(qonto.state_changing_calls, 0, "{qonto:?}");
    assert_eq!(qonto.count("oauth.invalid_grants"), 1, "{qonto:?}");
    let text = o.body.to_string();
    for secret in [
        "it-unknown-refresh",
        "it-stale-access",
        &options.client_secret,
    ] {
        assert!(!text.contains(secret), "the outcome holds a secret: {text}");
    }
    app.stop_worker().await;
}

/// A directory of this test's own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!("it-isosim-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
