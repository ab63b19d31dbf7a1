//! Only signed decisions from trusted publishers move money (CONTRACT v2
//! section 4.1), on the real broker, with Qonto on wiremock counting calls.

use std::time::Duration;

use lapin::{
    BasicProperties,
    types::{AMQPValue, FieldTable, LongString},
};
use serde_json::Value;
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{method, path_regex},
};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    broker::TestBroker,
    mock,
    qonto::{self, Auth, decline, request_id},
    signing::{self, ED25519_SEED, HMAC_SECRET},
    wait::DEADLINE,
};

/// A worker on Qonto whose declines succeed.
async fn qonto_app(app: App) -> TestApp {
    let app = spawn_app(app).await;
    Mock::given(method("POST"))
        .and(path_regex("^/v2/requests/transfers/.*/decline$"))
        .respond_with(qonto::answer("declined"))
        .mount(app.qonto())
        .await;
    app
}

fn now() -> i64 {
    time::OffsetDateTime::now_utc().unix_timestamp()
}

/// `body` under routing key `qonto.reject`, signed with `key` at `at`.
async fn publish_signed(broker: &TestBroker, body: &[u8], key: &str, at: i64) {
    let mut h = FieldTable::default();
    signing::sign_at(&mut h, key, body, at);
    broker.publish_unsigned("qonto.reject", body, h).await;
}

fn text(s: &str) -> AMQPValue {
    AMQPValue::LongString(LongString::from(s.as_bytes().to_vec()))
}

async fn refused(broker: &TestBroker, id: &str, kind: &str) -> Value {
    let o = broker.outcome(id, "invalid").await;
    assert_eq!(o.body["error"]["kind"], kind, "{:?}", o.body);
    o.body
}

#[tokio::test]
async fn only_a_valid_fresh_signature_from_a_trusted_key_is_applied() {
    let app = qonto_app(App::qonto("au-sig", Auth::ApiKey)).await;
    let broker = &app.broker;
    let body = |id: &str| decline(id, &request_id()).to_string().into_bytes();

    // Unsigned.
    broker
        .publish_unsigned("qonto.reject", &body("u-1"), FieldTable::default())
        .await;
    // A key the worker does not trust.
    let (untrusted, _) = approval_worker::authn::keys::generate_ed25519();
    use secrecy::ExposeSecret;
    publish_signed(broker, &body("u-2"), untrusted.expose_secret(), now()).await;
    // Body changed by one byte after signing.
    let signed = body("u-3");
    let mut h = FieldTable::default();
    signing::sign_at(&mut h, ED25519_SEED, &signed, now());
    let mut changed = signed.clone();
    let last = changed.len() - 1;
    changed.insert(last, b' ');
    broker.publish_unsigned("qonto.reject", &changed, h).await;
    // Signed in the future (more than 300 s ahead).
    publish_signed(broker, &body("u-4"), ED25519_SEED, now() + 600).await;
    // Older than the maximum age (24 h by default).
    publish_signed(broker, &body("u-5"), ED25519_SEED, now() - 86_400 - 60).await;
    // Valid Ed25519, valid HMAC alone.
    publish_signed(broker, &body("ok-ed"), ED25519_SEED, now()).await;
    publish_signed(broker, &body("ok-hmac"), HMAC_SECRET, now()).await;

    for id in ["u-1", "u-2", "u-3", "u-4"] {
        refused(broker, id, "unauthenticated").await;
    }
    refused(broker, "u-5", "stale").await;
    broker.outcome("ok-ed", "applied").await;
    broker.outcome("ok-hmac", "applied").await;
    assert_eq!(
        mock::posts(app.qonto()).await.len(),
        2,
        "no call for a refused decision"
    );
    let parked = broker.wait_parked(5).await;
    assert_eq!(parked.len(), 5, "every refused decision is parked");
    app.stop_worker().await;
}

#[tokio::test]
async fn the_routing_key_and_the_publishing_user_must_match() {
    let app = qonto_app(
        App::qonto("au-route", Auth::ApiKey).env("APPROVAL_AUTH__ALLOWED_USER_IDS", "guest"),
    )
    .await;
    let broker = &app.broker;
    let signed = |id: &str| {
        let body = decline(id, &request_id()).to_string().into_bytes();
        let mut h = FieldTable::default();
        signing::sign_at(&mut h, ED25519_SEED, &body, now());
        (body, h)
    };
    let props = |h: FieldTable| {
        BasicProperties::default()
            .with_delivery_mode(2)
            .with_headers(h)
    };

    // A valid signature, published under another provider's routing key.
    let (body, h) = signed("r-1");
    broker.publish_unsigned("flexpay.reject", &body, h).await;
    // No user_id at all, while a list is configured.
    let (body, h) = signed("r-2");
    broker.publish_unsigned("qonto.reject", &body, h).await;
    // The broker-validated user, listed.
    let (body, h) = signed("r-3");
    let with_user = props(h).with_user_id("guest".into());
    broker
        .publish_with_properties("qonto.reject", &body, with_user)
        .await;

    refused(broker, "r-1", "unauthenticated").await;
    refused(broker, "r-2", "unauthenticated").await;
    broker.outcome("r-3", "applied").await;
    assert_eq!(mock::posts(app.qonto()).await.len(), 1);
    app.stop_worker().await;

    // The same user, not listed.
    let app = qonto_app(
        App::qonto("au-route2", Auth::ApiKey)
            .env("APPROVAL_AUTH__ALLOWED_USER_IDS", "someone-else"),
    )
    .await;
    let (body, h) = signed("r-4");
    let with_user = props(h).with_user_id("guest".into());
    app.broker
        .publish_with_properties("qonto.reject", &body, with_user)
        .await;
    refused(&app.broker, "r-4", "unauthenticated").await;
    app.stop_worker().await;
}

/// A publisher's own `x-approval-*` and `x-delivery-count` headers used to
/// be believed: 19 deliveries parked the decision as poison without a
/// call, and a first receipt far back ended its retries. Now they are
/// ignored: the decision is applied with one call.
#[tokio::test]
async fn injected_bookkeeping_headers_are_ignored() {
    let app = qonto_app(App::qonto("au-inject", Auth::ApiKey)).await;
    let broker = &app.broker;
    let d = decline("inj-1", &request_id());
    let mut h = FieldTable::default();
    h.insert("x-delivery-count".into(), AMQPValue::LongLongInt(19));
    h.insert("x-approval-attempts".into(), AMQPValue::LongLongInt(7));
    h.insert(
        "x-approval-first-received-at".into(),
        text("2000-01-01T00:00:00Z"),
    );
    broker
        .publish_with_headers("qonto.reject", d.to_string().as_bytes(), h)
        .await;
    let o = broker.outcome("inj-1", "applied").await;
    assert_eq!(o.body["attempts"], 1, "{:?}", o.body);
    assert_eq!(mock::posts(app.qonto()).await.len(), 1);
    app.stop_worker().await;
}

/// Anyone may publish into a retry queue or the parking lot through the
/// default exchange: such a message is never applied, not even after
/// `dead-letters replay`.
#[tokio::test]
async fn unsigned_messages_injected_into_a_retry_queue_or_the_parking_lot_are_never_applied() {
    let app = qonto_app(App::qonto("au-queue", Auth::ApiKey)).await;
    let broker = &app.broker;
    let retry = broker.topology.retry_queues()[0].clone();
    let mut h = FieldTable::default();
    h.insert("x-approval-attempts".into(), AMQPValue::LongLongInt(1));
    let via_retry = decline("inj-retry", &request_id()).to_string();
    broker
        .publish_to_queue(&retry, via_retry.as_bytes(), h.clone())
        .await;
    refused(broker, "inj-retry", "unauthenticated").await;

    let via_dead = decline("inj-dead", &request_id()).to_string();
    let dead = broker.topology.dead();
    broker.publish_to_queue(&dead, via_dead.as_bytes(), h).await;
    let mut replay = app.run(&["dead-letters", "replay"]);
    assert!(replay.wait(DEADLINE).await.success(), "{}", replay.output());
    let o = refused(broker, "inj-dead", "unauthenticated").await;
    assert_eq!(o["decision_id"], "inj-dead");
    assert!(
        mock::posts(app.qonto()).await.is_empty(),
        "nothing injected reaches the provider"
    );
    app.stop_worker().await;
}

/// The signature's age counts from the first receipt: a retry copy of a
/// decision that was fresh when it arrived is applied after the maximum
/// age has passed; a replay is a new first receipt and must be fresh.
#[tokio::test]
async fn age_counts_from_the_first_receipt_and_a_replay_starts_anew() {
    let max_age = 8;
    let app = spawn_app(
        App::qonto("au-age", Auth::ApiKey)
            .env("APPROVAL_AUTH__MAX_AGE_S", max_age)
            .env("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", 1),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "5"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(provider)
        .await;
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .with_priority(2)
        .mount(provider)
        .await;

    // Five seconds old at first receipt (fresh); more than eight by the
    // time its retry copy returns.
    let signed_at = now() - 5;
    let body = decline("age-1", &request_id()).to_string();
    publish_signed(broker, body.as_bytes(), ED25519_SEED, signed_at).await;
    let o = broker
        .wait_outcomes_within(1, Duration::from_secs(30), |o| o.decision_id() == "age-1")
        .await
        .remove(0);
    assert_eq!(o.status(), "applied", "{:?}", o.body);
    assert!(
        now() - signed_at > max_age,
        "the copy came back after the maximum age"
    );
    assert_eq!(o.body["attempts"], 2);

    // Parked while fresh (an unknown provider), replayed once stale.
    let stale = serde_json::json!({"decision_id": "age-2", "provider": "nobank",
        "action": "reject", "target": {}})
    .to_string();
    let mut h = FieldTable::default();
    signing::sign_at(&mut h, ED25519_SEED, stale.as_bytes(), now() - 5);
    broker
        .publish_unsigned("nobank.reject", stale.as_bytes(), h)
        .await;
    broker.outcome("age-2", "invalid").await;
    let dead = broker.topology.dead();
    crate::helpers::wait::wait_for("the park", DEADLINE, || async {
        (broker.queue_counts(&dead).await.0 == 1).then_some(())
    })
    .await;
    crate::helpers::wait::wait_for(
        "the signature to pass the maximum age",
        Duration::from_secs(15),
        || async { (now() - (signed_at) > max_age + 5).then_some(()) },
    )
    .await;
    let mut replay = app.run(&["dead-letters", "replay", "--kind", "invalid"]);
    assert!(replay.wait(DEADLINE).await.success(), "{}", replay.output());
    let o = broker
        .wait_outcomes(1, |o| {
            o.decision_id() == "age-2" && o.body["error"]["kind"] == "stale"
        })
        .await;
    assert_eq!(o.len(), 1);
    app.stop_worker().await;
}

#[tokio::test]
async fn monitor_and_off_apply_unsigned_decisions() {
    for mode in ["monitor", "off"] {
        let app = qonto_app(
            App::qonto(&format!("au-{mode}"), Auth::ApiKey).env("APPROVAL_AUTH__MODE", mode),
        )
        .await;
        let id = format!("m-{mode}");
        let d = decline(&id, &request_id()).to_string();
        app.broker
            .publish_unsigned("qonto.reject", d.as_bytes(), FieldTable::default())
            .await;
        app.broker.outcome(&id, "applied").await;
        assert_eq!(mock::posts(app.qonto()).await.len(), 1, "{mode}");
        app.stop_worker().await;
    }
}
