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
//! counts only when every listed transaction shows the decided state in the
//! returned operation; anything less is ambiguous and gets reconciled with
//! `GET /transactions/{id}` per transaction.

use std::{collections::HashSet, sync::Arc};

use async_trait::async_trait;
use futures_util::{StreamExt as _, TryStreamExt as _, stream};
use reqwest::{Method, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{
    CallContext, Observed, Provider, Reply, Verdict,
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision, check_segment, required_reason, target_segment},
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, SettingsError, check_base_url, check_path_template, present},
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
    token: Option<SecretString>,
    reject_path: String,
}

pub struct MoneyPipe {
    http: Http,
    base: Url,
    token: SecretString,
    reject_path: String,
}

pub fn build(
    sections: &ProviderSections,
    http: &Http,
) -> Result<Option<Arc<dyn Provider>>, SettingsError> {
    let s: MoneyPipeSettings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    check_path_template(NAME, "reject_path", &s.reject_path, "{operation_id}")?;
    let Some(token) = present(&s.token) else {
        return Ok(None);
    };
    Ok(Some(Arc::new(MoneyPipe {
        http: http.clone(),
        base,
        token: token.clone(),
        reject_path: s.reject_path,
    })))
}

/// The validated target: the operation id and its transaction ids, in order.
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

/// How one transaction relates to the decision.
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
            .header(
                "Authorization",
                format!("Bearer {}", self.token.expose_secret()),
            )
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
            (400 | 409 | 422, _) => ErrorClass::Ambiguous,
            // A 2xx that is not an operation: we cannot tell what happened.
            (200..=299, _) => ErrorClass::Ambiguous,
            _ => ErrorClass::Permanent,
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

    /// Reads one transaction: `GET /transactions/{id}` → its `data` object.
    async fn read_tx(&self, id: &str) -> Result<Value, CallError> {
        let url = http::join(&self.base, &format!("/transactions/{}", http::segment(id)));
        let response = self
            .http
            .send(NAME, "read", self.request(Method::GET, url, None))
            .await?;
        if !response.status.is_success() {
            return Err(Self::classify(&response));
        }
        match response.body.get("data") {
            Some(data) if data.is_object() => Ok(data.clone()),
            _ => Err(Self::classify(&response)),
        }
    }
}

#[async_trait]
impl Provider for MoneyPipe {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self, d: &Decision) -> Result<(), String> {
        target(d)?;
        match d.action {
            Action::Reject => required_reason(d, None).map(|_| ()),
            Action::Approve => Ok(()),
        }
    }

    /// The operation: decisions on overlapping transaction sets of one
    /// operation must not run at once.
    fn target_key(&self, d: &Decision) -> String {
        d.target_str("operation_id").unwrap_or_default().to_owned()
    }

    async fn apply(&self, d: &Decision, ctx: &CallContext) -> Result<Reply, CallError> {
        let (operation_id, tx_ids) =
            target(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let operation = http::segment(operation_id);
        let (path, reason, operation_name) = match d.action {
            Action::Reject => (
                self.reject_path.replace("{operation_id}", &operation),
                Some(
                    required_reason(d, None)
                        .map_err(|e| CallError::new(ErrorClass::Permanent, e))?,
                ),
                "reject",
            ),
            Action::Approve => (
                format!("/operations/{operation}/link-transactions"),
                None,
                "link",
            ),
        };
        let body = Body {
            tx_id: &tx_ids,
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
        let decided = decided_status(d.action);
        let missing: Vec<(&str, String)> = tx_ids
            .iter()
            .filter_map(|id| {
                match transactions
                    .iter()
                    .find(|t| t.get("id").and_then(Value::as_str) == Some(id))
                {
                    Some(tx) if tx_verdict(d.action, tx) == Verdict::AsDecided => None,
                    Some(tx) => Some((*id, status_name(tx).unwrap_or_else(|| "no status".into()))),
                    None => Some((*id, "not in the answer".to_owned())),
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

    async fn read_state(&self, d: &Decision) -> Result<Observed, CallError> {
        let (_, tx_ids) = target(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        // Collected first: a closure held across the await would make this
        // future's `Send` bound unprovable for `async_trait`.
        let reads: Vec<_> = tx_ids.iter().map(|id| self.read_tx(id)).collect();
        let read: Vec<Value> = stream::iter(reads)
            .buffered(READ_CONCURRENCY)
            .try_collect()
            .await?;
        let states: Vec<(&str, String)> = tx_ids
            .iter()
            .zip(&read)
            .map(|(id, tx)| (*id, status_name(tx).unwrap_or_else(|| "unknown".into())))
            .collect();
        Ok(Observed {
            state: summary(&states),
            verdict: combine(read.iter().map(|tx| tx_verdict(d.action, tx))),
            response: Value::Array(read),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use serde_json::json;
    use wiremock::{
        Mock, MockServer, ResponseTemplate,
        matchers::{method, path},
    };

    use super::*;
    use crate::{decision::parse, settings::Settings};

    const TOKEN: &str = "mp-static-token-5e1";

    async fn provider(server: &MockServer) -> Arc<dyn Provider> {
        let settings = Settings::load_from(
            None,
            vec![
                (
                    "APPROVAL_PROVIDERS__MONEYPIPE__BASE_URL".into(),
                    format!("{}/v1", server.uri()),
                ),
                ("APPROVAL_PROVIDERS__MONEYPIPE__TOKEN".into(), TOKEN.into()),
            ],
        )
        .unwrap();
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(2)).unwrap();
        build(&settings.providers, &http).unwrap().expect("enabled")
    }

    fn decision(action: &str, target: Value, reason: Option<&str>) -> Decision {
        let mut body = json!({
            "decision_id": "d-mp-1",
            "provider": "moneypipe",
            "action": action,
            "target": target,
        });
        if let Some(r) = reason {
            body["reason"] = json!(r);
        }
        parse(body.to_string().as_bytes()).unwrap()
    }

    fn ctx() -> CallContext {
        CallContext {
            idempotency_key: "idem-mp-42".into(),
            attempt: 1,
            confirmation_token: None,
        }
    }

    fn operation(txs: &[(&str, &str, bool)]) -> Value {
        json!({"data": {
            "id": "op-1",
            "status": "new",
            "transactions": txs.iter().map(|(id, status, linked)| json!({
                "id": id,
                "tx_id": format!("chainhash-{id}"),
                "status": status,
                "linked": linked,
                "reject_reason": if *status == "rejected" { json!("Wrong payment") } else { Value::Null },
            })).collect::<Vec<_>>(),
        }})
    }

    fn header<'a>(r: &'a wiremock::Request, name: &str) -> Option<&'a str> {
        r.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the one decision call exactly: method, path, headers, body bytes.
    async fn assert_one_call(server: &MockServer, verb: &str, url_path: &str, body: &str) {
        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 1, "{calls:?}");
        let r = &calls[0];
        assert_eq!(r.method.as_str(), verb);
        assert_eq!(r.url.path(), url_path);
        assert_eq!(r.url.query(), None);
        assert_eq!(
            header(r, "authorization"),
            Some(&*format!("Bearer {TOKEN}"))
        );
        assert_eq!(header(r, "idempotency-key"), Some("idem-mp-42"));
        assert_eq!(header(r, "content-type"), Some("application/json"));
        assert_eq!(header(r, "accept"), Some("application/json"));
        assert_eq!(std::str::from_utf8(&r.body).unwrap(), body);
    }

    #[tokio::test]
    async fn reject_sends_the_list_and_reason_and_checks_every_transaction() {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .and(path("/v1/operations/op-1/reject-transactions"))
            .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[
                ("tx-1", "rejected", false),
                ("tx-2", "rejected", false),
            ])))
            .mount(&server)
            .await;
        let d = decision(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2"]}),
            Some("Wrong payment"),
        );
        let p = provider(&server).await;
        p.validate(&d).unwrap();
        let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
            panic!("expected Done");
        };
        assert_eq!(state.as_deref(), Some("rejected"));
        assert_eq!(response["data"]["id"], "op-1");
        assert_one_call(
            &server,
            "PUT",
            "/v1/operations/op-1/reject-transactions",
            r#"{"tx_id":["tx-1","tx-2"],"reason":"Wrong payment"}"#,
        )
        .await;
    }

    #[tokio::test]
    async fn approve_links_the_transactions() {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .and(path("/v1/operations/op%201/link-transactions"))
            .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[(
                "tx-1",
                "confirmed",
                true,
            )])))
            .mount(&server)
            .await;
        // The operation id is percent-encoded into its segment.
        let d = decision(
            "approve",
            json!({"operation_id": "op 1", "tx_ids": ["tx-1"]}),
            None,
        );
        let p = provider(&server).await;
        p.validate(&d).unwrap();
        let Reply::Done { state, .. } = p.apply(&d, &ctx()).await.unwrap() else {
            panic!("expected Done");
        };
        assert_eq!(state.as_deref(), Some("confirmed"));
        assert_one_call(
            &server,
            "PUT",
            "/v1/operations/op%201/link-transactions",
            r#"{"tx_id":["tx-1"]}"#,
        )
        .await;
    }

    #[tokio::test]
    async fn a_partial_batch_is_ambiguous_and_names_the_stragglers() {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[
                ("tx-1", "rejected", false),
                ("tx-2", "undefined", false),
            ])))
            .mount(&server)
            .await;
        let d = decision(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2", "tx-3"]}),
            Some("no"),
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous);
        assert_eq!(
            e.message,
            "transactions tx-2 (undefined), tx-3 (not in the answer) do not show rejected"
        );
        assert!(!e.message.contains("tx-1"));
        assert_eq!(e.http_status, Some(200));

        // Approve: confirmed but not linked is not linked yet.
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(ResponseTemplate::new(200).set_body_json(operation(&[(
                "tx-9",
                "confirmed",
                false,
            )])))
            .mount(&server)
            .await;
        let d = decision(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": ["tx-9"]}),
            None,
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Ambiguous);
        assert_eq!(
            e.message,
            "transaction tx-9 (confirmed) does not show confirmed"
        );
    }

    #[tokio::test]
    async fn error_bodies_of_every_shape_name_their_code() {
        let cases: Vec<(u16, Value, ErrorClass, Option<&str>, &str)> = vec![
            (
                422,
                json!({"code": 9, "message": "The tx id field is required."}),
                ErrorClass::Ambiguous,
                Some("9"),
                "MoneyPipe error 9 (Validation errors): The tx id field is required.",
            ),
            (
                404,
                json!({"error_code": 5, "error": "No such operation"}),
                ErrorClass::Permanent,
                Some("5"),
                "MoneyPipe error 5 (Operation not found): No such operation",
            ),
            (
                403,
                json!({"error": {"code": "4", "message": "Company is banned"}}),
                ErrorClass::Permanent,
                Some("4"),
                "MoneyPipe error 4 (Company banned): Company is banned",
            ),
            (
                400,
                json!({"code": 0, "message": "Something went wrong", "errors": {"tx_id": ["already rejected"]}}),
                ErrorClass::Ambiguous,
                Some("0"),
                "MoneyPipe error 0 (Something went wrong): Something went wrong (tx_id: already rejected)",
            ),
            // No code in the body: derived from the HTTP status.
            (
                415,
                json!("Unsupported Media Type"),
                ErrorClass::Permanent,
                Some("10"),
                "MoneyPipe error 10 (Unsupported Content Type)",
            ),
            (
                410,
                Value::Null,
                ErrorClass::Permanent,
                Some("1"),
                "MoneyPipe error 1 (Deprecated action)",
            ),
            (
                404,
                json!({"message": "Not found"}),
                ErrorClass::Permanent,
                None,
                "MoneyPipe answered HTTP 404 (Operation or Transaction not found): Not found",
            ),
            (
                503,
                json!({"message": "down"}),
                ErrorClass::Retryable,
                None,
                "MoneyPipe answered HTTP 503: down",
            ),
            (
                429,
                Value::Null,
                ErrorClass::Retryable,
                None,
                "MoneyPipe answered HTTP 429",
            ),
        ];
        for (status, body, class, code, message) in cases {
            let server = MockServer::start().await;
            let mut reply = ResponseTemplate::new(status);
            if !body.is_null() {
                reply = reply.set_body_json(&body);
            }
            Mock::given(method("PUT"))
                .respond_with(reply)
                .mount(&server)
                .await;
            let d = decision(
                "reject",
                json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
                Some("no"),
            );
            let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
            assert_eq!(e.class, class, "{status} {body}");
            assert_eq!(e.provider_code.as_deref(), code, "{status} {body}");
            assert_eq!(e.message, message);
            assert_eq!(e.http_status, Some(status));
        }
    }

    #[tokio::test]
    async fn unauthenticated_is_an_auth_failure_without_the_token() {
        let server = MockServer::start().await;
        Mock::given(method("PUT"))
            .respond_with(
                ResponseTemplate::new(401)
                    .set_body_json(json!({"code": 2, "message": "Unauthenticated."})),
            )
            .mount(&server)
            .await;
        let d = decision(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1"]}),
            None,
        );
        let e = provider(&server).await.apply(&d, &ctx()).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Auth);
        assert_eq!(e.provider_code.as_deref(), Some("2"));
        assert_eq!(
            e.message,
            "MoneyPipe error 2 (Unauthenticated): Unauthenticated."
        );
        assert!(!format!("{e:?}").contains(TOKEN));
        // A static token: one call, no refresh attempt.
        assert_eq!(server.received_requests().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn target_and_reason_rules() {
        let server = MockServer::start().await;
        let p = provider(&server).await;
        let check = |action: &str, target: Value, reason: Option<&str>| {
            p.validate(&decision(action, target, reason))
        };
        assert!(
            check(
                "reject",
                json!({"operation_id": "op-1", "tx_ids": ["a"]}),
                Some("x")
            )
            .is_ok()
        );
        let many: Vec<String> = (0..100).map(|i| format!("tx-{i}")).collect();
        assert!(
            check(
                "approve",
                json!({"operation_id": "op-1", "tx_ids": many}),
                None
            )
            .is_ok()
        );

        let e = check(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["a"]}),
            None,
        )
        .unwrap_err();
        assert!(e.contains("reason is required"), "{e}");
        let e = check(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["a"]}),
            Some("  "),
        )
        .unwrap_err();
        assert!(e.contains("reason is required"), "{e}");
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": []}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids must hold 1..100 transaction ids, got 0");
        let too_many: Vec<String> = (0..101).map(|i| format!("tx-{i}")).collect();
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": too_many}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids must hold 1..100 transaction ids, got 101");
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": ["ok", "../x"]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids[1] must not contain a path separator");
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": [".."]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids[0] must not be a dot segment");
        let e = check(
            "approve",
            json!({"operation_id": "../op", "tx_ids": ["a"]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.operation_id must not contain a path separator");
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": ["a", "a"]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, r#"target.tx_ids lists "a" twice"#);
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": [7]}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids[0] must be a string");
        let e = check(
            "approve",
            json!({"operation_id": "op-1", "tx_ids": "a"}),
            None,
        )
        .unwrap_err();
        assert_eq!(e, "target.tx_ids must be an array of strings");
        let e = check("approve", json!({"tx_ids": ["a"]}), None).unwrap_err();
        assert_eq!(e, "missing required field target.operation_id");
        // Nothing was sent while validating.
        assert!(server.received_requests().await.unwrap().is_empty());
    }

    async fn read_server(txs: &[(&str, Value, bool)]) -> MockServer {
        let server = MockServer::start().await;
        for (id, status, linked) in txs {
            Mock::given(method("GET"))
                .and(path(format!("/v1/transactions/{id}")))
                .respond_with(ResponseTemplate::new(200).set_body_json(json!({"data": {
                    "id": id, "tx_id": "hash", "operation_id": "op-1",
                    "status": status, "linked": linked, "reject_reason": null,
                }})))
                .mount(&server)
                .await;
        }
        server
    }

    async fn observe(server: &MockServer, action: &str, ids: &[&str]) -> Observed {
        let d = decision(
            action,
            json!({"operation_id": "op-1", "tx_ids": ids}),
            Some("no"),
        );
        provider(server).await.read_state(&d).await.unwrap()
    }

    #[tokio::test]
    async fn read_state_reads_every_transaction() {
        let server = read_server(&[
            ("tx-1", json!("rejected"), false),
            ("tx-2", json!(4), false),
        ])
        .await;
        let o = observe(&server, "reject", &["tx-1", "tx-2"]).await;
        assert_eq!(o.verdict, Verdict::AsDecided);
        assert_eq!(o.state, "rejected");
        let calls = server.received_requests().await.unwrap();
        let mut paths: Vec<&str> = calls.iter().map(|r| r.url.path()).collect();
        paths.sort();
        assert_eq!(paths, ["/v1/transactions/tx-1", "/v1/transactions/tx-2"]);
        for r in &calls {
            assert_eq!(r.method.as_str(), "GET");
            assert_eq!(
                header(r, "authorization"),
                Some(&*format!("Bearer {TOKEN}"))
            );
            assert!(r.body.is_empty());
        }

        let server = read_server(&[
            ("tx-1", json!("confirmed"), true),
            ("tx-2", json!("undefined"), false),
        ])
        .await;
        let o = observe(&server, "approve", &["tx-1", "tx-2"]).await;
        assert_eq!(o.verdict, Verdict::Pending);
        assert_eq!(o.state, "tx-1=confirmed,tx-2=undefined");

        let server = read_server(&[
            ("tx-1", json!(2), false),
            ("tx-2", json!("rejected"), false),
        ])
        .await;
        let o = observe(&server, "approve", &["tx-1", "tx-2"]).await;
        assert_eq!(o.verdict, Verdict::Conflict);
        assert_eq!(o.state, "tx-1=undefined,tx-2=rejected");

        let server = read_server(&[("tx-1", json!(1), true)]).await;
        let o = observe(&server, "reject", &["tx-1"]).await;
        assert_eq!(o.verdict, Verdict::Conflict);
        assert_eq!(o.state, "confirmed");
    }

    #[tokio::test]
    async fn read_state_surfaces_a_missing_transaction() {
        let server = read_server(&[("tx-1", json!("rejected"), false)]).await;
        Mock::given(method("GET"))
            .and(path("/v1/transactions/tx-2"))
            .respond_with(
                ResponseTemplate::new(404)
                    .set_body_json(json!({"code": 6, "message": "Transaction not found"})),
            )
            .mount(&server)
            .await;
        let d = decision(
            "reject",
            json!({"operation_id": "op-1", "tx_ids": ["tx-1", "tx-2"]}),
            Some("no"),
        );
        let e = provider(&server).await.read_state(&d).await.unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.provider_code.as_deref(), Some("6"));
    }

    #[test]
    fn missing_token_disables_and_a_bad_template_is_refused() {
        let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        let s = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
        assert!(build(&s.providers, &http).unwrap().is_none());
        let s = Settings::load_from(
            None,
            vec![
                (
                    "APPROVAL_PROVIDERS__MONEYPIPE__TOKEN".to_owned(),
                    "t".to_owned(),
                ),
                (
                    "APPROVAL_PROVIDERS__MONEYPIPE__REJECT_PATH".to_owned(),
                    "/operations/reject".to_owned(),
                ),
            ],
        )
        .unwrap();
        let e = build(&s.providers, &http).err().unwrap().to_string();
        assert!(
            e.contains("APPROVAL_PROVIDERS__MONEYPIPE__REJECT_PATH"),
            "{e}"
        );
    }
}
