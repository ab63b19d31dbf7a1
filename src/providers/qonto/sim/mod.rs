//! Qonto's simulator half, written from Qonto's documentation (PROVIDERS.md
//! section 1), not from the client: request decline/approve with mandatory
//! idempotency keys, SCA on approve, and the request list used for
//! reconciliation.
//!
//! Routes, relative to the base URL (`/qonto`):
//! `POST /v2/requests/{plural_type}/{id}/decline`,
//! `POST /v2/requests/{plural_type}/{id}/approve`, `GET /v2/requests`
//! (filtered by status, type, `created_at`/`processed_at` window, sorted),
//! `GET /v2/sca_sessions/{token}`,
//! `POST /v2/mocked_sca_sessions/{token}/{allow|deny}`, and Qonto's OAuth
//! server (`oauth.rs`): `GET /oauth2/auth`, `POST /oauth2/token`.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, Method, StatusCode, header};
use axum::response::Response;
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

pub mod oauth;
mod sca;

use oauth::OAuthOptions;

use crate::tools::sim::kit::{
    Fake, KeyLog, Reply, ScaAuto, TargetInfo, Targets, applied, header_str, json, now_rfc3339,
    rfc3339,
};
use crate::tools::sim::stats::Counters;
use crate::tools::sim::unit::{CallKind, SimHalf, SimUnit, UnitOptions};

const IDEMPOTENCY_HEADER: &str = "x-qonto-idempotency-key";
const SCA_HEADER: &str = "x-qonto-sca-session-token";
const STAGING_HEADER: &str = "x-qonto-staging-token";
const MAX_PER_PAGE: usize = 100;

/// What the fake accepts and how it behaves; set through
/// `SimConfig::with(Options { .. })`.
#[derive(Clone, Debug)]
pub struct Options {
    pub login: String,
    pub secret_key: String,
    /// Accepted as `Authorization: Bearer <token>` (Qonto's OAuth option),
    /// besides the access tokens the OAuth server issues.
    pub access_token: String,
    /// When set, every call (the OAuth server's included) must carry it as
    /// `X-Qonto-Staging-Token`, as Qonto's sandbox requires.
    pub staging_token: Option<String>,
    pub oauth: OAuthOptions,
    /// When set, every approve needs SCA, resolved by this rule.
    pub sca_for_all_approvals: Option<ScaAuto>,
    /// How long a cached success is replayed for an idempotency key.
    pub idempotency_ttl: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            login: "sim-qonto".into(),
            secret_key: "sim-qonto-secret".into(),
            access_token: "sim-qonto-token".into(),
            staging_token: None,
            oauth: OAuthOptions::default(),
            sca_for_all_approvals: None,
            idempotency_ttl: Duration::from_secs(30 * 60),
        }
    }
}

/// The registry's handle on this half.
pub(crate) struct Half;

impl SimHalf for Half {
    fn prefix(&self) -> &'static str {
        "/qonto"
    }

    fn start(&self, options: &UnitOptions) -> Result<Arc<dyn SimUnit>, String> {
        let options: Options = options.get();
        let oauth = oauth::Server::new(options.oauth.clone())?;
        Ok(Arc::new(Sim::new(Setup { options, oauth })))
    }

    fn decided_state(&self, action: &str) -> &'static str {
        if action == "approve" {
            "approved"
        } else {
            "declined"
        }
    }

    fn sample_target(&self, _action: &str) -> Value {
        json!({"request_type": "transfers", "request_id": uuid::Uuid::new_v4().to_string()})
    }

    fn sample_key(&self, target: &Value) -> Option<String> {
        target["request_id"].as_str().map(str::to_owned)
    }

    /// Request ids are UUIDs.
    fn malformed_target(&self) -> Option<(&'static str, Value)> {
        Some((
            "approve",
            json!({"request_type": "transfers", "request_id": "not-a-uuid"}),
        ))
    }

    fn confirms(&self) -> bool {
        true
    }

    fn decision_path(&self, key: &str) -> Option<String> {
        Some(format!("/{key}/"))
    }
}

/// What the fake runs with. The OAuth server's grants live here rather
/// than among the targets, so a simulator reset keeps them.
struct Setup {
    options: Options,
    oauth: oauth::Server,
}

/// One running fake of this provider.
type Sim = Fake<Setup, Store>;

impl SimUnit for Sim {
    fn routes(self: Arc<Self>) -> Router {
        Router::new()
            .route("/v2/requests", get(list))
            .route("/v2/requests/{request_type}/{id}/{action}", post(decide))
            .route("/v2/sca_sessions/{token}", get(sca_session))
            .route("/v2/mocked_sca_sessions/{token}/{result}", post(mock_sca))
            .route("/oauth2/auth", get(oauth::auth_endpoint))
            .route("/oauth2/token", post(oauth::token_endpoint))
            .with_state(self)
    }

    fn error(&self, status: StatusCode, code: &str, message: &str) -> Response {
        error(status, code, message)
    }

    fn fault_code(&self, rate_limited: bool) -> &'static str {
        if rate_limited {
            "too_many_requests"
        } else {
            "service_unavailable"
        }
    }

    /// The sandbox's SCA mock plays the human: never faulted. The OAuth
    /// server is a token exchange, faulted only on request.
    fn call_kind(&self, method: &Method, path: &str) -> CallKind {
        if path.contains("/mocked_sca_sessions/") {
            CallKind::Helper
        } else {
            CallKind::with_auth_under("/oauth2/", method, path)
        }
    }

    /// API-key settings: the OAuth settings need a token store and a first
    /// pair, which `oauth::worker_env` gives those who want them.
    fn worker_env(&self) -> Vec<(&'static str, String)> {
        let o = &self.config.options;
        let mut env = vec![
            ("LOGIN", o.login.clone()),
            ("SECRET_KEY", o.secret_key.clone()),
        ];
        if let Some(staging) = &o.staging_token {
            env.push(("STAGING_TOKEN", staging.clone()));
        }
        env
    }

    fn require_confirmation(&self, key: &str, auto: ScaAuto) -> bool {
        self.store().sca.require(key, auto);
        true
    }
}

#[derive(Clone, Debug, Serialize)]
struct Request {
    id: String,
    /// Singular form, as Qonto's resources carry it.
    request_type: &'static str,
    status: &'static str,
    initiator_id: &'static str,
    approver_id: Option<&'static str>,
    note: &'static str,
    declined_note: Option<String>,
    debit_iban: Option<String>,
    amount: &'static str,
    currency: &'static str,
    processed_at: Option<String>,
    created_at: String,
    #[serde(skip)]
    keys: KeyLog,
}

/// A success cached for an idempotency key. Only the request id is kept: a
/// decided request never changes again, so re-rendering it replays the very
/// same bytes while costing far less memory over a long benchmark.
struct Cached {
    at: Instant,
    request_id: String,
}

#[derive(Default)]
struct Store {
    requests: HashMap<String, Request>,
    /// Creation order, so the list can answer newest first without sorting.
    order: Vec<String>,
    idempotency: HashMap<String, Cached>,
    sca: sca::Sca,
}

impl Targets for Store {
    fn target(&self, id: &str) -> Option<TargetInfo> {
        self.requests.get(id).map(|r| r.keys.info(r.status))
    }
}

impl Store {
    fn request(&mut self, id: &str, request_type: &'static str) -> &mut Request {
        if !self.requests.contains_key(id) {
            self.order.push(id.to_owned());
        }
        self.requests
            .entry(id.to_owned())
            .or_insert_with(|| Request {
                id: id.to_owned(),
                request_type,
                status: "pending",
                initiator_id: "sim-initiator",
                approver_id: None,
                note: "Simulated request",
                declined_note: None,
                debit_iban: None,
                amount: "100.00",
                currency: "EUR",
                processed_at: None,
                created_at: now_rfc3339(),
                keys: KeyLog::default(),
            })
    }

    fn cached(&mut self, key: &str, ttl: Duration) -> Option<Response> {
        let cached = self.idempotency.get(key)?;
        if cached.at.elapsed() >= ttl {
            self.idempotency.remove(key);
            return None;
        }
        self.requests.get(&cached.request_id).map(wrapped)
    }

    fn cache(&mut self, key: &str, request_id: &str, ttl: Duration) {
        // Prune lazily when the cache doubles, so long benchmark runs keep a
        // bounded cache without a background task.
        if self.idempotency.len() >= 4096 && self.idempotency.len().is_power_of_two() {
            self.idempotency.retain(|_, c| c.at.elapsed() < ttl);
        }
        let cached = Cached {
            at: Instant::now(),
            request_id: request_id.to_owned(),
        };
        self.idempotency.insert(key.to_owned(), cached);
    }
}

/// Qonto wraps the request in one key named after its type.
fn wrapped(request: &Request) -> Response {
    let key = format!("request_{}", request.request_type);
    json(StatusCode::OK, &BTreeMap::from([(key, request)]))
}

fn error(status: StatusCode, code: &str, detail: &str) -> Response {
    json(
        status,
        &json!({"errors": [{"code": code, "detail": detail}]}),
    )
}

fn error_at(status: StatusCode, code: &str, detail: &str, pointer: &str) -> Response {
    let body =
        json!({"errors": [{"code": code, "detail": detail, "source": {"pointer": pointer}}]});
    json(status, &body)
}

/// Whether the sandbox's staging token, when one is configured, came along.
fn staging_ok(sim: &Sim, headers: &HeaderMap) -> bool {
    sim.config
        .options
        .staging_token
        .as_deref()
        .is_none_or(|expected| header_str(headers, STAGING_HEADER) == Some(expected))
}

/// API key (`login:secret`) or OAuth bearer token: the static one or one the
/// OAuth server issued, unexpired and of a grant not revoked.
fn authorize(sim: &Sim, headers: &HeaderMap) -> Result<(), Response> {
    // UNCONFIRMED: the real sandbox may answer 302 to its portal instead.
    if !staging_ok(sim, headers) {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "X-Qonto-Staging-Token is missing or wrong",
        ));
    }
    let Some(value) = header_str(headers, header::AUTHORIZATION.as_str()) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "authorization_header_missing",
            "Authorization header is missing",
        ));
    };
    let c = &sim.config.options;
    let api_key_ok = value.split_once(':') == Some((&c.login, &c.secret_key));
    let bearer = value.strip_prefix("Bearer ");
    let bearer_ok =
        bearer.is_some_and(|token| token == c.access_token || sim.config.oauth.access_valid(token));
    if api_key_ok || bearer_ok {
        Ok(())
    } else {
        if bearer.is_some() {
            sim.counters.bump_extra("oauth.api_401s");
        }
        Err(error(
            StatusCode::UNAUTHORIZED,
            "authorization_token_invalid",
            "Authorization token is invalid",
        ))
    }
}

fn singular(plural: &str) -> Option<&'static str> {
    match plural {
        "transfers" => Some("transfer"),
        "multi_transfers" => Some("multi_transfer"),
        "flash_cards" => Some("flash_card"),
        "virtual_cards" => Some("virtual_card"),
        _ => None,
    }
}

enum Action {
    Decline { note: String },
    Approve { debit_iban: Option<String> },
}

/// Validates the body; kept apart from the state change so it can run before
/// the lock while the replay check still wins over a changed body.
fn parse_action(action: &str, body: &[u8]) -> Option<Result<Action, Response>> {
    let parsed: Option<Value> = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        match serde_json::from_slice(body) {
            Ok(value) => Some(value),
            Err(_) => {
                return Some(Err(error(
                    StatusCode::BAD_REQUEST,
                    "invalid_json",
                    "Request body is not valid JSON",
                )));
            }
        }
    };
    let field = |name: &str| parsed.as_ref().and_then(|v| v.get(name));
    Some(match action {
        "decline" => match field("declined_note").and_then(Value::as_str) {
            Some(note) => Ok(Action::Decline {
                note: note.to_owned(),
            }),
            None => Err(error_at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "declined_note is required",
                "/declined_note",
            )),
        },
        "approve" => match field("debit_iban") {
            None | Some(Value::Null) => Ok(Action::Approve { debit_iban: None }),
            Some(Value::String(iban)) => Ok(Action::Approve {
                debit_iban: Some(iban.clone()),
            }),
            Some(_) => Err(error_at(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid",
                "debit_iban must be a string",
                "/debit_iban",
            )),
        },
        _ => return None,
    })
}

async fn decide(
    State(sim): State<Arc<Sim>>,
    Path((plural, id, action)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: Bytes,
) -> Reply {
    let not_found = || error(StatusCode::NOT_FOUND, "not_found", "Not found");
    let (Some(request_type), Some(parsed)) = (singular(&plural), parse_action(&action, &body))
    else {
        return Err(not_found());
    };
    authorize(&sim, &headers)?;
    let Some(key) = header_str(&headers, IDEMPOTENCY_HEADER).filter(|k| !k.is_empty()) else {
        return Err(error_at(
            StatusCode::BAD_REQUEST,
            "missing_idempotency_key",
            "X-Qonto-Idempotency-Key header is required",
            "/headers/X-Qonto-Idempotency-Key",
        ));
    };
    let ttl = sim.config.options.idempotency_ttl;
    let counters = &sim.counters;

    let mut store = sim.store();
    // A cached success is replayed whatever the body or path says, like Qonto.
    if let Some(replay) = store.cached(key, ttl) {
        return Err(replay);
    }
    let action = parsed?;
    let sca_rule = store
        .sca
        .rule(&id, sim.config.options.sca_for_all_approvals);
    let request = store.request(&id, request_type);
    if request.request_type != request_type {
        return Err(not_found());
    }
    let pending = request.status == "pending";
    if !request.keys.admit(Some(key), pending, counters) {
        return Err(error_at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "request_not_pending",
            "Request is not pending",
            "/status",
        ));
    }
    if let (Action::Approve { .. }, Some(auto)) = (&action, sca_rule)
        && let Err(refusal) = store.sca.check(&id, auto, header_str(&headers, SCA_HEADER))
    {
        return Err(sca_refused(refusal));
    }

    let request = store.request(&id, request_type);
    let now = now_rfc3339();
    match action {
        Action::Decline { note } => {
            request.status = "declined";
            request.declined_note = Some(note);
        }
        Action::Approve { debit_iban } => {
            request.status = "approved";
            if debit_iban.is_some() {
                request.debit_iban = debit_iban;
            }
        }
    }
    request.approver_id = Some("sim-approver");
    request.processed_at = Some(now);
    Counters::bump(&counters.state_changes);

    let response = wrapped(request);
    store.cache(key, &id, ttl);
    Ok(applied(response))
}

/// The 428 that opened a session, or the 412 for a token that is not (or no
/// longer) allowed.
fn sca_refused(refusal: sca::Refusal) -> Response {
    match refusal {
        sca::Refusal::Required { token } => {
            let expires_at = rfc3339(time::OffsetDateTime::now_utc() + sca::LIFETIME);
            let body = json!({
                "errors": [{"code": "sca_required", "detail": "SCA required"}],
                "sca_session_token": token,
                "sca_session_expires_at": expires_at,
            });
            json(StatusCode::PRECONDITION_REQUIRED, &body)
        }
        // UNCONFIRMED: Qonto documents only the 412 status; the code is ours.
        sca::Refusal::NotAllowed(result) => error(
            StatusCode::PRECONDITION_FAILED,
            "sca_session_invalid",
            &format!("SCA session is not allowed (result: {result})"),
        ),
    }
}

async fn sca_session(
    State(sim): State<Arc<Sim>>,
    Path(token): Path<String>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let result = sim
        .store()
        .sca
        .result(&token)
        .ok_or_else(session_not_found)?;
    Ok(json(
        StatusCode::OK,
        &json!({"result": result, "canceled_at": null}),
    ))
}

/// Qonto sandbox's "simulate user decision" endpoint.
async fn mock_sca(
    State(sim): State<Arc<Sim>>,
    Path((token, result)): Path<(String, String)>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let result = match result.as_str() {
        "allow" => "allow",
        "deny" => "deny",
        _ => return Err(error(StatusCode::NOT_FOUND, "not_found", "Not found")),
    };
    if !sim.store().sca.decide(&token, result) {
        return Err(session_not_found());
    }
    Ok(json(
        StatusCode::OK,
        &json!({"result": result, "canceled_at": null}),
    ))
}

fn session_not_found() -> Response {
    error(StatusCode::NOT_FOUND, "not_found", "SCA session not found")
}

#[derive(Deserialize)]
struct Paging {
    page: Option<usize>,
    per_page: Option<usize>,
}

/// A `sort_by` value: `created_at`, `processed_at` or `status`, then `:asc`
/// or `:desc`.
#[derive(Clone, Copy)]
enum SortKey {
    Created,
    Processed,
    Status,
}

fn sort_by(value: &str) -> Option<(SortKey, bool)> {
    let (key, order) = value.split_once(':')?;
    let key = match key {
        "created_at" => SortKey::Created,
        "processed_at" => SortKey::Processed,
        "status" => SortKey::Status,
        _ => return None,
    };
    let descending = match order {
        "asc" => false,
        "desc" => true,
        _ => return None,
    };
    Some((key, descending))
}

/// Qonto's documented order for `sort_by=status:asc`.
fn status_rank(status: &str) -> u8 {
    match status {
        "pending" => 0,
        "approved" => 1,
        "declined" => 2,
        _ => 3,
    }
}

fn parse_time(value: &str) -> Option<time::OffsetDateTime> {
    time::OffsetDateTime::parse(value, &time::format_description::well_known::Rfc3339).ok()
}

fn invalid_parameter(name: &str, detail: &str) -> Response {
    error_at(
        StatusCode::UNPROCESSABLE_ENTITY,
        "invalid_parameter",
        detail,
        &format!("/{name}"),
    )
}

/// A `created_at`/`processed_at` bound pair from the query; a time that is
/// not ISO 8601 is refused, as Qonto checks its parameters.
struct Window {
    from: Option<time::OffsetDateTime>,
    to: Option<time::OffsetDateTime>,
}

impl Window {
    fn read(pairs: &[(String, String)], field: &str) -> Result<Self, Response> {
        let bound = |suffix: &str| -> Result<Option<time::OffsetDateTime>, Response> {
            let name = format!("{field}_{suffix}");
            match pairs.iter().rev().find(|(k, _)| *k == name) {
                None => Ok(None),
                Some((_, v)) => parse_time(v).map(Some).ok_or_else(|| {
                    invalid_parameter(&name, &format!("{name} must be an ISO 8601 date time"))
                }),
            }
        };
        Ok(Self {
            from: bound("from")?,
            to: bound("to")?,
        })
    }

    fn is_open(&self) -> bool {
        self.from.is_none() && self.to.is_none()
    }

    /// Whether `at` is within the bounds; a missing time is within no
    /// bounded window (a pending request was never processed).
    fn holds(&self, at: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let Some(at) = at.and_then(parse_time) else {
            return false;
        };
        self.from.is_none_or(|from| at >= from) && self.to.is_none_or(|to| at <= to)
    }
}

/// `GET /v2/requests?status[]=..&request_type[]=..&created_at_from=..&
/// created_at_to=..&processed_at_from=..&processed_at_to=..&sort_by=..&page=&per_page=`,
/// newest first unless sorted. The filters repeat their key, so they are
/// read as pairs.
async fn list(
    State(sim): State<Arc<Sim>>,
    paging: Result<Query<Paging>, QueryRejection>,
    Query(pairs): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Reply {
    authorize(&sim, &headers)?;
    let values = |name: &str| -> Vec<&str> {
        let bracketed = format!("{name}[]");
        pairs
            .iter()
            .filter(|(k, _)| *k == bracketed || k == name)
            .map(|(_, v)| v.as_str())
            .collect()
    };
    let statuses = values("status");
    let types = values("request_type");
    let created = Window::read(&pairs, "created_at")?;
    let processed = Window::read(&pairs, "processed_at")?;
    let sort = match values("sort_by").last() {
        None => None,
        Some(value) => Some(sort_by(value).ok_or_else(|| {
            invalid_parameter(
                "sort_by",
                "sort_by must be processed_at, created_at or status, then :asc or :desc",
            )
        })?),
    };
    let Ok(Query(paging)) = paging else {
        return Err(error_at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
            "page and per_page must be non-negative integers",
            "/page",
        ));
    };
    let page = paging.page.unwrap_or(1).max(1);
    let per_page = paging.per_page.unwrap_or(MAX_PER_PAGE);
    if per_page == 0 || per_page > MAX_PER_PAGE {
        return Err(error_at(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_parameter",
            "per_page must be between 1 and 100",
            "/per_page",
        ));
    }

    let store = sim.store();
    // Oldest first: the creation order.
    let mut matching: Vec<&Request> = store
        .order
        .iter()
        .filter_map(|id| store.requests.get(id))
        .filter(|r| statuses.is_empty() || statuses.contains(&r.status))
        .filter(|r| types.is_empty() || types.contains(&r.request_type))
        .filter(|r| created.holds(Some(&r.created_at)))
        .filter(|r| processed.holds(r.processed_at.as_deref()))
        .collect();
    match sort {
        None | Some((SortKey::Created, true)) => matching.reverse(),
        Some((SortKey::Created, false)) => {}
        // Stable sorts: ties keep the creation order. Requests never
        // processed come last either way.
        Some((SortKey::Processed, descending)) => {
            matching.sort_by_cached_key(|r| {
                let at = r.processed_at.as_deref().and_then(parse_time);
                let at = at.map(|t| {
                    if descending {
                        -t.unix_timestamp_nanos()
                    } else {
                        t.unix_timestamp_nanos()
                    }
                });
                (at.is_none(), at)
            });
        }
        Some((SortKey::Status, descending)) => {
            matching.sort_by_key(|r| {
                let rank = status_rank(r.status);
                if descending { u8::MAX - rank } else { rank }
            });
        }
    }
    let total_count = matching.len();
    let total_pages = total_count.div_ceil(per_page);
    let requests: Vec<&Request> = matching
        .into_iter()
        .skip((page - 1).saturating_mul(per_page))
        .take(per_page)
        .collect();
    let body = json!({
        "requests": requests,
        "meta": {
            "current_page": page,
            "next_page": (page < total_pages).then_some(page + 1),
            "prev_page": (page > 1).then_some(page - 1),
            "total_pages": total_pages,
            "total_count": total_count,
            "per_page": per_page,
        }
    });
    Ok(json(StatusCode::OK, &body))
}
