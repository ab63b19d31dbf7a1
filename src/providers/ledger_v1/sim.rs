//! Ledger Enterprise v1's simulator half, written from its documentation
//! (PROVIDERS.md section 2), not from the client: transactions with the
//! `X-Ledger-API-Key` header. Rate limits answer 420 with `X-RateLimit-*`.
//!
//! Routes, relative to the base URL (`/ledger-v1`):
//! `POST /transactions/{id}/reject`, `POST /transactions/{id}/approve`,
//! `GET /transactions/{id}`.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Value, json};

use crate::tools::sim::kit::{
    Fake, KeyLog, Reply, TargetInfo, Targets, applied, header_str, idempotency_key, json,
    now_rfc3339,
};
use crate::tools::sim::quota::Refusal;
use crate::tools::sim::stats::Counters;
use crate::tools::sim::unit::{SimHalf, SimUnit, UnitOptions};

/// What the fake accepts; set through `SimConfig::with(Options { .. })`.
#[derive(Clone, Debug)]
pub struct Options {
    pub api_key: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            api_key: "sim-ledger-v1-key".into(),
        }
    }
}

/// The registry's handle on this half.
pub(crate) struct Half;

impl SimHalf for Half {
    fn prefix(&self) -> &'static str {
        "/ledger-v1"
    }

    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String> {
        Ok(Arc::new(Sim::new(options.get())))
    }

    fn decided_state(&self, action: &str) -> &'static str {
        if action == "approve" {
            "APPROVED"
        } else {
            "REJECTED"
        }
    }

    fn sample_target(&self, action: &str) -> Value {
        // 52 random bits: unique across a benchmark run, and exact in JSON
        // consumers that read numbers as doubles.
        let id = (uuid::Uuid::new_v4().as_u128() >> 76) as u64 + 1;
        if action == "approve" {
            json!({"transaction_id": id, "account_name": "treasury-btc", "recipient": "tb1q2tvjts80vthcywq9au2yynpezca57mvv0j7lzm",
                "amount": "1432199", "max_fees": "2100", "coin_fields": null})
        } else {
            json!({"transaction_id": id})
        }
    }

    fn sample_key(&self, target: &Value) -> Option<String> {
        target["transaction_id"].as_u64().map(|id| id.to_string())
    }

    fn decision_path(&self, key: &str) -> Option<String> {
        Some(format!("/transactions/{key}/"))
    }
}

/// One running fake of this provider.
type Sim = Fake<Options, Store>;

impl SimUnit for Sim {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/transactions/{id}", get(read))
            .route("/transactions/{id}/{action}", post(decide))
            .with_state(self)
    }

    fn error(&self, status: StatusCode, name: &str, message: &str) -> Response {
        error(status, name, message)
    }

    fn fault_code(&self, rate_limited: bool) -> &'static str {
        if rate_limited {
            "RateLimitExceeded"
        } else {
            "ServiceUnavailable"
        }
    }

    /// Ledger v1 documents 420 (not 429) with `X-RateLimit-*` headers.
    fn rate_limited(&self, retry_after_secs: u64) -> Response {
        // The plan's limit is unknown to a fault; an arbitrary figure.
        throttled(retry_after_secs, 100)
    }

    /// Over a simulated quota, the headers name the window that refused.
    fn quota_exceeded(&self, refusal: &Refusal) -> Response {
        throttled(refusal.retry_after_secs(), refusal.limit)
    }

    fn worker_env(&self) -> Vec<(&'static str, String)> {
        vec![("API_KEY", self.config.api_key.clone())]
    }
}

/// 420 with `Retry-After` and `X-RateLimit-*`: nothing left until the reset.
fn throttled(retry_after_secs: u64, limit: u64) -> Response {
    let status = StatusCode::from_u16(420).unwrap_or(StatusCode::TOO_MANY_REQUESTS);
    let mut response = error(status, "RateLimitExceeded", "Too Many Requests (simulated)");
    let headers = response.headers_mut();
    headers.insert("retry-after", HeaderValue::from(retry_after_secs));
    // UNCONFIRMED unit: we send the reset time as Unix epoch seconds.
    let reset = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() + retry_after_secs)
        .unwrap_or_default();
    headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
    headers.insert("x-ratelimit-limit", HeaderValue::from(limit));
    headers.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
    response
}

#[derive(Clone, Debug, Serialize)]
struct Transaction {
    id: u64,
    status: &'static str,
    #[serde(rename = "type")]
    kind: &'static str,
    account_name: String,
    recipient: String,
    amount: String,
    currency: &'static str,
    max_fees: Option<String>,
    fees: Option<String>,
    coin_fields: Option<Value>,
    tx_hash: Option<String>,
    failure_reasons: Vec<String>,
    created_on: String,
    updated_on: String,
    #[serde(skip)]
    keys: KeyLog,
}

#[derive(Default)]
struct Store {
    transactions: HashMap<u64, Transaction>,
}

impl Targets for Store {
    fn target(&self, key: &str) -> Option<TargetInfo> {
        let tx = self.transactions.get(&key.parse().ok()?)?;
        Some(tx.keys.info(tx.status))
    }
}

impl Store {
    fn transaction(&mut self, id: u64) -> &mut Transaction {
        self.transactions.entry(id).or_insert_with(|| {
            let now = now_rfc3339();
            Transaction {
                id,
                status: "PENDING_APPROVAL",
                kind: "SEND",
                account_name: "sim-account".into(),
                recipient: "sim-recipient".into(),
                amount: "1000".into(),
                currency: "bitcoin",
                max_fees: None,
                fees: None,
                coin_fields: None,
                tx_hash: None,
                failure_reasons: Vec::new(),
                created_on: now.clone(),
                updated_on: now,
                keys: KeyLog::default(),
            }
        })
    }
}

fn error(status: StatusCode, name: &str, message: &str) -> Response {
    json(
        status,
        &json!({"message": message, "name": name, "status_code": status.as_u16()}),
    )
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "NotFound", "Transaction not found")
}

fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if header_str(headers, "x-ledger-api-key") == Some(sim.config.api_key.as_str()) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Invalid or missing API key",
        ))
    }
}

async fn read(State(sim): State<Arc<Sim>>, Path(id): Path<String>, headers: HeaderMap) -> Reply {
    authorize(&sim, &headers)?;
    let Ok(id) = id.parse::<u64>() else {
        return Err(not_found());
    };
    let mut store = sim.store();
    Ok(json(StatusCode::OK, &*store.transaction(id)))
}

/// The creation fields an approve must repeat. The sim cannot know what was
/// sent at creation, so it checks their presence and types and records them.
struct ApproveFields {
    account_name: String,
    recipient: String,
    amount: Option<String>,
    max_fees: Option<String>,
    coin_fields: Option<Value>,
}

fn parse_approve(body: &[u8]) -> Result<ApproveFields, Response> {
    let invalid = |detail: &str| {
        error(
            StatusCode::BAD_REQUEST,
            "ValidationError",
            &format!("Invalid transaction parameters: {detail}"),
        )
    };
    let value: Value =
        serde_json::from_slice(body).map_err(|_| invalid("body must be a JSON object"))?;
    let required = |name: &str| {
        value
            .get(name)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| invalid(&format!("{name} is required")))
    };
    let nullable_string = |name: &str| match value.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(_) => Err(invalid(&format!("{name} must be a string or null"))),
    };
    let coin_fields = match value.get("coin_fields") {
        None | Some(Value::Null) => None,
        Some(object @ Value::Object(_)) => Some(object.clone()),
        Some(_) => return Err(invalid("coin_fields must be an object or null")),
    };
    Ok(ApproveFields {
        account_name: required("account_name")?,
        recipient: required("recipient")?,
        amount: nullable_string("amount")?,
        max_fees: nullable_string("max_fees")?,
        coin_fields,
    })
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    if action != "approve" && action != "reject" {
        return Err(error(StatusCode::NOT_FOUND, "NotFound", "Not found"));
    }
    authorize(&sim, &headers)?;
    let Ok(id) = id.parse::<u64>() else {
        return Err(not_found());
    };
    // Reject takes no body; approve must carry the creation fields.
    let approve = if action == "approve" {
        Some(parse_approve(&body)?)
    } else {
        None
    };

    let counters = &sim.counters;
    let mut store = sim.store();
    let tx = store.transaction(id);
    let pending = tx.status == "PENDING_APPROVAL";
    if !tx.keys.admit(idempotency_key(&headers), pending, counters) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "InvalidTransactionStatus",
            "Transaction is not pending approval",
        ));
    }
    match approve {
        Some(fields) => {
            tx.status = "APPROVED";
            tx.account_name = fields.account_name;
            tx.recipient = fields.recipient;
            if let Some(amount) = fields.amount {
                tx.amount = amount;
            }
            tx.max_fees = fields.max_fees;
            tx.coin_fields = fields.coin_fields;
        }
        None => tx.status = "REJECTED",
    }
    tx.updated_on = now_rfc3339();
    Counters::bump(&counters.state_changes);
    Ok(applied(json(StatusCode::OK, &*tx)))
}
