//! Ledger Enterprise v2's simulator half ("revault-api", PROVIDERS.md
//! section 3), written from its documentation, not from the client: token
//! exchange, challenges, and approve/reject answered with a signed challenge
//! (section 4). The challenge path and the `data.signature` format are
//! UNCONFIRMED upstream; the sim implements the contract's reading of them.
//!
//! Routes, relative to the base URL (`/ledger-v2`): `POST /rest/auth/token`,
//! `POST /rest/auth/token/refresh`, `GET /rest/requests/{id}/challenge` (an
//! `APPROVE_REQUEST` challenge), `GET /rest/requests/{id}/challenge/reject`
//! (a `REJECT_REQUEST` one, as Ledger v1 documents the pair),
//! `POST /rest/requests/{id}/approve`, `POST /rest/requests/{id}/reject`,
//! `GET /rest/requests/{id}`. A decision signed over the other action's
//! challenge is refused, as the HSM acts on what was signed.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::Response;
use axum::routing::{get, post};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::ecdsa::signature::Verifier as _;
use p256::ecdsa::{Signature, VerifyingKey};
use p256::pkcs8::DecodePrivateKey as _;
use serde::Serialize;
use serde_json::{Value, json};

use crate::tools::sim::kit::{
    Fake, KeyLog, Reply, TargetInfo, Targets, applied, idempotency_key, json, now_rfc3339,
    random_hex, rfc3339,
};
use crate::tools::sim::stats::Counters;
use crate::tools::sim::unit::{CallKind, SimHalf, SimUnit, UnitOptions};

/// Unused challenges kept per request; older ones are forgotten so a client
/// that fetches challenges in a loop cannot grow memory.
const MAX_OPEN_CHALLENGES: usize = 16;

/// The API user's key the fake trusts by default, and that `worker_env`
/// hands to the worker for the simulator and the `demo` command.
///
/// It is public, so it protects nothing: never register its public key with
/// a real Ledger workspace.
pub const DEMO_SIGNING_KEY_PEM: &str = "-----BEGIN EC PRIVATE KEY-----
MHcCAQEEIFsg5itIFqngrRsCZPJprXcfAvii0RCu8RFgS3UZZYDnoAoGCCqGSM49
AwEHoUQDQgAE8u2GmfKd7mISYOrvmx4I2BHCcvNFNIeJQOGoxFmFjN4W0/chcYbf
VH41Aga7/MJLRX/ALF4ujNHwWzIPJXor4Q==
-----END EC PRIVATE KEY-----
";

/// What the fake accepts and how it behaves; set through
/// `SimConfig::with(Options { .. })`.
#[derive(Clone, Debug)]
pub struct Options {
    pub workspace: String,
    pub api_key_id: String,
    pub api_key_secret: String,
    /// PEM (SEC1 or PKCS#8) of the API user's key. The fake keeps only its
    /// public half to verify signatures; the PEM itself is handed to the
    /// worker by `worker_env`.
    pub signing_key_pem: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
    /// `false` skips the ECDSA check of signatures (the payload must still
    /// be an open challenge). Only for throughput benchmarks: a verify costs
    /// CPU that a real provider would not take from the worker's machine.
    pub verify_signatures: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workspace: "sim-workspace".into(),
            api_key_id: "sim-key-id".into(),
            api_key_secret: "sim-key-secret".into(),
            signing_key_pem: DEMO_SIGNING_KEY_PEM.into(),
            access_ttl: Duration::from_secs(300),
            refresh_ttl: Duration::from_secs(1800),
            verify_signatures: true,
        }
    }
}

/// The registry's handle on this half.
pub(crate) struct Half;

impl SimHalf for Half {
    fn prefix(&self) -> &'static str {
        "/ledger-v2"
    }

    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String> {
        let options: Options = options.get();
        let verifying_key = public_key(&options.signing_key_pem)?;
        Ok(Arc::new(Sim::new(Config {
            verifying_key: options.verify_signatures.then_some(verifying_key),
            options,
        })))
    }

    fn decided_state(&self, action: &str) -> &'static str {
        if action == "approve" {
            "APPROVED"
        } else {
            "REJECTED"
        }
    }

    fn issues_tokens(&self) -> bool {
        true
    }

    fn sample_target(&self, _action: &str) -> Value {
        json!({"request_id": uuid::Uuid::new_v4().to_string()})
    }

    fn sample_key(&self, target: &Value) -> Option<String> {
        target["request_id"].as_str().map(str::to_owned)
    }

    fn for_bench(&self, options: &mut UnitOptions) {
        let mut ours: Options = options.get();
        ours.verify_signatures = false;
        options.set(ours);
    }

    /// A challenge read, then the signed decision.
    fn calls_per_decision(&self) -> u32 {
        2
    }

    fn decision_path(&self, key: &str) -> Option<String> {
        Some(format!("/requests/{key}/"))
    }
}

/// One running fake of this provider.
type Sim = Fake<Config, Store>;

/// The options, with the key that checks signatures parsed once at start;
/// `None` when signatures go unchecked.
struct Config {
    options: Options,
    verifying_key: Option<VerifyingKey>,
}

impl SimUnit for Sim {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/rest/auth/token", post(token))
            .route("/rest/auth/token/refresh", post(refresh))
            .route("/rest/requests/{id}", get(read))
            .route("/rest/requests/{id}/challenge", get(approve_challenge))
            .route(
                "/rest/requests/{id}/challenge/reject",
                get(reject_challenge),
            )
            .route("/rest/requests/{id}/{action}", post(decide))
            .with_state(self)
    }

    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        error(status, code, message)
    }

    fn call_kind(&self, method: &Method, path: &str) -> CallKind {
        CallKind::with_auth_under("/auth/token", method, path)
    }

    fn worker_env(&self) -> Vec<(&'static str, String)> {
        let o = &self.config.options;
        vec![
            ("WORKSPACE", o.workspace.clone()),
            ("API_KEY_ID", o.api_key_id.clone()),
            ("API_KEY_SECRET", o.api_key_secret.clone()),
            ("SIGNING_KEY", o.signing_key_pem.clone()),
        ]
    }
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
struct Store {
    requests: HashMap<String, VaultRequest>,
    next_legacy_id: u64,
}

impl Targets for Store {
    fn target(&self, id: &str) -> Option<TargetInfo> {
        self.requests.get(id).map(|r| r.keys.info(r.state))
    }
}

impl Store {
    fn request(&mut self, id: &str) -> &mut VaultRequest {
        if !self.requests.contains_key(id) {
            self.next_legacy_id += 1;
        }
        let legacy_id = self.next_legacy_id;
        self.requests.entry(id.to_owned()).or_insert_with(|| {
            let now = time::OffsetDateTime::now_utc();
            let created = rfc3339(now);
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
                expired_at: rfc3339(now + time::Duration::days(7)),
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
    json(
        status,
        &json!({"message": message, "code": code, "issues": []}),
    )
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
    if sim.bearer_valid(headers) {
        Ok(())
    } else {
        Err(unauthorized())
    }
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
    let o = &sim.config.options;
    let (access, refresh) = sim.issue_tokens(o.access_ttl, Some(o.refresh_ttl));
    json(
        StatusCode::OK,
        &json!({
            "accessToken": access,
            "expiresInSeconds": o.access_ttl.as_secs(),
            "refreshToken": refresh,
            "refreshExpiresInSeconds": o.refresh_ttl.as_secs(),
        }),
    )
}

fn object(body: &[u8]) -> Result<Value, Response> {
    serde_json::from_slice(body).map_err(|_| invalid_input("body must be a JSON object"))
}

async fn token(State(sim): State<Arc<Sim>>, body: Bytes) -> Reply {
    let value = object(&body)?;
    let workspace = string_field(&value, "workspace")?;
    let key_id = string_field(&value, "apiKeyId")?;
    let secret = string_field(&value, "apiKeySecret")?;
    let c = &sim.config.options;
    if workspace != c.workspace || key_id != c.api_key_id || secret != c.api_key_secret {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid credentials",
        ));
    }
    Ok(issue(&sim))
}

async fn refresh(State(sim): State<Arc<Sim>>, body: Bytes) -> Reply {
    let value = object(&body)?;
    let workspace = string_field(&value, "workspace")?;
    let refresh_token = string_field(&value, "refreshToken")?;
    if workspace != sim.config.options.workspace || !sim.refresh_valid(refresh_token) {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHORIZED",
            "Invalid or expired refresh token",
        ));
    }
    Ok(issue(&sim))
}

async fn read(State(sim): State<Arc<Sim>>, Path(id): Path<String>, headers: HeaderMap) -> Reply {
    authorize(&sim, &headers)?;
    let mut store = sim.store();
    Ok(json(StatusCode::OK, &*store.request(&id)))
}

async fn approve_challenge(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    challenge(&sim, id, &headers, "APPROVE_REQUEST")
}

async fn reject_challenge(
    State(sim): State<Arc<Sim>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Reply {
    challenge(&sim, id, &headers, "REJECT_REQUEST")
}

/// The challenge type that a decision call of `action` must have signed.
fn challenge_type(action: &str) -> &'static str {
    if action == "approve" {
        "APPROVE_REQUEST"
    } else {
        "REJECT_REQUEST"
    }
}

/// Issues a fresh challenge of `kind` for the request and remembers its
/// bytes, which the signed JWS payload must later equal.
fn challenge(sim: &Sim, id: String, headers: &HeaderMap, kind: &str) -> Reply {
    authorize(sim, headers)?;
    let payload = json!({
        "antireplay": random_hex(32),
        "data": {"request_id": id, "action": "REVIEW"},
        "type": kind,
    });
    let bytes = serde_json::to_vec(&payload).unwrap_or_default();
    let encoded = URL_SAFE_NO_PAD.encode(&bytes);
    let mut store = sim.store();
    let challenges = &mut store.request(&id).challenges;
    if challenges.len() >= MAX_OPEN_CHALLENGES {
        challenges.pop_front();
    }
    challenges.push_back(bytes);
    Ok(json(StatusCode::OK, &json!({"challenge": encoded})))
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((id, action)): Path<(String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let decided_state = match action.as_str() {
        "approve" => "APPROVED",
        "reject" => "REJECTED",
        _ => return Err(error(StatusCode::NOT_FOUND, "NOT_FOUND", "Not found")),
    };
    authorize(&sim, &headers)?;
    let value = object(&body)?;
    let Some(data) = value.get("data").filter(|d| d.is_object()) else {
        return Err(invalid_input("data is required"));
    };
    let signature = string_field(data, "signature")?;
    match data.get("challengeType").and_then(Value::as_str) {
        Some("API") => {}
        _ => return Err(invalid_input("data.challengeType must be \"API\"")),
    }
    // Verify outside the lock: ECDSA verification is the costliest step here.
    let Some(payload) = signed_payload(sim.config.verifying_key.as_ref(), signature) else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "INVALID_SIGNATURE",
            "Signature verification failed",
        ));
    };

    let counters = &sim.counters;
    let mut store = sim.store();
    let request = store.request(&id);
    let Some(position) = request.challenges.iter().position(|c| *c == payload) else {
        return Err(error(
            StatusCode::FORBIDDEN,
            "INVALID_CHALLENGE",
            "Signed payload is not an open challenge of this request",
        ));
    };
    request.challenges.remove(position);
    let signed_type = serde_json::from_slice::<Value>(&payload)
        .ok()
        .and_then(|c| c.get("type").and_then(Value::as_str).map(str::to_owned));
    if signed_type.as_deref() != Some(challenge_type(&action)) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "INVALID_CHALLENGE",
            "Signed challenge is not for this action",
        ));
    }
    let pending = request.state == "PENDING_APPROVAL";
    if !request
        .keys
        .admit(idempotency_key(&headers), pending, counters)
    {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "REQUEST_NOT_PENDING",
            "Request is not pending approval",
        ));
    }
    let now = now_rfc3339();
    request.state = decided_state;
    request.reviews.push(Review {
        step_index: 0,
        user_id: sim.config.options.api_key_id.clone(),
        status: decided_state,
        created_at: now.clone(),
        updated_at: now.clone(),
    });
    request.updated_at = now;
    Counters::bump(&counters.state_changes);
    Ok(applied(json(StatusCode::OK, &*request)))
}

/// The public half of the API user's key, from its PEM.
pub(super) fn public_key(pem: &str) -> Result<VerifyingKey, String> {
    let secret = if pem.contains("-----BEGIN PRIVATE KEY-----") {
        p256::SecretKey::from_pkcs8_pem(pem).map_err(|_| "signing key: not a P-256 PKCS#8 key")?
    } else {
        p256::SecretKey::from_sec1_pem(pem).map_err(|_| "signing key: not a P-256 EC key PEM")?
    };
    Ok(VerifyingKey::from(secret.public_key()))
}

/// The payload of a compact JWS as Ledger documents it (PROVIDERS.md
/// section 4): `base64url(header).base64url(payload).base64url(r||s)`, an
/// ES256 signature over the ASCII of the first two segments as received.
/// Written from that format rather than taken from the client, so a
/// misreading of it in the client cannot pass the fake. Without `key` the
/// signature is not checked (benchmarks); the shape still is.
pub(super) fn signed_payload(key: Option<&VerifyingKey>, jws: &str) -> Option<Vec<u8>> {
    let mut segments = jws.split('.');
    let (Some(header), Some(payload), Some(signature), None) = (
        segments.next(),
        segments.next(),
        segments.next(),
        segments.next(),
    ) else {
        return None;
    };
    let payload_bytes = URL_SAFE_NO_PAD.decode(payload).ok()?;
    let Some(key) = key else {
        return Some(payload_bytes);
    };
    let protected: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    if protected["alg"] != "ES256" {
        return None;
    }
    let signature = Signature::from_slice(&URL_SAFE_NO_PAD.decode(signature).ok()?).ok()?;
    let signing_input = &jws[..header.len() + 1 + payload.len()];
    key.verify(signing_input.as_bytes(), &signature).ok()?;
    Some(payload_bytes)
}
