//! The real binary: graceful shutdown, `check`, `demo`, and no secret in its
//! logs.

use std::time::Duration;

use wiremock::{Mock, ResponseTemplate, matchers::method};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    broker::AMQP_URL,
    mock,
    qonto::{self, SECRETS},
    wait::wait_for,
    worker::Process,
};

/// Qonto with every credential set, logging everything as JSON.
async fn app(name: &str) -> TestApp {
    spawn_app(
        App::qonto(name, qonto::Auth::ApiKey)
            .env("APPROVAL_LOG__FORMAT", "json")
            .env("APPROVAL_LOG__LEVEL", "debug")
            .without_worker(),
    )
    .await
}

#[tokio::test]
async fn sigterm_finishes_the_call_in_flight_then_exits_zero() {
    let app = app("p-sigterm").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined").set_delay(Duration::from_millis(1500)))
        .mount(provider)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    broker.publish(&qonto::decision("term-1", "reject")).await;
    wait_for(
        "the provider call to start",
        Duration::from_secs(10),
        || async { (!mock::requests(provider).await.is_empty()).then_some(()) },
    )
    .await;
    worker.signal(libc::SIGTERM);
    let status = worker.wait(Duration::from_secs(20)).await;
    assert_eq!(
        status.code(),
        Some(0),
        "exit 0; output:\n{}",
        worker.output()
    );

    let o = broker.outcome("term-1", "applied").await;
    assert_eq!(o.body["attempts"], 1);
    // Any unacknowledged decision would be ready again once the consumer is gone.
    assert_eq!(
        broker.wait_consumer_gone().await,
        0,
        "acknowledged before exit, nothing to redeliver"
    );
    let logs = worker.output();
    assert!(logs.contains("SIGTERM"), "{logs}");
    // A clean stop logs no error (lapin reports one when the connection
    // closes while a channel of the session is still closing).
    assert!(!logs.contains(r#""level":"ERROR""#), "{logs}");
}

/// Stopped while idle, after a decision went through, the worker closes
/// its session without a single error line (lapin logs one when the
/// connection closes while a channel of the session is still closing).
#[tokio::test]
async fn an_idle_worker_stops_without_an_error() {
    let app = app("p-idle-stop").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    broker.publish(&qonto::decision("idle-1", "reject")).await;
    broker.outcome("idle-1", "applied").await;

    worker.signal(libc::SIGTERM);
    let status = worker.wait(Duration::from_secs(20)).await;
    let logs = worker.output();
    assert_eq!(status.code(), Some(0), "{logs}");
    assert!(!logs.contains(r#""level":"ERROR""#), "{logs}");
}

#[tokio::test]
async fn no_configured_secret_reaches_the_logs() {
    let app = app("p-secrets").await;
    let (broker, provider) = (&app.broker, app.qonto());
    // A mix of answers so success, retry, refusal and auth-failure paths all log.
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            serde_json::json!({"errors": [{"code": "authorization_token_invalid", "detail": "bad token"}]}),
        ))
        .up_to_n_times(1)
        .mount(provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(2)
        .mount(provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    for i in 0..4 {
        broker
            .publish(&qonto::decision(&format!("sec-{i}"), "reject"))
            .await;
    }
    broker.publish_raw("qonto.reject", b"{broken").await;
    broker.wait_outcomes(5, |_| true).await;
    worker.signal(libc::SIGTERM);
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
    let app = app("p-check").await;
    let mut ok = app.run(&["check"]);
    assert_eq!(
        ok.wait(Duration::from_secs(20)).await.code(),
        Some(0),
        "{}",
        ok.output()
    );
    let out = ok.output();
    assert!(out.contains("provider qonto: enabled"), "{out}");
    assert!(SECRETS.iter().all(|s| !out.contains(s)));

    let mut bad = app.run_with(&["check"], &[("APPROVAL_AMQP__PREFETCH", "many")]);
    assert_ne!(bad.wait(Duration::from_secs(20)).await.code(), Some(0));
    assert!(
        bad.output().contains("APPROVAL_AMQP__PREFETCH"),
        "{}",
        bad.output()
    );

    let mut down = app.run_with(
        &["check"],
        &[(
            "APPROVAL_AMQP__URL",
            "amqp://guest:pw-S3CRET@127.0.0.1:1/%2f",
        )],
    );
    assert_ne!(down.wait(Duration::from_secs(20)).await.code(), Some(0));
    let out = down.output();
    assert!(
        out.contains("not reachable") || out.contains("did not answer"),
        "{out}"
    );
    assert!(!out.contains("pw-S3CRET"), "{out}");
}

/// `demo` brings its own simulator and namespace: only the broker is given.
#[tokio::test]
async fn demo_runs_the_whole_loop_and_says_when_the_broker_is_missing() {
    let mut demo = Process::spawn(&["demo"], &[("APPROVAL_AMQP__URL".into(), AMQP_URL.into())]);
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

    let mut down = Process::spawn(
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
