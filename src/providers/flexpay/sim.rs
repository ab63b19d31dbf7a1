//! FlexPay IDaaS (PROVIDERS.md section 6): client-credentials token, then
//! accept/reject of transactions awaiting acceptance, all answered in the
//! `{success, message, errorCode, data, errors, timestamp}` envelope. The
//! token answer's field names, the error statuses and the single-transaction
//! GET are UNCONFIRMED upstream.

use std::collections::HashMap;
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde::Serialize;
use serde_json::{Value, json};

use super::state::{
    KeyLog, Sim, applied, bearer, form_pairs, header_str, idempotency_key, json, lock, now_rfc3339,
    number_param, rfc3339,
};
use super::stats::Counters;
use super::{Provider, TargetInfo};

const PENDING: &str = "AWAITING_ACCEPTANCE";
const MAX_REASON_CHARS: usize = 500;
const MAX_PAGE_SIZE: usize = 1000;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/v1/auth/token", post(token))
        .route("/v1/transactions/pending", get(pending))
        .route("/v1/transactions/{reference}", get(read))
        .route("/v1/transactions/{reference}/{action}", post(decide))
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
pub(crate) struct Store {
    transactions: HashMap<String, Transaction>,
    /// Creation order, for the newest-first pending list.
    order: Vec<String>,
}

impl Store {
    pub fn target(&self, reference: &str) -> Option<TargetInfo> {
        self.transactions
            .get(reference)
            .map(|tx| tx.keys.info(tx.status))
    }

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

pub(crate) fn error(
    status: StatusCode,
    code: &str,
    message: &str,
    errors: Vec<String>,
) -> Response {
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
    let valid = bearer(headers).is_some_and(|token| lock(&sim.flexpay_tokens).is_valid(token));
    if valid {
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

/// Accepts JSON or form-urlencoded credentials, as FlexPay documents.
fn credentials(headers: &HeaderMap, body: &[u8]) -> Option<(String, String)> {
    let form = header_str(headers, header::CONTENT_TYPE.as_str())
        .is_some_and(|ct| ct.starts_with("application/x-www-form-urlencoded"));
    if form {
        let pairs = form_pairs(std::str::from_utf8(body).ok()?);
        let field = |name: &str| {
            pairs
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.clone())
        };
        Some((field("client_id")?, field("client_secret")?))
    } else {
        let value: Value = serde_json::from_slice(body).ok()?;
        let field = |name: &str| value.get(name).and_then(Value::as_str).map(str::to_owned);
        Some((field("client_id")?, field("client_secret")?))
    }
}

async fn token(State(sim): State<Arc<Sim>>, headers: HeaderMap, body: Bytes) -> Response {
    let oauth = sim.config.flexpay_oauth_token_shape;
    let c = &sim.config.credentials;
    let valid = credentials(&headers, &body)
        .is_some_and(|(id, secret)| id == c.flexpay_client_id && secret == c.flexpay_client_secret);
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
    let ttl = sim.config.flexpay_token_ttl;
    let token = lock(&sim.flexpay_tokens).issue(ttl);
    Counters::bump(&sim.counters(Provider::FlexPay).token_issued);
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
) -> Response {
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let mut store = lock(&sim.flexpay);
    envelope(
        StatusCode::OK,
        "Transaction retrieved",
        &*store.transaction(&reference),
    )
}

/// Spring-style page of pending transactions, newest first (`page` from 0).
async fn pending(
    State(sim): State<Arc<Sim>>,
    RawQuery(query): RawQuery,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let pairs = form_pairs(query.as_deref().unwrap_or(""));
    let (page, size) = match (number_param(&pairs, "page"), number_param(&pairs, "size")) {
        (Ok(page), Ok(size)) => (
            page.unwrap_or(0),
            size.unwrap_or(20).clamp(1, MAX_PAGE_SIZE),
        ),
        (Err(msg), _) | (_, Err(msg)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                "Invalid paging",
                vec![msg],
            );
        }
    };
    let store = lock(&sim.flexpay);
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
    envelope(StatusCode::OK, "Pending transactions retrieved", data)
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((reference, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let accept = match action.as_str() {
        "accept" => true,
        "reject" => false,
        _ => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "Not found", Vec::new()),
    };
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    // Reject's reason is optional (UNCONFIRMED whether FlexPay requires it) but
    // bounded; accept ignores any body.
    let reason = if accept || body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        let Ok(value) = serde_json::from_slice::<Value>(&body) else {
            return error(
                StatusCode::BAD_REQUEST,
                "VALIDATION_ERROR",
                "Malformed JSON body",
                Vec::new(),
            );
        };
        match value.get("reason") {
            None | Some(Value::Null) => None,
            Some(Value::String(reason)) if reason.chars().count() <= MAX_REASON_CHARS => {
                Some(reason.clone())
            }
            Some(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "VALIDATION_ERROR",
                    "Validation failed",
                    vec![format!(
                        "reason: must be a string of at most {MAX_REASON_CHARS} characters"
                    )],
                );
            }
        }
    };

    let counters = sim.counters(Provider::FlexPay);
    let mut store = lock(&sim.flexpay);
    let tx = store.transaction(&reference);
    tx.keys.record(idempotency_key(&headers), counters);
    if tx.status != PENDING {
        Counters::bump(&counters.double_state_changes);
        let detail = format!("Transaction {reference} is {}", tx.status);
        return error(
            StatusCode::BAD_REQUEST,
            "TRANSACTION_NOT_PENDING",
            "Transaction is not awaiting acceptance",
            vec![detail],
        );
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
    applied(envelope(StatusCode::OK, message, &*tx))
}
