//! Outages, driven through every unit by the worker's own clients: a reset
//! connection, a quick 503, a black hole; each for good or for a while,
//! and none applies anything.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::tools::sim::testkit::{apply, client, clients, new_id, parts, sample, sim};
use crate::tools::sim::{Outage, OutageMode, SimHandle, providers, samples};

/// Polls `check` until it holds, failing after `within`.
async fn eventually(within: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !check() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn stats(sim: &SimHandle, name: &str) -> crate::tools::sim::ProviderStats {
    sim.stats().provider(name).unwrap().clone()
}

#[tokio::test]
async fn down_resets_the_connection_and_applies_nothing() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    for &name in providers() {
        sim.set_outage(name, Some(Outage::new(OutageMode::Down)));
        let (decision, target) = sample(name, "reject");
        let err = apply(&clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, None, "{name}: {err:?}");
        assert_eq!(sim.target_state(name, &target), None, "{name}");
        let seen = stats(&sim, name);
        assert_eq!(
            (
                seen.outage_calls,
                seen.dropped_connections,
                seen.state_changes
            ),
            (1, 1, 0),
            "{name}"
        );
        sim.set_outage(name, None);
        assert!(apply(&clients, &decision, "k").await.is_ok(), "{name}");
        assert_eq!(stats(&sim, name).outage_calls, 1, "{name}");
    }
}

#[tokio::test]
async fn unavailable_answers_503_at_once() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    for &name in providers() {
        sim.set_outage(name, Some(Outage::new(OutageMode::Unavailable)));
        let (decision, target) = sample(name, "reject");
        let err = apply(&clients, &decision, "k").await.unwrap_err();
        assert_eq!(err.http_status, Some(503), "{name}: {err:?}");
        assert_eq!(sim.target_state(name, &target), None, "{name}");
        let seen = stats(&sim, name);
        assert_eq!((seen.outage_calls, seen.by_status.get(&503)), (1, Some(&1)));
    }
}

/// The client times out on its own; the held call is released (its
/// connection reset, nothing applied) once the outage is cleared.
#[tokio::test]
async fn blackhole_never_answers_until_the_client_gives_up() {
    let sim = sim().await;
    let impatient = clients(&sim, &[("APPROVAL_WORKER__HTTP_TIMEOUT_MS", "300")]);
    for &name in providers() {
        sim.set_outage(name, Some(Outage::new(OutageMode::Blackhole)));
        let (decision, target) = sample(name, "reject");
        let started = Instant::now();
        let err = apply(&impatient, &decision, "k").await.unwrap_err();
        assert!(err.message.ends_with("timed out"), "{name}: {err:?}");
        assert!(started.elapsed() >= Duration::from_millis(300), "{name}");
        assert_eq!(stats(&sim, name).outage_calls, 1, "{name}");
        sim.set_outage(name, None);
        eventually(Duration::from_secs(5), name, || {
            stats(&sim, name).dropped_connections == 1
        })
        .await;
        assert_eq!(sim.target_state(name, &target), None, "{name}");
        assert!(apply(&impatient, &decision, "k").await.is_ok(), "{name}");
    }
}

/// An outage set for a while ends by itself; calls during it are counted.
#[tokio::test]
async fn an_outage_for_a_duration_ends_by_itself() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let name = providers()[0];
    let lasting = Duration::from_millis(400);
    let started = Instant::now();
    sim.set_outage(
        name,
        Some(Outage::new(OutageMode::Unavailable).lasting(lasting)),
    );
    let (decision, target) = sample(name, "reject");
    let mut refused = 0;
    let deadline = started + Duration::from_secs(10);
    loop {
        match apply(&clients, &decision, "k").await {
            Ok(_) => break,
            Err(err) => {
                assert_eq!(err.http_status, Some(503), "{err:?}");
                refused += 1;
                assert!(Instant::now() < deadline, "the outage never ended");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    assert!(started.elapsed() >= lasting);
    assert!(sim.outage(name).is_none());
    assert!(sim.target_state(name, &target).is_some());
    assert_eq!(stats(&sim, name).outage_calls, refused);
}

/// Token exchanges stay up unless the outage includes them.
#[tokio::test]
async fn auth_is_out_only_when_asked() {
    let sim = sim().await;
    for &name in providers().iter().filter(|p| samples::issues_tokens(p)) {
        let tokens = |sim: &SimHandle| stats(sim, name).token_issued;
        let before = tokens(&sim);
        sim.set_outage(name, Some(Outage::new(OutageMode::Unavailable)));
        let err = apply(&clients(&sim, &[]), &sample(name, "reject").0, &new_id())
            .await
            .unwrap_err();
        assert_eq!(err.http_status, Some(503), "{name}: {err:?}");
        assert!(tokens(&sim) > before, "{name}: the token endpoint answered");

        let before = tokens(&sim);
        sim.set_outage(name, Some(Outage::new(OutageMode::Unavailable).with_auth()));
        let err = apply(&clients(&sim, &[]), &sample(name, "reject").0, &new_id())
            .await
            .unwrap_err();
        assert_eq!(err.http_status, Some(503), "{name}: {err:?}");
        assert_eq!(tokens(&sim), before, "{name}: the token endpoint is out");
        sim.set_outage(name, None);
    }
}

#[tokio::test]
async fn outage_control_endpoint_sets_reads_and_clears() {
    let sim = sim().await;
    let clients = clients(&sim, &[]);
    let name = providers()[0];
    let url = format!("{}/_sim/outage/{name}", sim.root_url());
    let (status, body) = parts(client().get(&url).send().await.unwrap()).await;
    assert_eq!((status, body), (200, json!(null)));

    let response = client()
        .put(&url)
        .json(&json!({"mode": "503", "for_ms": 60_000}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let (_, body) = parts(client().get(&url).send().await.unwrap()).await;
    assert_eq!(body["mode"], "503");
    assert_eq!(body["include_auth"], false);
    let remaining = body["remaining_ms"].as_u64().unwrap();
    assert!((50_000..=60_000).contains(&remaining), "{body}");
    let err = apply(&clients, &sample(name, "reject").0, "k")
        .await
        .unwrap_err();
    assert_eq!(err.http_status, Some(503));

    let response = client()
        .put(&url)
        .json(&json!({"mode": "down"}))
        .send()
        .await
        .unwrap();
    let (_, body) = parts(response).await;
    assert_eq!(
        body,
        json!({"mode": "down", "remaining_ms": null, "include_auth": false, "hold_ms": 120_000})
    );
    for bad in [
        json!({"mode": "sideways"}),
        json!({}),
        json!({"mode": "down", "for_ms": -1}),
        json!({"mode": "down", "for_ms": 999_999_999_999u64}),
        json!({"mode": "down", "forever": true}),
    ] {
        let response = client().put(&url).json(&bad).send().await.unwrap();
        assert_eq!(response.status(), 400, "{bad}");
    }
    let response = client().delete(&url).send().await.unwrap();
    assert_eq!(response.status(), 204);
    assert!(sim.outage(name).is_none());
    assert!(
        apply(&clients, &sample(name, "reject").0, "k2")
            .await
            .is_ok()
    );
}
