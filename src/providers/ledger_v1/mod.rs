//! Ledger Enterprise API v1, "Vault API" (PROVIDERS.md section 2, seed 001).
//!
//! Reject: `POST /transactions/{transaction_id}/reject`, no body. Approve:
//! `POST /transactions/{transaction_id}/approve` with the creation fields
//! `{account_name, recipient, amount, max_fees, coin_fields}` carried in the
//! decision's `target` (Ledger wants them equal to what was sent at
//! creation, so they come from upstream, never from a read). Every call
//! carries `X-Ledger-API-Key` (seed 001) and the decision's `Idempotency-Key`,
//! although Ledger documents no idempotency: the worker reads the
//! transaction before any repeat call.
//!
//! Rate limiting answers HTTP 420 (not 429) with `Retry-After` /
//! `X-RateLimit-Reset`. Errors are `{message, name, status_code}`.
//!
//! A 2xx is not taken on trust: the transaction it returns must be ours (its
//! integer `id`) and show the decided status (for an approve, a status after
//! approval, or `PENDING_APPROVAL` while the quorum is incomplete); anything
//! else is ambiguous and reconciled by reading the transaction. With the API
//! user's id configured (`user_id`), a read that shows the transaction still
//! pending is checked against its request's governance status
//! (`GET /requests/{last_request}/governance-status`): our approval recorded
//! there counts as already applied, so it is never sent twice.

pub mod sim;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use reqwest::{Method, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    contract::{CallContext, Client, Observed, Provider, Reply, Unit, Verdict, credentials},
    http::{self, Http, Response, SecretHeader},
};
use crate::{
    decision::{Action, Decision},
    outcome::bound_response,
    retry::{CallError, ErrorClass},
    settings::{Credential, ProviderSections, SettingsError, check_base_url, present},
};

pub const NAME: &str = "ledger_v1";

/// Transaction states that follow an approval: approved, then signed,
/// broadcast and confirmed on chain. The public enum is incomplete
/// (PROVIDERS.md 2.3), so this list is our reading of it.
const AFTER_APPROVAL: &[&str] = &[
    "APPROVED",
    "SIGNED",
    "SUBMITTED",
    "BROADCASTED",
    "PENDING_CONFIRMATION",
    "CONFIRMED",
    "COMPLETED",
];

/// States a reject leads to (a reject takes effect at once, no quorum).
const AFTER_REJECTION: &[&str] = &["REJECTED", "ABORTED"];

/// Still waiting for approvals. A transaction stays `PENDING_APPROVAL`
/// after our approval while the quorum is incomplete, and a read of the
/// transaction alone cannot tell whether our vote is among those recorded,
/// so this is `Pending` for both actions, never "already approved".
const WAITING: &[&str] = &["PENDING_APPROVAL", "PENDING_FIRST_APPROVAL"];

#[derive(Deserialize)]
struct LedgerV1Settings {
    base_url: String,
    api_key: Option<Credential>,
    /// The API user's id as governance approvals name it (`user.id`).
    user_id: Option<String>,
}

pub struct LedgerV1 {
    http: Http,
    base: Url,
    api_key: SecretString,
    user_id: Option<String>,
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
    let s: LedgerV1Settings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    let Some([api_key]) = credentials(NAME, [("api_key", present(&s.api_key))])? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(LedgerV1 {
        http: http.clone(),
        base,
        api_key: api_key.clone(),
        user_id: s
            .user_id
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty()),
    })))
}

/// A decision's target as Ledger v1's calls need it.
pub struct Target<'d> {
    id: u64,
    /// The approve call's body; a reject sends none.
    approve: Option<ApproveBody<'d>>,
}

/// The approve body, fields in the documented order. Nulls are sent, not
/// omitted: Ledger compares every value with the creation request.
#[derive(Debug, Serialize, PartialEq)]
struct ApproveBody<'a> {
    account_name: &'a str,
    recipient: &'a str,
    amount: Option<&'a str>,
    max_fees: Option<&'a str>,
    coin_fields: Option<&'a Map<String, Value>>,
}

/// `target.transaction_id`: a JSON integer of at least 1, as Ledger's path
/// parameter is an integer (a string or a float is refused, not coerced).
fn transaction_id(d: &Decision) -> Result<u64, String> {
    match d.target.get("transaction_id") {
        None => Err("missing required field target.transaction_id (an integer)".to_owned()),
        Some(Value::Number(n)) => match n.as_u64() {
            Some(id) if id >= 1 => Ok(id),
            _ => Err("target.transaction_id must be an integer of at least 1".to_owned()),
        },
        Some(_) => {
            Err("target.transaction_id must be an integer, not a string or other type".to_owned())
        }
    }
}

fn required_text<'a>(d: &'a Decision, field: &str) -> Result<&'a str, String> {
    match d.target.get(field) {
        Some(Value::String(s)) if !s.trim().is_empty() => Ok(s),
        Some(Value::String(_)) => Err(format!("target.{field} must not be empty")),
        None | Some(Value::Null) => Err(format!(
            "missing required field target.{field} (a string) to approve on {NAME}"
        )),
        Some(_) => Err(format!("target.{field} must be a string")),
    }
}

/// An amount in the currency's lowest unit: a string of digits, or null.
fn digits<'a>(d: &'a Decision, field: &str) -> Result<Option<&'a str>, String> {
    match d.target.get(field) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            Ok(Some(s))
        }
        Some(_) => Err(format!(
            "target.{field} must be a string of digits (the lowest currency unit) or null"
        )),
    }
}

fn approve_body(d: &Decision) -> Result<ApproveBody<'_>, String> {
    let coin_fields = match d.target.get("coin_fields") {
        None | Some(Value::Null) => None,
        Some(Value::Object(o)) => Some(o),
        Some(_) => return Err("target.coin_fields must be an object or null".to_owned()),
    };
    Ok(ApproveBody {
        account_name: required_text(d, "account_name")?,
        recipient: required_text(d, "recipient")?,
        amount: digits(d, "amount")?,
        max_fees: digits(d, "max_fees")?,
        coin_fields,
    })
}

fn verdict(action: Action, status: &str) -> Verdict {
    let status = status.to_ascii_uppercase();
    let decided = match action {
        Action::Approve => AFTER_APPROVAL,
        Action::Reject => AFTER_REJECTION,
    };
    if WAITING.contains(&status.as_str()) {
        Verdict::Pending
    } else if decided.contains(&status.as_str()) {
        Verdict::AsDecided
    } else {
        // The opposite decision, EXPIRED, FAILED, DROPPED, or a state we do
        // not know: never call again on it, let a human look.
        Verdict::Conflict
    }
}

/// `{"message","name","status_code"}` → (name, message).
fn error_fields(body: &Value) -> (Option<String>, Option<String>) {
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .map(|s| s.chars().take(500).collect())
    };
    (field("name"), field("message"))
}

fn status_of(body: &Value) -> Option<String> {
    body.get("status")
        .and_then(Value::as_str)
        .map(str::to_owned)
}

/// At most this much of a provider's text goes into one of our messages.
fn clip(text: &str) -> String {
    text.chars().take(80).collect()
}

/// Why `body` is not about transaction `id`, if it is not. Ids are
/// integers: a string, a float or a number beyond `u64` names another.
fn other_transaction(body: &Value, id: u64) -> Option<String> {
    match body.get("id") {
        Some(Value::Number(n)) if n.as_u64() == Some(id) => None,
        Some(named) => Some(format!("it names transaction {}", clip(&named.to_string()))),
        None => Some("it names no transaction".to_owned()),
    }
}

/// Why the answer to our `action` call does not prove it was applied to
/// transaction `id`, if it does not. An approve answered `PENDING_APPROVAL`
/// is Ledger's documented answer while other quorum approvals are missing:
/// the answer to our own call, naming our transaction, records our vote.
fn unproven(action: Action, id: u64, body: &Value) -> Option<String> {
    if let Some(problem) = other_transaction(body, id) {
        return Some(problem);
    }
    let Some(status) = status_of(body) else {
        return Some("it has no status".to_owned());
    };
    match verdict(action, &status) {
        Verdict::AsDecided => None,
        Verdict::Pending if action == Action::Approve => None,
        _ => Some(format!("the transaction is {}", clip(&status))),
    }
}

/// Whether a governance status records an `APPROVE` by `user` in any step.
fn approved_by(governance: &Value, user: &str) -> bool {
    let steps = governance.get("governance_steps").and_then(Value::as_array);
    steps.into_iter().flatten().any(|step| {
        let approvals = step.get("approvals").and_then(Value::as_array);
        approvals.into_iter().flatten().any(|a| {
            let by = match a.pointer("/user/id") {
                Some(Value::Number(n)) => Some(n.to_string()),
                Some(Value::String(s)) => Some(s.clone()),
                _ => None,
            };
            a.get("type").and_then(Value::as_str) == Some("APPROVE") && by.as_deref() == Some(user)
        })
    })
}

impl LedgerV1 {
    fn request(&self, method: Method, url: Url) -> reqwest::RequestBuilder {
        self.http
            .client()
            .request(method, url)
            .secret_header("X-Ledger-API-Key", self.api_key.expose_secret())
            .header("Accept", "application/json")
    }

    fn transaction_url(&self, id: u64, suffix: &str) -> Url {
        // An integer needs no percent-encoding.
        http::join(&self.base, &format!("/transactions/{id}{suffix}"))
    }

    /// Ledger v1's error classes, in one place.
    fn classify(response: &Response) -> CallError {
        let (code, message) = error_fields(&response.body);
        // The shared table as it stands: 420 is Ledger's rate-limit answer
        // (`http::error` reads Retry-After or X-RateLimit-Reset into the
        // delay), and no conflict answer is documented (PROVIDERS.md 2.3).
        let class = http::default_class(response.status);
        http::error(class, response, code, message)
    }
}

impl Provider for LedgerV1 {
    fn name(&self) -> &'static str {
        NAME
    }

    type Target<'d> = Target<'d>;

    fn validate<'d>(&self, d: &'d Decision) -> Result<Target<'d>, String> {
        let id = transaction_id(d)?;
        let approve = match d.action {
            Action::Reject => None,
            Action::Approve => Some(approve_body(d)?),
        };
        Ok(Target { id, approve })
    }

    fn target_key(&self, t: &Self::Target<'_>) -> String {
        t.id.to_string()
    }

    async fn apply(
        &self,
        d: &Decision,
        t: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let verb = d.action.as_str();
        let mut req = self
            .request(
                Method::POST,
                self.transaction_url(t.id, &format!("/{verb}")),
            )
            .header("Idempotency-Key", &ctx.idempotency_key);
        if let Some(body) = &t.approve {
            req = req.json(body);
        }
        let response = self.http.send(NAME, verb, req).await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        if let Some(problem) = unproven(d.action, t.id, &response.body) {
            return Err(CallError {
                response: Some(bound_response(response.body)),
                ..CallError::new(
                    ErrorClass::Ambiguous,
                    format!(
                        "the {verb} answer (HTTP {}) does not show the {verb} applied to transaction {}: {problem}",
                        response.status.as_u16(),
                        t.id
                    ),
                )
            });
        }
        Ok(Reply::Done {
            state: status_of(&response.body),
            response: response.body,
        })
    }

    async fn read_state(&self, d: &Decision, t: &Self::Target<'_>) -> Result<Observed, CallError> {
        let id = t.id;
        let response = self
            .http
            .send(
                NAME,
                "read",
                self.request(Method::GET, self.transaction_url(id, "")),
            )
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let unread = |problem: String, body: Value| CallError {
            response: Some(bound_response(body)),
            ..CallError::new(
                ErrorClass::Ambiguous,
                format!("the read of transaction {id} does not show its status: {problem}"),
            )
        };
        if let Some(problem) = other_transaction(&response.body, id) {
            return Err(unread(problem, response.body));
        }
        let Some(state) = status_of(&response.body) else {
            return Err(unread("it has no status".to_owned(), response.body));
        };
        let mut verdict = verdict(d.action, &state);
        if verdict == Verdict::Pending && d.action == Action::Approve {
            // A quorum approval made before a crash or timeout leaves the
            // transaction pending: a second approve would be refused.
            if let Some(user) = &self.user_id
                && self.approval_recorded(id, &response.body, user).await?
            {
                verdict = Verdict::AsDecided;
            }
        }
        Ok(Observed {
            verdict,
            state,
            response: response.body,
        })
    }
}

impl LedgerV1 {
    /// Whether the governance status of the transaction's request records
    /// an approval by `user`. A transaction without a readable
    /// `last_request` cannot tell, so it records none.
    async fn approval_recorded(
        &self,
        id: u64,
        transaction: &Value,
        user: &str,
    ) -> Result<bool, CallError> {
        let Some(request) = transaction.get("last_request").and_then(Value::as_u64) else {
            return Ok(false);
        };
        let url = http::join(
            &self.base,
            &format!("/requests/{request}/governance-status"),
        );
        let response = self
            .http
            .send(NAME, "governance", self.request(Method::GET, url))
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        // Where it names its transaction, it must be ours.
        match response.body.pointer("/request/target_id") {
            None | Some(Value::Null) => {}
            Some(Value::Number(n)) if n.as_u64() == Some(id) => {}
            Some(other) => {
                return Err(CallError {
                    response: Some(bound_response(response.body.clone())),
                    ..CallError::new(
                        ErrorClass::Ambiguous,
                        format!(
                            "the governance status of request {request} is for transaction {}, not {id}",
                            clip(&other.to_string())
                        ),
                    )
                });
            }
        }
        Ok(approved_by(&response.body, user))
    }
}
