//! Ledger Enterprise API v2, "revault-api" (PROVIDERS.md sections 3 and 4,
//! seed 000).
//!
//! Approve and reject are both three calls under one bearer token:
//! 1. the action's own challenge: `GET {challenge_path}` for an approve,
//!    `GET {reject_challenge_path}` for a reject (both configurable and
//!    UNCONFIRMED publicly; the defaults `/rest/requests/{request_id}/challenge`
//!    and `.../challenge/reject` are the paths Ledger v1 documents), answered
//!    `{"challenge"}` (or `{"data":{"challenge"}}`);
//! 2. the decoded challenge is checked against the decision: the HSM acts on
//!    what is signed, not on the call it is sent with, so a challenge whose
//!    `type` is not the decision's action, or that names another request, is
//!    never signed ([`ErrorClass::ChallengeMismatch`]); the bytes are then
//!    signed as an ES256 compact JWS with the API user's P-256 key ([`jws`]);
//! 3. `POST /rest/requests/{request_id}/approve` (or `/reject`) with
//!    `{"data":{"signature":"<jws>","challengeType":"API"}}`.
//!
//! A 2xx is not taken on trust: the answer must name the decision's request
//! and show the decided state, or for an approve a pending state with our
//! approval among its `reviews`; anything else is ambiguous and reconciled by
//! reading the request. Our own review is recognised by the API user's id
//! (`user_id`, optional): with it, a read that shows the request pending with
//! our approval recorded counts as already applied (a quorum approval that
//! timed out), so it is never sent twice.
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

mod jws;
pub mod sim;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

use p256::ecdsa::SigningKey;
use reqwest::{Method, RequestBuilder, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    auth::{Token, TokenCache},
    contract::{CallContext, Client, Observed, Provider, Reply, Unit, Verdict, credentials},
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision, target_segment},
    outcome::bound_response,
    retry::{CallError, ErrorClass},
    settings::{
        Credential, ProviderSections, SettingsError, check_base_url, check_path_template, env_key,
        present,
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
    reject_challenge_path: String,
    /// The API user's id as Ledger names it in `reviews[].userId`.
    user_id: Option<String>,
    workspace: Option<Credential>,
    api_key_id: Option<Credential>,
    api_key_secret: Option<Credential>,
    /// PEM text, hex of PEM (Ledger's samples), or a path to a file.
    signing_key: Option<Credential>,
}

pub struct LedgerV2 {
    http: Http,
    base: Url,
    challenge_path: String,
    reject_challenge_path: String,
    user_id: Option<String>,
    workspace: String,
    api_key_id: SecretString,
    api_key_secret: SecretString,
    signing_key: SigningKey,
    tokens: TokenCache,
}

/// This provider's registry line: its name in decisions, its client, and
/// its simulator half.
pub(crate) const UNIT: Unit = Unit {
    name: NAME,
    build,
    sim: &sim::Half,
};

pub fn build(
    sections: &ProviderSections,
    http: &Http,
) -> Result<Option<Arc<dyn Client>>, SettingsError> {
    let s: LedgerV2Settings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "challenge_path", &s.challenge_path, "{request_id}")?;
    check_path_template(
        NAME,
        "reject_challenge_path",
        &s.reject_challenge_path,
        "{request_id}",
    )?;
    let secret = |key| present(key).map(ExposeSecret::expose_secret);
    let Some([workspace, api_key_id, api_key_secret, signing_key]) = credentials(
        NAME,
        [
            ("workspace", secret(&s.workspace)),
            ("api_key_id", secret(&s.api_key_id)),
            ("api_key_secret", secret(&s.api_key_secret)),
            ("signing_key", secret(&s.signing_key)),
        ],
    )?
    else {
        return Ok(None);
    };
    // Loaded now so a bad key stops start-up instead of failing every
    // decision. JwsError messages never quote the input.
    let signing_key = jws::load_signing_key(signing_key).map_err(|e| SettingsError::Invalid {
        key: env_key(&format!("providers.{NAME}.signing_key")),
        problem: e.to_string(),
    })?;
    Ok(Some(Arc::new(LedgerV2 {
        http: http.clone(),
        base,
        challenge_path: s.challenge_path,
        reject_challenge_path: s.reject_challenge_path,
        user_id: s
            .user_id
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty()),
        workspace: workspace.to_owned(),
        api_key_id: SecretString::from(api_key_id.to_owned()),
        api_key_secret: SecretString::from(api_key_secret.to_owned()),
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
    /// Read leniently: an odd lifetime must not cost the token.
    expires_in_seconds: Option<Value>,
    refresh_token: Option<String>,
    refresh_expires_in_seconds: Option<Value>,
}

fn lifetime_or(v: Option<&Value>, default_secs: u64) -> Duration {
    v.and_then(super::auth::lifetime)
        .unwrap_or(Duration::from_secs(default_secs))
}

/// How a request's state reads for the decision; `ours_recorded` says
/// whether the request's reviews show our own approval.
fn verdict(action: Action, state: &str, ours_recorded: bool) -> Verdict {
    let state = state.to_ascii_uppercase();
    let decided = match action {
        Action::Approve => AFTER_APPROVAL,
        Action::Reject => AFTER_REJECTION,
    };
    if WAITING.contains(&state.as_str()) {
        // A request stays pending after our approval while the quorum is
        // incomplete: approving again would be refused and reported failed.
        if action == Action::Approve && ours_recorded {
            Verdict::AsDecided
        } else {
            Verdict::Pending
        }
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

/// At most this much of a provider's text goes into one of our messages.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

/// A value as the name of something, for comparing and quoting: a string
/// as is, a number in decimal; anything else names nothing.
fn name_of(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// Whether a review's `status` records an approval. The review status enum
/// is not public (only `PENDING` is shown), so both verb forms count.
fn approves(review: &Value) -> bool {
    review
        .get("status")
        .and_then(Value::as_str)
        .is_some_and(|s| s.eq_ignore_ascii_case("APPROVED") || s.eq_ignore_ascii_case("APPROVE"))
}

/// Whether `reviews[]` holds an approval by `user` (by anyone when `None`).
fn approval_recorded(body: &Value, user: Option<&str>) -> bool {
    let Some(reviews) = body.get("reviews").and_then(Value::as_array) else {
        return false;
    };
    reviews.iter().any(|r| {
        approves(r) && user.is_none_or(|u| r.get("userId").and_then(name_of).as_deref() == Some(u))
    })
}

/// Why an answer about a request is not about request `id`, if it is not.
/// A request's id is a string: a number or anything else names another.
fn other_request(body: &Value, id: &str) -> Option<String> {
    match body.get("id") {
        Some(Value::String(named)) if named == id => None,
        Some(Value::String(named)) => Some(format!("it names request {}", clip(named))),
        Some(other) => Some(format!(
            "its id is not a string ({})",
            clip(&other.to_string())
        )),
        None => Some("it names no request".to_owned()),
    }
}

/// Why the decoded challenge must not be signed for `action` on request
/// `id`, if it must not. Its `type` must name the action (`APPROVE_...`,
/// `REJECT_...`); where it names a request (`request_id` or `requestId`, at
/// the top or under `data`), that must be ours.
fn challenge_mismatch(payload: &[u8], action: Action, id: &str) -> Option<String> {
    let Ok(challenge) = serde_json::from_slice::<Value>(payload) else {
        return Some("it does not decode to a JSON object".to_owned());
    };
    let Some(kind) = challenge.get("type").and_then(Value::as_str) else {
        return Some("it has no type".to_owned());
    };
    let wanted = match action {
        Action::Approve => "APPROVE",
        Action::Reject => "REJECT",
    };
    if !kind.to_ascii_uppercase().starts_with(wanted) {
        return Some(format!(
            "its type {} is not a challenge to {}",
            clip(kind),
            action.as_str()
        ));
    }
    let places = [Some(&challenge), challenge.get("data")];
    for named in places
        .into_iter()
        .flatten()
        .flat_map(|v| [v.get("request_id"), v.get("requestId")])
        .flatten()
    {
        if name_of(named).as_deref() != Some(id) {
            return Some(format!(
                "it is for request {}",
                clip(&name_of(named).unwrap_or_else(|| named.to_string()))
            ));
        }
    }
    None
}

impl LedgerV2 {
    fn url(&self, path: &str) -> Url {
        http::join(&self.base, path)
    }

    fn request(&self, method: Method, url: Url, bearer: &SecretString) -> RequestBuilder {
        self.http
            .client()
            .request(method, url)
            .bearer_auth(bearer.expose_secret())
            .header("Accept", "application/json")
    }

    /// Ledger v2's error classes for every call but the token ones.
    fn classify(response: &Response) -> CallError {
        let (code, message) = error_fields(&response.body);
        // The shared table as it stands: v2's rate-limit answer is
        // undocumented, so v1's 420 counts too; a 401 here already survived
        // one token renewal; no conflict answer is documented (PROVIDERS.md 3.1).
        let class = http::default_class(response.status);
        http::error(class, response, code, message)
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
            expires_in: lifetime_or(answer.expires_in_seconds.as_ref(), DEFAULT_ACCESS_TTL),
            refresh: answer.refresh_token.map(|t| {
                let ttl = lifetime_or(
                    answer.refresh_expires_in_seconds.as_ref(),
                    DEFAULT_REFRESH_TTL,
                );
                (SecretString::from(t), ttl)
            }),
        })
    }

    /// Sends a call under the cached token, renewed once on a 401.
    async fn send_authed(
        &self,
        operation: &'static str,
        make: impl Fn(&SecretString) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        let fetch = |refresh| self.fetch_token(refresh);
        self.tokens.send(&self.http, operation, fetch, make).await
    }

    /// Whether `body` shows our own approval: by our user id when it is
    /// configured; without it, a read cannot tell ours from another
    /// approver's, so only an answer to our own approve call may count any.
    fn ours_recorded(&self, body: &Value) -> bool {
        self.user_id
            .as_deref()
            .is_some_and(|user| approval_recorded(body, Some(user)))
    }

    /// Why the answer to our `action` call does not prove it was applied to
    /// request `id`, if it does not.
    fn unproven(&self, action: Action, id: &str, body: &Value) -> Option<String> {
        if let Some(problem) = other_request(body, id) {
            return Some(problem);
        }
        let Some(state) = state_of(body) else {
            return Some("it has no state".to_owned());
        };
        // The answer to our own approve call: without our user id, an
        // approval recorded in it is taken to be the one just made.
        let recorded = approval_recorded(body, self.user_id.as_deref());
        match verdict(action, &state, recorded) {
            Verdict::AsDecided => None,
            Verdict::Pending if action == Action::Approve => Some(format!(
                "the request is {} without our approval among its reviews",
                clip(&state)
            )),
            _ => Some(format!("the request is {}", clip(&state))),
        }
    }

    async fn challenge(
        &self,
        action: Action,
        id: &str,
        ctx: &CallContext,
    ) -> Result<String, CallError> {
        let (template, key) = match action {
            Action::Approve => (&self.challenge_path, "CHALLENGE_PATH"),
            Action::Reject => (&self.reject_challenge_path, "REJECT_CHALLENGE_PATH"),
        };
        let url = self.url(&template.replace("{request_id}", &http::segment(id)));
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
                response: Some(bound_response(response.body)),
                ..CallError::new(
                    ErrorClass::Permanent,
                    format!(
                        "the challenge answer for request {id} has no challenge field (check APPROVAL_PROVIDERS__LEDGER_V2__{key})"
                    ),
                )
            }),
        }
    }
}

impl Provider for LedgerV2 {
    fn name(&self) -> &'static str {
        NAME
    }

    type Target<'d> = &'d str;

    fn validate<'d>(&self, d: &'d Decision) -> Result<&'d str, String> {
        target_segment(d, "request_id")
    }

    fn target_key(&self, id: &Self::Target<'_>) -> String {
        (*id).to_owned()
    }

    async fn apply(
        &self,
        d: &Decision,
        id: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let id = *id;
        let challenge = self.challenge(d.action, id, ctx).await?;
        let verb = d.action.as_str();
        let problem = match jws::decode_challenge(&challenge) {
            Ok(payload) => challenge_mismatch(&payload, d.action, id),
            Err(e) => Some(e.to_string()),
        };
        if let Some(problem) = problem {
            return Err(CallError::new(
                ErrorClass::ChallengeMismatch,
                format!("the challenge read to {verb} request {id} was not signed: {problem}"),
            ));
        }
        let signature = jws::sign_challenge(&self.signing_key, &challenge).map_err(|e| {
            CallError::new(
                ErrorClass::Permanent,
                format!("the challenge for request {id} cannot be signed: {e}"),
            )
        })?;
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
        if let Some(problem) = self.unproven(d.action, id, &response.body) {
            return Err(CallError {
                response: Some(bound_response(response.body)),
                ..CallError::new(
                    ErrorClass::Ambiguous,
                    format!(
                        "the {verb} answer (HTTP {}) does not show the {verb} applied to request {id}: {problem}",
                        response.status.as_u16()
                    ),
                )
            });
        }
        Ok(Reply::Done {
            state: state_of(&response.body),
            response: response.body,
        })
    }

    async fn read_state(&self, d: &Decision, id: &Self::Target<'_>) -> Result<Observed, CallError> {
        let id = *id;
        let url = self.url(&format!("/rest/requests/{}", http::segment(id)));
        let response = self
            .send_authed("read", |token| {
                self.request(Method::GET, url.clone(), token)
            })
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let problem = match (other_request(&response.body, id), state_of(&response.body)) {
            (Some(problem), _) => problem,
            (None, None) => "it has no state".to_owned(),
            (None, Some(state)) => {
                let recorded = self.ours_recorded(&response.body);
                return Ok(Observed {
                    verdict: verdict(d.action, &state, recorded),
                    state,
                    response: response.body,
                });
            }
        };
        Err(CallError {
            response: Some(bound_response(response.body)),
            ..CallError::new(
                ErrorClass::Ambiguous,
                format!("the read of request {id} does not show its state: {problem}"),
            )
        })
    }
}
