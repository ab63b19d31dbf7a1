//! Per-provider isolation: each provider's quota, outage and slowness stay
//! its own (CONTRACT v2 section 2).
//!
//! Every call the worker makes to a provider (a decision call, a state
//! read, a confirmation poll) first passes its provider's [`Gate`], in this
//! order: the provider's **pause** (a 429 or 420 that named a wait), its
//! **circuit breaker**, its **adaptive concurrency** and its **rate
//! limit**. A gate that refuses says why and how long to stay away; the
//! worker then moves the decision to a retry tier without spending an
//! attempt. The permit the gate hands out learns the call's result, which
//! feeds all four.
//!
//! Provider-agnostic and broker-agnostic: a gate knows its provider's name
//! and nothing else of it.

pub(crate) mod breaker;
pub(crate) mod concurrency;
pub(crate) mod limiter;
mod status;

use std::{
    collections::BTreeMap,
    pin::pin,
    sync::{Mutex, MutexGuard, PoisonError},
    time::Duration,
};

use tokio::{sync::Notify, time::Instant};
use tracing::{info, warn};

use breaker::{Breaker, BreakerSettings, State, Ticket, Verdict};
use concurrency::{Aimd, AimdSettings, Signal};
use limiter::{Full, Limiter, Reservation, Window};

use crate::{
    retry::{CallError, ErrorClass},
    settings::Settings,
};

/// How long a decision refused for concurrency stays away: its provider's
/// calls in flight free at the pace of their answers, and coming back
/// sooner would only hold a prefetch slot again.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// One gate's settings.
#[derive(Debug, Clone)]
pub(crate) struct GateSettings {
    /// The longest a call waits out a pause or for a place in flight.
    pub(crate) call_wait: Duration,
    /// The longest a call waits for a rate-limit slot.
    pub(crate) limiter_max_wait: Duration,
    /// The longest pause a provider's answer is believed for.
    pub(crate) max_pause: Duration,
    pub(crate) breaker: BreakerSettings,
    pub(crate) concurrency: AimdSettings,
    pub(crate) rate_limit: Vec<Window>,
}

impl GateSettings {
    pub(crate) fn from_settings(settings: &Settings, provider: &str) -> Self {
        let i = &settings.isolation;
        Self {
            call_wait: settings.worker.call_wait,
            limiter_max_wait: i.limiter_max_wait,
            max_pause: i.max_pause,
            breaker: BreakerSettings {
                failures: i.breaker_failures.get(),
                cool_down: i.breaker_cool_down,
                max_cool_down: i.breaker_max_cool_down,
            },
            concurrency: AimdSettings {
                floor: i.concurrency_floor.get(),
                ceiling: settings.worker.max_calls_per_provider.get(),
                initial: i.concurrency_initial.get(),
                decrease: i.concurrency_decrease,
                latency_rise: i.concurrency_latency_rise,
                latency_slack: i.concurrency_latency_slack,
                adaptive: i.concurrency_adaptive,
            },
            rate_limit: settings.rate_limit(provider).to_vec(),
        }
    }
}

/// One gate per provider, shared by every delivery task.
pub(crate) struct Isolation {
    gates: BTreeMap<&'static str, Gate>,
}

impl Isolation {
    pub(crate) fn new(
        settings: &Settings,
        providers: impl IntoIterator<Item = &'static str>,
    ) -> Self {
        let gates = providers
            .into_iter()
            .map(|name| {
                let gate = Gate::new(name, GateSettings::from_settings(settings, name));
                (name, gate)
            })
            .collect();
        Self { gates }
    }

    pub(crate) fn gate(&self, provider: &str) -> Option<&Gate> {
        self.gates.get(provider)
    }

    pub(crate) fn gates(&self) -> impl Iterator<Item = &Gate> {
        self.gates.values()
    }
}

/// Why a call was not let through, and how long to stay away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refusal {
    /// `paused`, `breaker_open`, `concurrency` or `rate_limit` (the
    /// `reason` label of `approval_deferrals_total`).
    pub(crate) reason: &'static str,
    pub(crate) retry_in: Duration,
}

impl Refusal {
    pub(crate) fn why(&self) -> &'static str {
        match self.reason {
            "paused" => "its provider asked for a pause",
            "breaker_open" => "its provider's circuit breaker is open",
            "concurrency" => "its provider's calls in flight stayed at their limit",
            _ => "its provider's rate limit has no slot within the wait allowed",
        }
    }
}

struct GateState {
    pause_until: Option<Instant>,
    breaker: Breaker,
    aimd: Aimd,
    limiter: Limiter,
}

/// One provider's pause, breaker, adaptive concurrency and rate limit.
pub(crate) struct Gate {
    provider: &'static str,
    settings: GateSettings,
    state: Mutex<GateState>,
    /// A place in flight freed, or the limit grew.
    place_freed: Notify,
    /// A call answered: a rate-limit slot has a time to free.
    slot_freed: Notify,
}

impl Gate {
    pub(crate) fn new(provider: &'static str, settings: GateSettings) -> Self {
        let now = Instant::now();
        let state = GateState {
            pause_until: None,
            breaker: Breaker::new(settings.breaker, now),
            aimd: Aimd::new(settings.concurrency, now),
            limiter: Limiter::new(&settings.rate_limit),
        };
        metrics::gauge!("approval_provider_breaker_state", "provider" => provider).set(0.0);
        Self {
            provider,
            settings,
            state: Mutex::new(state),
            place_freed: Notify::new(),
            slot_freed: Notify::new(),
        }
    }

    pub(crate) fn provider(&self) -> &'static str {
        self.provider
    }

    /// A poisoned lock still holds whole state (no update panics halfway).
    fn lock(&self) -> MutexGuard<'_, GateState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn refuse(&self, reason: &'static str, retry_in: Duration) -> Refusal {
        Refusal { reason, retry_in }
    }

    /// Lets one call through before `deadline`, waiting as the settings
    /// allow, or says why not. Dropping the permit (or the future) gives
    /// back what it held.
    pub(crate) async fn admit(&self, deadline: Instant) -> Result<Permit<'_>, Refusal> {
        self.wait_out_pause(deadline).await?;
        let (ticket, transition) = self.lock().breaker.admit(Instant::now());
        self.transitioned(transition);
        let ticket = ticket.map_err(|left| self.refuse("breaker_open", left))?;
        let mut permit = Permit {
            gate: self,
            ticket: Some(ticket),
            place: false,
            reservation: Reservation::default(),
            started: None,
        };
        self.take_place(&mut permit, deadline).await?;
        self.take_slot(&mut permit, deadline).await?;
        // A pause may have begun while this call waited, or the breaker
        // opened: the calls waiting then would otherwise all go out.
        self.wait_out_pause(deadline).await?;
        let renewed = {
            let mut state = self.lock();
            let current = permit.ticket.is_some_and(|t| state.breaker.is_current(t));
            (!current).then(|| state.breaker.admit(Instant::now()))
        };
        if let Some((ticket, transition)) = renewed {
            self.transitioned(transition);
            permit.ticket = Some(ticket.map_err(|left| self.refuse("breaker_open", left))?);
        }
        permit.started = Some(Instant::now());
        Ok(permit)
    }

    async fn wait_out_pause(&self, deadline: Instant) -> Result<(), Refusal> {
        loop {
            let now = Instant::now();
            let Some(until) = self.lock().pause_until.filter(|&u| u > now) else {
                return Ok(());
            };
            let left = until - now;
            if left > self.settings.call_wait || until >= deadline {
                return Err(self.refuse("paused", left));
            }
            tokio::time::sleep_until(until).await;
        }
    }

    async fn take_place(&self, permit: &mut Permit<'_>, deadline: Instant) -> Result<(), Refusal> {
        let until = (Instant::now() + self.settings.call_wait).min(deadline);
        loop {
            let mut freed = pin!(self.place_freed.notified());
            freed.as_mut().enable();
            if self.lock().aimd.try_start() {
                permit.place = true;
                return Ok(());
            }
            if tokio::time::timeout_at(until, freed).await.is_err() {
                // A wake-up taken by a caller that then left is not lost.
                if self.lock().aimd.try_start() {
                    permit.place = true;
                    return Ok(());
                }
                return Err(self.refuse("concurrency", CONCURRENCY_RETRY));
            }
        }
    }

    async fn take_slot(&self, permit: &mut Permit<'_>, deadline: Instant) -> Result<(), Refusal> {
        let started = Instant::now();
        let until = (started + self.settings.limiter_max_wait).min(deadline);
        loop {
            let mut freed = pin!(self.slot_freed.notified());
            freed.as_mut().enable();
            let now = Instant::now();
            let budget = until.saturating_duration_since(now);
            let reserved = {
                let mut state = self.lock();
                if state.limiter.is_unlimited() {
                    return Ok(());
                }
                state.limiter.reserve(now, budget)
            };
            match reserved {
                Ok(reservation) => {
                    let at = reservation.at.unwrap_or(now);
                    permit.reservation = reservation;
                    if at > now {
                        tokio::time::sleep_until(at).await;
                    }
                    let waited = Instant::now() - started;
                    if !waited.is_zero() {
                        let p = self.provider;
                        metrics::counter!("approval_provider_limiter_waits_total", "provider" => p)
                            .increment(1);
                        metrics::histogram!("approval_provider_limiter_wait_seconds", "provider" => p)
                            .record(waited.as_secs_f64());
                    }
                    return Ok(());
                }
                Err(Full::For(left)) => return Err(self.refuse("rate_limit", left)),
                Err(Full::InFlight(window)) => {
                    if window > budget || tokio::time::timeout_at(until, freed).await.is_err() {
                        return Err(self.refuse("rate_limit", window));
                    }
                }
            }
        }
    }

    fn transitioned(&self, transition: Option<breaker::Transition>) {
        let Some((from, to)) = transition else {
            return;
        };
        let provider = self.provider;
        metrics::counter!("approval_provider_breaker_transitions_total", "provider" => provider, "to" => to.as_str())
            .increment(1);
        metrics::gauge!("approval_provider_breaker_state", "provider" => provider).set(to.gauge());
        let (from, to_name) = (from.as_str(), to.as_str());
        match to {
            State::Open => {
                let cool_down_ms = self.lock().breaker.cool_down().as_millis() as u64;
                warn!(
                    provider,
                    from,
                    to = to_name,
                    cool_down_ms,
                    "circuit breaker opened: no call to this provider until the cool-down ends; its decisions wait in a retry tier"
                );
            }
            State::HalfOpen => {
                info!(
                    provider,
                    from,
                    to = to_name,
                    "circuit breaker half-open: one probe call"
                );
            }
            State::Closed => info!(provider, from, to = to_name, "circuit breaker closed"),
        }
    }

    /// Sets this provider's gauges to the state now (at each scrape: a
    /// pause ends, and an in-flight count moves, without an event).
    pub(crate) fn refresh_gauges(&self) {
        let now = Instant::now();
        let state = self.lock();
        let p = self.provider;
        let paused = state.pause_until.is_some_and(|u| u > now);
        metrics::gauge!("approval_provider_paused", "provider" => p)
            .set(f64::from(u8::from(paused)));
        metrics::gauge!("approval_provider_breaker_state", "provider" => p)
            .set(state.breaker.state().gauge());
        metrics::gauge!("approval_provider_concurrency_limit", "provider" => p)
            .set(state.aimd.limit() as f64);
        metrics::gauge!("approval_provider_in_flight", "provider" => p)
            .set(state.aimd.in_flight() as f64);
    }

    fn release(&self, permit: &mut Permit<'_>, judged: Option<Judged>) {
        let now = Instant::now();
        let Judged {
            verdict,
            signal,
            pause,
        } = judged.unwrap_or(Judged::NOTHING);
        let started = permit.started.is_some();
        let mut paused_for = None;
        let (transition, grew) = {
            let mut state = self.lock();
            if let Some(asked) = pause.filter(|d| !d.is_zero()) {
                let until = now + asked.min(self.settings.max_pause);
                if state.pause_until.is_none_or(|u| u < until) {
                    state.pause_until = Some(until);
                    paused_for = Some(until - now);
                }
            }
            let transition = permit
                .ticket
                .take()
                .and_then(|ticket| state.breaker.record(ticket, verdict, now));
            let before = state.aimd.limit();
            let grew = std::mem::take(&mut permit.place) && {
                let grew = state.aimd.finish(signal, now);
                self.place_freed.notify_one();
                grew
            };
            let limit = state.aimd.limit();
            if limit != before {
                tracing::debug!(
                    provider = self.provider,
                    before,
                    limit,
                    ?signal,
                    "concurrency limit"
                );
            }
            if started {
                // The call may have reached the provider: its slots count.
                state.limiter.finished(&mut permit.reservation, now);
            } else {
                state.limiter.cancel(&mut permit.reservation);
            }
            (transition, grew)
        };
        if grew {
            self.place_freed.notify_waiters();
        }
        self.slot_freed.notify_waiters();
        self.transitioned(transition);
        if let Some(pause) = paused_for {
            let pause_ms = pause.as_millis() as u64;
            warn!(
                provider = self.provider,
                pause_ms, "the provider asked for a pause: no call to it until then"
            );
        }
    }
}

/// What one call's result tells the gate.
#[derive(Debug, Clone, Copy)]
struct Judged {
    verdict: Verdict,
    signal: Signal,
    pause: Option<Duration>,
}

impl Judged {
    const NOTHING: Judged = Judged {
        verdict: Verdict::Unknown,
        signal: Signal::None,
        pause: None,
    };

    fn of<T>(result: &Result<T, CallError>, round_trip: Duration) -> Self {
        let answered = Judged {
            verdict: Verdict::Up,
            signal: Signal::Answered(round_trip),
            pause: None,
        };
        let down = Judged {
            verdict: Verdict::Down,
            signal: Signal::Pushback,
            pause: None,
        };
        let Err(e) = result else {
            return answered;
        };
        match (e.http_status, e.class) {
            // Nothing was sent.
            (_, ErrorClass::Unavailable) => Self::NOTHING,
            // Throttled: the provider is up, and asks for less.
            (Some(429 | 420), _) => Judged {
                verdict: Verdict::Up,
                signal: Signal::Pushback,
                pause: e.retry_after,
            },
            (Some(500..=599), _) => down,
            (Some(_), _) => answered,
            // A transport error or a timeout.
            (None, ErrorClass::Retryable | ErrorClass::Ambiguous) => down,
            // Refused before sending (a request that cannot be built, a
            // challenge that does not match): nothing learnt.
            (None, _) => Self::NOTHING,
        }
    }
}

/// A call let through its provider's gate. Record its result with
/// [`Permit::record`]; dropped unrecorded (the call was abandoned), it
/// gives back what it held and teaches nothing.
pub(crate) struct Permit<'g> {
    gate: &'g Gate,
    ticket: Option<Ticket>,
    /// Holds a place among the calls in flight.
    place: bool,
    reservation: Reservation,
    /// When the call was let go.
    started: Option<Instant>,
}

impl Permit<'_> {
    pub(crate) fn record<T>(mut self, result: &Result<T, CallError>) {
        let round_trip = self.started.map(|s| s.elapsed()).unwrap_or_default();
        let judged = Judged::of(result, round_trip);
        let gate = self.gate;
        gate.release(&mut self, Some(judged));
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.ticket.is_some() || self.place || self.reservation.at.is_some() {
            let gate = self.gate;
            gate.release(self, None);
        }
    }
}

#[cfg(test)]
mod tests;
