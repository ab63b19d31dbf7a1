//! `postgres://...`: one row per grant in `approval_qonto_oauth`, for
//! several replicas sharing one refresh-token chain.
//!
//! The lock is the row's: a transaction takes `SELECT ... FOR UPDATE`,
//! writes, and commits; a replica that dies mid-way drops its connection
//! and the server rolls back and frees the row. The row is inserted empty
//! first when missing, so seeding an empty store is locked like a refresh.
//! The table is created when missing. Plain TCP without TLS: for a
//! database on the same host or network (see the README).

use std::{str::FromStr, time::Duration};

use async_trait::async_trait;
use deadpool_postgres::{Manager, Object, Pool};
use reqwest::Url;
use secrecy::{ExposeSecret, SecretString};
use time::OffsetDateTime;
use tokio::sync::OnceCell;
use tokio_postgres::{NoTls, Row};

use super::store::{Locked, Record, StoreError, TokenStore};

const TABLE: &str = "approval_qonto_oauth";

/// Connections per process: a refresh holds one, a re-read another.
const POOL_SIZE: usize = 4;

const COLUMNS: &str = "access_token, access_issued_ms, access_expires_ms, refresh_token, \
                       generation, refreshed_ms, refreshed_by, revoked_ms";

pub struct PgStore {
    pool: Pool,
    grant: String,
    describe: String,
    table_ready: OnceCell<()>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("store", &self.describe)
            .field("grant", &self.grant)
            .finish()
    }
}

impl PgStore {
    /// Parses `url` and makes the pool; nothing connects until first use.
    pub fn new(url: &SecretString, grant: &str) -> Result<Self, String> {
        let describe = masked(url.expose_secret());
        let config = tokio_postgres::Config::from_str(url.expose_secret())
            // The parser's message may quote the URL, password included.
            .map_err(|_| {
                "expected a postgres://user[:password]@host[:port]/database URL".to_owned()
            })?;
        let manager = Manager::new(config, NoTls);
        let pool = Pool::builder(manager)
            .max_size(POOL_SIZE)
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .create_timeout(Some(Duration::from_secs(5)))
            .wait_timeout(Some(Duration::from_secs(30)))
            .build()
            .map_err(|e| format!("the connection pool could not be made: {e}"))?;
        Ok(Self {
            pool,
            grant: grant.to_owned(),
            describe,
            table_ready: OnceCell::new(),
        })
    }

    fn error(&self, problem: impl Into<String>) -> StoreError {
        StoreError::new(&self.describe, problem)
    }

    /// A pooled connection, with the table created on first use.
    async fn client(&self) -> Result<Object, StoreError> {
        let client = self
            .pool
            .get()
            .await
            .map_err(|e| self.error(format!("cannot be reached: {}", pool_problem(&e))))?;
        self.table_ready
            .get_or_try_init(|| async {
                let create = format!(
                    "CREATE TABLE IF NOT EXISTS {TABLE} (
                        grant_id text PRIMARY KEY,
                        access_token text,
                        access_issued_ms bigint,
                        access_expires_ms bigint,
                        refresh_token text,
                        generation bigint NOT NULL DEFAULT 0,
                        refreshed_ms bigint,
                        refreshed_by text,
                        revoked_ms bigint
                    )"
                );
                // Two replicas creating it at once: the loser's statement
                // fails on the catalog's unique index, and the table exists.
                if client.batch_execute(&create).await.is_err() {
                    client
                        .batch_execute(&create)
                        .await
                        .map_err(|e| self.error(format!("its table cannot be created: {e}")))?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        Ok(client)
    }

    fn record(&self, row: &Row) -> Result<Option<Record>, StoreError> {
        let bad = |_| self.error("holds a row of another shape (column types)");
        let access: Option<String> = row.try_get("access_token").map_err(bad)?;
        let refresh: Option<String> = row.try_get("refresh_token").map_err(bad)?;
        let (Some(access), Some(refresh)) = (access, refresh) else {
            return Ok(None);
        };
        let time = |column: &str| -> Result<Option<OffsetDateTime>, StoreError> {
            let ms: Option<i64> = row.try_get(column).map_err(bad)?;
            ms.map(|ms| {
                OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
                    .map_err(|_| self.error(format!("holds an impossible time in {column}")))
            })
            .transpose()
        };
        let required = |column: &str| {
            time(column)?.ok_or_else(|| self.error(format!("holds a pair without {column}")))
        };
        let generation: i64 = row.try_get("generation").map_err(bad)?;
        Ok(Some(Record {
            access_token: SecretString::from(access),
            access_issued_at: required("access_issued_ms")?,
            access_expires_at: required("access_expires_ms")?,
            refresh_token: SecretString::from(refresh),
            generation: u64::try_from(generation).unwrap_or(0),
            refreshed_at: required("refreshed_ms")?,
            refreshed_by: row
                .try_get::<_, Option<String>>("refreshed_by")
                .map_err(bad)?
                .unwrap_or_default(),
            revoked_at: time("revoked_ms")?,
        }))
    }
}

fn millis(t: OffsetDateTime) -> i64 {
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000).unwrap_or(i64::MAX)
}

/// A pool error's cause, without the connection string.
fn pool_problem(e: &deadpool_postgres::PoolError) -> String {
    match e {
        deadpool_postgres::PoolError::Backend(e) => e.to_string(),
        deadpool_postgres::PoolError::Timeout(_) => "timed out".to_owned(),
        other => other.to_string(),
    }
}

/// `url` with the password replaced.
fn masked(url: &str) -> String {
    match Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            u.to_string()
        }
        Err(_) => "postgres://<unparseable>".to_owned(),
    }
}

#[async_trait]
impl TokenStore for PgStore {
    fn describe(&self) -> String {
        format!("{} (grant {})", self.describe, self.grant)
    }

    async fn load(&self) -> Result<Option<Record>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!("SELECT {COLUMNS} FROM {TABLE} WHERE grant_id = $1"),
                &[&self.grant],
            )
            .await
            .map_err(|e| self.error(format!("cannot be read: {e}")))?;
        match row {
            Some(row) => self.record(&row),
            None => Ok(None),
        }
    }

    async fn lock(&self, wait: Duration) -> Result<Box<dyn Locked>, StoreError> {
        let client = self.client().await?;
        let mut guard = PgLocked {
            client: Some(client),
            grant: self.grant.clone(),
            describe: self.describe.clone(),
            record: None,
        };
        let c = guard.client.as_ref().expect("just set");
        let fail = |what: &str, e: tokio_postgres::Error| {
            let lock_timeout =
                e.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE);
            if lock_timeout {
                self.error(format!(
                    "its row stayed locked by another process for {} s",
                    wait.as_secs()
                ))
            } else {
                self.error(format!("{what}: {e}"))
            }
        };
        c.batch_execute(&format!(
            "BEGIN; SET LOCAL lock_timeout = '{}ms'",
            wait.as_millis().max(1)
        ))
        .await
        .map_err(|e| fail("cannot start a transaction", e))?;
        c.execute(
            &format!("INSERT INTO {TABLE} (grant_id) VALUES ($1) ON CONFLICT DO NOTHING"),
            &[&self.grant],
        )
        .await
        .map_err(|e| fail("cannot be written", e))?;
        let row = c
            .query_one(
                &format!("SELECT {COLUMNS} FROM {TABLE} WHERE grant_id = $1 FOR UPDATE"),
                &[&self.grant],
            )
            .await
            .map_err(|e| fail("cannot be locked", e))?;
        guard.record = self.record(&row)?;
        Ok(Box::new(guard))
    }
}

/// A connection inside a transaction that holds the row lock.
struct PgLocked {
    /// `None` once committed.
    client: Option<Object>,
    grant: String,
    describe: String,
    record: Option<Record>,
}

impl PgLocked {
    fn error(&self, problem: impl Into<String>) -> StoreError {
        StoreError::new(&self.describe, problem)
    }
}

#[async_trait]
impl Locked for PgLocked {
    fn record(&self) -> Option<&Record> {
        self.record.as_ref()
    }

    async fn write(&mut self, record: Record) -> Result<(), StoreError> {
        let client = self.client.as_ref().ok_or_else(|| self.error("released"))?;
        let generation = i64::try_from(record.generation).unwrap_or(i64::MAX);
        let updated = client
            .execute(
                &format!(
                    "UPDATE {TABLE} SET access_token = $2, access_issued_ms = $3, \
                     access_expires_ms = $4, refresh_token = $5, generation = $6, \
                     refreshed_ms = $7, refreshed_by = $8, revoked_ms = $9 WHERE grant_id = $1"
                ),
                &[
                    &self.grant,
                    &record.access_token.expose_secret(),
                    &millis(record.access_issued_at),
                    &millis(record.access_expires_at),
                    &record.refresh_token.expose_secret(),
                    &generation,
                    &millis(record.refreshed_at),
                    &record.refreshed_by,
                    &record.revoked_at.map(millis),
                ],
            )
            .await
            .map_err(|e| self.error(format!("cannot be written: {e}")))?;
        if updated != 1 {
            return Err(self.error("its row disappeared while locked"));
        }
        self.record = Some(record);
        Ok(())
    }

    async fn release(mut self: Box<Self>) -> Result<(), StoreError> {
        let client = self.client.take().ok_or_else(|| self.error("released"))?;
        let committed = client.batch_execute("COMMIT").await;
        if committed.is_err() {
            // Never back into the pool inside a broken transaction.
            drop(Object::take(client));
        }
        committed.map_err(|e| self.error(format!("the write could not be committed: {e}")))
    }
}

impl Drop for PgLocked {
    /// Released without a commit (an error, a cancelled task): the
    /// connection is closed rather than pooled, so the server rolls the
    /// transaction back and frees the row at once.
    fn drop(&mut self) {
        if let Some(client) = self.client.take() {
            drop(Object::take(client));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_never_reaches_a_description_or_an_error() {
        let url = SecretString::from("postgres://approval:hunter2@127.0.0.1:5432/tokens");
        let store = PgStore::new(&url, "grant-a").unwrap();
        assert!(
            !store.describe().contains("hunter2"),
            "{}",
            store.describe()
        );
        assert!(!format!("{store:?}").contains("hunter2"));
        let bad = SecretString::from("postgres://u:hunter2@host:notaport/db");
        let e = PgStore::new(&bad, "g").unwrap_err();
        assert!(!e.contains("hunter2"), "{e}");
    }
}
