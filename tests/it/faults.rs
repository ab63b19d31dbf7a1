//! Fault tests against the provider simulator: the worker killed mid-flight,
//! a provider storm, and one provider down while the others flow.
//! They print their figures (`cargo test --test it faults -- --nocapture`).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use approval_worker::tools::sim::{self, Faults, SimHandle, samples};
use rand::Rng;
use serde_json::Value;

use crate::helpers::{
    app::{App, spawn_app},
    broker::TestBroker,
    wait::wait_for,
};

fn assert_no_double_application(sim: &SimHandle) {
    let stats = sim.stats();
    for p in sim::providers() {
        let s = stats.provider(p).unwrap();
        assert_eq!(
            s.double_state_changes, 0,
            "{p} decided a target twice: {s:?}"
        );
        assert_eq!(
            s.conflicting_keys, 0,
            "{p} saw two idempotency keys for one target: {s:?}"
        );
    }
}

/// The final outcome per decision (applied or already_applied), waiting
/// until every one of `ids` has one.
async fn settled(
    broker: &TestBroker,
    ids: &BTreeSet<String>,
    deadline: Duration,
) -> BTreeMap<String, Value> {
    wait_for(
        &format!("{} decisions to settle", ids.len()),
        deadline,
        || async {
            let mut done = BTreeMap::new();
            for o in broker.outcomes() {
                if matches!(o.status(), "applied" | "already_applied") {
                    done.insert(o.decision_id().to_owned(), o.body.clone());
                }
            }
            (ids.iter().all(|id| done.contains_key(id))).then_some(done)
        },
    )
    .await
}

#[tokio::test]
async fn sigkill_mid_flight_loses_nothing_and_applies_nothing_twice() {
    // Few slots and slow calls keep decisions in flight across the kills.
    let faults = Faults {
        latency_ms: 50,
        ..Faults::default()
    };
    let app = spawn_app(
        App::simulator("f-crash", faults)
            .env("APPROVAL_AMQP__PREFETCH", 20)
            .env("APPROVAL_LOG__LEVEL", "warn")
            .without_worker(),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());

    let total = 800;
    let mut ids = BTreeSet::new();
    for i in 0..total {
        let provider = sim::providers()[i % sim::providers().len()];
        let action = if i % 2 == 0 { "approve" } else { "reject" };
        let d = samples::decision(provider, action, &format!("crash-{i}"));
        ids.insert(d["decision_id"].as_str().unwrap().to_owned());
        broker.publish(&d).await;
    }
    let started = Instant::now();
    let mut worker = app.run(&["run"]);
    let kills = 3;
    for k in 0..kills {
        broker.wait_consumer().await;
        let wait = rand::thread_rng().gen_range(100..500);
        tokio::time::sleep(Duration::from_millis(wait)).await; // a random moment, not a synchronisation
        worker.signal(libc::SIGKILL);
        worker.wait(Duration::from_secs(10)).await;
        let done = broker.outcomes().len();
        println!(
            "kill {} after {wait} ms: {done} outcome events so far",
            k + 1
        );
        worker = app.run(&["run"]);
    }
    let outcomes = settled(broker, &ids, Duration::from_secs(120)).await;
    let elapsed = started.elapsed();
    broker.wait_consumer().await;
    worker.signal(libc::SIGTERM);
    assert_eq!(worker.wait(Duration::from_secs(20)).await.code(), Some(0));

    let already = outcomes
        .values()
        .filter(|o| o["status"] == "already_applied")
        .count();
    println!(
        "crash test: {total} decisions, {kills} SIGKILLs, settled in {:.1} s, {} applied, {already} already_applied (reconciled)",
        elapsed.as_secs_f64(),
        total - already,
    );
    assert!(
        broker
            .outcomes()
            .iter()
            .all(|o| o.status() != "failed" && o.status() != "invalid")
    );
    assert_no_double_application(sim);
    let stats = sim.stats();
    let changes: u64 = sim::providers()
        .iter()
        .map(|p| stats.provider(p).unwrap().state_changes)
        .sum();
    assert_eq!(changes, total as u64, "every target decided exactly once");

    // Nothing left behind, nothing unacknowledged (the worker is gone, so
    // unacknowledged messages would be ready again).
    assert_eq!(broker.wait_consumer_gone().await, 0);
    assert_eq!(broker.queue_counts(&broker.topology.dead()).await.0, 0);
}

#[tokio::test]
async fn a_provider_storm_ends_applied_within_the_attempt_limit() {
    let faults = Faults {
        error_rate: 0.3,
        error_status: 503,
        rate_limit_ratio: 0.05,
        retry_after_secs: 1,
        timeout_ratio: 0.02,
        timeout_hold_ms: 5_000,
        ..Faults::default()
    };
    // Ledger v2 makes two faultable calls per attempt (challenge, decision), so
    // its attempts fail with p ~ 0.6: 30 keeps a flake below one in a million.
    let max_attempts = 30;
    let app = spawn_app(
        App::simulator("f-storm", faults)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", max_attempts)
            .env("APPROVAL_RETRY__MAX_BACKOFF_MS", 200)
            .env("APPROVAL_WORKER__HTTP_TIMEOUT_MS", 500)
            // The subject is each decision's attempts under random faults.
            // With 30 % errors, five in a row open a provider's breaker now
            // and again, and failed probes double its cool-down up to two
            // minutes: that is the breaker's own test (isolation_sim), and
            // here it made the drain's length a matter of luck.
            .env("APPROVAL_ISOLATION__BREAKER_FAILURES", 1_000_000)
            .env("APPROVAL_LOG__LEVEL", "error"),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());

    let total = 200;
    let mut ids = BTreeSet::new();
    for i in 0..total {
        let provider = sim::providers()[i % sim::providers().len()];
        let action = if i % 3 == 0 { "reject" } else { "approve" };
        let d = samples::decision(provider, action, &format!("storm-{i}"));
        ids.insert(d["decision_id"].as_str().unwrap().to_owned());
        broker.publish(&d).await;
    }
    let started = Instant::now();
    // Each 429 now pauses its whole provider for its Retry-After.
    let outcomes = settled(broker, &ids, Duration::from_secs(240)).await;
    let mut histogram = BTreeMap::<u64, usize>::new();
    for o in outcomes.values() {
        let calls = o["attempts"].as_u64().unwrap();
        assert!(calls >= 1 && calls <= max_attempts, "{o}");
        *histogram.entry(calls).or_default() += 1;
    }
    let stats = sim.stats();
    let by_status: BTreeMap<u16, u64> = sim::providers()
        .iter()
        .flat_map(|p| stats.provider(p).unwrap().by_status.clone())
        .fold(BTreeMap::new(), |mut acc, (s, n)| {
            *acc.entry(s).or_default() += n;
            acc
        });
    println!(
        "storm test: {total} decisions settled in {:.1} s; calls per decision -> decisions: {histogram:?}; provider answers by status: {by_status:?}",
        started.elapsed().as_secs_f64()
    );
    assert!(
        by_status.get(&503).copied().unwrap_or(0) > 0
            && by_status.get(&429).copied().unwrap_or(0) > 0
    );
    assert!(
        histogram.keys().any(|&calls| calls > 1),
        "the storm forced retries"
    );
    assert!(
        broker.outcomes().iter().all(|o| o.status() != "failed"),
        "nothing failed"
    );
    assert_no_double_application(sim);
    app.stop_worker().await;
}

#[tokio::test]
async fn one_provider_down_does_not_slow_the_others() {
    let app = spawn_app(
        App::simulator("f-outage", Faults::default())
            .env("APPROVAL_AMQP__PREFETCH", 20)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", 100)
            .env("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", 3)
            .env("APPROVAL_RETRY__MAX_BACKOFF_MS", 1000)
            .env("APPROVAL_LOG__LEVEL", "error")
            // About the prefetch shares alone: the breaker and adaptive
            // concurrency (tests in isolation.rs) would stop the calls
            // this test counts.
            .env("APPROVAL_ISOLATION__BREAKER_FAILURES", 1_000_000)
            .env("APPROVAL_ISOLATION__CONCURRENCY_ADAPTIVE", false),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());
    // Any provider will do: the first is down, the others healthy.
    let (down, up) = sim::providers().split_first().expect("a registry");
    sim.set_faults(
        down,
        Faults {
            down: true,
            ..Faults::default()
        },
    );

    // More decisions for it than prefetch slots wait out the outage...
    let mut waiting = BTreeSet::new();
    for i in 0..40 {
        let d = samples::decision(down, "reject", &format!("down-{i}"));
        waiting.insert(d["decision_id"].as_str().unwrap().to_owned());
        broker.publish(&d).await;
    }
    wait_for(
        "the outage to outlast the in-process budget",
        Duration::from_secs(20),
        || async {
            (sim.stats()
                .provider(down)
                .unwrap()
                .by_status
                .get(&503)
                .copied()
                .unwrap_or(0)
                >= 120)
                .then_some(())
        },
    )
    .await;
    // ...while 200 decisions for other providers flow through.
    let started = Instant::now();
    let mut others = BTreeSet::new();
    for i in 0..200 {
        let provider = up[i % up.len()];
        let d = samples::decision(provider, "approve", &format!("up-{i}"));
        others.insert(d["decision_id"].as_str().unwrap().to_owned());
        broker.publish(&d).await;
    }
    settled(broker, &others, Duration::from_secs(20)).await;
    let flow = started.elapsed();
    println!(
        "outage test: 200 decisions for healthy providers took {:.2} s while {down} was down",
        flow.as_secs_f64()
    );
    assert!(
        flow < Duration::from_secs(10),
        "healthy providers were held up: {flow:?}"
    );
    assert!(
        broker
            .outcomes()
            .iter()
            .all(|o| !waiting.contains(o.decision_id())),
        "nothing settled for the provider that is down"
    );

    sim.set_faults(down, Faults::default());
    let done = settled(broker, &waiting, Duration::from_secs(30)).await;
    assert!(
        done.values().any(|o| o["attempts"].as_u64().unwrap() > 3),
        "decisions outlasted the in-process budget and came back through retry queues"
    );
    assert_no_double_application(sim);
    app.stop_worker().await;
}
