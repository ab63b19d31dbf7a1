//! `file:PATH`: the whole record as one JSON file, for one replica (or
//! several processes on one machine).
//!
//! The lock is an OS advisory exclusive lock (`flock`, std's `File::lock`)
//! on a sibling `PATH.lock`, held across read, refresh and write: the data
//! file itself is replaced on every write, and a lock on a replaced inode
//! would lock nothing. `flock` belongs to the open file, so two token
//! sources of one process exclude each other as two processes do, and a
//! process that dies releases it.
//!
//! Writes go to a temporary file in the same directory, created 0600,
//! flushed to disk, then renamed over the store and the directory synced:
//! a crash leaves the old record or the new one, never half of one. A store
//! file that group or others may read is refused (as ssh refuses such a
//! key): it holds a refresh token worth 90 days of access.

use std::{
    fs::{self, File, OpenOptions, TryLockError},
    io::{ErrorKind, Read, Write},
    os::unix::fs::{OpenOptionsExt, PermissionsExt},
    path::{Path, PathBuf},
    time::{Duration, Instant},
};

use async_trait::async_trait;

use super::store::{Locked, Record, StoreError, TokenStore};

/// A record file larger than this is not ours.
const MAX_FILE: u64 = 64 * 1024;

/// How often a waiting `lock` tries again.
const LOCK_POLL: Duration = Duration::from_millis(20);

#[derive(Debug, Clone)]
pub struct FileStore {
    path: PathBuf,
    lock_path: PathBuf,
}

impl FileStore {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        let path = path.into();
        let mut lock_path = path.clone().into_os_string();
        lock_path.push(".lock");
        Self {
            path,
            lock_path: lock_path.into(),
        }
    }

    fn error(&self, problem: impl Into<String>) -> StoreError {
        StoreError::new(&self.describe(), problem)
    }

    fn read(&self) -> Result<Option<Record>, StoreError> {
        let file = match File::open(&self.path) {
            Ok(f) => f,
            Err(e) if e.kind() == ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(self.error(format!("cannot be read: {e}"))),
        };
        let meta = file
            .metadata()
            .map_err(|e| self.error(format!("cannot be read: {e}")))?;
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(self.error(format!(
                "is open to group or others (mode {mode:03o}): it holds the refresh token; \
                 run chmod 600 on it"
            )));
        }
        if meta.len() > MAX_FILE {
            return Err(self.error(format!(
                "is larger than {MAX_FILE} bytes: not a token store"
            )));
        }
        // The handle checked above, not the path again: it may have been
        // replaced meanwhile. Bounded, as the file may grow after the check.
        let mut text = Vec::new();
        file.take(MAX_FILE + 1)
            .read_to_end(&mut text)
            .map_err(|e| self.error(format!("cannot be read: {e}")))?;
        if text.len() as u64 > MAX_FILE {
            return Err(self.error(format!(
                "is larger than {MAX_FILE} bytes: not a token store"
            )));
        }
        if text.iter().all(u8::is_ascii_whitespace) {
            return Ok(None);
        }
        // serde's message may quote a token: only its position is kept.
        serde_json::from_slice(&text).map(Some).map_err(|e| {
            self.error(format!(
                "is not a token record (line {}, column {}); remove it and run qonto-oauth login",
                e.line(),
                e.column()
            ))
        })
    }

    fn write_atomically(&self, record: &Record) -> Result<(), StoreError> {
        let text = serde_json::to_vec_pretty(record)
            .map_err(|_| self.error("the record could not be encoded"))?;
        let dir = match self.path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
            _ => PathBuf::from("."),
        };
        let name = self
            .path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "qonto-oauth".to_owned());
        let temp = dir.join(format!(
            ".{name}.tmp-{}-{:08x}",
            std::process::id(),
            rand::random::<u32>()
        ));
        let written = (|| {
            let mut f = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&temp)?;
            f.write_all(&text)?;
            f.sync_all()?;
            fs::rename(&temp, &self.path)?;
            File::open(&dir)?.sync_all()
        })();
        written.map_err(|e| {
            let _ = fs::remove_file(&temp);
            self.error(format!("could not be written: {e}"))
        })
    }

    fn lock_blocking(&self, wait: Duration) -> Result<File, StoreError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&self.lock_path)
            .map_err(|e| {
                self.error(format!(
                    "its lock file {} cannot be opened: {e}",
                    self.lock_path.display()
                ))
            })?;
        let deadline = Instant::now() + wait;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(file),
                Err(TryLockError::WouldBlock) if Instant::now() < deadline => {
                    std::thread::sleep(LOCK_POLL);
                }
                Err(TryLockError::WouldBlock) => {
                    return Err(self.error(format!(
                        "its lock stayed held by another process for {} s",
                        wait.as_secs()
                    )));
                }
                Err(TryLockError::Error(e)) => {
                    return Err(self.error(format!("its lock cannot be taken: {e}")));
                }
            }
        }
    }
}

/// Runs blocking file work off the runtime's threads.
async fn blocking<T: Send + 'static>(
    store: &FileStore,
    work: impl FnOnce(FileStore) -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    let owned = store.clone();
    tokio::task::spawn_blocking(move || work(owned))
        .await
        .map_err(|_| store.error("the file task failed"))?
}

#[async_trait]
impl TokenStore for FileStore {
    fn describe(&self) -> String {
        format!("file:{}", self.path.display())
    }

    async fn load(&self) -> Result<Option<Record>, StoreError> {
        blocking(self, |s| s.read()).await
    }

    async fn lock(&self, wait: Duration) -> Result<Box<dyn Locked>, StoreError> {
        let (lock, record) = blocking(self, move |s| {
            let lock = s.lock_blocking(wait)?;
            let record = s.read()?;
            Ok((lock, record))
        })
        .await?;
        Ok(Box::new(FileLocked {
            store: self.clone(),
            _lock: lock,
            record,
        }))
    }
}

/// Holds the open lock file: closing it (on drop) releases the lock.
struct FileLocked {
    store: FileStore,
    _lock: File,
    record: Option<Record>,
}

#[async_trait]
impl Locked for FileLocked {
    fn record(&self) -> Option<&Record> {
        self.record.as_ref()
    }

    async fn write(&mut self, record: Record) -> Result<(), StoreError> {
        let copy = record.clone();
        blocking(&self.store, move |s| s.write_atomically(&copy)).await?;
        self.record = Some(record);
        Ok(())
    }

    async fn release(self: Box<Self>) -> Result<(), StoreError> {
        Ok(())
    }
}

/// The path of `file:PATH`.
pub fn path_of(spec: &str) -> Option<&Path> {
    spec.strip_prefix("file:")
        .filter(|p| !p.trim().is_empty())
        .map(Path::new)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::qonto::oauth::store::sample;
    use secrecy::ExposeSecret;

    fn temp_store() -> (FileStore, PathBuf) {
        let dir = std::env::temp_dir().join(format!("qonto-oauth-test-{}", uuid::Uuid::new_v4()));
        fs::create_dir_all(&dir).unwrap();
        (FileStore::new(dir.join("store.json")), dir)
    }

    #[tokio::test]
    async fn writes_are_0600_and_read_back_whole() {
        let (store, dir) = temp_store();
        assert!(store.load().await.unwrap().is_none());
        let mut locked = store.lock(Duration::from_secs(1)).await.unwrap();
        assert!(locked.record().is_none());
        locked.write(sample(3, 60)).await.unwrap();
        locked.release().await.unwrap();
        let mode = fs::metadata(dir.join("store.json"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let back = store.load().await.unwrap().unwrap();
        assert_eq!(back.generation, 3);
        assert_eq!(back.refresh_token.expose_secret(), "refresh-3");
        // No temporary file is left beside it.
        let names: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| n == "store.json" || n == "store.json.lock"),
            "{names:?}"
        );
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_second_lock_waits_for_the_first() {
        let (store, dir) = temp_store();
        let first = store.lock(Duration::from_secs(1)).await.unwrap();
        let Err(refused) = store.lock(Duration::from_millis(100)).await else {
            panic!("the lock is held");
        };
        assert!(refused.problem.contains("lock stayed held"), "{refused}");
        let waiting = tokio::spawn({
            let store = store.clone();
            async move { store.lock(Duration::from_secs(10)).await.is_ok() }
        });
        drop(first);
        assert!(waiting.await.unwrap());
        fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn a_store_open_to_others_or_garbled_is_refused_without_quoting_it() {
        let (store, dir) = temp_store();
        let path = dir.join("store.json");
        let mut locked = store.lock(Duration::from_secs(1)).await.unwrap();
        locked.write(sample(1, 60)).await.unwrap();
        drop(locked);
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        let e = store.load().await.unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        fs::write(&path, r#"{"access_token": "leaky-secret-value"#).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).unwrap();
        let e = store.load().await.unwrap_err();
        assert!(!e.to_string().contains("leaky"), "{e}");
        assert!(e.to_string().contains("not a token record"), "{e}");
        fs::remove_dir_all(dir).unwrap();
    }
}
