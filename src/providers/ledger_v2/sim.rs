//! Ledger Enterprise v2 ("revault-api", PROVIDERS.md section 3): token
//! exchange, challenges, and approve/reject answered with a signed challenge
//! (section 4). The challenge path and the `data.signature` format are
//! UNCONFIRMED upstream; the sim implements the contract's reading of them.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Serialize;
use serde_json::{Value, json};

use super::state::{
    KeyLog, Sim, TokenStore, applied, bearer, idempotency_key, json, lock, now_rfc3339, random_hex,
};
use super::stats::Counters;
use super::{Provider, TargetInfo};

/// Unused challenges kept per request; older ones are forgotten so a client
/// that fetches challenges in a loop cannot grow memory.
const MAX_OPEN_CHALLENGES: usize = 16;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/rest/auth/token", post(token))
        .route("/rest/auth/token/refresh", post(refresh))
        .route("/rest/requests/{id}", get(read))
        .route("/rest/requests/{id}/challenge", get(challenge))
        .route("/rest/requests/{id}/{action}", post(decide))
}

#[derive(Default)]
pub(crate) struct Tokens {
    access: TokenStore,
    refresh: TokenStore,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct ReviewStep {
    stage_name: &'static str,
    quorum: u32,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Review {
    step_index: u32,
    user_id: String,
    status: &'static str,
    created_at: String,
    updated_at: String,
}

#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct VaultRequest {
    #[serde(rename = "type")]
    kind: &'static str,
    id: String,
    legacy_id: u64,
    state: &'static str,
    review_steps: [ReviewStep; 1],
    current_step_index: u32,
    expired_at: String,
    target_id: String,
    note: Option<Value>,
    reviews: Vec<Review>,
    created_at: String,
    updated_at: String,
    inflight: Option<Value>,
    #[serde(skip)]
    keys: KeyLog,
    #[serde(skip)]
    challenges: VecDeque<Vec<u8>>,
}

#[derive(Default)]
pub(crate) struct Store {
    requests: HashMap<String, VaultRequest>,
    next_legacy_id: u64,
}

impl Store {
    pub fn target(&self, id: &str) -> Option<TargetInfo> {
        self.requests.get(id).map(|r| r.keys.info(r.state))
    }

    fn request(&mut self, id: &str) -> &mut VaultRequest {
        if !self.requests.contains_key(id) {
            self.next_legacy_id += 1;
        }
        let legacy_id = self.next_legacy_id;
        self.requests.entry(id.to_owned()).or_insert_with(|| {
            let now = time::OffsetDateTime::now_utc();
            let created = super::state::rfc3339(now);
            VaultRequest {
                kind: "CREATE_TRANSACTION",
                id: id.to_owned(),
                legacy_id,
                state: "PENDING_APPROVAL",
                review_steps: [ReviewStep {
                    stage_name: "Approvers",
                    quorum: 1,
                }],
                current_step_index: 0,
                // Ledger requests expire after 7 days.
                expired_at: super::state::rfc3339(now + time::Duration::days(7)),
                target_id: uuid::Uuid::new_v4().to_string(),
                note: None,
                reviews: Vec::new(),
                created_at: created.clone(),
                updated_at: created,
                inflight: None,
                keys: KeyLog::default(),
                challenges: VecDeque::new(),
            }
        })
    }
}

fn error(status: StatusCode, code: &str, message: &str) -> Response {
    Provider::LedgerV2.error(status, code, message)
}

fn invalid_input(issue: &str) -> Response {
    json(
        StatusCode::BAD_REQUEST,
        &json!({"message": "Invalid input data", "code": "BAD_REQUEST", "issues": [{"message": issue}]}),
    )
}

fn unauthorized() -> Response {
    error(
        StatusCode::UNAUTHORIZED,
        "UNAUTHORIZED",
        "Authorization not provided or expired",
    )
}

fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    let valid =
        bearer(headers).is_some_and(|token| lock(&sim.ledger_v2_tokens).access.is_valid(token));
    if valid { Ok(()) } else { Err(unauthorized()) }
}

fn string_field<'v>(value: &'v Value, name: &str) -> Result<&'v str, Response> {
    value
        .get(name)
        .and_then(Value::as_str)
        .ok_or_else(|| invalid_input(&format!("{name} is required")))
}

/// Issues an access/refresh pair; both the exchange and the refresh answer
/// this same shape.
fn issue(sim: &Sim) -> Response {
    let (access, refresh) = {
        let mut tokens = lock(&sim.ledger_v2_tokens);
        (
            tokens.access.issue(sim.config.ledger_v2_access_ttl),
            tokens.refresh.issue(sim.config.ledger_v2_refresh_ttl),
        )
    };
    Counters::bump(&sim.counters(Provider::LedgerV2).token_issued);
    json(
        StatusCode::OK,
        &json!({
            "accessToken": access,
            "expiresInSeconds": sim.config.ledger_v2_access_ttl.as_secs(),
            "refreshToken": refresh,
            "refreshExpiresInSeconds": sim.config.ledger_v2_refresh_ttl.as_secs(),
        }),
    )
}

async fn token(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return invalid_input("body must be a JSON object");
    };
    let fields = (
        string_field(&value, "workspace"),
        string_field(&value, "apiKeyId"),
        string_field(&value, "apiKeySecret"),
    );
    let (workspace, key_id, secret) = match fields {
        (Ok(w), Ok(k), Ok(s)) => (w, k, s),
        (Err(e), _, _) | (_, Err(e), _) | (_, _, Err(e)) => return e,
    };
    let c = &sim.config.credentials;
    if workspace != c.ledger_v2_workspace
        || key_id != c.ledger_v2_api_key_id
        || secret != c.ledger_v2_api_key_secret
    {
        return error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid credentials",
        );
    }
    issue(&sim)
}

async fn refresh(State(sim): State<Arc<Sim>>, body: Bytes) -> Response {
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return invalid_input("body must be a JSON object");
    };
    let (workspace, refresh_token) = match (
        string_field(&value, "workspace"),
        string_field(&value, "refreshToken"),
    ) {
        (Ok(w), Ok(r)) => (w, r),
        (Err(e), _) | (_, Err(e)) => return e,
    };
    let valid = workspace == sim.config.credentials.ledger_v2_workspace
        && lock(&sim.ledger_v2_tokens).refresh.is_valid(refresh_token);
    if !valid {
        return error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid or expired refresh token",
        );
    }
    issue(&sim)
}

async fn read(State(sim): State<Arc<Sim>>, Path(id): Path<String>, headers: HeaderMap) -> Response {
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let mut store = lock(&sim.ledger_v2);
    json(StatusCode::OK, &*store.request(&id))
}

/// Issues a fresh challenge for the request and remembers its bytes, which
/// the signed JWS payload must later equal.
async fn challenge(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let payload = json!({
        "antireplay": random_hex(32),
        "data": {"request_id": id, "action": "REVIEW"},
        "type": "APPROVE_REQUEST",
    });
    let bytes = serde_json::to_vec(&payload).unwrap_or_default();
    let encoded = URL_SAFE_NO_PAD.encode(&bytes);
    let mut store = lock(&sim.ledger_v2);
    let challenges = &mut store.request(&id).challenges;
    if challenges.len() >= MAX_OPEN_CHALLENGES {
        challenges.pop_front();
    }
    challenges.push_back(bytes);
    json(StatusCode::OK, &json!({"challenge": encoded}))
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let decided_state = match action.as_str() {
        "approve" => "APPROVED",
        "reject" => "REJECTED",
        _ => return error(StatusCode::NOT_FOUND, "NOT_FOUND", "Not found"),
    };
    if let Err(response) = authorize(&sim, &headers) {
        return response;
    }
    let Ok(value) = serde_json::from_slice::<Value>(&body) else {
        return invalid_input("body must be a JSON object");
    };
    let Some(data) = value.get("data").filter(|d| d.is_object()) else {
        return invalid_input("data is required");
    };
    let signature = match string_field(data, "signature") {
        Ok(signature) => signature,
        Err(response) => return response,
    };
    match data.get("challengeType").and_then(Value::as_str) {
        Some("API") => {}
        _ => return invalid_input("data.challengeType must be \"API\""),
    }
    // Verify outside the lock: ECDSA verification is the costliest step here.
    let payload = if sim.config.ledger_v2_verify_signatures {
        crate::jws::verify_jws(&sim.verifying_key, signature).ok()
    } else {
        unverified_payload(signature)
    };
    let Some(payload) = payload else {
        return error(
            StatusCode::FORBIDDEN,
            "INVALID_SIGNATURE",
            "Signature verification failed",
        );
    };

    let counters = sim.counters(Provider::LedgerV2);
    let mut store = lock(&sim.ledger_v2);
    let request = store.request(&id);
    let Some(position) = request.challenges.iter().position(|c| *c == payload) else {
        return error(
            StatusCode::FORBIDDEN,
            "INVALID_CHALLENGE",
            "Signed payload is not an open challenge of this request",
        );
    };
    request.challenges.remove(position);
    request.keys.record(idempotency_key(&headers), counters);
    if request.state != "PENDING_APPROVAL" {
        Counters::bump(&counters.double_state_changes);
        return error(
            StatusCode::BAD_REQUEST,
            "REQUEST_NOT_PENDING",
            "Request is not pending approval",
        );
    }
    let now = now_rfc3339();
    request.state = decided_state;
    request.reviews.push(Review {
        step_index: 0,
        user_id: sim.config.credentials.ledger_v2_api_key_id.clone(),
        status: decided_state,
        created_at: now.clone(),
        updated_at: now.clone(),
    });
    request.updated_at = now;
    Counters::bump(&counters.state_changes);
    applied(json(StatusCode::OK, &*request))
}

/// The payload of a compact JWS without checking its signature, for
/// benchmarks that turn verification off.
fn unverified_payload(jws: &str) -> Option<Vec<u8>> {
    let mut segments = jws.split('.');
    let (_, payload, _, None) = (
        segments.next()?,
        segments.next()?,
        segments.next()?,
        segments.next(),
    ) else {
        return None;
    };
    URL_SAFE_NO_PAD.decode(payload).ok()
}
