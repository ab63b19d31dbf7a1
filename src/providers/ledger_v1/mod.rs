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
}

pub struct LedgerV1 {
    http: Http,
    base: Url,
    api_key: SecretString,
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
        // An approve may answer PENDING_APPROVAL while other quorum
        // approvals are missing: our approval was recorded, so it counts
        // as applied (PROVIDERS.md 7.1).
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
        let Some(state) = status_of(&response.body) else {
            return Err(CallError {
                response: Some(bound_response(response.body)),
                ..CallError::new(
                    ErrorClass::Ambiguous,
                    format!("transaction {id} was read without a status field"),
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
