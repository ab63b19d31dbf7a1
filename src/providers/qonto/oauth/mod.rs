//! Qonto OAuth: the token source the Qonto client takes its bearer token
//! from, keeping one rotating refresh-token chain safe for every process
//! that shares it (CONTRACT v2 section 6).
//!
//! Qonto's OAuth server (Ory Hydra) rotates refresh tokens: the used one
//! stays valid 60 s after its first use, and a later use revokes the whole
//! grant. So:
//! - the access token is used until [`OAuthConfig::refresh_at`] of its
//!   lifetime has passed (never refreshed per call, nor in answer to a 401);
//! - then, in one flight per process, the store is read again: another
//!   process may have refreshed already;
//! - if not, under the store's lock: read again, refresh only if the stored
//!   pair is still the one that was due, write the new pair with the next
//!   generation, release, and only then use it;
//! - a refresh whose answer is lost (timeout, 5xx) is repeated with the
//!   SAME refresh token, still under the lock, within [`REFRESH_RETRY_SPAN`]:
//!   the server may have rotated, and the old token stays usable 60 s after
//!   its first use, so a repeat inside that grace gets a fresh pair where a
//!   later one would revoke the grant;
//! - `invalid_grant` on the stored refresh token means the grant is
//!   revoked: the store records it, it is logged once, counted, reported by
//!   `/readyz`, and Qonto calls are refused here (the decisions wait in a
//!   retry tier) until a `qonto-oauth login` writes a new generation, which
//!   a periodic re-read picks up without a restart;
//! - a 401 on a call re-reads the store (a newer token may be there); a 401
//!   with the freshest token is the decision's `unauthorized`, and
//!   [`BREAKER_401S`] of those in a row stop Qonto calls for
//!   [`BREAKER_COOL_DOWN`] (Qonto throttles after 200 401s an hour).

pub mod file;
pub mod postgres;
pub mod refresh;
pub mod store;

use std::{
    sync::{
        Arc, Mutex, PoisonError, Weak,
        atomic::{AtomicU32, Ordering},
    },
    time::Duration,
};

use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::time::Instant;

use self::{
    refresh::{EndpointError, Grant, Issued, TokenEndpoint},
    store::{Record, StoreError, TokenStore},
};
use crate::{
    providers::http::Http,
    retry::{CREDENTIALS_UNUSABLE, CallError, ErrorClass},
    settings::{Credential, SettingsError, env_key, present},
};

/// 401s in a row, each with the freshest token, that stop Qonto calls.
pub const BREAKER_401S: u32 = 5;
pub const BREAKER_COOL_DOWN: Duration = Duration::from_secs(30);
/// The longest a process waits for another's refresh to release the lock.
const LOCK_WAIT: Duration = Duration::from_secs(45);
/// How long the lost answers of one refresh are repeated, well inside the
/// server's 60 s grace for the refresh token sent.
pub const REFRESH_RETRY_SPAN: Duration = Duration::from_secs(30);
/// After a refresh failed transiently, the old (still valid) access token
/// is used this long before the next try.
const REFRESH_BACKOFF: Duration = Duration::from_secs(5);
/// While the grant is unusable (revoked, no pair, client refused), the
/// store is read this often for a pair written by a login.
pub const UNUSABLE_REREAD: Duration = Duration::from_secs(5);
/// What a held decision waits at least while the grant is unusable.
const UNUSABLE_HOLD: Duration = Duration::from_secs(10);

/// `[providers.qonto.oauth]` as configured (CONTRACT v2 section 2).
#[derive(Deserialize, Default)]
pub(crate) struct OAuthSettings {
    client_id: Option<Credential>,
    client_secret: Option<Credential>,
    token_url: Option<String>,
    auth_url: Option<String>,
    redirect_uri: Option<String>,
    scopes: Option<String>,
    /// `postgres://` URLs carry a password.
    token_store: Option<SecretString>,
    refresh_token: Option<Credential>,
    refresh_at: Option<f64>,
    grant_id: Option<String>,
}

pub const DEFAULT_TOKEN_URL: &str = "https://oauth.qonto.com/oauth2/token";
pub const DEFAULT_AUTH_URL: &str = "https://oauth.qonto.com/oauth2/auth";
pub const DEFAULT_REDIRECT_URI: &str = "http://127.0.0.1:8765/callback";
pub const DEFAULT_SCOPES: &str = "request_review.write organization.read offline_access";
pub const DEFAULT_TOKEN_STORE: &str = "file:qonto-oauth.json";
pub const DEFAULT_REFRESH_AT: f64 = 0.8;

/// The OAuth settings, checked.
pub struct OAuthConfig {
    pub client_id: SecretString,
    pub client_secret: SecretString,
    pub token_url: Url,
    pub auth_url: Url,
    pub redirect_uri: Url,
    pub scopes: String,
    pub token_store: SecretString,
    pub seed: Option<SecretString>,
    pub refresh_at: f64,
    /// The store's key for this grant: the configured name, else the client id.
    pub grant_id: String,
    pub staging_token: Option<SecretString>,
}

fn key(name: &str) -> String {
    env_key(&format!("providers.qonto.oauth.{name}"))
}

fn url(name: &str, value: Option<&str>, default: &str) -> Result<Url, SettingsError> {
    let raw = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .unwrap_or(default);
    match Url::parse(raw) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host().is_some() => Ok(u),
        _ => Err(SettingsError::Invalid {
            key: key(name),
            problem: "expected an http:// or https:// URL".to_owned(),
        }),
    }
}

impl OAuthConfig {
    /// `None` when no OAuth client is configured (OAuth off).
    pub(crate) fn from_settings(
        s: &OAuthSettings,
        staging_token: Option<&SecretString>,
    ) -> Result<Option<Self>, SettingsError> {
        let Some([client_id, client_secret]) = crate::providers::contract::credentials(
            "qonto",
            [
                ("oauth.client_id", present(&s.client_id)),
                ("oauth.client_secret", present(&s.client_secret)),
            ],
        )?
        else {
            return Ok(None);
        };
        let redirect_uri = url(
            "redirect_uri",
            s.redirect_uri.as_deref(),
            DEFAULT_REDIRECT_URI,
        )?;
        let refresh_at = s.refresh_at.unwrap_or(DEFAULT_REFRESH_AT);
        // Past 0.95 a slow refresh meets the token's expiry; below 0.1
        // the chain rotates for nothing.
        if !(0.1..=0.95).contains(&refresh_at) {
            return Err(SettingsError::Invalid {
                key: key("refresh_at"),
                problem: "expected a share of the token lifetime between 0.1 and 0.95".to_owned(),
            });
        }
        let token_store = s
            .token_store
            .clone()
            .filter(|t| !t.expose_secret().trim().is_empty())
            .unwrap_or_else(|| SecretString::from(DEFAULT_TOKEN_STORE));
        let spec = token_store.expose_secret().trim();
        if file::path_of(spec).is_none()
            && !spec.starts_with("postgres://")
            && !spec.starts_with("postgresql://")
        {
            return Err(SettingsError::Invalid {
                key: key("token_store"),
                problem: "expected file:PATH or a postgres:// URL".to_owned(),
            });
        }
        let grant_id = s
            .grant_id
            .as_deref()
            .map(str::trim)
            .filter(|g| !g.is_empty())
            .unwrap_or(client_id.expose_secret())
            .to_owned();
        Ok(Some(Self {
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            token_url: url("token_url", s.token_url.as_deref(), DEFAULT_TOKEN_URL)?,
            auth_url: url("auth_url", s.auth_url.as_deref(), DEFAULT_AUTH_URL)?,
            redirect_uri,
            scopes: s
                .scopes
                .as_deref()
                .map(str::trim)
                .filter(|v| !v.is_empty())
                .unwrap_or(DEFAULT_SCOPES)
                .to_owned(),
            token_store: SecretString::from(spec.to_owned()),
            seed: present(&s.refresh_token).cloned(),
            refresh_at,
            grant_id,
            staging_token: staging_token.cloned(),
        }))
    }

    /// The configured store (nothing is opened or connected yet).
    pub fn store(&self) -> Result<Arc<dyn TokenStore>, SettingsError> {
        let spec = self.token_store.expose_secret();
        if let Some(path) = file::path_of(spec) {
            return Ok(Arc::new(file::FileStore::new(path)));
        }
        postgres::PgStore::new(&self.token_store, &self.grant_id)
            .map(|s| Arc::new(s) as Arc<dyn TokenStore>)
            .map_err(|problem| SettingsError::Invalid {
                key: key("token_store"),
                problem,
            })
    }

    pub fn endpoint(&self, http: &Http) -> TokenEndpoint {
        TokenEndpoint {
            http: http.clone(),
            url: self.token_url.clone(),
            client_id: self.client_id.clone(),
            client_secret: self.client_secret.clone(),
            staging_token: self.staging_token.clone(),
        }
    }
}

/// Who writes a pair: `host:pid`, and a counter past the first source of
/// a process (tests run several in one).
fn process_name() -> String {
    static SOURCES: AtomicU32 = AtomicU32::new(0);
    let n = SOURCES.fetch_add(1, Ordering::Relaxed);
    let host = hostname();
    let pid = std::process::id();
    if n == 0 {
        format!("{host}:{pid}")
    } else {
        format!("{host}:{pid}#{n}")
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; the name is cut at NUL.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).into_owned();
    if ok && !name.is_empty() {
        name
    } else {
        "unknown-host".to_owned()
    }
}

/// What keeps the grant from being used, for `/readyz` and the refusals.
#[derive(Clone, Debug)]
enum Problem {
    Revoked(OffsetDateTime),
    Empty,
    ClientRefused(String),
    Store(String),
}

impl Problem {
    fn describe(&self) -> String {
        match self {
            Problem::Revoked(at) => format!(
                "the Qonto OAuth grant was revoked (invalid_grant) at {}: run `approval-worker qonto-oauth login`",
                rfc3339(*at)
            ),
            Problem::Empty => "the Qonto OAuth token store holds no token pair: run `approval-worker qonto-oauth login` (or set APPROVAL_PROVIDERS__QONTO__OAUTH__REFRESH_TOKEN)".to_owned(),
            Problem::ClientRefused(m) => format!("the Qonto OAuth server refused the client: {m}"),
            Problem::Store(m) => m.clone(),
        }
    }
}

pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[derive(Default)]
struct Current {
    record: Option<Record>,
    problem: Option<Problem>,
    last_read: Option<Instant>,
    /// No refresh before this, after a transient failure.
    refresh_after: Option<Instant>,
    /// 401s in a row with the freshest token.
    unauthorized: u32,
    breaker_until: Option<Instant>,
    watching: bool,
    /// When the configured seed met `invalid_grant`: nothing is stored
    /// then, and without this an empty store would send it again forever.
    seed_refused: Option<OffsetDateTime>,
}

/// Where the Qonto client gets its bearer token.
pub struct TokenSource {
    store: Arc<dyn TokenStore>,
    endpoint: TokenEndpoint,
    seed: Option<SecretString>,
    refresh_at: f64,
    me: String,
    current: Mutex<Current>,
    /// One store read or refresh at a time in this process.
    flight: tokio::sync::Mutex<()>,
    this: Weak<TokenSource>,
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSource")
            .field("store", &self.store.describe())
            .finish()
    }
}

fn unusable(message: String, retry_after: Duration) -> CallError {
    let mut e = CallError::new(ErrorClass::Unavailable, message);
    e.provider_code = Some(CREDENTIALS_UNUSABLE.to_owned());
    e.retry_after = Some(retry_after);
    e
}

/// An expired token while the refresh backs off: nothing reached Qonto, so
/// the decision waits without spending an attempt; the grant itself is not
/// known to be unusable, hence no `CREDENTIALS_UNUSABLE`.
fn backing_off(retry_after: Duration) -> CallError {
    let mut e = CallError::new(
        ErrorClass::Unavailable,
        "the Qonto OAuth access token expired and its refresh failed; trying again later"
            .to_owned(),
    );
    e.retry_after = Some(retry_after);
    e
}

impl TokenSource {
    pub fn new(config: &OAuthConfig, http: &Http) -> Result<Arc<Self>, SettingsError> {
        let store = config.store()?;
        Ok(Self::with_store(
            store,
            config.endpoint(http),
            config.seed.clone(),
            config.refresh_at,
        ))
    }

    pub fn with_store(
        store: Arc<dyn TokenStore>,
        endpoint: TokenEndpoint,
        seed: Option<SecretString>,
        refresh_at: f64,
    ) -> Arc<Self> {
        Arc::new_cyclic(|this| Self {
            store,
            endpoint,
            seed,
            refresh_at,
            me: process_name(),
            current: Mutex::default(),
            flight: tokio::sync::Mutex::new(()),
            this: this.clone(),
        })
    }

    fn current(&self) -> std::sync::MutexGuard<'_, Current> {
        self.current.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What keeps Qonto calls from being made now, for `/readyz`.
    pub fn problem(&self) -> Option<String> {
        let c = self.current();
        if let Some(p) = &c.problem {
            return Some(p.describe());
        }
        c.breaker_until.filter(|u| *u > Instant::now()).map(|_| {
            format!(
                "{BREAKER_401S} Qonto calls in a row were refused with 401 even with the stored \
                 token: Qonto calls are paused"
            )
        })
    }

    /// A usable access token, or why there is none.
    pub async fn token(&self) -> Result<SecretString, CallError> {
        let now_i = Instant::now();
        {
            let c = self.current();
            if let Some(until) = c.breaker_until.filter(|u| *u > now_i) {
                return Err(unusable(
                    format!(
                        "Qonto calls are paused after {BREAKER_401S} 401s in a row with the stored token"
                    ),
                    until - now_i,
                ));
            }
            let reread_due = c.last_read.is_none_or(|at| now_i >= at + UNUSABLE_REREAD);
            if let Some(problem) = &c.problem
                && !reread_due
            {
                return Err(unusable(problem.describe(), UNUSABLE_HOLD));
            }
            if c.problem.is_none()
                && let Some(r) = &c.record
            {
                let now = OffsetDateTime::now_utc();
                if now < r.refresh_due(self.refresh_at) {
                    return Ok(r.access_token.clone());
                }
                // Due, not expired: whoever is refreshing, this call need not wait.
                if !r.expired(now)
                    && (self.flight.try_lock().is_err()
                        || c.refresh_after.is_some_and(|t| now_i < t))
                {
                    return Ok(r.access_token.clone());
                }
            }
        }
        let _flight = self.flight.lock().await;
        // Another task of this process may have renewed, or failed to,
        // meanwhile: a failure is not repeated by each caller queued behind
        // it (the same refresh token, long past the server's grace).
        {
            let c = self.current();
            let now_i = Instant::now();
            if let Some(problem) = &c.problem
                && c.last_read.is_some_and(|at| now_i < at + UNUSABLE_REREAD)
            {
                return Err(unusable(problem.describe(), UNUSABLE_HOLD));
            }
            if c.problem.is_none()
                && let Some(r) = &c.record
            {
                let now = OffsetDateTime::now_utc();
                if now < r.refresh_due(self.refresh_at) {
                    return Ok(r.access_token.clone());
                }
                if let Some(until) = c.refresh_after.filter(|t| now_i < *t) {
                    if r.expired(now) {
                        return Err(backing_off(until - now_i));
                    }
                    return Ok(r.access_token.clone());
                }
            }
        }
        self.renew().await
    }

    /// Caches `record` as the pair to use, clearing any problem.
    fn adopt(&self, record: &Record) -> SecretString {
        let mut c = self.current();
        if c.problem.is_some() {
            tracing::info!(
                generation = record.generation,
                "the Qonto OAuth grant is usable again"
            );
        }
        c.problem = None;
        c.refresh_after = None;
        c.last_read = Some(Instant::now());
        c.record = Some(record.clone());
        metrics::gauge!("approval_qonto_oauth_revoked").set(0.0);
        metrics::gauge!("approval_qonto_oauth_generation").set(record.generation as f64);
        record.access_token.clone()
    }

    /// Records `problem` (logged once per kind) and refuses the call.
    fn fail(&self, problem: Problem) -> CallError {
        let mut c = self.current();
        let first = !matches!(
            (&c.problem, &problem),
            (Some(Problem::Revoked(_)), Problem::Revoked(_))
                | (Some(Problem::Empty), Problem::Empty)
                | (Some(Problem::ClientRefused(_)), Problem::ClientRefused(_))
                | (Some(Problem::Store(_)), Problem::Store(_))
        );
        let text = problem.describe();
        if first {
            match problem {
                Problem::Revoked(_) => {
                    metrics::gauge!("approval_qonto_oauth_revoked").set(1.0);
                    tracing::error!(problem = %text, "Qonto OAuth grant revoked");
                }
                _ => tracing::error!(problem = %text, "Qonto OAuth unusable"),
            }
        }
        c.problem = Some(problem);
        c.last_read = Some(Instant::now());
        let watch = !c.watching;
        c.watching = true;
        drop(c);
        if watch {
            self.watch();
        }
        unusable(text, UNUSABLE_HOLD)
    }

    /// While unusable, re-reads the store now and then, so a login heals
    /// this process (and `/readyz`) without a restart or a decision.
    fn watch(&self) {
        let this = self.this.clone();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            loop {
                tokio::time::sleep(UNUSABLE_REREAD).await;
                let Some(source) = this.upgrade() else { return };
                {
                    // One guard: a problem recorded between a check and the
                    // clearing would otherwise be left without a watcher.
                    let mut c = source.current();
                    if c.problem.is_none() {
                        c.watching = false;
                        return;
                    }
                }
                let _ = source.token().await;
            }
        });
    }

    /// A store problem: with a valid cached token, keep going on it.
    fn store_failed(&self, e: StoreError) -> Result<SecretString, CallError> {
        let mut c = self.current();
        if c.problem.is_none()
            && let Some(r) = &c.record
            && !r.expired(OffsetDateTime::now_utc())
        {
            tracing::warn!(error = %e, "Qonto OAuth token store unavailable; the current token is still valid");
            let token = r.access_token.clone();
            // The next caller uses it too, rather than waiting on the store
            // (up to LOCK_WAIT) on a decision's path.
            c.refresh_after = Some(Instant::now() + REFRESH_BACKOFF);
            return Ok(token);
        }
        drop(c);
        Err(self.fail(Problem::Store(e.to_string())))
    }

    /// Reads the store, then refreshes under its lock if still needed.
    async fn renew(&self) -> Result<SecretString, CallError> {
        let now = OffsetDateTime::now_utc();
        match self.store.load().await {
            Ok(Some(r)) if r.revoked_at.is_some() => {
                self.current().record = Some(r.clone());
                return Err(self.fail(Problem::Revoked(r.revoked_at.unwrap_or(now))));
            }
            Ok(Some(r)) if now < r.refresh_due(self.refresh_at) => return Ok(self.adopt(&r)),
            Ok(Some(r)) => {
                // Due: keep the freshest view, whoever refreshes.
                self.current().record = Some(r);
            }
            Ok(None) if self.seed.is_none() => return Err(self.fail(Problem::Empty)),
            Ok(None) => {
                let refused = self.current().seed_refused;
                if let Some(at) = refused {
                    return Err(self.fail(Problem::Revoked(at)));
                }
            }
            Err(e) => return self.store_failed(e),
        }
        // Backing off after a transient failure: the valid token goes on;
        // an expired one (or none) waits rather than refreshing again.
        {
            let c = self.current();
            let now_i = Instant::now();
            if let Some(until) = c.refresh_after.filter(|t| now_i < *t) {
                return match c.record.as_ref().filter(|r| !r.expired(now)) {
                    Some(r) => Ok(r.access_token.clone()),
                    None => Err(backing_off(until - now_i)),
                };
            }
        }
        let mut locked = match self.store.lock(LOCK_WAIT).await {
            Ok(l) => l,
            Err(e) => return self.store_failed(e),
        };
        let now = OffsetDateTime::now_utc();
        let (refresh_token, generation) = match locked.record().cloned() {
            Some(r) if r.revoked_at.is_some() => {
                drop(locked);
                return Err(self.fail(Problem::Revoked(r.revoked_at.unwrap_or(now))));
            }
            // Someone refreshed between our read and our lock.
            Some(r) if now < r.refresh_due(self.refresh_at) => {
                drop(locked);
                return Ok(self.adopt(&r));
            }
            Some(r) => (r.refresh_token.clone(), r.generation),
            None => match &self.seed {
                Some(_) if self.current().seed_refused.is_some() => {
                    drop(locked);
                    let at = self.current().seed_refused.unwrap_or(now);
                    return Err(self.fail(Problem::Revoked(at)));
                }
                Some(seed) => {
                    tracing::info!(
                        "seeding the empty Qonto OAuth token store from the configured refresh token"
                    );
                    (seed.clone(), 0)
                }
                None => {
                    drop(locked);
                    return Err(self.fail(Problem::Empty));
                }
            },
        };
        match self.refresh(&refresh_token).await {
            Ok(issued) => {
                let record = self.record_of(issued, &refresh_token, generation + 1);
                if let Err(e) = locked.write(record.clone()).await {
                    // Not stored, so not used: the old refresh token is in its
                    // grace, and the next try (or another process) repeats it.
                    self.current().refresh_after = Some(Instant::now() + REFRESH_BACKOFF);
                    return self.store_failed(e);
                }
                if let Err(e) = locked.release().await {
                    self.current().refresh_after = Some(Instant::now() + REFRESH_BACKOFF);
                    return self.store_failed(e);
                }
                metrics::counter!("approval_qonto_oauth_refreshes_total", "result" => "ok")
                    .increment(1);
                tracing::info!(
                    generation = record.generation,
                    "Qonto OAuth token pair refreshed"
                );
                Ok(self.adopt(&record))
            }
            Err(EndpointError::InvalidGrant(why)) => {
                metrics::counter!("approval_qonto_oauth_refreshes_total", "result" => "invalid_grant")
                    .increment(1);
                tracing::warn!(reason = %why, "the Qonto OAuth server refused the stored refresh token");
                if let Some(mut r) = locked.record().cloned() {
                    r.revoked_at = Some(now);
                    r.refreshed_by = self.me.clone();
                    let _ = locked.write(r.clone()).await;
                    let _ = locked.release().await;
                    self.current().record = Some(r);
                } else {
                    // The seed was refused: nothing to mark in the store.
                    drop(locked);
                    self.current().seed_refused = Some(now);
                }
                Err(self.fail(Problem::Revoked(now)))
            }
            Err(EndpointError::Refused(e)) => {
                drop(locked);
                metrics::counter!("approval_qonto_oauth_refreshes_total", "result" => "refused")
                    .increment(1);
                Err(self.fail(Problem::ClientRefused(e.message)))
            }
            Err(EndpointError::Transient(e)) => {
                drop(locked);
                metrics::counter!("approval_qonto_oauth_refreshes_total", "result" => "transient")
                    .increment(1);
                tracing::warn!(error = %e, "Qonto OAuth refresh failed; trying again later");
                let mut c = self.current();
                c.refresh_after = Some(Instant::now() + REFRESH_BACKOFF);
                match c
                    .record
                    .as_ref()
                    .filter(|r| !r.expired(OffsetDateTime::now_utc()))
                {
                    Some(r) => Ok(r.access_token.clone()),
                    // Nothing reached Qonto: not a spent attempt.
                    None => Err(backing_off(REFRESH_BACKOFF)),
                }
            }
        }
    }

    /// One refresh, its lost answers repeated with the same token within
    /// [`REFRESH_RETRY_SPAN`] (see the module's notes).
    async fn refresh(&self, token: &SecretString) -> Result<Issued, EndpointError> {
        let started = Instant::now();
        let mut wait = Duration::from_millis(500);
        loop {
            match self.endpoint.exchange(Grant::Refresh(token)).await {
                Err(EndpointError::Transient(e)) => {
                    // The server's Retry-After counts: a repeat past the span
                    // could fall outside the grace.
                    let pause = wait.max(e.retry_after.unwrap_or_default());
                    if started.elapsed() + pause >= REFRESH_RETRY_SPAN {
                        return Err(EndpointError::Transient(e));
                    }
                    tracing::warn!(error = %e, "Qonto OAuth refresh answer lost; repeating it within the grace period");
                    tokio::time::sleep(pause).await;
                    wait = (wait * 2).min(Duration::from_secs(8));
                }
                other => return other,
            }
        }
    }

    fn record_of(&self, issued: Issued, used: &SecretString, generation: u64) -> Record {
        let now = OffsetDateTime::now_utc();
        if issued.refresh.is_none() {
            tracing::warn!(
                "the Qonto OAuth server issued no new refresh token; keeping the one used"
            );
        }
        Record {
            access_token: issued.access,
            access_issued_at: now,
            access_expires_at: now + issued.lifetime,
            refresh_token: issued.refresh.unwrap_or_else(|| used.clone()),
            generation,
            refreshed_at: now,
            refreshed_by: self.me.clone(),
            revoked_at: None,
        }
    }

    /// Qonto accepted `token`.
    pub fn accepted(&self) {
        let mut c = self.current();
        c.unauthorized = 0;
    }

    /// Qonto answered 401 to `stale`: re-reads the store (never refreshes).
    /// `Some` when a newer token is there to try once; `None` when `stale`
    /// is the freshest there is, which counts towards the breaker.
    pub async fn rejected(&self, stale: &SecretString) -> Option<SecretString> {
        let _flight = self.flight.lock().await;
        let differs = |r: &Record| r.access_token.expose_secret() != stale.expose_secret();
        if let Some(r) = self.current().record.as_ref().filter(|r| differs(r))
            && r.revoked_at.is_none()
        {
            return Some(r.access_token.clone());
        }
        match self.store.load().await {
            Ok(Some(r)) if r.revoked_at.is_none() && differs(&r) => Some(self.adopt(&r)),
            _ => {
                self.unauthorized();
                None
            }
        }
    }

    fn unauthorized(&self) {
        let mut c = self.current();
        c.unauthorized += 1;
        if c.unauthorized >= BREAKER_401S {
            // Half-open afterwards: one more 401 opens it again.
            c.unauthorized = BREAKER_401S - 1;
            c.breaker_until = Some(Instant::now() + BREAKER_COOL_DOWN);
            metrics::counter!("approval_qonto_oauth_breaker_opened_total").increment(1);
            tracing::error!(
                cool_down_s = BREAKER_COOL_DOWN.as_secs(),
                "Qonto refused the stored OAuth token {BREAKER_401S} times in a row; pausing Qonto calls"
            );
        }
    }
}

/// Writes a pair issued by a login (authorization code) as the next
/// generation, under the store's lock; returns the record written.
pub async fn store_login(store: &dyn TokenStore, issued: Issued) -> Result<Record, StoreError> {
    let mut locked = store.lock(LOCK_WAIT).await?;
    let generation = locked.record().map_or(0, |r| r.generation) + 1;
    let now = OffsetDateTime::now_utc();
    let Some(refresh) = issued.refresh else {
        return Err(StoreError::new(
            &store.describe(),
            "the OAuth server issued no refresh token (is offline_access among the scopes?); nothing was stored",
        ));
    };
    let record = Record {
        access_token: issued.access,
        access_issued_at: now,
        access_expires_at: now + issued.lifetime,
        refresh_token: refresh,
        generation,
        refreshed_at: now,
        refreshed_by: format!("{}:{} (login)", hostname(), std::process::id()),
        revoked_at: None,
    };
    locked.write(record.clone()).await?;
    locked.release().await?;
    Ok(record)
}

#[cfg(test)]
mod tests;
