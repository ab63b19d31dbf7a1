//! The client's contract tests (wiremock), then the simulator half's tests.

use std::sync::atomic::{AtomicU32, Ordering};

use serde_json::json;
use wiremock::{
    Mock, MockServer, Request, Respond, ResponseTemplate,
    matchers::{header, method, path, query_param},
};

use super::*;
use crate::{decision::parse, settings::Settings};

const REFERENCE: &str = "TXN-16820000-AB1C2D3E";
const CLIENT_SECRET: &str = "fx-client-secret-77";
const TOKEN_BODY: &str = r#"{"client_id":"fx-client","client_secret":"fx-client-secret-77"}"#;

fn settings(server: &MockServer) -> Settings {
    Settings::load_from(
        None,
        vec![
            (
                "APPROVAL_PROVIDERS__FLEXPAY__BASE_URL".into(),
                format!("{}/api", server.uri()),
            ),
            (
                "APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID".into(),
                "fx-client".into(),
            ),
            (
                "APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET".into(),
                CLIENT_SECRET.into(),
            ),
        ],
    )
    .unwrap()
}

fn provider(server: &MockServer) -> Arc<dyn Client> {
    let http = Http::new(Duration::from_secs(5), Duration::from_secs(2)).unwrap();
    build(&settings(server).providers, &http)
        .unwrap()
        .expect("enabled")
}

fn decision(action: &str, reference: &str, reason: Option<&str>) -> Decision {
    let mut body = json!({
        "decision_id": "d-fx-1",
        "provider": "flexpay",
        "action": action,
        "target": {"reference": reference},
    });
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    parse(body.to_string().as_bytes()).unwrap()
}

fn ctx() -> CallContext {
    CallContext {
        idempotency_key: "idem-fx-7".into(),
        attempt: 1,
        confirmation_token: None,
    }
}

fn envelope(status: &str) -> Value {
    json!({
        "success": true,
        "message": "ok",
        "errorCode": null,
        "data": {"id": "3fa85f64", "reference": REFERENCE, "status": status},
        "errors": [],
        "timestamp": "2026-11-21T10:00:00Z",
    })
}

fn oauth_token(token: &str) -> ResponseTemplate {
    ResponseTemplate::new(200)
        .set_body_json(json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}))
}

async fn mount_token(server: &MockServer, reply: impl Respond + 'static, times: Option<u64>) {
    let mock = Mock::given(method("POST"))
        .and(path("/api/v1/auth/token"))
        .respond_with(reply);
    match times {
        Some(n) => mock.up_to_n_times(n).mount(server).await,
        None => mock.mount(server).await,
    }
}

fn h<'a>(r: &'a Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

fn assert_token_call(r: &Request) {
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(r.url.path(), "/api/v1/auth/token");
    assert_eq!(h(r, "content-type"), Some("application/json"));
    assert_eq!(h(r, "authorization"), None);
    assert_eq!(h(r, "idempotency-key"), None);
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), TOKEN_BODY);
}

fn assert_reject_call(r: &Request, token: &str) {
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(
        r.url.path(),
        format!("/api/v1/transactions/{REFERENCE}/reject")
    );
    assert_eq!(r.url.query(), None);
    assert_eq!(h(r, "authorization"), Some(&*format!("Bearer {token}")));
    assert_eq!(h(r, "idempotency-key"), Some("idem-fx-7"));
    assert_eq!(h(r, "content-type"), Some("application/json"));
    assert_eq!(h(r, "accept"), Some("application/json"));
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"reason":"Wrong payment"}"#
    );
}

#[tokio::test]
async fn reject_exchanges_credentials_then_sends_the_reason() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope("REJECTED")))
        .mount(&server)
        .await;
    let d = decision("reject", REFERENCE, Some("Wrong payment"));
    let p = provider(&server);
    p.validate(&d).unwrap();
    let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("REJECTED"));
    assert_eq!(response["data"]["reference"], REFERENCE);
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 2);
    assert_token_call(&calls[0]);
    assert_reject_call(&calls[1], "jwt-a");
}

#[tokio::test]
async fn accept_with_an_envelope_token_sends_no_body() {
    let server = MockServer::start().await;
    mount_token(
        &server,
        ResponseTemplate::new(200).set_body_json(json!({
            "success": true, "message": "Token issued", "errorCode": null,
            "data": {"accessToken": "jwt-env", "tokenType": "Bearer", "expiresIn": 3600},
            "errors": [], "timestamp": "2026-11-21T10:00:00Z",
        })),
        None,
    )
    .await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/accept")))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope("COMPLETED")))
        .mount(&server)
        .await;
    let d = decision("approve", REFERENCE, None);
    let Reply::Done { state, .. } = provider(&server).apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("COMPLETED"));
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 2);
    assert_token_call(&calls[0]);
    let r = &calls[1];
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(
        r.url.path(),
        format!("/api/v1/transactions/{REFERENCE}/accept")
    );
    assert_eq!(h(r, "authorization"), Some("Bearer jwt-env"));
    assert_eq!(h(r, "idempotency-key"), Some("idem-fx-7"));
    assert_eq!(h(r, "content-type"), None);
    assert!(r.body.is_empty());
}

#[test]
fn token_answers_of_every_form() {
    let read = |v: Value| parse_token(&v).map(|(t, ttl)| (t.expose_secret().to_owned(), ttl));
    assert_eq!(
        read(json!({"access_token": "a", "expires_in": 120})),
        Some(("a".into(), Duration::from_secs(120)))
    );
    assert_eq!(
        read(json!({"success": true, "data": {"accessToken": "b", "expiresIn": "900"}})),
        Some(("b".into(), Duration::from_secs(900)))
    );
    assert_eq!(
        read(json!({"success": true, "data": {"access_token": "c", "expires_in": 60}})),
        Some(("c".into(), Duration::from_secs(60)))
    );
    // No lifetime given: the documented default of one hour.
    assert_eq!(
        read(json!({"data": {"accessToken": "d"}})),
        Some(("d".into(), DEFAULT_TOKEN_TTL))
    );
    assert_eq!(read(json!({"data": {"expiresIn": 60}})), None);
    assert_eq!(read(json!({"access_token": ""})), None);
}

#[tokio::test]
async fn concurrent_calls_share_one_token_fetch() {
    let server = MockServer::start().await;
    // Slow token answer, so every call is waiting for it at once.
    mount_token(
        &server,
        oauth_token("jwt-shared").set_delay(Duration::from_millis(200)),
        None,
    )
    .await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope("REJECTED")))
        .mount(&server)
        .await;
    let p = provider(&server);
    let d = decision("reject", REFERENCE, Some("Wrong payment"));
    let c = ctx();
    let calls = (0..6).map(|_| p.apply(&d, &c));
    for result in futures_util::future::join_all(calls).await {
        assert!(matches!(result, Ok(Reply::Done { .. })));
    }
    let calls = server.received_requests().await.unwrap();
    let tokens: Vec<_> = calls
        .iter()
        .filter(|r| r.url.path() == "/api/v1/auth/token")
        .collect();
    assert_eq!(tokens.len(), 1);
    assert_token_call(tokens[0]);
    let rejects: Vec<_> = calls
        .iter()
        .filter(|r| r.url.path() != "/api/v1/auth/token")
        .collect();
    assert_eq!(rejects.len(), 6);
    for r in rejects {
        assert_reject_call(r, "jwt-shared");
    }
}

#[tokio::test]
async fn success_false_on_a_200_is_a_failure() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("POST"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "success": false,
            "message": "Transaction cannot be rejected",
            "errorCode": "TRANSACTION_NOT_PENDING",
            "data": null,
            "errors": ["status is COMPLETED"],
            "timestamp": "2026-11-21T10:00:00Z",
        })))
        .mount(&server)
        .await;
    let d = decision("reject", REFERENCE, Some("Wrong payment"));
    let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
    assert_eq!(e.http_status, Some(200));
    assert_eq!(e.provider_code.as_deref(), Some("TRANSACTION_NOT_PENDING"));
    assert_eq!(
        e.message,
        "Transaction cannot be rejected: status is COMPLETED"
    );
}

#[tokio::test]
async fn error_statuses_map_to_classes() {
    let cases: Vec<(u16, Value, ErrorClass, &str)> = vec![
        (
            400,
            json!({"success": false, "message": "Validation failed", "errorCode": "VALIDATION_ERROR", "errors": ["reason: size must be between 0 and 500"]}),
            ErrorClass::Permanent,
            "Validation failed: reason: size must be between 0 and 500",
        ),
        (
            409,
            json!({"success": false, "message": "Transaction is not awaiting acceptance", "errorCode": "INVALID_STATE"}),
            ErrorClass::Ambiguous,
            "Transaction is not awaiting acceptance",
        ),
        (
            403,
            json!({"success": false, "message": "Not the receiving application", "errorCode": "FORBIDDEN"}),
            ErrorClass::Auth,
            "Not the receiving application",
        ),
        (
            404,
            json!({"success": false, "message": "Transaction not found", "errorCode": "NOT_FOUND"}),
            ErrorClass::Permanent,
            "Transaction not found",
        ),
        (
            503,
            Value::Null,
            ErrorClass::Retryable,
            "FlexPay answered HTTP 503",
        ),
        (
            429,
            Value::Null,
            ErrorClass::Retryable,
            "FlexPay answered HTTP 429",
        ),
    ];
    for (status, body, class, message) in cases {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        let mut reply = ResponseTemplate::new(status);
        if !body.is_null() {
            reply = reply.set_body_json(&body);
        }
        Mock::given(method("POST"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
            .respond_with(reply)
            .mount(&server)
            .await;
        let d = decision("reject", REFERENCE, Some("Wrong payment"));
        let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, class, "{status}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(status));
        assert_eq!(
            e.provider_code.as_deref(),
            body.get("errorCode").and_then(Value::as_str)
        );
    }
}

/// Answers in the order given, then repeats the last answer.
struct Sequence(Vec<ResponseTemplate>, AtomicU32);

impl Respond for Sequence {
    fn respond(&self, _: &Request) -> ResponseTemplate {
        let n = self.1.fetch_add(1, Ordering::SeqCst) as usize;
        self.0[n.min(self.0.len() - 1)].clone()
    }
}

#[tokio::test]
async fn a_401_fetches_one_new_token_and_retries_once() {
    let server = MockServer::start().await;
    mount_token(
        &server,
        Sequence(
            vec![oauth_token("jwt-old"), oauth_token("jwt-new")],
            AtomicU32::new(0),
        ),
        None,
    )
    .await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
        .and(header("authorization", "Bearer jwt-old"))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "success": false, "message": "Token expired", "errorCode": "UNAUTHORIZED",
        })))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
        .and(header("authorization", "Bearer jwt-new"))
        .respond_with(ResponseTemplate::new(200).set_body_json(envelope("REJECTED")))
        .mount(&server)
        .await;
    let p = provider(&server);
    let d = decision("reject", REFERENCE, Some("Wrong payment"));
    assert!(matches!(p.apply(&d, &ctx()).await, Ok(Reply::Done { .. })));
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 4);
    assert_token_call(&calls[0]);
    assert_reject_call(&calls[1], "jwt-old");
    assert_token_call(&calls[2]);
    assert_reject_call(&calls[3], "jwt-new");
    // The new token stays cached for the next call.
    p.apply(&d, &ctx()).await.unwrap();
    assert_eq!(server.received_requests().await.unwrap().len(), 5);
}

#[tokio::test]
async fn two_401s_are_an_auth_failure() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("POST"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
        .respond_with(ResponseTemplate::new(401).set_body_json(json!({
            "success": false, "message": "Invalid token", "errorCode": "UNAUTHORIZED",
        })))
        .mount(&server)
        .await;
    let d = decision("reject", REFERENCE, Some("Wrong payment"));
    let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Auth);
    assert_eq!(e.http_status, Some(401));
    assert_eq!(
        e.message,
        "FlexPay refused a freshly issued token: Invalid token"
    );
    assert!(!format!("{e:?}").contains(CLIENT_SECRET));
    assert!(!format!("{e:?}").contains("jwt-a"));
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 4);
    assert_token_call(&calls[0]);
    assert_reject_call(&calls[1], "jwt-a");
    assert_token_call(&calls[2]);
    assert_reject_call(&calls[3], "jwt-a");
}

#[tokio::test]
async fn refused_credentials_are_an_auth_failure() {
    let server = MockServer::start().await;
    mount_token(
        &server,
        ResponseTemplate::new(401).set_body_json(json!({
            "success": false, "message": "Invalid client credentials", "errorCode": "INVALID_CLIENT",
        })),
        None,
    )
    .await;
    let d = decision("approve", REFERENCE, None);
    let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Auth);
    assert_eq!(
        e.message,
        "FlexPay token exchange failed (HTTP 401): check CLIENT_ID and CLIENT_SECRET"
    );
    assert!(!format!("{e:?}").contains(CLIENT_SECRET));
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn target_and_reason_rules() {
    let server = MockServer::start().await;
    let p = provider(&server);
    assert!(p.validate(&decision("approve", REFERENCE, None)).is_ok());
    let at_limit = "r".repeat(500);
    assert!(
        p.validate(&decision("reject", REFERENCE, Some(&at_limit)))
            .is_ok()
    );
    let over = "é".repeat(501);
    let e = p
        .validate(&decision("reject", REFERENCE, Some(&over)))
        .unwrap_err();
    assert_eq!(e, "reason is 501 characters; flexpay accepts at most 500");
    let e = p
        .validate(&decision("reject", REFERENCE, None))
        .unwrap_err();
    assert_eq!(e, "reason is required to reject on flexpay");
    let e = p
        .validate(&decision("approve", "../admin", None))
        .unwrap_err();
    assert_eq!(e, "target.reference must not contain a path separator");
    let e = p.validate(&decision("approve", "", None)).unwrap_err();
    assert_eq!(e, "target.reference must not be empty");
    assert!(server.received_requests().await.unwrap().is_empty());
}

async fn observe(server: &MockServer, action: &str) -> Result<Observed, CallError> {
    let d = decision(action, REFERENCE, Some("no"));
    provider(server).read_state(&d).await
}

#[tokio::test]
async fn read_state_uses_the_single_read() {
    for (status, action, verdict) in [
        ("REJECTED", "reject", Verdict::AsDecided),
        ("COMPLETED", "approve", Verdict::AsDecided),
        ("AWAITING_ACCEPTANCE", "reject", Verdict::Pending),
        ("COMPLETED", "reject", Verdict::Conflict),
        ("EXPIRED", "approve", Verdict::Conflict),
    ] {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(envelope(status)))
            .mount(&server)
            .await;
        let o = observe(&server, action).await.unwrap();
        assert_eq!((o.state.as_str(), o.verdict), (status, verdict));
        assert_eq!(o.response["reference"], REFERENCE);
        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 2);
        assert_token_call(&calls[0]);
        let r = &calls[1];
        assert_eq!(r.method.as_str(), "GET");
        assert_eq!(r.url.path(), format!("/api/v1/transactions/{REFERENCE}"));
        assert_eq!(h(r, "authorization"), Some("Bearer jwt-a"));
        assert!(r.body.is_empty());
    }
}

fn pending_page(references: &[String], page: u32, last: bool) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "success": true,
        "data": {
            "content": references.iter().map(|r| json!({
                "reference": r, "status": "AWAITING_ACCEPTANCE",
            })).collect::<Vec<_>>(),
            "number": page,
            "size": PENDING_PAGE_SIZE,
            "last": last,
        },
    }))
}

#[tokio::test]
async fn read_state_falls_back_to_the_pending_list() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let others: Vec<String> = (0..100).map(|i| format!("TXN-OTHER-{i}")).collect();
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .and(query_param("page", "0"))
        .respond_with(pending_page(&others, 0, false))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .and(query_param("page", "1"))
        .respond_with(pending_page(&[REFERENCE.to_owned()], 1, true))
        .mount(&server)
        .await;
    let o = observe(&server, "reject").await.unwrap();
    assert_eq!(o.verdict, Verdict::Pending);
    assert_eq!(o.state, "AWAITING_ACCEPTANCE");
    let calls = server.received_requests().await.unwrap();
    let seen: Vec<String> = calls
        .iter()
        .map(|r| {
            format!(
                "{} {}?{}",
                r.method,
                r.url.path(),
                r.url.query().unwrap_or("")
            )
        })
        .collect();
    assert_eq!(
        seen,
        [
            "POST /api/v1/auth/token?".to_owned(),
            format!("GET /api/v1/transactions/{REFERENCE}?"),
            "GET /api/v1/transactions/pending?page=0&size=100".to_owned(),
            "GET /api/v1/transactions/pending?page=1&size=100".to_owned(),
        ]
    );
    for r in &calls[1..] {
        assert_eq!(h(r, "authorization"), Some("Bearer jwt-a"));
    }
}

#[tokio::test]
async fn the_fallback_follows_page_metadata_not_page_length() {
    // Spring Data 3.3+ form: no `last`, `totalPages` under `page`, and a
    // server that caps the page size below the 100 we ask for.
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(501))
        .mount(&server)
        .await;
    let page = |refs: Vec<String>, number: u32| {
        ResponseTemplate::new(200).set_body_json(json!({
            "success": true,
            "data": {
                "content": refs.iter().map(|r| json!({"reference": r, "status": "AWAITING_ACCEPTANCE"})).collect::<Vec<_>>(),
                "page": {"size": 20, "number": number, "totalElements": 21, "totalPages": 2},
            },
        }))
    };
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .and(query_param("page", "0"))
        .respond_with(page((0..20).map(|i| format!("TXN-{i}")).collect(), 0))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .and(query_param("page", "1"))
        .respond_with(page(vec![REFERENCE.to_owned()], 1))
        .mount(&server)
        .await;
    let o = observe(&server, "approve").await.unwrap();
    assert_eq!(o.verdict, Verdict::Pending);
    assert_eq!(server.received_requests().await.unwrap().len(), 4);
}

/// An accepted transaction leaves the pending list as surely as a rejected
/// or expired one: without the single read, absence leaves the state
/// unknown, so the read fails as one to repeat later (never a refusal the
/// worker would report `failed`, never a verdict).
#[tokio::test]
async fn absence_from_the_pending_list_leaves_the_state_unknown() {
    for (single_read, action) in [(405, "approve"), (404, "reject"), (501, "approve")] {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}")))
            .respond_with(ResponseTemplate::new(single_read))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v1/transactions/pending"))
            .respond_with(pending_page(&["TXN-OTHER".to_owned()], 0, true))
            .mount(&server)
            .await;
        let e = observe(&server, action).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Retryable, "{single_read} {action}");
        assert_eq!(
            e.message,
            format!(
                "FlexPay transaction {REFERENCE} is not in the pending list and cannot be read \
                 alone: its state is unknown (absence proves nothing)"
            )
        );
        assert_eq!(e.http_status, None);
        let calls = server.received_requests().await.unwrap();
        let seen: Vec<String> = calls
            .iter()
            .map(|r| {
                format!(
                    "{} {}?{}",
                    r.method,
                    r.url.path(),
                    r.url.query().unwrap_or("")
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                "POST /api/v1/auth/token?".to_owned(),
                format!("GET /api/v1/transactions/{REFERENCE}?"),
                "GET /api/v1/transactions/pending?page=0&size=100".to_owned(),
            ]
        );
    }
}

/// The same when the walk stops at its page bound without meeting the end.
#[tokio::test]
async fn a_pending_list_longer_than_the_walk_leaves_the_state_unknown() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    let others: Vec<String> = (0..100).map(|i| format!("TXN-OTHER-{i}")).collect();
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .respond_with(pending_page(&others, 0, false))
        .mount(&server)
        .await;
    let e = observe(&server, "approve").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable);
    assert_eq!(
        e.message,
        format!(
            "FlexPay transaction {REFERENCE} is not in the first {MAX_PENDING_PAGES} pages of the \
             pending list and cannot be read alone: its state is unknown"
        )
    );
    let pages = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path() == "/api/v1/transactions/pending")
        .count();
    assert_eq!(pages, MAX_PENDING_PAGES as usize);
}

/// A 2xx proves the decision only when its transaction is ours and shows
/// the decided state: FlexPay answering for another reference, or with
/// our reference in another state, or without naming either, is ambiguous,
/// so the worker reads the target instead of reporting `applied`.
#[tokio::test]
async fn a_200_for_another_transaction_or_state_is_not_proof() {
    let answer = |reference: Value, status: Value| {
        let mut body = envelope("REJECTED");
        body["data"]["reference"] = reference;
        body["data"]["status"] = status;
        body
    };
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "reject",
            answer(json!("TXN-16820000-OTHER999"), json!("REJECTED")),
            "FlexPay answered HTTP 200 for transaction TXN-16820000-OTHER999, not TXN-16820000-AB1C2D3E",
        ),
        (
            "reject",
            answer(json!(REFERENCE), json!("AWAITING_ACCEPTANCE")),
            "FlexPay answered HTTP 200 but transaction TXN-16820000-AB1C2D3E shows AWAITING_ACCEPTANCE, not REJECTED",
        ),
        (
            "approve",
            answer(json!(REFERENCE), json!("REJECTED")),
            "FlexPay answered HTTP 200 but transaction TXN-16820000-AB1C2D3E shows REJECTED, not COMPLETED",
        ),
        (
            "approve",
            json!({"success": true, "message": "ok", "data": null}),
            "FlexPay answered HTTP 200 without naming the transaction (data.reference)",
        ),
        (
            "approve",
            answer(json!(REFERENCE), Value::Null),
            "FlexPay answered HTTP 200 but transaction TXN-16820000-AB1C2D3E shows no status, not COMPLETED",
        ),
        // Of the wrong type: a provider error, never a match by accident.
        (
            "reject",
            answer(json!(16_820_000), json!("REJECTED")),
            "FlexPay answered HTTP 200 without naming the transaction (data.reference)",
        ),
        (
            "approve",
            answer(json!(REFERENCE), json!(1e30)),
            "FlexPay answered HTTP 200 but transaction TXN-16820000-AB1C2D3E shows no status, not COMPLETED",
        ),
    ];
    for (action, body, message) in cases {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        let verb = if action == "approve" {
            "accept"
        } else {
            "reject"
        };
        Mock::given(method("POST"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}/{verb}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(&body))
            .mount(&server)
            .await;
        let d = decision(action, REFERENCE, Some("Wrong payment"));
        let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{body}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(200));
        assert_eq!(e.response.as_ref(), Some(&body));
        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 2);
        assert_token_call(&calls[0]);
        if action == "reject" {
            assert_reject_call(&calls[1], "jwt-a");
        } else {
            assert_eq!(calls[1].method.as_str(), "POST");
            assert_eq!(
                calls[1].url.path(),
                format!("/api/v1/transactions/{REFERENCE}/accept")
            );
            assert_eq!(h(&calls[1], "idempotency-key"), Some("idem-fx-7"));
            assert!(calls[1].body.is_empty());
        }
    }
}

/// The single read proves a state only for our transaction.
#[tokio::test]
async fn a_single_read_of_another_transaction_is_no_verdict() {
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    let mut body = envelope("COMPLETED");
    body["data"]["reference"] = json!("TXN-ELSEWHERE");
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&body))
        .mount(&server)
        .await;
    let e = observe(&server, "approve").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
    assert_eq!(
        e.message,
        format!("FlexPay's read of transaction {REFERENCE} answered for TXN-ELSEWHERE")
    );
}

/// The token endpoint's error body may echo the client id or secret (or
/// hold anything a proxy puts there): none of it goes into the error, so
/// none of it reaches an outcome event, a parked header or a log line.
#[tokio::test]
async fn token_endpoint_error_bodies_are_not_echoed() {
    let echo = json!({
        "success": false,
        "message": format!("Invalid client_secret {CLIENT_SECRET} for fx-client"),
        "errorCode": "INVALID_CLIENT",
        "errors": [format!("client_id=fx-client&client_secret={CLIENT_SECRET}")],
        "timestamp": "2026-11-21T10:00:00Z",
    });
    let cases: Vec<(u16, Value, ErrorClass, &str)> = vec![
        (
            401,
            echo.clone(),
            ErrorClass::Auth,
            "FlexPay token exchange failed (HTTP 401): check CLIENT_ID and CLIENT_SECRET",
        ),
        (
            400,
            json!(format!("bad request: {TOKEN_BODY}")),
            ErrorClass::Auth,
            "FlexPay token exchange failed (HTTP 400): check CLIENT_ID and CLIENT_SECRET",
        ),
        (
            200,
            echo.clone(),
            ErrorClass::Auth,
            "FlexPay token exchange failed (HTTP 200): check CLIENT_ID and CLIENT_SECRET",
        ),
        (
            503,
            echo,
            ErrorClass::Retryable,
            "FlexPay token exchange failed (HTTP 503)",
        ),
    ];
    for (status, body, class, message) in cases {
        let server = MockServer::start().await;
        mount_token(
            &server,
            ResponseTemplate::new(status).set_body_json(&body),
            None,
        )
        .await;
        let d = decision("approve", REFERENCE, None);
        let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, class, "{status}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(status));
        assert_eq!(e.response, None, "{status}");
        assert_eq!(e.provider_code, None, "{status}");
        let debug = format!("{e:?}");
        assert!(!debug.contains(CLIENT_SECRET), "{debug}");
        assert!(!debug.contains("fx-client"), "{debug}");
        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 1, "no decision call without a token");
        assert_token_call(&calls[0]);
    }
}

/// Huge or malformed numbers in FlexPay's answers: the documented default
/// or a bounded value, an error where it matters, never a panic.
#[tokio::test]
async fn huge_or_malformed_numbers_are_handled() {
    for expires_in in [
        json!(1e30),
        json!(-5),
        json!("1e999"),
        json!(u64::MAX),
        json!([1]),
    ] {
        let server = MockServer::start().await;
        mount_token(
            &server,
            ResponseTemplate::new(200)
                .set_body_json(json!({"access_token": "jwt-n", "expires_in": expires_in})),
            None,
        )
        .await;
        Mock::given(method("POST"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}/reject")))
            .respond_with(ResponseTemplate::new(200).set_body_json(envelope("REJECTED")))
            .mount(&server)
            .await;
        let p = provider(&server);
        let d = decision("reject", REFERENCE, Some("Wrong payment"));
        assert!(
            matches!(p.apply(&d, &ctx()).await, Ok(Reply::Done { .. })),
            "{expires_in}"
        );
        // The token is kept (clamped), not fetched again per call.
        p.apply(&d, &ctx()).await.unwrap();
        assert_eq!(
            server.received_requests().await.unwrap().len(),
            3,
            "{expires_in}"
        );
    }

    // A negative or absurd Retry-After is ignored or bounded.
    for (retry_after, expected) in [
        ("-5", None),
        ("1e30", Some(crate::retry::MAX_PROVIDER_DELAY)),
    ] {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        Mock::given(method("POST"))
            .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", retry_after))
            .mount(&server)
            .await;
        let d = decision("approve", REFERENCE, None);
        let e = provider(&server).apply(&d, &ctx()).await.unwrap_err();
        assert_eq!((e.class, e.retry_after), (ErrorClass::Retryable, expected));
    }

    // Page metadata of the wrong type or size, and references that are not
    // strings, in the pending list.
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(404))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/api/v1/transactions/pending"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "success": true,
            "data": {
                "content": [{"reference": 1e30, "status": 7}, {"reference": null}],
                "totalPages": 1e30,
                "last": "no",
            },
        })))
        .mount(&server)
        .await;
    let e = observe(&server, "reject").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable, "{e}");

    // A status of the wrong type in the single read is no state.
    let server = MockServer::start().await;
    mount_token(&server, oauth_token("jwt-a"), None).await;
    let mut body = envelope("REJECTED");
    body["data"]["status"] = json!(-1e30);
    Mock::given(method("GET"))
        .and(path(format!("/api/v1/transactions/{REFERENCE}")))
        .respond_with(ResponseTemplate::new(200).set_body_json(&body))
        .mount(&server)
        .await;
    let e = observe(&server, "reject").await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
}

#[test]
fn partial_credentials_fail_naming_the_key_and_a_bad_template_is_refused() {
    let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    let load = |vars: &[(&str, &str)]| {
        Settings::load_from(
            None,
            vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
        .unwrap()
    };
    assert!(build(&load(&[]).providers, &http).unwrap().is_none());
    for (set, missing) in [
        ("CLIENT_ID", "CLIENT_SECRET"),
        ("CLIENT_SECRET", "CLIENT_ID"),
    ] {
        let s = load(&[(&format!("APPROVAL_PROVIDERS__FLEXPAY__{set}"), "x")]);
        let Err(SettingsError::Invalid { key, .. }) = build(&s.providers, &http) else {
            panic!("{set} alone must stop start-up");
        };
        assert_eq!(key, format!("APPROVAL_PROVIDERS__FLEXPAY__{missing}"));
    }
    let s = load(&[
        ("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID", "id"),
        ("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET", "secret"),
        ("APPROVAL_PROVIDERS__FLEXPAY__READ_PATH", "/v1/transactions"),
    ]);
    let e = build(&s.providers, &http).err().unwrap().to_string();
    assert!(e.contains("APPROVAL_PROVIDERS__FLEXPAY__READ_PATH"), "{e}");
}

/// Where FlexPay's status table departs from the shared one (itself pinned
/// in `http`), so any drift on either side fails here.
#[test]
fn status_table() {
    use ErrorClass::{Ambiguous, Permanent};
    let overrides = vec![(200, Ambiguous), (204, Ambiguous), (420, Permanent)];
    assert_eq!(http::overrides(FlexPay::classify), overrides);
}

#[test]
fn the_bearer_header_is_sensitive() {
    let p = FlexPay {
        http: Http::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .unwrap(),
        base: Url::parse("http://x").unwrap(),
        client_id: SecretString::from("i"),
        client_secret: SecretString::from("s"),
        read_path: "/r/{reference}".to_owned(),
        tokens: TokenCache::new(NAME, TOKEN_MARGIN),
    };
    let req = p.request(Method::GET, p.base.clone(), &SecretString::from("t"));
    http::assert_sensitive(req, &["Authorization"]);
}

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use super::super::sim;
    use serde_json::{Value, json};

    use crate::tools::sim::testkit::{client, new_id, parts, sim, sim_with};
    use crate::tools::sim::{Faults, SimConfig, SimHandle};

    async fn token(sim: &SimHandle) -> String {
        let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
        let body =
            json!({"client_id": "sim-flexpay-client", "client_secret": "sim-flexpay-secret"});
        let (status, body) = parts(client().post(url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["success"], true);
        assert_eq!(body["data"]["tokenType"], "Bearer");
        assert_eq!(body["data"]["expiresIn"], 3600);
        body["data"]["accessToken"].as_str().unwrap().to_owned()
    }

    async fn decide(
        sim: &SimHandle,
        bearer: &str,
        reference: &str,
        action: &str,
        body: Option<Value>,
    ) -> (u16, Value) {
        let url = format!(
            "{}/v1/transactions/{reference}/{action}",
            sim.base_url("flexpay")
        );
        let mut request = client()
            .post(url)
            .bearer_auth(bearer)
            .header("Idempotency-Key", new_id());
        if let Some(body) = body {
            request = request.json(&body);
        }
        parts(request.send().await.unwrap()).await
    }

    fn reference() -> String {
        format!("TXN-{}", &new_id()[..8].to_uppercase())
    }

    #[tokio::test]
    async fn accept_and_reject_succeed_in_the_envelope() {
        let sim = sim().await;
        let bearer = token(&sim).await;
        let (accepted, rejected) = (reference(), reference());

        let (status, body) = decide(&sim, &bearer, &accepted, "accept", None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["success"].clone(), body["errorCode"].clone()),
            (json!(true), Value::Null)
        );
        assert_eq!(body["data"]["status"], "COMPLETED");
        assert!(body["data"]["acceptedAt"].is_string());

        let (status, body) = decide(
            &sim,
            &bearer,
            &rejected,
            "reject",
            Some(json!({"reason": "wrong amount"})),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["data"]["status"], "REJECTED");
        assert_eq!(body["data"]["rejectionReason"], "wrong amount");

        let url = format!("{}/v1/transactions/{rejected}", sim.base_url("flexpay"));
        let (_, body) = parts(client().get(url).bearer_auth(&bearer).send().await.unwrap()).await;
        assert_eq!(body["data"]["status"], "REJECTED");
        assert_eq!(
            sim.stats()
                .provider("flexpay")
                .unwrap()
                .clone()
                .state_changes,
            2
        );
        assert_eq!(
            sim.stats()
                .provider("flexpay")
                .unwrap()
                .clone()
                .token_issued,
            1
        );
    }

    #[tokio::test]
    async fn bad_credentials_long_reason_and_conflict() {
        let sim = sim().await;
        let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
        let wrong = json!({"client_id": "sim-flexpay-client", "client_secret": "nope"});
        let (status, body) = parts(client().post(&url).json(&wrong).send().await.unwrap()).await;
        assert_eq!((status, body["success"].clone()), (401, json!(false)));
        let (status, _) = decide(&sim, "not-a-token", &reference(), "accept", None).await;
        assert_eq!(status, 401);

        let bearer = token(&sim).await;
        let r = reference();
        let long = json!({"reason": "x".repeat(501)});
        let (status, body) = decide(&sim, &bearer, &r, "reject", Some(long)).await;
        assert_eq!((status, body["success"].clone()), (400, json!(false)));
        assert_eq!(
            sim.target_state("flexpay", &r),
            None,
            "refused before reaching the target"
        );

        assert_eq!(decide(&sim, &bearer, &r, "accept", None).await.0, 200);
        let (status, body) =
            decide(&sim, &bearer, &r, "reject", Some(json!({"reason": "late"}))).await;
        assert_eq!(status, 400);
        assert_eq!(body["errorCode"], "TRANSACTION_NOT_PENDING");
        assert_eq!(body["message"], "Transaction is not awaiting acceptance");
        assert!(body["data"].is_null() && body["timestamp"].is_string());
        let stats = sim.stats().provider("flexpay").unwrap().clone();
        assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
    }

    #[tokio::test]
    async fn oauth_token_shape_and_form_body() {
        let sim = sim_with(SimConfig::default().with(sim::Options {
            oauth_token_shape: true,
            ..sim::Options::default()
        }))
        .await;
        let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
        let form = [
            ("client_id", "sim-flexpay-client"),
            ("client_secret", "sim-flexpay-secret"),
        ];
        let (status, body) = parts(client().post(url).form(&form).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            (body["token_type"].clone(), body["expires_in"].clone()),
            (json!("Bearer"), json!(3600))
        );
        let bearer = body["access_token"].as_str().unwrap();
        assert_eq!(
            decide(&sim, bearer, &reference(), "accept", None).await.0,
            200
        );
    }

    #[tokio::test]
    async fn pending_list_is_a_spring_page() {
        let sim = sim().await;
        let bearer = token(&sim).await;
        let (pending, decided) = (reference(), reference());
        let base = sim.base_url("flexpay");
        // A read creates the target pending.
        let read = client()
            .get(format!("{base}/v1/transactions/{pending}"))
            .bearer_auth(&bearer);
        assert_eq!(read.send().await.unwrap().status(), 200);
        assert_eq!(decide(&sim, &bearer, &decided, "accept", None).await.0, 200);

        let url = format!("{base}/v1/transactions/pending?page=0&size=10");
        let (status, body) =
            parts(client().get(url).bearer_auth(&bearer).send().await.unwrap()).await;
        assert_eq!(status, 200);
        let page = &body["data"];
        assert_eq!(page["totalElements"], 1);
        assert_eq!(page["content"][0]["reference"], pending.as_str());
        assert_eq!(page["content"][0]["status"], "AWAITING_ACCEPTANCE");

        let url = format!("{base}/v1/transactions/pending?size=-1");
        let (status, body) =
            parts(client().get(url).bearer_auth(&bearer).send().await.unwrap()).await;
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["errorCode"], "VALIDATION_ERROR");
    }

    /// Down answers in FlexPay's envelope; the token endpoint keeps
    /// answering unless the faults include auth.
    #[tokio::test]
    async fn down_answers_in_the_envelope_and_spares_the_token_endpoint() {
        let down = Faults {
            down: true,
            ..Faults::default()
        };
        let mut config = SimConfig::default();
        config.faults.insert("flexpay".into(), down);
        let sim = sim_with(config).await;

        let bearer = token(&sim).await;
        let (status, body) = decide(&sim, &bearer, &reference(), "accept", None).await;
        assert_eq!((status, body["success"].clone()), (503, json!(false)));
        assert_eq!(body["errorCode"], "SERVICE_UNAVAILABLE");

        sim.set_faults(
            "flexpay",
            Faults {
                include_auth: true,
                ..down
            },
        );
        let url = format!("{}/v1/auth/token", sim.base_url("flexpay"));
        let credentials =
            json!({"client_id": "sim-flexpay-client", "client_secret": "sim-flexpay-secret"});
        let response = client().post(url).json(&credentials).send().await.unwrap();
        assert_eq!(response.status(), 503);
    }

    #[tokio::test]
    async fn worker_env_names_the_credentials_the_fake_accepts() {
        crate::tools::sim::testkit::assert_worker_env(
            "flexpay",
            "/flexpay/api",
            &[
                ("CLIENT_ID", "sim-flexpay-client"),
                ("CLIENT_SECRET", "sim-flexpay-secret"),
            ],
        )
        .await;
    }
}
