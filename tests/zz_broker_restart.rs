//! RabbitMQ is stopped and started under a running worker. This binary runs
//! alone, after every other test (scripts/test), because it takes the broker
//! away from everyone.

mod common;

use std::{collections::BTreeSet, process::Command, time::Duration};

use common::{AMQP_URL, InProcessWorker, TestBroker, wait_for};
use lapin::{
    Connection, ConnectionProperties,
    options::{
        BasicAckOptions, BasicGetOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
    },
    types::FieldTable,
};
use serde_json::{Value, json};
use wiremock::{Mock, MockServer, ResponseTemplate, matchers::method};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test]
async fn the_worker_reconnects_after_a_broker_restart_and_every_decision_settles() {
    let broker = TestBroker::new("zz-restart").await;
    // Outcomes are captured in a durable queue: the test's own connection
    // dies with the broker too.
    let capture = format!("{}.capture", broker.prefix);
    broker
        .channel
        .queue_declare(
            capture.as_str().into(),
            QueueDeclareOptions::durable(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    broker
        .channel
        .queue_bind(
            capture.as_str().into(),
            broker.topology.outcomes().into(),
            "#".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();

    let qonto = MockServer::start().await;
    Mock::given(method("POST"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"request_transfer": {"status": "declined"}}))
                .set_delay(Duration::from_millis(100)),
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
        ("APPROVAL_AMQP__PREFETCH".into(), "20".into()),
    ]);
    let worker = InProcessWorker::start(env).await;
    broker.wait_consumer().await;

    let total = 300;
    for i in 0..total {
        broker
            .publish(&json!({"decision_id": format!("rs-{i}"), "provider": "qonto", "action": "reject", "reason": "r",
                "target": {"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()}}))
            .await;
    }
    wait_for("decisions to flow", Duration::from_secs(20), || async {
        (qonto.received_requests().await.unwrap_or_default().len() >= 30).then_some(())
    })
    .await;

    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    let conn = Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    let settled = std::sync::Arc::new(std::sync::Mutex::new(BTreeSet::new()));
    wait_for("every decision to settle", Duration::from_secs(90), || {
        let ch = ch.clone();
        let capture = capture.clone();
        let settled = settled.clone();
        async move {
            while let Some(msg) = ch
                .basic_get(capture.as_str().into(), BasicGetOptions::default())
                .await
                .unwrap()
            {
                let body: Value = serde_json::from_slice(&msg.delivery.data).unwrap();
                assert_eq!(body["status"], "applied", "{body}");
                settled
                    .lock()
                    .unwrap()
                    .insert(body["decision_id"].as_str().unwrap().to_owned());
                msg.delivery.ack(BasicAckOptions::default()).await.unwrap();
            }
            let n = settled.lock().unwrap().len();
            (n == total).then_some(())
        }
    })
    .await;
    // One idempotency key per decision, however often it was delivered.
    let mut keys = std::collections::BTreeMap::<String, BTreeSet<String>>::new();
    // (A transport hiccup may add a reconciliation GET; keys are on decision calls.)
    for r in qonto
        .received_requests()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.method.as_str() == "POST")
    {
        keys.entry(r.url.path().to_owned()).or_default().insert(
            r.headers["x-qonto-idempotency-key"]
                .to_str()
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(keys.len(), total);
    assert!(keys.values().all(|k| k.len() == 1));

    wait_for(
        "the worker to consume again",
        Duration::from_secs(30),
        || {
            let ch = ch.clone();
            let q = broker.topology.decisions();
            async move {
                let q = ch
                    .queue_declare(
                        q.into(),
                        QueueDeclareOptions {
                            passive: true,
                            ..Default::default()
                        },
                        FieldTable::default(),
                    )
                    .await
                    .ok()?;
                (q.consumer_count() == 1 && q.message_count() == 0).then_some(())
            }
        },
    )
    .await;
    worker.stop().await;
    ch.queue_delete(capture.as_str().into(), QueueDeleteOptions::default())
        .await
        .unwrap();
    let _ = conn.close(200, "done".into()).await;
}
