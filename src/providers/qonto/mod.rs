//! Qonto Business API (PROVIDERS.md section 1, seed 002).
//!
//! Decline: `POST /v2/requests/{type}/{id}/decline` with `{"declined_note"}`.
//! Approve: `POST /v2/requests/{type}/{id}/approve` (`{"debit_iban"}` when
//! given); a 428 starts the SCA wait. Both carry `X-Qonto-Idempotency-Key`,
//! and Qonto replays the cached success for a key within 30 minutes.

pub mod oauth;
pub mod sim;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use time::format_description::well_known::Rfc3339;

use super::{
    contract::{
        CallContext, Client, ConfirmationState, Observed, Provider, Reply, Unit, Verdict,
        credentials,
    },
    http::{self, Http, Response, SecretHeader},
};
use crate::{
    decision::{Action, Decision, required_reason},
    outcome::bounded_copy,
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

/// Qonto has no single-request read, so reconciliation reads the request
/// list, filtered so the target sits on the first page in every usual case,
/// in these passes, each walked for at most [`PAGES_PER_PASS`] pages of
/// [`PER_PAGE`]. A target none of them finds is reported unread rather than
/// walking the whole list (one call per 100 requests against Qonto's
/// per-IP quota, and never complete for a large organisation).
const PASSES: &[Pass] = &[
    Pass::DecidedLately,
    Pass::StillPending,
    Pass::DecidedEarlier,
];
const PAGES_PER_PASS: u32 = 2;
/// The most list calls one reconciliation read makes.
const MAX_LIST_CALLS: u32 = PASSES.len() as u32 * PAGES_PER_PASS;
/// Qonto's maximum page size.
const PER_PAGE: &str = "100";
/// How far back "decided lately" looks. Our own call lands well inside it:
/// the retry horizon (25 min) plus an SCA wait (15 min) is far shorter.
const DECIDED_WINDOW: time::Duration = time::Duration::hours(24);

/// One filtered walk of the request list.
#[derive(Clone, Copy)]
enum Pass {
    /// In the decided state, processed within [`DECIDED_WINDOW`], the most
    /// recent first: where our own call (or a replay of it) puts the target.
    DecidedLately,
    /// Still pending, the oldest first: a request waits from its creation,
    /// so a backlog's newest entries are the last to matter.
    StillPending,
    /// Decided either way at any time, the most recent first: a person
    /// (or another decision) got there before us.
    DecidedEarlier,
}

/// What the worker keeps of an answer in place of an SCA session token.
const REDACTED: &str = "[redacted]";

#[derive(Deserialize)]
struct QontoSettings {
    base_url: String,
    login: Option<Credential>,
    secret_key: Option<Credential>,
    access_token: Option<Credential>,
    staging_token: Option<Credential>,
    #[serde(default)]
    oauth: oauth::OAuthSettings,
}

enum Auth {
    /// `Authorization: {login}:{secret_key}`, one raw string, not Basic.
    ApiKey(SecretString),
    Bearer(SecretString),
    /// A rotating pair kept by the token source (CONTRACT v2 section 6).
    Rotating(Arc<oauth::TokenSource>),
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
    let staging_token = present(&s.staging_token).cloned();
    // Three credential sets: an OAuth client wins (the contract's rule),
    // then the API key (login and secret key together), then a static
    // access token.
    let oauth = oauth::OAuthConfig::from_settings(&s.oauth, staging_token.as_ref())?;
    let api_key = credentials(
        NAME,
        [
            ("login", present(&s.login)),
            ("secret_key", present(&s.secret_key)),
        ],
    )?;
    let auth = match (oauth, api_key, present(&s.access_token)) {
        (Some(config), _, _) => Auth::Rotating(oauth::TokenSource::new(&config, http)?),
        (None, Some([login, secret]), _) => Auth::ApiKey(SecretString::from(format!(
            "{}:{}",
            login.expose_secret(),
            secret.expose_secret()
        ))),
        (None, None, Some(token)) => Auth::Bearer(token.clone()),
        (None, None, None) => return Ok(None),
    };
    Ok(Some(Arc::new(Qonto {
        http: http.clone(),
        base,
        auth,
        staging_token,
    })))
}

/// The checked OAuth settings, for the `qonto-oauth` commands and `check`;
/// `None` when no OAuth client is configured.
pub fn oauth_config(
    sections: &ProviderSections,
) -> Result<Option<oauth::OAuthConfig>, SettingsError> {
    let s: QontoSettings = sections.section(NAME)?;
    oauth::OAuthConfig::from_settings(&s.oauth, present(&s.staging_token))
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
            // Added per call by `send`, from the token source.
            Auth::Rotating(_) => req,
        };
        if let Some(staging) = &self.staging_token {
            req = req.secret_header("X-Qonto-Staging-Token", staging.expose_secret());
        }
        req
    }

    /// Sends `req` (built by [`Qonto::request`]). With OAuth, the token
    /// source's token goes with it; a 401 re-reads the store and, when a
    /// newer token is there, sends once more (a 401 applied nothing, so the
    /// repeat is safe); a 401 with the freshest token is returned for
    /// `classify` (Auth) and counts towards the source's breaker.
    async fn send(
        &self,
        operation: &'static str,
        req: reqwest::RequestBuilder,
    ) -> Result<Response, CallError> {
        let Auth::Rotating(source) = &self.auth else {
            return self.http.send(NAME, operation, req).await;
        };
        let token = source.token().await?;
        let again = req.try_clone();
        let response = self
            .http
            .send(NAME, operation, req.bearer_auth(token.expose_secret()))
            .await?;
        if response.status != StatusCode::UNAUTHORIZED {
            source.accepted();
            return Ok(response);
        }
        let (Some(fresh), Some(again)) = (source.rejected(&token).await, again) else {
            return Ok(response);
        };
        let response = self
            .http
            .send(NAME, operation, again.bearer_auth(fresh.expose_secret()))
            .await?;
        if response.status == StatusCode::UNAUTHORIZED {
            source.rejected(&fresh).await;
        } else {
            source.accepted();
        }
        Ok(response)
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

/// The single `request_*` object a 200 wraps; none when there are several,
/// as the answer would not say which one it is about.
fn wrapped_request(body: &Value) -> Option<&Value> {
    let mut wrapped = body
        .as_object()?
        .iter()
        .filter(|(k, v)| k.starts_with("request") && v.is_object())
        .map(|(_, v)| v);
    let first = wrapped.next()?;
    wrapped.next().is_none().then_some(first)
}

/// The status Qonto shows once `action` is applied.
fn decided_status(action: Action) -> &'static str {
    match action {
        Action::Approve => "approved",
        Action::Reject => "declined",
    }
}

/// `None` for a status Qonto does not document: it proves nothing either way.
fn verdict(action: Action, status: &str) -> Option<Verdict> {
    match status {
        "pending" => Some(Verdict::Pending),
        s if s == decided_status(action) => Some(Verdict::AsDecided),
        "approved" | "declined" | "canceled" => Some(Verdict::Conflict),
        _ => None,
    }
}

/// At most this much of a provider's text goes into a message.
fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

/// Checks that a 2xx proves the decision applied: it must name our request
/// (Qonto replays a key's cached success for another request, whatever the
/// new call says) in the decided status. `Err` says what it shows instead.
fn proven_state(action: Action, t: &Target<'_>, body: &Value) -> Result<String, String> {
    let request = wrapped_request(body).ok_or("the answer wraps no single request")?;
    match request.get("id") {
        Some(Value::String(id)) if id == t.id => {}
        Some(Value::String(id)) => {
            return Err(format!(
                "the answer is for request {}, not {} (a success cached for the same \
                 idempotency key?)",
                clip(id),
                t.id
            ));
        }
        _ => return Err("the answer names no request id".to_owned()),
    }
    match request.get("request_type") {
        None | Some(Value::Null) => {}
        Some(Value::String(kind)) if kind == t.singular => {}
        Some(_) => return Err(format!("the answer is not for a {} request", t.singular)),
    }
    let decided = decided_status(action);
    match request.get("status").and_then(Value::as_str) {
        Some(status) if status == decided => Ok(status.to_owned()),
        Some(status) => Err(format!(
            "the answer shows request {} {}, not {decided}",
            t.id,
            clip(status)
        )),
        None => Err(format!("the answer shows no status for request {}", t.id)),
    }
}

/// Removes SCA session tokens from an answer before the worker keeps it (the
/// event's `provider_response`, an error message): fields named after the
/// token, and any text quoting one of `tokens`.
fn redact(value: &mut Value, tokens: &[&str]) {
    match value {
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                if key.eq_ignore_ascii_case("sca_session_token") {
                    *v = Value::String(REDACTED.to_owned());
                } else {
                    redact(v, tokens);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|v| redact(v, tokens)),
        Value::String(text) => *text = redact_text(text, tokens),
        _ => {}
    }
}

fn redact_text(text: &str, tokens: &[&str]) -> String {
    tokens
        .iter()
        .filter(|t| !t.is_empty())
        .fold(text.to_owned(), |text, t| text.replace(t, REDACTED))
}

/// `error` with every trace of `tokens` removed.
fn redact_error(mut error: CallError, tokens: &[&str]) -> CallError {
    error.message = redact_text(&error.message, tokens);
    if let Some(response) = error.response.as_mut() {
        redact(response, tokens);
    }
    error
}

impl Provider for Qonto {
    fn name(&self) -> &'static str {
        NAME
    }

    fn idempotent(&self) -> bool {
        true
    }

    /// A revoked OAuth grant, an empty token store, a run of 401s.
    fn problem(&self) -> Option<String> {
        match &self.auth {
            Auth::Rotating(source) => source.problem(),
            _ => None,
        }
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
            req = req.secret_header("X-Qonto-Sca-Session-Token", token);
        }
        let body = match t.body {
            Body::Decline { note } => Some(json!({ "declined_note": note })),
            Body::Approve { debit_iban } => debit_iban.map(|iban| json!({ "debit_iban": iban })),
        };
        if let Some(body) = body {
            req = req.json(&body);
        }
        let mut response = self.send(verb, req).await?;
        // The token we replay with and any a 428 hands out are credentials
        // for this approve: nothing the worker keeps or logs may quote them.
        let new_token = sca_token(&response.body);
        let tokens: Vec<&str> = ctx
            .confirmation_token
            .iter()
            .chain(&new_token)
            .map(String::as_str)
            .collect();
        let proven = response
            .status
            .is_success()
            .then(|| proven_state(d.action, t, &response.body));
        redact(&mut response.body, &tokens);
        match proven {
            Some(Ok(state)) => {
                return Ok(Reply::Done {
                    state: Some(state),
                    response: response.body,
                });
            }
            Some(Err(problem)) => {
                let problem = redact_text(&problem, &tokens);
                let mut error = http::error(ErrorClass::Ambiguous, &response, None, None);
                error.message = format!(
                    "Qonto answered {verb} with a success that does not prove it: {problem}"
                );
                return Err(error);
            }
            None => {}
        }
        if response.status == StatusCode::PRECONDITION_REQUIRED
            && d.action == Action::Approve
            && let Some(token) = new_token
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
        Err(redact_error(Self::classify(&response), &tokens))
    }

    async fn read_state(&self, d: &Decision, t: &Self::Target<'_>) -> Result<Observed, CallError> {
        // One time for every pass, so its pages share one window.
        let since = (time::OffsetDateTime::now_utc() - DECIDED_WINDOW)
            .replace_nanosecond(0)
            .ok()
            .and_then(|at| at.format(&Rfc3339).ok());
        for &pass in PASSES {
            for page in 1..=PAGES_PER_PASS {
                let url = self.list_url(pass, d.action, t.singular, since.as_deref(), page);
                let response = self.send("read", self.request(Method::GET, url)).await?;
                if !response.status.is_success() {
                    return Err(Self::classify(&response));
                }
                let requests = response.body.get("requests").and_then(Value::as_array);
                if let Some(found) = requests
                    .into_iter()
                    .flatten()
                    .find(|r| r.get("id").and_then(Value::as_str) == Some(t.id))
                {
                    return observed(d.action, t.id, found);
                }
                let next = response.body.pointer("/meta/next_page");
                if next.is_none_or(Value::is_null) {
                    break;
                }
            }
        }
        Err(CallError::new(
            ErrorClass::Permanent,
            format!(
                "request {} is not among the requests Qonto lists as recently decided, \
                 pending, or last decided ({MAX_LIST_CALLS} list calls at most)",
                t.id
            ),
        ))
    }

    async fn poll_confirmation(&self, token: &str) -> Result<ConfirmationState, CallError> {
        let url = http::join(
            &self.base,
            &format!("/v2/sca_sessions/{}", http::segment(token)),
        );
        let response = self
            .send("sca_poll", self.request(Method::GET, url))
            .await?;
        if !response.status.is_success() {
            return Err(redact_error(Self::classify(&response), &[token]));
        }
        Ok(match response.body.get("result").and_then(Value::as_str) {
            Some("allow") => ConfirmationState::Allowed,
            Some("deny") => ConfirmationState::Denied,
            _ => ConfirmationState::Waiting,
        })
    }
}

impl Qonto {
    /// `GET /v2/requests` for one page of `pass`, with Qonto's documented
    /// filters (`status[]`, `request_type[]`, `processed_at_from`, `sort_by`).
    fn list_url(
        &self,
        pass: Pass,
        action: Action,
        singular: &str,
        since: Option<&str>,
        page: u32,
    ) -> Url {
        let mut url = http::join(&self.base, "/v2/requests");
        {
            let mut query = url.query_pairs_mut();
            let (statuses, window, sort): (&[&str], bool, &str) = match pass {
                Pass::DecidedLately => (&[decided_status(action)], true, "processed_at:desc"),
                Pass::StillPending => (&["pending"], false, "created_at:asc"),
                Pass::DecidedEarlier => (
                    &["approved", "declined", "canceled"],
                    false,
                    "processed_at:desc",
                ),
            };
            for status in statuses {
                query.append_pair("status[]", status);
            }
            query.append_pair("request_type[]", singular);
            if window && let Some(since) = since {
                query.append_pair("processed_at_from", since);
            }
            query
                .append_pair("sort_by", sort)
                .append_pair("per_page", PER_PAGE)
                .append_pair("page", &page.to_string());
        }
        url
    }
}

/// The target as the list shows it; a status that is not one of Qonto's
/// four is a provider error, never taken for a conflict.
fn observed(action: Action, id: &str, found: &Value) -> Result<Observed, CallError> {
    let status = found.get("status").and_then(Value::as_str);
    let Some((state, verdict)) = status.and_then(|s| Some((s, verdict(action, s)?))) else {
        let mut error = CallError::new(
            ErrorClass::Permanent,
            format!("Qonto lists request {id} without a status it documents"),
        );
        error.response = Some(bounded_copy(found));
        return Err(error);
    };
    Ok(Observed {
        state: state.to_owned(),
        verdict,
        response: found.clone(),
    })
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
