//! RabbitMQ is stopped and started under a running worker. This binary runs
//! alone, after every other test (scripts/test), because it takes the broker
//! away from everyone.

// The integration tests' helpers; this binary uses only some of them.
#[allow(dead_code)]
#[path = "it/helpers/mod.rs"]
mod helpers;

use std::{
    collections::{BTreeMap, BTreeSet},
    process::Command,
    time::Duration,
};

use helpers::{
    app::{App, spawn_app},
    mock, qonto,
    wait::wait_for,
};
use lapin::{Connection, ConnectionProperties, options::QueueDeclareOptions, types::FieldTable};
use wiremock::{Mock, matchers::method};

fn rabbitmqctl(args: &[&str]) {
    let status = Command::new("rabbitmqctl")
        .args(args)
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?} failed");
}

#[tokio::test]
async fn the_worker_reconnects_after_a_broker_restart_and_every_decision_settles() {
    // The outcome capture is a durable queue and reconnects: it loses
    // nothing while the broker is away.
    let app = spawn_app(
        App::qonto("zz-restart", qonto::Auth::AccessToken).env("APPROVAL_AMQP__PREFETCH", 20),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined").set_delay(Duration::from_millis(100)))
        .mount(provider)
        .await;

    let total = 300;
    for i in 0..total {
        broker
            .publish(&qonto::decision(&format!("rs-{i}"), "reject"))
            .await;
    }
    wait_for("decisions to flow", Duration::from_secs(20), || async {
        (mock::requests(provider).await.len() >= 30).then_some(())
    })
    .await;

    rabbitmqctl(&["stop_app"]);
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    // An event unacknowledged at the restart may be captured twice.
    wait_for("every decision to settle", Duration::from_secs(90), || {
        let settled: BTreeSet<String> = broker
            .outcomes()
            .iter()
            .map(|o| o.decision_id().to_owned())
            .collect();
        async move { (settled.len() == total).then_some(()) }
    })
    .await;
    for o in broker.outcomes() {
        assert_eq!(o.status(), "applied", "{}", o.body);
    }
    // One idempotency key per decision, however often it was delivered.
    // (A transport hiccup may add a reconciliation GET; keys are on decision calls.)
    let mut keys = BTreeMap::<String, BTreeSet<String>>::new();
    for r in mock::posts(provider).await {
        keys.entry(r.url.path().to_owned()).or_default().insert(
            mock::header(&r, "x-qonto-idempotency-key")
                .unwrap()
                .to_owned(),
        );
    }
    assert_eq!(keys.len(), total);
    assert!(keys.values().all(|k| k.len() == 1));

    // The test's own channel died with the broker: look on a new one.
    let conn = Connection::connect(helpers::broker::AMQP_URL, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
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
    app.stop_worker().await;
    let _ = conn.close(200, "done".into()).await;
}
