//! Stateful simulator of the provider APIs (PROVIDERS.md), for
//! `approval-worker simulate`, `demo`, `bench` and in-process tests.
//!
//! One HTTP server hosts every unit of the provider registry under its own
//! path prefix, so a worker is pointed at it by setting each provider's base
//! URL to `{root}{prefix}` (see [`SimHandle::worker_env`]). Each provider's
//! fake lives beside its client, in `providers/<name>/sim.rs` (or `sim/`),
//! with its routes listed there, and runs as a `kit::Fake`. Targets (requests, transactions) are created pending the
//! first time any call names them, so tests can use random ids, and each
//! moves from pending to decided at most once. Counters in [`SimStats`] let a
//! test or the benchmark prove the worker never decided a target twice.
//!
//! The server speaks HTTP/1.1 and HTTP/2 without TLS (h2c, prior knowledge);
//! the stats count how many calls came over HTTP/2.
//!
//! A provider can be made hard: a quota of rolling windows answered with its
//! rate-limit status and `Retry-After` ([`Quota`]), an outage (reset, 503 or
//! black hole, [`Outage`]), and latency that grows with the calls in flight
//! ([`Faults::latency_per_in_flight_ms`]), each switchable while it runs.
//!
//! Control endpoints live under `/_sim` and are never faulted or counted:
//! `GET /_sim/stats`, `POST /_sim/reset`, `GET|PUT /_sim/faults/{provider}`,
//! `GET|PUT /_sim/quota/{provider}`, `GET|PUT|DELETE /_sim/outage/{provider}`,
//! `GET /_sim/targets/{provider}/{key}`, `POST /_sim/{provider}/sca`.
//!
//! Module layers, each using only those below it: this server (reads the
//! registry) → `control`, `layer` → `state` → `unit` → `kit` → `stats`,
//! with `faults`, `quota`, `outage` and `conn` as leaves. Provider folders use `unit`, `kit`
//! and `stats`, never the layers above.

mod conn;
mod control;
mod faults;
pub(crate) mod kit;
mod layer;
pub mod outage;
pub mod quota;
pub mod samples;
mod state;
pub(crate) mod stats;
#[cfg(test)]
pub(crate) mod testkit;
#[cfg(test)]
mod tests;
pub(crate) mod unit;

use std::any::Any;
use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, LazyLock};

use axum::Router;
use tokio::net::TcpListener;

pub use faults::Faults;
pub use kit::{ScaAuto, TargetInfo};
pub use outage::{Outage, OutageMode};
pub use quota::{Quota, Window};
pub use stats::{ProviderStats, SimStats};
pub use unit::UnitOptions;

/// Qonto's half options and its OAuth server (client, token timing, clock,
/// a consent helper), for tests and tools outside the crate.
pub use crate::providers::qonto::sim::{Options as QontoOptions, oauth as qonto_oauth};

use crate::providers::{REGISTRY, Unit};
use conn::{ConnKill, SimListener};
use state::{Sim, Slot};

/// Names of the simulated providers, in registry order, in the contract's
/// spelling (CONTRACT.md section 4): what every `provider: &str` parameter
/// accepts.
pub fn providers() -> &'static [&'static str] {
    static NAMES: LazyLock<Vec<&'static str>> =
        LazyLock::new(|| REGISTRY.iter().map(|unit| unit.name).collect());
    &NAMES
}

/// The registry unit named `name`.
pub(crate) fn unit(name: &str) -> Option<&'static Unit> {
    REGISTRY.iter().find(|unit| unit.name == name)
}

/// Everything the simulator is started with. Faults and confirmation marks
/// can also be changed while it runs ([`SimHandle::set_faults`], `/_sim/*`).
#[derive(Clone, Debug, Default)]
pub struct SimConfig {
    /// Initial faults per provider name (see [`providers`]).
    pub faults: BTreeMap<String, Faults>,
    /// Initial quotas per provider name; none by default.
    pub quotas: BTreeMap<String, Quota>,
    /// Each unit's own options type (its accepted credentials, token
    /// lifetimes, ...), defined in its `providers/<name>/sim.rs`; a unit
    /// whose type is absent runs with its defaults.
    pub units: UnitOptions,
}

impl SimConfig {
    /// Sets one unit's options, e.g.
    /// `SimConfig::default().with(some_provider::sim::Options { .. })`.
    pub fn with<T: Any + Send + Sync>(mut self, options: T) -> Self {
        self.units.set(options);
        self
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
    let sim = Arc::new(build(&config)?);
    let listener = TcpListener::bind(bind).await?;
    let addr = listener.local_addr()?;
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
    for &name in providers() {
        let listener = TcpListener::bind(SocketAddr::new(ip, 0)).await?;
        handle.provider_addrs.insert(name, listener.local_addr()?);
        tokio::spawn(run(handle.sim.clone(), listener));
    }
    Ok(handle)
}

/// Starts one fake per registry unit.
fn build(config: &SimConfig) -> std::io::Result<Sim> {
    let mut slots = Vec::with_capacity(REGISTRY.len());
    for unit in REGISTRY {
        let fake = unit.sim.start(&config.units).map_err(|e| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("simulator {}: {e}", unit.name),
            )
        })?;
        slots.push(Slot::new(unit.name, unit.sim.prefix(), fake));
    }
    Sim::new(slots, &config.faults, &config.quotas)
}

async fn run(sim: Arc<Sim>, listener: TcpListener) {
    let mut app = Router::new().nest("/_sim", control::routes().with_state(sim.clone()));
    for (index, slot) in sim.slots().iter().enumerate() {
        app = app.nest(
            slot.prefix,
            layer::wrap(slot.unit.clone().routes(), &sim, index),
        );
    }
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

    /// The place of `provider`; programmer-facing lookups panic on a typo
    /// rather than silently configuring nothing.
    fn expect(&self, provider: &str) -> usize {
        self.sim.index(provider).unwrap_or_else(|| {
            panic!(
                "unknown provider {provider:?}; use one of {:?}",
                providers()
            )
        })
    }

    /// The base URL a worker configures for `provider` (panics on an unknown
    /// provider name).
    pub fn base_url(&self, provider: &str) -> String {
        let slot = &self.sim.slots()[self.expect(provider)];
        let addr = self
            .provider_addrs
            .get(slot.name)
            .copied()
            .unwrap_or(self.addr);
        format!("{}{}", connectable_url(addr), slot.prefix)
    }

    /// Environment variables (CONTRACT.md section 2) pointing a worker at this
    /// simulator with the credentials it accepts.
    pub fn worker_env(&self) -> Vec<(String, String)> {
        let var =
            |name: &str, key: &str| format!("APPROVAL_PROVIDERS__{}__{key}", name.to_uppercase());
        let slots = self.sim.slots();
        let mut env: Vec<(String, String)> = slots
            .iter()
            .map(|slot| (var(slot.name, "BASE_URL"), self.base_url(slot.name)))
            .collect();
        for slot in slots {
            env.extend(
                slot.unit
                    .worker_env()
                    .into_iter()
                    .map(|(key, value)| (var(slot.name, key), value)),
            );
        }
        env
    }

    pub fn stats(&self) -> SimStats {
        self.sim.stats()
    }

    /// Replaces `provider`'s faults; applies to calls arriving from now on.
    pub fn set_faults(&self, provider: &str, faults: Faults) {
        self.sim.set_faults(self.expect(provider), faults);
    }

    /// Replaces `provider`'s quota (`Quota::default()`, or `"off"` parsed,
    /// removes it); its windows start empty. E.g.
    /// `sim.set_quota("qonto", "1000/10s,10000/10m".parse().unwrap())`.
    pub fn set_quota(&self, provider: &str, quota: Quota) {
        self.sim.set_quota(self.expect(provider), quota);
    }

    /// `provider`'s quota and the admitted calls in each window now, keyed
    /// by [`Window::label`].
    pub fn quota(&self, provider: &str) -> (Quota, BTreeMap<String, u64>) {
        self.sim.quota(self.expect(provider))
    }

    /// Puts `provider` out (`Some`) or back (`None`) for calls arriving from
    /// now on; a call held by a black hole is released (its connection
    /// reset) when the outage ends. E.g.
    /// `sim.set_outage("flexpay", Some(Outage::new(OutageMode::Down).lasting(d)))`.
    pub fn set_outage(&self, provider: &str, outage: Option<Outage>) {
        self.sim.set_outage(self.expect(provider), outage);
    }

    /// The outage in force at `provider` now.
    pub fn outage(&self, provider: &str) -> Option<Outage> {
        self.sim.outage(self.expect(provider))
    }

    /// Makes approving the target filed under `key` need a human
    /// confirmation resolved by `auto`, at every provider that has such a
    /// step. May be called before the target is first seen.
    pub fn require_sca(&self, key: &str, auto: ScaAuto) {
        self.sim.require_confirmation(key, auto);
    }

    /// The next `calls` decision calls whose path contains `path_fragment`
    /// answer `status`, before any state change.
    pub fn fail_next(&self, provider: &str, path_fragment: &str, calls: u32, status: u16) {
        self.sim
            .fail_next(self.expect(provider), path_fragment, calls, status);
    }

    /// The next `calls` decision calls for the target filed under `key`
    /// answer `status`; `false` when the provider's decision path does not
    /// name that key.
    pub fn fail_next_for(&self, provider: &str, key: &str, calls: u32, status: u16) -> bool {
        let index = self.expect(provider);
        let Some(fragment) = REGISTRY[index].sim.decision_path(key) else {
            return false;
        };
        self.sim.fail_next(index, &fragment, calls, status);
        true
    }

    /// The target's status in the provider's vocabulary; `None` if never
    /// seen. Keys are those of [`samples::target_key`].
    pub fn target_state(&self, provider: &str, target_key: &str) -> Option<String> {
        self.target(provider, target_key).map(|t| t.state)
    }

    pub fn target(&self, provider: &str, target_key: &str) -> Option<TargetInfo> {
        self.sim.target(self.sim.index(provider)?, target_key)
    }

    /// Forgets all targets, cached responses, confirmation sessions,
    /// counters and the arrivals in quota windows; keeps faults, quotas,
    /// outages and issued tokens (same as `POST /_sim/reset`).
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
