//! Error classes of a provider call, and the one place retry delays are
//! computed.
//!
//! The `backoff` crate is the product owner's choice; it is unmaintained
//! upstream (RUSTSEC-2025-0012), so it is used here and nowhere else: it
//! yields the exponential ceiling, and we draw full jitter below it.

use std::time::{Duration, SystemTime};

use backoff::backoff::Backoff as _;
use rand::Rng;
use reqwest::header::HeaderMap;
use serde_json::Value;

/// How the worker must treat a failed provider call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Nothing was applied (connect error, 5xx, 429 or a provider's own
    /// rate-limit status): call again.
    Retryable,
    /// The request may have reached the provider (timeout or reset after
    /// sending, an unexpected 4xx such as "not pending"): read the target's
    /// state before deciding.
    Ambiguous,
    /// Credentials refused even after one refresh: fail, never hammer.
    Auth,
    /// The provider refused this decision for good.
    Permanent,
    /// What the provider asked us to sign or confirm is not what the
    /// decision decides (another action, another request): nothing was
    /// signed or sent, and nothing ever will be for this decision.
    ChallengeMismatch,
    /// The client refused to call at all (nothing was sent): its provider
    /// cannot be used for now (a revoked OAuth grant, a tripped breaker).
    /// The decision waits in a retry tier without spending an attempt, at
    /// least `retry_after` when given.
    Unavailable,
}

/// The `provider_code` of an [`ErrorClass::Unavailable`] refusal whose
/// cause is the credentials (a revoked OAuth grant, an empty token store,
/// a run of 401s): a decision still held when the retry horizon passes is
/// parked `unauthorized`, not `exhausted`.
pub const CREDENTIALS_UNUSABLE: &str = "credentials_unusable";

impl ErrorClass {
    /// A failure that may pass by itself: what it left unknown is asked
    /// again later rather than settled now.
    pub fn is_transient(self) -> bool {
        matches!(self, Self::Retryable | Self::Ambiguous | Self::Unavailable)
    }
}

/// One failed provider call, with what the outcome event needs to report it.
/// Messages are built from provider answers and our own text only, never
/// from request headers, so they cannot carry a credential.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{message}")]
pub struct CallError {
    pub class: ErrorClass,
    pub message: String,
    pub http_status: Option<u16>,
    pub provider_code: Option<String>,
    pub retry_after: Option<Duration>,
    pub response: Option<Value>,
}

impl CallError {
    pub fn new(class: ErrorClass, message: impl Into<String>) -> Self {
        Self {
            class,
            message: message.into(),
            http_status: None,
            provider_code: None,
            retry_after: None,
            response: None,
        }
    }

    /// Classifies a transport error: failing before the request was written
    /// is safe to retry; a timeout or reset afterwards is ambiguous.
    pub fn from_transport(operation: &str, err: &reqwest::Error) -> Self {
        let class = if err.is_connect() {
            ErrorClass::Retryable
        } else {
            ErrorClass::Ambiguous
        };
        let what = if err.is_timeout() {
            "timed out"
        } else if err.is_connect() {
            "could not connect"
        } else {
            "failed in transit"
        };
        // reqwest's Display includes the URL, which holds no secret here, but
        // keep the message short and free of query strings.
        Self::new(class, format!("{operation} {what}"))
    }
}

/// The longest wait a provider header is believed for, before the retry
/// horizon clamps it further: anything longer is a misread unit or garbage,
/// and a `Duration` that large overflows every later sum.
pub const MAX_PROVIDER_DELAY: Duration = Duration::from_secs(24 * 60 * 60);

/// Exponential backoff with full jitter, bounded by the configured range;
/// no delay ever exceeds `horizon`.
#[derive(Debug, Clone, Copy)]
pub struct RetryDelays {
    pub initial: Duration,
    pub max: Duration,
    /// Nothing waits longer than this, whatever a provider asks.
    pub horizon: Duration,
}

impl RetryDelays {
    /// The ceiling for the wait after the `attempt`-th call (1-based).
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let mut policy = backoff::ExponentialBackoffBuilder::new()
            .with_initial_interval(self.initial)
            .with_randomization_factor(0.0)
            .with_multiplier(2.0)
            .with_max_interval(self.max)
            .with_max_elapsed_time(None)
            .build();
        let mut d = self.initial;
        for _ in 0..attempt.clamp(1, 64) {
            d = policy.next_backoff().unwrap_or(self.max);
        }
        d.min(self.max).min(self.horizon)
    }

    /// Full jitter below the ceiling; a provider's `Retry-After` is a floor
    /// that may exceed the configured maximum (the provider asked for it)
    /// but never the horizon.
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(attempt);
        let ceiling_ms = u64::try_from(ceiling.as_millis()).unwrap_or(u64::MAX);
        let jittered = Duration::from_millis(rand::thread_rng().gen_range(0..=ceiling_ms));
        match retry_after {
            Some(asked) => asked.min(self.horizon).max(jittered),
            None => jittered,
        }
    }
}

/// Reads `Retry-After` (seconds or HTTP date), then `X-RateLimit-Reset`
/// (seconds to wait, or a Unix time in seconds or milliseconds). A wait
/// longer than [`MAX_PROVIDER_DELAY`] is cut to it; a negative or
/// unreadable value is ignored, so the caller falls back to its backoff as
/// if the header were absent.
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    retry_after_at(headers, SystemTime::now())
}

fn retry_after_at(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    header("retry-after")
        .and_then(|v| parse_retry_after(v, now))
        .or_else(|| header("x-ratelimit-reset").and_then(|v| parse_reset(v, now)))
}

fn believable(d: Duration) -> Option<Duration> {
    Some(d.min(MAX_PROVIDER_DELAY))
}

/// Delta seconds (integer or decimal) or an HTTP date.
fn parse_retry_after(v: &str, now: SystemTime) -> Option<Duration> {
    if let Ok(secs) = v.parse::<u64>() {
        return believable(Duration::from_secs(secs));
    }
    if let Ok(secs) = v.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        // Too large for a `Duration` (1e20) is still "a long time".
        return believable(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    // A date already past means "now".
    believable(when.duration_since(now).unwrap_or_default())
}

/// Providers send the reset as seconds to wait, as Unix seconds or as Unix
/// milliseconds; the magnitude tells which (any delta under a day is far
/// below today's epoch seconds, which are far below its milliseconds).
fn parse_reset(v: &str, now: SystemTime) -> Option<Duration> {
    let n = v.parse::<u64>().ok()?;
    let since_epoch = now.duration_since(SystemTime::UNIX_EPOCH).ok()?;
    let delta = if n <= MAX_PROVIDER_DELAY.as_secs() {
        Duration::from_secs(n)
    } else if n < 100_000_000_000 {
        // Unix seconds (until the year 5138).
        Duration::from_secs(n).saturating_sub(since_epoch)
    } else {
        Duration::from_millis(n).saturating_sub(since_epoch)
    };
    believable(delta)
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    #[test]
    fn ceilings_grow_exponentially_up_to_the_max() {
        let d = RetryDelays {
            initial: Duration::from_millis(100),
            max: Duration::from_millis(1000),
            horizon: Duration::from_secs(60),
        };
        assert_eq!(d.ceiling(1), Duration::from_millis(100));
        assert_eq!(d.ceiling(2), Duration::from_millis(200));
        assert_eq!(d.ceiling(3), Duration::from_millis(400));
        assert_eq!(d.ceiling(10), Duration::from_millis(1000));
        for attempt in 1..20 {
            assert!(d.delay(attempt, None) <= d.max);
        }
    }

    #[test]
    fn retry_after_is_a_floor_even_above_the_max() {
        let d = RetryDelays {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(20),
            horizon: Duration::from_secs(60),
        };
        assert!(d.delay(1, Some(Duration::from_secs(3))) >= Duration::from_secs(3));
    }

    #[test]
    fn parses_retry_after_forms() {
        let mut h = HeaderMap::new();
        h.insert("retry-after", HeaderValue::from_static("2"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(2)));
        let mut h = HeaderMap::new();
        let future = httpdate::fmt_http_date(SystemTime::now() + Duration::from_secs(30));
        h.insert("retry-after", HeaderValue::from_str(&future).unwrap());
        let got = retry_after(&h).unwrap();
        assert!(
            got > Duration::from_secs(25) && got <= Duration::from_secs(30),
            "{got:?}"
        );
        let mut h = HeaderMap::new();
        h.insert("x-ratelimit-reset", HeaderValue::from_static("5"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(5)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    /// 2026-12-01T21:00:00Z, fixed so the epoch forms are exact.
    fn now() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_796_158_800)
    }

    fn at(pairs: &[(&'static str, &str)]) -> Option<Duration> {
        retry_after_at(&headers(pairs), now())
    }

    #[test]
    fn absurd_retry_after_values_are_cut_to_a_day() {
        for v in ["1e20", "18446744073709551615", "99999999999", "1e308"] {
            assert_eq!(at(&[("retry-after", v)]), Some(MAX_PROVIDER_DELAY), "{v}");
        }
        let far = httpdate::fmt_http_date(now() + Duration::from_secs(3_000_000_000));
        assert_eq!(at(&[("retry-after", &far)]), Some(MAX_PROVIDER_DELAY));
        assert_eq!(
            at(&[("retry-after", "1.5")]),
            Some(Duration::from_millis(1500))
        );
    }

    #[test]
    fn garbage_retry_after_is_ignored() {
        for v in ["-5", "-1e20", "NaN", "inf", "soon", ""] {
            assert_eq!(at(&[("retry-after", v)]), None, "{v}");
        }
        // Ignored, so the reset header still counts.
        assert_eq!(
            at(&[("retry-after", "-5"), ("x-ratelimit-reset", "3")]),
            Some(Duration::from_secs(3))
        );
    }

    #[test]
    fn ratelimit_reset_as_delta_epoch_seconds_or_epoch_millis() {
        let epoch = now().duration_since(SystemTime::UNIX_EPOCH).unwrap();
        let secs = (epoch.as_secs() + 7).to_string();
        let millis = (epoch.as_millis() + 2_500).to_string();
        assert_eq!(
            at(&[("x-ratelimit-reset", "7")]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            at(&[("x-ratelimit-reset", &secs)]),
            Some(Duration::from_secs(7))
        );
        assert_eq!(
            at(&[("x-ratelimit-reset", &millis)]),
            Some(Duration::from_millis(2_500))
        );
        // A reset already past means now; garbage is ignored.
        let past = (epoch.as_millis() - 10_000).to_string();
        assert_eq!(at(&[("x-ratelimit-reset", &past)]), Some(Duration::ZERO));
        assert_eq!(
            at(&[("x-ratelimit-reset", "18446744073709551615")]),
            Some(MAX_PROVIDER_DELAY)
        );
        for v in ["-1", "tomorrow", "1.5e3"] {
            assert_eq!(at(&[("x-ratelimit-reset", v)]), None, "{v}");
        }
    }

    #[test]
    fn no_delay_passes_the_horizon() {
        let d = RetryDelays {
            initial: Duration::from_secs(10),
            max: Duration::from_secs(600),
            horizon: Duration::from_secs(60),
        };
        for attempt in [1, 5, 64, u32::MAX] {
            assert!(d.delay(attempt, None) <= d.horizon);
            for asked in [Duration::MAX, MAX_PROVIDER_DELAY, Duration::from_secs(61)] {
                assert_eq!(d.delay(attempt, Some(asked)), d.horizon);
            }
        }
    }
}
