//! Stateful simulator of the five provider APIs (PROVIDERS.md), for
//! `approval-worker simulate`, `demo`, `bench` and in-process tests.
//!
//! One HTTP server hosts every provider under its own path prefix, so a worker
//! is pointed at it by setting each provider's base URL to `{root}{prefix}`
//! (see [`SimHandle::worker_env`]). Targets (requests, transactions) are created
//! pending the first time any call names them, so tests can use random ids, and
//! each moves from pending to decided at most once. Counters in [`SimStats`]
//! let a test or the benchmark prove the worker never decided a target twice.
//!
//! Routes, relative to each provider's base URL:
//!
//! | provider (prefix) | routes |
//! |---|---|
//! | qonto (`/qonto`) | `POST /v2/requests/{plural_type}/{id}/decline`, `POST /v2/requests/{plural_type}/{id}/approve`, `GET /v2/requests`, `GET /v2/sca_sessions/{token}`, `POST /v2/mocked_sca_sessions/{token}/{allow\|deny}` |
//! | ledger_v1 (`/ledger-v1`) | `POST /transactions/{id}/reject`, `POST /transactions/{id}/approve`, `GET /transactions/{id}` |
//! | ledger_v2 (`/ledger-v2`) | `POST /rest/auth/token`, `POST /rest/auth/token/refresh`, `GET /rest/requests/{id}/challenge`, `POST /rest/requests/{id}/approve`, `POST /rest/requests/{id}/reject`, `GET /rest/requests/{id}` |
//! | moneypipe (`/moneypipe/v1`) | `PUT /operations/{op}/link-transactions`, `PUT /operations/{op}/reject-transactions`, `GET /operations/{op}`, `GET /transactions/{id}` |
//! | flexpay (`/flexpay/api`) | `POST /v1/auth/token`, `POST /v1/transactions/{ref}/accept`, `POST /v1/transactions/{ref}/reject`, `GET /v1/transactions/pending`, `GET /v1/transactions/{ref}` |
//!
//! The server speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge);
//! the stats count how many calls came over HTTP/2.
//!
//! Control endpoints live under `/_sim` and are never faulted or counted:
//! `GET /_sim/stats`, `POST /_sim/reset`, `GET|PUT /_sim/faults/{provider}`,
//! `GET /_sim/targets/{provider}/{key}`, `POST /_sim/qonto/sca`.

// Handlers return a ready `Response` as their error: it is the natural early
// exit in axum, errors are the uncommon path, and boxing would only add noise.
#![allow(
    clippy::result_large_err,
    reason = "Response is the handlers' error type"
)]

mod conn;
mod control;
mod faults;
mod flexpay;
mod ledger_v1;
mod ledger_v2;
mod moneypipe;
mod qonto;
pub mod samples;
mod state;
mod stats;
#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::http::StatusCode;
use axum::response::Response;
use serde::Serialize;
use tokio::net::TcpListener;

pub use faults::Faults;
pub use stats::{ProviderStats, SimStats};

use conn::{ConnKill, SimListener};
use state::{Sim, json};

/// Provider names accepted by every `provider: &str` parameter, in the
/// contract's spelling (CONTRACT.md section 4).
pub const PROVIDERS: [&str; 5] = ["qonto", "ledger_v1", "ledger_v2", "moneypipe", "flexpay"];

/// Credentials the simulator accepts; anything else gets a 401 in the
/// provider's error shape. The defaults are what [`SimHandle::worker_env`]
/// emits, so a worker pointed at the sim authenticates out of the box.
#[derive(Clone, Debug)]
pub struct SimCredentials {
    pub qonto_login: String,
    pub qonto_secret_key: String,
    /// Accepted as `Authorization: Bearer <token>` (Qonto's OAuth option).
    pub qonto_access_token: String,
    pub ledger_v1_api_key: String,
    pub ledger_v2_workspace: String,
    pub ledger_v2_api_key_id: String,
    pub ledger_v2_api_key_secret: String,
    /// PEM of the API user's key. The sim keeps only its public half to verify
    /// signatures; the PEM itself is handed to the worker by `worker_env`.
    pub ledger_v2_signing_key_pem: String,
    pub moneypipe_token: String,
    pub flexpay_client_id: String,
    pub flexpay_client_secret: String,
}

impl Default for SimCredentials {
    fn default() -> Self {
        Self {
            qonto_login: "sim-qonto".into(),
            qonto_secret_key: "sim-qonto-secret".into(),
            qonto_access_token: "sim-qonto-token".into(),
            ledger_v1_api_key: "sim-ledger-v1-key".into(),
            ledger_v2_workspace: "sim-workspace".into(),
            ledger_v2_api_key_id: "sim-key-id".into(),
            ledger_v2_api_key_secret: "sim-key-secret".into(),
            ledger_v2_signing_key_pem: crate::jws::DEMO_SIGNING_KEY_PEM.into(),
            moneypipe_token: "sim-moneypipe-token".into(),
            flexpay_client_id: "sim-flexpay-client".into(),
            flexpay_client_secret: "sim-flexpay-secret".into(),
        }
    }
}

/// How a Qonto SCA session resolves without a human, so demos and tests run
/// unattended. `after` counts from the session's creation (the 428 answer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaAuto {
    Allow {
        after: Duration,
    },
    Deny {
        after: Duration,
    },
    /// Waits for `POST /v2/mocked_sca_sessions/{token}/{allow|deny}`; denies
    /// after 15 minutes like Qonto.
    Manual,
}

/// Everything the simulator is started with. Faults and SCA marks can also be
/// changed while it runs ([`SimHandle::set_faults`], `/_sim/*`).
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub credentials: SimCredentials,
    /// Initial faults per provider name (see [`PROVIDERS`]).
    pub faults: BTreeMap<String, Faults>,
    /// When set, every Qonto approve needs SCA, resolved by this rule.
    pub qonto_sca_for_all_approvals: Option<ScaAuto>,
    /// How long Qonto replays a cached success for an idempotency key.
    pub qonto_idempotency_ttl: Duration,
    pub ledger_v2_access_ttl: Duration,
    pub ledger_v2_refresh_ttl: Duration,
    /// `false` skips the ECDSA check of Ledger v2 signatures (the payload must
    /// still be an open challenge). Only for throughput benchmarks: a P-256
    /// verify costs ~0.3 ms of CPU that a real provider would not take from
    /// the worker's machine.
    pub ledger_v2_verify_signatures: bool,
    pub flexpay_token_ttl: Duration,
    /// FlexPay's token answer is UNCONFIRMED: `false` gives the envelope form
    /// (`data.accessToken`), `true` the OAuth form (`access_token`).
    pub flexpay_oauth_token_shape: bool,
}

impl Default for SimConfig {
    fn default() -> Self {
        Self {
            credentials: SimCredentials::default(),
            faults: BTreeMap::new(),
            qonto_sca_for_all_approvals: None,
            qonto_idempotency_ttl: Duration::from_secs(30 * 60),
            ledger_v2_access_ttl: Duration::from_secs(300),
            ledger_v2_refresh_ttl: Duration::from_secs(1800),
            ledger_v2_verify_signatures: true,
            flexpay_token_ttl: Duration::from_secs(3600),
            flexpay_oauth_token_shape: false,
        }
    }
}

/// State of one target as seen by the sim: its status in the provider's own
/// vocabulary and the distinct idempotency keys of the calls that reached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    pub state: String,
    pub keys: Vec<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Provider {
    Qonto,
    LedgerV1,
    LedgerV2,
    MoneyPipe,
    FlexPay,
}

impl Provider {
    pub(crate) const ALL: [Provider; 5] = [
        Provider::Qonto,
        Provider::LedgerV1,
        Provider::LedgerV2,
        Provider::MoneyPipe,
        Provider::FlexPay,
    ];

    pub(crate) fn parse(name: &str) -> Option<Self> {
        match name {
            "qonto" => Some(Self::Qonto),
            "ledger_v1" | "ledger-v1" => Some(Self::LedgerV1),
            "ledger_v2" | "ledger-v2" => Some(Self::LedgerV2),
            "moneypipe" => Some(Self::MoneyPipe),
            "flexpay" => Some(Self::FlexPay),
            _ => None,
        }
    }

    /// Programmer-facing lookups panic on a typo rather than silently
    /// configuring nothing.
    fn expect(name: &str) -> Self {
        Self::parse(name)
            .unwrap_or_else(|| panic!("unknown provider {name:?}; use one of {PROVIDERS:?}"))
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    pub(crate) fn name(self) -> &'static str {
        PROVIDERS[self.index()]
    }

    fn prefix(self) -> &'static str {
        match self {
            Self::Qonto => "/qonto",
            Self::LedgerV1 => "/ledger-v1",
            Self::LedgerV2 => "/ledger-v2",
            Self::MoneyPipe => "/moneypipe/v1",
            Self::FlexPay => "/flexpay/api",
        }
    }

    /// An error in this provider's documented error shape, so the worker's
    /// error parsing is exercised even on simulated faults.
    pub(crate) fn error(self, status: StatusCode, code: &str, message: &str) -> Response {
        let body = match self {
            Self::Qonto => serde_json::json!({"errors": [{"code": code, "detail": message}]}),
            Self::LedgerV1 => {
                serde_json::json!({"message": message, "name": code, "status_code": status.as_u16()})
            }
            Self::LedgerV2 => serde_json::json!({"message": message, "code": code, "issues": []}),
            // MoneyPipe codes are integers (PROVIDERS.md section 5).
            Self::MoneyPipe => {
                serde_json::json!({"code": code.parse::<u32>().unwrap_or(0), "message": message})
            }
            Self::FlexPay => return flexpay::error(status, code, message, Vec::new()),
        };
        json(status, &body)
    }

    fn router(self) -> Router<Arc<Sim>> {
        match self {
            Self::Qonto => qonto::routes(),
            Self::LedgerV1 => ledger_v1::routes(),
            Self::LedgerV2 => ledger_v2::routes(),
            Self::MoneyPipe => moneypipe::routes(),
            Self::FlexPay => flexpay::routes(),
        }
    }
}

/// A running simulator. Dropping it (or [`SimHandle::shutdown`]) stops the
/// server, including requests held by a timeout fault.
pub struct SimHandle {
    sim: Arc<Sim>,
    addr: SocketAddr,
    /// Set by [`start_per_provider`]: each provider's own listener.
    provider_addrs: HashMap<&'static str, SocketAddr>,
}

/// Binds `bind` (port 0 picks a free port) and serves on a spawned tokio task.
pub async fn start(config: SimConfig, bind: SocketAddr) -> std::io::Result<SimHandle> {
    let (sim, listener, addr) = prepare(config, bind).await?;
    tokio::spawn(run(sim.clone(), listener));
    Ok(SimHandle {
        sim,
        addr,
        provider_addrs: HashMap::new(),
    })
}

/// Like [`start`] on `ip`, plus one listener per provider that its base URL
/// points at. Real providers live on separate hosts, so a worker keeps one
/// connection pool per provider; on one shared port the pools of all
/// providers would compete for one host's idle-connection cap and churn
/// connections, which the benchmark would then measure instead of the worker.
pub async fn start_per_provider(config: SimConfig, ip: IpAddr) -> std::io::Result<SimHandle> {
    let mut handle = start(config, SocketAddr::new(ip, 0)).await?;
    for provider in Provider::ALL {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        handle
            .provider_addrs
            .insert(provider.name(), listener.local_addr()?);
        tokio::spawn(run(handle.sim.clone(), listener));
    }
    Ok(handle)
}

/// Serves until the returned future is dropped; for the `simulate` command,
/// which prints the URLs itself.
pub async fn serve_forever(config: SimConfig, bind: SocketAddr) -> std::io::Result<()> {
    let (sim, listener, _) = prepare(config, bind).await?;
    run(sim, listener).await;
    Ok(())
}

async fn prepare(
    config: SimConfig,
    bind: SocketAddr,
) -> std::io::Result<(Arc<Sim>, TcpListener, SocketAddr)> {
    let sim = Arc::new(Sim::new(config)?);
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
    Ok((sim, listener, addr))
}

async fn run(sim: Arc<Sim>, listener: TcpListener) {
    let mut app = Router::new().nest("/_sim", control::routes());
    for provider in Provider::ALL {
        app = app.nest(
            provider.prefix(),
            faults::wrap(provider.router(), &sim, provider),
        );
    }
    let app = app.with_state(sim.clone());
    let shutdown = sim.shutdown.clone();
    // Serving never fails after binding: accept errors are retried inside the
    // listener and per-connection errors end only that connection.
    let _ = axum::serve(
        SimListener::new(listener),
        app.into_make_service_with_connect_info::<ConnKill>(),
    )
    .with_graceful_shutdown(shutdown.cancelled_owned())
    .await;
}

impl SimHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://IP:PORT`; a wildcard bind address is replaced by loopback so
    /// the URL is connectable.
    pub fn root_url(&self) -> String {
        connectable_url(self.addr)
    }

    /// The base URL a worker configures for `provider` (panics on an unknown
    /// provider name).
    pub fn base_url(&self, provider: &str) -> String {
        let provider = Provider::expect(provider);
        let addr = self
            .provider_addrs
            .get(provider.name())
            .copied()
            .unwrap_or(self.addr);
        format!("{}{}", connectable_url(addr), provider.prefix())
    }

    /// Environment variables (CONTRACT.md section 2) pointing a worker at this
    /// simulator with the credentials it accepts.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let c = &self.sim.config.credentials;
        let mut env = Vec::new();
        for provider in Provider::ALL {
            let key = format!(
                "APPROVAL_PROVIDERS__{}__BASE_URL",
                provider.name().to_uppercase()
            );
            env.push((key, self.base_url(provider.name())));
        }
        let credentials = [
            ("QONTO__LOGIN", &c.qonto_login),
            ("QONTO__SECRET_KEY", &c.qonto_secret_key),
            ("LEDGER_V1__API_KEY", &c.ledger_v1_api_key),
            ("LEDGER_V2__WORKSPACE", &c.ledger_v2_workspace),
            ("LEDGER_V2__API_KEY_ID", &c.ledger_v2_api_key_id),
            ("LEDGER_V2__API_KEY_SECRET", &c.ledger_v2_api_key_secret),
            ("LEDGER_V2__SIGNING_KEY", &c.ledger_v2_signing_key_pem),
            ("MONEYPIPE__TOKEN", &c.moneypipe_token),
            ("FLEXPAY__CLIENT_ID", &c.flexpay_client_id),
            ("FLEXPAY__CLIENT_SECRET", &c.flexpay_client_secret),
        ];
        env.extend(
            credentials
                .into_iter()
                .map(|(key, value)| (format!("APPROVAL_PROVIDERS__{key}"), value.clone())),
        );
        env
    }

    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Replaces `provider`'s faults; applies to calls arriving from now on.
    pub fn set_faults(&self, provider: &str, faults: Faults) {
        self.sim.set_faults(Provider::expect(provider), faults);
    }

    /// Makes approving this Qonto request need SCA, resolved by `auto`. May be
    /// called before the request is first seen.
    pub fn require_sca(&self, qonto_request_id: &str, auto: ScaAuto) {
        self.sim.require_sca(qonto_request_id, auto);
    }

    /// The target's status in the provider's vocabulary (`declined`,
    /// `REJECTED`, `confirmed`, ...); `None` if never seen. Keys: Qonto request
    /// id, Ledger v1 transaction id, Ledger v2 request id, MoneyPipe
    /// transaction id, FlexPay reference.
    /// The next `calls` decision calls whose path contains `path_fragment`
    /// answer `status`, before any state change.
    pub fn fail_next(&self, provider: &str, path_fragment: &str, calls: u32, status: u16) {
        self.sim
            .fail_next(Provider::expect(provider), path_fragment, calls, status);
    }

    pub fn target_state(&self, provider: &str, target_key: &str) -> Option<String> {
        self.target(provider, target_key).map(|t| t.state)
    }

    pub fn target(&self, provider: &str, target_key: &str) -> Option<TargetInfo> {
        self.sim.target(Provider::parse(provider)?, target_key)
    }

    /// Forgets all targets, cached responses, SCA sessions and counters; keeps
    /// faults and issued tokens (same as `POST /_sim/reset`).
    pub fn reset(&self) {
        self.sim.reset();
    }

    pub fn shutdown(self) {
        // Drop does the work; this name makes intent explicit at call sites.
    }
}

fn connectable_url(mut addr: SocketAddr) -> String {
    if addr.ip().is_unspecified() {
        addr.set_ip(IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
    format!("http://{addr}")
}

impl Drop for SimHandle {
    fn drop(&mut self) {
        self.sim.shutdown.cancel();
    }
}
