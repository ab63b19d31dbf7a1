//! MoneyPipe Merchant API v1 (PROVIDERS.md section 5, seed 003).
//!
//! Reject: `PUT {reject_path}` (default `/operations/{operation_id}/reject-transactions`,
//! UNCONFIRMED publicly, hence configurable) with `{"tx_id": [..], "reason"}`.
//! Approve: MoneyPipe has no approve; its positive action is
//! `PUT /operations/{operation_id}/link-transactions` with `{"tx_id": [..]}`.
//! Both carry a static `Authorization: Bearer {token}` and `Idempotency-Key`
//! (MoneyPipe documents no idempotency, so the worker reads before a repeat).
//!
//! The whole `tx_ids` list goes in one call, as the contract says. What the
//! provider does with a partly failing batch is UNCONFIRMED, so a success
//! counts only when the returned operation is ours (`data.id`) and every
//! listed transaction shows the decided state in it; anything less is
//! ambiguous and gets reconciled with `GET /transactions/{id}` per
//! transaction. A read counts a transaction as decided by us only under our
//! operation: one under another operation is a conflict, and an answer that
//! cannot be tied to our operation and transaction is no verdict at all.

pub mod sim;
#[cfg(test)]
mod tests;

use std::{collections::HashSet, sync::Arc};

use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use reqwest::{Method, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    contract::{CallContext, Client, Observed, Provider, Reply, Unit, Verdict, credentials},
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision, check_segment, required_reason, target_segment},
    retry::{CallError, ErrorClass},
    settings::{
        Credential, ProviderSections, SettingsError, check_base_url, check_path_template, present,
    },
};

pub const NAME: &str = "moneypipe";

/// The contract bounds a batch; it also bounds the reconciliation reads.
const MAX_TX_IDS: usize = 100;

/// Transaction reads run this many at a time: a 100-id batch should not
/// open 100 connections to the provider at once.
const READ_CONCURRENCY: usize = 8;

/// Transaction statuses that still wait for a decision. MoneyPipe documents
/// `2 Undefined`; `new` and `pending` are accepted because operation
/// statuses use them and the transaction list is not exhaustive.
const PENDING_STATUSES: &[&str] = &["undefined", "new", "pending"];

/// MoneyPipe's numbered errors for the calls we make (error table, BASICS).
const ERROR_CODES: &[(u32, u16, &str)] = &[
    (0, 400, "Something went wrong"),
    (1, 410, "Deprecated action"),
    (2, 401, "Unauthenticated"),
    (3, 403, "Application banned"),
    (4, 403, "Company banned"),
    (5, 404, "Operation not found"),
    (6, 404, "Transaction not found"),
    (9, 422, "Validation errors"),
    (10, 415, "Unsupported Content Type"),
];

#[derive(Deserialize)]
struct MoneyPipeSettings {
    base_url: String,
    token: Option<Credential>,
    reject_path: String,
}

pub struct MoneyPipe {
    http: Http,
    base: Url,
    token: SecretString,
    reject_path: String,
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
    let s: MoneyPipeSettings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "reject_path", &s.reject_path, "{operation_id}")?;
    let Some([token]) = credentials(NAME, [("token", present(&s.token))])? else {
        return Ok(None);
    };
    Ok(Some(Arc::new(MoneyPipe {
        http: http.clone(),
        base,
        token: token.clone(),
        reject_path: s.reject_path,
    })))
}

/// A decision's target as MoneyPipe's calls need it.
pub struct Target<'d> {
    operation_id: &'d str,
    /// In the decision's order, without repeats.
    tx_ids: Vec<&'d str>,
    /// Required to reject; an approve (link) sends none.
    reason: Option<&'d str>,
}

/// The operation id and its transaction ids, in order.
fn target(d: &Decision) -> Result<(&str, Vec<&str>), String> {
    let operation_id = target_segment(d, "operation_id")?;
    let list = match d.target.get("tx_ids") {
        Some(Value::Array(list)) => list,
        Some(_) => return Err("target.tx_ids must be an array of strings".to_owned()),
        None => return Err("missing required field target.tx_ids (an array of strings)".to_owned()),
    };
    if list.is_empty() || list.len() > MAX_TX_IDS {
        return Err(format!(
            "target.tx_ids must hold 1..{MAX_TX_IDS} transaction ids, got {}",
            list.len()
        ));
    }
    let mut seen = HashSet::with_capacity(list.len());
    let mut ids = Vec::with_capacity(list.len());
    for (i, v) in list.iter().enumerate() {
        let field = format!("tx_ids[{i}]");
        let id = v
            .as_str()
            .ok_or_else(|| format!("target.{field} must be a string"))?;
        // Each id also becomes a path segment of the reconciliation read.
        check_segment(&field, id)?;
        if !seen.insert(id) {
            return Err(format!(
                "target.tx_ids lists {:?} twice",
                id.chars().take(40).collect::<String>()
            ));
        }
        ids.push(id);
    }
    Ok((operation_id, ids))
}

/// The decision call's body. A struct, not `json!`, so the fields go out in
/// the documented order (`tx_id`, then `reason`).
#[derive(Serialize)]
struct Body<'a> {
    tx_id: &'a [&'a str],
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'a str>,
}

/// The state a transaction shows once the decision is applied.
fn decided_status(action: Action) -> &'static str {
    match action {
        Action::Approve => "confirmed",
        Action::Reject => "rejected",
    }
}

/// A transaction's status as a lowercase name; the documented numeric codes
/// (1 Confirmed, 2 Undefined, 4 Rejected) are mapped to the names the JSON
/// shows elsewhere.
fn status_name(tx: &Value) -> Option<String> {
    let named = |n: u64| match n {
        1 => "confirmed".to_owned(),
        2 => "undefined".to_owned(),
        4 => "rejected".to_owned(),
        other => other.to_string(),
    };
    match tx.get("status")? {
        Value::String(s) => Some(match s.trim().parse::<u64>() {
            Ok(n) => named(n),
            Err(_) => s.trim().to_lowercase(),
        }),
        Value::Number(n) => n.as_u64().map(named),
        _ => None,
    }
}

/// How one transaction relates to the decision, by its status alone.
fn tx_verdict(action: Action, tx: &Value) -> Verdict {
    let status = status_name(tx).unwrap_or_default();
    let decided = decided_status(action);
    if status == decided {
        // A link shows `linked: true`; a transaction confirmed on its own
        // (`linked: false`) was not linked yet, so the link call still applies.
        if action == Action::Approve && tx.get("linked") == Some(&Value::Bool(false)) {
            return Verdict::Pending;
        }
        return Verdict::AsDecided;
    }
    if PENDING_STATUSES.contains(&status.as_str()) {
        return Verdict::Pending;
    }
    Verdict::Conflict
}

/// One conflict decides the whole batch (it cannot all end as decided);
/// otherwise any transaction still waiting keeps the batch pending.
fn combine(verdicts: impl IntoIterator<Item = Verdict>) -> Verdict {
    let mut combined = Verdict::AsDecided;
    for v in verdicts {
        match v {
            Verdict::Conflict => return Verdict::Conflict,
            Verdict::Pending => combined = Verdict::Pending,
            Verdict::AsDecided => {}
        }
    }
    combined
}

/// The operation a transaction names: `Ok(None)` when it names none (not
/// yet in any operation), `Err` when the field is of the wrong type.
fn operation_of(tx: &Value) -> Result<Option<&str>, &'static str> {
    match tx.get("operation_id") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(op)) => Ok(Some(op)),
        Some(other) => Err(kind_of(other)),
    }
}

/// A JSON value's kind, for messages about a field of the wrong type.
fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Provider text quoted in our messages, bounded.
fn clip(s: &str) -> String {
    s.chars().take(100).collect()
}

/// One read transaction, tied to the target: its state and verdict, or why
/// the answer proves nothing about it.
fn read_verdict(
    action: Action,
    operation_id: &str,
    id: &str,
    tx: &Value,
) -> Result<(String, Verdict), String> {
    match tx.get("id") {
        None | Some(Value::Null) => {}
        Some(Value::String(named)) if named == id => {}
        Some(Value::String(named)) => {
            return Err(format!(
                "MoneyPipe's read of transaction {id} answered for {}",
                clip(named)
            ));
        }
        Some(other) => {
            return Err(format!(
                "MoneyPipe's read of transaction {id} answered for {}",
                kind_of(other)
            ));
        }
    }
    let Some(status) = status_name(tx) else {
        return Err(format!(
            "MoneyPipe's transaction {id} shows no readable status"
        ));
    };
    let operation = operation_of(tx).map_err(|kind| {
        format!("MoneyPipe's transaction {id} names its operation with {kind}, not a string")
    })?;
    let verdict = tx_verdict(action, tx);
    match operation {
        // Decided (or waiting) under someone else's operation: whatever
        // its status, our decision did not and cannot act on it.
        Some(other) if other != operation_id => Ok((
            format!("{} under operation {}", clip(&status), clip(other)),
            Verdict::Conflict,
        )),
        Some(_) => Ok((status, verdict)),
        // A pending transaction may have no operation yet (a link attaches
        // it); a decided one always has one, so its absence proves nothing.
        None if verdict == Verdict::AsDecided => Err(format!(
            "MoneyPipe's transaction {id} shows {} without naming its operation",
            clip(&status)
        )),
        None => Ok((status, verdict)),
    }
}

/// `rejected` when every transaction shows it, else `tx-1=confirmed,tx-2=undefined`.
fn summary(states: &[(&str, String)]) -> String {
    match states.first() {
        Some((_, first)) if states.iter().all(|(_, s)| s == first) => first.clone(),
        _ => states
            .iter()
            .map(|(id, s)| format!("{id}={s}"))
            .collect::<Vec<_>>()
            .join(","),
    }
}

/// Names the transactions that do not show the decided state, bounded so a
/// 100-id batch keeps the message readable.
fn not_decided_message(missing: &[(&str, String)], decided: &str) -> String {
    const SHOWN: usize = 10;
    let mut names: Vec<String> = missing
        .iter()
        .take(SHOWN)
        .map(|(id, state)| format!("{id} ({state})"))
        .collect();
    if missing.len() > SHOWN {
        names.push(format!("and {} more", missing.len() - SHOWN));
    }
    let (noun, verb) = if missing.len() == 1 {
        ("transaction", "does")
    } else {
        ("transactions", "do")
    };
    format!("{noun} {} {verb} not show {decided}", names.join(", "))
}

/// The numeric code, its message and any first validation detail, from the
/// three error shapes we accept (field names UNCONFIRMED publicly):
/// `{"code", "message"}`, `{"error_code", "error"}`, `{"error": {"code", "message"}}`.
fn error_fields(body: &Value) -> (Option<u64>, Option<String>) {
    let number = |v: Option<&Value>| match v? {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    };
    let text = |v: Option<&Value>| {
        v.and_then(Value::as_str)
            .filter(|s| !s.trim().is_empty())
            .map(|s| s.chars().take(500).collect::<String>())
    };
    let nested = body.get("error").filter(|e| e.is_object());
    let code = number(body.get("code"))
        .or_else(|| number(body.get("error_code")))
        .or_else(|| number(nested.and_then(|e| e.get("code"))));
    let message = text(body.get("message"))
        .or_else(|| text(body.get("error")))
        .or_else(|| text(nested.and_then(|e| e.get("message"))));
    // Validation errors may list the offending fields: name the first.
    let detail = match body.get("errors").or_else(|| nested?.get("errors")) {
        Some(Value::Object(fields)) => fields.iter().next().and_then(|(field, v)| {
            let first = v.get(0).unwrap_or(v);
            text(Some(first)).map(|t| format!("{field}: {t}"))
        }),
        Some(Value::Array(list)) => text(list.first()),
        _ => None,
    };
    let message = match (message, detail) {
        (Some(m), Some(d)) => Some(format!("{m} ({d})")),
        (m, d) => m.or(d),
    };
    (code, message)
}

/// The code an HTTP status stands for when the body carries none; 403 and
/// 404 each stand for two codes, so they stay unnamed.
fn code_for_status(status: u16) -> Option<u64> {
    let mut matching = ERROR_CODES.iter().filter(|(_, s, _)| *s == status);
    match (matching.next(), matching.next()) {
        (Some((code, _, _)), None) => Some(u64::from(*code)),
        _ => None,
    }
}

fn code_name(code: u64) -> Option<&'static str> {
    ERROR_CODES
        .iter()
        .find(|(c, _, _)| u64::from(*c) == code)
        .map(|(_, _, name)| *name)
}

impl MoneyPipe {
    fn request(
        &self,
        method: Method,
        url: Url,
        ctx: Option<&CallContext>,
    ) -> reqwest::RequestBuilder {
        let mut req = self
            .http
            .client()
            .request(method, url)
            .bearer_auth(self.token.expose_secret())
            .header("Accept", "application/json");
        if let Some(ctx) = ctx {
            req = req.header("Idempotency-Key", &ctx.idempotency_key);
        }
        req
    }

    /// MoneyPipe's error classes, in one place.
    fn classify(response: &Response) -> CallError {
        let status = response.status.as_u16();
        let (body_code, detail) = error_fields(&response.body);
        let code = body_code.or_else(|| code_for_status(status));
        let class = match (status, code) {
            (429 | 500..=599, _) => ErrorClass::Retryable,
            // A static token: nothing to refresh, a retry cannot help.
            (401, _) | (_, Some(2)) => ErrorClass::Auth,
            // No conflict code exists; "not rejectable any more" is expected
            // to look like these, so the worker reads the state.
            (_, Some(0 | 9)) => ErrorClass::Ambiguous,
            (_, Some(1 | 3 | 4 | 5 | 6 | 10)) => ErrorClass::Permanent,
            // A 2xx that is not an operation: we cannot tell what happened.
            (200..=299, _) => ErrorClass::Ambiguous,
            // A 403 is a banned application or company (codes 3 and 4), not
            // a refused token; MoneyPipe documents no 420.
            (403 | 420, _) => ErrorClass::Permanent,
            _ => http::default_class(response.status),
        };
        let what = match (code, status) {
            (Some(c), _) => match code_name(c) {
                Some(name) => format!("MoneyPipe error {c} ({name})"),
                None => format!("MoneyPipe error {c}"),
            },
            (None, 403) => "MoneyPipe answered HTTP 403 (Application or Company banned)".to_owned(),
            (None, 404) => {
                "MoneyPipe answered HTTP 404 (Operation or Transaction not found)".to_owned()
            }
            (None, s) => format!("MoneyPipe answered HTTP {s}"),
        };
        let message = match detail {
            Some(d) => format!("{what}: {d}"),
            None => what,
        };
        http::error(class, response, code.map(|c| c.to_string()), Some(message))
    }

    /// Reads one transaction: `GET /transactions/{id}` → its `data` object,
    /// its state and how it relates to the decision on `operation_id`.
    async fn read_tx(
        &self,
        action: Action,
        operation_id: &str,
        id: &str,
    ) -> Result<(Value, String, Verdict), CallError> {
        let url = http::join(&self.base, &format!("/transactions/{}", http::segment(id)));
        let response = self
            .http
            .send(NAME, "read", self.request(Method::GET, url, None))
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let Some(data) = response.body.get("data").filter(|d| d.is_object()) else {
            return Err(Self::classify(&response));
        };
        match read_verdict(action, operation_id, id, data) {
            Ok((state, verdict)) => Ok((data.clone(), state, verdict)),
            Err(problem) => Err(http::error(
                ErrorClass::Ambiguous,
                &response,
                None,
                Some(problem),
            )),
        }
    }
}

impl Provider for MoneyPipe {
    fn name(&self) -> &'static str {
        NAME
    }

    type Target<'d> = Target<'d>;

    fn validate<'d>(&self, d: &'d Decision) -> Result<Target<'d>, String> {
        let (operation_id, tx_ids) = target(d)?;
        let reason = match d.action {
            Action::Reject => Some(required_reason(d, None)?),
            Action::Approve => None,
        };
        Ok(Target {
            operation_id,
            tx_ids,
            reason,
        })
    }

    /// The operation: decisions on overlapping transaction sets of one
    /// operation must not run at once.
    fn target_key(&self, t: &Self::Target<'_>) -> String {
        t.operation_id.to_owned()
    }

    async fn apply(
        &self,
        d: &Decision,
        t: &Self::Target<'_>,
        ctx: &CallContext,
    ) -> Result<Reply, CallError> {
        let (tx_ids, reason) = (&t.tx_ids, t.reason);
        let operation = http::segment(t.operation_id);
        let (path, operation_name) = match d.action {
            Action::Reject => (
                self.reject_path.replace("{operation_id}", &operation),
                "reject",
            ),
            Action::Approve => (format!("/operations/{operation}/link-transactions"), "link"),
        };
        let body = Body {
            tx_id: tx_ids,
            reason,
        };
        let req = self
            .request(Method::PUT, http::join(&self.base, &path), Some(ctx))
            .json(&body);
        let response = self.http.send(NAME, operation_name, req).await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        let Some(transactions) = response
            .body
            .pointer("/data/transactions")
            .and_then(Value::as_array)
        else {
            // Accepted, but without the operation we cannot tell what it did.
            let mut e = Self::classify(&response);
            if e.provider_code.is_none() {
                e.message = format!(
                    "MoneyPipe answered HTTP {} without the operation's transactions",
                    response.status.as_u16()
                );
            }
            return Err(e);
        };
        // The answer proves something only about the operation it names.
        let status = response.status.as_u16();
        let named = match response.body.pointer("/data/id").and_then(Value::as_str) {
            None => Some(format!(
                "MoneyPipe answered HTTP {status} without naming the operation (data.id)"
            )),
            Some(op) if op != t.operation_id => Some(format!(
                "MoneyPipe answered HTTP {status} for operation {}, not {}",
                clip(op),
                t.operation_id
            )),
            Some(_) => None,
        };
        if let Some(problem) = named {
            return Err(http::error(
                ErrorClass::Ambiguous,
                &response,
                None,
                Some(problem),
            ));
        }
        let decided = decided_status(d.action);
        let missing: Vec<(&str, String)> = tx_ids
            .iter()
            .filter_map(|id| {
                let Some(tx) = transactions
                    .iter()
                    .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
                else {
                    return Some((*id, "not in the answer".to_owned()));
                };
                let status = || status_name(tx).unwrap_or_else(|| "no status".into());
                match operation_of(tx) {
                    Err(_) => Some((*id, "operation of the wrong type".to_owned())),
                    Ok(Some(other)) if other != t.operation_id => Some((
                        *id,
                        format!("{} under operation {}", clip(&status()), clip(other)),
                    )),
                    Ok(_) if tx_verdict(d.action, tx) == Verdict::AsDecided => None,
                    Ok(_) => Some((*id, status())),
                }
            })
            .collect();
        if missing.is_empty() {
            return Ok(Reply::Done {
                state: Some(decided.to_owned()),
                response: response.body,
            });
        }
        // Part of the batch may have been applied: the worker reads every
        // transaction before deciding what this was.
        Err(http::error(
            ErrorClass::Ambiguous,
            &response,
            None,
            Some(not_decided_message(&missing, decided)),
        ))
    }

    async fn read_state(&self, d: &Decision, t: &Self::Target<'_>) -> Result<Observed, CallError> {
        let tx_ids = &t.tx_ids;
        // Collected first: a closure held across the await would make this
        // future's `Send` bound unprovable for `async_trait`.
        let reads: Vec<_> = tx_ids
            .iter()
            .map(|id| self.read_tx(d.action, t.operation_id, id))
            .collect();
        let read: Vec<(Value, String, Verdict)> = stream::iter(reads)
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let states: Vec<(&str, String)> = tx_ids
            .iter()
            .zip(&read)
            .map(|(id, (_, state, _))| (*id, state.clone()))
            .collect();
        Ok(Observed {
            state: summary(&states),
            verdict: combine(read.iter().map(|(_, _, verdict)| *verdict)),
            response: Value::Array(read.into_iter().map(|(tx, _, _)| tx).collect()),
        })
    }
}
