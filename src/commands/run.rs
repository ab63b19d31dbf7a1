//! `approval-worker run`: the worker and its admin endpoint, until
//! SIGTERM/SIGINT.

use std::process::ExitCode;

use tokio_util::sync::CancellationToken;

use crate::{admin, providers::Registry, settings::Settings, shutdown, worker::Worker};

pub async fn run(settings: Settings) -> ExitCode {
    let registry = match Registry::from_settings(&settings) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "configuration rejected");
            eprintln!("approval-worker: {e}");
            return ExitCode::from(2);
        }
    };
    for (name, enabled) in registry.names() {
        tracing::info!(provider = name, enabled, "provider");
    }
    // Starts anyway, as with a provider without credentials: what cannot
    // pass is parked, never dropped, and the operator sees why.
    let (verdict, warnings) = settings.auth_report();
    if let Err(problem) = verdict {
        tracing::error!(%problem, "no decision can be authenticated");
    }
    for warning in warnings {
        tracing::warn!(%warning, "authenticity");
    }
    let bind = settings.admin.bind;
    let admin = match tokio::net::TcpListener::bind(bind).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, %bind, "admin endpoint cannot listen");
            eprintln!("approval-worker: APPROVAL_ADMIN__BIND={bind} cannot be bound: {e}");
            return ExitCode::from(2);
        }
    };
    admin::metrics_handle();
    let stop = CancellationToken::new();
    if let Err(e) = shutdown::cancel_on_signal(stop.clone()) {
        eprintln!("approval-worker: could not install signal handlers: {e}");
        return ExitCode::FAILURE;
    }
    tracing::info!(%bind, "admin endpoint: /healthz /readyz /metrics /status");
    let worker = Worker::new(settings, registry, stop);
    let admin_stop = CancellationToken::new();
    let admin_task = tokio::spawn(admin::serve(
        admin,
        worker.health(),
        worker.isolation(),
        admin_stop.clone(),
    ));
    // On a runtime thread, not the one blocked in `block_on`: each delivery
    // task is then spawned onto the thread that received it, instead of
    // through the global queue with a wake-up of another thread.
    let outcome = tokio::spawn(worker.run()).await;
    admin_stop.cancel();
    let _ = admin_task.await;
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "the worker task failed");
            eprintln!("approval-worker: the worker task failed: {e}");
            ExitCode::FAILURE
        }
    }
}
