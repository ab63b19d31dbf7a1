//! The client's contract tests (wiremock), then the simulator half's tests.

use std::time::Duration;

use serde_json::json;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use super::*;
use crate::{decision::parse, settings::Settings};

const API_KEY: &str = "v1-api-key-s3cr3t";

fn decision(action: &str, target: Value) -> Decision {
    parse(
        json!({
            "decision_id": "d-1",
            "provider": NAME,
            "action": action,
            "target": target,
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn ctx() -> CallContext {
    CallContext {
        idempotency_key: "idem-v1-1".into(),
        attempt: 1,
        confirmation_token: None,
    }
}

fn provider(base_url: &str) -> Arc<dyn Client> {
    let settings = Settings::load_from(
        None,
        vec![
            (
                "APPROVAL_PROVIDERS__LEDGER_V1__BASE_URL".to_owned(),
                base_url.to_owned(),
            ),
            (
                "APPROVAL_PROVIDERS__LEDGER_V1__API_KEY".to_owned(),
                API_KEY.to_owned(),
            ),
        ],
    )
    .unwrap();
    let http = Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap();
    build(&settings.providers, &http).unwrap().expect("enabled")
}

fn approve_target() -> Value {
    json!({
        "transaction_id": 42,
        "account_name": "BTC hot",
        "recipient": "tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm",
        "amount": "1432199",
    })
}

fn header<'a>(r: &'a wiremock::Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

#[tokio::test]
async fn disabled_without_an_api_key() {
    let settings = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
    let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    assert!(build(&settings.providers, &http).unwrap().is_none());
}

#[tokio::test]
async fn reject_posts_without_body_and_parses_the_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/42/reject"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": 42, "status": "REJECTED"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let d = decision("reject", json!({"transaction_id": 42}));
    p.validate(&d).unwrap();
    let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("REJECTED"));
    assert_eq!(response["id"], 42);

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 1);
    let r = &calls[0];
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(r.url.path(), "/transactions/42/reject");
    assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
    assert_eq!(header(r, "idempotency-key"), Some("idem-v1-1"));
    assert_eq!(header(r, "accept"), Some("application/json"));
    assert_eq!(header(r, "content-type"), None);
    assert!(r.body.is_empty());
}

#[tokio::test]
async fn approve_sends_the_five_creation_fields_and_counts_pending_approval_as_applied() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/42/approve"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": 42, "status": "PENDING_APPROVAL"})),
        )
        .expect(1)
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let d = decision("approve", approve_target());
    p.validate(&d).unwrap();
    let Reply::Done { state, .. } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("PENDING_APPROVAL"));

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 1);
    let r = &calls[0];
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(r.url.path(), "/transactions/42/approve");
    assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
    assert_eq!(header(r, "idempotency-key"), Some("idem-v1-1"));
    assert_eq!(header(r, "content-type"), Some("application/json"));
    assert_eq!(
        std::str::from_utf8(&r.body).unwrap(),
        r#"{"account_name":"BTC hot","recipient":"tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm","amount":"1432199","max_fees":null,"coin_fields":null}"#
    );
}

#[tokio::test]
async fn approve_passes_coin_fields_through() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/7/approve"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": 7, "status": "APPROVED"})),
        )
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let d = decision(
        "approve",
        json!({"transaction_id": 7, "account_name": "a", "recipient": "r",
               "amount": null, "max_fees": "2100", "coin_fields": {"fees_per_byte": 10}}),
    );
    p.apply(&d, &ctx()).await.unwrap();
    let calls = server.received_requests().await.unwrap();
    assert_eq!(
        std::str::from_utf8(&calls[0].body).unwrap(),
        r#"{"account_name":"a","recipient":"r","amount":null,"max_fees":"2100","coin_fields":{"fees_per_byte":10}}"#
    );
}

#[test]
fn validation_rules() {
    let p = provider("http://127.0.0.1:9");
    let check = |action: &str, target: Value| p.validate(&decision(action, target));

    assert!(check("reject", json!({"transaction_id": 1})).is_ok());
    for bad in [json!("42"), json!(4.2), json!(0), json!(-3), json!(null)] {
        let e = check("reject", json!({"transaction_id": bad})).unwrap_err();
        assert!(e.contains("transaction_id"), "{e}");
    }
    let e = check("reject", json!({})).unwrap_err();
    assert!(
        e.contains("missing required field target.transaction_id"),
        "{e}"
    );

    let mut t = approve_target();
    t.as_object_mut().unwrap().remove("account_name");
    let e = check("approve", t).unwrap_err();
    assert!(e.contains("account_name"), "{e}");

    let mut t = approve_target();
    t.as_object_mut().unwrap().remove("recipient");
    let e = check("approve", t).unwrap_err();
    assert!(e.contains("recipient"), "{e}");

    for (field, bad) in [
        ("amount", json!(100)),
        ("amount", json!("1.5")),
        ("max_fees", json!("")),
        ("coin_fields", json!([1])),
    ] {
        let mut t = approve_target();
        t[field] = bad;
        let e = check("approve", t).unwrap_err();
        assert!(e.contains(field), "{e}");
    }
}

#[tokio::test]
async fn error_bodies_give_message_name_and_status() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/42/reject"))
        .respond_with(ResponseTemplate::new(404).set_body_json(json!({
            "message": "Transaction not found",
            "name": "NotFoundError",
            "status_code": 404
        })))
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let e = p
        .apply(&decision("reject", json!({"transaction_id": 42})), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(e.message, "Transaction not found");
    assert_eq!(e.provider_code.as_deref(), Some("NotFoundError"));
    assert_eq!(e.http_status, Some(404));
    assert!(!e.message.contains(API_KEY));
}

#[tokio::test]
async fn rate_limit_420_is_retryable_after_the_asked_delay() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/1/reject"))
        .respond_with(
            ResponseTemplate::new(420)
                .insert_header("Retry-After", "7")
                .set_body_json(json!({"message": "Rate limit exceeded", "name": "RateLimit", "status_code": 420})),
        )
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/transactions/2/reject"))
        .respond_with(ResponseTemplate::new(420).insert_header("X-RateLimit-Reset", "12"))
        .mount(&server)
        .await;
    let p = provider(&server.uri());

    let e = p
        .apply(&decision("reject", json!({"transaction_id": 1})), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable);
    assert_eq!(e.http_status, Some(420));
    assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    assert_eq!(e.message, "Rate limit exceeded");

    let e = p
        .apply(&decision("reject", json!({"transaction_id": 2})), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(12)));
    assert_eq!(e.message, "provider answered HTTP 420");
}

#[tokio::test]
async fn read_state_reads_the_transaction() {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/transactions/42"))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"id": 42, "status": "SIGNED"})),
        )
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let seen = p
        .read_state(&decision("approve", approve_target()))
        .await
        .unwrap();
    assert_eq!(seen.state, "SIGNED");
    assert_eq!(seen.verdict, Verdict::AsDecided);
    let seen = p
        .read_state(&decision("reject", json!({"transaction_id": 42})))
        .await
        .unwrap();
    assert_eq!(seen.verdict, Verdict::Conflict);

    let calls = server.received_requests().await.unwrap();
    let r = &calls[0];
    assert_eq!(r.method.as_str(), "GET");
    assert_eq!(r.url.path(), "/transactions/42");
    assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
    assert!(r.body.is_empty());
}

#[test]
fn verdicts() {
    use Action::{Approve, Reject};
    for s in [
        "APPROVED",
        "SIGNED",
        "SUBMITTED",
        "BROADCASTED",
        "CONFIRMED",
    ] {
        assert_eq!(verdict(Approve, s), Verdict::AsDecided, "{s}");
        assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
    }
    for s in ["REJECTED", "ABORTED"] {
        assert_eq!(verdict(Reject, s), Verdict::AsDecided, "{s}");
        assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
    }
    // Our approval may or may not be among the recorded ones.
    assert_eq!(verdict(Approve, "PENDING_APPROVAL"), Verdict::Pending);
    assert_eq!(verdict(Reject, "PENDING_APPROVAL"), Verdict::Pending);
    for s in ["EXPIRED", "FAILED", "DROPPED", "SOMETHING_NEW"] {
        assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
        assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
    }
}

/// LedgerV1 keeps the shared status table (itself pinned in `http`).
#[test]
fn status_table() {
    assert_eq!(http::overrides(LedgerV1::classify), vec![]);
}

#[test]
fn the_api_key_header_is_sensitive() {
    let p = LedgerV1 {
        http: Http::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .unwrap(),
        base: Url::parse("http://x").unwrap(),
        api_key: SecretString::from("k"),
        user_id: None,
    };
    let req = p.request(Method::GET, p.transaction_url(1, ""));
    http::assert_sensitive(req, &["X-Ledger-API-Key"]);
}

/// The API user's id, as governance approvals name it (`user.id`).
const USER: &str = "5";

fn provider_with(base_url: &str, user_id: Option<&str>, timeout: Duration) -> Arc<dyn Client> {
    let mut vars = vec![
        (
            "APPROVAL_PROVIDERS__LEDGER_V1__BASE_URL".to_owned(),
            base_url.to_owned(),
        ),
        (
            "APPROVAL_PROVIDERS__LEDGER_V1__API_KEY".to_owned(),
            API_KEY.to_owned(),
        ),
    ];
    if let Some(user) = user_id {
        vars.push((
            "APPROVAL_PROVIDERS__LEDGER_V1__USER_ID".to_owned(),
            user.to_owned(),
        ));
    }
    let settings = Settings::load_from(None, vars).unwrap();
    let http = Http::new(timeout, timeout).unwrap();
    build(&settings.providers, &http).unwrap().expect("enabled")
}

/// A 2xx whose transaction is another one (or whose id is of the wrong
/// type or out of range), or in another status, is ambiguous: the worker
/// reads the transaction. Never a panic.
#[tokio::test]
async fn a_2xx_that_does_not_show_the_decision_applied_is_ambiguous() {
    let cases = [
        (
            "reject",
            json!({"id": 43, "status": "REJECTED"}),
            "it names transaction 43",
        ),
        (
            "reject",
            json!({"id": "42", "status": "REJECTED"}),
            r#"it names transaction "42""#,
        ),
        (
            "reject",
            json!({"id": 1e30, "status": "REJECTED"}),
            "it names transaction 1e+30",
        ),
        (
            "reject",
            json!({"id": 42.5, "status": "REJECTED"}),
            "it names transaction 42.5",
        ),
        (
            "reject",
            json!({"status": "REJECTED"}),
            "it names no transaction",
        ),
        ("reject", json!({"id": 42}), "it has no status"),
        (
            "reject",
            json!({"id": 42, "status": "APPROVED"}),
            "the transaction is APPROVED",
        ),
        (
            "reject",
            json!({"id": 42, "status": "PENDING_APPROVAL"}),
            "the transaction is PENDING_APPROVAL",
        ),
        (
            "approve",
            json!({"id": 42, "status": "REJECTED"}),
            "the transaction is REJECTED",
        ),
        (
            "approve",
            json!({"id": 41, "status": "APPROVED"}),
            "it names transaction 41",
        ),
    ];
    for (verb, answer, problem) in cases {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path(format!("/transactions/42/{verb}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer.clone()))
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let d = if verb == "approve" {
            decision("approve", approve_target())
        } else {
            decision("reject", json!({"transaction_id": 42}))
        };
        let e = p.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{verb} {answer}");
        assert!(
            e.message.contains(problem),
            "{verb} {answer}: {}",
            e.message
        );
        assert!(e.message.contains("HTTP 200"), "{}", e.message);
        assert_eq!(e.http_status, None);
        assert_eq!(e.response, Some(answer));
    }
}

fn governance(approver: u64, target: Value) -> Value {
    json!({
        "governance_steps": [{
            "approvals": [{"created_on": "2026-12-01T10:00:00Z", "type": "APPROVE", "user": {"id": approver}}],
            "approvers": [{"id": approver}, {"id": 77}],
            "group": null, "quorum": 2, "step_index": 0
        }],
        "is_complete": false,
        "request": {"id": 9, "status": "PENDING_APPROVAL", "target_id": target, "target_type": "TRANSACTION"}
    })
}

async fn mount_pending_read(server: &MockServer, last_request: Value) {
    Mock::given(method("GET"))
        .and(path("/transactions/42"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"id": 42, "status": "PENDING_APPROVAL", "last_request": last_request}),
        ))
        .mount(server)
        .await;
}

/// Issue 13 item 4a: the approve reached Ledger but its answer was lost.
/// The transaction is still pending its quorum, and its request's
/// governance status records our approval: the decision is applied, so no
/// second approve is due.
#[tokio::test]
async fn a_quorum_approval_recorded_before_a_timeout_reads_as_applied() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/transactions/42/approve"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": 42, "status": "PENDING_APPROVAL"}))
                .set_delay(Duration::from_secs(3)),
        )
        .expect(1)
        .mount(&server)
        .await;
    mount_pending_read(&server, json!(9)).await;
    Mock::given(method("GET"))
        .and(path("/requests/9/governance-status"))
        .respond_with(ResponseTemplate::new(200).set_body_json(governance(5, json!(42))))
        .mount(&server)
        .await;
    let p = provider_with(&server.uri(), Some(USER), Duration::from_secs(1));
    let d = decision("approve", approve_target());

    let e = p.apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous, "{e:?}");
    let seen = p.read_state(&d).await.unwrap();
    assert_eq!(seen.state, "PENDING_APPROVAL");
    assert_eq!(seen.verdict, Verdict::AsDecided);

    let calls = server.received_requests().await.unwrap();
    let seen: Vec<(&str, &str)> = calls
        .iter()
        .map(|r| (r.method.as_str(), r.url.path()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/transactions/42/approve"),
            ("GET", "/transactions/42"),
            ("GET", "/requests/9/governance-status"),
        ]
    );
    for r in &calls[1..] {
        assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
        assert!(r.body.is_empty());
    }
}

#[tokio::test]
async fn only_our_own_recorded_approval_counts() {
    let server = MockServer::start().await;
    mount_pending_read(&server, json!(9)).await;
    Mock::given(method("GET"))
        .and(path("/requests/9/governance-status"))
        .respond_with(ResponseTemplate::new(200).set_body_json(governance(77, json!(42))))
        .mount(&server)
        .await;
    let p = provider_with(&server.uri(), Some(USER), Duration::from_secs(5));
    let seen = p
        .read_state(&decision("approve", approve_target()))
        .await
        .unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);
    // A reject is never decided by an approval, and asks no governance.
    let seen = p
        .read_state(&decision("reject", json!({"transaction_id": 42})))
        .await
        .unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);
    // Without our user id nothing can be told to be ours: no governance read.
    let p = provider_with(&server.uri(), None, Duration::from_secs(5));
    let seen = p
        .read_state(&decision("approve", approve_target()))
        .await
        .unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);
    let governance_reads = server
        .received_requests()
        .await
        .unwrap()
        .iter()
        .filter(|r| r.url.path().starts_with("/requests/"))
        .count();
    assert_eq!(governance_reads, 1);
}

/// Issue 13 item 7: ids of the wrong type or out of range in a read are
/// errors or "cannot tell", never a panic.
#[tokio::test]
async fn malformed_ids_in_reads_are_never_panics() {
    for answer in [
        json!({"id": "42", "status": "APPROVED"}),
        json!({"id": 1e30, "status": "APPROVED"}),
        json!({"id": -42, "status": "APPROVED"}),
        json!({"status": "APPROVED"}),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/transactions/42"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer.clone()))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let e = p
            .read_state(&decision("approve", approve_target()))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{answer}");
        assert_eq!(e.response, Some(answer));
    }

    // A `last_request` that is no request id: no governance read, pending.
    for last_request in [json!(1e30), json!("9"), json!(-1), json!(null)] {
        let server = MockServer::start().await;
        mount_pending_read(&server, last_request.clone()).await;
        let p = provider_with(&server.uri(), Some(USER), Duration::from_secs(5));
        let seen = p
            .read_state(&decision("approve", approve_target()))
            .await
            .unwrap();
        assert_eq!(seen.verdict, Verdict::Pending, "{last_request}");
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    // A governance status naming another transaction is not ours.
    for target in [json!(43), json!("42"), json!(1e30)] {
        let server = MockServer::start().await;
        mount_pending_read(&server, json!(9)).await;
        Mock::given(method("GET"))
            .and(path("/requests/9/governance-status"))
            .respond_with(ResponseTemplate::new(200).set_body_json(governance(5, target.clone())))
            .mount(&server)
            .await;
        let p = provider_with(&server.uri(), Some(USER), Duration::from_secs(5));
        let e = p
            .read_state(&decision("approve", approve_target()))
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{target}");
    }
}

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use serde_json::{Value, json};

    use crate::tools::sim::testkit::{client, parts, sim};
    use crate::tools::sim::{Faults, SimHandle};

    const KEY: &str = "sim-ledger-v1-key";

    fn tx_id() -> u64 {
        rand::random::<u32>().into()
    }

    async fn post(sim: &SimHandle, path: &str, api_key: &str, body: Option<Value>) -> (u16, Value) {
        let mut request = client()
            .post(format!("{}{path}", sim.base_url("ledger_v1")))
            .header("X-Ledger-API-Key", api_key)
            .header("Idempotency-Key", path);
        if let Some(body) = body {
            request = request.json(&body);
        }
        parts(request.send().await.unwrap()).await
    }

    fn approve_body() -> Value {
        json!({"account_name": "vault-1", "recipient": "bc1qxyz", "amount": "1500", "max_fees": null, "coin_fields": null})
    }

    #[tokio::test]
    async fn reject_and_approve_succeed() {
        let sim = sim().await;
        let (rejected, approved) = (tx_id(), tx_id() + 1);

        let (status, body) =
            post(&sim, &format!("/transactions/{rejected}/reject"), KEY, None).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "REJECTED");
        assert_eq!(body["id"], rejected);

        let path = format!("/transactions/{approved}/approve");
        let (status, body) = post(&sim, &path, KEY, Some(approve_body())).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["status"], "APPROVED");
        assert_eq!(body["account_name"], "vault-1");
        assert_eq!(body["amount"], "1500");

        let url = format!("{}/transactions/{approved}", sim.base_url("ledger_v1"));
        let (status, body) = parts(
            client()
                .get(url)
                .header("X-Ledger-API-Key", KEY)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!((status, body["status"].clone()), (200, json!("APPROVED")));
        assert_eq!(
            sim.target_state("ledger_v1", &rejected.to_string())
                .as_deref(),
            Some("REJECTED")
        );
        let target = sim.target("ledger_v1", &approved.to_string()).unwrap();
        assert_eq!(target.keys, [path]);
        assert_eq!(
            sim.stats()
                .provider("ledger_v1")
                .unwrap()
                .clone()
                .state_changes,
            2
        );
    }

    #[tokio::test]
    async fn wrong_key_missing_fields_and_bad_ids_are_refused() {
        let sim = sim().await;
        let id = tx_id();
        let (status, body) = post(&sim, &format!("/transactions/{id}/reject"), "wrong", None).await;
        assert_eq!(status, 401);
        assert_eq!(body["status_code"], 401);
        assert!(body["message"].is_string() && body["name"].is_string());

        let (status, body) = post(
            &sim,
            &format!("/transactions/{id}/approve"),
            KEY,
            Some(json!({"account_name": "vault-1"})),
        )
        .await;
        assert_eq!(status, 400);
        assert_eq!(body["status_code"], 400);

        let (status, _) = post(&sim, "/transactions/abc/reject", KEY, None).await;
        assert_eq!(status, 404);
        assert_eq!(sim.target_state("ledger_v1", &id.to_string()), None);
        assert_eq!(
            sim.stats()
                .provider("ledger_v1")
                .unwrap()
                .clone()
                .state_changes,
            0
        );
    }

    #[tokio::test]
    async fn second_opposite_decision_conflicts() {
        let sim = sim().await;
        let id = tx_id();
        assert_eq!(
            post(&sim, &format!("/transactions/{id}/reject"), KEY, None)
                .await
                .0,
            200
        );

        let path = format!("/transactions/{id}/approve");
        let (status, body) = post(&sim, &path, KEY, Some(approve_body())).await;
        assert_eq!(status, 400);
        assert_eq!(
            body,
            json!({"message": "Transaction is not pending approval", "name": "InvalidTransactionStatus", "status_code": 400})
        );
        let stats = sim.stats().provider("ledger_v1").unwrap().clone();
        assert_eq!(stats.double_state_changes, 1);
        assert_eq!(
            stats.conflicting_keys, 1,
            "the helper sends the path as key"
        );
        assert_eq!(
            sim.target_state("ledger_v1", &id.to_string()).as_deref(),
            Some("REJECTED")
        );
    }

    /// Ledger v1 documents 420 (not 429) with `X-RateLimit-*` headers.
    #[tokio::test]
    async fn rate_limit_is_420_with_ratelimit_headers() {
        let sim = sim().await;
        sim.set_faults(
            "ledger_v1",
            Faults {
                rate_limit_ratio: 1.0,
                retry_after_secs: 7,
                ..Faults::default()
            },
        );
        let url = format!("{}/transactions/1/reject", sim.base_url("ledger_v1"));
        let response = client()
            .post(url)
            .header("X-Ledger-API-Key", KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 420);
        assert_eq!(response.headers()["retry-after"], "7");
        let reset: u64 = response.headers()["x-ratelimit-reset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(reset > 1_700_000_000);
        let (_, body) = parts(response).await;
        assert_eq!(
            (body["name"].clone(), body["status_code"].clone()),
            (json!("RateLimitExceeded"), json!(420))
        );
        assert_eq!(sim.target_state("ledger_v1", "1"), None);
    }

    #[tokio::test]
    async fn faults_answer_in_ledger_v1s_error_shape() {
        let sim = sim().await;
        sim.set_faults(
            "ledger_v1",
            Faults {
                down: true,
                ..Faults::default()
            },
        );
        let id = tx_id();
        let (status, body) = post(&sim, &format!("/transactions/{id}/reject"), KEY, None).await;
        assert_eq!(status, 503);
        assert_eq!(
            (body["name"].clone(), body["status_code"].clone()),
            (json!("ServiceUnavailable"), json!(503))
        );
        assert!(body["message"].is_string());
        assert_eq!(sim.target_state("ledger_v1", &id.to_string()), None);
    }

    #[tokio::test]
    async fn worker_env_names_the_credentials_the_fake_accepts() {
        crate::tools::sim::testkit::assert_worker_env(
            "ledger_v1",
            "/ledger-v1",
            &[("API_KEY", "sim-ledger-v1-key")],
        )
        .await;
    }
}
