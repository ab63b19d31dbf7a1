//! The real binary: graceful shutdown, `check`, and no secret in its logs.

mod common;

use std::time::Duration;

use common::{ProcessWorker, TestBroker, wait_for};
use serde_json::json;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

const SECRETS: &[&str] = &["login-S3CRET-a", "key-S3CRET-b", "token-S3CRET-c"];

fn env(broker: &TestBroker, qonto: &MockServer) -> Vec<(String, String)> {
    let mut env = broker.worker_env();
    env.extend([
        ("APPROVAL_PROVIDERS__QONTO__BASE_URL".into(), qonto.uri()),
        ("APPROVAL_PROVIDERS__QONTO__LOGIN".into(), SECRETS[0].into()),
        (
            "APPROVAL_PROVIDERS__QONTO__SECRET_KEY".into(),
            SECRETS[1].into(),
        ),
        (
            "APPROVAL_PROVIDERS__QONTO__STAGING_TOKEN".into(),
            SECRETS[2].into(),
        ),
        ("APPROVAL_LOG__FORMAT".into(), "json".into()),
        ("APPROVAL_LOG__LEVEL".into(), "debug".into()),
    ]);
    env
}

fn decline(id: &str) -> serde_json::Value {
    json!({
        "decision_id": id, "provider": "qonto", "action": "reject", "reason": "no",
        "target": {"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()},
    })
}

#[tokio::test]
async fn sigterm_finishes_the_call_in_flight_then_exits_zero() {
    let broker = TestBroker::new("p-sigterm").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"request_transfer": {"status": "declined"}}))
                .set_delay(Duration::from_millis(1500)),
        )
        .mount(&qonto)
        .await;
    let mut worker = ProcessWorker::spawn(&["run"], &env(&broker, &qonto));
    broker.wait_consumer().await;

    broker.publish(&decline("term-1")).await;
    wait_for(
        "the provider call to start",
        Duration::from_secs(10),
        || async {
            (!qonto
                .received_requests()
                .await
                .unwrap_or_default()
                .is_empty())
            .then_some(())
        },
    )
    .await;
    worker.signal("TERM");
    let status = worker.wait(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0; output:\n{}",
        worker.output()
    );

    let o = broker.outcome("term-1", "applied").await;
    assert_eq!(o.body["attempts"], 1);
    // The broker notices the closed connection a moment later; then any
    // unacknowledged decision would be ready again.
    let q = broker.topology.decisions();
    let ready = wait_for("the consumer to disappear", Duration::from_secs(10), || {
        let q = q.clone();
        let broker = &broker;
        async move {
            let (ready, consumers) = broker.queue_counts(&q).await;
            (consumers == 0).then_some(ready)
        }
    })
    .await;
    assert_eq!(ready, 0, "acknowledged before exit, nothing to redeliver");
    let logs = worker.output();
    assert!(logs.contains("SIGTERM"), "{logs}");
}

#[tokio::test]
async fn no_configured_secret_reaches_the_logs() {
    let broker = TestBroker::new("p-secrets").await;
    let qonto = MockServer::start().await;
    // A mix of answers so success, retry, refusal and auth-failure paths all log.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"errors": [{"code": "authorization_token_invalid", "detail": "bad token"}]}),
        ))
        .up_to_n_times(1)
        .mount(&qonto)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(&qonto)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"request_transfer": {"status": "declined"}})),
        )
        .mount(&qonto)
        .await;
    let mut worker = ProcessWorker::spawn(&["run"], &env(&broker, &qonto));
    broker.wait_consumer().await;
    for i in 0..4 {
        broker.publish(&decline(&format!("sec-{i}"))).await;
    }
    broker.publish_raw("qonto.reject", b"{broken").await;
    broker.wait_outcomes(5, |_| true).await;
    worker.signal("TERM");
    assert_eq!(worker.wait(Duration::from_secs(20)).await.code(), Some(0));

    let logs = worker.output();
    assert!(
        logs.contains("\"decision_id\":\"sec-0\""),
        "decision lines carry ids: {logs}"
    );
    for secret in SECRETS {
        assert!(!logs.contains(secret), "secret {secret} leaked into logs");
    }
    for o in broker.outcomes() {
        let text = o.body.to_string();
        assert!(
            SECRETS.iter().all(|s| !text.contains(s)),
            "secret in outcome {text}"
        );
    }
    let unauthorized = broker
        .outcomes()
        .into_iter()
        .find(|o| o.body["error"]["kind"] == "unauthorized");
    assert!(
        unauthorized.is_some(),
        "a 401 ends in an unauthorized failure"
    );
}

#[tokio::test]
async fn check_reports_providers_and_fails_clearly() {
    let broker = TestBroker::new("p-check").await;
    let qonto = MockServer::start().await;
    let mut ok = ProcessWorker::spawn(&["check"], &env(&broker, &qonto));
    assert_eq!(
        ok.wait(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        ok.output()
    );
    let out = ok.output();
    assert!(out.contains("provider qonto: enabled"), "{out}");
    assert!(SECRETS.iter().all(|s| !out.contains(s)));

    let mut bad_env = env(&broker, &qonto);
    bad_env.push(("APPROVAL_AMQP__PREFETCH".into(), "many".into()));
    let mut bad = ProcessWorker::spawn(&["check"], &bad_env);
    assert_ne!(bad.wait(Duration::from_secs(20)).await.code(), Some(0));
    assert!(
        bad.output().contains("APPROVAL_AMQP__PREFETCH"),
        "{}",
        bad.output()
    );

    let mut down_env = env(&broker, &qonto);
    down_env.push((
        "APPROVAL_AMQP__URL".into(),
        "amqp://guest:pw-S3CRET@127.0.0.1:1/%2f".into(),
    ));
    let mut down = ProcessWorker::spawn(&["check"], &down_env);
    assert_ne!(down.wait(Duration::from_secs(20)).await.code(), Some(0));
    let out = down.output();
    assert!(
        out.contains("not reachable") || out.contains("did not answer"),
        "{out}"
    );
    assert!(!out.contains("pw-S3CRET"), "{out}");
}

#[tokio::test]
async fn demo_runs_the_whole_loop_and_says_when_the_broker_is_missing() {
    let mut demo = ProcessWorker::spawn(
        &["demo"],
        &[("APPROVAL_AMQP__URL".into(), common::AMQP_URL.into())],
    );
    let status = demo.wait(Duration::from_secs(90)).await;
    let out = demo.output();
    assert_eq!(status.code(), Some(0), "{out}");
    for line in [
        "demo-transient",
        "demo-sca",
        "demo-malformed",
        "awaiting_confirmation -> applied",
        "0 double state changes",
    ] {
        assert!(out.contains(line), "missing {line:?} in:\n{out}");
    }
    let applied_rows = out
        .lines()
        .filter(|l| l.starts_with("demo-") && l.contains("applied"))
        .count();
    assert_eq!(applied_rows, 12, "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("demo-malformed") && l.contains("invalid")),
        "{out}"
    );

    let mut down = ProcessWorker::spawn(
        &["demo"],
        &[(
            "APPROVAL_AMQP__URL".into(),
            "amqp://guest:guest@127.0.0.1:1/%2f".into(),
        )],
    );
    assert_ne!(down.wait(Duration::from_secs(30)).await.code(), Some(0));
    let out = down.output();
    assert!(
        out.contains("RabbitMQ is not reachable") && out.contains("rabbitmq-server -detached"),
        "{out}"
    );
    assert_eq!(out.trim().lines().count(), 1, "one line: {out}");
}
