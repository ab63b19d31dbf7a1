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

use std::sync::Arc;

use async_trait::async_trait;
use reqwest::{Method, StatusCode, Url};
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{
    CallContext, Observed, Provider, Reply, Verdict,
    http::{self, Http, Response},
};
use crate::{
    decision::{Action, Decision},
    retry::{CallError, ErrorClass},
    settings::{ProviderSections, SettingsError, check_base_url, present},
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
    api_key: Option<SecretString>,
}

pub struct LedgerV1 {
    http: Http,
    base: Url,
    api_key: SecretString,
}

pub fn build(
    sections: &ProviderSections,
    http: &Http,
) -> Result<Option<Arc<dyn Provider>>, SettingsError> {
    let s: LedgerV1Settings = sections.section(NAME)?;
    let base = check_base_url(NAME, &s.base_url)?;
    let Some(api_key) = present(&s.api_key) else {
        return Ok(None);
    };
    Ok(Some(Arc::new(LedgerV1 {
        http: http.clone(),
        base,
        api_key: api_key.clone(),
    })))
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
            .header("X-Ledger-API-Key", self.api_key.expose_secret())
            .header("Accept", "application/json")
    }

    fn transaction_url(&self, id: u64, suffix: &str) -> Url {
        // An integer needs no percent-encoding.
        http::join(&self.base, &format!("/transactions/{id}{suffix}"))
    }

    /// Ledger v1's error classes, in one place.
    fn classify(response: &Response) -> CallError {
        let (code, message) = error_fields(&response.body);
        let class = match response.status.as_u16() {
            // Ledger's rate-limit answer; `http::error` reads Retry-After or
            // X-RateLimit-Reset into the delay.
            420 | 429 | 500..=599 => ErrorClass::Retryable,
            // A static API key that is refused stays refused.
            401 | 403 => ErrorClass::Auth,
            404 => ErrorClass::Permanent,
            // No conflict answer is documented (PROVIDERS.md 2.3): "not
            // pending" may come as any of these, so read the state.
            400 | 409 | 422 => ErrorClass::Ambiguous,
            s => http::default_class(StatusCode::from_u16(s).unwrap_or(StatusCode::BAD_GATEWAY)),
        };
        http::error(class, response, code, message)
    }
}

#[async_trait]
impl Provider for LedgerV1 {
    fn name(&self) -> &'static str {
        NAME
    }

    fn validate(&self, d: &Decision) -> Result<(), String> {
        transaction_id(d)?;
        match d.action {
            Action::Reject => Ok(()),
            Action::Approve => approve_body(d).map(|_| ()),
        }
    }

    fn target_key(&self, d: &Decision) -> String {
        transaction_id(d)
            .map(|id| id.to_string())
            .unwrap_or_default()
    }

    async fn apply(&self, d: &Decision, ctx: &CallContext) -> Result<Reply, CallError> {
        let id = transaction_id(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
        let verb = d.action.as_str();
        let mut req = self
            .request(Method::POST, self.transaction_url(id, &format!("/{verb}")))
            .header("Idempotency-Key", &ctx.idempotency_key);
        if d.action == Action::Approve {
            let body = approve_body(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
            req = req.json(&body);
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

    async fn read_state(&self, d: &Decision) -> Result<Observed, CallError> {
        let id = transaction_id(d).map_err(|e| CallError::new(ErrorClass::Permanent, e))?;
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
                response: Some(response.body),
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

    const API_KEY: &str = "v1-api-key-s3cr3t";

    fn decision(action: &str, target: Value) -> Decision {
        parse(
            json!({
                "decision_id": "d-1",
                "provider": NAME,
                "action": action,
                "target": target,
            })
            .to_string()
            .as_bytes(),
        )
        .unwrap()
    }

    fn ctx() -> CallContext {
        CallContext {
            idempotency_key: "idem-v1-1".into(),
            attempt: 1,
            confirmation_token: None,
        }
    }

    fn provider(base_url: &str) -> Arc<dyn Provider> {
        let settings = Settings::load_from(
            None,
            vec![
                (
                    "APPROVAL_PROVIDERS__LEDGER_V1__BASE_URL".to_owned(),
                    base_url.to_owned(),
                ),
                (
                    "APPROVAL_PROVIDERS__LEDGER_V1__API_KEY".to_owned(),
                    API_KEY.to_owned(),
                ),
            ],
        )
        .unwrap();
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        build(&settings.providers, &http).unwrap().expect("enabled")
    }

    fn approve_target() -> Value {
        json!({
            "transaction_id": 42,
            "account_name": "BTC hot",
            "recipient": "tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm",
            "amount": "1432199",
        })
    }

    fn header<'a>(r: &'a wiremock::Request, name: &str) -> Option<&'a str> {
        r.headers.get(name).and_then(|v| v.to_str().ok())
    }

    #[tokio::test]
    async fn disabled_without_an_api_key() {
        let settings = Settings::load_from(None, Vec::<(String, String)>::new()).unwrap();
        let http = Http::new(Duration::from_secs(1), Duration::from_secs(1)).unwrap();
        assert!(build(&settings.providers, &http).unwrap().is_none());
    }

    #[tokio::test]
    async fn reject_posts_without_body_and_parses_the_status() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/transactions/42/reject"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"id": 42, "status": "REJECTED"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let d = decision("reject", json!({"transaction_id": 42}));
        p.validate(&d).unwrap();
        let Reply::Done { state, response } = p.apply(&d, &ctx()).await.unwrap() else {
            panic!("expected Done");
        };
        assert_eq!(state.as_deref(), Some("REJECTED"));
        assert_eq!(response["id"], 42);

        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 1);
        let r = &calls[0];
        assert_eq!(r.method.as_str(), "POST");
        assert_eq!(r.url.path(), "/transactions/42/reject");
        assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
        assert_eq!(header(r, "idempotency-key"), Some("idem-v1-1"));
        assert_eq!(header(r, "accept"), Some("application/json"));
        assert_eq!(header(r, "content-type"), None);
        assert!(r.body.is_empty());
    }

    #[tokio::test]
    async fn approve_sends_the_five_creation_fields_and_counts_pending_approval_as_applied() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/transactions/42/approve"))
            .respond_with(
                ResponseTemplate::new(200)
                    .set_body_json(json!({"id": 42, "status": "PENDING_APPROVAL"})),
            )
            .expect(1)
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let d = decision("approve", approve_target());
        p.validate(&d).unwrap();
        let Reply::Done { state, .. } = p.apply(&d, &ctx()).await.unwrap() else {
            panic!("expected Done");
        };
        assert_eq!(state.as_deref(), Some("PENDING_APPROVAL"));

        let calls = server.received_requests().await.unwrap();
        assert_eq!(calls.len(), 1);
        let r = &calls[0];
        assert_eq!(r.method.as_str(), "POST");
        assert_eq!(r.url.path(), "/transactions/42/approve");
        assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
        assert_eq!(header(r, "idempotency-key"), Some("idem-v1-1"));
        assert_eq!(header(r, "content-type"), Some("application/json"));
        assert_eq!(
            std::str::from_utf8(&r.body).unwrap(),
            r#"{"account_name":"BTC hot","recipient":"tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm","amount":"1432199","max_fees":null,"coin_fields":null}"#
        );
    }

    #[tokio::test]
    async fn approve_passes_coin_fields_through() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/transactions/7/approve"))
            .respond_with(ResponseTemplate::new(200).set_body_json(json!({"status": "APPROVED"})))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let d = decision(
            "approve",
            json!({"transaction_id": 7, "account_name": "a", "recipient": "r",
                   "amount": null, "max_fees": "2100", "coin_fields": {"fees_per_byte": 10}}),
        );
        p.apply(&d, &ctx()).await.unwrap();
        let calls = server.received_requests().await.unwrap();
        assert_eq!(
            std::str::from_utf8(&calls[0].body).unwrap(),
            r#"{"account_name":"a","recipient":"r","amount":null,"max_fees":"2100","coin_fields":{"fees_per_byte":10}}"#
        );
    }

    #[test]
    fn validation_rules() {
        let p = provider("http://127.0.0.1:9");
        let check = |action: &str, target: Value| p.validate(&decision(action, target));

        assert!(check("reject", json!({"transaction_id": 1})).is_ok());
        for bad in [json!("42"), json!(4.2), json!(0), json!(-3), json!(null)] {
            let e = check("reject", json!({"transaction_id": bad})).unwrap_err();
            assert!(e.contains("transaction_id"), "{e}");
        }
        let e = check("reject", json!({})).unwrap_err();
        assert!(
            e.contains("missing required field target.transaction_id"),
            "{e}"
        );

        let mut t = approve_target();
        t.as_object_mut().unwrap().remove("account_name");
        let e = check("approve", t).unwrap_err();
        assert!(e.contains("account_name"), "{e}");

        let mut t = approve_target();
        t.as_object_mut().unwrap().remove("recipient");
        let e = check("approve", t).unwrap_err();
        assert!(e.contains("recipient"), "{e}");

        for (field, bad) in [
            ("amount", json!(100)),
            ("amount", json!("1.5")),
            ("max_fees", json!("")),
            ("coin_fields", json!([1])),
        ] {
            let mut t = approve_target();
            t[field] = bad;
            let e = check("approve", t).unwrap_err();
            assert!(e.contains(field), "{e}");
        }
    }

    #[tokio::test]
    async fn error_bodies_give_message_name_and_status() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/transactions/42/reject"))
            .respond_with(ResponseTemplate::new(404).set_body_json(json!({
                "message": "Transaction not found",
                "name": "NotFoundError",
                "status_code": 404
            })))
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let e = p
            .apply(&decision("reject", json!({"transaction_id": 42})), &ctx())
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Permanent);
        assert_eq!(e.message, "Transaction not found");
        assert_eq!(e.provider_code.as_deref(), Some("NotFoundError"));
        assert_eq!(e.http_status, Some(404));
        assert!(!e.message.contains(API_KEY));
    }

    #[test]
    fn classes_of_statuses() {
        let class = |status: u16| {
            LedgerV1::classify(&Response {
                status: StatusCode::from_u16(status).unwrap(),
                headers: Default::default(),
                body: Value::Null,
            })
            .class
        };
        for s in [420, 429, 500, 503] {
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
    async fn rate_limit_420_is_retryable_after_the_asked_delay() {
        let server = MockServer::start().await;
        Mock::given(method("POST"))
            .and(path("/transactions/1/reject"))
            .respond_with(
                ResponseTemplate::new(420)
                    .insert_header("Retry-After", "7")
                    .set_body_json(json!({"message": "Rate limit exceeded", "name": "RateLimit", "status_code": 420})),
            )
            .mount(&server)
            .await;
        Mock::given(method("POST"))
            .and(path("/transactions/2/reject"))
            .respond_with(ResponseTemplate::new(420).insert_header("X-RateLimit-Reset", "12"))
            .mount(&server)
            .await;
        let p = provider(&server.uri());

        let e = p
            .apply(&decision("reject", json!({"transaction_id": 1})), &ctx())
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.http_status, Some(420));
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
        assert_eq!(e.message, "Rate limit exceeded");

        let e = p
            .apply(&decision("reject", json!({"transaction_id": 2})), &ctx())
            .await
            .unwrap_err();
        assert_eq!(e.class, ErrorClass::Retryable);
        assert_eq!(e.retry_after, Some(Duration::from_secs(12)));
        assert_eq!(e.message, "provider answered HTTP 420");
    }

    #[tokio::test]
    async fn read_state_reads_the_transaction() {
        let server = MockServer::start().await;
        Mock::given(method("GET"))
            .and(path("/transactions/42"))
            .respond_with(
                ResponseTemplate::new(200).set_body_json(json!({"id": 42, "status": "SIGNED"})),
            )
            .mount(&server)
            .await;
        let p = provider(&server.uri());
        let seen = p
            .read_state(&decision("approve", approve_target()))
            .await
            .unwrap();
        assert_eq!(seen.state, "SIGNED");
        assert_eq!(seen.verdict, Verdict::AsDecided);
        let seen = p
            .read_state(&decision("reject", json!({"transaction_id": 42})))
            .await
            .unwrap();
        assert_eq!(seen.verdict, Verdict::Conflict);

        let calls = server.received_requests().await.unwrap();
        let r = &calls[0];
        assert_eq!(r.method.as_str(), "GET");
        assert_eq!(r.url.path(), "/transactions/42");
        assert_eq!(header(r, "x-ledger-api-key"), Some(API_KEY));
        assert!(r.body.is_empty());
    }

    #[test]
    fn verdicts() {
        use Action::{Approve, Reject};
        for s in [
            "APPROVED",
            "SIGNED",
            "SUBMITTED",
            "BROADCASTED",
            "CONFIRMED",
        ] {
            assert_eq!(verdict(Approve, s), Verdict::AsDecided, "{s}");
            assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
        }
        for s in ["REJECTED", "ABORTED"] {
            assert_eq!(verdict(Reject, s), Verdict::AsDecided, "{s}");
            assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
        }
        // Our approval may or may not be among the recorded ones.
        assert_eq!(verdict(Approve, "PENDING_APPROVAL"), Verdict::Pending);
        assert_eq!(verdict(Reject, "PENDING_APPROVAL"), Verdict::Pending);
        for s in ["EXPIRED", "FAILED", "DROPPED", "SOMETHING_NEW"] {
            assert_eq!(verdict(Approve, s), Verdict::Conflict, "{s}");
            assert_eq!(verdict(Reject, s), Verdict::Conflict, "{s}");
        }
    }
}
