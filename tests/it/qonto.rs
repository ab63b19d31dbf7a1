//! The worker end to end on the real broker, with Qonto mocked by wiremock.

use std::time::Duration;

use serde_json::{Value, json};
use wiremock::{
    Mock, ResponseTemplate,
    matchers::{method, path_regex},
};

use crate::helpers::{
    app::{App, TestApp, spawn_app},
    broker::close_connections_named,
    mock::{self, Script, calls_to, header},
    qonto::{self, LOGIN, SECRET_KEY, STAGING_TOKEN, decline, request_id},
    wait::wait_for,
};

/// A worker on Qonto with every credential set.
async fn app(name: &str) -> TestApp {
    spawn_app(App::qonto(name, qonto::Auth::ApiKey)).await
}

/// The key the worker derives for decision `d` (CONTRACT v2 section 4).
fn derived_key(d: &Value) -> String {
    let action = if d["action"] == "approve" {
        approval_worker::decision::Action::Approve
    } else {
        approval_worker::decision::Action::Reject
    };
    let id = d["decision_id"].as_str().unwrap();
    approval_worker::decision::derived_key(id, "qonto", action, d["target"].as_object().unwrap())
}

#[tokio::test]
async fn decline_is_sent_exactly_and_reported_applied() {
    let app = app("q-decline").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .and(path_regex("^/v2/requests/transfers/.*/decline$"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;

    let rid = request_id();
    let mut d = decline("dec-1", &rid);
    // The singular spelling some Qonto payloads use maps to the plural path.
    d["target"]["request_type"] = json!("transfer");
    broker.publish(&d).await;
    let outcome = broker.outcome("dec-1", "applied").await;

    let calls = mock::requests(provider).await;
    assert_eq!(calls.len(), 1);
    let call = &calls[0];
    assert_eq!(call.method.as_str(), "POST");
    assert_eq!(
        call.url.path(),
        format!("/v2/requests/transfers/{rid}/decline")
    );
    assert_eq!(call.url.query(), None);
    assert_eq!(
        header(call, "authorization"),
        Some(format!("{LOGIN}:{SECRET_KEY}").as_str())
    );
    assert_eq!(header(call, "x-qonto-staging-token"), Some(STAGING_TOKEN));
    assert_eq!(
        header(call, "x-qonto-idempotency-key"),
        Some(derived_key(&d).as_str())
    );
    assert_eq!(header(call, "content-type"), Some("application/json"));
    let reason = d["reason"].as_str().unwrap();
    assert_eq!(
        call.body,
        format!(r#"{{"declined_note":"{reason}"}}"#).as_bytes()
    );

    let b = &outcome.body;
    assert_eq!(b["provider"], "qonto");
    assert_eq!(b["action"], "reject");
    assert_eq!(b["provider_state"], "declined");
    assert_eq!(b["attempts"], 1);
    assert_eq!(b["error"], Value::Null);
    assert_eq!(b["idempotency_key"], derived_key(&d));
    assert_eq!(b["target"]["request_id"], rid);
    assert_eq!(b["decided_by"], d["decided_by"]);
    assert_eq!(b["decided_at"], d["decided_at"]);
    assert_eq!(
        b["provider_response"]["request_transfer"]["status"],
        "declined"
    );
    assert_eq!(outcome.routing_key, "qonto.applied");
    assert_eq!(outcome.message_id.as_deref(), b["event_id"].as_str());
    assert_eq!(outcome.correlation_id.as_deref(), Some("dec-1"));
    assert_eq!(outcome.content_type.as_deref(), Some("application/json"));
    assert_eq!(outcome.delivery_mode, Some(2));
    let text = b.to_string();
    assert!(!text.contains(SECRET_KEY) && !text.contains(STAGING_TOKEN));

    app.stop_worker().await;
    assert_eq!(broker.queue_counts(&broker.topology.decisions()).await.0, 0);
    assert_eq!(broker.queue_counts(&broker.topology.dead()).await.0, 0);
}

#[tokio::test]
async fn approve_sends_debit_iban_and_the_given_key() {
    let app = app("q-approve").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .and(path_regex("^/v2/requests/.*/approve$"))
        .respond_with(qonto::answer("approved"))
        .mount(provider)
        .await;

    let (r1, r2) = (request_id(), request_id());
    broker
        .publish(&json!({
            "decision_id": "app-1", "provider": "qonto", "action": "approve",
            "target": {"request_type": "multi_transfers", "request_id": r1, "debit_iban": "FR7630001007941234567890185"},
            "idempotency_key": "given-key-1",
        }))
        .await;
    let app2 = json!({
        "decision_id": "app-2", "provider": "qonto", "action": "approve",
        "target": {"request_type": "flash_card", "request_id": r2},
    });
    broker.publish(&app2).await;
    let o1 = broker.outcome("app-1", "applied").await;
    let o2 = broker.outcome("app-2", "applied").await;
    assert_eq!(o1.body["idempotency_key"], "given-key-1");
    assert_eq!(o2.body["idempotency_key"], derived_key(&app2));

    let c1 = calls_to(
        provider,
        &format!("/v2/requests/multi_transfers/{r1}/approve"),
    )
    .await;
    assert_eq!(c1.len(), 1);
    assert_eq!(
        header(&c1[0], "x-qonto-idempotency-key"),
        Some("given-key-1")
    );
    assert_eq!(
        c1[0].body,
        br#"{"debit_iban":"FR7630001007941234567890185"}"#
    );
    let c2 = calls_to(provider, &format!("/v2/requests/flash_cards/{r2}/approve")).await;
    assert_eq!(c2.len(), 1);
    assert!(c2[0].body.is_empty(), "no body without debit_iban");
    assert_eq!(
        header(&c2[0], "x-qonto-idempotency-key"),
        Some(derived_key(&app2).as_str())
    );
    app.stop_worker().await;
}

#[tokio::test]
async fn the_same_decision_twice_uses_one_key_and_one_event_id() {
    let app = app("q-twice").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;

    let d = decline("dup-1", &request_id());
    broker.publish(&d).await;
    broker.publish(&d).await;
    let outcomes = broker
        .wait_outcomes(2, |o| o.decision_id() == "dup-1")
        .await;
    assert!(outcomes.iter().all(|o| o.status() == "applied"));
    assert_eq!(outcomes[0].body["event_id"], outcomes[1].body["event_id"]);
    let keys: Vec<_> = mock::requests(provider)
        .await
        .iter()
        .map(|r| header(r, "x-qonto-idempotency-key").unwrap().to_owned())
        .collect();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0], keys[1]);
    app.stop_worker().await;
}

#[tokio::test]
async fn transient_failures_are_retried_with_one_key() {
    let app = app("q-503").await;
    let (broker, provider) = (&app.broker, app.qonto());
    let rid = request_id();
    let script = Script::new(vec![
        ResponseTemplate::new(503),
        ResponseTemplate::new(503),
        qonto::answer_for(&rid, "declined"),
    ]);
    Mock::given(method("POST"))
        .respond_with(script.clone())
        .mount(provider)
        .await;

    let d = decline("retry-1", &rid);
    broker.publish(&d).await;
    let o = broker.outcome("retry-1", "applied").await;
    assert_eq!(o.body["attempts"], 3);
    let calls = mock::requests(provider).await;
    assert_eq!(calls.len(), 3);
    let key = derived_key(&d);
    assert!(
        calls
            .iter()
            .all(|r| header(r, "x-qonto-idempotency-key") == Some(key.as_str()))
    );
    assert!(calls.iter().all(|r| r.body == calls[0].body));
    app.stop_worker().await;
}

#[tokio::test]
async fn a_permanent_refusal_is_failed_parked_and_called_once() {
    let app = app("q-422").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(422).set_body_json(json!({
            "errors": [{"code": "kyc_not_accepted", "detail": "Approver kyc is not accepted"}]
        })))
        .mount(provider)
        .await;

    let d = decline("perm-1", &request_id());
    broker.publish(&d).await;
    let o = broker.outcome("perm-1", "failed").await;
    assert_eq!(o.body["error"]["kind"], "rejected_by_provider");
    assert_eq!(o.body["error"]["http_status"], 422);
    assert_eq!(o.body["error"]["provider_code"], "kyc_not_accepted");
    assert_eq!(o.body["error"]["message"], "Approver kyc is not accepted");
    assert_eq!(o.body["attempts"], 1);
    assert_eq!(o.routing_key, "qonto.failed");

    let parked = broker.wait_parked(1).await;
    assert_eq!(parked[0].body, d.to_string().as_bytes());
    assert_eq!(
        parked[0].headers["x-approval-error-kind"],
        "rejected_by_provider"
    );
    assert_eq!(parked[0].headers["x-approval-attempts"], "1");
    assert!(
        parked[0]
            .headers
            .contains_key("x-approval-first-received-at")
    );
    assert!(parked[0].headers["x-approval-error"].contains("kyc"));
    assert_eq!(
        mock::requests(provider)
            .await
            .iter()
            .filter(|r| r.method.as_str() == "POST")
            .count(),
        1
    );
    app.stop_worker().await;
}

#[tokio::test]
async fn rate_limits_wait_at_least_retry_after() {
    let app = app("q-429").await;
    let (broker, provider) = (&app.broker, app.qonto());
    let rid = request_id();
    let script = Script::new(vec![
        ResponseTemplate::new(429).insert_header("Retry-After", "1"),
        qonto::answer_for(&rid, "declined"),
    ]);
    Mock::given(method("POST"))
        .respond_with(script.clone())
        .mount(provider)
        .await;

    broker.publish(&decline("rl-1", &rid)).await;
    let o = broker.outcome("rl-1", "applied").await;
    assert_eq!(o.body["attempts"], 2);
    let times = script.times();
    assert_eq!(times.len(), 2);
    let waited = times[1] - times[0];
    assert!(waited >= Duration::from_secs(1), "waited only {waited:?}");
    app.stop_worker().await;
}

#[tokio::test]
async fn attempts_run_out_into_exhausted() {
    let app = spawn_app(
        App::qonto("q-exhaust", qonto::Auth::ApiKey)
            .env("APPROVAL_RETRY__MAX_ATTEMPTS", 3)
            .env("APPROVAL_RETRY__IN_PROCESS_ATTEMPTS", 5),
    )
    .await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(503))
        .mount(provider)
        .await;

    broker.publish(&decline("ex-1", &request_id())).await;
    let o = broker.outcome("ex-1", "failed").await;
    assert_eq!(o.body["error"]["kind"], "exhausted");
    assert_eq!(o.body["attempts"], 3);
    assert_eq!(mock::requests(provider).await.len(), 3);
    let parked = broker.wait_parked(1).await;
    assert_eq!(parked[0].headers["x-approval-error-kind"], "exhausted");
    assert_eq!(parked[0].headers["x-approval-attempts"], "3");
    app.stop_worker().await;
}

/// Every kind of malformed message: `invalid`, parked byte for byte with
/// the reason, and no provider call.
#[tokio::test]
async fn malformed_messages_are_invalid_and_parked() {
    let app = app("q-invalid").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;

    let rid = request_id();
    let huge = format!(
        r#"{{"decision_id":"big","pad":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"not json at all".to_vec(), "not valid JSON"),
        (b"\xff\xfe\xfd".to_vec(), "UTF-8"),
        (b"[1,2,3]".to_vec(), "JSON object"),
        (huge.into_bytes(), "limit is 65536"),
        (json!({"provider": "qonto", "action": "reject"}).to_string().into_bytes(), "decision_id"),
        (json!({"decision_id": "bad id!", "provider": "qonto"}).to_string().into_bytes(), "decision_id"),
        (json!({"decision_id": "i-1", "provider": "qonto", "action": "maybe", "target": {}}).to_string().into_bytes(), "action"),
        (json!({"decision_id": "i-2", "provider": "nobank", "action": "approve", "target": {}}).to_string().into_bytes(), "provider must be one of"),
        (json!({"decision_id": "i-3", "provider": "qonto", "action": "approve", "target": {"request_type": "transfers", "request_id": "not-a-uuid"}}).to_string().into_bytes(), "UUID"),
        (json!({"decision_id": "i-4", "provider": "qonto", "action": "approve", "target": {"request_type": "transfers", "request_id": "../../etc/passwd"}}).to_string().into_bytes(), "UUID"),
        (json!({"decision_id": "i-5", "provider": "qonto", "action": "approve", "target": {"request_type": "../admin", "request_id": rid}}).to_string().into_bytes(), "request_type"),
        (json!({"decision_id": "i-6", "provider": "qonto", "action": "reject", "target": {"request_type": "transfers", "request_id": rid}}).to_string().into_bytes(), "reason is required"),
        (json!({"decision_id": "i-7", "provider": "qonto", "action": "reject", "target": "x"}).to_string().into_bytes(), "target"),
        (json!({"decision_id": "i-8", "provider": "qonto", "action": "reject", "reason": "r", "idempotency_key": "", "target": {"request_type": "transfers", "request_id": rid}}).to_string().into_bytes(), "idempotency_key"),
    ];
    for (body, _) in &cases {
        // Routed as the body says where it says anything: a mismatch is
        // refused as unauthenticated before the body is validated.
        let routed = serde_json::from_slice::<Value>(body)
            .ok()
            .and_then(|v| {
                Some(format!(
                    "{}.{}",
                    v["provider"].as_str()?,
                    v["action"].as_str()?
                ))
            })
            .unwrap_or_else(|| "qonto.reject".to_owned());
        broker.publish_raw(&routed, body).await;
    }
    let outcomes = broker
        .wait_outcomes(cases.len(), |o| o.status() == "invalid")
        .await;
    assert_eq!(outcomes.len(), cases.len());
    for (_, needle) in &cases {
        assert!(
            outcomes.iter().any(|o| o.body["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(needle)),
            "no invalid outcome mentions {needle:?}: {outcomes:#?}"
        );
    }
    assert!(
        outcomes
            .iter()
            .all(|o| o.body["error"]["kind"] == "invalid")
    );
    let unreadable = outcomes
        .iter()
        .find(|o| {
            o.body["error"]["message"]
                .as_str()
                .unwrap()
                .contains("UTF-8")
        })
        .unwrap();
    assert_eq!(unreadable.routing_key, "unknown.invalid");
    assert_eq!(unreadable.correlation_id, None);
    let with_id = outcomes.iter().find(|o| o.decision_id() == "i-6").unwrap();
    assert_eq!(with_id.routing_key, "qonto.invalid");
    assert_eq!(with_id.correlation_id.as_deref(), Some("i-6"));

    let parked = broker.wait_parked(cases.len()).await;
    for (body, _) in &cases {
        let p = parked
            .iter()
            .find(|p| &p.body == body)
            .expect("parked byte for byte");
        assert_eq!(p.headers["x-approval-error-kind"], "invalid");
        assert!(!p.headers["x-approval-error"].is_empty());
        assert_eq!(p.headers["x-approval-attempts"], "0");
        assert!(p.headers.contains_key("x-approval-first-received-at"));
    }
    assert!(
        mock::requests(provider).await.is_empty(),
        "no provider call for bad input"
    );

    // The worker is still healthy after all of that.
    broker.publish(&decline("after-bad", &request_id())).await;
    broker.outcome("after-bad", "applied").await;
    app.stop_worker().await;
}

#[tokio::test]
async fn a_provider_without_credentials_is_disabled_and_parked() {
    let app = spawn_app(App::qonto("q-disabled", qonto::Auth::Missing)).await;
    let (broker, provider) = (&app.broker, app.qonto());

    let d = decline("dis-1", &request_id());
    broker.publish(&d).await;
    let o = broker.outcome("dis-1", "invalid").await;
    assert_eq!(o.body["error"]["kind"], "provider_disabled");
    let parked = broker.wait_parked(1).await;
    assert_eq!(parked[0].body, d.to_string().as_bytes());
    assert_eq!(
        parked[0].headers["x-approval-error-kind"],
        "provider_disabled"
    );
    assert!(mock::requests(provider).await.is_empty());
    app.stop_worker().await;
}

#[tokio::test]
async fn decisions_are_processed_concurrently() {
    let app = app("q-concurrent").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined").set_delay(Duration::from_millis(500)))
        .mount(provider)
        .await;

    for i in 0..20 {
        broker
            .publish(&decline(&format!("conc-{i}"), &request_id()))
            .await;
    }
    // Serially this would take 10 s; concurrently every call is in flight at once.
    wait_for(
        "20 calls in flight together",
        Duration::from_secs(3),
        || async {
            let n = mock::requests(provider).await.len();
            (n >= 20).then_some(())
        },
    )
    .await;
    broker.wait_outcomes(20, |o| o.status() == "applied").await;
    app.stop_worker().await;
}

#[tokio::test]
async fn the_worker_carries_on_after_its_connection_is_closed() {
    let app = app("q-conn").await;
    let (broker, provider) = (&app.broker, app.qonto());
    Mock::given(method("POST"))
        .respond_with(qonto::answer("declined"))
        .mount(provider)
        .await;
    broker.publish(&decline("before", &request_id())).await;
    broker.outcome("before", "applied").await;

    let closed = close_connections_named(&format!("approval-worker {}", broker.prefix));
    assert_eq!(closed, 1, "the worker's connection was found and closed");
    broker.publish(&decline("after", &request_id())).await;
    broker.outcome("after", "applied").await;
    app.stop_worker().await;
}

/// Qonto replays a key's cached success whatever the call names: a 200 for
/// another request is not `applied`. The worker reads the target and
/// reports what the read proves: already declined, or still pending (a
/// failure that names the other request).
#[tokio::test]
async fn a_cached_success_for_another_request_is_reconciled_not_applied() {
    let app = app("q-cached-other").await;
    let (broker, provider) = (&app.broker, app.qonto());
    let (other, declined, pending) = (request_id(), request_id(), request_id());
    Mock::given(method("POST"))
        .and(path_regex("^/v2/requests/transfers/.*/decline$"))
        .respond_with(qonto::answer_for(&other, "declined"))
        .mount(provider)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/v2/requests$"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "requests": [
                {"id": other, "request_type": "transfer", "status": "declined"},
                {"id": declined, "request_type": "transfer", "status": "declined"},
                {"id": pending, "request_type": "transfer", "status": "pending"},
            ],
            "meta": {"current_page": 1, "next_page": null},
        })))
        .mount(provider)
        .await;

    broker.publish(&decline("cached-a", &declined)).await;
    broker.publish(&decline("cached-b", &pending)).await;
    let a = broker.outcome("cached-a", "already_applied").await;
    let b = broker.outcome("cached-b", "failed").await;
    assert_eq!(a.body["provider_state"], "declined");
    assert_eq!(a.body["provider_response"]["id"], declined.as_str());
    assert_eq!(a.body["error"], Value::Null);
    assert_eq!(b.body["error"]["kind"], "rejected_by_provider");
    let message = b.body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&other) && message.contains(&pending),
        "{message}"
    );
    assert!(
        broker.outcomes().iter().all(|o| o.status() != "applied"),
        "{:#?}",
        broker.outcomes()
    );

    // One decision call each, then one filtered read each.
    let posts = mock::posts(provider).await;
    assert_eq!(posts.len(), 2);
    let reads = mock::with_method(provider, "GET").await;
    assert_eq!(reads.len(), 2);
    for read in &reads {
        assert_eq!(read.url.path(), "/v2/requests");
        assert_eq!(
            header(read, "authorization"),
            Some(format!("{LOGIN}:{SECRET_KEY}").as_str())
        );
        let query: Vec<(String, String)> = read
            .url
            .query_pairs()
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        let get = |k: &str| {
            query
                .iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("status[]"), Some("declined"));
        assert_eq!(get("request_type[]"), Some("transfer"));
        assert_eq!(get("sort_by"), Some("processed_at:desc"));
        assert_eq!(get("per_page"), Some("100"));
        assert_eq!(get("page"), Some("1"));
        assert!(get("processed_at_from").is_some(), "{query:?}");
    }
    app.stop_worker().await;
}

/// The SCA session token opens the approve: the `awaiting_confirmation`
/// event (and the one that ends the wait) never carries it.
#[tokio::test]
async fn the_sca_session_token_stays_out_of_outcome_events() {
    let app = app("q-sca-redact").await;
    let (broker, provider) = (&app.broker, app.qonto());
    let token = "sca-S3CRET-7e41";
    Mock::given(method("POST"))
        .and(path_regex("/approve$"))
        .respond_with(ResponseTemplate::new(428).set_body_json(json!({
            "errors": [{
                "code": "sca_required",
                "detail": format!("SCA required for session {token}"),
                "meta": {"sca_session_token": token},
            }],
            "sca_session_token": token,
            "sca_session_expires_at": "2099-01-01T00:00:00Z",
        })))
        .mount(provider)
        .await;
    Mock::given(method("GET"))
        .and(path_regex("^/v2/sca_sessions/"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({"result": "deny"})))
        .mount(provider)
        .await;

    broker
        .publish(&qonto::decision("sca-redact", "approve"))
        .await;
    let waiting = broker.outcome("sca-redact", "awaiting_confirmation").await;
    assert_eq!(
        waiting.body["provider_response"]["errors"][0]["code"],
        "sca_required"
    );
    broker.outcome("sca-redact", "failed").await;
    // The worker polled with the token it kept.
    let polls = mock::with_method(provider, "GET").await;
    assert_eq!(polls[0].url.path(), format!("/v2/sca_sessions/{token}"));
    for o in broker.outcomes() {
        let text = o.body.to_string();
        assert!(!text.contains(token), "{text}");
    }
    app.stop_worker().await;
}
