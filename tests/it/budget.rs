//! Holding a delivery has a bound: the delivery budget covers every step,
//! and one provider's slowness keeps to its share of the prefetch window.

use std::time::{Duration, Instant};

use approval_worker::tools::sim::{Faults, samples};
use wiremock::{
    Mock,
    matchers::{method, path_regex},
};

use crate::helpers::{
    app::{App, spawn_app},
    mock,
    qonto::{self, Auth},
};

/// A call that hangs past the delivery budget used to hold the delivery
/// until the HTTP timeout (20 s here). Now the budget (3 s) moves the
/// decision to a retry queue, and its next delivery applies it.
#[tokio::test]
async fn a_hanging_call_ends_at_the_delivery_budget_and_is_retried() {
    let app = spawn_app(
        App::qonto("budget", Auth::ApiKey)
            .env("APPROVAL_WORKER__DELIVERY_BUDGET_MS", 3000)
            .env("APPROVAL_WORKER__CONFIRM_TIMEOUT_MS", 1000)
            .env("APPROVAL_WORKER__HTTP_TIMEOUT_MS", 20000),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    let decline =
        || Mock::given(method("POST")).and(path_regex("^/v2/requests/transfers/.*/decline$"));
    decline()
        .respond_with(qonto::answer("declined").set_delay(Duration::from_secs(60)))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(provider)
        .await;
    decline()
        .respond_with(qonto::answer("declined"))
        .with_priority(2)
        .mount(provider)
        .await;

    let started = Instant::now();
    broker
        .publish(&qonto::decline("slow-1", &qonto::request_id()))
        .await;
    let outcome = broker
        .wait_outcomes_within(1, Duration::from_secs(12), |o| o.decision_id() == "slow-1")
        .await
        .remove(0);
    let took = started.elapsed();
    assert_eq!(outcome.status(), "applied", "{:?}", outcome.body);
    assert_eq!(outcome.body["attempts"], 2, "{:?}", outcome.body);
    // The budget less the confirm timeout kept for publishing.
    assert!(
        took >= Duration::from_secs(2),
        "not before the budget: {took:?}"
    );
    assert_eq!(mock::posts(provider).await.len(), 2);
}

/// A black-holed provider used to take every prefetch slot (its calls hang
/// until the HTTP timeout), so other providers' decisions waited behind
/// it. Now it holds at most its share; the rest move to a retry queue after
/// a short wait, and the others' decisions go through.
#[tokio::test]
async fn a_black_holed_provider_does_not_delay_the_others() {
    let hole = Faults {
        timeout_ratio: 1.0,
        timeout_hold_ms: 60_000,
        ..Faults::default()
    };
    let app = spawn_app(
        App::simulator("isolation", Faults::default())
            .faults_for("moneypipe", hole)
            .env("APPROVAL_AMQP__PREFETCH", 8)
            .env("APPROVAL_WORKER__CALL_WAIT_MS", 200)
            .env("APPROVAL_WORKER__HTTP_TIMEOUT_MS", 30000)
            .env("APPROVAL_WORKER__DRAIN_TIMEOUT_MS", 500),
    )
    .await;
    let broker = &app.broker;
    for i in 0..16 {
        let d = samples::decision("moneypipe", "approve", &format!("hole-{i}"));
        broker.publish(&d).await;
    }
    for i in 0..3 {
        let d = samples::decision("flexpay", "approve", &format!("fine-{i}"));
        broker.publish(&d).await;
    }
    let fine = broker
        .wait_outcomes_within(3, Duration::from_secs(10), |o| {
            o.decision_id().starts_with("fine-")
        })
        .await;
    assert!(fine.iter().all(|o| o.status() == "applied"), "{fine:?}");
    app.stop_worker().await;
}
