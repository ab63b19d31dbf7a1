//! Provider answers with absurd delays or lifetimes (issue 12 item 2): none
//! may close a broker channel, panic a delivery task or hold its prefetch
//! slot. FlexPay runs on wiremock here: it has a token and no idempotency,
//! so both the token cache and the read before a repeat call are reached.

use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    mock::{self, Script},
    wait::{DEADLINE, wait_for},
};

async fn flexpay_app(name: &str, extra: &[(&str, &str)]) -> (TestApp, MockServer) {
    let server = MockServer::start().await;
    let mut app = App::without_providers(name)
        .env("APPROVAL_PROVIDERS__FLEXPAY__BASE_URL", server.uri())
        .env("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID", "fx-client")
        .env("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET", "fx-secret-41");
    for (k, v) in extra {
        app = app.env(k, v);
    }
    (spawn_app(app).await, server)
}

async fn mount_token(server: &MockServer, expires_in: Value) {
    Mock::given(method("POST"))
        .and(path("/v1/auth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"access_token": "fx-token", "token_type": "Bearer", "expires_in": expires_in}),
        ))
        .mount(server)
        .await;
}

fn envelope(reference: &str, status: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "success": true,
        "message": "ok",
        "errorCode": null,
        "data": {"id": "3fa85f64", "reference": reference, "status": status},
        "errors": [],
    }))
}

fn approve(decision_id: &str, reference: &str) -> Value {
    json!({
        "decision_id": decision_id,
        "provider": "flexpay",
        "action": "approve",
        "target": {"reference": reference},
    })
}

fn accept_path(reference: &str) -> String {
    format!("/v1/transactions/{reference}/accept")
}

/// A reset sent as Unix milliseconds was read as 55,000 years: the decision
/// failed as past its horizon. It must wait the 1.5 s asked, in a retry
/// queue, then apply.
#[tokio::test]
async fn a_ratelimit_reset_in_epoch_millis_is_waited_for() {
    let (app, server) = flexpay_app(
        "lim-reset-ms",
        &[("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", "1")],
    )
    .await;
    let broker = &app.broker;
    let reference = "TXN-16820000-RESETMS1";
    mount_token(&server, json!(3600)).await;
    let reset_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
        + 1_500;
    let script = Script::new(vec![
        ResponseTemplate::new(429)
            .insert_header("X-RateLimit-Reset", reset_ms.to_string().as_str()),
        envelope(reference, "COMPLETED"),
    ]);
    Mock::given(method("POST"))
        .and(path(accept_path(reference)))
        .respond_with(script.clone())
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v1/transactions/{reference}")))
        .respond_with(envelope(reference, "AWAITING_ACCEPTANCE"))
        .mount(&server)
        .await;

    broker.publish(&approve("reset-ms-1", reference)).await;
    let o = broker.outcome("reset-ms-1", "applied").await;
    assert_eq!(o.body["attempts"], 2);
    let times = script.times();
    assert_eq!(times.len(), 2);
    let waited = times[1] - times[0];
    assert!(
        waited >= std::time::Duration::from_millis(1_000),
        "waited only {waited:?}"
    );
    app.stop_worker().await;
}

/// `Retry-After: 99999999999` on the read before a repeat call became a
/// message expiration the broker refuses, closing the publish channel: no
/// later decision could be settled. Now the wait is cut to the horizon, the
/// decision goes to a retry queue and ends exhausted once the horizon
/// passes, and the next decision applies.
#[tokio::test]
async fn a_huge_retry_after_never_closes_the_channel() {
    // The 429 also pauses FlexPay (issue 15) for as long as believed: cut
    // short here, as this test is about the channel, not the pause.
    let (app, server) = flexpay_app(
        "lim-retry-after",
        &[
            ("APPROVAL_RETRY__HORIZON_MS", "3000"),
            ("APPROVAL_ISOLATION__MAX_PAUSE_MS", "50"),
        ],
    )
    .await;
    let broker = &app.broker;
    let (slow, next) = ("TXN-16820000-HUGERA01", "TXN-16820000-NEXTONE1");
    mount_token(&server, json!(3600)).await;
    Mock::given(method("POST"))
        .and(path(accept_path(slow)))
        .respond_with(ResponseTemplate::new(503))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path(format!("/v1/transactions/{slow}")))
        .respond_with(ResponseTemplate::new(429).insert_header("Retry-After", "99999999999"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(accept_path(next)))
        .respond_with(envelope(next, "COMPLETED"))
        .mount(&server)
        .await;

    broker.publish(&approve("huge-ra-1", slow)).await;
    let read = format!("/v1/transactions/{slow}");
    wait_for("the read before the repeat call", DEADLINE, || async {
        (!mock::calls_to(&server, &read).await.is_empty()).then_some(())
    })
    .await;
    broker.publish(&approve("huge-ra-2", next)).await;
    broker.outcome("huge-ra-2", "applied").await;
    let o = broker.outcome("huge-ra-1", "failed").await;
    assert_eq!(o.body["error"]["kind"], "exhausted");
    let parked = broker.wait_parked(1).await;
    assert_eq!(parked[0].headers["x-approval-error-kind"], "exhausted");
    app.stop_worker().await;
}

/// A token lifetime of `u64::MAX` seconds overflowed an `Instant` and
/// panicked the delivery task, which then held its prefetch slot with the
/// decision unacknowledged. Now the lifetime is clamped and both decisions
/// apply.
#[tokio::test]
async fn a_huge_token_lifetime_does_not_strand_the_delivery() {
    let (app, server) = flexpay_app("lim-token-ttl", &[]).await;
    let broker = &app.broker;
    mount_token(&server, json!(u64::MAX)).await;
    let refs = ["TXN-16820000-TOKTTL01", "TXN-16820000-TOKTTL02"];
    for r in refs {
        Mock::given(method("POST"))
            .and(path(accept_path(r)))
            .respond_with(envelope(r, "COMPLETED"))
            .mount(&server)
            .await;
    }
    for (i, r) in refs.iter().enumerate() {
        broker.publish(&approve(&format!("tok-ttl-{i}"), r)).await;
    }
    for i in 0..refs.len() {
        broker.outcome(&format!("tok-ttl-{i}"), "applied").await;
    }
    app.stop_worker().await;
}
