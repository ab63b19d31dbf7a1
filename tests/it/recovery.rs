//! Recovery paths on the real broker: queued retries, exhaustion and
//! replay from the parking lot, Qonto SCA, reconciliation.

use std::{collections::BTreeSet, time::Duration};

use serde_json::json;
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{header, method, path, path_regex},
};

use approval_worker::tools::sim::{Faults, samples};

use crate::helpers::{
    app::{App, spawn_app},
    broker::Outcome,
    mock::{self, posts},
    qonto::{self, ACCESS_TOKEN},
    wait::{DEADLINE, wait_for},
};

#[tokio::test]
async fn exhaustion_counts_every_call_across_queued_retries_then_replay_applies() {
    let app = spawn_app(
        App::qonto("r-exhaust", qonto::Auth::AccessToken)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", 5)
            .env("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", 2),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(provider)
        .await;

    let d = qonto::decision("exh-1", "reject");
    broker.publish(&d).await;
    let failed = broker.outcome("exh-1", "failed").await;
    assert_eq!(failed.body["error"]["kind"], "exhausted");
    assert_eq!(failed.body["attempts"], 5);
    assert_eq!(posts(provider).await.len(), 5, "exactly MAX_ATTEMPTS calls");
    let keys: BTreeSet<_> = posts(provider)
        .await
        .iter()
        .map(|r| {
            r.headers["x-qonto-idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(keys.len(), 1, "one key across both retry levels");

    // Parked with its headers; `list` shows it without removing it.
    let dead = broker.topology.dead();
    broker.wait_ready(&dead, 1).await;
    let mut list = app.run(&["dead-letters", "list"]);
    assert_eq!(list.wait(DEADLINE).await.code(), Some(0));
    let listed = list.output();
    assert!(
        listed.contains("exh-1")
            && listed.contains("kind=exhausted")
            && listed.contains("attempts=5"),
        "{listed}"
    );
    // `list` does not remove: the message is back once its requeue lands.
    broker.wait_ready(&dead, 1).await;

    // The provider recovers; replay brings the decision to applied.
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .with_priority(1)
        .mount(provider)
        .await;
    let mut replay = app.run(&["dead-letters", "replay", "--kind", "exhausted"]);
    assert_eq!(
        replay.wait(DEADLINE).await.code(),
        Some(0),
        "{}",
        replay.output()
    );
    assert!(
        replay.output().contains("1 decision(s) replayed"),
        "{}",
        replay.output()
    );
    let applied = broker.outcome("exh-1", "applied").await;
    assert_eq!(applied.body["attempts"], 1, "fresh attempt counter");
    broker.wait_ready(&dead, 0).await;
    app.stop_worker().await;
}

#[tokio::test]
async fn replay_filters_by_provider_and_kind_and_leaves_the_rest() {
    let app = spawn_app(App::without_providers("r-filter")).await;
    let broker = &app.broker;
    broker.publish(&qonto::decision("f-1", "reject")).await;
    broker.publish_raw("x.y", b"garbage").await;
    broker.wait_outcomes(2, |o| o.status() == "invalid").await;
    app.stop_worker().await;
    let dead = broker.topology.dead();
    broker.wait_ready(&dead, 2).await;

    let mut replay = app.run(&[
        "dead-letters",
        "replay",
        "--provider",
        "qonto",
        "--kind",
        "provider_disabled",
        "--limit",
        "5",
    ]);
    assert_eq!(replay.wait(DEADLINE).await.code(), Some(0));
    assert!(
        replay.output().contains("1 decision(s) replayed"),
        "{}",
        replay.output()
    );
    // The garbage message stays parked; the replayed one waits in decisions.
    broker.wait_ready(&dead, 1).await;
    broker.wait_ready(&broker.topology.decisions(), 1).await;
}

#[tokio::test]
async fn a_long_outage_moves_decisions_to_retry_queues_and_they_complete_later() {
    let app = spawn_app(
        App::qonto("r-outage", qonto::Auth::AccessToken)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", 50)
            .env("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", 1)
            .env("APPROVAL_RETRY__MAX_BACKOFF_MS", 1000)
            .env("APPROVAL_AMQP__PREFETCH", 5)
            // About the retry queues and the prefetch window alone: an open
            // breaker (tests in isolation.rs) would hold every Qonto call,
            // the fresh target's too.
            .env("APPROVAL_ISOLATION__BREAKER_FAILURES", 1_000_000)
            .env("APPROVAL_ISOLATION__CONCURRENCY_ADAPTIVE", false),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(provider)
        .await;

    // More waiting decisions than prefetch slots: they must not hold them.
    for i in 0..10 {
        broker
            .publish(&qonto::decision(&format!("out-{i}"), "reject"))
            .await;
    }
    wait_for("every decision to have been tried", DEADLINE, || async {
        let ids: BTreeSet<_> = posts(provider)
            .await
            .iter()
            .map(|r| r.url.path().to_owned())
            .collect();
        (ids.len() == 10).then_some(())
    })
    .await;
    // A decision published during the outage for a different target is taken
    // at once. (Mocks are layered by priority, never reset: a reset leaves a
    // moment with no mock, whose 404 would be a permanent refusal.)
    let rid = uuid::Uuid::new_v4().to_string();
    Mock::given(method("POST"))
        .and(path(format!("/v2/requests/transfers/{rid}/decline")))
        .respond_with(qonto::answer("declined"))
        .with_priority(1)
        .mount(provider)
        .await;
    broker.publish(&qonto::decline("fresh", &rid)).await;
    broker
        .wait_outcomes_within(1, Duration::from_secs(5), |o| {
            o.decision_id() == "fresh" && o.status() == "applied"
        })
        .await;

    // The provider comes back; the waiting decisions complete.
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .with_priority(2)
        .mount(provider)
        .await;
    let done = broker
        .wait_outcomes(10, |o| {
            o.decision_id().starts_with("out-") && o.status() == "applied"
        })
        .await;
    assert!(
        done.iter()
            .all(|o| o.body["attempts"].as_u64().unwrap() >= 2)
    );
    app.stop_worker().await;
}

#[tokio::test]
async fn qonto_sca_allow_replays_with_the_session_token() {
    let app = spawn_app(App::qonto("r-sca", qonto::Auth::AccessToken)).await;
    let (broker, provider) = (&app.broker, app.qonto());
    let token = "sca-session-123";
    Mock::given(method("POST"))
        .and(path_regex("/approve$"))
        .and(header("x-qonto-sca-session-token", token))
        .respond_with(qonto::answer("approved"))
        .mount(provider)
        .await;
    Mock::given(method("POST"))
        .and(path_regex("/approve$"))
        .respond_with(ResponseTemplate::new(428).set_body_json(json!({
            "errors": [{"code": "sca_required", "detail": "SCA required"}],
            "sca_session_token": token,
            "sca_session_expires_at": "2099-01-01T00:00:00Z",
        })))
        .mount(provider)
        .await;
    // Waiting twice, then allowed.
    Mock::given(method("GET"))
        .and(path(format!("/v2/sca_sessions/{token}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "waiting"})))
        .up_to_n_times(2)
        .mount(provider)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v2/sca_sessions/{token}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "allow"})))
        .mount(provider)
        .await;

    broker.publish(&qonto::decision("sca-1", "approve")).await;
    let waiting = broker.outcome("sca-1", "awaiting_confirmation").await;
    assert_eq!(
        waiting.body["confirmation"]["expires_at"],
        "2099-01-01T00:00:00Z"
    );
    assert_eq!(waiting.routing_key, "qonto.awaiting_confirmation");
    let applied = broker.outcome("sca-1", "applied").await;
    assert_eq!(applied.body["attempts"], 2);

    let reqs = mock::requests(provider).await;
    let approves: Vec<_> = reqs
        .iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect();
    assert_eq!(approves.len(), 2);
    assert_eq!(
        approves[0].headers["x-qonto-idempotency-key"],
        approves[1].headers["x-qonto-idempotency-key"]
    );
    assert_eq!(approves[0].body, approves[1].body, "identical replay");
    assert!(
        approves[0]
            .headers
            .get("x-qonto-sca-session-token")
            .is_none()
    );
    assert_eq!(approves[1].headers["x-qonto-sca-session-token"], token);
    let polls: Vec<_> = reqs.iter().filter(|r| r.method.as_str() == "GET").collect();
    assert_eq!(polls.len(), 3, "polled until allowed, no more");
    assert_eq!(broker.queue_counts(&broker.topology.dead()).await.0, 0);
    app.stop_worker().await;
}

#[tokio::test]
async fn qonto_sca_deny_fails_the_decision() {
    let app = spawn_app(App::qonto("r-sca-deny", qonto::Auth::AccessToken)).await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(428).set_body_json(json!({
            "sca_session_token": "tok-deny",
        })))
        .mount(provider)
        .await;
    Mock::given(method("GET"))
        .and(path("/v2/sca_sessions/tok-deny"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "deny"})))
        .mount(provider)
        .await;
    broker.publish(&qonto::decision("sca-2", "approve")).await;
    broker.outcome("sca-2", "awaiting_confirmation").await;
    let failed = broker.outcome("sca-2", "failed").await;
    assert_eq!(failed.body["error"]["kind"], "confirmation_denied");
    assert_eq!(
        posts(provider).await.len(),
        1,
        "never replayed after a deny"
    );
    let parked = broker.wait_parked(1).await;
    assert_eq!(
        parked[0].headers["x-approval-error-kind"],
        "confirmation_denied"
    );
    app.stop_worker().await;
}

#[tokio::test]
async fn an_unexpected_422_is_reconciled_into_already_applied() {
    let app = spawn_app(App::qonto("r-recon", qonto::Auth::AccessToken)).await;
    let (broker, provider) = (&app.broker, app.qonto());
    let d = qonto::decision("rec-1", "reject");
    let rid = d["target"]["request_id"].as_str().unwrap().to_owned();
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "errors": [{"code": "request_not_pending", "detail": "Request is not pending"}]
        })))
        .mount(provider)
        .await;
    Mock::given(method("GET"))
        .and(path("/v2/requests"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "requests": [
                {"id": uuid::Uuid::new_v4().to_string(), "request_type": "transfer", "status": "pending"},
                {"id": rid, "request_type": "transfer", "status": "declined"},
            ],
            "meta": {"current_page": 1, "next_page": null},
        })))
        .mount(provider)
        .await;
    broker.publish(&d).await;
    let o = broker.outcome("rec-1", "already_applied").await;
    assert_eq!(o.body["resolution"], "reconciled");
    assert_eq!(o.body["provider_state"], "declined");
    let read = mock::with_method(provider, "GET").await.remove(0);
    let query = read.url.query().unwrap_or_default();
    assert!(query.contains("request_type%5B%5D=transfer"), "{query}");
    assert_eq!(
        read.headers["authorization"],
        format!("Bearer {ACCESS_TOKEN}")
    );
    app.stop_worker().await;
}

/// The delivery-limit guard used to park without a look at the target: a
/// decision applied before a crash that kept recurring was reported failed
/// (poison). The target is read first now, and the decided state reported.
#[tokio::test]
async fn a_poison_decision_whose_target_shows_the_decided_state_is_already_applied() {
    let app = spawn_app(App::simulator("r-poison-read", Faults::default())).await;
    let broker = &app.broker;
    let d = samples::decision("ledger_v1", "reject", "poison-read-1");
    broker.publish(&d).await;
    broker.outcome("poison-read-1", "applied").await;
    app.stop_worker().await;

    // Delivered 19 times without an ack (limit 20), as the broker counts.
    broker.publish(&d).await;
    broker.redeliver(19).await;
    app.start_worker().await;
    let o = broker.outcome("poison-read-1", "already_applied").await;
    assert_eq!(o.body["resolution"], "reconciled", "{:?}", o.body);
    assert_eq!(o.body["attempts"], 0, "no call for the poison copy");
    let dead = broker.topology.dead();
    assert_eq!(broker.queue_counts(&dead).await.0, 0, "nothing parked");
    app.stop_worker().await;
}

#[tokio::test]
async fn a_decision_past_the_delivery_limit_is_parked_as_poison() {
    let app = spawn_app(App::qonto("r-poison", qonto::Auth::AccessToken).without_worker()).await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;

    // Delivered 19 times without an ack (limit 20), as the broker counts;
    // a count a publisher writes into the header is not believed.
    let d = qonto::decision("poison-1", "reject");
    broker.publish(&d).await;
    broker.redeliver(19).await;
    app.start_worker().await;
    let o = broker.outcome("poison-1", "failed").await;
    assert_eq!(o.body["error"]["kind"], "poison");
    let parked = broker.wait_parked(1).await;
    assert_eq!(parked[0].headers["x-approval-error-kind"], "poison");
    // The parking lot counts its own deliveries; the 19 did not travel along.
    assert_ne!(
        parked[0]
            .headers
            .get("x-delivery-count")
            .map(String::as_str),
        Some("19")
    );
    assert!(
        posts(provider).await.is_empty(),
        "a poison message is not applied"
    );
    app.stop_worker().await;
}

#[tokio::test]
async fn two_decisions_for_one_target_never_run_at_once() {
    let app = spawn_app(App::qonto("r-order", qonto::Auth::AccessToken)).await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined").set_delay(Duration::from_millis(300)))
        .mount(provider)
        .await;

    let first = qonto::decision("order-1", "reject");
    let mut second = qonto::decision("order-2", "reject");
    second["target"] = first["target"].clone();
    broker.publish(&first).await;
    broker.publish(&second).await;
    let a = broker.outcome("order-1", "applied").await;
    let b = broker.outcome("order-2", "applied").await;
    let calls = posts(provider).await;
    assert_eq!(calls.len(), 2);
    // With a 300 ms provider, overlapping calls would finish within ~300 ms of each other.
    let done = |o: &Outcome| {
        time::OffsetDateTime::parse(
            o.body["completed_at"].as_str().unwrap(),
            &time::format_description::well_known::Rfc3339,
        )
        .unwrap()
    };
    let gap = (done(&b) - done(&a)).abs();
    assert!(
        gap >= time::Duration::milliseconds(290),
        "the second waited for the first: {gap}"
    );
    app.stop_worker().await;
}
