//! Adaptive concurrency, in the spirit of Vector's adaptive request
//! concurrency: additive increase, multiplicative decrease (AIMD) of the
//! calls a provider may have in flight, judged once per window of about one
//! round trip.
//!
//! A window ends once it lasted the baseline round trip (its moving
//! average) and saw an answer. It shrinks the limit (times `decrease`)
//! when it saw pushback (429/420, 5xx, a transport error or timeout) or
//! when its mean round trip rose above `latency_rise` times the baseline;
//! otherwise, if the limit was reached during it, the limit grows: doubling
//! until the first decrease (a slow start, so a fresh worker reaches a fast
//! provider's pace in a few round trips), then by one.

use std::time::Duration;

use tokio::time::Instant;

/// Windows never end sooner: below this a provider's round trips are the
/// worker's own scheduling noise.
const MIN_WINDOW: Duration = Duration::from_millis(10);
/// Weight of the newest window in the baseline round trip.
const BASELINE_WEIGHT: f64 = 0.25;

#[derive(Debug, Clone, Copy)]
pub(crate) struct AimdSettings {
    pub(crate) floor: usize,
    pub(crate) ceiling: usize,
    pub(crate) initial: usize,
    /// Factor applied on a decrease, in (0, 1).
    pub(crate) decrease: f64,
    /// A window's mean round trip above the baseline times this is a rise.
    pub(crate) latency_rise: f64,
    /// ... and above the baseline plus this: a smaller rise is not worth
    /// what shrinking costs (each decision refused waits a second in a
    /// retry tier), and a worker short of CPU shows such rises by itself.
    pub(crate) latency_slack: Duration,
    /// Off: the limit stays at the ceiling.
    pub(crate) adaptive: bool,
}

#[derive(Debug)]
pub(crate) struct Aimd {
    settings: AimdSettings,
    limit: usize,
    in_flight: usize,
    slow_start: bool,
    baseline: Option<Duration>,
    window_start: Instant,
    rtt_sum: Duration,
    rtt_count: u32,
    pushback: bool,
    at_limit: bool,
}

/// What one call's answer tells the controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Signal {
    /// Answered in this round trip, without pushback.
    Answered(Duration),
    /// 429/420, 5xx, a transport error or a timeout.
    Pushback,
    /// Nothing learnt (nothing sent, or abandoned).
    None,
}

impl Aimd {
    pub(crate) fn new(settings: AimdSettings, now: Instant) -> Self {
        let limit = if settings.adaptive {
            settings.initial.clamp(settings.floor, settings.ceiling)
        } else {
            settings.ceiling
        };
        Self {
            settings,
            limit,
            in_flight: 0,
            slow_start: true,
            baseline: None,
            window_start: now,
            rtt_sum: Duration::ZERO,
            rtt_count: 0,
            pushback: false,
            at_limit: false,
        }
    }

    pub(crate) fn limit(&self) -> usize {
        self.limit
    }

    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub(crate) fn settings(&self) -> &AimdSettings {
        &self.settings
    }

    /// Takes a place if one is free.
    pub(crate) fn try_start(&mut self) -> bool {
        if self.in_flight >= self.limit {
            self.at_limit = true;
            return false;
        }
        self.in_flight += 1;
        if self.in_flight >= self.limit {
            self.at_limit = true;
        }
        true
    }

    /// A call ends; returns whether the limit grew (waiters may go).
    pub(crate) fn finish(&mut self, signal: Signal, now: Instant) -> bool {
        self.in_flight -= 1;
        if !self.settings.adaptive {
            return false;
        }
        match signal {
            Signal::Answered(rtt) => {
                self.rtt_sum += rtt;
                self.rtt_count += 1;
            }
            Signal::Pushback => self.pushback = true,
            Signal::None => {}
        }
        self.adjust(now)
    }

    fn adjust(&mut self, now: Instant) -> bool {
        let length = self.baseline.unwrap_or(MIN_WINDOW).max(MIN_WINDOW);
        if now.duration_since(self.window_start) < length || (self.rtt_count == 0 && !self.pushback)
        {
            return false;
        }
        let mean = (self.rtt_count > 0).then(|| self.rtt_sum / self.rtt_count);
        let rose = match (mean, self.baseline) {
            (Some(mean), Some(base)) => {
                mean > base.mul_f64(self.settings.latency_rise)
                    && mean > base + self.settings.latency_slack
            }
            _ => false,
        };
        let before = self.limit;
        if self.pushback || rose {
            let shrunk = (self.limit as f64 * self.settings.decrease).floor() as usize;
            self.limit = shrunk.max(self.settings.floor);
            self.slow_start = false;
        } else if self.at_limit {
            let grown = if self.slow_start {
                self.limit.saturating_mul(2)
            } else {
                self.limit + 1
            };
            self.limit = grown.min(self.settings.ceiling);
        }
        if let (Some(mean), false) = (mean, self.pushback) {
            self.baseline = Some(match self.baseline {
                None => mean,
                Some(base) => base.mul_f64(1.0 - BASELINE_WEIGHT) + mean.mul_f64(BASELINE_WEIGHT),
            });
        }
        self.window_start = now;
        self.rtt_sum = Duration::ZERO;
        self.rtt_count = 0;
        self.pushback = false;
        self.at_limit = self.in_flight >= self.limit;
        self.limit > before
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aimd(now: Instant) -> Aimd {
        Aimd::new(
            AimdSettings {
                floor: 2,
                ceiling: 40,
                initial: 4,
                decrease: 0.5,
                latency_rise: 2.0,
                latency_slack: Duration::from_millis(10),
                adaptive: true,
            },
            now,
        )
    }

    /// Runs one window at the limit: every place taken, then each call
    /// answered with round trip `rtt` (or with pushback), the last one as
    /// the window ends, so the window holds exactly these answers.
    fn window(a: &mut Aimd, now: &mut Instant, rtt: Duration, pushback: bool) {
        let n = a.limit();
        for _ in 0..n {
            assert!(a.try_start());
        }
        assert!(!a.try_start(), "the limit holds");
        let length = a.baseline.unwrap_or_default().max(MIN_WINDOW);
        let signal = if pushback {
            Signal::Pushback
        } else {
            Signal::Answered(rtt)
        };
        let end = *now + length;
        *now = end - Duration::from_millis(1);
        for _ in 1..n {
            assert!(!a.finish(signal, *now) || n == 1);
        }
        *now = end;
        a.finish(signal, *now);
    }

    #[tokio::test(start_paused = true)]
    async fn grows_fast_then_halves_on_pushback_and_then_grows_by_one() {
        let mut now = Instant::now();
        let mut a = aimd(now);
        let rtt = Duration::from_millis(50);
        let mut limits = vec![a.limit()];
        for _ in 0..5 {
            window(&mut a, &mut now, rtt, false);
            limits.push(a.limit());
        }
        assert_eq!(
            limits,
            vec![4, 8, 16, 32, 40, 40],
            "slow start to the ceiling"
        );
        window(&mut a, &mut now, rtt, true);
        assert_eq!(a.limit(), 20);
        window(&mut a, &mut now, rtt, true);
        assert_eq!(a.limit(), 10);
        window(&mut a, &mut now, rtt, false);
        window(&mut a, &mut now, rtt, false);
        assert_eq!(a.limit(), 12, "additive after the first decrease");
        for _ in 0..10 {
            window(&mut a, &mut now, rtt, true);
        }
        assert_eq!(a.limit(), 2, "never below the floor");
        assert_eq!(a.in_flight(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn shrinks_when_latency_rises_with_load_and_grows_back_when_it_recovers() {
        let mut now = Instant::now();
        let mut a = aimd(now);
        let fast = Duration::from_millis(40);
        window(&mut a, &mut now, fast, false);
        window(&mut a, &mut now, fast, false);
        assert_eq!(a.limit(), 16);
        // Latency grows with load: the window at 16 takes five times longer.
        window(&mut a, &mut now, fast * 5, false);
        assert_eq!(a.limit(), 8);
        // The baseline moved up a little; back at 40 ms nothing shrinks.
        for _ in 0..4 {
            window(&mut a, &mut now, fast, false);
        }
        assert_eq!(a.limit(), 12);
        // A rise within the slack is no rise.
        window(&mut a, &mut now, fast + Duration::from_millis(5), false);
        assert_eq!(a.limit(), 13);
    }

    #[tokio::test(start_paused = true)]
    async fn a_limit_not_reached_does_not_grow_and_fixed_stays_at_the_ceiling() {
        let mut now = Instant::now();
        let mut a = aimd(now);
        for _ in 0..5 {
            assert!(a.try_start());
            now += Duration::from_millis(20);
            a.finish(Signal::Answered(Duration::from_millis(20)), now);
        }
        assert_eq!(a.limit(), 4, "one call at a time never reaches 4");

        let mut fixed = Aimd::new(
            AimdSettings {
                adaptive: false,
                ..*a.settings()
            },
            now,
        );
        assert_eq!(fixed.limit(), 40);
        window(&mut fixed, &mut now, Duration::from_millis(20), true);
        assert_eq!(fixed.limit(), 40);
    }
}
