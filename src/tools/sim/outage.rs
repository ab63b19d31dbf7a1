//! A provider outage: switched on and off at runtime, for good or for a
//! while. A leaf of the simulator; `layer.rs` applies it before anything
//! else, so a call during an outage changes no state and uses no quota.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

/// How a provider is out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutageMode {
    /// The connection is reset without an answer, as from a crashed host
    /// or a refused connection seen through a load balancer.
    #[serde(rename = "down")]
    Down,
    /// A quick `503` in the provider's error shape.
    #[serde(rename = "503")]
    Unavailable,
    /// The call is accepted and never answered: held until the outage ends
    /// or `hold` passes, then its connection is reset. The client sees its
    /// own timeout.
    #[serde(rename = "blackhole")]
    Blackhole,
}

/// One outage as set: its mode, until when, and whether the token endpoint
/// is out too.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outage {
    pub mode: OutageMode,
    /// `None`: until cleared.
    pub until: Option<Instant>,
    /// Also fail token exchanges (a provider whose auth lives on the same
    /// host); by default only reads and decisions are out.
    pub include_auth: bool,
    /// How long a black hole holds a call at most.
    pub hold: Duration,
}

/// A black hole holds a call at most this long by default: longer than any
/// sane client timeout, short enough that abandoned calls do not pile up.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(120);

impl Outage {
    /// An outage in `mode` until cleared.
    pub fn new(mode: OutageMode) -> Self {
        Self {
            mode,
            until: None,
            include_auth: false,
            hold: DEFAULT_HOLD,
        }
    }

    /// Ends by itself `duration` from now.
    pub fn lasting(mut self, duration: Duration) -> Self {
        self.until = Some(Instant::now() + duration);
        self
    }

    pub fn with_auth(mut self) -> Self {
        self.include_auth = true;
        self
    }

    pub fn holding(mut self, hold: Duration) -> Self {
        self.hold = hold;
        self
    }

    pub fn is_active(&self, now: Instant) -> bool {
        self.until.is_none_or(|until| now < until)
    }

    /// What is left of it at `now`; `None` when it lasts until cleared.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        self.until.map(|until| until.saturating_duration_since(now))
    }
}

/// `PUT /_sim/outage/{provider}`: `{"mode": "down"|"503"|"blackhole",
/// "for_ms": N, "include_auth": bool, "hold_ms": N}`; `for_ms` omitted
/// means until cleared.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct OutageRequest {
    mode: OutageMode,
    #[serde(default)]
    for_ms: Option<u64>,
    #[serde(default)]
    include_auth: bool,
    #[serde(default)]
    hold_ms: Option<u64>,
}

/// Durations a test or an operator means; above is a typo.
const MAX_MS: u64 = 7 * 24 * 3600 * 1000;

impl OutageRequest {
    pub fn into_outage(self) -> Result<Outage, String> {
        let ms = |name: &str, value: u64| {
            if value > MAX_MS {
                Err(format!("{name} must be at most {MAX_MS}"))
            } else {
                Ok(Duration::from_millis(value))
            }
        };
        let mut outage = Outage::new(self.mode);
        outage.include_auth = self.include_auth;
        if let Some(hold) = self.hold_ms {
            outage.hold = ms("hold_ms", hold)?;
        }
        if let Some(lasting) = self.for_ms {
            outage = outage.lasting(ms("for_ms", lasting)?);
        }
        Ok(outage)
    }
}

/// `GET /_sim/outage/{provider}` when one is active.
#[derive(Debug, Serialize)]
pub(crate) struct OutageView {
    mode: OutageMode,
    /// `null` when it lasts until cleared.
    remaining_ms: Option<u64>,
    include_auth: bool,
    hold_ms: u64,
}

impl OutageView {
    pub fn of(outage: &Outage, now: Instant) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
        Self {
            mode: outage.mode,
            remaining_ms: outage.remaining(now).map(ms),
            include_auth: outage.include_auth,
            hold_ms: ms(outage.hold),
        }
    }
}
