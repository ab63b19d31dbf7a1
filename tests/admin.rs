//! The admin endpoint of the real binary: health, readiness through a
//! drain, and metrics that match the outcomes published.

mod common;

use std::time::Duration;

use common::{ProcessWorker, TestBroker, wait_for};
use serde_json::json;
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

fn admin_url(env: &[(String, String)]) -> String {
    let bind = &env
        .iter()
        .rev()
        .find(|(k, _)| k == "APPROVAL_ADMIN__BIND")
        .unwrap()
        .1;
    format!("http://{bind}")
}

async fn get(url: &str) -> Option<(u16, String)> {
    let r = reqwest::get(url).await.ok()?;
    Some((r.status().as_u16(), r.text().await.ok()?))
}

/// The value of one series in Prometheus text, 0 when absent.
fn series(metrics: &str, name_and_labels: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            let (series, _) = l.rsplit_once(' ').unwrap_or((l, ""));
            let (name, labels) = series.split_once('{').unwrap_or((series, ""));
            let (want_name, want_labels) = name_and_labels
                .split_once('{')
                .unwrap_or((name_and_labels, ""));
            name == want_name
                && want_labels
                    .trim_end_matches('}')
                    .split(',')
                    .filter(|w| !w.is_empty())
                    .all(|w| labels.contains(w))
        })
        .filter_map(|l| l.rsplit_once(' ')?.1.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn health_readiness_and_metrics_follow_the_work() {
    let broker = TestBroker::new("a-metrics").await;
    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .up_to_n_times(1)
        .mount(&qonto)
        .await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"request_transfer": {"status": "declined"}}))
                .set_delay(Duration::from_millis(300)),
        )
        .mount(&qonto)
        .await;
    let mut env = broker.worker_env();
    env.extend([
        ("APPROVAL_PROVIDERS__QONTO__BASE_URL".into(), qonto.uri()),
        (
            "APPROVAL_PROVIDERS__QONTO__ACCESS_TOKEN".into(),
            "tok".into(),
        ),
    ]);
    let base = admin_url(&env);
    let mut worker = ProcessWorker::spawn(&["run"], &env);
    broker.wait_consumer().await;
    wait_for("/readyz 200", Duration::from_secs(10), || async {
        get(&format!("{base}/readyz"))
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await;
    assert_eq!(get(&format!("{base}/healthz")).await.unwrap().0, 200);

    for i in 0..3 {
        broker
            .publish(&json!({"decision_id": format!("m-{i}"), "provider": "qonto", "action": "reject", "reason": "r",
                "target": {"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()}}))
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
    broker
        .publish(&json!({"decision_id": "m-last", "provider": "qonto", "action": "reject", "reason": "r",
            "target": {"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()}}))
        .await;
    wait_for(
        "the last call in flight",
        Duration::from_secs(10),
        || async { (qonto.received_requests().await.unwrap_or_default().len() >= 5).then_some(()) },
    )
    .await;
    worker.signal("TERM");
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
