//! A provider's request quota as the simulator enforces it: one or more
//! rolling windows, `N/<duration>` each, written as the worker's
//! `APPROVAL_PROVIDERS__<P>__RATE_LIMIT` (CONTRACT.md section 2). A leaf of
//! the simulator; `layer.rs` asks it at each provider call's arrival.
//!
//! Calls at `a <= b` share a window of duration `D` when `b - a < D`, so a
//! call is admitted at `t` when fewer than `N` admitted calls arrived in
//! `(t - D, t]`, for every window. Refused calls do not use the quota
//! (UNCONFIRMED for real providers: none documents it) but are seen by
//! [`QuotaState::max_in_window`], which measures what a client sent.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::time::Instant;

/// Arrivals remembered per window to measure `max_in_window`: beyond this
/// many calls inside one window the figure is a lower bound, which keeps a
/// flood from growing the simulator's memory without limit.
const SEEN_CAP: usize = 1 << 20;

/// At most `limit` calls in any rolling `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub limit: u64,
    pub period: Duration,
}

impl Window {
    /// The period as the stats key it is reported under (`10s`, `10m`,
    /// `250ms`): the largest unit that writes it exactly.
    pub fn label(&self) -> String {
        period_label(self.period)
    }
}

/// The key [`crate::tools::sim::ProviderStats::max_in_window`] uses for a
/// window of `period`.
pub fn period_label(period: Duration) -> String {
    let ms = period.as_millis();
    for (unit, size) in [("h", 3_600_000), ("m", 60_000), ("s", 1_000)] {
        if ms >= size && ms.is_multiple_of(size) {
            return format!("{}{unit}", ms / size);
        }
    }
    format!("{ms}ms")
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.limit, self.label())
    }
}

/// A provider's quota; empty means none (`off`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Quota(pub Vec<Window>);

impl Quota {
    pub fn is_off(&self) -> bool {
        self.0.is_empty()
    }

    /// The least time, from the first call, in which `calls` calls can all
    /// be admitted: the greedy schedule, each call at the earliest instant
    /// every window allows. `Duration::ZERO` without a quota.
    pub fn min_duration(&self, calls: usize) -> Duration {
        let mut at: Vec<Duration> = Vec::with_capacity(calls);
        for k in 0..calls {
            let earliest = self
                .0
                .iter()
                .filter_map(|w| {
                    let n = usize::try_from(w.limit).ok()?;
                    (k >= n).then(|| at[k - n] + w.period)
                })
                .max()
                .unwrap_or_default();
            at.push(earliest);
        }
        at.last().copied().unwrap_or_default()
    }

    /// The most calls per second the quota allows in the long run (its
    /// tightest window), `None` without a quota.
    pub fn long_run_per_s(&self) -> Option<f64> {
        self.0
            .iter()
            .map(|w| w.limit as f64 / w.period.as_secs_f64())
            .min_by(f64::total_cmp)
    }
}

impl fmt::Display for Quota {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_off() {
            return f.write_str("off");
        }
        let windows: Vec<String> = self.0.iter().map(Window::to_string).collect();
        f.write_str(&windows.join(","))
    }
}

/// The worker's own `RATE_LIMIT` syntax and bounds, so a quota the
/// simulator enforces is one the worker can be set to keep.
impl FromStr for Quota {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let windows = crate::isolation::limiter::parse(text)?;
        Ok(Self(
            windows
                .into_iter()
                .map(|w| Window {
                    limit: w.limit.into(),
                    period: w.window,
                })
                .collect(),
        ))
    }
}

impl Serialize for Quota {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Quota {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a refused call is told.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// Until a slot frees in every full window.
    pub wait: Duration,
    /// The `N` of the window that waits longest.
    pub limit: u64,
}

impl Refusal {
    /// `Retry-After` in whole seconds, rounded up so a client that obeys it
    /// is admitted.
    pub fn retry_after_secs(&self) -> u64 {
        self.wait.as_secs() + u64::from(self.wait.subsec_nanos() > 0)
    }
}

/// One window's bookkeeping.
#[derive(Debug)]
struct Track {
    window: Window,
    /// Arrival times of admitted calls still inside the window (at most N).
    admitted: VecDeque<Instant>,
    /// Arrival times of every call still inside the window.
    seen: VecDeque<Instant>,
    max_seen: u64,
}

/// A quota being enforced, from when it was set (or the last reset).
#[derive(Debug)]
pub struct QuotaState {
    quota: Quota,
    tracks: Vec<Track>,
}

/// Drops arrivals at or before `t - period`.
fn expire(times: &mut VecDeque<Instant>, period: Duration, now: Instant) {
    while times
        .front()
        .is_some_and(|&at| now.saturating_duration_since(at) >= period)
    {
        times.pop_front();
    }
}

impl QuotaState {
    pub fn new(quota: Quota) -> Self {
        let tracks = quota
            .0
            .iter()
            .map(|&window| Track {
                window,
                admitted: VecDeque::new(),
                seen: VecDeque::new(),
                max_seen: 0,
            })
            .collect();
        Self { quota, tracks }
    }

    pub fn quota(&self) -> &Quota {
        &self.quota
    }

    /// Records a call arriving at `now` and admits it, or says how long until
    /// every window has room. `now` never goes back (a monotonic clock).
    pub fn arrive(&mut self, now: Instant) -> Result<(), Refusal> {
        let mut refusal: Option<Refusal> = None;
        for track in &mut self.tracks {
            let period = track.window.period;
            expire(&mut track.seen, period, now);
            if track.seen.len() >= SEEN_CAP {
                track.seen.pop_front();
            }
            track.seen.push_back(now);
            track.max_seen = track.max_seen.max(track.seen.len() as u64);

            expire(&mut track.admitted, period, now);
            if track.admitted.len() as u64 >= track.window.limit {
                // The oldest admitted call leaves the window at its arrival
                // plus the period; the window is never over N, so that frees
                // exactly the slot this call needs.
                let frees = track.admitted.front().map_or(now, |&at| at + period);
                let wait = frees.saturating_duration_since(now);
                if refusal.is_none_or(|r| wait > r.wait) {
                    refusal = Some(Refusal {
                        wait,
                        limit: track.window.limit,
                    });
                }
            }
        }
        if let Some(refusal) = refusal {
            return Err(refusal);
        }
        for track in &mut self.tracks {
            track.admitted.push_back(now);
        }
        Ok(())
    }

    /// The most calls (admitted or not) seen in any rolling window of each
    /// configured period, keyed by [`Window::label`].
    pub fn max_in_window(&self) -> BTreeMap<String, u64> {
        self.tracks
            .iter()
            .map(|t| (t.window.label(), t.max_seen))
            .collect()
    }

    /// Admitted calls in each window ending at `now`, keyed by label.
    pub fn used(&mut self, now: Instant) -> BTreeMap<String, u64> {
        self.tracks
            .iter_mut()
            .map(|t| {
                expire(&mut t.admitted, t.window.period, now);
                (t.window.label(), t.admitted.len() as u64)
            })
            .collect()
    }

    /// Forgets every arrival: the quota starts afresh.
    pub fn reset(&mut self) {
        *self = Self::new(self.quota.clone());
    }
}
