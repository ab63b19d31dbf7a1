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

/// Exponential backoff with full jitter, bounded by the configured range.
#[derive(Debug, Clone, Copy)]
pub struct RetryDelays {
    pub initial: Duration,
    pub max: Duration,
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
        d.min(self.max)
    }

    /// Full jitter below the ceiling; a provider's `Retry-After` is a floor
    /// that may exceed the configured maximum (the provider asked for it).
    pub fn delay(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let ceiling = self.ceiling(attempt);
        let jittered = Duration::from_millis(
            rand::thread_rng().gen_range(0..=ceiling.as_millis().min(u64::MAX as u128) as u64),
        );
        match retry_after {
            Some(asked) => asked.max(jittered),
            None => jittered,
        }
    }
}

/// Reads `Retry-After` (seconds or HTTP date), then `X-RateLimit-Reset`
/// (seconds to wait, or a Unix time when it is larger than a day).
pub fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    if let Some(v) = header("retry-after") {
        if let Ok(secs) = v.parse::<u64>() {
            return Some(Duration::from_secs(secs));
        }
        if let Ok(secs) = v.parse::<f64>()
            && secs.is_finite()
            && secs >= 0.0
        {
            return Some(Duration::from_secs_f64(secs));
        }
        if let Ok(when) = httpdate::parse_http_date(v) {
            return Some(when.duration_since(SystemTime::now()).unwrap_or_default());
        }
    }
    if let Some(v) = header("x-ratelimit-reset")
        && let Ok(n) = v.parse::<u64>()
    {
        if n > 86_400 {
            let now = SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_secs();
            return Some(Duration::from_secs(n.saturating_sub(now)));
        }
        return Some(Duration::from_secs(n));
    }
    None
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
}
