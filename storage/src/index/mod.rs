//! The cache index: a RocksDB index over the filesystem content store
//! ([`crate::content`]).
//!
//! This is the whole local storage engine, without HTTP: the cache server's
//! local backend serves it and the executor's embedded cache opens it
//! in-process on a local directory. It promises:
//! - entries are immutable and first-writer-wins per (namespace, key);
//! - an entry is only accepted when the blob it names is stored, and a blob
//!   is never removed while an entry references it or while it is pinned by
//!   an upload or a download;
//! - a blob is only visible under a digest its bytes hash to (see
//!   [`BlobWriter::commit`]);
//! - every acknowledged write is in the RocksDB WAL with `sync`, and
//!   [`Store::open`] reconciles the index with the files after a crash.
//!
//! Index layout (one column family each):
//! - `entries`: `[ns len][ns][32-byte key]` -> `[version][created ms][last
//!   access ms][entry JSON]`. JSON keeps unknown entry fields verbatim.
//! - `lru`: `[last access ms, big endian][entry index key]` -> empty; iterated
//!   oldest first by eviction.
//! - `blobs`: `[32-byte sha256]` -> `[size][created ms][last access ms]
//!   [reference count]` (all u64 big endian).
//!
//! All index mutations take one store-wide lock: they are short (a few point
//! reads and one write batch), and the lock makes reference counting a
//! plain read-modify-write. Lookups never take it except to record an access
//! older than [`StoreConfig::access_granularity`].
//!
//! Files: [`codec`] (record layouts), [`db`] (RocksDB options), `recovery`,
//! `entries`, `blobs` and `maintenance` (GC, eviction, verify, stats): one
//! `impl Store` block each.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use kiln_common::Digest;
use rocksdb::{ColumnFamily, DB};

use crate::content::{ContentError, ContentStore};
use crate::error::{Classify, ContractError, ErrorClass};
use crate::namespace::InvalidNamespace;
use crate::reports::RecoveryReport;

mod blobs;
pub mod codec;
pub mod db;
mod entries;
mod maintenance;
mod recovery;
#[cfg(test)]
mod tests;

pub use blobs::{BlobWriter, OpenBlob, PinGuard};

use codec::{BlobMeta, digest_key};
use db::{CF_BLOBS, db_err, open_db};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    #[error("no space left on the cache volume ({context})")]
    NoSpace { context: String },
    #[error("index database: {0}")]
    Db(#[from] rocksdb::Error),
    #[error(
        "the index at {0} is in use by another process (is a kiln-cache-server running on it?)"
    )]
    Locked(PathBuf),
    #[error(transparent)]
    Contract(#[from] ContractError),
    #[error(
        "namespace {0:?} is invalid (1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit)"
    )]
    BadNamespace(String),
    #[error("corrupt index record: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if crate::content::is_no_space(&source) {
            StoreError::NoSpace { context }
        } else {
            StoreError::Io { context, source }
        }
    }

    /// True when the failure is a full disk or exhausted quota.
    pub fn is_no_space(&self) -> bool {
        matches!(self, StoreError::NoSpace { .. })
    }
}

impl From<InvalidNamespace> for StoreError {
    fn from(e: InvalidNamespace) -> Self {
        StoreError::BadNamespace(e.0)
    }
}

impl From<ContentError> for StoreError {
    fn from(e: ContentError) -> Self {
        match e {
            ContentError::Io { context, source } => StoreError::io(context, source),
            ContentError::DigestMismatch { expected, actual } => {
                ContractError::DigestMismatch { expected, actual }.into()
            }
            ContentError::NotFound(digest) => ContractError::MissingBlob(digest).into(),
            // The index never states a size when committing a blob.
            e @ ContentError::SizeMismatch { .. } => StoreError::Corrupt(e.to_string()),
        }
    }
}

impl Classify for StoreError {
    fn class(&self) -> ErrorClass {
        match self {
            StoreError::NoSpace { .. } => ErrorClass::Full,
            StoreError::Contract(e) => e.class(),
            StoreError::BadNamespace(_) => ErrorClass::Invalid,
            StoreError::Io { .. }
            | StoreError::Db(_)
            | StoreError::Locked(_)
            | StoreError::Corrupt(_) => ErrorClass::Internal,
        }
    }
}

/// Tunables of a store; see docs/cache-server.md for the matching flags.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Evict least-recently-used entries (then unreferenced blobs) above
    /// this many blob bytes. `None`: unlimited.
    pub max_size: Option<u64>,
    /// Entries older than this (since creation) are not served and are
    /// removed by GC. `None`: entries never expire.
    pub entry_ttl: Option<Duration>,
    /// An unreferenced blob younger than this survives GC, so a client has
    /// time to PUT the entry naming the blob it just uploaded.
    pub blob_grace: Duration,
    /// RocksDB block cache shared by all column families.
    pub block_cache_bytes: usize,
    /// Accesses closer together than this are not re-recorded, so hot
    /// lookups do not turn into a write each.
    pub access_granularity: Duration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_size: None,
            entry_ttl: None,
            blob_grace: Duration::from_secs(600),
            block_cache_bytes: 64 << 20,
            access_granularity: Duration::from_secs(60),
        }
    }
}

/// Handle to an open store; cheap to clone, shared by all requests.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    content: ContentStore,
    config: StoreConfig,
    data: PathBuf,
    lock: Mutex<()>,
    pins: Mutex<HashMap<Digest, u64>>,
    entries: AtomicU64,
    blobs: AtomicU64,
    bytes: AtomicU64,
    hits: AtomicU64,
    misses: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
    blobs_removed: AtomicU64,
    gc_runs: AtomicU64,
    recovery: Mutex<RecoveryReport>,
    /// Accesses seen while the lock was busy, not yet recorded.
    pending_touches: Mutex<Vec<(Vec<u8>, u64)>>,
}

const MAX_PENDING_TOUCHES: usize = 100_000;

impl Store {
    /// Opens (creating if needed) the store in `data`: `data/index` for
    /// RocksDB, `data/blobs`, `data/tmp` and `data/quarantine` for files.
    /// Reconciles the index with the files before returning.
    pub fn open(data: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data)
            .map_err(|e| StoreError::io(format!("creating {}", data.display()), e))?;
        let content = ContentStore::new(data)?;
        let db = open_db(&data.join("index"), &config)?;
        let store = Store {
            inner: Arc::new(Inner {
                db,
                content,
                config,
                data: data.to_owned(),
                lock: Mutex::new(()),
                pins: Mutex::new(HashMap::new()),
                entries: AtomicU64::new(0),
                blobs: AtomicU64::new(0),
                bytes: AtomicU64::new(0),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
                evicted: AtomicU64::new(0),
                expired: AtomicU64::new(0),
                blobs_removed: AtomicU64::new(0),
                gc_runs: AtomicU64::new(0),
                recovery: Mutex::new(RecoveryReport::default()),
                pending_touches: Mutex::new(Vec::new()),
            }),
        };
        let report = store.recover()?;
        *lock(&store.inner.recovery) = report;
        Ok(store)
    }

    pub fn data_dir(&self) -> &Path {
        &self.inner.data
    }

    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    /// What reconciliation at [`Store::open`] repaired.
    pub fn recovery_report(&self) -> RecoveryReport {
        lock(&self.inner.recovery).clone()
    }

    fn cf(&self, name: &str) -> Result<&ColumnFamily, StoreError> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| StoreError::Corrupt(format!("column family {name} is missing")))
    }

    fn write_lock(&self) -> MutexGuard<'_, ()> {
        lock(&self.inner.lock)
    }

    fn blob_meta(&self, digest: &Digest) -> Result<Option<BlobMeta>, StoreError> {
        match self
            .inner
            .db
            .get_pinned_cf(self.cf(CF_BLOBS)?, digest_key(digest)?)
            .map_err(db_err)?
        {
            Some(v) => Ok(Some(BlobMeta::decode(&v)?)),
            None => Ok(None),
        }
    }

    fn expired(&self, created_ms: u64, now: u64) -> bool {
        self.inner
            .config
            .entry_ttl
            .is_some_and(|ttl| now.saturating_sub(created_ms) > ttl.as_millis() as u64)
    }

    fn stale(&self, accessed_ms: u64, now: u64) -> bool {
        now.saturating_sub(accessed_ms) >= self.inner.config.access_granularity.as_millis() as u64
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves no half-applied
    // state (RocksDB batches are atomic), so a poisoned lock is usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
