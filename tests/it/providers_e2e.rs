//! Every provider end to end: the real broker, the worker, and the
//! project's provider simulator.

use approval_worker::tools::sim::{self, Faults, samples};

use crate::helpers::app::{App, TestApp, spawn_app};

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
