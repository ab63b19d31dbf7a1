//! FlexPay IDaaS (PROVIDERS.md section 6, seed 004).
//!
//! Token: `POST /v1/auth/token` with `{"client_id", "client_secret"}` gives a
//! JWT (1 h by default) and no refresh token, so the credentials are
//! exchanged again before expiry; the response field names are UNCONFIRMED,
//! so the OAuth form and the envelope form are both read.
//! Reject: `POST /v1/transactions/{reference}/reject` with `{"reason"}` (at
//! most 500 characters). Approve: `POST /v1/transactions/{reference}/accept`,
//! no body. Answers come in an envelope `{success, message, errorCode, data,
//! errors, timestamp}` where `success: false` fails even on a 2xx.
//!
//! FlexPay documents no idempotency on accept and reject: we still send
//! `Idempotency-Key`, and the worker reads the state before any repeat.
//! The single-transaction read is UNCONFIRMED (configurable `read_path`);
//! when it does not exist we fall back to the pending list, whose silence
//! proves nothing about the outcome.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use reqwest::{Method, RequestBuilder, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    CallContext, Observed, Provider, Reply, Verdict,
    auth::{Token, TokenCache},
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision, required_reason, target_segment},
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, SettingsError, check_base_url, check_path_template, present},
};

pub const NAME: &str = "flexpay";

/// The documented limit of `reason` (seed 004).
pub const MAX_REASON_CHARS: usize = 500;

/// The documented default token lifetime, used when the answer states none.
const DEFAULT_TOKEN_TTL: Duration = Duration::from_secs(3600);

/// Exchange the credentials again this long before the JWT expires.
const TOKEN_MARGIN: Duration = Duration::from_secs(60);

/// The pending-list fallback walks at most this many pages of this size.
const MAX_PENDING_PAGES: u32 = 10;
const PENDING_PAGE_SIZE: usize = 100;

/// `errorCode` fragments that say "this request can never pass": anything
/// else on a 400/409/422 may be "not pending any more" and gets reconciled.
const PERMANENT_CODE_PARTS: &[&str] = &["VALIDATION", "INVALID_REASON"];

#[derive(Deserialize)]
struct FlexPaySettings {
    base_url: String,
    client_id: Option<SecretString>,
    client_secret: Option<SecretString>,
    read_path: String,
}

pub struct FlexPay {
    http: Http,
    base: Url,
    client_id: SecretString,
    client_secret: SecretString,
    read_path: String,
    tokens: TokenCache,
}

pub fn build(
    sections: &ProviderSections,
    http: &Http,
) -> Result<Option<Arc<dyn Provider>>, SettingsError> {
    let s: FlexPaySettings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "read_path", &s.read_path, "{reference}")?;
    let (Some(client_id), Some(client_secret)) = (present(&s.client_id), present(&s.client_secret))
    else {
        return Ok(None);
    };
    Ok(Some(Arc::new(FlexPay {
        http: http.clone(),
        base,
        client_id: client_id.clone(),
        client_secret: client_secret.clone(),
        read_path: s.read_path,
        tokens: TokenCache::new(NAME, TOKEN_MARGIN),
    })))
}

/// The token call's body, fields in the documented order.
#[derive(Serialize)]
struct TokenRequest<'a> {
    client_id: &'a str,
    client_secret: &'a str,
}

#[derive(Serialize)]
struct RejectBody<'a> {
    reason: &'a str,
}

/// The access token and its lifetime from either answer form:
/// `{"access_token", "expires_in"}` or `{"success", "data": {"accessToken", "expiresIn"}}`
/// (snake case inside `data` too).
fn parse_token(body: &Value) -> Option<(SecretString, Duration)> {
    let data = body.get("data").filter(|d| d.is_object());
    let pick = |names: &[&str]| {
        [Some(body), data]
            .into_iter()
            .flatten()
            .find_map(|v| names.iter().find_map(|n| v.get(*n)))
    };
    let access = pick(&["access_token", "accessToken", "token"])
        .and_then(Value::as_str)
        .filter(|t| !t.trim().is_empty())?;
    let ttl = pick(&["expires_in", "expiresIn"])
        .and_then(|v| match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.trim().parse().ok(),
            _ => None,
        })
        .filter(|secs| *secs > 0)
        .map_or(DEFAULT_TOKEN_TTL, Duration::from_secs);
    Some((SecretString::from(access.to_owned()), ttl))
}

/// `success: false` is a failure whatever the HTTP status.
fn refused(body: &Value) -> bool {
    body.get("success") == Some(&Value::Bool(false))
}

/// (`errorCode`, `message` with the first of `errors[]`) of an envelope.
fn envelope_error(body: &Value) -> (Option<String>, Option<String>) {
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().take(500).collect::<String>())
    };
    let code = text(body.get("errorCode"));
    let message = text(body.get("message"));
    let first = text(body.get("errors").and_then(|e| e.get(0)));
    let message = match (message, first) {
        (Some(m), Some(f)) if m != f => Some(format!("{m}: {f}")),
        (m, f) => m.or(f),
    };
    (code, message)
}

fn verdict(action: Action, status: &str) -> Verdict {
    match (action, status) {
        (_, "AWAITING_ACCEPTANCE") => Verdict::Pending,
        (Action::Approve, "COMPLETED") | (Action::Reject, "REJECTED") => Verdict::AsDecided,
        // The other decision, EXPIRED, or a status we do not know.
        _ => Verdict::Conflict,
    }
}

fn status_of(v: &Value) -> Option<String> {
    v.get("status")
        .and_then(Value::as_str)
        .map(|s| s.trim().to_uppercase())
}

impl FlexPay {
    /// FlexPay's error classes for decision calls and reads, in one place
    /// (401 is handled by [`FlexPay::call`] before it gets here).
    fn classify(response: &Response) -> CallError {
        let (code, message) = envelope_error(&response.body);
        let permanent_code = code.as_deref().is_some_and(|c| {
            let c = c.to_uppercase();
            PERMANENT_CODE_PARTS.iter().any(|p| c.contains(p))
        });
        let status = response.status.as_u16();
        let class = match status {
            429 | 500..=599 => ErrorClass::Retryable,
            401 | 403 => ErrorClass::Auth,
            404 => ErrorClass::Permanent,
            // No code for "not pending any more" is documented: unless the
            // code says the request itself is wrong, reconcile.
            200..=299 | 400 | 409 | 422 if permanent_code => ErrorClass::Permanent,
            200..=299 | 400 | 409 | 422 => ErrorClass::Ambiguous,
            _ => http::default_class(response.status),
        };
        let message = message.unwrap_or_else(|| match status {
            200..=299 => format!("FlexPay answered HTTP {status} with success: false"),
            _ => format!("FlexPay answered HTTP {status}"),
        });
        http::error(class, response, code, Some(message))
    }

    /// Exchanges the client credentials for a JWT.
    async fn fetch_token(&self) -> Result<Token, CallError> {
        let body = TokenRequest {
            client_id: self.client_id.expose_secret(),
            client_secret: self.client_secret.expose_secret(),
        };
        let req = self
            .http
            .client()
            .post(http::join(&self.base, "/v1/auth/token"))
            .header("Accept", "application/json")
            .json(&body);
        let response = self.http.send(NAME, "token", req).await?;
        if response.status.is_success()
            && !refused(&response.body)
            && let Some((access, expires_in)) = parse_token(&response.body)
        {
            return Ok(Token {
                access,
                expires_in,
                refresh: None,
            });
        }
        let status = response.status.as_u16();
        if response.status.is_success() && !refused(&response.body) {
            // The answer may hold a token under a name we do not know: keep
            // it out of the error (and so out of outcomes and logs).
            let mut e = CallError::new(
                ErrorClass::Auth,
                "FlexPay token answer holds no access_token or data.accessToken",
            );
            e.http_status = Some(status);
            return Err(e);
        }
        let (code, message) = envelope_error(&response.body);
        let class = match status {
            429 | 500..=599 => ErrorClass::Retryable,
            // Refused credentials (or a token endpoint that is not there):
            // retrying cannot fix it.
            _ => ErrorClass::Auth,
        };
        let message = match message {
            Some(m) => format!("FlexPay token exchange failed (HTTP {status}): {m}"),
            None => format!("FlexPay token exchange failed (HTTP {status})"),
        };
        Err(http::error(class, &response, code, Some(message)))
    }

    async fn token(&self) -> Result<SecretString, CallError> {
        self.tokens.get(|_| self.fetch_token()).await
    }

    /// A request with the bearer token and JSON accepted.
    fn request(&self, method: Method, url: Url, token: &SecretString) -> RequestBuilder {
        self.http
            .client()
            .request(method, url)
            .header("Authorization", format!("Bearer {}", token.expose_secret()))
            .header("Accept", "application/json")
    }

    /// Sends with a cached token; a 401 means the JWT was revoked or expired
    /// early, so exchange the credentials once and send once more. A second
    /// 401 is an auth failure (a 401 means nothing was applied, so the
    /// repeat is safe without idempotency).
    async fn call(
        &self,
        operation: &'static str,
        build: impl Fn(&SecretString) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        let token = self.token().await?;
        let response = self.http.send(NAME, operation, build(&token)).await?;
        if response.status.as_u16() != 401 {
            return Ok(response);
        }
        self.tokens.invalidate(&token).await;
        let token = self.token().await?;
        let response = self.http.send(NAME, operation, build(&token)).await?;
        if response.status.as_u16() == 401 {
            let mut e = Self::classify(&response);
            e.class = ErrorClass::Auth;
            e.message = format!("FlexPay refused a freshly issued token: {}", e.message);
            return Err(e);
        }
        Ok(response)
    }

    /// Fallback read: walks `GET /v1/transactions/pending`. Found means still
    /// pending; not found proves nothing (accepted, rejected, expired, or
    /// simply not visible to us), so it is an error, not a verdict.
    async fn read_pending(&self, reference: &str) -> Result<Observed, CallError> {
        for page in 0..MAX_PENDING_PAGES {
            let mut url = http::join(&self.base, "/v1/transactions/pending");
            url.query_pairs_mut()
                .append_pair("page", &page.to_string())
                .append_pair("size", &PENDING_PAGE_SIZE.to_string());
            let response = self
                .call("read_pending", |t| {
                    self.request(Method::GET, url.clone(), t)
                })
                .await?;
            if !response.status.is_success() || refused(&response.body) {
                return Err(Self::classify(&response));
            }
            // A Spring page (`content`, `last`, `totalPages`), or a bare list.
            let data = response.body.get("data").unwrap_or(&Value::Null);
            let (content, paged) = match data {
                Value::Array(list) => (list.as_slice(), false),
                _ => (
                    data.get("content")
                        .and_then(Value::as_array)
                        .map_or(&[][..], Vec::as_slice),
                    true,
                ),
            };
            if let Some(found) = content
                .iter()
                .find(|t| t.get("reference").and_then(Value::as_str) == Some(reference))
            {
                return Ok(Observed {
                    state: status_of(found).unwrap_or_else(|| "AWAITING_ACCEPTANCE".to_owned()),
                    verdict: Verdict::Pending,
                    response: found.clone(),
                });
            }
            // The page's own flags first: the server may cap `size` below
            // ours, so a short page alone does not mean the end. Spring Data
            // 3.3+ moves `totalPages` into a `page` object and drops `last`.
            let total_pages = data
                .get("totalPages")
                .or_else(|| data.pointer("/page/totalPages"))
                .and_then(Value::as_u64);
            let last = !paged
                || content.is_empty()
                || match (data.get("last").and_then(Value::as_bool), total_pages) {
                    (Some(last), _) => last,
                    (None, Some(total)) => u64::from(page) + 1 >= total,
                    (None, None) => content.len() < PENDING_PAGE_SIZE,
                };
            if last {
                return Err(CallError::new(
                    ErrorClass::Permanent,
                    format!(
                        "FlexPay transaction {reference} is not in the pending list; absence proves nothing"
                    ),
                ));
            }
        }
        Err(CallError::new(
            ErrorClass::Permanent,
            format!(
                "FlexPay transaction {reference} is not in the first {MAX_PENDING_PAGES} pages of the pending list; absence proves nothing"
            ),
        ))
    }
}

#[async_trait]
impl Provider for FlexPay {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self, d: &Decision) -> Result<(), String> {
        target_segment(d, "reference")?;
        match d.action {
            Action::Reject => required_reason(d, Some(MAX_REASON_CHARS)).map(|_| ()),
            Action::Approve => Ok(()),
        }
    }

    fn target_key(&self, d: &Decision) -> String {
        d.target_str("reference").unwrap_or_default().to_owned()
    }

    async fn apply(&self, d: &Decision, ctx: &CallContext) -> Result<Reply, CallError> {
        let reference =
            target_segment(d, "reference").map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let (verb, body) = match d.action {
            Action::Reject => (
                "reject",
                Some(RejectBody {
                    reason: required_reason(d, Some(MAX_REASON_CHARS))
                        .map_err(|e| CallError::new(ErrorClass::Permanent, e))?,
                }),
            ),
            Action::Approve => ("accept", None),
        };
        let url = http::join(
            &self.base,
            &format!("/v1/transactions/{}/{verb}", http::segment(reference)),
        );
        let response = self
            .call(verb, |token| {
                let req = self
                    .request(Method::POST, url.clone(), token)
                    .header("Idempotency-Key", &ctx.idempotency_key);
                match &body {
                    Some(body) => req.json(body),
                    None => req,
                }
            })
            .await?;
        if !response.status.is_success() || refused(&response.body) {
            return Err(Self::classify(&response));
        }
        Ok(Reply::Done {
            state: response.body.get("data").and_then(status_of),
            response: response.body,
        })
    }

    async fn read_state(&self, d: &Decision) -> Result<Observed, CallError> {
        let reference =
            target_segment(d, "reference").map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let url = http::join(
            &self.base,
            &self
                .read_path
                .replace("{reference}", &http::segment(reference)),
        );
        let response = self
            .call("read", |t| self.request(Method::GET, url.clone(), t))
            .await?;
        // The single read is not publicly documented: where it is missing,
        // fall back to the documented pending list.
        if matches!(response.status.as_u16(), 404 | 405 | 501) {
            return self.read_pending(reference).await;
        }
        if !response.status.is_success() || refused(&response.body) {
            return Err(Self::classify(&response));
        }
        let data = response.body.get("data").unwrap_or(&Value::Null);
        let Some(state) = status_of(data) else {
            return Err(http::error(
                ErrorClass::Ambiguous,
                &response,
                None,
                Some("FlexPay's transaction read shows no data.status".to_owned()),
            ));
        };
        Ok(Observed {
            verdict: verdict(d.action, &state),
            state,
            response: data.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
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

    fn provider(server: &MockServer) -> Arc<dyn Provider> {
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
        ResponseTemplate::new(200).set_body_json(
            json!({"access_token": token, "token_type": "Bearer", "expires_in": 3600}),
        )
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
            "FlexPay token exchange failed (HTTP 401): Invalid client credentials"
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

    #[tokio::test]
    async fn absence_from_the_pending_list_proves_nothing() {
        let server = MockServer::start().await;
        mount_token(&server, oauth_token("jwt-a"), None).await;
        Mock::given(method("GET"))
            .and(path(format!("/api/v1/transactions/{REFERENCE}")))
            .respond_with(ResponseTemplate::new(405))
            .mount(&server)
            .await;
        Mock::given(method("GET"))
            .and(path("/api/v1/transactions/pending"))
            .respond_with(pending_page(&["TXN-OTHER".to_owned()], 0, true))
            .mount(&server)
            .await;
        let e = observe(&server, "approve").await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(
            e.message,
            format!(
                "FlexPay transaction {REFERENCE} is not in the pending list; absence proves nothing"
            )
        );
        assert_eq!(server.received_requests().await.unwrap().len(), 3);
    }

    #[test]
    fn missing_credentials_disable_and_a_bad_template_is_refused() {
        let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let load = |vars: &[(&str, &str)]| {
            Settings::load_from(
                None,
                vars.iter().map(|(k, v)| (k.to_string(), v.to_string())),
            )
            .unwrap()
        };
        let s = load(&[("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID", "id")]);
        assert!(build(&s.providers, &http).unwrap().is_none());
        let s = load(&[("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET", "secret")]);
        assert!(build(&s.providers, &http).unwrap().is_none());
        let s = load(&[
            ("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_ID", "id"),
            ("APPROVAL_PROVIDERS__FLEXPAY__CLIENT_SECRET", "secret"),
            ("APPROVAL_PROVIDERS__FLEXPAY__READ_PATH", "/v1/transactions"),
        ]);
        let e = build(&s.providers, &http).err().unwrap().to_string();
        assert!(e.contains("APPROVAL_PROVIDERS__FLEXPAY__READ_PATH"), "{e}");
    }
}
