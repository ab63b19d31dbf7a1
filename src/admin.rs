//! The admin endpoint: `/healthz` (alive), `/readyz` (connected, topology
//! declared, consuming, not draining), `/metrics` (Prometheus text,
//! rendered by metrics-exporter-prometheus) and `/status` (JSON for people:
//! the broker node in use, or why there is none, and each provider's
//! isolation state).

use std::sync::{Arc, OnceLock};

use axum::{Router, extract::State, http::StatusCode, routing::get};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::{isolation::Isolation, readiness::Readiness};

/// Seconds; provider calls range from a few ms (local) to the 10 s timeout.
const CALL_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// Seconds a call waited for a rate-limit slot: from a few ms to the
/// limiter's longest wait (5 s by default).
const LIMITER_WAIT_BUCKETS: &[f64] = &[0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide metrics recorder (once) and returns its handle.
pub fn metrics_handle() -> PrometheusHandle {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Full("approval_provider_call_duration_seconds".into()),
                    CALL_BUCKETS,
                )
                .expect("static buckets are valid")
                .set_buckets_for_metric(
                    Matcher::Full("approval_provider_limiter_wait_seconds".into()),
                    LIMITER_WAIT_BUCKETS,
                )
                .expect("static buckets are valid")
                .build_recorder();
            let handle = recorder.handle();
            // Another recorder (a test harness) may already be installed;
            // the handle then simply renders nothing of ours.
            let _ = metrics::set_global_recorder(recorder);
            describe();
            handle
        })
        .clone()
}

fn describe() {
    metrics::describe_counter!(
        "approval_decisions_total",
        "Decisions settled, by provider, action and outcome status"
    );
    metrics::describe_histogram!(
        "approval_provider_call_duration_seconds",
        metrics::Unit::Seconds,
        "Provider HTTP calls, by provider, operation and HTTP status class"
    );
    metrics::describe_counter!(
        "approval_retries_scheduled_total",
        "Retries scheduled, in process or through a retry queue"
    );
    metrics::describe_counter!(
        "approval_parked_total",
        "Decisions parked in P.dead, by error kind"
    );
    metrics::describe_gauge!("approval_in_flight", "Decisions being handled now");
    metrics::describe_counter!(
        "approval_token_refreshes_total",
        "Provider access tokens fetched"
    );
    metrics::describe_counter!(
        "approval_broker_reconnects_total",
        "Broker sessions lost and retried"
    );
    metrics::describe_gauge!(
        "approval_ready",
        "1 when connected, consuming and not draining"
    );
    metrics::describe_counter!(
        "approval_deferrals_total",
        "Decisions moved to a retry queue without a call, by provider and reason"
    );
    metrics::describe_gauge!(
        "approval_provider_breaker_state",
        "Circuit breaker per provider: 0 closed, 1 half-open, 2 open"
    );
    metrics::describe_counter!(
        "approval_provider_breaker_transitions_total",
        "Circuit breaker transitions, by provider and the state entered"
    );
    metrics::describe_gauge!(
        "approval_provider_concurrency_limit",
        "Calls a provider may have in flight now (adaptive)"
    );
    metrics::describe_gauge!(
        "approval_provider_in_flight",
        "Calls in flight to a provider"
    );
    metrics::describe_gauge!(
        "approval_provider_paused",
        "1 while a provider's Retry-After pause holds every call to it"
    );
    metrics::describe_counter!(
        "approval_provider_limiter_waits_total",
        "Calls that waited for a rate-limit slot"
    );
    metrics::describe_histogram!(
        "approval_provider_limiter_wait_seconds",
        metrics::Unit::Seconds,
        "How long calls waited for a rate-limit slot"
    );
}

#[derive(Clone)]
struct AdminState {
    health: Arc<Readiness>,
    isolation: Arc<Isolation>,
    metrics: PrometheusHandle,
}

pub(crate) fn router(
    health: Arc<Readiness>,
    isolation: Arc<Isolation>,
    metrics: PrometheusHandle,
) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render))
        .route("/status", get(status))
        .with_state(AdminState {
            health,
            isolation,
            metrics,
        })
}

/// 503 also while a provider cannot be called at all (a revoked Qonto
/// OAuth grant): the body names each such problem on its own line.
async fn readyz(State(s): State<AdminState>) -> (StatusCode, String) {
    let (ready, problems) = readiness(&s.health);
    if ready {
        return (StatusCode::OK, "ready\n".to_owned());
    }
    let mut body = "not ready\n".to_owned();
    for problem in problems {
        body.push_str(&problem);
        body.push('\n');
    }
    (StatusCode::SERVICE_UNAVAILABLE, body)
}

/// What `/readyz` and `/status` both report: ready only with the broker
/// session up and every provider callable, and the providers' problems.
fn readiness(health: &Readiness) -> (bool, Vec<String>) {
    let problems = health.provider_problems();
    (health.ready() && problems.is_empty(), problems)
}

async fn status(State(s): State<AdminState>) -> axum::Json<serde_json::Value> {
    let (ready, problems) = readiness(&s.health);
    axum::Json(serde_json::json!({
        "ready": ready,
        "provider_problems": problems,
        "draining": s.health.draining(),
        "broker": {
            "node": s.health.broker_node(),
            "problem": s.health.problem(),
        },
        "providers": s.isolation.status(),
    }))
}

async fn render(State(s): State<AdminState>) -> ([(&'static str, &'static str); 1], String) {
    // Gauges of states that change without an event (a pause ending).
    s.isolation.refresh_gauges();
    s.metrics.run_upkeep();
    (
        [("content-type", "text/plain; version=0.0.4; charset=utf-8")],
        s.metrics.render(),
    )
}

/// Serves until `shutdown`; it keeps answering while the worker drains so
/// probes see `/readyz` turn 503 rather than a refused connection.
pub(crate) async fn serve(
    listener: TcpListener,
    health: Arc<Readiness>,
    isolation: Arc<Isolation>,
    stop: CancellationToken,
) {
    let app = router(health, isolation, metrics_handle());
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
    {
        tracing::error!(error = %e, "admin endpoint failed");
    }
}
