//! Where the token pair of one grant lives, behind one small trait: a
//! third kind of store (a Kubernetes Secret, a vault) is one more file.
//!
//! The one rule every store keeps: between [`TokenStore::lock`] and the
//! guard's release (or drop) no other process, and no other token source
//! of this process, holds the lock of the same grant. Reading without the
//! lock ([`TokenStore::load`]) is always allowed and sees a whole record.

use std::{fmt, time::Duration};

use async_trait::async_trait;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One grant's state. Tokens are secrets: `Debug` prints `[REDACTED]` for
/// them, and no other text of ours ever quotes them.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    #[serde(serialize_with = "expose")]
    pub access_token: SecretString,
    #[serde(with = "time::serde::rfc3339")]
    pub access_issued_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub access_expires_at: OffsetDateTime,
    #[serde(serialize_with = "expose")]
    pub refresh_token: SecretString,
    /// One more with every pair written; a process that read generation N
    /// and finds N+1 under the lock knows someone refreshed meanwhile.
    pub generation: u64,
    #[serde(with = "time::serde::rfc3339")]
    pub refreshed_at: OffsetDateTime,
    /// `host:pid` (and a counter when one process runs several sources).
    pub refreshed_by: String,
    /// Set when the OAuth server answered `invalid_grant` to this pair's
    /// refresh token: nobody uses the pair again; a login writes a new one.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub revoked_at: Option<OffsetDateTime>,
}

impl Record {
    /// When the access token is due for a refresh: once `share` of its
    /// lifetime has passed.
    pub fn refresh_due(&self, share: f64) -> OffsetDateTime {
        let lifetime = (self.access_expires_at - self.access_issued_at).max(time::Duration::ZERO);
        self.access_issued_at + lifetime * share.clamp(0.0, 1.0)
    }

    pub fn expired(&self, now: OffsetDateTime) -> bool {
        now >= self.access_expires_at
    }
}

/// The one place a token is written out: into the store itself.
fn expose<S: serde::Serializer>(secret: &SecretString, s: S) -> Result<S::Ok, S::Error> {
    use secrecy::ExposeSecret;
    s.serialize_str(secret.expose_secret())
}

/// Why a store could not be used. Messages name the store (password
/// masked), never a token.
#[derive(Debug, Clone, thiserror::Error)]
#[error("token store {store}: {problem}")]
pub struct StoreError {
    pub store: String,
    pub problem: String,
}

impl StoreError {
    pub fn new(store: &str, problem: impl Into<String>) -> Self {
        Self {
            store: store.to_owned(),
            problem: problem.into(),
        }
    }
}

#[async_trait]
pub trait TokenStore: Send + Sync + fmt::Debug {
    /// The store as operators name it, without a password.
    fn describe(&self) -> String;

    /// The record as it is now, read without the lock; `None` when the
    /// store holds no pair for this grant yet.
    async fn load(&self) -> Result<Option<Record>, StoreError>;

    /// Takes the grant's exclusive lock, waiting at most `wait`, and reads
    /// the record under it.
    async fn lock(&self, wait: Duration) -> Result<Box<dyn Locked>, StoreError>;
}

/// The lock held, with the record read under it. Dropping the guard
/// without [`Locked::release`] releases the lock too, and anything written
/// may or may not stay (a file store's writes are durable at once; a
/// database store's are rolled back).
#[async_trait]
pub trait Locked: Send {
    fn record(&self) -> Option<&Record>;

    /// Writes `record` durably (before anyone uses the tokens in it).
    async fn write(&mut self, record: Record) -> Result<(), StoreError>;

    /// Makes what was written final and releases the lock.
    async fn release(self: Box<Self>) -> Result<(), StoreError>;
}

#[cfg(test)]
pub(crate) fn sample(generation: u64, ttl_s: i64) -> Record {
    let now = OffsetDateTime::now_utc().replace_nanosecond(0).unwrap();
    Record {
        access_token: SecretString::from(format!("access-{generation}")),
        access_issued_at: now,
        access_expires_at: now + time::Duration::seconds(ttl_s),
        refresh_token: SecretString::from(format!("refresh-{generation}")),
        generation,
        refreshed_at: now,
        refreshed_by: "test:1".to_owned(),
        revoked_at: None,
    }
}
