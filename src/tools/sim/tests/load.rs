//! Latency that grows with load: each call waits `latency_ms` plus
//! `latency_per_in_flight_ms` for every other call in flight when it
//! arrives.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::tools::sim::Faults;
use crate::tools::sim::testkit::{apply, client, clients, sample, sim};

use super::quota::one_call_unit;

#[test]
fn the_latency_law() {
    let faults = Faults {
        latency_ms: 20,
        latency_per_in_flight_ms: 2.5,
        tail_latency_ms: 100,
        ..Faults::default()
    };
    assert_eq!(faults.delay(0, false), Duration::from_millis(20));
    assert_eq!(faults.delay(4, false), Duration::from_millis(30));
    assert_eq!(faults.delay(1, false), Duration::from_micros(22_500));
    assert_eq!(faults.delay(4, true), Duration::from_millis(130));
    assert_eq!(Faults::default().delay(1000, false), Duration::ZERO);
}

/// Four calls at once: the first to arrive waits the base latency, each
/// later one a step more; once they are done nothing is in flight.
#[tokio::test]
async fn concurrent_calls_slow_each_other_down() {
    let sim = sim().await;
    let name = one_call_unit();
    let clients = clients(&sim, &[]);
    sim.set_faults(
        name,
        Faults {
            latency_ms: 600,
            latency_per_in_flight_ms: 200.0,
            ..Faults::default()
        },
    );
    let timed = |key: &'static str| {
        let clients = &clients;
        async move {
            let started = Instant::now();
            apply(clients, &sample(name, "reject").0, key)
                .await
                .unwrap();
            started.elapsed()
        }
    };
    let (a, b, c, d) = tokio::join!(timed("a"), timed("b"), timed("c"), timed("d"));
    let mut took = [a, b, c, d];
    took.sort();
    for (i, took) in took.iter().enumerate() {
        let law = Duration::from_millis(600 + 200 * i as u64);
        assert!(*took >= law, "call {i} took {took:?}, the law says {law:?}");
    }
    let stats = sim.stats().provider(name).unwrap().clone();
    assert_eq!((stats.max_in_flight, stats.in_flight), (4, 0));

    // Switched off at runtime: a lone call is quick again.
    sim.set_faults(name, Faults::default());
    let started = Instant::now();
    apply(&clients, &sample(name, "reject").0, "e")
        .await
        .unwrap();
    assert!(started.elapsed() < Duration::from_millis(600));
}

#[tokio::test]
async fn the_law_is_set_and_checked_over_http() {
    let sim = sim().await;
    let url = format!("{}/_sim/faults/{}", sim.root_url(), one_call_unit());
    let response = client()
        .put(&url)
        .json(&json!({"latency_ms": 5, "latency_per_in_flight_ms": 1.5}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    for bad in [-1.0, 60_001.0] {
        let response = client()
            .put(&url)
            .json(&json!({"latency_per_in_flight_ms": bad}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    let current: Faults = client()
        .get(&url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(current.latency_per_in_flight_ms, 1.5);
}
