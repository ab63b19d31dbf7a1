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
//! A 2xx counts as applied only when its `data` names our reference and
//! shows the decided state (`COMPLETED` for accept, `REJECTED` for reject);
//! anything else is ambiguous and reconciled by reading the transaction.
//!
//! FlexPay documents no idempotency on accept and reject: we still send
//! `Idempotency-Key`, and the worker reads the state before any repeat.
//! The single-transaction read is UNCONFIRMED (configurable `read_path`);
//! when it does not exist we fall back to the pending list. Found there
//! means pending; absent proves nothing (an accepted transaction leaves the
//! list as surely as a rejected or expired one), so the state is unknown
//! and the read fails as one to repeat later, within the retry horizon.

pub mod sim;
#[cfg(test)]
mod tests;

use std::{sync::Arc, time::Duration};

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
    decision::{Action, Decision, required_reason, target_segment},
    retry::{self, CallError, ErrorClass},
    settings::{
        Credential, ProviderSections, SettingsError, check_base_url, check_path_template, present,
    },
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
    client_id: Option<Credential>,
    client_secret: Option<Credential>,
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
    let s: FlexPaySettings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "read_path", &s.read_path, "{reference}")?;
    let Some([client_id, client_secret]) = credentials(
        NAME,
        [
            ("client_id", present(&s.client_id)),
            ("client_secret", present(&s.client_secret)),
        ],
    )?
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

/// A decision's target as FlexPay's calls need it.
pub struct Target<'d> {
    reference: &'d str,
    /// The reject call's body; an accept sends none.
    reject: Option<RejectBody<'d>>,
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
        .and_then(super::auth::lifetime)
        .filter(|ttl| !ttl.is_zero())
        .unwrap_or(DEFAULT_TOKEN_TTL);
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

/// The status a transaction shows once the decision is applied.
fn decided_status(action: Action) -> &'static str {
    match action {
        Action::Approve => "COMPLETED",
        Action::Reject => "REJECTED",
    }
}

fn verdict(action: Action, status: &str) -> Verdict {
    if status == "AWAITING_ACCEPTANCE" {
        Verdict::Pending
    } else if status == decided_status(action) {
        Verdict::AsDecided
    } else {
        // The other decision, EXPIRED, or a status we do not know.
        Verdict::Conflict
    }
}

/// Provider text quoted in our messages, bounded.
fn clip(s: &str) -> String {
    s.chars().take(100).collect()
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
            // No code for "not pending any more" is documented: unless the
            // code says the request itself is wrong, reconcile.
            200..=299 | 400 | 409 | 422 if permanent_code => ErrorClass::Permanent,
            // `success: false` on a 2xx is read like a 400 without a code.
            200..=299 => ErrorClass::Ambiguous,
            // FlexPay documents no 420: an unexpected status.
            420 => ErrorClass::Permanent,
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
        let (class, message) = match status {
            429 | 500..=599 => (
                ErrorClass::Retryable,
                format!("FlexPay token exchange failed (HTTP {status})"),
            ),
            // Refused credentials (or a token endpoint that is not there):
            // retrying cannot fix it.
            _ => (
                ErrorClass::Auth,
                format!(
                    "FlexPay token exchange failed (HTTP {status}): check CLIENT_ID and CLIENT_SECRET"
                ),
            ),
        };
        // Nothing of the body: a token endpoint may echo the client id or
        // secret in it, and the error travels into outcome events, parked
        // headers and logs. The status and Retry-After are all we keep.
        let mut e = CallError::new(class, message);
        e.http_status = Some(status);
        e.retry_after = retry::retry_after(&response.headers);
        Err(e)
    }

    fn request(&self, method: Method, url: Url, token: &SecretString) -> RequestBuilder {
        self.http
            .client()
            .request(method, url)
            .bearer_auth(token.expose_secret())
            .header("Accept", "application/json")
    }

    /// Sends under the cached JWT, exchanging the credentials again once on
    /// a 401 (FlexPay issues no refresh token). A 401 that survives the
    /// exchange is an auth failure, named as such.
    async fn call(
        &self,
        operation: &'static str,
        build: impl Fn(&SecretString) -> RequestBuilder,
    ) -> Result<Response, CallError> {
        let fetch = |_| self.fetch_token();
        let response = self
            .tokens
            .send(&self.http, operation, fetch, build)
            .await?;
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
    /// simply not visible to us), so it is no verdict but a read to repeat
    /// later: the worker keeps reconciling within the retry horizon rather
    /// than report `failed` (or `already_applied`) on a guess.
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
                    ErrorClass::Retryable,
                    format!(
                        "FlexPay transaction {reference} is not in the pending list and cannot be \
                         read alone: its state is unknown (absence proves nothing)"
                    ),
                ));
            }
        }
        Err(CallError::new(
            ErrorClass::Retryable,
            format!(
                "FlexPay transaction {reference} is not in the first {MAX_PENDING_PAGES} pages of \
                 the pending list and cannot be read alone: its state is unknown"
            ),
        ))
    }
}

impl Provider for FlexPay {
    fn name(&self) -> &'static str {
        NAME
    }

    type Target<'d> = Target<'d>;

    fn validate<'d>(&self, d: &'d Decision) -> Result<Target<'d>, String> {
        let reference = target_segment(d, "reference")?;
        let reject = match d.action {
            Action::Reject => Some(RejectBody {
                reason: required_reason(d, Some(MAX_REASON_CHARS))?,
            }),
            Action::Approve => None,
        };
        Ok(Target { reference, reject })
    }

    fn target_key(&self, t: &Self::Target<'_>) -> String {
        t.reference.to_owned()
    }

    async fn apply(
        &self,
        d: &Decision,
        t: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let (reference, body) = (t.reference, t.reject.as_ref());
        let verb = if body.is_some() { "reject" } else { "accept" };
        let url = http::join(
            &self.base,
            &format!("/v1/transactions/{}/{verb}", http::segment(reference)),
        );
        let response = self
            .call(verb, |token| {
                let req = self
                    .request(Method::POST, url.clone(), token)
                    .header("Idempotency-Key", &ctx.idempotency_key);
                match body {
                    Some(body) => req.json(body),
                    None => req,
                }
            })
            .await?;
        if !response.status.is_success() || refused(&response.body) {
            return Err(Self::classify(&response));
        }
        let decided = decided_status(d.action);
        let data = response.body.get("data");
        let status = response.status.as_u16();
        // A 2xx is proof only of what it names: a reply for another
        // transaction (a proxy, a cache, a mix-up) or in another state says
        // nothing about ours, so the worker reads ours.
        let problem = match data
            .and_then(|d| d.get("reference"))
            .and_then(Value::as_str)
        {
            None => format!(
                "FlexPay answered HTTP {status} without naming the transaction (data.reference)"
            ),
            Some(named) if named != reference => format!(
                "FlexPay answered HTTP {status} for transaction {}, not {reference}",
                clip(named)
            ),
            Some(_) => match data.and_then(status_of) {
                Some(state) if state == decided => {
                    return Ok(Reply::Done {
                        state: Some(state),
                        response: response.body,
                    });
                }
                Some(state) => format!(
                    "FlexPay answered HTTP {status} but transaction {reference} shows {}, not {decided}",
                    clip(&state)
                ),
                None => format!(
                    "FlexPay answered HTTP {status} but transaction {reference} shows no status, not {decided}"
                ),
            },
        };
        Err(http::error(
            ErrorClass::Ambiguous,
            &response,
            None,
            Some(problem),
        ))
    }

    async fn read_state(&self, d: &Decision, t: &Self::Target<'_>) -> Result<Observed, CallError> {
        let reference = t.reference;
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
        let named = match data.get("reference") {
            None | Some(Value::Null) => None,
            Some(Value::String(named)) if named == reference => None,
            Some(Value::String(named)) => Some(clip(named)),
            Some(_) => Some("a reference that is not a string".to_owned()),
        };
        if let Some(named) = named {
            return Err(http::error(
                ErrorClass::Ambiguous,
                &response,
                None,
                Some(format!(
                    "FlexPay's read of transaction {reference} answered for {named}"
                )),
            ));
        }
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
