//! The client's contract tests (wiremock), then the simulator half's tests.

use base64::{Engine as _, engine::general_purpose::URL_SAFE_NO_PAD};
use serde_json::json;
use wiremock::{
    Mock, MockServer, ResponseTemplate,
    matchers::{method, path},
};

use super::*;
use crate::{decision::parse, settings::Settings};

const WORKSPACE: &str = "ws-1";
const KEY_ID: &str = "key-id-1";
const KEY_SECRET: &str = "key-s3cr3t";
/// The API user's id, as `reviews[].userId` names it.
const USER: &str = "api-user-7";

/// A challenge as the simulator issues it: of `kind`, naming request `id`.
fn challenge_json(kind: &str, id: &str) -> String {
    format!(
        r#"{{"antireplay":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","data":{{"request_id":"{id}"}},"type":"{kind}"}}"#
    )
}

/// The challenge an action's path serves for request `id`.
fn challenge_for(verb: &str, id: &str) -> String {
    let kind = if verb == "approve" {
        "APPROVE_REQUEST"
    } else {
        "REJECT_REQUEST"
    };
    challenge_json(kind, id)
}

/// The challenge path of an action, as the defaults read it.
fn challenge_path(verb: &str, id_path: &str) -> String {
    if verb == "approve" {
        format!("/rest/requests/{id_path}/challenge")
    } else {
        format!("/rest/requests/{id_path}/challenge/reject")
    }
}

fn env(base_url: &str) -> Vec<(String, String)> {
    [
        ("APPROVAL_PROVIDERS__LEDGER_V2__BASE_URL", base_url),
        ("APPROVAL_PROVIDERS__LEDGER_V2__WORKSPACE", WORKSPACE),
        ("APPROVAL_PROVIDERS__LEDGER_V2__API_KEY_ID", KEY_ID),
        ("APPROVAL_PROVIDERS__LEDGER_V2__API_KEY_SECRET", KEY_SECRET),
        (
            "APPROVAL_PROVIDERS__LEDGER_V2__SIGNING_KEY",
            sim::DEMO_SIGNING_KEY_PEM,
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect()
}

fn http() -> Http {
    Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap()
}

fn build_with(vars: Vec<(String, String)>) -> Result<Option<Arc<dyn Client>>, SettingsError> {
    let settings = Settings::load_from(None, vars)?;
    build(&settings.providers, &http())
}

fn provider(base_url: &str) -> Arc<dyn Client> {
    build_with(env(base_url)).unwrap().expect("enabled")
}

fn decision(action: &str, request_id: &str) -> Decision {
    parse(
        json!({
            "decision_id": "d-2",
            "provider": NAME,
            "action": action,
            "target": {"request_id": request_id},
        })
        .to_string()
        .as_bytes(),
    )
    .unwrap()
}

fn ctx() -> CallContext {
    CallContext {
        idempotency_key: "idem-v2-1".into(),
        attempt: 1,
        confirmation_token: None,
    }
}

fn b64(challenge: &str) -> String {
    URL_SAFE_NO_PAD.encode(challenge)
}

fn token_answer(access: &str, refresh: &str) -> ResponseTemplate {
    ResponseTemplate::new(200).set_body_json(json!({
        "accessToken": access,
        "expiresInSeconds": 300,
        "refreshToken": refresh,
        "refreshExpiresInSeconds": 1800,
    }))
}

async fn mount_token(server: &MockServer) {
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(token_answer("at-1", "rt-1"))
        .mount(server)
        .await;
}

/// Serves request `id` its approve and its reject challenge, each on its
/// own path.
async fn mount_challenge(server: &MockServer, id: &str) {
    for verb in ["approve", "reject"] {
        Mock::given(method("GET"))
            .and(path(challenge_path(verb, &http::segment(id))))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"challenge": b64(&challenge_for(verb, id)), "id": 7})),
            )
            .mount(server)
            .await;
    }
}

/// A request object as Ledger answers it, with one review.
fn request_json(id: &str, state: &str, review_by: &str, review: &str) -> Value {
    json!({
        "type": "TRANSACTION", "id": id, "legacyId": 12, "state": state,
        "reviewSteps": [{"stageName": "Approvers", "quorum": 2}], "currentStepIndex": 0,
        "targetId": "t-1",
        "reviews": [{"stepIndex": 0, "userId": review_by, "status": review,
                     "createdAt": "2026-12-01T10:00:00Z", "updatedAt": "2026-12-01T10:00:00Z"}]
    })
}

/// Answers the decision call with request `id` in `state`, our review
/// showing the decision.
async fn mount_decision(server: &MockServer, id: &str, verb: &str, state: &str) {
    let review = if verb == "approve" {
        "APPROVED"
    } else {
        "REJECTED"
    };
    mount_answer(server, id, verb, request_json(id, state, USER, review)).await;
}

async fn mount_answer(server: &MockServer, id: &str, verb: &str, answer: Value) {
    Mock::given(method("POST"))
        .and(path(format!("/rest/requests/{}/{verb}", http::segment(id))))
        .respond_with(ResponseTemplate::new(200).set_body_json(answer))
        .mount(server)
        .await;
}

fn header<'a>(r: &'a wiremock::Request, name: &str) -> Option<&'a str> {
    r.headers.get(name).and_then(|v| v.to_str().ok())
}

fn body(r: &wiremock::Request) -> &str {
    std::str::from_utf8(&r.body).unwrap()
}

fn login_body() -> String {
    format!(r#"{{"workspace":"{WORKSPACE}","apiKeyId":"{KEY_ID}","apiKeySecret":"{KEY_SECRET}"}}"#)
}

fn assert_login(r: &wiremock::Request) {
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(r.url.path(), "/rest/auth/token");
    assert_eq!(header(r, "content-type"), Some("application/json"));
    assert_eq!(header(r, "authorization"), None);
    assert_eq!(body(r), login_body());
}

fn assert_challenge_read(r: &wiremock::Request, id_path: &str, verb: &str, bearer: &str) {
    assert_eq!(r.method.as_str(), "GET");
    assert_eq!(r.url.path(), challenge_path(verb, id_path));
    assert_eq!(
        header(r, "authorization"),
        Some(format!("Bearer {bearer}").as_str())
    );
    assert_eq!(header(r, "idempotency-key"), Some("idem-v2-1"));
    assert!(r.body.is_empty());
}

/// Checks the decision call's exact body and returns the JWS it holds.
fn assert_decision_call(r: &wiremock::Request, id_path: &str, verb: &str, bearer: &str) -> String {
    assert_eq!(r.method.as_str(), "POST");
    assert_eq!(r.url.path(), format!("/rest/requests/{id_path}/{verb}"));
    assert_eq!(
        header(r, "authorization"),
        Some(format!("Bearer {bearer}").as_str())
    );
    assert_eq!(header(r, "idempotency-key"), Some("idem-v2-1"));
    assert_eq!(header(r, "content-type"), Some("application/json"));
    let sent: Value = serde_json::from_slice(&r.body).unwrap();
    let jws = sent["data"]["signature"].as_str().unwrap().to_owned();
    assert_eq!(
        body(r),
        format!(r#"{{"data":{{"signature":"{jws}","challengeType":"API"}}}}"#)
    );
    jws
}

/// The JWS verifies with the demo key's public half, has exactly
/// PyJWT's header, and its payload is the challenge bytes unchanged.
fn assert_signed_challenge(jws_text: &str, challenge: &str) {
    let key = jws::load_signing_key(sim::DEMO_SIGNING_KEY_PEM).unwrap();
    let payload = jws::verify_jws(key.verifying_key(), jws_text).unwrap();
    assert_eq!(payload, challenge.as_bytes());
    let header = jws_text.split('.').next().unwrap();
    assert_eq!(
        URL_SAFE_NO_PAD.decode(header).unwrap(),
        br#"{"alg":"ES256","typ":"JWT"}"#
    );
    assert_eq!(jws_text.split('.').nth(1).unwrap(), b64(challenge));
}

#[tokio::test]
async fn reject_reads_the_challenge_signs_it_and_posts_the_exact_body() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    mount_challenge(&server, "r-1").await;
    mount_decision(&server, "r-1", "reject", "REJECTED").await;
    let p = provider(&server.uri());
    let d = decision("reject", "r-1");
    p.validate(&d).unwrap();
    let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("REJECTED"));
    assert_eq!(response["legacyId"], 12);

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 3);
    assert_login(&calls[0]);
    assert_challenge_read(&calls[1], "r-1", "reject", "at-1");
    let jws = assert_decision_call(&calls[2], "r-1", "reject", "at-1");
    assert_signed_challenge(&jws, &challenge_for("reject", "r-1"));
}

#[tokio::test]
async fn approve_accepts_a_data_wrapped_challenge_and_encodes_the_id() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/req%3A9%20b/challenge"))
        .respond_with(ResponseTemplate::new(200).set_body_json(
            json!({"data": {"challenge": b64(&challenge_for("approve", "req:9 b"))}}),
        ))
        .mount(&server)
        .await;
    mount_decision(&server, "req:9 b", "approve", "PENDING_APPROVAL").await;
    let p = provider(&server.uri());
    let Reply::Done { state, .. } = p
        .apply(&decision("approve", "req:9 b"), &ctx())
        .await
        .unwrap()
    else {
        panic!("expected Done");
    };
    // More quorum approvals needed: ours is recorded, so it is applied.
    assert_eq!(state.as_deref(), Some("PENDING_APPROVAL"));

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 3);
    assert_login(&calls[0]);
    assert_challenge_read(&calls[1], "req%3A9%20b", "approve", "at-1");
    let jws = assert_decision_call(&calls[2], "req%3A9%20b", "approve", "at-1");
    assert_signed_challenge(&jws, &challenge_for("approve", "req:9 b"));
}

#[tokio::test]
async fn concurrent_calls_share_one_token_fetch() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(token_answer("at-1", "rt-1").set_delay(Duration::from_millis(200)))
        .mount(&server)
        .await;
    let ids: Vec<String> = (0..6).map(|n| format!("r-{n}")).collect();
    for id in &ids {
        mount_challenge(&server, id).await;
        mount_decision(&server, id, "reject", "REJECTED").await;
    }
    let p = provider(&server.uri());
    let decisions: Vec<Decision> = ids.iter().map(|id| decision("reject", id)).collect();
    let context = ctx();
    let results =
        futures_util::future::join_all(decisions.iter().map(|d| p.apply(d, &context))).await;
    assert!(results.iter().all(Result::is_ok));

    let calls = server.received_requests().await.unwrap();
    let logins: Vec<_> = calls
        .iter()
        .filter(|r| r.url.path().starts_with("/rest/auth/"))
        .collect();
    assert_eq!(logins.len(), 1);
    assert_login(logins[0]);
    assert_eq!(calls.len(), 1 + 2 * ids.len());
    for r in calls
        .iter()
        .filter(|r| !r.url.path().starts_with("/rest/auth/"))
    {
        assert_eq!(header(r, "authorization"), Some("Bearer at-1"));
    }
}

/// Odd lifetimes (negative, far beyond an `Instant`) cost neither the token
/// nor a panic: the default or a clamped lifetime applies.
#[tokio::test]
async fn odd_token_lifetimes_still_give_a_usable_token() {
    for (access_ttl, refresh_ttl) in [(json!(-5), json!(1e20)), (json!(u64::MAX), json!("soon"))] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/rest/auth/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "accessToken": "at-1",
                "expiresInSeconds": access_ttl,
                "refreshToken": "rt-1",
                "refreshExpiresInSeconds": refresh_ttl,
            })))
            .mount(&server)
            .await;
        mount_challenge(&server, "odd-ttl").await;
        mount_decision(&server, "odd-ttl", "reject", "REJECTED").await;
        let p = provider(&server.uri());
        let result = p.apply(&decision("reject", "odd-ttl"), &ctx()).await;
        assert!(result.is_ok(), "{access_ttl} {refresh_ttl}: {result:?}");
    }
}

#[tokio::test]
async fn a_401_refreshes_the_token_once_and_repeats_the_call() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token/refresh"))
        .respond_with(token_answer("at-2", "rt-2"))
        .mount(&server)
        .await;
    mount_challenge(&server, "r-1").await;
    Mock::given(method("POST"))
        .and(path("/rest/requests/r-1/reject"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"message": "Authorization not provided", "code": "UNAUTHORIZED", "issues": []}),
        ))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_decision(&server, "r-1", "reject", "REJECTED").await;
    let p = provider(&server.uri());
    let Reply::Done { state, .. } = p.apply(&decision("reject", "r-1"), &ctx()).await.unwrap()
    else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("REJECTED"));

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 5);
    assert_login(&calls[0]);
    assert_challenge_read(&calls[1], "r-1", "reject", "at-1");
    let first = assert_decision_call(&calls[2], "r-1", "reject", "at-1");
    let refresh = &calls[3];
    assert_eq!(refresh.method.as_str(), "POST");
    assert_eq!(refresh.url.path(), "/rest/auth/token/refresh");
    assert_eq!(header(refresh, "content-type"), Some("application/json"));
    assert_eq!(header(refresh, "authorization"), None);
    assert_eq!(
        body(refresh),
        format!(r#"{{"workspace":"{WORKSPACE}","refreshToken":"rt-1"}}"#)
    );
    // The same signed answer is repeated: the 401 stopped the first call.
    let second = assert_decision_call(&calls[4], "r-1", "reject", "at-2");
    assert_eq!(first, second);
    assert_signed_challenge(&second, &challenge_for("reject", "r-1"));
}

#[tokio::test]
async fn a_refused_refresh_falls_back_to_a_login() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(token_answer("at-1", "rt-1"))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(token_answer("at-2", "rt-2"))
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token/refresh"))
        .respond_with(ResponseTemplate::new(401))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/r-1/challenge"))
        .respond_with(ResponseTemplate::new(401))
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    mount_challenge(&server, "r-1").await;
    mount_decision(&server, "r-1", "approve", "APPROVED").await;
    let p = provider(&server.uri());
    p.apply(&decision("approve", "r-1"), &ctx()).await.unwrap();

    let calls = server.received_requests().await.unwrap();
    let paths: Vec<(&str, Option<&str>)> = calls
        .iter()
        .map(|r| (r.url.path(), header(r, "authorization")))
        .collect();
    assert_eq!(
        paths,
        [
            ("/rest/auth/token", None),
            ("/rest/requests/r-1/challenge", Some("Bearer at-1")),
            ("/rest/auth/token/refresh", None),
            ("/rest/auth/token", None),
            ("/rest/requests/r-1/challenge", Some("Bearer at-2")),
            ("/rest/requests/r-1/approve", Some("Bearer at-2")),
        ]
    );
    assert_login(&calls[3]);
}

#[tokio::test]
async fn two_401s_fail_as_unauthorized() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token/refresh"))
        .respond_with(token_answer("at-2", "rt-2"))
        .mount(&server)
        .await;
    mount_challenge(&server, "r-1").await;
    Mock::given(method("POST"))
        .and(path("/rest/requests/r-1/approve"))
        .respond_with(ResponseTemplate::new(401).set_body_json(
            json!({"message": "Authorization not provided", "code": "UNAUTHORIZED"}),
        ))
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let e = p
        .apply(&decision("approve", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Auth);
    assert_eq!(e.http_status, Some(401));
    assert_eq!(e.message, "Authorization not provided");
    assert_eq!(e.provider_code.as_deref(), Some("UNAUTHORIZED"));

    let calls = server.received_requests().await.unwrap();
    let paths: Vec<&str> = calls.iter().map(|r| r.url.path()).collect();
    assert_eq!(
        paths,
        [
            "/rest/auth/token",
            "/rest/requests/r-1/challenge",
            "/rest/requests/r-1/approve",
            "/rest/auth/token/refresh",
            "/rest/requests/r-1/approve",
        ]
    );
}

#[tokio::test]
async fn error_bodies_give_message_issue_and_code() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    mount_challenge(&server, "r-1").await;
    Mock::given(method("POST"))
        .and(path("/rest/requests/r-1/reject"))
        .respond_with(ResponseTemplate::new(400).set_body_json(json!({
            "message": "Invalid input data",
            "code": "INVALID_INPUT",
            "issues": [{"message": "Request is not pending"}, {"message": "second"}]
        })))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/gone/challenge/reject"))
        .respond_with(ResponseTemplate::new(404).set_body_json(
            json!({"message": "Request not found", "code": "NOT_FOUND", "issues": []}),
        ))
        .mount(&server)
        .await;
    let p = provider(&server.uri());

    let e = p
        .apply(&decision("reject", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous);
    assert_eq!(e.message, "Invalid input data: Request is not pending");
    assert_eq!(e.provider_code.as_deref(), Some("INVALID_INPUT"));
    assert_eq!(e.http_status, Some(400));

    let e = p
        .apply(&decision("reject", "gone"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Permanent);
    assert_eq!(e.message, "Request not found");
    assert_eq!(e.provider_code.as_deref(), Some("NOT_FOUND"));
}

#[tokio::test]
async fn failing_token_calls_are_auth_or_retryable_and_never_echo_the_answer() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(
            ResponseTemplate::new(401)
                .set_body_json(json!({"message": "Invalid credentials", "code": "UNAUTHORIZED"})),
        )
        .up_to_n_times(1)
        .with_priority(1)
        .mount(&server)
        .await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(ResponseTemplate::new(503).insert_header("Retry-After", "4"))
        .mount(&server)
        .await;
    let p = provider(&server.uri());

    let e = p
        .apply(&decision("reject", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Auth);
    assert_eq!(e.http_status, Some(401));
    assert!(e.message.contains("Invalid credentials"), "{}", e.message);
    assert!(e.response.is_none());
    assert!(!e.message.contains(KEY_SECRET));
    // Remembered briefly: a call right after gets the same answer without
    // asking the token endpoint again.
    let again = p
        .apply(&decision("reject", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(again.class, ErrorClass::Auth);
    assert_eq!(server.received_requests().await.unwrap().len(), 1);

    // A fresh client meets the endpoint's second answer.
    let p = provider(&server.uri());
    let e = p
        .apply(&decision("reject", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_eq!(e.class, ErrorClass::Retryable);
    assert_eq!(e.retry_after, Some(Duration::from_secs(4)));
    // No decision call was made without a token.
    let calls = server.received_requests().await.unwrap();
    assert!(calls.iter().all(|r| r.url.path() == "/rest/auth/token"));
}

#[tokio::test]
async fn read_state_reads_the_request() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/r-1"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(json!({"id": "r-1", "state": "APPROVED", "reviews": []})),
        )
        .mount(&server)
        .await;
    let p = provider(&server.uri());
    let seen = p.read_state(&decision("approve", "r-1")).await.unwrap();
    assert_eq!(seen.state, "APPROVED");
    assert_eq!(seen.verdict, Verdict::AsDecided);
    let seen = p.read_state(&decision("reject", "r-1")).await.unwrap();
    assert_eq!(seen.verdict, Verdict::Conflict);

    let calls = server.received_requests().await.unwrap();
    assert_eq!(calls.len(), 3);
    assert_login(&calls[0]);
    let r = &calls[1];
    assert_eq!(r.method.as_str(), "GET");
    assert_eq!(r.url.path(), "/rest/requests/r-1");
    assert_eq!(header(r, "authorization"), Some("Bearer at-1"));
    assert!(r.body.is_empty());
}

#[test]
fn verdicts() {
    use Action::{Approve, Reject};
    for s in [
        "INITIAL",
        "PENDING",
        "PENDING_APPROVAL",
        "PENDING_FIRST_APPROVAL",
    ] {
        assert_eq!(verdict(Approve, s, false), Verdict::Pending, "{s}");
        assert_eq!(verdict(Reject, s, false), Verdict::Pending, "{s}");
        // Our approval recorded while the quorum is incomplete.
        assert_eq!(verdict(Approve, s, true), Verdict::AsDecided, "{s}");
        assert_eq!(verdict(Reject, s, true), Verdict::Pending, "{s}");
    }
    for s in ["APPROVED", "SIGNED", "SUBMITTED"] {
        assert_eq!(verdict(Approve, s, false), Verdict::AsDecided, "{s}");
        assert_eq!(verdict(Reject, s, false), Verdict::Conflict, "{s}");
    }
    for s in ["REJECTED", "ABORTED"] {
        assert_eq!(verdict(Reject, s, false), Verdict::AsDecided, "{s}");
        assert_eq!(verdict(Approve, s, false), Verdict::Conflict, "{s}");
    }
    for s in ["EXPIRED", "BLOCKED"] {
        assert_eq!(verdict(Approve, s, false), Verdict::Conflict, "{s}");
        assert_eq!(verdict(Reject, s, false), Verdict::Conflict, "{s}");
    }
}

#[test]
fn request_id_must_be_a_path_segment() {
    let p = provider("http://127.0.0.1:9");
    assert!(p.validate(&decision("approve", "r-1")).is_ok());
    let e = p.validate(&decision("approve", "../admin")).unwrap_err();
    assert!(e.contains("request_id"), "{e}");
    let e = p.validate(&decision("approve", "")).unwrap_err();
    assert!(e.contains("request_id"), "{e}");
}

#[test]
fn a_bad_signing_key_is_a_settings_error_without_the_key() {
    for bad in [
        "-----BEGIN EC PRIVATE KEY-----\nTk9UQUtFWXNlY3JldEJ5dGVz\n-----END EC PRIVATE KEY-----\n",
        "NOTAKEYsecretBytes",
    ] {
        let mut vars = env("http://127.0.0.1:9");
        vars.retain(|(k, _)| !k.ends_with("SIGNING_KEY"));
        vars.push((
            "APPROVAL_PROVIDERS__LEDGER_V2__SIGNING_KEY".into(),
            bad.into(),
        ));
        let Err(err) = build_with(vars) else {
            panic!("a bad key must not build");
        };
        let text = err.to_string();
        assert!(
            text.contains("APPROVAL_PROVIDERS__LEDGER_V2__SIGNING_KEY"),
            "{text}"
        );
        assert!(!text.contains("Tk9UQUtFWXNlY3JldEJ5dGVz"), "{text}");
        assert!(!text.contains("NOTAKEYsecretBytes"), "{text}");
    }
}

#[test]
fn partial_credentials_fail_naming_the_key_and_the_challenge_path_is_checked() {
    for missing in ["WORKSPACE", "API_KEY_ID", "API_KEY_SECRET", "SIGNING_KEY"] {
        let mut vars = env("http://127.0.0.1:9");
        let key = format!("APPROVAL_PROVIDERS__LEDGER_V2__{missing}");
        vars.retain(|(k, _)| *k != key);
        match build_with(vars) {
            Err(SettingsError::Invalid {
                key: named,
                problem,
            }) => {
                assert_eq!(named, key);
                assert!(problem.contains(&key), "{problem}");
            }
            other => panic!(
                "{missing}: expected an error naming {key}, got {:?}",
                other.map(|p| p.is_some())
            ),
        }
    }
    let mut vars = env("http://127.0.0.1:9");
    vars.retain(|(k, _)| k.ends_with("__BASE_URL"));
    assert!(
        build_with(vars).unwrap().is_none(),
        "no credentials disable"
    );
    let mut vars = env("http://127.0.0.1:9");
    vars.push((
        "APPROVAL_PROVIDERS__LEDGER_V2__CHALLENGE_PATH".into(),
        "/rest/requests/challenge".into(),
    ));
    let Err(err) = build_with(vars) else {
        panic!("a template without {{request_id}} must not build");
    };
    assert!(
        err.to_string()
            .contains("APPROVAL_PROVIDERS__LEDGER_V2__CHALLENGE_PATH")
    );
}

/// LedgerV2 keeps the shared status table (itself pinned in `http`).
#[test]
fn status_table() {
    assert_eq!(http::overrides(LedgerV2::classify), vec![]);
}

#[test]
fn the_bearer_header_is_sensitive() {
    let p = LedgerV2 {
        http: Http::new(
            std::time::Duration::from_secs(1),
            std::time::Duration::from_secs(1),
        )
        .unwrap(),
        base: Url::parse("http://x").unwrap(),
        challenge_path: "/c/{request_id}".to_owned(),
        reject_challenge_path: "/c/{request_id}/reject".to_owned(),
        user_id: None,
        workspace: "w".to_owned(),
        api_key_id: SecretString::from("i"),
        api_key_secret: SecretString::from("s"),
        signing_key: jws::load_signing_key(sim::DEMO_SIGNING_KEY_PEM).unwrap(),
        tokens: TokenCache::new(NAME, TOKEN_MARGIN),
    };
    let req = p.request(Method::GET, p.url("/r"), &SecretString::from("t"));
    http::assert_sensitive(req, &["Authorization"]);
}

fn env_with(base_url: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut vars = env(base_url);
    vars.extend(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    vars
}

fn provider_as_user(base_url: &str) -> Arc<dyn Client> {
    let vars = env_with(
        base_url,
        &[("APPROVAL_PROVIDERS__LEDGER_V2__USER_ID", USER)],
    );
    build_with(vars).unwrap().expect("enabled")
}

/// Serves `challenge` (plain JSON text, encoded here) on `at`.
async fn serve_challenge(server: &MockServer, at: &str, challenge: &str) {
    Mock::given(method("GET"))
        .and(path(at))
        .respond_with(
            ResponseTemplate::new(200).set_body_json(json!({"challenge": b64(challenge), "id": 7})),
        )
        .mount(server)
        .await;
}

/// Nothing signed, nothing sent: the token and the one challenge read are
/// the only calls, and the error is a challenge mismatch.
async fn assert_not_signed(server: &MockServer, e: &CallError, challenge_at: &str) {
    assert_eq!(e.class, ErrorClass::ChallengeMismatch, "{e:?}");
    assert_eq!(e.http_status, None);
    let calls = server.received_requests().await.unwrap();
    let seen: Vec<(&str, &str)> = calls
        .iter()
        .map(|r| (r.method.as_str(), r.url.path()))
        .collect();
    assert_eq!(
        seen,
        [("POST", "/rest/auth/token"), ("GET", challenge_at)],
        "no signing call, no decision call"
    );
    assert_login(&calls[0]);
    assert_eq!(header(&calls[1], "authorization"), Some("Bearer at-1"));
    assert!(calls[1].body.is_empty());
}

#[tokio::test]
async fn a_reject_never_signs_an_approve_challenge() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    // A mix-up serves the approve challenge where the reject one is read.
    let at = "/rest/requests/r-1/challenge/reject";
    serve_challenge(&server, at, &challenge_json("APPROVE_REQUEST", "r-1")).await;
    mount_decision(&server, "r-1", "reject", "REJECTED").await;
    mount_decision(&server, "r-1", "approve", "APPROVED").await;
    let p = provider(&server.uri());
    let e = p
        .apply(&decision("reject", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert!(
        e.message
            .contains("its type APPROVE_REQUEST is not a challenge to reject"),
        "{}",
        e.message
    );
    assert_not_signed(&server, &e, at).await;
}

#[tokio::test]
async fn an_approve_never_signs_a_reject_challenge() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    let at = "/rest/requests/r-1/challenge";
    serve_challenge(&server, at, &challenge_json("REJECT_REQUEST", "r-1")).await;
    mount_decision(&server, "r-1", "approve", "APPROVED").await;
    let p = provider(&server.uri());
    let e = p
        .apply(&decision("approve", "r-1"), &ctx())
        .await
        .unwrap_err();
    assert_not_signed(&server, &e, at).await;
}

#[tokio::test]
async fn a_challenge_for_another_request_is_never_signed() {
    for named in [
        r#""data":{"request_id":"r-2"}"#,
        r#""requestId":"r-2""#,
        r#""data":{"requestId":12}"#,
    ] {
        let server = MockServer::start().await;
        mount_token(&server).await;
        let at = "/rest/requests/r-1/challenge";
        let challenge = format!(r#"{{"antireplay":"00ff",{named},"type":"APPROVE_REQUEST"}}"#);
        serve_challenge(&server, at, &challenge).await;
        mount_decision(&server, "r-1", "approve", "APPROVED").await;
        let p = provider(&server.uri());
        let e = p
            .apply(&decision("approve", "r-1"), &ctx())
            .await
            .unwrap_err();
        assert!(e.message.contains("it is for request"), "{}", e.message);
        assert_not_signed(&server, &e, at).await;
    }
}

#[tokio::test]
async fn a_challenge_that_cannot_be_checked_is_never_signed() {
    for challenge in [
        "not json at all",
        r#"{"antireplay":"00ff","data":{}}"#,
        r#"{"type":42}"#,
        "[1,2]",
    ] {
        let server = MockServer::start().await;
        mount_token(&server).await;
        let at = "/rest/requests/r-1/challenge/reject";
        serve_challenge(&server, at, challenge).await;
        mount_decision(&server, "r-1", "reject", "REJECTED").await;
        let p = provider(&server.uri());
        let e = p
            .apply(&decision("reject", "r-1"), &ctx())
            .await
            .unwrap_err();
        assert_not_signed(&server, &e, at).await;
    }
}

#[tokio::test]
async fn the_reject_challenge_path_is_a_setting() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    let at = "/rest/v1compat/r-1/reject-challenge";
    serve_challenge(&server, at, &challenge_for("reject", "r-1")).await;
    mount_decision(&server, "r-1", "reject", "REJECTED").await;
    let vars = env_with(
        &server.uri(),
        &[(
            "APPROVAL_PROVIDERS__LEDGER_V2__REJECT_CHALLENGE_PATH",
            "/rest/v1compat/{request_id}/reject-challenge",
        )],
    );
    let p = build_with(vars).unwrap().unwrap();
    p.apply(&decision("reject", "r-1"), &ctx()).await.unwrap();
    let calls = server.received_requests().await.unwrap();
    let paths: Vec<&str> = calls.iter().map(|r| r.url.path()).collect();
    assert_eq!(paths, ["/rest/auth/token", at, "/rest/requests/r-1/reject"]);
    let jws = assert_decision_call(&calls[2], "r-1", "reject", "at-1");
    assert_signed_challenge(&jws, &challenge_for("reject", "r-1"));

    let vars = env_with(
        "http://127.0.0.1:9",
        &[(
            "APPROVAL_PROVIDERS__LEDGER_V2__REJECT_CHALLENGE_PATH",
            "/rest/reject-challenge",
        )],
    );
    let Err(err) = build_with(vars) else {
        panic!("a template without {{request_id}} must not build");
    };
    assert!(
        err.to_string()
            .contains("APPROVAL_PROVIDERS__LEDGER_V2__REJECT_CHALLENGE_PATH"),
        "{err}"
    );
}

/// A 2xx whose answer is about another request, in another state, or
/// without our approval is ambiguous (the worker reads the request), and
/// never a panic whatever the type of its fields.
#[tokio::test]
async fn a_2xx_that_does_not_show_the_decision_applied_is_ambiguous() {
    let cases = [
        (
            "reject",
            request_json("r-2", "REJECTED", USER, "REJECTED"),
            "it names request r-2",
        ),
        (
            "reject",
            json!({"id": 12, "state": "REJECTED"}),
            "its id is not a string (12)",
        ),
        (
            "reject",
            json!({"id": 1e30, "state": "REJECTED"}),
            "its id is not a string",
        ),
        (
            "reject",
            json!({"state": "REJECTED"}),
            "it names no request",
        ),
        (
            "reject",
            request_json("r-1", "APPROVED", USER, "APPROVED"),
            "the request is APPROVED",
        ),
        (
            "reject",
            json!({"id": "r-1", "state": 7}),
            "it has no state",
        ),
        (
            "approve",
            request_json("r-1", "REJECTED", USER, "REJECTED"),
            "the request is REJECTED",
        ),
        (
            "approve",
            request_json("r-1", "PENDING_APPROVAL", USER, "PENDING"),
            "the request is PENDING_APPROVAL without our approval among its reviews",
        ),
        (
            "approve",
            request_json("r-1", "PENDING_APPROVAL", "someone-else", "APPROVED"),
            "without our approval",
        ),
        (
            "approve",
            json!({"id": "r-1", "state": "PENDING_APPROVAL", "reviews": [{"userId": 1e30, "status": "APPROVED"}]}),
            "without our approval",
        ),
    ];
    for (verb, answer, problem) in cases {
        let server = MockServer::start().await;
        mount_token(&server).await;
        mount_challenge(&server, "r-1").await;
        mount_answer(&server, "r-1", verb, answer.clone()).await;
        let p = provider_as_user(&server.uri());
        let e = p.apply(&decision(verb, "r-1"), &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{verb} {answer}");
        assert!(
            e.message.contains(problem),
            "{verb} {answer}: {}",
            e.message
        );
        assert!(e.message.contains("HTTP 200"), "{}", e.message);
        // Not a refusal by the provider: if the read shows the request still
        // pending, the worker may try again.
        assert_eq!(e.http_status, None);
        assert_eq!(e.response, Some(answer));
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }
}

#[tokio::test]
async fn a_pending_answer_with_our_approval_recorded_is_applied() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    mount_challenge(&server, "r-1").await;
    mount_decision(&server, "r-1", "approve", "PENDING_APPROVAL").await;
    let p = provider_as_user(&server.uri());
    let Reply::Done { state, .. } = p.apply(&decision("approve", "r-1"), &ctx()).await.unwrap()
    else {
        panic!("expected Done");
    };
    assert_eq!(state.as_deref(), Some("PENDING_APPROVAL"));
}

/// Issue 13 item 4a: the approve reached Ledger but its answer was lost.
/// The read shows the request still pending a quorum, with our approval
/// recorded: that is the decision applied, so no second approve is due.
#[tokio::test]
async fn a_quorum_approval_recorded_before_a_timeout_reads_as_applied() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    mount_challenge(&server, "r-1").await;
    Mock::given(method("POST"))
        .and(path("/rest/requests/r-1/approve"))
        .respond_with(
            ResponseTemplate::new(200)
                .set_body_json(request_json("r-1", "PENDING_APPROVAL", USER, "APPROVED"))
                .set_delay(Duration::from_secs(3)),
        )
        .expect(1)
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/r-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(request_json(
            "r-1",
            "PENDING_APPROVAL",
            USER,
            "APPROVED",
        )))
        .mount(&server)
        .await;
    let settings = Settings::load_from(
        None,
        env_with(
            &server.uri(),
            &[("APPROVAL_PROVIDERS__LEDGER_V2__USER_ID", USER)],
        ),
    )
    .unwrap();
    let impatient = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
    let p = build(&settings.providers, &impatient).unwrap().unwrap();
    let d = decision("approve", "r-1");

    let e = p.apply(&d, &ctx()).await.unwrap_err();
    assert_eq!(e.class, ErrorClass::Ambiguous, "{e:?}");
    let seen = p.read_state(&d).await.unwrap();
    assert_eq!(seen.state, "PENDING_APPROVAL");
    assert_eq!(seen.verdict, Verdict::AsDecided);
    // Our approval does not make a reject decided.
    let seen = p.read_state(&decision("reject", "r-1")).await.unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);

    let calls = server.received_requests().await.unwrap();
    let seen: Vec<(&str, &str)> = calls
        .iter()
        .map(|r| (r.method.as_str(), r.url.path()))
        .collect();
    assert_eq!(
        seen,
        [
            ("POST", "/rest/auth/token"),
            ("GET", "/rest/requests/r-1/challenge"),
            ("POST", "/rest/requests/r-1/approve"),
            ("GET", "/rest/requests/r-1"),
            ("GET", "/rest/requests/r-1"),
        ]
    );
}

#[tokio::test]
async fn a_read_counts_only_our_own_recorded_approval() {
    let server = MockServer::start().await;
    mount_token(&server).await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/r-1"))
        .respond_with(ResponseTemplate::new(200).set_body_json(request_json(
            "r-1",
            "PENDING_APPROVAL",
            "someone-else",
            "APPROVED",
        )))
        .mount(&server)
        .await;
    Mock::given(method("GET"))
        .and(path("/rest/requests/r-2"))
        .respond_with(ResponseTemplate::new(200).set_body_json(request_json(
            "r-2",
            "PENDING_APPROVAL",
            USER,
            "APPROVED",
        )))
        .mount(&server)
        .await;
    let p = provider_as_user(&server.uri());
    let seen = p.read_state(&decision("approve", "r-1")).await.unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);
    // Without our user id, no recorded approval can be told to be ours.
    let p = provider(&server.uri());
    let seen = p.read_state(&decision("approve", "r-2")).await.unwrap();
    assert_eq!(seen.verdict, Verdict::Pending);
}

/// A read about another request (or with an id of the wrong type) is not
/// our request's state: ambiguous, never a panic.
#[tokio::test]
async fn a_read_of_another_request_is_ambiguous() {
    for answer in [
        json!({"id": "r-2", "state": "APPROVED"}),
        json!({"id": 12, "state": "APPROVED"}),
        json!({"id": 1e30, "state": "APPROVED"}),
        json!({"state": "APPROVED"}),
        json!({"id": "r-1", "state": ["APPROVED"]}),
    ] {
        let server = MockServer::start().await;
        mount_token(&server).await;
        Mock::given(method("GET"))
            .and(path("/rest/requests/r-1"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer.clone()))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let e = p.read_state(&decision("approve", "r-1")).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous, "{answer}");
        assert_eq!(e.response, Some(answer));
    }
}

/// Issue 13 item 7: a token answer with a huge lifetime or a token of the
/// wrong type is handled, never a panic.
#[tokio::test]
async fn malformed_token_answers_are_errors_or_clamped_never_panics() {
    let server = MockServer::start().await;
    Mock::given(method("POST"))
        .and(path("/rest/auth/token"))
        .respond_with(ResponseTemplate::new(200).set_body_json(json!({
            "accessToken": "at-1",
            "expiresInSeconds": 1e30,
            "refreshToken": "rt-1",
            "refreshExpiresInSeconds": 1e308,
        })))
        .mount(&server)
        .await;
    mount_challenge(&server, "r-1").await;
    mount_decision(&server, "r-1", "reject", "REJECTED").await;
    let p = provider(&server.uri());
    p.apply(&decision("reject", "r-1"), &ctx()).await.unwrap();

    for answer in [
        json!({"accessToken": 12345, "expiresInSeconds": 300}),
        json!({"accessToken": null}),
        json!({"expiresInSeconds": 300}),
        json!(["at-1"]),
    ] {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/rest/auth/token"))
            .respond_with(ResponseTemplate::new(200).set_body_json(answer.clone()))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let e = p
            .apply(&decision("reject", "r-1"), &ctx())
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Retryable, "{answer}");
        assert_eq!(e.message, "ledger_v2 token answer has no accessToken");
        assert!(e.response.is_none());
        let calls = server.received_requests().await.unwrap();
        assert!(calls.iter().all(|r| r.url.path() == "/rest/auth/token"));
    }
}

/// The simulator half, driven over HTTP like the worker drives it.
mod simulator {
    use super::super::sim;
    use std::time::Duration;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use serde_json::{Value, json};

    use super::super::sim::DEMO_SIGNING_KEY_PEM;
    // The client's signer, only to produce signatures for the fake to check.
    use crate::providers::ledger_v2::jws::{load_signing_key, sign_challenge};
    use crate::tools::sim::testkit::{client, new_id, parts, sim, sim_with};
    use crate::tools::sim::{SimConfig, SimHandle};

    async fn token(sim: &SimHandle) -> Value {
        let url = format!("{}/rest/auth/token", sim.base_url("ledger_v2"));
        let body = json!({"workspace": "sim-workspace", "apiKeyId": "sim-key-id", "apiKeySecret": "sim-key-secret"});
        let (status, body) = parts(client().post(url).json(&body).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        body
    }

    async fn access_token(sim: &SimHandle) -> String {
        token(sim).await["accessToken"].as_str().unwrap().to_owned()
    }

    /// The challenge for `action` on request `id`, read where the sim
    /// serves that action's challenge.
    async fn challenge(sim: &SimHandle, bearer: &str, id: &str, action: &str) -> String {
        let suffix = if action == "approve" {
            "challenge"
        } else {
            "challenge/reject"
        };
        let url = format!("{}/rest/requests/{id}/{suffix}", sim.base_url("ledger_v2"));
        let (status, body) =
            parts(client().get(url).bearer_auth(bearer).send().await.unwrap()).await;
        assert_eq!(status, 200, "{body}");
        body["challenge"].as_str().unwrap().to_owned()
    }

    async fn decide(
        sim: &SimHandle,
        bearer: &str,
        id: &str,
        action: &str,
        signature: &str,
    ) -> (u16, Value) {
        let url = format!("{}/rest/requests/{id}/{action}", sim.base_url("ledger_v2"));
        let body = json!({"data": {"signature": signature, "challengeType": "API"}});
        let request = client()
            .post(url)
            .bearer_auth(bearer)
            .header("Idempotency-Key", format!("{action}-{id}"))
            .json(&body);
        parts(request.send().await.unwrap()).await
    }

    /// The fake's own reading of the JWS format, against signatures made by
    /// the client's signer.
    #[test]
    fn the_fake_checks_es256_compact_jws_on_its_own() {
        let key = load_signing_key(DEMO_SIGNING_KEY_PEM).unwrap();
        let trusted = sim::public_key(DEMO_SIGNING_KEY_PEM).unwrap();
        assert_eq!(&trusted, key.verifying_key());
        let challenge = br#"{"antireplay":"00ff","type":"APPROVE_REQUEST"}"#;
        let jws = sign_challenge(&key, &URL_SAFE_NO_PAD.encode(challenge)).unwrap();
        assert_eq!(
            sim::signed_payload(Some(&trusted), &jws).as_deref(),
            Some(&challenge[..])
        );

        let segments: Vec<&str> = jws.split('.').collect();
        let mut tampered = challenge.to_vec();
        tampered[3] ^= 0x01;
        let forged = [segments[0], &URL_SAFE_NO_PAD.encode(&tampered), segments[2]].join(".");
        assert_eq!(sim::signed_payload(Some(&trusted), &forged), None);
        let hs256 = URL_SAFE_NO_PAD.encode(r#"{"alg":"HS256"}"#);
        let other_alg = [hs256.as_str(), segments[1], segments[2]].join(".");
        assert_eq!(sim::signed_payload(Some(&trusted), &other_alg), None);
        let other_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
        let foreign = sign_challenge(&other_key, &URL_SAFE_NO_PAD.encode(challenge)).unwrap();
        assert_eq!(sim::signed_payload(Some(&trusted), &foreign), None);
        assert_eq!(sim::signed_payload(Some(&trusted), "a.b"), None);
        assert_eq!(
            sim::signed_payload(Some(&trusted), &format!("{jws}.x")),
            None
        );

        // Unchecked, any signature passes but the shape is still read.
        assert_eq!(
            sim::signed_payload(None, &foreign).as_deref(),
            Some(&challenge[..])
        );
        assert_eq!(sim::signed_payload(None, "a.b"), None);

        use p256::pkcs8::EncodePrivateKey as _;
        let pkcs8 = key.to_pkcs8_pem(p256::pkcs8::LineEnding::LF).unwrap();
        assert_eq!(sim::public_key(&pkcs8).unwrap(), trusted);
        assert!(sim::public_key("not a key").is_err());
    }

    async fn signed(sim: &SimHandle, bearer: &str, id: &str, action: &str) -> String {
        let key = load_signing_key(DEMO_SIGNING_KEY_PEM).unwrap();
        sign_challenge(&key, &challenge(sim, bearer, id, action).await).unwrap()
    }

    #[tokio::test]
    async fn token_challenge_and_signed_decisions() {
        let sim = sim().await;
        let issued = token(&sim).await;
        assert_eq!(issued["expiresInSeconds"], 300);
        assert_eq!(issued["refreshExpiresInSeconds"], 1800);
        let bearer = issued["accessToken"].as_str().unwrap();

        let approved = new_id();
        let signature = signed(&sim, bearer, &approved, "approve").await;
        let (status, body) = decide(&sim, bearer, &approved, "approve", &signature).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["state"], "APPROVED");
        assert_eq!(body["id"], approved.as_str());
        assert!(body["legacyId"].is_u64() && body["reviewSteps"].is_array());
        assert_eq!(body["reviews"][0]["status"], "APPROVED");

        let rejected = new_id();
        let signature = signed(&sim, bearer, &rejected, "reject").await;
        let (status, body) = decide(&sim, bearer, &rejected, "reject", &signature).await;
        assert_eq!((status, body["state"].clone()), (200, json!("REJECTED")));

        let url = format!("{}/rest/requests/{rejected}", sim.base_url("ledger_v2"));
        let (_, body) = parts(client().get(url).bearer_auth(bearer).send().await.unwrap()).await;
        assert_eq!(body["state"], "REJECTED");
        let stats = sim.stats().provider("ledger_v2").unwrap().clone();
        assert_eq!((stats.state_changes, stats.token_issued), (2, 1));
    }

    #[tokio::test]
    async fn bad_signature_and_reused_challenge_are_refused() {
        let sim = sim().await;
        let bearer = access_token(&sim).await;
        let id = new_id();
        let challenge = challenge(&sim, &bearer, &id, "approve").await;

        let other_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
        let forged = sign_challenge(&other_key, &challenge).unwrap();
        let (status, body) = decide(&sim, &bearer, &id, "approve", &forged).await;
        assert_eq!(status, 403);
        assert_eq!(body["code"], "INVALID_SIGNATURE");
        assert!(body["issues"].is_array());

        // Signed correctly, but over bytes the sim never issued for this request.
        let key = load_signing_key(DEMO_SIGNING_KEY_PEM).unwrap();
        let foreign = signed(&sim, &bearer, &new_id(), "approve").await;
        let (status, body) = decide(&sim, &bearer, &id, "approve", &foreign).await;
        assert_eq!(
            (status, body["code"].clone()),
            (403, json!("INVALID_CHALLENGE"))
        );

        let good = sign_challenge(&key, &challenge).unwrap();
        assert_eq!(decide(&sim, &bearer, &id, "approve", &good).await.0, 200);
        let (status, body) = decide(&sim, &bearer, &id, "approve", &good).await;
        assert_eq!(
            (status, body["code"].clone()),
            (403, json!("INVALID_CHALLENGE"))
        );

        let url = format!("{}/rest/requests/{id}/approve", sim.base_url("ledger_v2"));
        let response = client()
            .post(url)
            .bearer_auth(&bearer)
            .json(&json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 400);
        assert_eq!(
            sim.stats()
                .provider("ledger_v2")
                .unwrap()
                .clone()
                .double_state_changes,
            0
        );
    }

    /// Each action has its own challenge, naming the request; a decision
    /// signed over the other action's challenge is refused and changes
    /// nothing, as the HSM would act on what was signed.
    #[tokio::test]
    async fn a_decision_signed_over_the_other_actions_challenge_is_refused() {
        let sim = sim().await;
        let bearer = access_token(&sim).await;
        let id = new_id();
        for (action, kind) in [("approve", "APPROVE_REQUEST"), ("reject", "REJECT_REQUEST")] {
            let encoded = challenge(&sim, &bearer, &id, action).await;
            let decoded: Value =
                serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&encoded).unwrap()).unwrap();
            assert_eq!(decoded["type"], kind);
            assert_eq!(decoded["data"]["request_id"], id.as_str());
        }

        let approve_signature = signed(&sim, &bearer, &id, "approve").await;
        let (status, body) = decide(&sim, &bearer, &id, "reject", &approve_signature).await;
        assert_eq!(
            (status, body["code"].clone()),
            (403, json!("INVALID_CHALLENGE"))
        );
        let reject_signature = signed(&sim, &bearer, &id, "reject").await;
        let (status, body) = decide(&sim, &bearer, &id, "approve", &reject_signature).await;
        assert_eq!(
            (status, body["code"].clone()),
            (403, json!("INVALID_CHALLENGE"))
        );
        assert_eq!(
            sim.target_state("ledger_v2", &id).as_deref(),
            Some("PENDING_APPROVAL")
        );
        assert_eq!(
            sim.stats()
                .provider("ledger_v2")
                .unwrap()
                .clone()
                .state_changes,
            0
        );

        let reject_signature = signed(&sim, &bearer, &id, "reject").await;
        let (status, body) = decide(&sim, &bearer, &id, "reject", &reject_signature).await;
        assert_eq!((status, body["state"].clone()), (200, json!("REJECTED")));
    }

    #[tokio::test]
    async fn second_opposite_decision_conflicts() {
        let sim = sim().await;
        let bearer = access_token(&sim).await;
        let id = new_id();
        let signature = signed(&sim, &bearer, &id, "reject").await;
        assert_eq!(
            decide(&sim, &bearer, &id, "reject", &signature).await.0,
            200
        );

        let signature = signed(&sim, &bearer, &id, "approve").await;
        let (status, body) = decide(&sim, &bearer, &id, "approve", &signature).await;
        assert_eq!(
            (status, body["code"].clone()),
            (400, json!("REQUEST_NOT_PENDING"))
        );
        let stats = sim.stats().provider("ledger_v2").unwrap().clone();
        assert_eq!((stats.double_state_changes, stats.conflicting_keys), (1, 1));
        assert_eq!(
            sim.target_state("ledger_v2", &id).as_deref(),
            Some("REJECTED")
        );
    }

    #[tokio::test]
    async fn unauthorized_expired_token_and_refresh() {
        let sim = sim_with(SimConfig::default().with(sim::Options {
            access_ttl: Duration::ZERO,
            ..sim::Options::default()
        }))
        .await;
        let base = sim.base_url("ledger_v2");
        let url = format!("{base}/rest/auth/token");
        let wrong =
            json!({"workspace": "sim-workspace", "apiKeyId": "sim-key-id", "apiKeySecret": "nope"});
        let (status, body) = parts(client().post(&url).json(&wrong).send().await.unwrap()).await;
        assert_eq!((status, body["code"].clone()), (401, json!("UNAUTHORIZED")));

        let issued = token(&sim).await;
        let expired = issued["accessToken"].as_str().unwrap();
        let read = format!("{base}/rest/requests/{}", new_id());
        let (status, body) = parts(
            client()
                .get(&read)
                .bearer_auth(expired)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 401);
        assert_eq!(
            body,
            json!({"message": "Authorization not provided or expired", "code": "UNAUTHORIZED", "issues": []})
        );
        assert_eq!(client().get(&read).send().await.unwrap().status(), 401);

        let refresh = json!({"workspace": "sim-workspace", "refreshToken": issued["refreshToken"]});
        let (status, body) = parts(
            client()
                .post(format!("{base}/rest/auth/token/refresh"))
                .json(&refresh)
                .send()
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert!(body["accessToken"].is_string() && body["refreshToken"].is_string());
        assert_eq!(
            sim.stats()
                .provider("ledger_v2")
                .unwrap()
                .clone()
                .token_issued,
            2
        );
    }

    #[tokio::test]
    async fn benchmarks_may_skip_the_ecdsa_check_but_not_the_challenge_check() {
        let sim = sim_with(SimConfig::default().with(sim::Options {
            verify_signatures: false,
            ..sim::Options::default()
        }))
        .await;
        let bearer = access_token(&sim).await;
        let id = new_id();
        let challenge = challenge(&sim, &bearer, &id, "approve").await;
        let other_key = p256::ecdsa::SigningKey::from_slice(&[7u8; 32]).expect("a valid scalar");
        let foreign = sign_challenge(&other_key, &URL_SAFE_NO_PAD.encode(b"not issued")).unwrap();
        let (status, _) = decide(&sim, &bearer, &id, "approve", &foreign).await;
        assert_eq!(status, 403);
        let unchecked = sign_challenge(&other_key, &challenge).unwrap();
        assert_eq!(
            decide(&sim, &bearer, &id, "approve", &unchecked).await.0,
            200
        );
    }

    #[tokio::test]
    async fn faults_answer_in_ledger_v2s_error_shape() {
        let sim = sim().await;
        let bearer = access_token(&sim).await;
        sim.set_faults(
            "ledger_v2",
            crate::tools::sim::Faults {
                rate_limit_ratio: 1.0,
                retry_after_secs: 3,
                ..Default::default()
            },
        );
        let url = format!(
            "{}/rest/requests/{}/challenge",
            sim.base_url("ledger_v2"),
            new_id()
        );
        let response = client().get(url).bearer_auth(&bearer).send().await.unwrap();
        assert_eq!(response.status(), 429);
        assert_eq!(response.headers()["retry-after"], "3");
        let (_, body) = parts(response).await;
        assert_eq!(body["code"], "RATE_LIMITED");
        assert_eq!(body["issues"], json!([]));
        assert!(body["message"].is_string());
    }

    #[tokio::test]
    async fn worker_env_names_the_credentials_the_fake_accepts() {
        crate::tools::sim::testkit::assert_worker_env(
            "ledger_v2",
            "/ledger-v2",
            &[
                ("WORKSPACE", "sim-workspace"),
                ("API_KEY_ID", "sim-key-id"),
                ("API_KEY_SECRET", "sim-key-secret"),
                ("SIGNING_KEY", DEMO_SIGNING_KEY_PEM),
            ],
        )
        .await;
    }
}
