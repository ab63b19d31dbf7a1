//! Ledger Enterprise v1 transactions with the `X-Ledger-API-Key` header
//! (PROVIDERS.md section 2). Rate limits answer 420, handled in faults.rs.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::Value;

use super::state::{KeyLog, Sim, applied, header_str, idempotency_key, json, lock, now_rfc3339};
use super::stats::Counters;
use super::{Provider, TargetInfo};

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/transactions/{id}", get(read))
        .route("/transactions/{id}/{action}", post(decide))
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
pub(crate) struct Store {
    transactions: HashMap<u64, Transaction>,
}

impl Store {
    pub fn target(&self, key: &str) -> Option<TargetInfo> {
        let tx = self.transactions.get(&key.parse().ok()?)?;
        Some(tx.keys.info(tx.status))
    }

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
    Provider::LedgerV1.error(status, name, message)
}

fn not_found() -> Response {
    error(StatusCode::NOT_FOUND, "NotFound", "Transaction not found")
}

fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if header_str(headers, "x-ledger-api-key")
        == Some(sim.config.credentials.ledger_v1_api_key.as_str())
    {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "Unauthorized",
            "Invalid or missing API key",
        ))
    }
}

async fn read(State(sim): State<Arc<Sim>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let Ok(id) = id.parse::<u64>() else {
        return not_found();
    };
    let mut store = lock(&sim.ledger_v1);
    json(StatusCode::OK, &*store.transaction(id))
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
) -> Response {
    if action != "approve" && action != "reject" {
        return error(StatusCode::NOT_FOUND, "NotFound", "Not found");
    }
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let Ok(id) = id.parse::<u64>() else {
        return not_found();
    };
    // Reject takes no body; approve must carry the creation fields.
    let approve = if action == "approve" {
        match parse_approve(&body) {
            Ok(fields) => Some(fields),
            Err(response) => return response,
        }
    } else {
        None
    };

    let counters = sim.counters(Provider::LedgerV1);
    let mut store = lock(&sim.ledger_v1);
    let tx = store.transaction(id);
    tx.keys.record(idempotency_key(&headers), counters);
    if tx.status != "PENDING_APPROVAL" {
        Counters::bump(&counters.double_state_changes);
        return error(
            StatusCode::BAD_REQUEST,
            "InvalidTransactionStatus",
            "Transaction is not pending approval",
        );
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
    applied(json(StatusCode::OK, &*tx))
}
