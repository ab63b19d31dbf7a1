//! Per-provider counters. Atomics, not a mutex: every request bumps them,
//! and under the benchmark many requests do so at once.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};

use serde::{Deserialize, Serialize};

/// HTTP statuses are below 600; one slot each avoids a map on the hot path.
const STATUS_SLOTS: usize = 600;

pub struct Counters {
    pub calls: AtomicU64,
    pub http2_calls: AtomicU64,
    pub state_changing_calls: AtomicU64,
    pub state_changes: AtomicU64,
    pub double_state_changes: AtomicU64,
    pub conflicting_keys: AtomicU64,
    pub token_issued: AtomicU64,
    pub dropped_connections: AtomicU64,
    pub throttled: AtomicU64,
    pub outage_calls: AtomicU64,
    /// A gauge, not reset: calls still running when counters are reset
    /// leave it when they end.
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    by_status: Box<[AtomicU64]>,
    /// A unit's own rare events (its OAuth server's grants, say), by dotted
    /// name: a mutex is fine off the hot path, and the core needs no field
    /// per unit.
    extra: Mutex<BTreeMap<&'static str, u64>>,
}

impl Default for Counters {
    fn default() -> Self {
        Self {
            calls: AtomicU64::new(0),
            http2_calls: AtomicU64::new(0),
            state_changing_calls: AtomicU64::new(0),
            state_changes: AtomicU64::new(0),
            double_state_changes: AtomicU64::new(0),
            conflicting_keys: AtomicU64::new(0),
            token_issued: AtomicU64::new(0),
            dropped_connections: AtomicU64::new(0),
            throttled: AtomicU64::new(0),
            outage_calls: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            by_status: (0..STATUS_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            extra: Mutex::default(),
        }
    }
}

impl Counters {
    pub fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A poisoned lock only means a bump panicked; the counts stay usable.
    fn extra(&self) -> MutexGuard<'_, BTreeMap<&'static str, u64>> {
        self.extra.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Counts one of the unit's own events (see [`ProviderStats::extra`]).
    pub fn bump_extra(&self, name: &'static str) {
        *self.extra().entry(name).or_default() += 1;
    }

    pub fn record_status(&self, status: u16) {
        if let Some(slot) = self.by_status.get(usize::from(status)) {
            Self::bump(slot);
        }
    }

    /// A provider call starts; it is in flight until the guard drops.
    /// Returns the calls that were already in flight.
    pub fn enter(&self) -> (u64, InFlight<'_>) {
        let others = self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.max_in_flight.fetch_max(others + 1, Ordering::Relaxed);
        (others, InFlight(&self.in_flight))
    }

    fn scalars(&self) -> [&AtomicU64; 10] {
        [
            &self.calls,
            &self.http2_calls,
            &self.state_changing_calls,
            &self.state_changes,
            &self.double_state_changes,
            &self.conflicting_keys,
            &self.token_issued,
            &self.dropped_connections,
            &self.throttled,
            &self.outage_calls,
        ]
    }

    pub fn reset(&self) {
        for counter in self.scalars().into_iter().chain(self.by_status.iter()) {
            counter.store(0, Ordering::Relaxed);
        }
        self.extra().clear();
        self.max_in_flight
            .store(self.in_flight.load(Ordering::Relaxed), Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> ProviderStats {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let by_status = self
            .by_status
            .iter()
            .enumerate()
            .filter_map(|(status, count)| {
                let count = load(count);
                (count > 0).then_some((status as u16, count))
            })
            .collect();
        ProviderStats {
            calls: load(&self.calls),
            http2_calls: load(&self.http2_calls),
            state_changing_calls: load(&self.state_changing_calls),
            state_changes: load(&self.state_changes),
            double_state_changes: load(&self.double_state_changes),
            conflicting_keys: load(&self.conflicting_keys),
            token_issued: load(&self.token_issued),
            dropped_connections: load(&self.dropped_connections),
            throttled: load(&self.throttled),
            outage_calls: load(&self.outage_calls),
            in_flight: load(&self.in_flight),
            max_in_flight: load(&self.max_in_flight),
            max_in_window: BTreeMap::new(),
            by_status,
            extra: self
                .extra()
                .iter()
                .map(|(name, count)| ((*name).to_owned(), *count))
                .collect(),
        }
    }
}

/// Leaves the in-flight gauge when the call ends, however it ends.
pub struct InFlight<'a>(&'a AtomicU64);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Counters of one provider since start or the last reset.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProviderStats {
    /// Every request under the provider's prefix: decisions, reads, tokens.
    pub calls: u64,
    /// Of those, requests that came over HTTP/2.
    pub http2_calls: u64,
    /// Requests to approve/reject/link endpoints, whatever their answer
    /// (faulted, refused, replayed or applied).
    pub state_changing_calls: u64,
    /// Pending -> decided transitions (per transaction where one call
    /// decides several).
    pub state_changes: u64,
    /// Decision calls that reached an already-decided target and were not an
    /// idempotent replay. A correct worker keeps this at 0.
    pub double_state_changes: u64,
    /// Targets that received decision calls with two different idempotency keys.
    pub conflicting_keys: u64,
    /// Access tokens issued (token exchanges and refreshes).
    pub token_issued: u64,
    /// Connections dropped without an answer (reset, timeout and
    /// apply-then-fail faults).
    pub dropped_connections: u64,
    /// Calls refused by the provider's quota (answered 429, or Ledger v1's
    /// 420); a client that keeps to the quota keeps this at 0.
    #[serde(default)]
    pub throttled: u64,
    /// Calls that met an outage (answered 503, reset or held unanswered).
    #[serde(default)]
    pub outage_calls: u64,
    /// Reads and decisions being worked on now (past any outage and quota,
    /// including their simulated latency).
    #[serde(default)]
    pub in_flight: u64,
    /// The most reads and decisions ever in flight at once.
    #[serde(default)]
    pub max_in_flight: u64,
    /// With a quota: for each of its windows (keyed `10s`, `10m`, `250ms`),
    /// the most reads and decisions that arrived, refused or not, within
    /// any rolling window of that length. Exact up to about a million.
    #[serde(default)]
    pub max_in_window: BTreeMap<String, u64>,
    /// HTTP status -> number of answers with it.
    pub by_status: BTreeMap<u16, u64>,
    /// The unit's own counters by dotted name, e.g. Qonto's
    /// `oauth.refreshes`; absent until first counted.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra: BTreeMap<String, u64>,
}

impl ProviderStats {
    /// One of [`Self::extra`], 0 when never counted.
    pub fn count(&self, name: &str) -> u64 {
        self.extra.get(name).copied().unwrap_or(0)
    }

    /// [`ProviderStats::max_in_window`] for the window of length `period`.
    pub fn max_in(&self, period: std::time::Duration) -> Option<u64> {
        self.max_in_window
            .get(&super::quota::period_label(period))
            .copied()
    }
}

/// Counters of every provider, keyed by its name; also served at
/// `GET /_sim/stats` as `{"<name>": {...}, ...}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SimStats(pub BTreeMap<String, ProviderStats>);

impl SimStats {
    pub fn provider(&self, name: &str) -> Option<&ProviderStats> {
        self.0.get(name)
    }

    /// Sum over providers, e.g. to assert `double_state_changes == 0` once
    /// (`max_in_flight` is the sum of each provider's; `max_in_window` stays
    /// per provider and is empty here).
    pub fn total(&self) -> ProviderStats {
        let mut total = ProviderStats::default();
        for p in self.0.values() {
            total.calls += p.calls;
            total.http2_calls += p.http2_calls;
            total.state_changing_calls += p.state_changing_calls;
            total.state_changes += p.state_changes;
            total.double_state_changes += p.double_state_changes;
            total.conflicting_keys += p.conflicting_keys;
            total.token_issued += p.token_issued;
            total.dropped_connections += p.dropped_connections;
            total.throttled += p.throttled;
            total.outage_calls += p.outage_calls;
            total.in_flight += p.in_flight;
            total.max_in_flight += p.max_in_flight;
            for (status, count) in &p.by_status {
                *total.by_status.entry(*status).or_default() += count;
            }
            for (name, count) in &p.extra {
                *total.extra.entry(name.clone()).or_default() += count;
            }
        }
        total
    }
}
