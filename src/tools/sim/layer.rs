//! Outages, quotas, the latency law and fault injection, applied by one
//! middleware in front of each provider's routes so the provider folders
//! stay about provider behaviour. In that order: an outage answers before
//! the quota counts the call, a refused call changes nothing, and only a
//! call admitted by both is in flight (and slows the others down).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::Response;
use rand::Rng as _;

use super::conn::ConnKill;
use super::faults::Faults;
use super::kit::Applied;
use super::outage::{Outage, OutageMode};
use super::state::Sim;
use super::stats::Counters;
use super::unit::{CallKind, SimUnit};

fn roll(ratio: f64) -> bool {
    ratio > 0.0 && (ratio >= 1.0 || rand::thread_rng().gen_bool(ratio))
}

#[derive(Clone)]
struct Ctx {
    sim: Arc<Sim>,
    /// The unit's place in the simulator.
    index: usize,
}

/// Puts the counting and fault middleware in front of a provider's routes.
pub(crate) fn wrap(routes: Router, sim: &Arc<Sim>, index: usize) -> Router {
    let ctx = Ctx {
        sim: sim.clone(),
        index,
    };
    routes.layer(middleware::from_fn_with_state(ctx, inject))
}

async fn inject(
    State(ctx): State<Ctx>,
    ConnectInfo(conn): ConnectInfo<ConnKill>,
    request: Request,
    next: Next,
) -> Response {
    let unit = ctx.sim.unit(ctx.index);
    let counters = unit.counters();
    Counters::bump(&counters.calls);
    if request.version() == axum::http::Version::HTTP_2 {
        Counters::bump(&counters.http2_calls);
    }
    let kind = unit.call_kind(request.method(), request.uri().path());
    if kind == CallKind::Decision {
        Counters::bump(&counters.state_changing_calls);
    }
    // Reads and decisions: what quotas count and outages and faults hit.
    let provider_call = matches!(kind, CallKind::Read | CallKind::Decision);

    let outage = ctx
        .sim
        .outage(ctx.index)
        .filter(|o| provider_call || (kind == CallKind::Auth && o.include_auth));
    if let Some(outage) = outage {
        Counters::bump(&counters.outage_calls);
        return match out(&ctx, unit, outage, &conn).await {
            Outcome::Answer(response) => {
                counters.record_status(response.status().as_u16());
                response
            }
            Outcome::Dropped => dropped(counters),
        };
    }
    if provider_call && let Err(refusal) = ctx.sim.arrive(ctx.index) {
        Counters::bump(&counters.throttled);
        let response = unit.quota_exceeded(&refusal);
        counters.record_status(response.status().as_u16());
        return response;
    }
    // In flight from here until the answer leaves, latency included.
    let (others, _in_flight) = if provider_call {
        let (others, guard) = counters.enter();
        (others, Some(guard))
    } else {
        (0, None)
    };

    let faults = ctx.sim.faults(ctx.index);
    let faulted = match kind {
        CallKind::Auth => faults.include_auth,
        CallKind::Helper => false,
        CallKind::Read | CallKind::Decision => true,
    };

    let scripted = (kind == CallKind::Decision)
        .then(|| ctx.sim.scripted_failure(ctx.index, request.uri().path()))
        .flatten();
    let response = if let Some(status) = scripted {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        unit.error(
            status,
            unit.fault_code(is_rate_limit(status)),
            "Scripted failure (simulated)",
        )
    } else if faulted {
        match before(&ctx, unit, &faults, &conn, others).await {
            Some(Outcome::Answer(response)) => response,
            Some(Outcome::Dropped) => return dropped(counters),
            None => {
                let response = next.run(request).await;
                if response.extensions().get::<Applied>().is_some()
                    && roll(faults.apply_then_fail_ratio)
                {
                    if rand::thread_rng().gen_bool(0.5) {
                        conn.kill();
                        return dropped(counters);
                    }
                    unavailable(unit)
                } else {
                    response
                }
            }
        }
    } else {
        next.run(request).await
    };
    counters.record_status(response.status().as_u16());
    response
}

enum Outcome {
    Answer(Response),
    Dropped,
}

/// A call during an outage: nothing reaches the provider's handler.
async fn out(ctx: &Ctx, unit: &dyn SimUnit, outage: Outage, conn: &ConnKill) -> Outcome {
    match outage.mode {
        OutageMode::Down => {}
        OutageMode::Unavailable => return Outcome::Answer(unavailable(unit)),
        OutageMode::Blackhole => hold(ctx, outage).await,
    }
    conn.kill();
    Outcome::Dropped
}

/// Holds a call in a black hole until the hole closes (cleared, replaced,
/// or its time is up), its hold passes, or the simulator stops.
async fn hold(ctx: &Ctx, outage: Outage) {
    let mut changes = ctx.sim.outage_changes(ctx.index);
    let held = tokio::time::sleep(outage.hold);
    tokio::pin!(held);
    let mut until = outage.until;
    loop {
        let ends = async {
            match until {
                Some(at) => tokio::time::sleep_until(at).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = &mut held => return,
            _ = ctx.sim.shutdown.cancelled() => return,
            _ = ends => return,
            changed = changes.changed() => {
                if changed.is_err() {
                    return;
                }
                match ctx.sim.outage(ctx.index) {
                    Some(now) if now.mode == OutageMode::Blackhole => until = now.until,
                    _ => return,
                }
            }
        }
    }
}

/// Faults decided before the handler runs, so none of them changes state.
/// `others`: calls already in flight at the provider, for the latency law.
async fn before(
    ctx: &Ctx,
    unit: &dyn SimUnit,
    faults: &Faults,
    conn: &ConnKill,
    others: u64,
) -> Option<Outcome> {
    let delay = faults.delay(others, roll(faults.tail_ratio));
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    if faults.down {
        return Some(Outcome::Answer(unavailable(unit)));
    }
    if roll(faults.timeout_ratio) {
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(faults.timeout_hold_ms)) => {}
            _ = ctx.sim.shutdown.cancelled() => {}
        }
        conn.kill();
        return Some(Outcome::Dropped);
    }
    if roll(faults.reset_ratio) {
        conn.kill();
        return Some(Outcome::Dropped);
    }
    if roll(faults.rate_limit_ratio) {
        return Some(Outcome::Answer(unit.rate_limited(faults.retry_after_secs)));
    }
    if roll(faults.error_rate) {
        let status =
            StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let reason = status.canonical_reason().unwrap_or("Simulated error");
        return Some(Outcome::Answer(unit.error(
            status,
            unit.fault_code(is_rate_limit(status)),
            &format!("{reason} (simulated)"),
        )));
    }
    None
}

/// The answer body is never sent: the connection is killed before hyper
/// writes it.
fn dropped(counters: &Counters) -> Response {
    Counters::bump(&counters.dropped_connections);
    Response::default()
}

fn unavailable(unit: &dyn SimUnit) -> Response {
    unit.error(
        StatusCode::SERVICE_UNAVAILABLE,
        unit.fault_code(false),
        "Service Unavailable (simulated)",
    )
}

/// 420 is Enhance Your Calm, a rate limit some providers answer instead of 429.
fn is_rate_limit(status: StatusCode) -> bool {
    status == StatusCode::TOO_MANY_REQUESTS || status.as_u16() == 420
}
