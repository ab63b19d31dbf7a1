//! The admin endpoint of the real binary: health, readiness through a
//! drain, and metrics that match the outcomes published.

use std::time::Duration;

use wiremock::{Mock, ResponseTemplate, matchers::method};

use crate::helpers::{
    app::{App, series, spawn_app},
    mock, qonto,
    wait::wait_for,
};

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

#[tokio::test]
async fn health_readiness_and_metrics_follow_the_work() {
    let app = spawn_app(App::qonto("a-metrics", qonto::Auth::AccessToken).without_worker()).await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined").set_delay(Duration::from_millis(300)))
        .mount(provider)
        .await;
    let base = app.admin_url();
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    wait_for("/readyz 200", Duration::from_secs(10), || async {
        get(&format!("{base}/readyz"))
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);
    let (code, status) = get(&format!("{base}/status")).await.unwrap();
    let status: serde_json::Value = serde_json::from_str(&status).unwrap();
    assert_eq!(code, 200);
    assert_eq!(status["ready"], true, "{status}");
    assert_eq!(
        status["broker"]["node"], "amqp://guest:***@127.0.0.1:5672/%2f",
        "the node in use, password masked: {status}"
    );
    assert!(status["broker"]["problem"].is_null(), "{status}");

    for i in 0..3 {
        broker
            .publish(&qonto::decision(&format!("m-{i}"), "reject"))
            .await;
    }
    broker.publish_raw("qonto.reject", b"{}").await;
    let outcomes = broker.wait_outcomes(4, |_| true).await;
    let applied = outcomes.iter().filter(|o| o.status() == "applied").count() as f64;
    let invalid = outcomes.iter().filter(|o| o.status() == "invalid").count() as f64;
    assert_eq!((applied, invalid), (3.0, 1.0));

    let (_, metrics) = get(&format!("{base}/metrics")).await.unwrap();
    assert_eq!(
        series(
            &metrics,
            r#"approval_decisions_total{provider="qonto",action="reject",status="applied"}"#
        ),
        applied,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, r#"approval_decisions_total{status="invalid"}"#),
        invalid,
        "{metrics}"
    );
    assert_eq!(
        series(&metrics, r#"approval_parked_total{kind="invalid"}"#),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"approval_retries_scheduled_total{provider="qonto",level="in_process"}"#
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"approval_provider_call_duration_seconds_count{provider="qonto",operation="decline",status_class="2xx"}"#
        ),
        3.0,
        "{metrics}"
    );
    assert_eq!(
        series(
            &metrics,
            r#"approval_provider_call_duration_seconds_count{provider="qonto",status_class="5xx"}"#
        ),
        1.0
    );
    assert_eq!(series(&metrics, "approval_in_flight"), 0.0);
    assert_eq!(series(&metrics, "approval_ready"), 1.0);

    // A drain turns readiness off at once, while the last call finishes.
    broker.publish(&qonto::decision("m-last", "reject")).await;
    wait_for(
        "the last call in flight",
        Duration::from_secs(10),
        || async { (mock::requests(provider).await.len() >= 5).then_some(()) },
    )
    .await;
    worker.signal(libc::SIGTERM);
    wait_for(
        "/readyz 503 while draining",
        Duration::from_secs(5),
        || async {
            get(&format!("{base}/readyz"))
                .await
                .filter(|(s, _)| *s == 503)
        },
    )
    .await;
    assert_eq!(worker.wait(Duration::from_secs(20)).await.code(), Some(0));
    broker.outcome("m-last", "applied").await;
}
