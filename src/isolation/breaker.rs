//! A provider's circuit breaker: closed until a run of failures (transport
//! errors, timeouts, 5xx) opens it; open, no call for a cool-down; then
//! half-open, one probe call: its success closes the breaker, its failure
//! opens it again for a longer cool-down (doubled, capped).
//!
//! Each transition starts a new generation. A call reports its result with
//! the generation it was admitted in, so the answers of calls sent before
//! the breaker opened cannot close or reopen it later: only the probe
//! speaks for a half-open breaker.

use std::time::Duration;

use tokio::time::Instant;

#[derive(Debug, Clone, Copy)]
pub(crate) struct BreakerSettings {
    /// Consecutive failures that open the breaker.
    pub(crate) failures: u32,
    pub(crate) cool_down: Duration,
    pub(crate) max_cool_down: Duration,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    Closed,
    HalfOpen,
    Open,
}

impl State {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::HalfOpen => "half_open",
            State::Open => "open",
        }
    }

    /// The gauge's value: 0 closed, 1 half-open, 2 open.
    pub(crate) fn gauge(self) -> f64 {
        match self {
            State::Closed => 0.0,
            State::HalfOpen => 1.0,
            State::Open => 2.0,
        }
    }
}

/// What a call's answer tells the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// The provider answered (any status but 5xx, 429 included).
    Up,
    /// A transport error, a timeout or a 5xx.
    Down,
    /// Nothing was learnt (nothing sent, or the call was abandoned).
    Unknown,
}

/// A call let through: in which generation, and whether it is the probe.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Ticket {
    generation: u64,
    pub(crate) probe: bool,
}

#[derive(Debug)]
pub(crate) struct Breaker {
    settings: BreakerSettings,
    state: State,
    generation: u64,
    /// Consecutive failures while closed.
    failures: u32,
    /// While open: until when.
    open_until: Instant,
    /// While half-open: the probe is out.
    probing: bool,
    cool_down: Duration,
    since: Instant,
}

/// A change of state, for the caller to log and count.
pub(crate) type Transition = (State, State);

impl Breaker {
    pub(crate) fn new(settings: BreakerSettings, now: Instant) -> Self {
        Self {
            settings,
            state: State::Closed,
            generation: 0,
            failures: 0,
            open_until: now,
            probing: false,
            cool_down: settings.cool_down,
            since: now,
        }
    }

    pub(crate) fn state(&self) -> State {
        self.state
    }

    pub(crate) fn since(&self) -> Instant {
        self.since
    }

    pub(crate) fn failures(&self) -> u32 {
        self.failures
    }

    pub(crate) fn cool_down(&self) -> Duration {
        self.cool_down
    }

    fn go(&mut self, to: State, now: Instant) -> Option<Transition> {
        let from = self.state;
        self.state = to;
        self.generation += 1;
        self.since = now;
        self.failures = 0;
        self.probing = false;
        if to == State::Open {
            self.open_until = now + self.cool_down;
        }
        Some((from, to))
    }

    /// Lets a call through, or says how long to stay away.
    pub(crate) fn admit(&mut self, now: Instant) -> (Result<Ticket, Duration>, Option<Transition>) {
        let mut transition = None;
        if self.state == State::Open {
            if now < self.open_until {
                return (Err(self.open_until - now), None);
            }
            transition = self.go(State::HalfOpen, now);
        }
        let ticket = match self.state {
            State::Closed => Ok(Ticket {
                generation: self.generation,
                probe: false,
            }),
            // The probe is out: the others come back when it may have
            // answered (it takes at most the call timeout).
            State::HalfOpen if self.probing => Err(self.cool_down.min(Duration::from_secs(1))),
            State::HalfOpen => {
                self.probing = true;
                Ok(Ticket {
                    generation: self.generation,
                    probe: true,
                })
            }
            State::Open => unreachable!("an open breaker past its cool-down is half-open"),
        };
        (ticket, transition)
    }

    /// Whether `ticket` is of the current generation (no transition since).
    pub(crate) fn is_current(&self, ticket: Ticket) -> bool {
        ticket.generation == self.generation
    }

    /// The answer of a call admitted with `ticket`.
    pub(crate) fn record(
        &mut self,
        ticket: Ticket,
        verdict: Verdict,
        now: Instant,
    ) -> Option<Transition> {
        if ticket.generation != self.generation {
            return None;
        }
        match (self.state, verdict) {
            (State::Closed, Verdict::Up) => {
                self.failures = 0;
                None
            }
            (State::Closed, Verdict::Down) => {
                self.failures += 1;
                if self.failures >= self.settings.failures {
                    self.go(State::Open, now)
                } else {
                    None
                }
            }
            (State::HalfOpen, Verdict::Up) if ticket.probe => {
                self.cool_down = self.settings.cool_down;
                self.go(State::Closed, now)
            }
            (State::HalfOpen, Verdict::Down) if ticket.probe => {
                self.cool_down = self
                    .cool_down
                    .saturating_mul(2)
                    .min(self.settings.max_cool_down);
                self.go(State::Open, now)
            }
            (State::HalfOpen, Verdict::Unknown) if ticket.probe => {
                // Another call may probe.
                self.probing = false;
                None
            }
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn breaker(now: Instant) -> Breaker {
        Breaker::new(
            BreakerSettings {
                failures: 3,
                cool_down: Duration::from_secs(10),
                max_cool_down: Duration::from_secs(25),
            },
            now,
        )
    }

    fn admit(b: &mut Breaker, now: Instant) -> Result<Ticket, Duration> {
        b.admit(now).0
    }

    #[tokio::test(start_paused = true)]
    async fn opens_after_the_run_probes_after_the_cool_down_and_closes_on_success() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = breaker(t0);
        // A 4xx-like answer between failures breaks the run.
        for verdict in [Verdict::Down, Verdict::Down, Verdict::Up, Verdict::Down] {
            let t = admit(&mut b, t0).unwrap();
            assert_eq!(b.record(t, verdict, t0), None);
        }
        let tickets: Vec<_> = (0..3).map(|_| admit(&mut b, t0).unwrap()).collect();
        assert_eq!(b.record(tickets[0], Verdict::Down, t0), None);
        assert_eq!(
            b.record(tickets[1], Verdict::Down, t0),
            Some((State::Closed, State::Open))
        );
        // An answer of a call sent before it opened changes nothing.
        assert_eq!(b.record(tickets[2], Verdict::Up, t0), None);
        assert_eq!(b.state(), State::Open);
        assert_eq!(admit(&mut b, t0 + s(4)).unwrap_err(), s(6));

        let (probe, transition) = b.admit(t0 + s(10));
        let probe = probe.unwrap();
        assert!(probe.probe);
        assert_eq!(transition, Some((State::Open, State::HalfOpen)));
        assert_eq!(admit(&mut b, t0 + s(10)).unwrap_err(), s(1), "one probe");
        assert_eq!(
            b.record(probe, Verdict::Up, t0 + s(11)),
            Some((State::HalfOpen, State::Closed))
        );
        assert!(!admit(&mut b, t0 + s(11)).unwrap().probe);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_probe_reopens_for_longer_up_to_the_cap() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut b = breaker(t0);
        for _ in 0..3 {
            let t = admit(&mut b, t0).unwrap();
            b.record(t, Verdict::Down, t0);
        }
        let mut now = t0;
        for expected in [s(20), s(25), s(25)] {
            now += b.cool_down();
            let probe = admit(&mut b, now).unwrap();
            assert_eq!(
                b.record(probe, Verdict::Down, now),
                Some((State::HalfOpen, State::Open))
            );
            assert_eq!(b.cool_down(), expected);
            assert_eq!(admit(&mut b, now).unwrap_err(), expected);
        }
        // A probe abandoned without an answer lets another probe.
        now += b.cool_down();
        let probe = admit(&mut b, now).unwrap();
        assert_eq!(b.record(probe, Verdict::Unknown, now), None);
        let second = admit(&mut b, now).unwrap();
        assert!(second.probe);
        b.record(second, Verdict::Up, now);
        assert_eq!(b.state(), State::Closed);
        assert_eq!(b.cool_down(), s(10), "success resets the cool-down");
    }
}
