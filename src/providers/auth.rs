//! Bearer-token caches shared by every concurrent call to one provider.
//!
//! One token request at a time (the lock is held across the fetch, so a
//! burst of decisions causes one token call, not hundreds), refreshed ahead
//! of expiry, and invalidated only if the token that got a 401 is still the
//! cached one, so concurrent 401s cause one refresh. A failed fetch is
//! remembered briefly: the callers that queued behind it get its error
//! instead of each repeating it (each waiting its full timeout in turn).

use std::{
    future::Future,
    time::{Duration, Instant},
};

use reqwest::{RequestBuilder, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::Mutex;

use super::http::{Http, Response};
use crate::retry::CallError;

/// A token as issued, with its lifetimes.
pub struct Token {
    pub access: SecretString,
    pub expires_in: Duration,
    /// A refresh token and its lifetime, where the provider issues one.
    pub refresh: Option<(SecretString, Duration)>,
}

/// Bounds on a token lifetime as a provider states it: a lifetime beyond a
/// day is a misread unit or garbage (and `u64::MAX` seconds overflows an
/// `Instant`), and a token is kept a few seconds however short it claims
/// to live, so one answer cannot make every call fetch anew.
const MAX_TOKEN_TTL: Duration = Duration::from_secs(24 * 60 * 60);
const MIN_TOKEN_TTL: Duration = Duration::from_secs(5);

/// How long a failed fetch answers for the next ones, unless the provider
/// asked for a longer wait (bounded by [`MAX_FAILURE_MEMORY`]).
const FAILURE_MEMORY: Duration = Duration::from_secs(2);
const MAX_FAILURE_MEMORY: Duration = Duration::from_secs(30);

/// When a token issued at `now` for `ttl` dies, clamped to the bounds above.
fn expiry(now: Instant, ttl: Duration) -> Instant {
    let ttl = ttl.clamp(MIN_TOKEN_TTL, MAX_TOKEN_TTL);
    now.checked_add(ttl).unwrap_or(now)
}

/// A token lifetime in seconds as a provider sent it: a number (whole or
/// not, however large) or a numeric string. `None` for anything else
/// (negative, not a number), so the provider's default applies instead of
/// the whole token answer being refused; [`TokenCache`] clamps the rest.
pub fn lifetime(v: &Value) -> Option<Duration> {
    let secs = match v {
        Value::Number(n) => match n.as_u64() {
            Some(whole) => return Some(Duration::from_secs(whole)),
            None => n.as_f64()?,
        },
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    if !secs.is_finite() || secs < 0.0 {
        return None;
    }
    Some(Duration::try_from_secs_f64(secs).unwrap_or(Duration::MAX))
}

struct Cached {
    access: SecretString,
    expires_at: Instant,
    refresh: Option<(SecretString, Instant)>,
}

pub struct TokenCache {
    provider: &'static str,
    /// Renew this long before expiry, so a call never leaves with a token
    /// that dies in flight.
    margin: Duration,
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    token: Option<Cached>,
    /// The last fetch's failure, and until when it answers for a fetch.
    failed: Option<(CallError, Instant)>,
}

impl TokenCache {
    pub fn new(provider: &'static str, margin: Duration) -> Self {
        Self {
            provider,
            margin,
            state: Mutex::default(),
        }
    }

    /// Returns a live access token, fetching one when needed. `fetch` gets
    /// the refresh token when one is still valid, else `None` (log in again).
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<SecretString, CallError>
    where
        F: FnOnce(Option<SecretString>) -> Fut,
        Fut: Future<Output = Result<Token, CallError>>,
    {
        let mut state = self.state.lock().await;
        let now = Instant::now();
        let renew_after = now.checked_add(self.margin).unwrap_or(now);
        if let Some(c) = state.token.as_ref()
            && c.expires_at > renew_after
        {
            return Ok(c.access.clone());
        }
        if let Some((error, until)) = &state.failed
            && *until > now
        {
            return Err(error.clone());
        }
        let refresh = state
            .token
            .as_ref()
            .and_then(|c| c.refresh.as_ref())
            .filter(|(_, until)| *until > renew_after)
            .map(|(t, _)| t.clone());
        metrics::counter!("approval_token_refreshes_total", "provider" => self.provider)
            .increment(1);
        let token = match fetch(refresh).await {
            Ok(token) => token,
            Err(error) => {
                let memory = error
                    .retry_after
                    .unwrap_or_default()
                    .clamp(FAILURE_MEMORY, MAX_FAILURE_MEMORY);
                let now = Instant::now();
                state.failed = Some((error.clone(), now.checked_add(memory).unwrap_or(now)));
                return Err(error);
            }
        };
        let now = Instant::now();
        let access = token.access.clone();
        state.failed = None;
        state.token = Some(Cached {
            access: token.access,
            expires_at: expiry(now, token.expires_in),
            refresh: token.refresh.map(|(t, ttl)| (t, expiry(now, ttl))),
        });
        Ok(access)
    }

    /// Sends `operation` with a live token. A 401 means the token died
    /// early (revoked, clock skew): forget it, get another once and send
    /// once more; a 401 answers nothing was applied, so the repeat is safe
    /// without idempotency. The second answer is returned whatever it is,
    /// for the provider's `classify` (a second 401 is Auth).
    pub async fn send<F, Fut>(
        &self,
        http: &Http,
        operation: &'static str,
        fetch: F,
        request: impl Fn(&SecretString) -> RequestBuilder,
    ) -> Result<Response, CallError>
    where
        F: Fn(Option<SecretString>) -> Fut,
        Fut: Future<Output = Result<Token, CallError>>,
    {
        let token = self.get(&fetch).await?;
        let response = http.send(self.provider, operation, request(&token)).await?;
        if response.status != StatusCode::UNAUTHORIZED {
            return Ok(response);
        }
        self.invalidate(&token).await;
        let token = self.get(&fetch).await?;
        http.send(self.provider, operation, request(&token)).await
    }

    /// Forgets `stale` after the provider refused it; a newer token fetched
    /// meanwhile by another call is kept.
    pub async fn invalidate(&self, stale: &SecretString) {
        let mut state = self.state.lock().await;
        if state
            .token
            .as_ref()
            .is_some_and(|c| c.access.expose_secret() == stale.expose_secret())
            && let Some(c) = state.token.as_mut()
        {
            c.expires_at = Instant::now();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{
        Arc,
        atomic::{AtomicU32, Ordering},
    };

    fn token(n: u32, ttl: Duration) -> Token {
        Token {
            access: SecretString::from(format!("t{n}")),
            expires_in: ttl,
            refresh: Some((SecretString::from(format!("r{n}")), ttl * 6)),
        }
    }

    #[tokio::test]
    async fn concurrent_callers_share_one_fetch() {
        let cache = Arc::new(TokenCache::new("test", Duration::from_secs(1)));
        let fetches = Arc::new(AtomicU32::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let cache = cache.clone();
            let fetches = fetches.clone();
            tasks.push(tokio::spawn(async move {
                cache
                    .get(|_| async move {
                        let n = fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::task::yield_now().await;
                        Ok(token(n, Duration::from_secs(300)))
                    })
                    .await
                    .unwrap()
                    .expose_secret()
                    .to_owned()
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap(), "t0");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    /// Fifty callers behind a token endpoint that fails slowly used to
    /// fetch fifty times, one after another (fifty timeouts in a row for
    /// the last caller); now the failure answers the whole queue.
    #[tokio::test]
    async fn a_failed_fetch_answers_the_waiting_callers() {
        const SLOW: Duration = Duration::from_millis(200);
        let cache = Arc::new(TokenCache::new("test", Duration::from_secs(1)));
        let fetches = Arc::new(AtomicU32::new(0));
        let started = Instant::now();
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let (cache, fetches) = (cache.clone(), fetches.clone());
            tasks.push(tokio::spawn(async move {
                let fetch = |_| async move {
                    fetches.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(SLOW).await;
                    let class = crate::retry::ErrorClass::Retryable;
                    Err::<Token, _>(CallError::new(class, "token endpoint timed out"))
                };
                cache.get(fetch).await.is_err()
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap(), "every caller gets the error");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        // Fifty fetches in a row would take ten seconds.
        assert!(
            started.elapsed() < FAILURE_MEMORY,
            "{:?}",
            started.elapsed()
        );
    }

    #[tokio::test]
    async fn invalidate_refreshes_once_and_passes_the_refresh_token() {
        let cache = TokenCache::new("test", Duration::from_secs(1));
        let first = cache
            .get(|r| async move {
                assert!(r.is_none());
                Ok(token(0, Duration::from_secs(300)))
            })
            .await
            .unwrap();
        cache.invalidate(&first).await;
        let second = cache
            .get(|r| async move {
                assert_eq!(r.unwrap().expose_secret(), "r0");
                Ok(token(1, Duration::from_secs(300)))
            })
            .await
            .unwrap();
        assert_eq!(second.expose_secret(), "t1");
        // A late 401 for the old token must not throw away the new one.
        cache.invalidate(&first).await;
        let third = cache
            .get(|_| async { panic!("no fetch expected") })
            .await
            .unwrap();
        assert_eq!(third.expose_secret(), "t1");
    }

    #[tokio::test]
    async fn tokens_are_renewed_ahead_of_expiry() {
        let cache = TokenCache::new("test", Duration::from_secs(10));
        cache
            .get(|_| async { Ok(token(0, Duration::from_secs(5))) })
            .await
            .unwrap();
        let t = cache
            .get(|_| async { Ok(token(1, Duration::from_secs(300))) })
            .await
            .unwrap();
        assert_eq!(t.expose_secret(), "t1");
    }

    #[tokio::test]
    async fn absurd_lifetimes_are_clamped_not_overflowed() {
        let cache = TokenCache::new("test", Duration::from_secs(1));
        let huge = Token {
            access: SecretString::from("t0"),
            expires_in: Duration::from_secs(u64::MAX),
            refresh: Some((SecretString::from("r0"), Duration::MAX)),
        };
        let t = cache.get(|_| async { Ok(huge) }).await.unwrap();
        assert_eq!(t.expose_secret(), "t0");
        let state = cache.state.lock().await;
        let c = state.token.as_ref().unwrap();
        let now = Instant::now();
        assert!(c.expires_at <= now + MAX_TOKEN_TTL);
        assert!(c.refresh.as_ref().unwrap().1 <= now + MAX_TOKEN_TTL);
        drop(state);

        // A zero lifetime still serves the next call a few seconds later.
        let cache = TokenCache::new("test", Duration::ZERO);
        cache
            .get(|_| async { Ok(token(0, Duration::ZERO)) })
            .await
            .unwrap();
        let again = cache
            .get(|_| async { panic!("no fetch expected") })
            .await
            .unwrap();
        assert_eq!(again.expose_secret(), "t0");
    }

    #[test]
    fn lifetimes_are_read_leniently() {
        use serde_json::json;
        let secs = |n| Some(Duration::from_secs(n));
        assert_eq!(lifetime(&json!(300)), secs(300));
        assert_eq!(lifetime(&json!(" 120 ")), secs(120));
        assert_eq!(lifetime(&json!(1.5)), Some(Duration::from_millis(1500)));
        assert_eq!(lifetime(&json!(u64::MAX)), secs(u64::MAX));
        assert_eq!(lifetime(&json!(1e300)), Some(Duration::MAX));
        for garbage in [
            json!(-5),
            json!("-1"),
            json!("soon"),
            json!(null),
            json!({}),
        ] {
            assert_eq!(lifetime(&garbage), None, "{garbage}");
        }
    }

    async fn send_counting_fetches(
        server: &wiremock::MockServer,
        cache: &TokenCache,
        fetches: &AtomicU32,
    ) -> (StatusCode, Vec<String>) {
        let http = Http::new(Duration::from_secs(5), Duration::from_secs(5)).unwrap();
        let url = format!("{}/call", server.uri());
        let fetch = |_| async {
            let n = fetches.fetch_add(1, Ordering::SeqCst);
            Ok(token(n, Duration::from_secs(300)))
        };
        let response = cache
            .send(&http, "call", fetch, |t| {
                http.client().get(&url).bearer_auth(t.expose_secret())
            })
            .await
            .unwrap();
        let sent = server
            .received_requests()
            .await
            .unwrap()
            .iter()
            .map(|r| r.headers["authorization"].to_str().unwrap().to_owned())
            .collect();
        (response.status, sent)
    }

    #[tokio::test]
    async fn a_401_renews_the_token_once_and_sends_once_more() {
        use wiremock::{Mock, MockServer, ResponseTemplate, matchers::header};
        let server = MockServer::start().await;
        Mock::given(header("authorization", "Bearer t0"))
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        Mock::given(header("authorization", "Bearer t1"))
            .respond_with(ResponseTemplate::new(200))
            .mount(&server)
            .await;
        let cache = TokenCache::new("test", Duration::from_secs(1));
        let fetches = AtomicU32::new(0);
        let (status, sent) = send_counting_fetches(&server, &cache, &fetches).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(sent, ["Bearer t0", "Bearer t1"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_second_401_is_returned_without_a_third_call() {
        use wiremock::{Mock, MockServer, ResponseTemplate};
        let server = MockServer::start().await;
        Mock::given(wiremock::matchers::any())
            .respond_with(ResponseTemplate::new(401))
            .mount(&server)
            .await;
        let cache = TokenCache::new("test", Duration::from_secs(1));
        let fetches = AtomicU32::new(0);
        let (status, sent) = send_counting_fetches(&server, &cache, &fetches).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(sent, ["Bearer t0", "Bearer t1"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }
}
