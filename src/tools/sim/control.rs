//! `/_sim/*`: control and inspection endpoints for tests, demos and the
//! benchmark when the sim runs in another process. Never faulted or counted.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::faults::Faults;
use super::kit::{ScaAuto, json};
use super::state::Sim;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .route("/faults/{provider}", get(get_faults).put(put_faults))
        .route("/targets/{provider}/{key}", get(target))
        .route("/{provider}/sca", post(require_sca))
}

fn problem(status: StatusCode, message: impl Into<String>) -> Response {
    json(status, &json!({"error": message.into()}))
}

fn provider(sim: &Sim, name: &str) -> Result<usize, Response> {
    sim.index(name)
        .ok_or_else(|| problem(StatusCode::NOT_FOUND, format!("unknown provider {name:?}")))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    json(StatusCode::OK, &sim.stats())
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_faults(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Response {
    match provider(&sim, &name) {
        Ok(p) => json(StatusCode::OK, &sim.faults(p)),
        Err(response) => response,
    }
}

/// Replaces the provider's faults; omitted fields take their defaults, so
/// `{}` clears every fault.
async fn put_faults(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let p = match provider(&sim, &name) {
        Ok(p) => p,
        Err(response) => return response,
    };
    let faults: Faults = match serde_json::from_slice(&body) {
        Ok(faults) => faults,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    if let Err(e) = faults.validate() {
        return problem(StatusCode::BAD_REQUEST, e);
    }
    sim.set_faults(p, faults);
    json(StatusCode::OK, &faults)
}

async fn target(
    State(sim): State<Arc<Sim>>,
    Path((name, key)): Path<(String, String)>,
) -> Response {
    let p = match provider(&sim, &name) {
        Ok(p) => p,
        Err(response) => return response,
    };
    match sim.target(p, &key) {
        Some(info) => json(
            StatusCode::OK,
            &json!({"provider": sim.slots()[p].name, "key": key, "state": info.state, "keys": info.keys}),
        ),
        None => problem(StatusCode::NOT_FOUND, "target never seen"),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ScaRequest {
    request_id: String,
    auto: String,
    #[serde(default)]
    after_ms: u64,
}

/// Makes approving a target wait for a human confirmation (for providers
/// that have such a step) resolved by the given rule.
async fn require_sca(
    State(sim): State<Arc<Sim>>,
    Path(name): Path<String>,
    body: Bytes,
) -> Response {
    let p = match provider(&sim, &name) {
        Ok(p) => p,
        Err(response) => return response,
    };
    let request: ScaRequest = match serde_json::from_slice(&body) {
        Ok(request) => request,
        Err(e) => return problem(StatusCode::BAD_REQUEST, e.to_string()),
    };
    let after = Duration::from_millis(request.after_ms);
    let auto = match request.auto.as_str() {
        "allow" => ScaAuto::Allow { after },
        "deny" => ScaAuto::Deny { after },
        "manual" => ScaAuto::Manual,
        other => {
            return problem(
                StatusCode::BAD_REQUEST,
                format!("auto must be allow, deny or manual, not {other:?}"),
            );
        }
    };
    if sim.unit(p).require_confirmation(&request.request_id, auto) {
        StatusCode::NO_CONTENT.into_response()
    } else {
        problem(
            StatusCode::NOT_FOUND,
            format!("{name} has no confirmation step"),
        )
    }
}
