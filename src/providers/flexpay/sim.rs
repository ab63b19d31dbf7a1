//! FlexPay IDaaS's simulator half (PROVIDERS.md section 6), written from its
//! documentation, not from the client: client-credentials token, then
//! accept/reject of transactions awaiting acceptance, all answered in the
//! `{success, message, errorCode, data, errors, timestamp}` envelope. The
//! token answer's field names, the error statuses and the single-transaction
//! GET are UNCONFIRMED upstream.
//!
//! Routes, relative to the base URL (`/flexpay/api`): `POST /v1/auth/token`,
//! `POST /v1/transactions/{ref}/accept`, `POST /v1/transactions/{ref}/reject`,
//! `GET /v1/transactions/pending`, `GET /v1/transactions/{ref}`.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use crate::tools::sim::kit::{
    Fake, KeyLog, Reply, TargetInfo, Targets, applied, header_str, idempotency_key, json,
    now_rfc3339, rfc3339,
};
use crate::tools::sim::stats::Counters;
use crate::tools::sim::unit::{CallKind, SimHalf, SimUnit, UnitOptions};

const PENDING: &str = "AWAITING_ACCEPTANCE";
const MAX_REASON_CHARS: usize = 500;
const MAX_PAGE_SIZE: usize = 1000;

/// What the fake accepts and how it behaves; set through
/// `SimConfig::with(Options { .. })`.
#[derive(Clone, Debug)]
pub struct Options {
    pub client_id: String,
    pub client_secret: String,
    pub token_ttl: Duration,
    /// The token answer is UNCONFIRMED: `false` gives the envelope form
    /// (`data.accessToken`), `true` the OAuth form (`access_token`).
    pub oauth_token_shape: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            client_id: "sim-flexpay-client".into(),
            client_secret: "sim-flexpay-secret".into(),
            token_ttl: Duration::from_secs(3600),
            oauth_token_shape: false,
        }
    }
}

/// The registry's handle on this half.
pub(crate) struct Half;

impl SimHalf for Half {
    fn prefix(&self) -> &'static str {
        "/flexpay/api"
    }

    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String> {
        Ok(Arc::new(Sim::new(options.get())))
    }

    fn decided_state(&self, action: &str) -> &'static str {
        if action == "approve" {
            "COMPLETED"
        } else {
            "REJECTED"
        }
    }

    fn issues_tokens(&self) -> bool {
        true
    }

    fn sample_target(&self, _action: &str) -> Value {
        let short = uuid::Uuid::new_v4().simple().to_string()[..12].to_uppercase();
        json!({"reference": format!("TXN-{short}")})
    }

    fn sample_key(&self, target: &Value) -> Option<String> {
        target["reference"].as_str().map(str::to_owned)
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
            .route("/v1/auth/token", post(token))
            .route("/v1/transactions/pending", get(pending))
            .route("/v1/transactions/{reference}", get(read))
            .route("/v1/transactions/{reference}/{action}", post(decide))
            .with_state(self)
    }

    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        error(status, code, message, Vec::new())
    }

    fn call_kind(&self, method: &Method, path: &str) -> CallKind {
        CallKind::with_auth_under("/auth/token", method, path)
    }

    fn worker_env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("CLIENT_ID", self.config.client_id.clone()),
            ("CLIENT_SECRET", self.config.client_secret.clone()),
        ]
    }
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Transaction {
    id: String,
    reference: String,
    sender_tag: &'static str,
    sender_app_name: &'static str,
    sender_app_id: &'static str,
    receiver_tag: &'static str,
    receiver_app_name: &'static str,
    receiver_app_id: &'static str,
    amount: f64,
    currency: &'static str,
    status: &'static str,
    narration: &'static str,
    expires_at: String,
    accepted_at: Option<String>,
    rejected_at: Option<String>,
    rejection_reason: Option<String>,
    created_at: String,
    updated_at: String,
    webhooks: Vec<Value>,
    #[serde(skip)]
    keys: KeyLog,
}

#[derive(Default)]
struct Store {
    transactions: HashMap<String, Transaction>,
    /// Creation order, for the newest-first pending list.
    order: Vec<String>,
}

impl Targets for Store {
    fn target(&self, reference: &str) -> Option<TargetInfo> {
        self.transactions
            .get(reference)
            .map(|tx| tx.keys.info(tx.status))
    }
}

impl Store {
    fn transaction(&mut self, reference: &str) -> &mut Transaction {
        if !self.transactions.contains_key(reference) {
            self.order.push(reference.to_owned());
        }
        self.transactions
            .entry(reference.to_owned())
            .or_insert_with(|| {
                let now = time::OffsetDateTime::now_utc();
                let created = rfc3339(now);
                Transaction {
                    id: uuid::Uuid::new_v4().to_string(),
                    reference: reference.to_owned(),
                    sender_tag: "@sim-sender",
                    sender_app_name: "Sim Sender",
                    sender_app_id: "00000000-0000-4000-8000-000000000001",
                    receiver_tag: "@sim-receiver",
                    receiver_app_name: "Sim Receiver",
                    receiver_app_id: "00000000-0000-4000-8000-000000000002",
                    amount: 100.0,
                    currency: "NGN",
                    status: PENDING,
                    narration: "Simulated payment",
                    expires_at: rfc3339(now + time::Duration::days(1)),
                    accepted_at: None,
                    rejected_at: None,
                    rejection_reason: None,
                    created_at: created.clone(),
                    updated_at: created,
                    webhooks: Vec::new(),
                    keys: KeyLog::default(),
                }
            })
    }
}

fn envelope<T: Serialize>(status: StatusCode, message: &str, data: T) -> Response {
    json(
        status,
        &json!({
            "success": true,
            "message": message,
            "errorCode": null,
            "data": data,
            "errors": [],
            "timestamp": now_rfc3339(),
        }),
    )
}

fn error(status: StatusCode, code: &str, message: &str, errors: Vec<String>) -> Response {
    json(
        status,
        &json!({
            "success": false,
            "message": message,
            "errorCode": code,
            "data": null,
            "errors": errors,
            "timestamp": now_rfc3339(),
        }),
    )
}

fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    if sim.bearer_valid(headers) {
        Ok(())
    } else {
        Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid or expired token",
            Vec::new(),
        ))
    }
}

#[derive(Deserialize)]
struct Credentials {
    client_id: String,
    client_secret: String,
}

/// Accepts JSON or form-urlencoded credentials, as FlexPay documents.
fn credentials(headers: &HeaderMap, body: &[u8]) -> Option<Credentials> {
    let form = header_str(headers, header::CONTENT_TYPE.as_str())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if form {
        serde_urlencoded::from_bytes(body).ok()
    } else {
        serde_json::from_slice(body).ok()
    }
}

async fn token(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let oauth = sim.config.oauth_token_shape;
    let c = &sim.config;
    let valid = credentials(&headers, &body).is_some_and(|given| {
        given.client_id == c.client_id && given.client_secret == c.client_secret
    });
    if !valid {
        return if oauth {
            json(
                StatusCode::UNAUTHORIZED,
                &json!({"error": "invalid_client", "error_description": "Invalid client credentials"}),
            )
        } else {
            error(
                StatusCode::UNAUTHORIZED,
                "INVALID_CLIENT",
                "Invalid client credentials",
                Vec::new(),
            )
        };
    }
    let ttl = sim.config.token_ttl;
    let (token, _) = sim.issue_tokens(ttl, None);
    if oauth {
        json(
            StatusCode::OK,
            &json!({"access_token": token, "expires_in": ttl.as_secs(), "token_type": "Bearer"}),
        )
    } else {
        envelope(
            StatusCode::OK,
            "ok",
            json!({"accessToken": token, "expiresIn": ttl.as_secs(), "tokenType": "Bearer"}),
        )
    }
}

async fn read(
    State(sim): State<Arc<Sim>>,
    Path(reference): Path<String>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let mut store = sim.store();
    Ok(envelope(
        StatusCode::OK,
        "Transaction retrieved",
        &*store.transaction(&reference),
    ))
}

#[derive(Deserialize)]
struct Paging {
    page: Option<usize>,
    size: Option<usize>,
}

/// Spring-style page of pending transactions, newest first (`page` from 0).
async fn pending(
    State(sim): State<Arc<Sim>>,
    paging: Result<Query<Paging>, QueryRejection>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let Ok(Query(paging)) = paging else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "VALIDATION_ERROR",
            "Invalid paging",
            vec!["page and size must be non-negative integers".into()],
        ));
    };
    let page = paging.page.unwrap_or(0);
    let size = paging.size.unwrap_or(20).clamp(1, MAX_PAGE_SIZE);
    let store = sim.store();
    let matching: Vec<&Transaction> = store
        .order
        .iter()
        .rev()
        .filter_map(|reference| store.transactions.get(reference))
        .filter(|tx| tx.status == PENDING)
        .collect();
    let total = matching.len();
    let total_pages = total.div_ceil(size);
    let content: Vec<&Transaction> = matching
        .into_iter()
        .skip(page.saturating_mul(size))
        .take(size)
        .collect();
    let sort = json!({"sorted": false, "unsorted": true, "empty": true});
    let data = json!({
        "content": content,
        "pageable": {
            "pageNumber": page,
            "pageSize": size,
            "offset": page.saturating_mul(size),
            "paged": true,
            "unpaged": false,
            "sort": sort,
        },
        "totalElements": total,
        "totalPages": total_pages,
        "last": page + 1 >= total_pages,
        "first": page == 0,
        "size": size,
        "number": page,
        "numberOfElements": content.len(),
        "sort": sort,
        "empty": content.is_empty(),
    });
    Ok(envelope(
        StatusCode::OK,
        "Pending transactions retrieved",
        data,
    ))
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((reference, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let accept = match action.as_str() {
        "accept" => true,
        "reject" => false,
        _ => {
            return Err(error(
                StatusCode::NOT_FOUND,
                "NOT_FOUND",
                "Not found",
                Vec::new(),
            ));
        }
    };
    authorize(&sim, &headers)?;
    // Reject's reason is optional (UNCONFIRMED whether FlexPay requires it) but
    // bounded; accept ignores any body.
    let reason = if accept || body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let Ok(value) = serde_json::from_slice::<Value>(&body) else {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                "Malformed JSON body",
                Vec::new(),
            ));
        };
        match value.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(reason)) if reason.chars().count() <= MAX_REASON_CHARS => {
                Some(reason.clone())
            }
            Some(_) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    "VALIDATION_ERROR",
                    "Validation failed",
                    vec![format!(
                        "reason: must be a string of at most {MAX_REASON_CHARS} characters"
                    )],
                ));
            }
        }
    };

    let counters = &sim.counters;
    let mut store = sim.store();
    let tx = store.transaction(&reference);
    if !tx
        .keys
        .admit(idempotency_key(&headers), tx.status == PENDING, counters)
    {
        let detail = format!("Transaction {reference} is {}", tx.status);
        return Err(error(
            StatusCode::BAD_REQUEST,
            "TRANSACTION_NOT_PENDING",
            "Transaction is not awaiting acceptance",
            vec![detail],
        ));
    }
    let now = now_rfc3339();
    if accept {
        tx.status = "COMPLETED";
        tx.accepted_at = Some(now.clone());
    } else {
        tx.status = "REJECTED";
        tx.rejected_at = Some(now.clone());
        tx.rejection_reason = reason;
    }
    tx.updated_at = now;
    Counters::bump(&counters.state_changes);
    let message = if accept {
        "Transaction accepted"
    } else {
        "Transaction rejected"
    };
    Ok(applied(envelope(StatusCode::OK, message, &*tx)))
}
