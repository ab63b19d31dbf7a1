//! What a hostile or careless publisher's headers can do to the worker's
//! copies of its message: route them elsewhere (`CC`/`BCC`), or grow them
//! past the largest frame the broker accepts. Copies carry our bookkeeping
//! and trace context only.

use lapin::{
    BasicProperties, Connection, ConnectionProperties,
    types::{AMQPValue, FieldArray, FieldTable, LongString},
};
use serde_json::{Value, json};

use crate::helpers::{
    app::{App, series, spawn_app},
    broker::{AMQP_URL, TestBroker},
    signing,
    wait::{DEADLINE, wait_for},
};

/// A decision the worker refuses as invalid (unknown provider) and parks.
fn invalid(id: &str) -> Value {
    json!({"decision_id": id, "provider": "nobank", "action": "approve", "target": {}})
}

fn long_string(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

/// Parks `decision`'s first copy, then publishes `marker` behind anything
/// the park sent back into the decisions queue, and waits for its outcome.
async fn park_then_marker(broker: &TestBroker, headers: FieldTable, decision: &Value) {
    broker
        .publish_with_headers("nobank.approve", decision.to_string().as_bytes(), headers)
        .await;
    let dead = broker.topology.dead();
    wait_for("the first park", DEADLINE, || async {
        (broker.queue_counts(&dead).await.0 >= 1).then_some(())
    })
    .await;
    broker.publish(&invalid("marker")).await;
    broker.outcome("marker", "invalid").await;
}

/// `CC: ["P.decisions"]` routed every parked copy back into the decisions
/// queue as well, where it was refused and parked again, without end.
#[tokio::test]
async fn routing_headers_do_not_travel_into_a_parked_copy() {
    let app = spawn_app(App::without_providers("bs-cc")).await;
    let broker = &app.broker;
    let back = || FieldArray::from(vec![long_string(&broker.topology.decisions())]);
    let mut headers = FieldTable::default();
    headers.insert("CC".into(), AMQPValue::FieldArray(back()));
    headers.insert("BCC".into(), AMQPValue::FieldArray(back()));
    headers.insert("x-custom".into(), long_string("left behind"));
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    headers.insert("traceparent".into(), long_string(traceparent));
    let decision = invalid("cc-1");
    park_then_marker(broker, headers, &decision).await;

    // Nothing is in flight once the worker stopped: whatever a loop sent
    // back into the decisions queue is counted there.
    app.stop_worker().await;
    let requeued = broker.wait_consumer_gone().await;
    let parked = broker.drain_parked().await;
    let copies: Vec<_> = parked
        .iter()
        .filter(|p| p.body == decision.to_string().as_bytes())
        .collect();
    let outcomes = broker
        .outcomes()
        .into_iter()
        .filter(|o| o.decision_id() == "cc-1")
        .count();
    assert_eq!(
        (copies.len(), outcomes, requeued),
        (1, 1, 0),
        "parked copies, outcome events, copies sent back to the decisions queue"
    );
    let h = &copies[0].headers;
    assert_eq!(h["x-approval-error-kind"], "invalid");
    assert_eq!(h["traceparent"], traceparent, "trace context is kept");
    for gone in ["CC", "BCC", "x-custom"] {
        assert!(!h.contains_key(gone), "{gone} travelled: {h:?}");
    }
}

/// A header that fills the frame almost to `frame_max`: the worker receives
/// the decision, but a copy carrying it plus our bookkeeping is a frame the
/// broker refuses by closing the worker's connection, at every park. (A
/// larger header, such as 200 KiB on the default 128 KiB `frame_max`, can
/// be neither published nor delivered: the broker and lapin both refuse a
/// frame over `frame_max`.)
#[tokio::test]
async fn a_header_filling_the_frame_does_not_close_the_connection() {
    let app = spawn_app(App::without_providers("bs-frame").without_worker()).await;
    let broker = &app.broker;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;

    // Room for the broker's own `x-delivery-count` on a redelivery, so the
    // original always reaches the worker; not for our bookkeeping.
    let frame_max = frame_max().await;
    let slack = 64;
    let headers = |len: usize| {
        let mut h = FieldTable::default();
        h.insert("x-big".into(), long_string(&"b".repeat(len)));
        h
    };
    // As published: with the signature `publish_with_headers` adds (its
    // size does not depend on the body or the time).
    let frame = |h: &FieldTable| {
        let mut h = h.clone();
        signing::sign_into(&mut h, signing::ED25519_SEED, b"{}");
        // As `publish_with_headers` sends it.
        let props = BasicProperties::default()
            .with_delivery_mode(2)
            .with_content_type("application/json".into())
            .with_headers(h.clone());
        let encoded = lapin::protocol::basic::gen_properties::<Vec<u8>>(&props)(Vec::new().into())
            .unwrap()
            .write;
        // Frame envelope (8) and class, weight, body size (12).
        20 + encoded.len()
    };
    let len = frame_max - slack - frame(&headers(0));
    let big = headers(len);
    assert_eq!(frame(&big), frame_max - slack);

    let decision = invalid("big-1");
    park_then_marker(broker, big, &decision).await;
    let dead = broker.topology.dead();
    wait_for("both parked", DEADLINE, || async {
        (broker.queue_counts(&dead).await.0 >= 2).then_some(())
    })
    .await;

    // Checked before reading the parking lot: a copy the broker itself
    // dead-lettered after redeliveries carries its x-death history on top of
    // the header, a frame too large for the test's own connection.
    let reconnects = series(&app.metrics().await, "approval_broker_reconnects_total");
    worker.signal(libc::SIGTERM);
    worker.wait(DEADLINE).await;
    let output = worker.output();
    assert_eq!(reconnects, 0.0, "the connection closed: {output}");
    assert!(!output.contains("broker session lost"), "{output}");

    let parked = tokio::time::timeout(DEADLINE, broker.drain_parked())
        .await
        .expect("the parking lot is readable");
    let copy = parked
        .iter()
        .find(|p| p.body == decision.to_string().as_bytes())
        .expect("the decision is parked");
    assert_eq!(
        copy.headers
            .get("x-approval-error-kind")
            .map(String::as_str),
        Some("invalid"),
        "parked by the worker: {:?}",
        copy.headers.keys().collect::<Vec<_>>()
    );
    assert!(!copy.headers.contains_key("x-big"));
    let outcomes = broker.outcomes();
    let events = outcomes.iter().filter(|o| o.decision_id() == "big-1");
    assert_eq!(events.count(), 1, "one outcome event");
}

async fn frame_max() -> usize {
    let conn = Connection::connect(
        AMQP_URL,
        ConnectionProperties::default().with_connection_name("test frame_max".into()),
    )
    .await
    .unwrap();
    let frame_max = conn.configuration().frame_max() as usize;
    let _ = conn.close(200, "done".into()).await;
    frame_max
}

/// After the broker closed the channel outcomes are published on (here: the
/// outcomes exchange was deleted), the old session went on applying the
/// decision, failing its publish and requeueing it every 500 ms, with
/// `/readyz` at 200 throughout. The session must end at once, report not
/// ready, reconnect and redeclare, and the decision be applied once more
/// (same idempotency key), not in a loop.
#[tokio::test]
async fn a_closed_publish_channel_ends_the_session_without_a_loop() {
    use wiremock::{
        Mock,
        matchers::{method, path_regex},
    };

    use crate::helpers::{
        mock,
        qonto::{self, Auth},
    };

    let app = spawn_app(App::qonto("bs-pubch", Auth::ApiKey).without_worker()).await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .and(path_regex("^/v2/requests/transfers/.*/decline$"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    let mut worker = app.run(&["run"]);
    broker.wait_consumer().await;
    let readyz = format!("{}/readyz", app.admin_url());
    let ready = || async {
        reqwest::get(&readyz)
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    wait_for("the worker to be ready", DEADLINE, || async {
        ready().await.then_some(())
    })
    .await;

    broker.delete_outcomes_exchange().await;
    let first = qonto::decline("pub-1", &qonto::request_id());
    broker.publish(&first).await;
    wait_for("readiness to turn 503", DEADLINE, || async {
        (!ready().await).then_some(())
    })
    .await;
    let outcomes = broker.topology.outcomes();
    wait_for("the worker to redeclare and be ready", DEADLINE, || async {
        (broker.exchange_exists(&outcomes).await && ready().await).then_some(())
    })
    .await;
    broker.rebind_capture().await;
    let second = qonto::decline("pub-2", &qonto::request_id());
    broker.publish(&second).await;
    broker.outcome("pub-2", "applied").await;
    let decisions = broker.topology.decisions();
    wait_for("the first decision acknowledged", DEADLINE, || async {
        (broker.queue_counts(&decisions).await.0 == 0).then_some(())
    })
    .await;

    let metrics = app.metrics().await;
    worker.signal(libc::SIGTERM);
    worker.wait(DEADLINE).await;
    let output = worker.output();
    let rid = first["target"]["request_id"].as_str().unwrap();
    let calls = mock::calls_to(provider, &format!("/v2/requests/transfers/{rid}/decline")).await;
    assert_eq!(
        calls.len(),
        2,
        "applied once before the channel closed and once after the reconnect: {output}"
    );
    assert!(
        series(&metrics, "approval_publish_failures_total") >= 1.0,
        "{metrics}"
    );
    // Only confirmed outcomes count: the failed publish of the first
    // decision is not counted as a settled decision.
    assert_eq!(
        series(
            &metrics,
            r#"approval_decisions_total{provider="qonto",action="reject",status="applied"}"#
        ),
        2.0,
        "{metrics}"
    );
}
