//! A provider's rate limit: one or more `N/<duration>` windows, each meaning
//! *at most N calls in any rolling window of that duration*, as the
//! provider counts them.
//!
//! A token bucket of burst N lets almost 2N calls into one rolling window
//! (a full bucket, then the refill), and one of burst 1 spaces calls evenly
//! and throttles the long window needlessly; `governor`'s GCRA is such a
//! bucket and cannot express the rolling rule. So each window keeps a log
//! of its N slots instead (a sliding-window log). A call holds a slot from
//! its admission until its answer (or error) arrived, and the slot frees one
//! window after that: the provider received the call somewhere between
//! admission and answer, so the next call on that slot reaches it more than
//! one window later, however the network delays either. Holding slots of
//! calls in flight wastes a little of the quota (their network time), never
//! more than the quota.

use std::{collections::VecDeque, fmt, time::Duration};

use tokio::time::Instant;

/// More windows than any provider documents is a typo.
const MAX_WINDOWS: usize = 8;
/// Each slot costs a timestamp; this bounds the log's memory (8 MB).
const MAX_CALLS: u32 = 1_000_000;
/// A window longer than a day is not a rate limit any provider documents.
const MAX_WINDOW: Duration = Duration::from_secs(24 * 60 * 60);

/// One `N/<duration>` rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Window {
    pub(crate) limit: u32,
    pub(crate) window: Duration,
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}ms", self.limit, self.window.as_millis())
    }
}

/// Parses `APPROVAL_PROVIDERS__<P>__RATE_LIMIT`: comma-separated windows;
/// empty, `none` or `off` means no limit. The error never quotes the value.
pub(crate) fn parse(value: &str) -> Result<Vec<Window>, String> {
    let value = value.trim();
    if value.is_empty() || value.eq_ignore_ascii_case("none") || value.eq_ignore_ascii_case("off") {
        return Ok(Vec::new());
    }
    let entries: Vec<&str> = value.split(',').map(str::trim).collect();
    if entries.len() > MAX_WINDOWS {
        return Err(format!("expected at most {MAX_WINDOWS} windows"));
    }
    entries
        .iter()
        .enumerate()
        .map(|(i, entry)| {
            window(entry).ok_or_else(|| {
                format!(
                    "expected comma-separated N/<duration> windows such as 1000/10s,10000/10m \
                     (N from 1 to {MAX_CALLS}, a duration in ms, s, m or h up to 24h), or none; \
                     entry {} of {} is not one",
                    i + 1,
                    entries.len()
                )
            })
        })
        .collect()
}

fn window(entry: &str) -> Option<Window> {
    let (limit, duration) = entry.split_once('/')?;
    let limit: u32 = limit
        .trim()
        .parse()
        .ok()
        .filter(|n| (1..=MAX_CALLS).contains(n))?;
    let duration = duration.trim();
    let split = duration.find(|c: char| !c.is_ascii_digit())?;
    let (count, unit) = duration.split_at(split);
    let count: u64 = count.parse().ok()?;
    let unit = match unit {
        "ms" => Duration::from_millis(1),
        "s" => Duration::from_secs(1),
        "m" => Duration::from_secs(60),
        "h" => Duration::from_secs(3600),
        _ => return None,
    };
    let window = unit.checked_mul(u32::try_from(count).ok()?)?;
    (!window.is_zero() && window <= MAX_WINDOW).then_some(Window { limit, window })
}

/// The slot log of every window of one provider.
#[derive(Debug)]
pub(crate) struct Limiter {
    logs: Vec<Log>,
}

#[derive(Debug)]
struct Log {
    rule: Window,
    /// Slots held by calls admitted and not yet answered (reservations
    /// included).
    held: usize,
    /// When each slot of an answered call frees, oldest first.
    frees_at: VecDeque<Instant>,
}

impl Log {
    fn forget_freed(&mut self, now: Instant) {
        while self.frees_at.front().is_some_and(|&t| t <= now) {
            self.frees_at.pop_front();
        }
    }

    fn used(&self) -> usize {
        self.held + self.frees_at.len()
    }
}

/// What a call took from each window: `None` a free slot, `Some(t)` the
/// slot of an earlier call that frees at `t`.
#[derive(Debug, Default)]
pub(crate) struct Reservation {
    taken: Vec<Option<Instant>>,
    /// When the call may start.
    pub(crate) at: Option<Instant>,
}

/// Why no slot can be reserved now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Full {
    /// The earliest slot frees in this long (over the caller's bound).
    For(Duration),
    /// Every slot is held by a call in flight: one frees a window after
    /// the first of them ends, so at least this long.
    InFlight(Duration),
}

impl Limiter {
    pub(crate) fn new(rules: &[Window]) -> Self {
        Self {
            logs: rules
                .iter()
                .map(|&rule| Log {
                    rule,
                    held: 0,
                    frees_at: VecDeque::new(),
                })
                .collect(),
        }
    }

    pub(crate) fn is_unlimited(&self) -> bool {
        self.logs.is_empty()
    }

    /// Reserves a slot in every window if the call can start within
    /// `max_wait`: at once where a slot is free, else on the earliest slot
    /// to free. All or nothing.
    pub(crate) fn reserve(
        &mut self,
        now: Instant,
        max_wait: Duration,
    ) -> Result<Reservation, Full> {
        let mut start = now;
        for log in &mut self.logs {
            log.forget_freed(now);
            if log.used() < log.rule.limit as usize {
                continue;
            }
            match log.frees_at.front() {
                Some(&t) => start = start.max(t),
                None => return Err(Full::InFlight(log.rule.window)),
            }
        }
        if start - now > max_wait {
            return Err(Full::For(start - now));
        }
        let taken = self
            .logs
            .iter_mut()
            .map(|log| {
                log.held += 1;
                if log.used() > log.rule.limit as usize {
                    log.frees_at.pop_front()
                } else {
                    None
                }
            })
            .collect();
        Ok(Reservation {
            taken,
            at: Some(start),
        })
    }

    /// The reserved call was made and answered (or abandoned after it may
    /// have been sent) at `now`: its slots free one window later.
    pub(crate) fn finished(&mut self, reservation: &mut Reservation, now: Instant) {
        if reservation.at.take().is_none() {
            return;
        }
        for log in &mut self.logs {
            log.held -= 1;
            log.frees_at.push_back(now + log.rule.window);
        }
    }

    /// The reserved call was never made: each slot goes back as it was.
    pub(crate) fn cancel(&mut self, reservation: &mut Reservation) {
        if reservation.at.take().is_none() {
            return;
        }
        for (log, taken) in self.logs.iter_mut().zip(reservation.taken.drain(..)) {
            log.held -= 1;
            if let Some(t) = taken {
                let at = log.frees_at.partition_point(|&x| x <= t);
                log.frees_at.insert(at, t);
            }
        }
    }

    /// Each window's rule and slots in use now.
    pub(crate) fn usage(&mut self, now: Instant) -> Vec<(Window, usize)> {
        self.logs
            .iter_mut()
            .map(|log| {
                log.forget_freed(now);
                (log.rule, log.used())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(limit: u32, ms: u64) -> Window {
        Window {
            limit,
            window: Duration::from_millis(ms),
        }
    }

    #[test]
    fn parses_windows_and_refuses_nonsense() {
        assert_eq!(
            parse("1000/10s, 10000/10m").unwrap(),
            vec![rule(1000, 10_000), rule(10_000, 600_000)]
        );
        assert_eq!(
            parse("5/250ms,2/1h").unwrap(),
            vec![rule(5, 250), rule(2, 3_600_000)]
        );
        for off in ["", "  ", "none", "OFF"] {
            assert_eq!(parse(off).unwrap(), vec![], "{off:?}");
        }
        for bad in [
            "0/1s",
            "5/0s",
            "5",
            "5/s",
            "5/10",
            "5/10d",
            "-1/1s",
            "5/1.5s",
            "1/25h",
            "2000000/1s",
            "5/1s,",
            "5/99999999999999999999s",
            "1/1s,1/1s,1/1s,1/1s,1/1s,1/1s,1/1s,1/1s,1/1s",
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
        let err = parse("5/1s,x").unwrap_err();
        assert!(err.contains("entry 2 of 2"), "{err}");
    }

    /// Calls at t = 0, 0.5 and 0.9 s, each answered 100 ms later, fill
    /// 3/1s: the fourth may start only when the first's slot frees, one
    /// second after its answer (t = 1.1 s), not one second after its start.
    #[tokio::test(start_paused = true)]
    async fn the_fourth_call_waits_for_the_first_answer_plus_the_window() {
        let t0 = Instant::now();
        let mut limiter = Limiter::new(&[rule(3, 1000)]);
        let wait = Duration::from_secs(5);
        let ms = |n| Duration::from_millis(n);
        let mut calls = Vec::new();
        for start in [0, 500, 900] {
            let mut r = limiter.reserve(t0 + ms(start), wait).unwrap();
            assert_eq!(r.at, Some(t0 + ms(start)), "a free slot starts at once");
            calls.push((start, r.at.unwrap()));
            limiter.finished(&mut r, t0 + ms(start + 100));
        }
        let fourth = limiter.reserve(t0 + ms(950), wait).unwrap();
        assert_eq!(fourth.at, Some(t0 + ms(1100)));
        // The fifth gets the second call's slot (answered at 0.6 s).
        let fifth = limiter.reserve(t0 + ms(950), wait).unwrap();
        assert_eq!(fifth.at, Some(t0 + ms(1600)));
        // Beyond the caller's bound: how long it would be, nothing taken.
        assert_eq!(
            limiter.reserve(t0 + ms(950), ms(500)).unwrap_err(),
            Full::For(ms(1050))
        );
        assert_eq!(limiter.usage(t0 + ms(950))[0].1, 3);
    }

    #[tokio::test(start_paused = true)]
    async fn slots_of_calls_in_flight_free_only_after_their_answer() {
        let now = Instant::now();
        let mut limiter = Limiter::new(&[rule(2, 1000)]);
        let wait = Duration::from_secs(10);
        let mut a = limiter.reserve(now, wait).unwrap();
        let _b = limiter.reserve(now, wait).unwrap();
        let later = now + Duration::from_secs(30);
        assert_eq!(
            limiter.reserve(later, wait).unwrap_err(),
            Full::InFlight(Duration::from_secs(1))
        );
        limiter.finished(&mut a, later);
        let c = limiter.reserve(later, wait).unwrap();
        assert_eq!(c.at, Some(later + Duration::from_secs(1)));
    }

    #[tokio::test(start_paused = true)]
    async fn a_cancelled_reservation_gives_its_slots_back_and_all_windows_count() {
        let now = Instant::now();
        let mut limiter = Limiter::new(&[rule(2, 1000), rule(3, 10_000)]);
        let wait = Duration::from_secs(60);
        for _ in 0..2 {
            let mut r = limiter.reserve(now, wait).unwrap();
            limiter.finished(&mut r, now);
        }
        // The short window is full until 1 s; the long one has one slot.
        let mut third = limiter.reserve(now, wait).unwrap();
        assert_eq!(third.at, Some(now + Duration::from_secs(1)));
        limiter.cancel(&mut third);
        let mut again = limiter.reserve(now, wait).unwrap();
        assert_eq!(again.at, Some(now + Duration::from_secs(1)));
        limiter.finished(&mut again, now + Duration::from_secs(1));
        // Now the long window is full: its first slot frees at 10 s.
        let fourth = limiter.reserve(now + Duration::from_secs(2), wait).unwrap();
        assert_eq!(fourth.at, Some(now + Duration::from_secs(10)));
        assert_eq!(
            limiter
                .usage(now + Duration::from_secs(2))
                .iter()
                .map(|u| u.1)
                .collect::<Vec<_>>(),
            vec![1, 3],
            "the fourth holds a slot in each"
        );
    }

    /// The rolling rule as the provider sees it, over a random schedule:
    /// calls arrive at random, wait for their slot, reach the provider at a
    /// random moment of their flight and are answered later; no window
    /// [t, t + w) at the provider ever holds more than N of them.
    #[tokio::test(start_paused = true)]
    async fn no_rolling_window_ever_holds_more_than_n_calls() {
        use rand::{Rng, SeedableRng, rngs::StdRng};
        for seed in 0..20u64 {
            let mut rng = StdRng::seed_from_u64(seed);
            let (n, w) = (rng.gen_range(1..8u32), rng.gen_range(50..2000u64));
            let rules = [rule(n, w), rule(n * 3, w * 5)];
            let mut limiter = Limiter::new(&rules);
            let t0 = Instant::now();
            let mut now = t0;
            // Calls in flight, with when each is answered.
            let mut pending: Vec<(Reservation, Instant)> = Vec::new();
            let mut arrivals = Vec::new();
            for _ in 0..400 {
                now += Duration::from_millis(rng.gen_range(0..w / 4 + 1));
                // Answer the calls whose answer time passed, in order.
                pending.sort_by_key(|p| p.1);
                pending.retain_mut(|(r, answer)| {
                    if *answer <= now {
                        limiter.finished(r, *answer);
                        false
                    } else {
                        true
                    }
                });
                match limiter.reserve(now, Duration::from_millis(w * 10)) {
                    Ok(r) => {
                        let start = r.at.unwrap();
                        let flight = Duration::from_millis(rng.gen_range(0..w));
                        let arrival = start + flight.mul_f64(rng.gen_range(0.0..=1.0));
                        arrivals.push(arrival);
                        pending.push((r, start + flight));
                    }
                    Err(_) => {
                        // Nobody can start: let the earliest call answer.
                        if let Some(first) = pending.first() {
                            now = now.max(first.1);
                        }
                    }
                }
            }
            arrivals.sort();
            for rule in rules {
                for (i, &a) in arrivals.iter().enumerate() {
                    let within = arrivals[i..]
                        .iter()
                        .take_while(|&&b| b < a + rule.window)
                        .count();
                    assert!(
                        within <= rule.limit as usize,
                        "seed {seed}: {within} calls within {rule} from {:?}",
                        a - t0
                    );
                }
            }
            assert!(arrivals.len() > 40, "seed {seed}: the schedule ran calls");
        }
    }
}
