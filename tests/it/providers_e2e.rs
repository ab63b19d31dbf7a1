//! Every provider end to end: the real broker, the worker, and the
//! project's provider simulator.

use approval_worker::tools::sim::{self, Faults, samples};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    wait::{DEADLINE, wait_for},
};

#[tokio::test]
async fn one_approve_and_one_reject_per_provider_give_ten_applied_events() {
    let app = ten_decisions("e2e-five", false).await;
    assert_eq!(app.sim().stats().total().http2_calls, 0);
}

/// The same over h2c, as the bench runs it: every call, token calls
/// included, multiplexed on HTTP/2.
#[tokio::test]
async fn the_same_ten_decisions_over_http2_prior_knowledge() {
    let app = ten_decisions("e2e-five-h2", true).await;
    let total = app.sim().stats().total();
    assert!(total.calls >= 14, "{total:?}");
    assert_eq!(total.http2_calls, total.calls);
}

async fn ten_decisions(name: &str, http2: bool) -> TestApp {
    let app = spawn_app(
        App::simulator(name, Faults::default())
            .env("APPROVAL_WORKER__HTTP2_PRIOR_KNOWLEDGE", http2),
    )
    .await;
    let (broker, sim) = (&app.broker, app.sim());

    let mut decisions = Vec::new();
    for provider in sim::providers() {
        for action in ["approve", "reject"] {
            let d = samples::decision(provider, action, &format!("e2e-{provider}-{action}"));
            broker.publish(&d).await;
            decisions.push(d);
        }
    }
    let applied = broker.wait_outcomes(10, |o| o.status() == "applied").await;
    assert_eq!(applied.len(), 10, "{:#?}", broker.outcomes());
    for d in &decisions {
        let id = d["decision_id"].as_str().unwrap();
        let provider = d["provider"].as_str().unwrap();
        let o = applied
            .iter()
            .find(|o| o.decision_id() == id)
            .expect("an applied event per decision");
        assert_eq!(o.body["attempts"], 1, "{id}");
        assert_eq!(o.routing_key, format!("{provider}.applied"));
        let state = sim
            .target_state(provider, &samples::target_key(d))
            .expect("the sim saw the target");
        let expected = samples::decided_state(provider, d["action"].as_str().unwrap())
            .expect("a registered provider");
        assert_eq!(state, expected, "{id}");
        assert_eq!(o.body["provider_state"], expected, "{id}");
    }
    let stats = sim.stats();
    for p in sim::providers() {
        let s = stats.provider(p).unwrap();
        assert_eq!(s.state_changes, 2, "{p}");
        assert_eq!(s.double_state_changes, 0, "{p}");
        assert_eq!(s.conflicting_keys, 0, "{p}");
    }
    for p in sim::providers() {
        // One token, shared by both decisions, where the provider issues any.
        let tokens = u64::from(samples::issues_tokens(p));
        assert_eq!(stats.provider(p).unwrap().token_issued, tokens, "{p}");
    }
    app.stop_worker().await;
    app
}

/// FlexPay without its single read (UNCONFIRMED upstream): an approve meets
/// a transaction someone else accepted meanwhile, so the accept call is
/// refused as not pending and the transaction is no longer in the pending
/// list. Absence proves nothing (an accepted transaction leaves the list
/// too): the worker must keep reconciling within the horizon, never report
/// `failed` (it used to, at once) nor call the provider again.
#[tokio::test]
async fn flexpay_without_its_single_read_keeps_reconciling_an_absent_target() {
    // The fake serves no GET there (405), as FlexPay may not.
    let app = spawn_app(App::simulator("e2e-fx-absent", Faults::default()).env(
        "APPROVAL_PROVIDERS__FLEXPAY__READ_PATH",
        "/v1/transactions/{reference}/details",
    ))
    .await;
    let (broker, sim) = (&app.broker, app.sim());

    let d = samples::decision("flexpay", "approve", "e2e-fx-absent-1");
    let reference = samples::target_key(&d);
    // Someone else accepts the transaction first.
    let http = reqwest::Client::new();
    let base = sim.base_url("flexpay");
    let token: serde_json::Value = http
        .post(format!("{base}/v1/auth/token"))
        .json(&serde_json::json!({
            "client_id": "sim-flexpay-client",
            "client_secret": "sim-flexpay-secret",
        }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let bearer = token["data"]["accessToken"].as_str().unwrap();
    let accepted = http
        .post(format!("{base}/v1/transactions/{reference}/accept"))
        .bearer_auth(bearer)
        .header("Idempotency-Key", "someone-else")
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), 200);

    broker.publish(&d).await;
    // Each reconciliation meets the missing single read once: three of them
    // mean the decision was read, retried later, and read again.
    wait_for("three reconciliation reads", DEADLINE, || async {
        let stats = sim.stats();
        let reads = stats.provider("flexpay")?.by_status.get(&405).copied()?;
        (reads >= 3).then_some(())
    })
    .await;
    assert!(
        broker
            .outcomes()
            .iter()
            .all(|o| o.decision_id() != "e2e-fx-absent-1"),
        "{:#?}",
        broker.outcomes()
    );
    let stats = sim.stats();
    let flexpay = stats.provider("flexpay").unwrap();
    // Ours and the worker's single accept: never called again on absence.
    assert_eq!(flexpay.state_changing_calls, 2, "{flexpay:?}");
    assert_eq!(flexpay.state_changes, 1, "{flexpay:?}");
    assert_eq!(
        sim.target_state("flexpay", &reference).as_deref(),
        Some("COMPLETED")
    );
    app.stop_worker().await;
}
