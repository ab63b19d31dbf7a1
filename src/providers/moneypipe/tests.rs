//! The client's contract tests (wiremock), then the simulator half's tests.

use std::time::Duration;

use serde_json::json;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use super::*;
use crate::{decision::parse, settings::Settings};

const TOKEN: &str = "mp-static-token-5e1";

async fn provider(server: &MockServer) -> Arc<dyn Client> {
    let settings = Settings::load_from(
        None,
        vec![
            (
                "APPROVAL_PROVIDERS__MONEYPIPE__BASE_URL".into(),
                format!("{}/v1", server.uri()),
            ),
            ("APPROVAL_PROVIDERS__MONEYPIPE__TOKEN".into(), TOKEN.into()),
        ],
    )
    .unwrap();
    let http = Http::new(Duration::from_secs(5), Duration::from_secs(2)).unwrap();
    build(&settings.providers, &http).unwrap().expect("enabled")
}

fn decision(action: &str, target: Value, reason: Option<&str>) -> Decision {
    let mut body = json!({
        "decision_id": "d-mp-1",
        "provider": "moneypipe",
        "action": action,
        "target": target,
    });
    if let Some(r) = reason {
        body["reason"] = json!(r);
    }
    parse(body.to_string().as_bytes()).unwrap()
}

fn ctx() -> CallContext {
    CallContext {
        idempotency_key: "idem-mp-42".into(),
        attempt: 1,
        confirmation_token: None,
    }
}

fn operation(txs: &[(&str, &str, bool)]) -> Value {
    operation_named("op-1", txs)
}

fn operation_named(id: &str, txs: &[(&str, &str, bool)]) -> Value {
    json!({"data": {
        "id": id,
        "status": "new",
        "transactions": txs.iter().map(|(id, status, linked)| json!({
            "id": id,
            "tx_id": format!("chainhash-{id}"),
            "status": status,
            "linked": linked,
            "reject_reason": if *status == "rejected" { json!("Wrong payment") } else { Value::Null },
        })).collect::<Vec<_>>(),
    }})
}

fn header<'a>(r: &'a wiremock::Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

/// Asserts the one decision call exactly: method, path, headers, body bytes.
async fn assert_one_call(server: &MockServer, verb: &str, url_path: &str, body: &str) {
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 1, "{calls:?}");
    let r = &calls[0];
    assert_eq!(r.method.as_str(), verb);
    assert_eq!(r.url.path(), url_path);
    assert_eq!(r.url.query(), None);
    assert_eq!(
        header(r, "authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    assert_eq!(header(r, "idempotency-key"), Some("idem-mp-42"));
    assert_eq!(header(r, "content-type"), Some("application/json"));
    assert_eq!(header(r, "accept"), Some("application/json"));
    assert_eq!(std::str::from_utf8(&r.body).unwrap(), body);
}

#[tokio::test]
async fn reject_sends_the_list_and_reason_and_checks_every_transaction() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/v1/operations/op-1/reject-transactions"))
        .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[
            ("tx-1", "rejected", false),
            ("tx-2", "rejected", false),
        ])))
        .mount(&server)
        .await;
    let d = decision(
        "reject",
        json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2"]}),
        Some("Wrong payment"),
    );
    let p = provider(&server).await;
    p.validate(&d).unwrap();
    let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("rejected"));
    assert_eq!(response["data"]["id"], "op-1");
    assert_one_call(
        &server,
        "PUT",
        "/v1/operations/op-1/reject-transactions",
        r#"{"tx_id":["tx-1","tx-2"],"reason":"Wrong payment"}"#,
    )
    .await;
}

#[tokio::test]
async fn approve_links_the_transactions() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .and(path("/v1/operations/op%201/link-transactions"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(operation_named("op 1", &[("tx-1", "confirmed", true)])),
        )
        .mount(&server)
        .await;
    // The operation id is percent-encoded into its segment.
    let d = decision(
        "approve",
        json!({"operation_id": "op 1", "tx_ids": ["tx-1"]}),
        None,
    );
    let p = provider(&server).await;
    p.validate(&d).unwrap();
    let Reply::Done { state, .. } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("confirmed"));
    assert_one_call(
        &server,
        "PUT",
        "/v1/operations/op%201/link-transactions",
        r#"{"tx_id":["tx-1"]}"#,
    )
    .await;
}

#[tokio::test]
async fn a_partial_batch_is_ambiguous_and_names_the_stragglers() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[
            ("tx-1", "rejected", false),
            ("tx-2", "undefined", false),
        ])))
        .mount(&server)
        .await;
    let d = decision(
        "reject",
        json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2", "tx-3"]}),
        Some("no"),
    );
    let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
    assert_eq!(
        e.message,
        "transactions tx-2 (undefined), tx-3 (not in the answer) do not show rejected"
    );
    assert!(!e.message.contains("tx-1"));
    assert_eq!(e.http_status, Some(200));

    // Approve: confirmed but not linked is not linked yet.
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[(
            "tx-9",
            "confirmed",
            false,
        )])))
        .mount(&server)
        .await;
    let d = decision(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": ["tx-9"]}),
        None,
    );
    let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
    assert_eq!(
        e.message,
        "transaction tx-9 (confirmed) does not show confirmed"
    );
}

#[tokio::test]
async fn error_bodies_of_every_shape_name_their_code() {
    let cases: Vec<(u16, Value, ErrorClass, Option<&str>, &str)> = vec![
        (
            422,
            json!({"code": 9, "message": "The tx id field is required."}),
            ErrorClass::Ambiguous,
            Some("9"),
            "MoneyPipe error 9 (Validation errors): The tx id field is required.",
        ),
        (
            404,
            json!({"error_code": 5, "error": "No such operation"}),
            ErrorClass::Permanent,
            Some("5"),
            "MoneyPipe error 5 (Operation not found): No such operation",
        ),
        (
            403,
            json!({"error": {"code": "4", "message": "Company is banned"}}),
            ErrorClass::Permanent,
            Some("4"),
            "MoneyPipe error 4 (Company banned): Company is banned",
        ),
        (
            400,
            json!({"code": 0, "message": "Something went wrong", "errors": {"tx_id": ["already rejected"]}}),
            ErrorClass::Ambiguous,
            Some("0"),
            "MoneyPipe error 0 (Something went wrong): Something went wrong (tx_id: already rejected)",
        ),
        // No code in the body: derived from the HTTP status.
        (
            415,
            json!("Unsupported Media Type"),
            ErrorClass::Permanent,
            Some("10"),
            "MoneyPipe error 10 (Unsupported Content Type)",
        ),
        (
            410,
            Value::Null,
            ErrorClass::Permanent,
            Some("1"),
            "MoneyPipe error 1 (Deprecated action)",
        ),
        (
            404,
            json!({"message": "Not found"}),
            ErrorClass::Permanent,
            None,
            "MoneyPipe answered HTTP 404 (Operation or Transaction not found): Not found",
        ),
        (
            503,
            json!({"message": "down"}),
            ErrorClass::Retryable,
            None,
            "MoneyPipe answered HTTP 503: down",
        ),
        (
            429,
            Value::Null,
            ErrorClass::Retryable,
            None,
            "MoneyPipe answered HTTP 429",
        ),
    ];
    for (status, body, class, code, message) in cases {
        let server = MockServer::start().await;
        let mut reply = ResponseTemplate::new(status);
        if !body.is_null() {
            reply = reply.set_body_json(&body);
        }
        Mock::given(method("PUT"))
            .respond_with(reply)
            .mount(&server)
            .await;
        let d = decision(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
            Some("no"),
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, class, "{status} {body}");
        assert_eq!(e.provider_code.as_deref(), code, "{status} {body}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(status));
    }
}

#[tokio::test]
async fn unauthenticated_is_an_auth_failure_without_the_token() {
    let server = MockServer::start().await;
    Mock::given(method("PUT"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"code": 2, "message": "Unauthenticated."})),
        )
        .mount(&server)
        .await;
    let d = decision(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
        None,
    );
    let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Auth);
    assert_eq!(e.provider_code.as_deref(), Some("2"));
    assert_eq!(
        e.message,
        "MoneyPipe error 2 (Unauthenticated): Unauthenticated."
    );
    assert!(!format!("{e:?}").contains(TOKEN));
    // A static token: one call, no refresh attempt.
    assert_eq!(server.received_requests().await.unwrap().len(), 1);
}

#[tokio::test]
async fn target_and_reason_rules() {
    let server = MockServer::start().await;
    let p = provider(&server).await;
    let check = |action: &str, target: Value, reason: Option<&str>| {
        p.validate(&decision(action, target, reason))
    };
    assert!(
        check(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["a"]}),
            Some("x")
        )
        .is_ok()
    );
    let many: Vec<String> = (0..100).map(|i| format!("tx-{i}")).collect();
    assert!(
        check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": many}),
            None
        )
        .is_ok()
    );

    let e = check(
        "reject",
        json!({"operation_id": "op-1", "tx_ids": ["a"]}),
        None,
    )
    .unwrap_err();
    assert!(e.contains("reason is required"), "{e}");
    let e = check(
        "reject",
        json!({"operation_id": "op-1", "tx_ids": ["a"]}),
        Some("  "),
    )
    .unwrap_err();
    assert!(e.contains("reason is required"), "{e}");
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": []}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids must hold 1..100 transaction ids, got 0");
    let too_many: Vec<String> = (0..101).map(|i| format!("tx-{i}")).collect();
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": too_many}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids must hold 1..100 transaction ids, got 101");
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": ["ok", "../x"]}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids[1] must not contain a path separator");
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": [".."]}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids[0] must not be a dot segment");
    let e = check(
        "approve",
        json!({"operation_id": "../op", "tx_ids": ["a"]}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.operation_id must not contain a path separator");
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": ["a", "a"]}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, r#"target.tx_ids lists "a" twice"#);
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": [7]}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids[0] must be a string");
    let e = check(
        "approve",
        json!({"operation_id": "op-1", "tx_ids": "a"}),
        None,
    )
    .unwrap_err();
    assert_eq!(e, "target.tx_ids must be an array of strings");
    let e = check("approve", json!({"tx_ids": ["a"]}), None).unwrap_err();
    assert_eq!(e, "missing required field target.operation_id");
    // Nothing was sent while validating.
    assert!(server.received_requests().await.unwrap().is_empty());
}

async fn read_server(txs: &[(&str, Value, bool)]) -> MockServer {
    let server = MockServer::start().await;
    for (id, status, linked) in txs {
        Mock::given(method("GET"))
            .and(path(format!("/v1/transactions/{id}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": {
                "id": id, "tx_id": "hash", "operation_id": "op-1",
                "status": status, "linked": linked, "reject_reason": null,
            }})))
            .mount(&server)
            .await;
    }
    server
}

async fn observe(server: &MockServer, action: &str, ids: &[&str]) -> Observed {
    let d = decision(
        action,
        json!({"operation_id": "op-1", "tx_ids": ids}),
        Some("no"),
    );
    provider(server).await.read_state(&d).await.unwrap()
}

#[tokio::test]
async fn read_state_reads_every_transaction() {
    let server = read_server(&[
        ("tx-1", json!("rejected"), false),
        ("tx-2", json!(4), false),
    ])
    .await;
    let o = observe(&server, "reject", &["tx-1", "tx-2"]).await;
    assert_eq!(o.verdict, Verdict::AsDecided);
    assert_eq!(o.state, "rejected");
    let calls = server.received_requests().await.unwrap();
    let mut paths: Vec<&str> = calls.iter().map(|r| r.url.path()).collect();
    paths.sort();
    assert_eq!(paths, ["/v1/transactions/tx-1", "/v1/transactions/tx-2"]);
    for r in &calls {
        assert_eq!(r.method.as_str(), "GET");
        assert_eq!(
            header(r, "authorization"),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert!(r.body.is_empty());
    }

    let server = read_server(&[
        ("tx-1", json!("confirmed"), true),
        ("tx-2", json!("undefined"), false),
    ])
    .await;
    let o = observe(&server, "approve", &["tx-1", "tx-2"]).await;
    assert_eq!(o.verdict, Verdict::Pending);
    assert_eq!(o.state, "tx-1=confirmed,tx-2=undefined");

    let server = read_server(&[
        ("tx-1", json!(2), false),
        ("tx-2", json!("rejected"), false),
    ])
    .await;
    let o = observe(&server, "approve", &["tx-1", "tx-2"]).await;
    assert_eq!(o.verdict, Verdict::Conflict);
    assert_eq!(o.state, "tx-1=undefined,tx-2=rejected");

    let server = read_server(&[("tx-1", json!(1), true)]).await;
    let o = observe(&server, "reject", &["tx-1"]).await;
    assert_eq!(o.verdict, Verdict::Conflict);
    assert_eq!(o.state, "confirmed");
}

#[tokio::test]
async fn read_state_surfaces_a_missing_transaction() {
    let server = read_server(&[("tx-1", json!("rejected"), false)]).await;
    Mock::given(method("GET"))
        .and(path("/v1/transactions/tx-2"))
        .respond_with(
            ResponseTemplate::new(404)
                .set_body_json(json!({"code": 6, "message": "Transaction not found"})),
        )
        .mount(&server)
        .await;
    let d = decision(
        "reject",
        json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2"]}),
        Some("no"),
    );
    let e = provider(&server).await.read_state(&d).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(e.provider_code.as_deref(), Some("6"));
}

/// One transaction read answering `data` as given.
async fn read_one(data: Value) -> MockServer {
    let server = MockServer::start().await;
    Mock::given(method("GET"))
        .and(path("/v1/transactions/tx-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({ "data": data })))
        .mount(&server)
        .await;
    server
}

async fn read_one_state(action: &str, data: Value) -> Result<Observed, CallError> {
    let server = read_one(data).await;
    let d = decision(
        action,
        json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
        Some("no"),
    );
    let result = provider(&server).await.read_state(&d).await;
    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].method.as_str(), "GET");
    assert_eq!(calls[0].url.path(), "/v1/transactions/tx-1");
    assert_eq!(
        header(&calls[0], "authorization"),
        Some(&*format!("Bearer {TOKEN}"))
    );
    result
}

/// A transaction in the decided state under another operation was decided
/// by someone else's call: a conflict, never `already_applied`; and one
/// still pending under another operation cannot be ours to decide.
#[tokio::test]
async fn a_transaction_of_another_operation_is_a_conflict() {
    for (action, status, linked) in [
        ("reject", "rejected", false),
        ("approve", "confirmed", true),
        ("approve", "undefined", false),
    ] {
        let o = read_one_state(
            action,
            json!({"id": "tx-1", "tx_id": "hash", "operation_id": "op-2",
                   "status": status, "linked": linked, "reject_reason": null}),
        )
        .await
        .unwrap();
        assert_eq!(o.verdict, Verdict::Conflict, "{action} {status}");
        assert_eq!(o.state, format!("{status} under operation op-2"));
        assert_eq!(o.response[0]["operation_id"], "op-2");
    }

    // Under our operation, or not yet under any (a link attaches it).
    let ours = json!({"id": "tx-1", "operation_id": "op-1", "status": "rejected", "linked": false});
    let o = read_one_state("reject", ours).await.unwrap();
    assert_eq!(
        (o.verdict, o.state.as_str()),
        (Verdict::AsDecided, "rejected")
    );
    let loose = json!({"id": "tx-1", "operation_id": null, "status": "undefined", "linked": false});
    let o = read_one_state("approve", loose).await.unwrap();
    assert_eq!(
        (o.verdict, o.state.as_str()),
        (Verdict::Pending, "undefined")
    );
}

/// What a read cannot tie to our operation and transaction proves nothing:
/// a decided transaction that names no operation, an operation or id of
/// the wrong type, an answer for another transaction.
#[tokio::test]
async fn a_read_that_cannot_be_tied_to_the_target_is_an_error() {
    let cases = [
        (
            json!({"id": "tx-1", "status": "rejected", "linked": false}),
            "MoneyPipe's transaction tx-1 shows rejected without naming its operation",
        ),
        (
            json!({"id": "tx-1", "operation_id": 7, "status": "rejected"}),
            "MoneyPipe's transaction tx-1 names its operation with a number, not a string",
        ),
        (
            json!({"id": "tx-9", "operation_id": "op-1", "status": "rejected"}),
            "MoneyPipe's read of transaction tx-1 answered for tx-9",
        ),
        (
            json!({"id": 1, "operation_id": "op-1", "status": "rejected"}),
            "MoneyPipe's read of transaction tx-1 answered for a number",
        ),
    ];
    for (data, message) in cases {
        let e = read_one_state("reject", data.clone()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{data}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(200));
    }
}

/// A 2xx to link or reject proves the decision only when it is the
/// operation we named and our transactions show the decided state in it.
#[tokio::test]
async fn a_2xx_naming_another_operation_is_not_proof() {
    let linked = |op: Value, tx_op: Value| {
        json!({"data": {
            "id": op,
            "status": "new",
            "transactions": [{"id": "tx-1", "operation_id": tx_op, "status": "confirmed", "linked": true}],
        }})
    };
    let cases = [
        (
            linked(json!("op-2"), json!("op-2")),
            "MoneyPipe answered HTTP 200 for operation op-2, not op-1",
        ),
        (
            linked(Value::Null, json!("op-1")),
            "MoneyPipe answered HTTP 200 without naming the operation (data.id)",
        ),
        (
            linked(json!(1), json!("op-1")),
            "MoneyPipe answered HTTP 200 without naming the operation (data.id)",
        ),
        (
            linked(json!("op-1"), json!("op-2")),
            "transaction tx-1 (confirmed under operation op-2) does not show confirmed",
        ),
        (
            linked(json!("op-1"), json!(5)),
            "transaction tx-1 (operation of the wrong type) does not show confirmed",
        ),
        // Other transactions only, or ours with an id of the wrong type.
        (
            json!({"data": {"id": "op-1", "transactions": [
                {"id": "tx-2", "status": "confirmed", "linked": true},
                {"id": 1, "status": "confirmed", "linked": true},
            ]}}),
            "transaction tx-1 (not in the answer) does not show confirmed",
        ),
    ];
    for (body, message) in cases {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .and(path("/v1/operations/op-1/link-transactions"))
            .respond_with(ResponseTemplate::new(200).set_body_json(&body))
            .mount(&server)
            .await;
        let d = decision(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
            None,
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{body}");
        assert_eq!(e.message, message);
        assert_eq!(e.http_status, Some(200));
        assert_eq!(e.response.as_ref(), Some(&body));
        assert_one_call(
            &server,
            "PUT",
            "/v1/operations/op-1/link-transactions",
            r#"{"tx_id":["tx-1"]}"#,
        )
        .await;
    }
}

/// Huge or malformed numbers in MoneyPipe's answers: errors, never a panic
/// and never a verdict.
#[tokio::test]
async fn huge_or_malformed_numbers_are_errors() {
    // A status that is no status code is no state (it was a conflict).
    for status in [json!(1e30), json!(-4), json!({"code": 4}), Value::Null] {
        let data = json!({"id": "tx-1", "operation_id": "op-1", "status": status});
        let e = read_one_state("reject", data).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{status}");
        assert_eq!(
            e.message,
            "MoneyPipe's transaction tx-1 shows no readable status"
        );
    }

    // Retry-After negative or absurd; error codes past any integer.
    for (retry_after, code, expected) in [
        ("-5", json!(1e30), None),
        (
            "1e30",
            json!(u64::MAX),
            Some(crate::retry::MAX_PROVIDER_DELAY),
        ),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(
                ResponseTemplate::new(429)
                    .insert_header("Retry-After", retry_after)
                    .set_body_json(json!({"code": code, "message": "slow down"})),
            )
            .mount(&server)
            .await;
        let d = decision(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
            Some("no"),
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!((e.class, e.retry_after), (ErrorClass::Retryable, expected));
    }
}

#[test]
fn missing_token_disables_and_a_bad_template_is_refused() {
    let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    let s = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
    assert!(build(&s.providers, &http).unwrap().is_none());
    let s = Settings::load_from(
        None,
        vec![
            (
                "APPROVAL_PROVIDERS__MONEYPIPE__TOKEN".to_owned(),
                "t".to_owned(),
            ),
            (
                "APPROVAL_PROVIDERS__MONEYPIPE__REJECT_PATH".to_owned(),
                "/operations/reject".to_owned(),
            ),
        ],
    )
    .unwrap();
    let e = build(&s.providers, &http).err().unwrap().to_string();
    assert!(
        e.contains("APPROVAL_PROVIDERS__MONEYPIPE__REJECT_PATH"),
        "{e}"
    );
}

/// Where MoneyPipe's status table departs from the shared one (itself pinned
/// in `http`), so any drift on either side fails here.
#[test]
fn status_table() {
    use ErrorClass::{Ambiguous, Permanent};
    let overrides = vec![
        (200, Ambiguous),
        (204, Ambiguous),
        (403, Permanent),
        (420, Permanent),
    ];
    assert_eq!(http::overrides(MoneyPipe::classify), overrides);
}

#[test]
fn the_bearer_header_is_sensitive() {
    let p = MoneyPipe {
        http: Http::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .unwrap(),
        base: Url::parse("http://x").unwrap(),
        token: SecretString::from("t"),
        reject_path: "/o/{operation_id}".to_owned(),
    };
    http::assert_sensitive(
        p.request(Method::GET, p.base.clone(), None),
        &["Authorization"],
    );
}

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use serde_json::{Value, json};

    use crate::tools::sim::testkit::{client, new_id, parts, sim};
    use crate::tools::sim::{Faults, SimHandle};

    const TOKEN: &str = "sim-moneypipe-token";

    async fn put(
        sim: &SimHandle,
        op: &str,
        action: &str,
        token: &str,
        body: Value,
    ) -> (u16, Value) {
        let url = format!("{}/operations/{op}/{action}", sim.base_url("moneypipe"));
        let request = client()
            .put(url)
            .bearer_auth(token)
            .header("Idempotency-Key", format!("{action}-{op}"))
            .json(&body);
        parts(request.send().await.unwrap()).await
    }

    #[tokio::test]
    async fn link_and_reject_succeed() {
        let sim = sim().await;
        let (op, linked, rejected) = (new_id(), new_id(), new_id());

        let (status, body) = put(
            &sim,
            &op,
            "link-transactions",
            TOKEN,
            json!({"tx_id": [linked]}),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        let tx = &body["data"]["transactions"][0];
        assert_eq!(
            (tx["status"].clone(), tx["linked"].clone()),
            (json!("confirmed"), json!(true))
        );
        assert_eq!(body["data"]["id"], op.as_str());

        let body = json!({"tx_id": [rejected], "reason": "fraud"});
        let (status, body) = put(&sim, &op, "reject-transactions", TOKEN, body).await;
        assert_eq!(status, 200, "{body}");
        let txs = body["data"]["transactions"].as_array().unwrap();
        assert_eq!(txs.len(), 2, "the operation lists all its transactions");
        let tx = txs.iter().find(|t| t["id"] == rejected.as_str()).unwrap();
        assert_eq!(
            (tx["status"].clone(), tx["reject_reason"].clone()),
            (json!("rejected"), json!("fraud"))
        );
        assert_eq!(tx["linked"], false);

        let url = format!("{}/transactions/{rejected}", sim.base_url("moneypipe"));
        let (status, body) =
            parts(client().get(url).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_eq!(status, 200);
        assert_eq!(body["data"]["status"], "rejected");
        assert_eq!(body["data"]["operation_id"], op.as_str());
        assert_eq!(body["data"]["tx_id"].as_str().unwrap().len(), 64);

        let url = format!("{}/operations/{op}", sim.base_url("moneypipe"));
        let (_, body) = parts(client().get(url).bearer_auth(TOKEN).send().await.unwrap()).await;
        assert_eq!(body["data"]["transactions"].as_array().unwrap().len(), 2);
        assert_eq!(
            sim.stats()
                .provider("moneypipe")
                .unwrap()
                .clone()
                .state_changes,
            2
        );
    }

    #[tokio::test]
    async fn auth_content_type_and_validation_errors() {
        let sim = sim().await;
        let op = new_id();
        let tx = new_id();
        let (status, body) = put(
            &sim,
            &op,
            "link-transactions",
            "wrong",
            json!({"tx_id": [tx]}),
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(body["code"], 2);

        let url = format!(
            "{}/operations/{op}/link-transactions",
            sim.base_url("moneypipe")
        );
        let response = client()
            .put(url)
            .bearer_auth(TOKEN)
            .header("Content-Type", "text/plain")
            .body(format!(r#"{{"tx_id":["{tx}"]}}"#))
            .send()
            .await
            .unwrap();
        let (status, body) = parts(response).await;
        assert_eq!((status, body["code"].clone()), (415, json!(10)));

        let (status, body) = put(
            &sim,
            &op,
            "reject-transactions",
            TOKEN,
            json!({"tx_id": [tx]}),
        )
        .await;
        assert_eq!(status, 422);
        assert_eq!(body["code"], 9);
        assert!(body["errors"]["reason"].is_array());
        let (status, _) = put(&sim, &op, "link-transactions", TOKEN, json!({"tx_id": []})).await;
        assert_eq!(status, 422);

        // A transaction belongs to the operation that first named it.
        assert_eq!(
            put(
                &sim,
                &op,
                "link-transactions",
                TOKEN,
                json!({"tx_id": [tx]})
            )
            .await
            .0,
            200
        );
        let (status, body) = put(
            &sim,
            &new_id(),
            "link-transactions",
            TOKEN,
            json!({"tx_id": [tx]}),
        )
        .await;
        assert_eq!((status, body["code"].clone()), (404, json!(6)));
    }

    #[tokio::test]
    async fn already_decided_transaction_conflicts() {
        let sim = sim().await;
        let (op, tx) = (new_id(), new_id());
        assert_eq!(
            put(
                &sim,
                &op,
                "link-transactions",
                TOKEN,
                json!({"tx_id": [tx]})
            )
            .await
            .0,
            200
        );

        let body = json!({"tx_id": [tx], "reason": "late"});
        let (status, body) = put(&sim, &op, "reject-transactions", TOKEN, body).await;
        assert_eq!(status, 422);
        assert_eq!(
            body,
            json!({"code": 9, "message": "Validation errors", "errors": {"tx_id": [format!("transaction {tx} is not pending")]}})
        );
        let stats = sim.stats().provider("moneypipe").unwrap().clone();
        assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
        assert_eq!(
            sim.target_state("moneypipe", &tx).as_deref(),
            Some("confirmed")
        );
    }

    /// MoneyPipe's codes are integers; a fault carries code 0.
    #[tokio::test]
    async fn faults_answer_in_moneypipes_error_shape() {
        let sim = sim().await;
        sim.set_faults(
            "moneypipe",
            Faults {
                down: true,
                ..Faults::default()
            },
        );
        let url = format!("{}/transactions/{}", sim.base_url("moneypipe"), new_id());
        let read = client().get(url).bearer_auth(TOKEN);
        let (status, body) = parts(read.send().await.unwrap()).await;
        assert_eq!((status, body["code"].clone()), (503, json!(0)));
        assert!(body["message"].is_string());

        sim.set_faults(
            "moneypipe",
            Faults {
                rate_limit_ratio: 1.0,
                ..Faults::default()
            },
        );
        let (op, tx) = (new_id(), new_id());
        let (status, body) = put(
            &sim,
            &op,
            "link-transactions",
            TOKEN,
            json!({"tx_id": [tx]}),
        )
        .await;
        assert_eq!((status, body["code"].clone()), (429, json!(0)));
        assert_eq!(sim.target_state("moneypipe", &tx), None);
    }

    #[tokio::test]
    async fn worker_env_names_the_credentials_the_fake_accepts() {
        crate::tools::sim::testkit::assert_worker_env(
            "moneypipe",
            "/moneypipe/v1",
            &[("TOKEN", "sim-moneypipe-token")],
        )
        .await;
    }
}
