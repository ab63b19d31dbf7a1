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

use tokio::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::json;

use super::faults::Faults;
use super::kit::{Reply, ScaAuto, json};
use super::outage::{OutageRequest, OutageView};
use super::quota::Quota;
use super::state::Sim;

pub(crate) fn routes() -> Router<Arc<Sim>> {
    Router::new()
        .route("/stats", get(stats))
        .route("/reset", post(reset))
        .route("/faults/{provider}", get(get_faults).put(put_faults))
        .route("/quota/{provider}", get(get_quota).put(put_quota))
        .route(
            "/outage/{provider}",
            get(get_outage).put(put_outage).delete(delete_outage),
        )
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

fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, Response> {
    serde_json::from_slice(body).map_err(|e| problem(StatusCode::BAD_REQUEST, e.to_string()))
}

async fn stats(State(sim): State<Arc<Sim>>) -> Response {
    json(StatusCode::OK, &sim.stats())
}

async fn reset(State(sim): State<Arc<Sim>>) -> Response {
    sim.reset();
    StatusCode::NO_CONTENT.into_response()
}

async fn get_faults(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Reply {
    let p = provider(&sim, &name)?;
    Ok(json(StatusCode::OK, &sim.faults(p)))
}

/// Replaces the provider's faults; omitted fields take their defaults, so
/// `{}` clears every fault.
async fn put_faults(State(sim): State<Arc<Sim>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p = provider(&sim, &name)?;
    let faults: Faults = parse(&body)?;
    faults
        .validate()
        .map_err(|e| problem(StatusCode::BAD_REQUEST, e))?;
    sim.set_faults(p, faults);
    Ok(json(StatusCode::OK, &faults))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaRequest {
    #[serde(default)]
    windows: Quota,
}

async fn get_quota(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Reply {
    let p = provider(&sim, &name)?;
    let (quota, used) = sim.quota(p);
    Ok(json(
        StatusCode::OK,
        &json!({"windows": quota, "used": used}),
    ))
}

/// Replaces the provider's quota: `{"windows": "1000/10s,10000/10m"}`;
/// `{"windows": "off"}` or `{}` removes it. Its windows start empty.
async fn put_quota(State(sim): State<Arc<Sim>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p = provider(&sim, &name)?;
    let request: QuotaRequest = parse(&body)?;
    sim.set_quota(p, request.windows.clone());
    Ok(json(StatusCode::OK, &json!({"windows": request.windows})))
}

/// `{"mode", "remaining_ms", "include_auth", "hold_ms"}`, or `null` when
/// the provider is up.
async fn get_outage(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Reply {
    let p = provider(&sim, &name)?;
    let view = sim
        .outage(p)
        .map(|outage| OutageView::of(&outage, Instant::now()));
    Ok(json(StatusCode::OK, &view))
}

async fn put_outage(State(sim): State<Arc<Sim>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p = provider(&sim, &name)?;
    let request: OutageRequest = parse(&body)?;
    let outage = request
        .into_outage()
        .map_err(|e| problem(StatusCode::BAD_REQUEST, e))?;
    sim.set_outage(p, Some(outage));
    Ok(json(
        StatusCode::OK,
        &OutageView::of(&outage, Instant::now()),
    ))
}

async fn delete_outage(State(sim): State<Arc<Sim>>, Path(name): Path<String>) -> Reply {
    let p = provider(&sim, &name)?;
    sim.set_outage(p, None);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn target(State(sim): State<Arc<Sim>>, Path((name, key)): Path<(String, String)>) -> Reply {
    let p = provider(&sim, &name)?;
    let info = sim
        .target(p, &key)
        .ok_or_else(|| problem(StatusCode::NOT_FOUND, "target never seen"))?;
    Ok(json(
        StatusCode::OK,
        &json!({"provider": sim.slots()[p].name, "key": key, "state": info.state, "keys": info.keys}),
    ))
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
async fn require_sca(State(sim): State<Arc<Sim>>, Path(name): Path<String>, body: Bytes) -> Reply {
    let p = provider(&sim, &name)?;
    let request: ScaRequest = parse(&body)?;
    let after = Duration::from_millis(request.after_ms);
    let auto = match request.auto.as_str() {
        "allow" => ScaAuto::Allow { after },
        "deny" => ScaAuto::Deny { after },
        "manual" => ScaAuto::Manual,
        other => {
            return Err(problem(
                StatusCode::BAD_REQUEST,
                format!("auto must be allow, deny or manual, not {other:?}"),
            ));
        }
    };
    if sim.unit(p).require_confirmation(&request.request_id, auto) {
        Ok(StatusCode::NO_CONTENT.into_response())
    } else {
        Err(problem(
            StatusCode::NOT_FOUND,
            format!("{name} has no confirmation step"),
        ))
    }
}
