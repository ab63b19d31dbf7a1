//! Qonto Business API (PROVIDERS.md section 1, seed 002).
//!
//! Decline: `POST /v2/requests/{type}/{id}/decline` with `{"declined_note"}`.
//! Approve: `POST /v2/requests/{type}/{id}/approve` (`{"debit_iban"}` when
//! given); a 428 starts the SCA wait. Both carry `X-Qonto-Idempotency-Key`,
//! and Qonto replays the cached success for a key within 30 minutes.

pub mod sim;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{
    contract::{
        CallContext, Client, ConfirmationState, Observed, Provider, Reply, Unit, Verdict,
        credentials,
    },
    http::{self, Http, Response, SecretHeader},
};
use crate::{
    decision::{Action, Decision, required_reason},
    retry::{CallError, ErrorClass},
    settings::{Credential, ProviderSections, SettingsError, check_base_url, present},
};

pub const NAME: &str = "qonto";

/// Path form (plural) and resource form (singular) of each request type.
const REQUEST_TYPES: &[(&str, &str)] = &[
    ("transfers", "transfer"),
    ("multi_transfers", "multi_transfer"),
    ("flash_cards", "flash_card"),
    ("virtual_cards", "virtual_card"),
];

/// 422 codes that say "this request can never pass", as opposed to an
/// unexpected 422 (likely "not pending") that calls for reconciliation.
const PERMANENT_422_CODES: &[&str] = &["kyc_not_accepted", "insufficient_funds", "invalid_iban"];

/// Reconciliation reads the request list; bound the pages we walk.
const MAX_LIST_PAGES: u32 = 20;

#[derive(Deserialize)]
struct QontoSettings {
    base_url: String,
    login: Option<Credential>,
    secret_key: Option<Credential>,
    access_token: Option<Credential>,
    staging_token: Option<Credential>,
}

enum Auth {
    /// `Authorization: {login}:{secret_key}`, one raw string, not Basic.
    ApiKey(SecretString),
    Bearer(SecretString),
}

pub struct Qonto {
    http: Http,
    base: Url,
    auth: Auth,
    staging_token: Option<SecretString>,
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
    let s: QontoSettings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    // Two credential sets: the API key (login and secret key together),
    // else an OAuth access token; the API key wins when both are set.
    let api_key = credentials(
        NAME,
        [
            ("login", present(&s.login)),
            ("secret_key", present(&s.secret_key)),
        ],
    )?;
    let auth = match (api_key, present(&s.access_token)) {
        (Some([login, secret]), _) => Auth::ApiKey(SecretString::from(format!(
            "{}:{}",
            login.expose_secret(),
            secret.expose_secret()
        ))),
        (None, Some(token)) => Auth::Bearer(token.clone()),
        (None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(Qonto {
        http: http.clone(),
        base,
        auth,
        staging_token: present(&s.staging_token).cloned(),
    })))
}

/// A decision's target as Qonto's calls need it.
pub struct Target<'d> {
    /// The request type as the decision path spells it (`transfers`).
    plural: &'static str,
    /// The same type as the request list filters on (`transfer`).
    singular: &'static str,
    id: &'d str,
    /// What the decision call carries beyond the path.
    body: Body<'d>,
}

enum Body<'d> {
    Decline { note: &'d str },
    Approve { debit_iban: Option<&'d str> },
}

fn target(d: &Decision) -> Result<Target<'_>, String> {
    let raw_type = d
        .target_str("request_type")
        .ok_or("missing required field target.request_type (a string)")?;
    let (plural, singular) = REQUEST_TYPES
        .iter()
        .find(|(p, s)| *p == raw_type || *s == raw_type)
        .copied()
        .ok_or_else(|| {
            format!(
                "target.request_type must be one of transfers, multi_transfers, flash_cards, virtual_cards (or singular), got {:?}",
                raw_type.chars().take(40).collect::<String>()
            )
        })?;
    let id = d
        .target_str("request_id")
        .ok_or("missing required field target.request_id (a string)")?;
    // Only the canonical hyphenated form: it is also a safe path segment.
    if id.len() != 36 || uuid::Uuid::try_parse(id).is_err() {
        return Err("target.request_id must be a UUID (8-4-4-4-12 hex digits)".to_owned());
    }
    let body = match d.action {
        Action::Reject => Body::Decline {
            note: required_reason(d, None)?,
        },
        Action::Approve => Body::Approve {
            debit_iban: debit_iban(d)?,
        },
    };
    Ok(Target {
        plural,
        singular,
        id,
        body,
    })
}

fn debit_iban(d: &Decision) -> Result<Option<&str>, String> {
    match d.target.get("debit_iban") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(iban)) => {
            let compact: String = iban.chars().filter(|c| *c != ' ').collect();
            if (15..=34).contains(&compact.len())
                && compact.chars().all(|c| c.is_ascii_alphanumeric())
            {
                Ok(Some(iban))
            } else {
                Err("target.debit_iban must be an IBAN (15..34 letters and digits)".to_owned())
            }
        }
        Some(_) => Err("target.debit_iban must be a string".to_owned()),
    }
}

impl Qonto {
    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        let req = self
            .http
            .client()
            .request(method, url)
            .header("Accept", "application/json");
        let mut req = match &self.auth {
            Auth::ApiKey(v) => req.secret_header("Authorization", v.expose_secret()),
            Auth::Bearer(t) => req.bearer_auth(t.expose_secret()),
        };
        if let Some(staging) = &self.staging_token {
            req = req.secret_header("X-Qonto-Staging-Token", staging.expose_secret());
        }
        req
    }

    /// Qonto's error classes, in one place.
    fn classify(response: &Response) -> CallError {
        let (code, detail) = error_code(&response.body);
        let class = match response.status.as_u16() {
            422 if code
                .as_deref()
                .is_some_and(|c| PERMANENT_422_CODES.contains(&c)) =>
            {
                ErrorClass::Permanent
            }
            // A 403 is a membership without the right to decide this request
            // (the credential itself was accepted) and a 400 a call Qonto
            // cannot parse: a read explains neither and a retry fixes neither.
            // Qonto documents no 420.
            400 | 403 | 420 => ErrorClass::Permanent,
            // A 401 (the shared table's Auth) is a static credential that a
            // retry cannot fix; Qonto also throttles after 200 401s an hour.
            _ => http::default_class(response.status),
        };
        http::error(class, response, code, detail)
    }
}

/// `{"errors":[{"code","detail"}]}` → (code, detail) of the first error.
fn error_code(body: &Value) -> (Option<String>, Option<String>) {
    let first = body.get("errors").and_then(|e| e.get(0));
    let field = |k: &str| {
        first
            .and_then(|e| e.get(k))
            .and_then(Value::as_str)
            .map(|s| s.chars().take(500).collect())
    };
    let detail = field("detail").or_else(|| {
        body.get("message")
            .and_then(Value::as_str)
            .map(|s| s.chars().take(500).collect())
    });
    (field("code"), detail)
}

/// The single `request_*` object a 200 wraps.
fn wrapped_request(body: &Value) -> Option<&Value> {
    body.as_object()?
        .iter()
        .find(|(k, v)| k.starts_with("request") && v.is_object())
        .map(|(_, v)| v)
}

fn verdict(action: Action, status: &str) -> Verdict {
    match (action, status) {
        (_, "pending") => Verdict::Pending,
        (Action::Approve, "approved") | (Action::Reject, "declined") => Verdict::AsDecided,
        _ => Verdict::Conflict,
    }
}

impl Provider for Qonto {
    fn name(&self) -> &'static str {
        NAME
    }

    fn idempotent(&self) -> bool {
        true
    }

    type Target<'d> = Target<'d>;

    fn validate<'d>(&self, d: &'d Decision) -> Result<Target<'d>, String> {
        target(d)
    }

    fn target_key(&self, t: &Self::Target<'_>) -> String {
        t.id.to_owned()
    }

    async fn apply(
        &self,
        d: &Decision,
        t: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let verb = match d.action {
            Action::Approve => "approve",
            Action::Reject => "decline",
        };
        let url = http::join(
            &self.base,
            &format!("/v2/requests/{}/{}/{verb}", t.plural, http::segment(t.id)),
        );
        let mut req = self
            .request(Method::POST, url)
            .header("X-Qonto-Idempotency-Key", &ctx.idempotency_key);
        if let Some(token) = &ctx.confirmation_token {
            req = req.header("X-Qonto-Sca-Session-Token", token);
        }
        let body = match t.body {
            Body::Decline { note } => Some(json!({ "declined_note": note })),
            Body::Approve { debit_iban } => debit_iban.map(|iban| json!({ "debit_iban": iban })),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        let response = self.http.send(NAME, verb, req).await?;
        if response.status.is_success() {
            let state = wrapped_request(&response.body)
                .and_then(|r| r.get("status"))
                .and_then(Value::as_str)
                .map(str::to_owned);
            return Ok(Reply::Done {
                state,
                response: response.body,
            });
        }
        if response.status == StatusCode::PRECONDITION_REQUIRED
            && d.action == Action::Approve
            && let Some(token) = sca_token(&response.body)
        {
            let expires_at = response
                .body
                .get("sca_session_expires_at")
                .and_then(Value::as_str)
                .map(str::to_owned);
            return Ok(Reply::NeedsConfirmation {
                token,
                expires_at,
                response: response.body,
            });
        }
        Err(Self::classify(&response))
    }

    async fn read_state(&self, d: &Decision, t: &Self::Target<'_>) -> Result<Observed, CallError> {
        let (singular, id) = (t.singular, t.id);
        for page in 1..=MAX_LIST_PAGES {
            let mut url = http::join(&self.base, "/v2/requests");
            url.query_pairs_mut()
                .append_pair("request_type[]", singular)
                .append_pair("per_page", "100")
                .append_pair("page", &page.to_string());
            let response = self
                .http
                .send(NAME, "read", self.request(Method::GET, url))
                .await?;
            if !response.status.is_success() {
                return Err(Self::classify(&response));
            }
            let requests = response.body.get("requests").and_then(Value::as_array);
            if let Some(found) = requests
                .into_iter()
                .flatten()
                .find(|r| r.get("id").and_then(Value::as_str) == Some(id))
            {
                let state = found
                    .get("status")
                    .and_then(Value::as_str)
                    .unwrap_or("unknown");
                return Ok(Observed {
                    state: state.to_owned(),
                    verdict: verdict(d.action, state),
                    response: found.clone(),
                });
            }
            let next = response.body.pointer("/meta/next_page");
            if next.is_none_or(Value::is_null) {
                break;
            }
        }
        Err(CallError::new(
            ErrorClass::Permanent,
            format!("request {id} is not in Qonto's request list"),
        ))
    }

    async fn poll_confirmation(&self, token: &str) -> Result<ConfirmationState, CallError> {
        let url = http::join(
            &self.base,
            &format!("/v2/sca_sessions/{}", http::segment(token)),
        );
        let response = self
            .http
            .send(NAME, "sca_poll", self.request(Method::GET, url))
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        Ok(match response.body.get("result").and_then(Value::as_str) {
            Some("allow") => ConfirmationState::Allowed,
            Some("deny") => ConfirmationState::Denied,
            _ => ConfirmationState::Waiting,
        })
    }
}

/// The SCA session token of a 428, top level or inside the first error.
fn sca_token(body: &Value) -> Option<String> {
    body.get("sca_session_token")
        .or_else(|| body.pointer("/errors/0/sca_session_token"))
        .or_else(|| body.pointer("/errors/0/meta/sca_session_token"))
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty() && t.len() <= 512)
        .map(str::to_owned)
}
