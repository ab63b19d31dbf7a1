//! Fault injection, applied by one middleware in front of each provider's
//! routes so the provider modules stay about provider behaviour.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::Response;
use rand::Rng as _;
use serde::{Deserialize, Serialize};

use super::Provider;
use super::conn::ConnKill;
use super::state::{Applied, Sim};
use super::stats::Counters;

/// Faults for one provider. Ratios are probabilities in `0.0..=1.0`, rolled
/// independently per call. They hit provider calls (decisions and reads), not
/// `/_sim/*`, and not token endpoints unless `include_auth` is set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every call.
    pub latency_ms: u64,
    /// Extra latency for a `tail_ratio` fraction of calls.
    pub tail_latency_ms: u64,
    pub tail_ratio: f64,
    /// Answer `error_status` before touching any state.
    pub error_rate: f64,
    pub error_status: u16,
    /// Answer 429 with `Retry-After` (Ledger v1: 420 plus `X-RateLimit-Reset`).
    pub rate_limit_ratio: f64,
    pub retry_after_secs: u64,
    /// Hold the call for `timeout_hold_ms` without answering, then drop the
    /// connection; state is not changed.
    pub timeout_ratio: f64,
    pub timeout_hold_ms: u64,
    /// Drop the connection without answering; state is not changed.
    pub reset_ratio: f64,
    /// Every provider call answers 503.
    pub down: bool,
    /// Apply the state change, then answer 503 or drop the connection (half
    /// each): the ambiguous outcome a worker must reconcile.
    pub apply_then_fail_ratio: f64,
    /// Also fault the token endpoints (Ledger v2 auth, FlexPay auth).
    pub include_auth: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            tail_latency_ms: 0,
            tail_ratio: 0.0,
            error_rate: 0.0,
            error_status: 503,
            rate_limit_ratio: 0.0,
            retry_after_secs: 1,
            timeout_ratio: 0.0,
            timeout_hold_ms: 60_000,
            reset_ratio: 0.0,
            down: false,
            apply_then_fail_ratio: 0.0,
            include_auth: false,
        }
    }
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        let ratios = [
            ("tail_ratio", self.tail_ratio),
            ("error_rate", self.error_rate),
            ("rate_limit_ratio", self.rate_limit_ratio),
            ("timeout_ratio", self.timeout_ratio),
            ("reset_ratio", self.reset_ratio),
            ("apply_then_fail_ratio", self.apply_then_fail_ratio),
        ];
        for (name, ratio) in ratios {
            if !(0.0..=1.0).contains(&ratio) {
                return Err(format!("{name} must be within 0.0..=1.0"));
            }
        }
        if !(400..=599).contains(&self.error_status) {
            return Err("error_status must be a 4xx or 5xx status".into());
        }
        Ok(())
    }
}

fn roll(ratio: f64) -> bool {
    ratio > 0.0 && (ratio >= 1.0 || rand::thread_rng().gen_bool(ratio))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum CallKind {
    /// Token exchange: faulted only with `include_auth`.
    Auth,
    /// Qonto's sandbox SCA mock: a test helper, never faulted.
    Helper,
    Read,
    Decision,
}

fn classify(method: &Method, path: &str) -> CallKind {
    if path.contains("/auth/token") {
        CallKind::Auth
    } else if path.contains("/mocked_sca_sessions/") {
        CallKind::Helper
    } else if method == Method::POST || method == Method::PUT {
        CallKind::Decision
    } else {
        CallKind::Read
    }
}

#[derive(Clone)]
struct Ctx {
    sim: Arc<Sim>,
    provider: Provider,
}

/// Puts the counting and fault middleware in front of a provider's routes.
pub(crate) fn wrap(
    routes: Router<Arc<Sim>>,
    sim: &Arc<Sim>,
    provider: Provider,
) -> Router<Arc<Sim>> {
    let ctx = Ctx {
        sim: sim.clone(),
        provider,
    };
    routes.layer(middleware::from_fn_with_state(ctx, inject))
}

async fn inject(
    State(ctx): State<Ctx>,
    ConnectInfo(conn): ConnectInfo<ConnKill>,
    request: Request,
    next: Next,
) -> Response {
    let counters = ctx.sim.counters(ctx.provider);
    Counters::bump(&counters.calls);
    if request.version() == axum::http::Version::HTTP_2 {
        Counters::bump(&counters.http2_calls);
    }
    let kind = classify(request.method(), request.uri().path());
    if kind == CallKind::Decision {
        Counters::bump(&counters.state_changing_calls);
    }
    let faults = ctx.sim.faults(ctx.provider);
    let faulted = match kind {
        CallKind::Auth => faults.include_auth,
        CallKind::Helper => false,
        CallKind::Read | CallKind::Decision => true,
    };

    let scripted = (kind == CallKind::Decision)
        .then(|| ctx.sim.scripted_failure(ctx.provider, request.uri().path()))
        .flatten();
    let response = if let Some(status) = scripted {
        let status = StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        ctx.provider.error(
            status,
            fault_code(ctx.provider, status),
            "Scripted failure (simulated)",
        )
    } else if faulted {
        match before(&ctx, &faults, &conn).await {
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
                    unavailable(ctx.provider)
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

/// Faults decided before the handler runs, so none of them changes state.
async fn before(ctx: &Ctx, faults: &Faults, conn: &ConnKill) -> Option<Outcome> {
    let mut delay = faults.latency_ms;
    if roll(faults.tail_ratio) {
        delay += faults.tail_latency_ms;
    }
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if faults.down {
        return Some(Outcome::Answer(unavailable(ctx.provider)));
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
        return Some(Outcome::Answer(rate_limited(
            ctx.provider,
            faults.retry_after_secs,
        )));
    }
    if roll(faults.error_rate) {
        let status =
            StatusCode::from_u16(faults.error_status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
        let reason = status.canonical_reason().unwrap_or("Simulated error");
        return Some(Outcome::Answer(ctx.provider.error(
            status,
            fault_code(ctx.provider, status),
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

fn unavailable(provider: Provider) -> Response {
    let status = StatusCode::SERVICE_UNAVAILABLE;
    provider.error(
        status,
        fault_code(provider, status),
        "Service Unavailable (simulated)",
    )
}

fn fault_code(provider: Provider, status: StatusCode) -> &'static str {
    let rate_limited = status == StatusCode::TOO_MANY_REQUESTS || status.as_u16() == 420;
    match (provider, rate_limited) {
        (Provider::Qonto, true) => "too_many_requests",
        (Provider::Qonto, false) => "service_unavailable",
        (Provider::LedgerV1, true) => "RateLimitExceeded",
        (Provider::LedgerV1, false) => "ServiceUnavailable",
        (Provider::MoneyPipe, _) => "0",
        (_, true) => "RATE_LIMITED",
        (_, false) => "SERVICE_UNAVAILABLE",
    }
}

fn rate_limited(provider: Provider, retry_after_secs: u64) -> Response {
    // Ledger v1 documents 420 (not 429) with X-RateLimit-* headers.
    let status = if provider == Provider::LedgerV1 {
        StatusCode::from_u16(420).unwrap_or(StatusCode::TOO_MANY_REQUESTS)
    } else {
        StatusCode::TOO_MANY_REQUESTS
    };
    let mut response = provider.error(
        status,
        fault_code(provider, status),
        "Too Many Requests (simulated)",
    );
    let headers = response.headers_mut();
    headers.insert("retry-after", HeaderValue::from(retry_after_secs));
    if provider == Provider::LedgerV1 {
        // UNCONFIRMED unit: we send the reset time as Unix epoch seconds.
        let reset = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() + retry_after_secs)
            .unwrap_or_default();
        headers.insert("x-ratelimit-reset", HeaderValue::from(reset));
        headers.insert("x-ratelimit-limit", HeaderValue::from(100u32));
        headers.insert("x-ratelimit-remaining", HeaderValue::from(0u32));
    }
    response
}
