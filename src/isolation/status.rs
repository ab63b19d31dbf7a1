//! What `/status` shows of each provider's gate. Times are RFC 3339 (UTC)
//! wall-clock instants, converted from the gate's monotonic clock when
//! asked.

use serde_json::{Value, json};
use time::{OffsetDateTime, format_description::well_known::Rfc3339};
use tokio::time::Instant;

use super::{Gate, Isolation};

impl Isolation {
    /// `{provider: {rate_limit, paused_until, breaker, concurrency}}`.
    pub(crate) fn status(&self) -> Value {
        let (now, wall) = (Instant::now(), OffsetDateTime::now_utc());
        let providers = self
            .gates()
            .map(|gate| (gate.provider().to_owned(), gate.status(now, wall)))
            .collect::<serde_json::Map<_, _>>();
        Value::Object(providers)
    }

    /// Every provider's gauges, as of now.
    pub(crate) fn refresh_gauges(&self) {
        for gate in self.gates() {
            gate.refresh_gauges();
        }
    }
}

impl Gate {
    pub(super) fn status(&self, now: Instant, wall: OffsetDateTime) -> Value {
        let at = |instant: Instant| {
            let t = if instant >= now {
                wall + (instant - now)
            } else {
                wall - (now - instant)
            };
            t.format(&Rfc3339).ok()
        };
        let mut state = self.lock();
        let rate_limit: Vec<Value> = state
            .limiter
            .usage(now)
            .into_iter()
            .map(|(rule, used)| {
                json!({
                    "limit": rule.limit,
                    "window_ms": rule.window.as_millis() as u64,
                    "used": used,
                })
            })
            .collect();
        let paused_until = state.pause_until.filter(|&u| u > now).and_then(at);
        let breaker = &state.breaker;
        let settings = state.aimd.settings();
        json!({
            "rate_limit": rate_limit,
            "paused_until": paused_until,
            "breaker": {
                "state": breaker.state().as_str(),
                "since": at(breaker.since()),
                "consecutive_failures": breaker.failures(),
                "cool_down_ms": breaker.cool_down().as_millis() as u64,
            },
            "concurrency": {
                "limit": state.aimd.limit(),
                "in_flight": state.aimd.in_flight(),
                "floor": settings.floor,
                "ceiling": settings.ceiling,
                "adaptive": settings.adaptive,
            },
        })
    }
}
