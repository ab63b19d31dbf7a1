//! The fault layer, driven through every unit of the registry by the
//! worker's own clients: what a fault does must not depend on the provider.
//! How each fake words a fault (its error shape, its rate-limit status) is
//! checked in that provider's `tests.rs`.

use std::time::{Duration, Instant};

use crate::providers::{Registry, Reply};
use crate::retry::CallError;
use crate::tools::sim::testkit::{apply, clients, new_id, read_state, sample, sim, sim_with};
use crate::tools::sim::{Faults, SimConfig, SimHandle, providers};

/// Gives `unit` these faults, then one decision on a new target by the
/// worker's client, which must fail: the error and the target's key.
async fn refused(
    sim: &SimHandle,
    clients: &Registry,
    unit: &str,
    faults: Faults,
) -> (CallError, String) {
    sim.set_faults(unit, faults);
    let (decision, target) = sample(unit, "reject");
    let err = apply(clients, &decision, "k").await.unwrap_err();
    (err, target)
}

#[tokio::test]
async fn error_rate_one_answers_before_any_state_change() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    for &unit in providers() {
        let (decision, target) = sample(unit, "reject");
        let failing = |error_status| Faults {
            error_rate: 1.0,
            error_status,
            ..Faults::default()
        };
        sim.set_faults(unit, failing(503));
        let err = apply(&clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, Some(503), "{unit}: {err:?}");
        assert_eq!(sim.target_state(unit, &target), None, "{unit}");

        sim.set_faults(unit, failing(500));
        let err = apply(&clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, Some(500), "{unit}: {err:?}");

        sim.set_faults(unit, Faults::default());
        let reply = apply(&clients, &decision, "k").await;
        assert!(matches!(reply, Ok(Reply::Done { .. })), "{unit}: {reply:?}");
        assert!(sim.target_state(unit, &target).is_some(), "{unit}");
        let stats = sim.stats().provider(unit).unwrap().clone();
        assert_eq!(stats.state_changes, 1, "{unit}");
        assert_eq!(stats.by_status.get(&503), Some(&1), "{unit}");
        assert_eq!(stats.by_status.get(&500), Some(&1), "{unit}");
    }
}

#[tokio::test]
async fn down_fails_reads_and_decisions_but_not_auth_unless_asked() {
    let down = Faults {
        down: true,
        ..Faults::default()
    };
    let mut config = SimConfig::default();
    for &unit in providers() {
        config.faults.insert(unit.to_owned(), down);
    }
    let sim = sim_with(config).await;
    let tokens = |unit| sim.stats().provider(unit).unwrap().token_issued;

    for &unit in providers() {
        // Fresh clients hold no token, so each phase shows whether the
        // token endpoint answered.
        let (decision, target) = sample(unit, "approve");
        sim.set_faults(unit, Faults::default());
        let before = tokens(unit);
        apply(&clients(&sim, &[]), &sample(unit, "approve").0, &new_id())
            .await
            .unwrap();
        let per_client = tokens(unit) - before;

        sim.set_faults(unit, down);
        let down_clients = clients(&sim, &[]);
        let before = tokens(unit);
        let err = apply(&down_clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, Some(503), "{unit}: {err:?}");
        assert_eq!(
            tokens(unit) - before,
            per_client,
            "{unit}: auth still answers"
        );
        let err = read_state(&down_clients, &decision).await.unwrap_err();
        assert_eq!(err.http_status, Some(503), "{unit}: {err:?}");
        assert_eq!(sim.target_state(unit, &target), None, "{unit}");

        sim.set_faults(
            unit,
            Faults {
                include_auth: true,
                ..down
            },
        );
        let before = tokens(unit);
        let err = apply(&clients(&sim, &[]), &decision, "k")
            .await
            .unwrap_err();
        assert_eq!(err.http_status, Some(503), "{unit}: {err:?}");
        assert_eq!(tokens(unit), before, "{unit}: auth is down too");
    }
}

#[tokio::test]
async fn latency_is_added_to_each_call() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let unit = providers()[0];
    sim.set_faults(
        unit,
        Faults {
            latency_ms: 150,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    apply(&clients, &sample(unit, "reject").0, "k-latency")
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));

    sim.set_faults(
        unit,
        Faults {
            tail_latency_ms: 150,
            tail_ratio: 1.0,
            ..Faults::default()
        },
    );
    let started = Instant::now();
    apply(&clients, &sample(unit, "reject").0, "k-tail")
        .await
        .unwrap();
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[tokio::test]
async fn rate_limits_answer_the_units_status_with_retry_after() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let limited = Faults {
        rate_limit_ratio: 1.0,
        retry_after_secs: 7,
        ..Faults::default()
    };
    for &unit in providers() {
        let (err, target) = refused(&sim, &clients, unit, limited).await;
        assert!(
            matches!(err.http_status, Some(429 | 420)),
            "{unit}: {err:?}"
        );
        assert_eq!(err.retry_after, Some(Duration::from_secs(7)), "{unit}");
        assert_eq!(sim.target_state(unit, &target), None, "{unit}");
    }
}

#[tokio::test]
async fn reset_drops_the_connection_without_an_answer() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let reset = Faults {
        reset_ratio: 1.0,
        ..Faults::default()
    };
    for &unit in providers() {
        let (err, target) = refused(&sim, &clients, unit, reset).await;
        assert_eq!(err.http_status, None, "{unit}: {err:?}");
        assert_eq!(sim.target_state(unit, &target), None, "{unit}");
        let stats = sim.stats().provider(unit).unwrap().clone();
        assert_eq!(
            (stats.dropped_connections, stats.state_changes),
            (1, 0),
            "{unit}"
        );
        // Only token exchanges, which are not faulted, got an answer.
        assert!(stats.by_status.keys().all(|s| *s == 200), "{unit}");
        assert!(
            stats.by_status.values().sum::<u64>() == stats.token_issued,
            "{unit}"
        );
    }
}

#[tokio::test]
async fn timeout_holds_the_call_without_answering() {
    let sim = sim().await;
    let unit = providers()[0];
    sim.set_faults(
        unit,
        Faults {
            timeout_ratio: 1.0,
            ..Faults::default()
        },
    );
    let impatient = clients(&sim, &[("APPROVAL_WORKER__HTTP_TIMEOUT_MS", "200")]);
    let err = apply(&impatient, &sample(unit, "reject").0, "k")
        .await
        .unwrap_err();
    assert!(err.message.ends_with("timed out"), "{err:?}");

    // With a short hold the connection is dropped once the hold ends.
    let short_hold = Faults {
        timeout_ratio: 1.0,
        timeout_hold_ms: 50,
        ..Faults::default()
    };
    let (err, _) = refused(&sim, &clients(&sim, &[]), unit, short_hold).await;
    assert!(
        err.http_status.is_none() && !err.message.ends_with("timed out"),
        "{err:?}"
    );
}

#[tokio::test]
async fn apply_then_fail_changes_state_then_fails() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let apply_then_fail = Faults {
        apply_then_fail_ratio: 1.0,
        ..Faults::default()
    };
    for &unit in providers() {
        let (err, target) = refused(&sim, &clients, unit, apply_then_fail).await;
        assert!(
            matches!(err.http_status, None | Some(503)),
            "{unit}: {err:?}"
        );
        assert!(sim.target_state(unit, &target).is_some(), "{unit}");
        let stats = sim.stats().provider(unit).unwrap().clone();
        assert_eq!(
            (stats.state_changes, stats.double_state_changes),
            (1, 0),
            "{unit}"
        );
    }
}
