//! What provider simulator halves share: the [`Fake`] every one of them runs
//! as, JSON answers, header helpers, key and token bookkeeping, and the marks
//! the fault layer reads. A leaf of the simulator: it imports no provider and
//! no other part of the server.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use axum::Json;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use rand::RngCore as _;
use serde::Serialize;

use super::stats::Counters;

/// State of one target as seen by the sim: its status in the provider's own
/// vocabulary and the distinct idempotency keys of the calls that reached it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetInfo {
    pub state: String,
    pub keys: Vec<String>,
}

/// How a human-confirmation step (a strong customer authentication session)
/// resolves without a human, so demos and tests run unattended. `after`
/// counts from the session's creation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaAuto {
    Allow {
        after: Duration,
    },
    Deny {
        after: Duration,
    },
    /// Waits for the provider's own sandbox endpoint that plays the human;
    /// the session then times out as the provider documents.
    Manual,
}

/// A fake's store of targets, which the core reads and resets.
pub(crate) trait Targets: Default + Send + 'static {
    fn target(&self, key: &str) -> Option<TargetInfo>;
}

/// One running fake: what it was configured with, its targets behind one
/// mutex, the bearer tokens it issued and its counters. A reset replaces
/// the targets only: tokens survive so a running worker is not forced
/// through re-authentication.
pub(crate) struct Fake<C, S> {
    pub config: C,
    store: Mutex<S>,
    tokens: Mutex<Tokens>,
    pub counters: Counters,
}

#[derive(Default)]
struct Tokens {
    access: TokenStore,
    refresh: TokenStore,
}

impl<C, S: Targets> Fake<C, S> {
    pub fn new(config: C) -> Self {
        Self {
            config,
            store: Mutex::default(),
            tokens: Mutex::default(),
            counters: Counters::default(),
        }
    }

    pub fn store(&self) -> MutexGuard<'_, S> {
        lock(&self.store)
    }

    /// Issues an access token, and a refresh token when `refresh_ttl` is
    /// given; counted as one issue.
    pub fn issue_tokens(
        &self,
        access_ttl: Duration,
        refresh_ttl: Option<Duration>,
    ) -> (String, Option<String>) {
        let mut tokens = lock(&self.tokens);
        let access = tokens.access.issue(access_ttl);
        let refresh = refresh_ttl.map(|ttl| tokens.refresh.issue(ttl));
        Counters::bump(&self.counters.token_issued);
        (access, refresh)
    }

    /// Whether the request carries an unexpired access token of this fake.
    pub fn bearer_valid(&self, headers: &HeaderMap) -> bool {
        bearer(headers).is_some_and(|token| lock(&self.tokens).access.is_valid(token))
    }

    pub fn refresh_valid(&self, token: &str) -> bool {
        lock(&self.tokens).refresh.is_valid(token)
    }
}

/// A poisoned lock only means a handler panicked mid-update; the maps are
/// still usable for a simulator, so keep serving.
pub(crate) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The distinct idempotency keys of the state-changing calls that reached one
/// target; a second distinct key means the worker lost track of its key.
#[derive(Clone, Debug, Default)]
pub(crate) struct KeyLog(Vec<String>);

impl KeyLog {
    fn record(&mut self, key: Option<&str>, counters: &Counters) {
        let Some(key) = key else { return };
        if self.0.iter().any(|seen| seen == key) {
            return;
        }
        self.0.push(key.to_owned());
        if self.0.len() == 2 {
            Counters::bump(&counters.conflicting_keys);
        }
    }

    /// Logs a decision call on this target and applies the rule every fake
    /// enforces: a target is decided once. `false` when it is no longer
    /// pending; the call then counts as a double state change.
    pub fn admit(&mut self, key: Option<&str>, pending: bool, counters: &Counters) -> bool {
        self.record(key, counters);
        if !pending {
            Counters::bump(&counters.double_state_changes);
        }
        pending
    }

    pub fn info(&self, state: &str) -> TargetInfo {
        TargetInfo {
            state: state.to_owned(),
            keys: self.0.clone(),
        }
    }
}

/// Bearer tokens with an expiry. Expired entries are pruned when the map
/// grows, so a worker that re-authenticates too often cannot grow it forever.
#[derive(Debug, Default)]
struct TokenStore(HashMap<String, Instant>);

impl TokenStore {
    fn issue(&mut self, ttl: Duration) -> String {
        let now = Instant::now();
        if self.0.len() >= 1024 {
            self.0.retain(|_, expires| *expires > now);
        }
        let token = random_hex(24);
        self.0.insert(token.clone(), now + ttl);
        token
    }

    fn is_valid(&self, token: &str) -> bool {
        self.0
            .get(token)
            .is_some_and(|expires| *expires > Instant::now())
    }
}

/// Marks a response whose call changed a target's state; the fault layer
/// needs it to fail *after* applying (`apply_then_fail_ratio`).
#[derive(Clone, Copy, Debug)]
pub(crate) struct Applied;

pub(crate) fn applied(mut response: Response) -> Response {
    response.extensions_mut().insert(Applied);
    response
}

/// What a fake's handler answers. Both arms are complete answers in the
/// provider's wire format: the error arm lets a refusal leave early with `?`.
pub(crate) type Reply = Result<Response, Response>;

pub(crate) fn json<T: Serialize>(status: StatusCode, body: &T) -> Response {
    (status, Json(body)).into_response()
}

pub(crate) fn header_str<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

pub(crate) fn bearer(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, header::AUTHORIZATION.as_str())?.strip_prefix("Bearer ")
}

/// The generic `Idempotency-Key` header.
pub(crate) fn idempotency_key(headers: &HeaderMap) -> Option<&str> {
    header_str(headers, "idempotency-key")
}

pub(crate) fn is_json(headers: &HeaderMap) -> bool {
    header_str(headers, header::CONTENT_TYPE.as_str())
        .is_some_and(|ct| ct.trim_start().starts_with("application/json"))
}

pub(crate) fn now_rfc3339() -> String {
    rfc3339(time::OffsetDateTime::now_utc())
}

pub(crate) fn rfc3339(at: time::OffsetDateTime) -> String {
    at.format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::thread_rng().fill_bytes(&mut buf);
    hex::encode(buf)
}
