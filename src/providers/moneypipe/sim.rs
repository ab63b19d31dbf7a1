//! MoneyPipe Merchant API v1's simulator half (PROVIDERS.md section 5),
//! written from its documentation, not from the client: link (approve) or
//! reject an operation's transactions. The reject path and the error body's
//! field names are UNCONFIRMED; the sim uses `{"code": int, "message"}` plus
//! `errors` for validation failures.
//!
//! Routes, relative to the base URL (`/moneypipe/v1`):
//! `PUT /operations/{op}/link-transactions`,
//! `PUT /operations/{op}/reject-transactions`, `GET /operations/{op}`,
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
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, put};
use serde::Serialize;
use serde_json::{Value, json};

use crate::tools::sim::kit::{
    Fake, KeyLog, Reply, TargetInfo, Targets, applied, bearer, idempotency_key, is_json, json,
    now_rfc3339, random_hex,
};
use crate::tools::sim::stats::Counters;
use crate::tools::sim::unit::{SimHalf, SimUnit, UnitOptions};

/// Pending transactions show MoneyPipe's "undefined" status.
const PENDING: &str = "undefined";
const MAX_TX_IDS: usize = 100;

/// What the fake accepts; set through `SimConfig::with(Options { .. })`.
#[derive(Clone, Debug)]
pub struct Options {
    pub token: String,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            token: "sim-moneypipe-token".into(),
        }
    }
}

/// The registry's handle on this half.
pub(crate) struct Half;

impl SimHalf for Half {
    fn prefix(&self) -> &'static str {
        "/moneypipe/v1"
    }

    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String> {
        Ok(Arc::new(Sim::new(options.get())))
    }

    fn decided_state(&self, action: &str) -> &'static str {
        if action == "approve" {
            "confirmed"
        } else {
            "rejected"
        }
    }

    fn sample_target(&self, _action: &str) -> Value {
        let short = || uuid::Uuid::new_v4().simple().to_string()[..12].to_owned();
        json!({"operation_id": format!("op-{}", short()), "tx_ids": [format!("tx-{}", short())]})
    }

    /// Transactions are the targets; a sample names one.
    fn sample_key(&self, target: &Value) -> Option<String> {
        target["tx_ids"][0].as_str().map(str::to_owned)
    }
}

/// One running fake of this provider.
type Sim = Fake<Options, Store>;

impl SimUnit for Sim {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/operations/{operation_id}", get(read_operation))
            .route("/operations/{operation_id}/{action}", put(decide))
            .route("/transactions/{id}", get(read_transaction))
            .with_state(self)
    }

    /// MoneyPipe codes are integers (PROVIDERS.md section 5).
    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        error(status, code.parse().unwrap_or(0), message)
    }

    fn fault_code(&self, _rate_limited: bool) -> &'static str {
        "0"
    }

    fn worker_env(&self) -> Vec<(&'static str, String)> {
        vec![("TOKEN", self.config.token.clone())]
    }
}

#[derive(Clone, Debug, Serialize)]
struct Transaction {
    id: String,
    /// Chain hash, random in the sim.
    tx_id: String,
    /// Set when an operation first names the transaction; a transaction
    /// first seen through a read has none yet.
    operation_id: Option<String>,
    amount: &'static str,
    status: &'static str,
    linked: bool,
    reject_reason: Option<String>,
    created_at: String,
    updated_at: String,
    #[serde(skip)]
    keys: KeyLog,
}

struct Operation {
    id: String,
    created_at: String,
    updated_at: String,
    transaction_ids: Vec<String>,
}

#[derive(Serialize)]
struct OperationView<'a> {
    id: &'a str,
    status: &'static str,
    currency: &'static str,
    created_at: &'a str,
    updated_at: &'a str,
    transactions: Vec<&'a Transaction>,
}

#[derive(Default)]
struct Store {
    transactions: HashMap<String, Transaction>,
    operations: HashMap<String, Operation>,
}

impl Targets for Store {
    fn target(&self, id: &str) -> Option<TargetInfo> {
        self.transactions.get(id).map(|tx| tx.keys.info(tx.status))
    }
}

impl Store {
    fn operation(&mut self, id: &str) -> &mut Operation {
        self.operations.entry(id.to_owned()).or_insert_with(|| {
            let now = now_rfc3339();
            Operation {
                id: id.to_owned(),
                created_at: now.clone(),
                updated_at: now,
                transaction_ids: Vec::new(),
            }
        })
    }

    fn transaction(&mut self, id: &str) -> &mut Transaction {
        self.transactions.entry(id.to_owned()).or_insert_with(|| {
            let now = now_rfc3339();
            Transaction {
                id: id.to_owned(),
                tx_id: random_hex(32),
                operation_id: None,
                amount: "10.00",
                status: PENDING,
                linked: false,
                reject_reason: None,
                created_at: now.clone(),
                updated_at: now,
                keys: KeyLog::default(),
            }
        })
    }

    fn view(&self, operation_id: &str) -> Option<OperationView<'_>> {
        let op = self.operations.get(operation_id)?;
        Some(OperationView {
            id: &op.id,
            status: "new",
            currency: "EUR",
            created_at: &op.created_at,
            updated_at: &op.updated_at,
            transactions: op
                .transaction_ids
                .iter()
                .filter_map(|id| self.transactions.get(id))
                .collect(),
        })
    }
}

/// MoneyPipe's error table pairs an integer code with each HTTP status.
fn error(status: StatusCode, code: u32, message: &str) -> Response {
    json(status, &json!({"code": code, "message": message}))
}

fn validation(field: &str, messages: Vec<String>) -> Response {
    json(
        StatusCode::UNPROCESSABLE_ENTITY,
        &json!({"code": 9, "message": "Validation errors", "errors": {field: messages}}),
    )
}

fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if bearer(headers) == Some(sim.config.token.as_str()) {
        Ok(())
    } else {
        Err(error(StatusCode::UNAUTHORIZED, 2, "Unauthenticated"))
    }
}

async fn read_transaction(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let mut store = sim.store();
    Ok(json(
        StatusCode::OK,
        &json!({"data": store.transaction(&id)}),
    ))
}

async fn read_operation(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let mut store = sim.store();
    store.operation(&id);
    Ok(json(StatusCode::OK, &json!({"data": store.view(&id)})))
}

enum Action {
    Link,
    Reject { reason: String },
}

/// `tx_id` holds 1..=100 ids; numbers are accepted as ids too since
/// MoneyPipe's id type is not documented. Duplicates are dropped.
fn parse_body(link: bool, body: &[u8]) -> Result<(Vec<String>, Action), Response> {
    let Ok(value) = serde_json::from_slice::<Value>(body) else {
        return Err(validation(
            "body",
            vec!["The body must be a JSON object.".into()],
        ));
    };
    let ids = value.get("tx_id").and_then(Value::as_array).map(|items| {
        items
            .iter()
            .map(|item| match item {
                Value::String(s) if !s.is_empty() => Some(s.clone()),
                Value::Number(n) => Some(n.to_string()),
                _ => None,
            })
            .collect::<Option<Vec<String>>>()
    });
    let mut ids = match ids {
        Some(Some(ids)) if !ids.is_empty() && ids.len() <= MAX_TX_IDS => ids,
        _ => {
            return Err(validation(
                "tx_id",
                vec![format!(
                    "The tx id field must be an array of 1 to {MAX_TX_IDS} ids."
                )],
            ));
        }
    };
    let mut seen = std::collections::HashSet::new();
    ids.retain(|id| seen.insert(id.clone()));
    if link {
        return Ok((ids, Action::Link));
    }
    match value.get("reason").and_then(Value::as_str) {
        Some(reason) if !reason.is_empty() => Ok((
            ids,
            Action::Reject {
                reason: reason.to_owned(),
            },
        )),
        _ => Err(validation(
            "reason",
            vec!["The reason field is required.".into()],
        )),
    }
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((operation_id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let link = match action.as_str() {
        "link-transactions" => true,
        "reject-transactions" => false,
        _ => return Err(error(StatusCode::NOT_FOUND, 0, "Not found")),
    };
    authorize(&sim, &headers)?;
    if !is_json(&headers) {
        return Err(error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            10,
            "Unsupported Content Type",
        ));
    }
    let (ids, action) = parse_body(link, &body)?;

    let counters = &sim.counters;
    let key = idempotency_key(&headers);
    let mut store = sim.store();
    // A transaction belongs to the operation that first named it; checked
    // before anything is touched so a refused call leaves no trace.
    let foreign = ids.iter().any(|id| {
        let owner = store
            .transactions
            .get(id)
            .and_then(|tx| tx.operation_id.as_deref());
        owner.is_some_and(|owner| owner != operation_id)
    });
    if foreign {
        return Err(error(StatusCode::NOT_FOUND, 6, "Transaction not found"));
    }
    store.operation(&operation_id);
    let mut not_pending = Vec::new();
    for id in &ids {
        let tx = store.transaction(id);
        tx.operation_id = Some(operation_id.clone());
        let pending = tx.status == PENDING;
        if !tx.keys.admit(key, pending, counters) {
            not_pending.push(format!("transaction {id} is not pending"));
        }
        let op = store.operation(&operation_id);
        if !op.transaction_ids.contains(id) {
            op.transaction_ids.push(id.clone());
        }
    }
    if !not_pending.is_empty() {
        // All or nothing: no transaction of the call changes.
        return Err(validation("tx_id", not_pending));
    }
    let now = now_rfc3339();
    for id in &ids {
        let tx = store.transaction(id);
        match &action {
            Action::Link => {
                tx.status = "confirmed";
                tx.linked = true;
            }
            Action::Reject { reason } => {
                tx.status = "rejected";
                tx.reject_reason = Some(reason.clone());
            }
        }
        tx.updated_at = now.clone();
    }
    store.operation(&operation_id).updated_at = now;
    Counters::add(&counters.state_changes, ids.len() as u64);
    Ok(applied(json(
        StatusCode::OK,
        &json!({"data": store.view(&operation_id)}),
    )))
}
