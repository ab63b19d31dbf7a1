//! Recovery paths on the real broker: queued retries, exhaustion and
//! replay from the parking lot, Qonto SCA, reconciliation.

mod common;

use std::time::Duration;

use common::{InProcessWorker, ProcessWorker, TestBroker};
use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{header, method, path, path_regex},
};

fn qonto_env(broker: &TestBroker, qonto: &MockServer) -> Vec<(String, String)> {
    let mut env = broker.worker_env();
    env.extend([
        ("APPROVAL_PROVIDERS__QONTO__BASE_URL".into(), qonto.uri()),
        (
            "APPROVAL_PROVIDERS__QONTO__ACCESS_TOKEN".into(),
            "oauth-token".into(),
        ),
    ]);
    env
}

fn qonto_decision(id: &str, action: &str) -> Value {
    json!({
        "decision_id": id, "provider": "qonto", "action": action, "reason": "policy",
        "target": {"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()},
    })
}

fn ok(status: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({"request_transfer": {"status": status}}))
}

async fn posts(server: &MockServer) -> Vec<wiremock::Request> {
    server
        .received_requests()
        .await
        .unwrap_or_default()
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
        .collect()
}

#[tokio::test]
async fn exhaustion_counts_every_call_across_queued_retries_then_replay_applies() {
    let broker = TestBroker::new("r-exhaust").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&qonto)
        .await;
    let mut env = qonto_env(&broker, &qonto);
    env.push(("APPROVAL_RETRY__MAX_ATTEMPTS".into(), "5".into()));
    env.push(("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS".into(), "2".into()));
    let worker = InProcessWorker::start(env.clone()).await;
    broker.wait_consumer().await;

    let d = qonto_decision("exh-1", "reject");
    broker.publish(&d).await;
    let failed = broker.outcome("exh-1", "failed").await;
    assert_eq!(failed.body["error"]["kind"], "exhausted");
    assert_eq!(failed.body["attempts"], 5);
    assert_eq!(posts(&qonto).await.len(), 5, "exactly MAX_ATTEMPTS calls");
    let keys: std::collections::BTreeSet<_> = posts(&qonto)
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
    common::wait_for("the parked message", common::DEADLINE, || {
        let dead = dead.clone();
        let broker = &broker;
        async move { (broker.queue_counts(&dead).await.0 == 1).then_some(()) }
    })
    .await;
    let mut list = ProcessWorker::spawn(&["dead-letters", "list"], &env);
    assert_eq!(list.wait(common::DEADLINE).await.code(), Some(0));
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
        .respond_with(ok("declined"))
        .with_priority(1)
        .mount(&qonto)
        .await;
    let mut replay = ProcessWorker::spawn(&["dead-letters", "replay", "--kind", "exhausted"], &env);
    assert_eq!(
        replay.wait(common::DEADLINE).await.code(),
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
    worker.stop().await;
}

#[tokio::test]
async fn replay_filters_by_provider_and_kind_and_leaves_the_rest() {
    let broker = TestBroker::new("r-filter").await;
    let env = broker.worker_env();
    let worker = InProcessWorker::start(env.clone()).await; // no provider configured: all disabled
    broker.wait_consumer().await;
    broker.publish(&qonto_decision("f-1", "reject")).await;
    broker.publish_raw("x.y", b"garbage").await;
    broker.wait_outcomes(2, |o| o.status() == "invalid").await;
    worker.stop().await;
    let dead = broker.topology.dead();
    common::wait_for("two parked", common::DEADLINE, || {
        let dead = dead.clone();
        let broker = &broker;
        async move { (broker.queue_counts(&dead).await.0 == 2).then_some(()) }
    })
    .await;

    let mut replay = ProcessWorker::spawn(
        &[
            "dead-letters",
            "replay",
            "--provider",
            "qonto",
            "--kind",
            "provider_disabled",
            "--limit",
            "5",
        ],
        &env,
    );
    assert_eq!(replay.wait(common::DEADLINE).await.code(), Some(0));
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
    let broker = TestBroker::new("r-outage").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(&qonto)
        .await;
    let mut env = qonto_env(&broker, &qonto);
    env.push(("APPROVAL_RETRY__MAX_ATTEMPTS".into(), "50".into()));
    env.push(("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS".into(), "1".into()));
    env.push(("APPROVAL_RETRY__MAX_BACKOFF_MS".into(), "1000".into()));
    env.push(("APPROVAL_AMQP__PREFETCH".into(), "5".into()));
    let worker = InProcessWorker::start(env).await;
    broker.wait_consumer().await;

    // More waiting decisions than prefetch slots: they must not hold them.
    for i in 0..10 {
        broker
            .publish(&qonto_decision(&format!("out-{i}"), "reject"))
            .await;
    }
    common::wait_for(
        "every decision to have been tried",
        common::DEADLINE,
        || async {
            let ids: std::collections::BTreeSet<_> = posts(&qonto)
                .await
                .iter()
                .map(|r| r.url.path().to_owned())
                .collect();
            (ids.len() == 10).then_some(())
        },
    )
    .await;
    // A decision published during the outage for a different target is taken
    // at once. (Mocks are layered by priority, never reset: a reset leaves a
    // moment with no mock, whose 404 would be a permanent refusal.)
    let rid = uuid::Uuid::new_v4().to_string();
    Mock::given(method("POST"))
        .and(path(format!("/v2/requests/transfers/{rid}/decline")))
        .respond_with(ok("declined"))
        .with_priority(1)
        .mount(&qonto)
        .await;
    let mut fresh = qonto_decision("fresh", "reject");
    fresh["target"]["request_id"] = json!(rid);
    broker.publish(&fresh).await;
    broker
        .wait_outcomes_within(1, Duration::from_secs(5), |o| {
            o.decision_id() == "fresh" && o.status() == "applied"
        })
        .await;

    // The provider comes back; the waiting decisions complete.
    Mock::given(method("POST"))
        .respond_with(ok("declined"))
        .with_priority(2)
        .mount(&qonto)
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
    worker.stop().await;
}

#[tokio::test]
async fn qonto_sca_allow_replays_with_the_session_token() {
    let broker = TestBroker::new("r-sca").await;
    let qonto = MockServer::start().await;
    let token = "sca-session-123";
    Mock::given(method("POST"))
        .and(path_regex("/approve$"))
        .and(header("x-qonto-sca-session-token", token))
        .respond_with(ok("approved"))
        .mount(&qonto)
        .await;
    Mock::given(method("POST"))
        .and(path_regex("/approve$"))
        .respond_with(ResponseTemplate::new(428).set_body_json(json!({
            "errors": [{"code": "sca_required", "detail": "SCA required"}],
            "sca_session_token": token,
            "sca_session_expires_at": "2099-01-01T00:00:00Z",
        })))
        .mount(&qonto)
        .await;
    // Waiting twice, then allowed.
    Mock::given(method("GET"))
        .and(path(format!("/v2/sca_sessions/{token}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "waiting"})))
        .up_to_n_times(2)
        .mount(&qonto)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v2/sca_sessions/{token}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "allow"})))
        .mount(&qonto)
        .await;
    let worker = InProcessWorker::start(qonto_env(&broker, &qonto)).await;
    broker.wait_consumer().await;

    broker.publish(&qonto_decision("sca-1", "approve")).await;
    let waiting = broker.outcome("sca-1", "awaiting_confirmation").await;
    assert_eq!(
        waiting.body["confirmation"]["expires_at"],
        "2099-01-01T00:00:00Z"
    );
    assert_eq!(waiting.routing_key, "qonto.awaiting_confirmation");
    let applied = broker.outcome("sca-1", "applied").await;
    assert_eq!(applied.body["attempts"], 2);

    let reqs = qonto.received_requests().await.unwrap();
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
    worker.stop().await;
}

#[tokio::test]
async fn qonto_sca_deny_fails_the_decision() {
    let broker = TestBroker::new("r-sca-deny").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(428).set_body_json(json!({
            "sca_session_token": "tok-deny",
        })))
        .mount(&qonto)
        .await;
    Mock::given(method("GET"))
        .and(path("/v2/sca_sessions/tok-deny"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "deny"})))
        .mount(&qonto)
        .await;
    let worker = InProcessWorker::start(qonto_env(&broker, &qonto)).await;
    broker.wait_consumer().await;
    broker.publish(&qonto_decision("sca-2", "approve")).await;
    broker.outcome("sca-2", "awaiting_confirmation").await;
    let failed = broker.outcome("sca-2", "failed").await;
    assert_eq!(failed.body["error"]["kind"], "confirmation_denied");
    assert_eq!(posts(&qonto).await.len(), 1, "never replayed after a deny");
    let parked = broker.wait_parked(1).await;
    assert_eq!(
        parked[0].headers["x-approval-error-kind"],
        "confirmation_denied"
    );
    worker.stop().await;
}

#[tokio::test]
async fn an_unexpected_422_is_reconciled_into_already_applied() {
    let broker = TestBroker::new("r-recon").await;
    let qonto = MockServer::start().await;
    let d = qonto_decision("rec-1", "reject");
    let rid = d["target"]["request_id"].as_str().unwrap().to_owned();
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "errors": [{"code": "request_not_pending", "detail": "Request is not pending"}]
        })))
        .mount(&qonto)
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
        .mount(&qonto)
        .await;
    let worker = InProcessWorker::start(qonto_env(&broker, &qonto)).await;
    broker.wait_consumer().await;
    broker.publish(&d).await;
    let o = broker.outcome("rec-1", "already_applied").await;
    assert_eq!(o.body["resolution"], "reconciled");
    assert_eq!(o.body["provider_state"], "declined");
    let read = qonto
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .find(|r| r.method.as_str() == "GET")
        .unwrap();
    let query = read.url.query().unwrap_or_default();
    assert!(query.contains("request_type%5B%5D=transfer"), "{query}");
    assert_eq!(read.headers["authorization"], "Bearer oauth-token");
    worker.stop().await;
}

#[tokio::test]
async fn a_decision_past_the_delivery_limit_is_parked_as_poison() {
    use lapin::{
        BasicProperties,
        options::BasicPublishOptions,
        types::{AMQPValue, FieldTable},
    };
    let broker = TestBroker::new("r-poison").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ok("declined"))
        .mount(&qonto)
        .await;
    let worker = InProcessWorker::start(qonto_env(&broker, &qonto)).await;
    broker.wait_consumer().await;

    // As if the broker had delivered it 19 times without an ack (limit 20).
    let d = qonto_decision("poison-1", "reject");
    let mut headers = FieldTable::default();
    headers.insert("x-delivery-count".into(), AMQPValue::LongLongInt(19));
    broker
        .channel
        .basic_publish(
            broker.topology.decisions().into(),
            "qonto.reject".into(),
            BasicPublishOptions::default(),
            d.to_string().as_bytes(),
            BasicProperties::default()
                .with_headers(headers)
                .with_delivery_mode(2),
        )
        .await
        .unwrap();
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
        posts(&qonto).await.is_empty(),
        "a poison message is not applied"
    );
    worker.stop().await;
}

#[tokio::test]
async fn two_decisions_for_one_target_never_run_at_once() {
    let broker = TestBroker::new("r-order").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ok("declined").set_delay(Duration::from_millis(300)))
        .mount(&qonto)
        .await;
    let worker = InProcessWorker::start(qonto_env(&broker, &qonto)).await;
    broker.wait_consumer().await;

    let first = qonto_decision("order-1", "reject");
    let mut second = qonto_decision("order-2", "reject");
    second["target"] = first["target"].clone();
    broker.publish(&first).await;
    broker.publish(&second).await;
    let a = broker.outcome("order-1", "applied").await;
    let b = broker.outcome("order-2", "applied").await;
    let calls = posts(&qonto).await;
    assert_eq!(calls.len(), 2);
    // With a 300 ms provider, overlapping calls would finish within ~300 ms of each other.
    let done = |o: &common::Outcome| {
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
    worker.stop().await;
}
