//! The faults a provider's fake can be given; `layer.rs` applies them.

use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Faults for one provider. Ratios are probabilities in `0.0..=1.0`, rolled
/// independently per call. They hit provider calls (decisions and reads), not
/// `/_sim/*`, and not token endpoints unless `include_auth` is set.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Added to every call.
    pub latency_ms: u64,
    /// Latency that grows with load: each call also waits this much per
    /// other call in flight at the provider when it arrives (see
    /// [`Faults::delay`]). Fractions of a millisecond are kept.
    pub latency_per_in_flight_ms: f64,
    /// Extra latency for a `tail_ratio` fraction of calls.
    pub tail_latency_ms: u64,
    pub tail_ratio: f64,
    /// Answer `error_status` before touching any state.
    pub error_rate: f64,
    pub error_status: u16,
    /// Answer the provider's rate-limit status with `Retry-After`.
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
    /// Also fault the token endpoints.
    pub include_auth: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Self {
            latency_ms: 0,
            latency_per_in_flight_ms: 0.0,
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

/// A minute per call in flight is already a provider that never answers.
const MAX_PER_IN_FLIGHT_MS: f64 = 60_000.0;

impl Faults {
    /// The latency law: `latency_ms + latency_per_in_flight_ms × others`,
    /// `others` being the calls already in flight at the provider when this
    /// one arrives, plus `tail_latency_ms` when `tail` was rolled. So a
    /// lone call waits `latency_ms`, and a client that sends more at once
    /// sees every answer slow down, as from a provider near its capacity.
    pub fn delay(&self, others: u64, tail: bool) -> Duration {
        let grown = self.latency_per_in_flight_ms * others as f64;
        // Validated above zero and finite; the cast saturates a huge product.
        let grown = Duration::from_micros((grown * 1000.0) as u64);
        let tail = if tail { self.tail_latency_ms } else { 0 };
        Duration::from_millis(self.latency_ms.saturating_add(tail)).saturating_add(grown)
    }

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
        if !(0.0..=MAX_PER_IN_FLIGHT_MS).contains(&self.latency_per_in_flight_ms) {
            return Err(format!(
                "latency_per_in_flight_ms must be within 0..={MAX_PER_IN_FLIGHT_MS}"
            ));
        }
        if !(400..=599).contains(&self.error_status) {
            return Err("error_status must be a 4xx or 5xx status".into());
        }
        Ok(())
    }
}
