//! Ledger Enterprise API v2, "revault-api" (PROVIDERS.md sections 3 and 4,
//! seed 000).
//!
//! Approve and reject are both three calls under one bearer token:
//! 1. `GET {challenge_path}` (configurable, UNCONFIRMED publicly: default
//!    `/rest/requests/{request_id}/challenge`) answers `{"challenge"}` (or
//!    `{"data":{"challenge"}}`);
//! 2. the decoded challenge bytes are signed as an ES256 compact JWS with
//!    the API user's P-256 key ([`crate::jws`]);
//! 3. `POST /rest/requests/{request_id}/approve` (or `/reject`) with
//!    `{"data":{"signature":"<jws>","challengeType":"API"}}`.
//!
//! The challenge read and the decision call carry the decision's
//! `Idempotency-Key`; Ledger documents no idempotency, so the worker reads
//! the request before any repeat. Tokens come from `POST /rest/auth/token`
//! (300 s) and are renewed with `POST /rest/auth/token/refresh` (1800 s),
//! shared by every concurrent call through one [`TokenCache`].
//!
//! The request `state` enum is not public (PROVIDERS.md 3.1: only `INITIAL`
//! is shown). The mapping in [`verdict`] is our reading of it, borrowed from
//! v1's request statuses: pending `INITIAL`, `PENDING`, `PENDING_APPROVAL`,
//! `PENDING_FIRST_APPROVAL`; approved `APPROVED`, `SIGNED`, `SUBMITTED`;
//! rejected `REJECTED`, `ABORTED`; anything else is a conflict.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use p256::ecdsa::SigningKey;
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    CallContext, Observed, Provider, Reply, Verdict,
    auth::{Token, TokenCache},
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision, target_segment},
    jws,
    retry::{CallError, ErrorClass},
    settings::{
        ProviderSections, SettingsError, check_base_url, check_path_template, env_key, present,
    },
};

pub const NAME: &str = "ledger_v2";

/// Renew this long before the access token's 300 s run out.
const TOKEN_MARGIN: Duration = Duration::from_secs(30);
/// Documented lifetimes, used when an answer leaves them out.
const DEFAULT_ACCESS_TTL: u64 = 300;
const DEFAULT_REFRESH_TTL: u64 = 1800;

/// Seed 000's example: the signature comes from an API user's own key
/// (as opposed to `PSD`, a hardware device).
const CHALLENGE_TYPE: &str = "API";

const WAITING: &[&str] = &[
    "INITIAL",
    "PENDING",
    "PENDING_APPROVAL",
    "PENDING_FIRST_APPROVAL",
];
const AFTER_APPROVAL: &[&str] = &["APPROVED", "SIGNED", "SUBMITTED"];
const AFTER_REJECTION: &[&str] = &["REJECTED", "ABORTED"];

#[derive(Deserialize)]
struct LedgerV2Settings {
    base_url: String,
    challenge_path: String,
    workspace: Option<String>,
    api_key_id: Option<SecretString>,
    api_key_secret: Option<SecretString>,
    /// PEM text, hex of PEM (Ledger's samples), or a path to a file.
    signing_key: Option<SecretString>,
}

pub struct LedgerV2 {
    http: Http,
    base: Url,
    challenge_path: String,
    workspace: String,
    api_key_id: SecretString,
    api_key_secret: SecretString,
    signing_key: SigningKey,
    tokens: TokenCache,
}

pub fn build(
    sections: &ProviderSections,
    http: &Http,
) -> Result<Option<Arc<dyn Provider>>, SettingsError> {
    let s: LedgerV2Settings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "challenge_path", &s.challenge_path, "{request_id}")?;
    let workspace = s
        .workspace
        .as_deref()
        .map(str::trim)
        .filter(|w| !w.is_empty());
    let credentials = [
        ("workspace", workspace.is_some()),
        ("api_key_id", present(&s.api_key_id).is_some()),
        ("api_key_secret", present(&s.api_key_secret).is_some()),
        ("signing_key", present(&s.signing_key).is_some()),
    ];
    let (Some(workspace), Some(api_key_id), Some(api_key_secret), Some(signing_key)) = (
        workspace,
        present(&s.api_key_id),
        present(&s.api_key_secret),
        present(&s.signing_key),
    ) else {
        // Contract: missing credentials disable the provider. A partial set
        // is most likely a deployment slip, so say which keys are missing.
        if credentials.iter().any(|(_, set)| *set) {
            let missing: Vec<String> = credentials
                .iter()
                .filter(|(_, set)| !set)
                .map(|(key, _)| env_key(&format!("providers.{NAME}.{key}")))
                .collect();
            tracing::warn!(
                provider = NAME,
                missing = %missing.join(", "),
                "provider disabled: some of its credentials are not set"
            );
        }
        return Ok(None);
    };
    // Loaded now so a bad key stops start-up instead of failing every
    // decision. JwsError messages never quote the input.
    let signing_key =
        jws::load_signing_key(signing_key.expose_secret()).map_err(|e| SettingsError::Invalid {
            key: env_key(&format!("providers.{NAME}.signing_key")),
            problem: e.to_string(),
        })?;
    Ok(Some(Arc::new(LedgerV2 {
        http: http.clone(),
        base,
        challenge_path: s.challenge_path,
        workspace: workspace.to_owned(),
        api_key_id: api_key_id.clone(),
        api_key_secret: api_key_secret.clone(),
        signing_key,
        tokens: TokenCache::new(NAME, TOKEN_MARGIN),
    })))
}

// Request bodies as structs, so their keys go out in the documented order.

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct LoginBody<'a> {
    workspace: &'a str,
    api_key_id: &'a str,
    api_key_secret: &'a str,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct RefreshBody<'a> {
    workspace: &'a str,
    refresh_token: &'a str,
}

#[derive(Serialize)]
struct DecisionBody<'a> {
    data: Signed<'a>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Signed<'a> {
    signature: &'a str,
    challenge_type: &'a str,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct TokenAnswer {
    access_token: String,
    expires_in_seconds: Option<u64>,
    refresh_token: Option<String>,
    refresh_expires_in_seconds: Option<u64>,
}

fn request_id(d: &Decision) -> Result<&str, String> {
    target_segment(d, "request_id")
}

fn verdict(action: Action, state: &str) -> Verdict {
    let state = state.to_ascii_uppercase();
    let decided = match action {
        Action::Approve => AFTER_APPROVAL,
        Action::Reject => AFTER_REJECTION,
    };
    if WAITING.contains(&state.as_str()) {
        // Like v1, a request stays pending after our approval while the
        // quorum is incomplete; `reviews[]` would tell, but we do not know
        // our own user id, so this stays Pending.
        Verdict::Pending
    } else if decided.contains(&state.as_str()) {
        Verdict::AsDecided
    } else {
        // EXPIRED, the opposite decision, or a state we do not know.
        Verdict::Conflict
    }
}

/// `{"message","code","issues":[{"message"}]}` → (code, message with the
/// first issue appended).
fn error_fields(body: &Value) -> (Option<String>, Option<String>) {
    fn text(v: Option<&Value>) -> Option<&str> {
        v.and_then(Value::as_str)
            .map(str::trim)
            .filter(|s| !s.is_empty())
    }
    let code = text(body.get("code")).map(str::to_owned);
    let issue = text(body.pointer("/issues/0/message"));
    let message = match (text(body.get("message")), issue) {
        (Some(m), Some(i)) => Some(format!("{m}: {i}")),
        (m, i) => m.or(i).map(str::to_owned),
    };
    (code, message.map(|m| m.chars().take(500).collect()))
}

fn state_of(body: &Value) -> Option<String> {
    body.get("state").and_then(Value::as_str).map(str::to_owned)
}

impl LedgerV2 {
    fn url(&self, path: &str) -> Url {
        http::join(&self.base, path)
    }

    fn request(&self, method: Method, url: Url, bearer: &SecretString) -> RequestBuilder {
        self.http
            .client()
            .request(method, url)
            .header(
                "Authorization",
                format!("Bearer {}", bearer.expose_secret()),
            )
            .header("Accept", "application/json")
    }

    /// Ledger v2's error classes for every call but the token ones.
    fn classify(response: &Response) -> CallError {
        let (code, message) = error_fields(&response.body);
        let class = match response.status.as_u16() {
            // 420 is v1's rate-limit answer; v2's is undocumented, so both.
            420 | 429 | 500..=599 => ErrorClass::Retryable,
            // A 401 here already survived one token renewal.
            401 | 403 => ErrorClass::Auth,
            404 => ErrorClass::Permanent,
            // No conflict answer is documented (PROVIDERS.md 3.1): "not
            // pending" may come as any of these, so read the state.
            400 | 409 | 422 => ErrorClass::Ambiguous,
            s => http::default_class(StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY)),
        };
        http::error(class, response, code, message)
    }

    /// A live access token; one token call at a time for all callers.
    async fn token(&self) -> Result<SecretString, CallError> {
        self.tokens.get(|refresh| self.fetch_token(refresh)).await
    }

    async fn fetch_token(&self, refresh: Option<SecretString>) -> Result<Token, CallError> {
        if let Some(refresh) = refresh {
            let body = RefreshBody {
                workspace: &self.workspace,
                refresh_token: refresh.expose_secret(),
            };
            match self
                .token_call("token_refresh", "/rest/auth/token/refresh", &body)
                .await
            {
                Ok(token) => return Ok(token),
                // Throttled or down: a login would fare no better.
                Err(e) if e.class == ErrorClass::Retryable => return Err(e),
                // The refresh token was refused (revoked, expired early):
                // log in again with the API key.
                Err(_) => {}
            }
        }
        let body = LoginBody {
            workspace: &self.workspace,
            api_key_id: self.api_key_id.expose_secret(),
            api_key_secret: self.api_key_secret.expose_secret(),
        };
        self.token_call("token", "/rest/auth/token", &body).await
    }

    /// One token call. Its errors never carry the answer's body: a token
    /// answer is the one place a credential could come back.
    async fn token_call(
        &self,
        operation: &'static str,
        path: &str,
        body: &impl Serialize,
    ) -> Result<Token, CallError> {
        let req = self
            .http
            .client()
            .post(self.url(path))
            .header("Accept", "application/json")
            .json(body);
        let response = self.http.send(NAME, operation, req).await.map_err(|e| {
            // Nothing can be applied by a token call: always safe to retry.
            CallError {
                class: ErrorClass::Retryable,
                ..e
            }
        })?;
        let status = response.status.as_u16();
        if !response.status.is_success() {
            let class = match status {
                420 | 429 | 500..=599 => ErrorClass::Retryable,
                // 401/403, or a 400 on malformed credentials: fixing the
                // API user or its settings is the only cure.
                _ => ErrorClass::Auth,
            };
            let (code, message) = error_fields(&response.body);
            return Err(CallError {
                message: format!(
                    "{NAME} {operation} call answered HTTP {status}{}",
                    message.map(|m| format!(": {m}")).unwrap_or_default()
                ),
                http_status: Some(status),
                provider_code: code,
                retry_after: crate::retry::retry_after(&response.headers),
                ..CallError::new(class, "")
            });
        }
        let answer: TokenAnswer = serde_json::from_value(response.body).map_err(|_| {
            CallError::new(
                ErrorClass::Retryable,
                format!("{NAME} {operation} answer has no accessToken"),
            )
        })?;
        Ok(Token {
            access: SecretString::from(answer.access_token),
            expires_in: Duration::from_secs(
                answer.expires_in_seconds.unwrap_or(DEFAULT_ACCESS_TTL),
            ),
            refresh: answer.refresh_token.map(|t| {
                (
                    SecretString::from(t),
                    Duration::from_secs(
                        answer
                            .refresh_expires_in_seconds
                            .unwrap_or(DEFAULT_REFRESH_TTL),
                    ),
                )
            }),
        })
    }

    /// Sends a call with the cached token. A 401 means the token died
    /// early (revoked, clock skew): forget it, get another once, and repeat
    /// the call once. A second 401 is returned for `classify` (Auth).
    async fn send_authed(
        &self,
        operation: &'static str,
        make: impl Fn(&SecretString) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        let token = self.token().await?;
        let response = self.http.send(NAME, operation, make(&token)).await?;
        if response.status != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.tokens.invalidate(&token).await;
        let token = self.token().await?;
        self.http.send(NAME, operation, make(&token)).await
    }

    async fn challenge(&self, id: &str, ctx: &CallContext) -> Result<String, CallError> {
        let url = self.url(
            &self
                .challenge_path
                .replace("{request_id}", &http::segment(id)),
        );
        let response = self
            .send_authed("challenge", |token| {
                self.request(Method::GET, url.clone(), token)
                    .header("Idempotency-Key", &ctx.idempotency_key)
            })
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let challenge = response
            .body
            .get("challenge")
            .or_else(|| response.body.pointer("/data/challenge"))
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty());
        match challenge {
            Some(c) => Ok(c.to_owned()),
            // The endpoint's shape is unconfirmed: say so rather than guess.
            None => Err(CallError {
                response: Some(response.body.clone()),
                ..CallError::new(
                    ErrorClass::Permanent,
                    format!(
                        "the challenge answer for request {id} has no challenge field (check APPROVAL_PROVIDERS__LEDGER_V2__CHALLENGE_PATH)"
                    ),
                )
            }),
        }
    }
}

#[async_trait]
impl Provider for LedgerV2 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self, d: &Decision) -> Result<(), String> {
        request_id(d).map(|_| ())
    }

    fn target_key(&self, d: &Decision) -> String {
        d.target_str("request_id").unwrap_or_default().to_owned()
    }

    async fn apply(&self, d: &Decision, ctx: &CallContext) -> Result<Reply, CallError> {
        let id = request_id(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let challenge = self.challenge(id, ctx).await?;
        // The challenge is signed as received; its content (what the HSM
        // will act on) is not checked against the decision, as its v2
        // shape is unconfirmed.
        let signature = jws::sign_challenge(&self.signing_key, &challenge).map_err(|e| {
            CallError::new(
                ErrorClass::Permanent,
                format!("the challenge for request {id} cannot be signed: {e}"),
            )
        })?;
        let verb = d.action.as_str();
        let url = self.url(&format!("/rest/requests/{}/{verb}", http::segment(id)));
        let body = DecisionBody {
            data: Signed {
                signature: &signature,
                challenge_type: CHALLENGE_TYPE,
            },
        };
        let response = self
            .send_authed(verb, |token| {
                self.request(Method::POST, url.clone(), token)
                    .header("Idempotency-Key", &ctx.idempotency_key)
                    .json(&body)
            })
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        // An approve may leave the request PENDING_APPROVAL while other
        // quorum approvals are missing: ours was recorded, so it is applied.
        Ok(Reply::Done {
            state: state_of(&response.body),
            response: response.body,
        })
    }

    async fn read_state(&self, d: &Decision) -> Result<Observed, CallError> {
        let id = request_id(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let url = self.url(&format!("/rest/requests/{}", http::segment(id)));
        let response = self
            .send_authed("read", |token| {
                self.request(Method::GET, url.clone(), token)
            })
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let Some(state) = state_of(&response.body) else {
            return Err(CallError {
                response: Some(response.body),
                ..CallError::new(
                    ErrorClass::Ambiguous,
                    format!("request {id} was read without a state field"),
                )
            });
        };
        Ok(Observed {
            verdict: verdict(d.action, &state),
            state,
            response: response.body,
        })
    }
}

#[cfg(test)]
mod tests {
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
    const CHALLENGE_JSON: &str = r#"{"antireplay":"9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08","data":{"request_id":"r-1"},"type":"APPROVE_REQUEST"}"#;

    fn env(base_url: &str) -> Vec<(String, String)> {
        [
            ("APPROVAL_PROVIDERS__LEDGER_V2__BASE_URL", base_url),
            ("APPROVAL_PROVIDERS__LEDGER_V2__WORKSPACE", WORKSPACE),
            ("APPROVAL_PROVIDERS__LEDGER_V2__API_KEY_ID", KEY_ID),
            ("APPROVAL_PROVIDERS__LEDGER_V2__API_KEY_SECRET", KEY_SECRET),
            (
                "APPROVAL_PROVIDERS__LEDGER_V2__SIGNING_KEY",
                jws::DEMO_SIGNING_KEY_PEM,
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
    }

    fn http() -> Http {
        Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap()
    }

    fn build_with(vars: Vec<(String, String)>) -> Result<Option<Arc<dyn Provider>>, SettingsError> {
        let settings = Settings::load_from(None, vars)?;
        build(&settings.providers, &http())
    }

    fn provider(base_url: &str) -> Arc<dyn Provider> {
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

    fn challenge_b64() -> String {
        URL_SAFE_NO_PAD.encode(CHALLENGE_JSON)
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

    async fn mount_challenge(server: &MockServer, id: &str) {
        Mock::given(method("GET"))
            .and(path(format!("/rest/requests/{id}/challenge")))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"challenge": challenge_b64(), "id": 7})),
            )
            .mount(server)
            .await;
    }

    async fn mount_decision(server: &MockServer, id: &str, verb: &str, state: &str) {
        Mock::given(method("POST"))
            .and(path(format!("/rest/requests/{id}/{verb}")))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({
                "type": "TRANSACTION", "id": id, "legacyId": 12, "state": state,
                "reviewSteps": [], "currentStepIndex": 0, "targetId": "t-1", "reviews": []
            })))
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
        format!(
            r#"{{"workspace":"{WORKSPACE}","apiKeyId":"{KEY_ID}","apiKeySecret":"{KEY_SECRET}"}}"#
        )
    }

    fn assert_login(r: &wiremock::Request) {
        assert_eq!(r.method.as_str(), "POST");
        assert_eq!(r.url.path(), "/rest/auth/token");
        assert_eq!(header(r, "content-type"), Some("application/json"));
        assert_eq!(header(r, "authorization"), None);
        assert_eq!(body(r), login_body());
    }

    fn assert_challenge_read(r: &wiremock::Request, id_path: &str, bearer: &str) {
        assert_eq!(r.method.as_str(), "GET");
        assert_eq!(r.url.path(), format!("/rest/requests/{id_path}/challenge"));
        assert_eq!(
            header(r, "authorization"),
            Some(format!("Bearer {bearer}").as_str())
        );
        assert_eq!(header(r, "idempotency-key"), Some("idem-v2-1"));
        assert!(r.body.is_empty());
    }

    /// Checks the decision call's exact body and returns the JWS it holds.
    fn assert_decision_call(
        r: &wiremock::Request,
        id_path: &str,
        verb: &str,
        bearer: &str,
    ) -> String {
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
    fn assert_signed_challenge(jws_text: &str) {
        let key = jws::load_signing_key(jws::DEMO_SIGNING_KEY_PEM).unwrap();
        let payload = jws::verify_jws(key.verifying_key(), jws_text).unwrap();
        assert_eq!(payload, CHALLENGE_JSON.as_bytes());
        let header = jws_text.split('.').next().unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(header).unwrap(),
            br#"{"alg":"ES256","typ":"JWT"}"#
        );
        assert_eq!(jws_text.split('.').nth(1).unwrap(), challenge_b64());
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
        assert_challenge_read(&calls[1], "r-1", "at-1");
        let jws = assert_decision_call(&calls[2], "r-1", "reject", "at-1");
        assert_signed_challenge(&jws);
    }

    #[tokio::test]
    async fn approve_accepts_a_data_wrapped_challenge_and_encodes_the_id() {
        let server = MockServer::start().await;
        mount_token(&server).await;
        Mock::given(method("GET"))
            .and(path("/rest/requests/req%3A9%20b/challenge"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"data": {"challenge": challenge_b64()}})),
            )
            .mount(&server)
            .await;
        mount_decision(&server, "req%3A9%20b", "approve", "PENDING_APPROVAL").await;
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
        assert_challenge_read(&calls[1], "req%3A9%20b", "at-1");
        let jws = assert_decision_call(&calls[2], "req%3A9%20b", "approve", "at-1");
        assert_signed_challenge(&jws);
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
        assert_challenge_read(&calls[1], "r-1", "at-1");
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
        assert_signed_challenge(&second);
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
            .and(path("/rest/requests/gone/challenge"))
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

    #[test]
    fn classes_of_statuses() {
        let class = |status: u16| {
            LedgerV2::classify(&Response {
                status: StatusCode::from_u16(status).unwrap(),
                headers: Default::default(),
                body: Value::Null,
            })
            .class
        };
        for s in [420, 429, 500, 502] {
            assert_eq!(class(s), ErrorClass::Retryable, "{s}");
        }
        for s in [401, 403] {
            assert_eq!(class(s), ErrorClass::Auth, "{s}");
        }
        for s in [400, 409, 422] {
            assert_eq!(class(s), ErrorClass::Ambiguous, "{s}");
        }
        assert_eq!(class(404), ErrorClass::Permanent);
    }

    #[tokio::test]
    async fn failing_token_calls_are_auth_or_retryable_and_never_echo_the_answer() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/rest/auth/token"))
            .respond_with(
                ResponseTemplate::new(401).set_body_json(
                    json!({"message": "Invalid credentials", "code": "UNAUTHORIZED"}),
                ),
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
            assert_eq!(verdict(Approve, s), Verdict::Pending, "{s}");
            assert_eq!(verdict(Reject, s), Verdict::Pending, "{s}");
        }
        for s in ["APPROVED", "SIGNED", "SUBMITTED"] {
            assert_eq!(verdict(Approve, s), Verdict::AsDecided, "{s}");
            assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
        }
        for s in ["REJECTED", "ABORTED"] {
            assert_eq!(verdict(Reject, s), Verdict::AsDecided, "{s}");
            assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
        }
        for s in ["EXPIRED", "BLOCKED"] {
            assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
            assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
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
    fn disabled_without_every_credential_and_checks_the_challenge_path() {
        for missing in ["WORKSPACE", "API_KEY_ID", "API_KEY_SECRET", "SIGNING_KEY"] {
            let mut vars = env("http://127.0.0.1:9");
            vars.retain(|(k, _)| !k.ends_with(&format!("V2__{missing}")));
            assert!(build_with(vars).unwrap().is_none(), "{missing}");
        }
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
}
