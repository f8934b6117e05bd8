//! The cache store: a RocksDB index over the filesystem content store.
//!
//! This is the whole storage engine, usable without HTTP (the executor's
//! embedded cache opens it on a local directory). It promises:
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

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use kiln_common::{CacheEntry, CacheKey, Digest, Sha256Writer};
use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamily, ColumnFamilyDescriptor, DB, DBCompressionType,
    Direction, IteratorMode, Options, WriteBatch, WriteOptions,
};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use crate::content::{self, ContentStore};

const CF_ENTRIES: &str = "entries";
const CF_LRU: &str = "lru";
const CF_BLOBS: &str = "blobs";
const ENTRY_VALUE_VERSION: u8 = 1;
const ENTRY_HEADER: usize = 17;

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
    #[error("uploaded content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the entry names blob {0}, which this cache does not have; upload it first")]
    MissingBlob(Digest),
    #[error(
        "the entry says blob {digest} has {entry_size} bytes, but the stored blob has {blob_size}"
    )]
    LayerSizeMismatch {
        digest: Digest,
        entry_size: u64,
        blob_size: u64,
    },
    #[error(
        "namespace {0:?} is invalid (1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit)"
    )]
    BadNamespace(String),
    #[error("corrupt index record: {0}")]
    Corrupt(String),
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: io::Error) -> Self {
        let context = context.into();
        if content::is_no_space(&source) {
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

fn db_err(e: rocksdb::Error) -> StoreError {
    let text = e.to_string();
    if text.contains("No space left") || text.contains("Disk quota exceeded") {
        StoreError::NoSpace { context: text }
    } else {
        StoreError::Db(e)
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

/// A tenant's view of the entries. The default namespace is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Namespace(String);

impl Namespace {
    pub fn new(name: &str) -> Result<Self, StoreError> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(StoreError::BadNamespace(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn prefix(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(1 + self.0.len() + 32);
        p.push(self.0.len() as u8);
        p.extend_from_slice(self.0.as_bytes());
        p
    }

    fn index_key(&self, key: &CacheKey) -> Vec<u8> {
        let mut k = self.prefix();
        k.extend_from_slice(key.as_bytes());
        k
    }
}

impl TryFrom<String> for Namespace {
    type Error = StoreError;
    fn try_from(s: String) -> Result<Self, StoreError> {
        if s.is_empty() {
            Ok(Self::default())
        } else {
            Self::new(&s)
        }
    }
}

impl From<Namespace> for String {
    fn from(ns: Namespace) -> String {
        ns.0
    }
}

/// Result of [`Store::put_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PutOutcome {
    Created,
    /// The same entry was already stored.
    Identical,
    /// A different entry is stored under this key and stays.
    Conflict {
        existing: Box<CacheEntry>,
    },
}

/// Result of [`BlobWriter::commit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobCommit {
    Created,
    /// Another upload had already stored these bytes.
    Existed,
}

/// Index metadata of a stored blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobInfo {
    pub digest: Digest,
    pub size: u64,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub references: u64,
}

/// An entry with its bookkeeping, as listed by admin calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub key: CacheKey,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub entry: CacheEntry,
}

/// Counters and sizes for `stats` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Stats {
    pub entries: u64,
    pub blobs: u64,
    pub blob_bytes: u64,
    pub max_size: Option<u64>,
    pub lookups_hit: u64,
    pub lookups_miss: u64,
    pub hit_ratio: f64,
    pub entries_evicted: u64,
    pub entries_expired: u64,
    pub blobs_removed: u64,
    pub gc_runs: u64,
    pub pinned_blobs: u64,
}

/// What one GC pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub entries_expired: u64,
    pub entries_evicted: u64,
    pub blobs_removed: u64,
    pub bytes_freed: u64,
    /// Unreferenced blobs kept because an upload or download held them.
    pub blobs_pinned: u64,
}

/// What [`Store::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VerifyReport {
    pub blobs_checked: u64,
    pub bytes_checked: u64,
    pub corrupt: Vec<Digest>,
    pub missing: Vec<Digest>,
    pub entries_dropped: u64,
    pub quarantined: bool,
}

/// What start-up reconciliation repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    pub temp_files_removed: u64,
    pub blobs_adopted: u64,
    pub blobs_missing: Vec<Digest>,
    pub entries_dropped: u64,
    pub references_fixed: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct BlobMeta {
    size: u64,
    created_ms: u64,
    accessed_ms: u64,
    refs: u64,
}

impl BlobMeta {
    fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [self.size, self.created_ms, self.accessed_ms, self.refs]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != 32 {
            return Err(StoreError::Corrupt(format!(
                "blob record has {} bytes, expected 32",
                bytes.len()
            )));
        }
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Ok(Self {
            size: at(0),
            created_ms: at(1),
            accessed_ms: at(2),
            refs: at(3),
        })
    }
}

struct EntryValue {
    created_ms: u64,
    accessed_ms: u64,
    entry: CacheEntry,
}

fn encode_entry(created_ms: u64, accessed_ms: u64, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_HEADER + json.len());
    v.push(ENTRY_VALUE_VERSION);
    v.extend_from_slice(&created_ms.to_be_bytes());
    v.extend_from_slice(&accessed_ms.to_be_bytes());
    v.extend_from_slice(json);
    v
}

fn decode_entry(bytes: &[u8]) -> Result<EntryValue, StoreError> {
    if bytes.len() < ENTRY_HEADER || bytes[0] != ENTRY_VALUE_VERSION {
        return Err(StoreError::Corrupt("entry record header".into()));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[1..9]);
    let created_ms = u64::from_be_bytes(b);
    b.copy_from_slice(&bytes[9..17]);
    let accessed_ms = u64::from_be_bytes(b);
    let entry = serde_json::from_slice(&bytes[ENTRY_HEADER..])
        .map_err(|e| StoreError::Corrupt(format!("entry JSON: {e}")))?;
    Ok(EntryValue {
        created_ms,
        accessed_ms,
        entry,
    })
}

fn lru_key(accessed_ms: u64, index_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + index_key.len());
    k.extend_from_slice(&accessed_ms.to_be_bytes());
    k.extend_from_slice(index_key);
    k
}

fn digest_key(d: &Digest) -> Result<[u8; 32], StoreError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(d.hex(), &mut out)
        .map_err(|e| StoreError::Corrupt(format!("digest {d}: {e}")))?;
    Ok(out)
}

fn digest_from_key(bytes: &[u8]) -> Result<Digest, StoreError> {
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("blob key is not 32 bytes".into()))?;
    Ok(Digest::from_sha256(raw))
}

fn key_from_index_key(ik: &[u8]) -> Result<CacheKey, StoreError> {
    let raw: [u8; 32] = ik
        .get(ik.len().saturating_sub(32)..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("entry key too short".into()))?;
    Ok(CacheKey::from_bytes(raw))
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn durable() -> WriteOptions {
    let mut w = WriteOptions::default();
    w.set_sync(true);
    w
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

fn open_db(path: &Path, config: &StoreConfig) -> Result<DB, StoreError> {
    // One LRU block cache for all column families: entries are read on
    // every lookup and should stay in memory; the budget is explicit so the
    // server's memory use is predictable.
    let cache = Cache::new_lru_cache(config.block_cache_bytes);

    let mut db_opts = Options::default();
    db_opts.create_if_missing(true);
    db_opts.create_missing_column_families(true);
    // Background flushes and compactions: the machine is small, two jobs
    // keep compaction from blocking writes without starving requests.
    db_opts.increase_parallelism(2);
    db_opts.set_max_background_jobs(2);
    // Bound the WAL so recovery after a crash replays little, and keep few
    // info logs around on a cache volume.
    db_opts.set_max_total_wal_size(32 << 20);
    db_opts.set_keep_log_file_num(3);
    db_opts.set_bytes_per_sync(1 << 20);

    // Point lookups by key dominate: a full-key bloom filter (10 bits/key,
    // ~1% false positives) lets a miss skip reading data blocks, and
    // caching index and filter blocks (pinned for L0) keeps them in RAM.
    let point_table = || {
        let mut t = BlockBasedOptions::default();
        t.set_block_cache(&cache);
        t.set_bloom_filter(10.0, false);
        t.set_cache_index_and_filter_blocks(true);
        t.set_pin_l0_filter_and_index_blocks_in_cache(true);
        t.set_format_version(5);
        t
    };
    let mut entries = Options::default();
    entries.set_block_based_table_factory(&point_table());
    // Entries are small JSON documents: LZ4 is cheap and halves them.
    entries.set_compression_type(DBCompressionType::Lz4);
    entries.set_level_compaction_dynamic_level_bytes(true);
    // Small memtables: the index is tiny next to the blobs, and a small
    // write buffer keeps the WAL preallocation small on small volumes.
    entries.set_write_buffer_size(8 << 20);

    let mut blobs = Options::default();
    blobs.set_block_based_table_factory(&point_table());
    blobs.set_write_buffer_size(4 << 20);
    blobs.set_level_compaction_dynamic_level_bytes(true);

    // The LRU order is only ever scanned from the oldest end, never probed
    // by key, so a bloom filter would be memory spent for nothing.
    let mut lru_table = BlockBasedOptions::default();
    lru_table.set_block_cache(&cache);
    let mut lru = Options::default();
    lru.set_block_based_table_factory(&lru_table);
    lru.set_write_buffer_size(4 << 20);
    lru.set_level_compaction_dynamic_level_bytes(true);

    let cfs = vec![
        ColumnFamilyDescriptor::new(CF_ENTRIES, entries),
        ColumnFamilyDescriptor::new(CF_LRU, lru),
        ColumnFamilyDescriptor::new(CF_BLOBS, blobs),
    ];
    DB::open_cf_descriptors(&db_opts, path, cfs).map_err(|e| {
        let text = e.to_string();
        if text.contains("lock") && (text.contains("unavailable") || text.contains("held")) {
            StoreError::Locked(path.to_owned())
        } else {
            db_err(e)
        }
    })
}

impl Store {
    /// Opens (creating if needed) the store in `data`: `data/index` for
    /// RocksDB, `data/blobs`, `data/tmp` and `data/quarantine` for files.
    /// Reconciles the index with the files before returning.
    pub fn open(data: &Path, config: StoreConfig) -> Result<Store, StoreError> {
        std::fs::create_dir_all(data)
            .map_err(|e| StoreError::io(format!("creating {}", data.display()), e))?;
        let content = ContentStore::open(data).map_err(|e| {
            StoreError::io(format!("creating directories in {}", data.display()), e)
        })?;
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

    // ---- start-up reconciliation -------------------------------------

    fn recover(&self) -> Result<RecoveryReport, StoreError> {
        let _guard = self.write_lock();
        let mut report = RecoveryReport {
            temp_files_removed: self
                .inner
                .content
                .remove_temp_files()
                .map_err(|e| StoreError::io("removing leftover upload files", e))?
                as u64,
            ..Default::default()
        };
        let (files, strays) = self
            .inner
            .content
            .scan()
            .map_err(|e| StoreError::io("scanning the blob directory", e))?;
        for stray in strays {
            warn!(path = %stray.display(), "ignoring a file in the blob directory that is not a blob");
        }
        let on_disk: HashMap<Digest, u64> = files.into_iter().collect();
        let db = &self.inner.db;
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let now = now_ms();

        let mut metas: HashMap<Digest, BlobMeta> = HashMap::new();
        for item in db.iterator_cf(cf_blobs, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let digest = digest_from_key(&k)?;
            let meta = BlobMeta::decode(&v)?;
            if on_disk.contains_key(&digest) {
                metas.insert(digest, meta);
            } else {
                warn!(%digest, "blob is in the index but missing on disk; dropping it and the entries naming it");
                batch.delete_cf(cf_blobs, &k);
                report.blobs_missing.push(digest);
            }
        }
        for (digest, size) in &on_disk {
            if !metas.contains_key(digest) {
                // Renamed into place (so verified) but the index write was
                // lost to a crash: adopt it as unreferenced.
                report.blobs_adopted += 1;
                metas.insert(
                    digest.clone(),
                    BlobMeta {
                        size: *size,
                        created_ms: now,
                        accessed_ms: now,
                        refs: 0,
                    },
                );
            }
        }

        let mut refs: HashMap<Digest, u64> = HashMap::new();
        let mut entries = 0u64;
        for item in db.iterator_cf(cf_entries, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let value = match decode_entry(&v) {
                Ok(value) => value,
                Err(e) => {
                    warn!(error = %e, "dropping an unreadable index entry");
                    batch.delete_cf(cf_entries, &k);
                    report.entries_dropped += 1;
                    continue;
                }
            };
            if let Some(layer) = &value.entry.layer {
                if !metas.contains_key(&layer.digest) {
                    warn!(key = %key_from_index_key(&k)?, digest = %layer.digest,
                        "dropping an entry whose blob is missing");
                    batch.delete_cf(cf_entries, &k);
                    batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &k));
                    report.entries_dropped += 1;
                    continue;
                }
                *refs.entry(layer.digest.clone()).or_default() += 1;
            }
            entries += 1;
        }

        let mut bytes = 0u64;
        for (digest, meta) in &mut metas {
            let want = refs.get(digest).copied().unwrap_or(0);
            let size = on_disk.get(digest).copied().unwrap_or(meta.size);
            if meta.refs != want || meta.size != size {
                report.references_fixed += u64::from(meta.refs != want);
                meta.refs = want;
                meta.size = size;
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            } else if report.blobs_adopted > 0 {
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            }
            bytes += meta.size;
        }
        db.write_opt(batch, &durable()).map_err(db_err)?;

        self.inner.entries.store(entries, Ordering::Relaxed);
        self.inner
            .blobs
            .store(metas.len() as u64, Ordering::Relaxed);
        self.inner.bytes.store(bytes, Ordering::Relaxed);
        info!(
            entries,
            blobs = metas.len(),
            bytes,
            temp_files_removed = report.temp_files_removed,
            blobs_adopted = report.blobs_adopted,
            blobs_missing = report.blobs_missing.len(),
            entries_dropped = report.entries_dropped,
            "store opened"
        );
        Ok(report)
    }

    // ---- entries -----------------------------------------------------

    /// Stores `entry` under `key` unless one is already there
    /// (first writer wins). The blob it names must be stored already.
    pub fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, StoreError> {
        let outcome = self.put_entry_unsynced(ns, key, entry)?;
        if !matches!(outcome, PutOutcome::Conflict { .. }) {
            // Identical too: the first writer may not have synced yet.
            self.sync_wal()?;
        }
        Ok(outcome)
    }

    /// Syncs the WAL. Called after the write lock is released, so
    /// concurrent writers share fsyncs (group commit) instead of queueing
    /// one fsync each behind the lock; nothing is acknowledged before it.
    fn sync_wal(&self) -> Result<(), StoreError> {
        self.inner.db.flush_wal(true).map_err(db_err)
    }

    fn put_entry_unsynced(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, StoreError> {
        let json = serde_json::to_vec(entry)
            .map_err(|e| StoreError::Corrupt(format!("serializing entry: {e}")))?;
        let ik = ns.index_key(key);
        let now = now_ms();
        let _guard = self.write_lock();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let mut deltas: HashMap<Digest, i64> = HashMap::new();
        let mut replaced = false;
        if let Some(raw) = self
            .inner
            .db
            .get_pinned_cf(cf_entries, &ik)
            .map_err(db_err)?
        {
            let existing = decode_entry(&raw)?;
            if !self.expired(existing.created_ms, now) {
                return Ok(if existing.entry == *entry {
                    PutOutcome::Identical
                } else {
                    PutOutcome::Conflict {
                        existing: Box::new(existing.entry),
                    }
                });
            }
            // An expired entry is as good as absent: replace it.
            batch.delete_cf(cf_lru, lru_key(existing.accessed_ms, &ik));
            if let Some(layer) = &existing.entry.layer {
                *deltas.entry(layer.digest.clone()).or_default() -= 1;
            }
            replaced = true;
        }
        if let Some(layer) = &entry.layer {
            let meta = self
                .blob_meta(&layer.digest)?
                .ok_or_else(|| StoreError::MissingBlob(layer.digest.clone()))?;
            let on_disk = self
                .inner
                .content
                .file_size(&layer.digest)
                .map_err(|e| StoreError::io(format!("checking blob {}", layer.digest), e))?;
            if on_disk.is_none() {
                return Err(StoreError::MissingBlob(layer.digest.clone()));
            }
            if meta.size != layer.size {
                return Err(StoreError::LayerSizeMismatch {
                    digest: layer.digest.clone(),
                    entry_size: layer.size,
                    blob_size: meta.size,
                });
            }
            *deltas.entry(layer.digest.clone()).or_default() += 1;
        }
        self.apply_ref_deltas(&mut batch, cf_blobs, &deltas)?;
        batch.put_cf(cf_entries, &ik, encode_entry(now, now, &json));
        batch.put_cf(cf_lru, lru_key(now, &ik), b"");
        self.inner.db.write(batch).map_err(db_err)?;
        if !replaced {
            self.inner.entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PutOutcome::Created)
    }

    fn apply_ref_deltas(
        &self,
        batch: &mut WriteBatch,
        cf_blobs: &ColumnFamily,
        deltas: &HashMap<Digest, i64>,
    ) -> Result<(), StoreError> {
        for (digest, delta) in deltas {
            if *delta == 0 {
                continue;
            }
            if let Some(mut meta) = self.blob_meta(digest)? {
                meta.refs = meta.refs.saturating_add_signed(*delta);
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            }
        }
        Ok(())
    }

    /// The entry under `key`, if present and not expired.
    pub fn get_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<Option<CacheEntry>, StoreError> {
        Ok(self.lookup(ns, std::slice::from_ref(key))?.remove(key))
    }

    /// The entries present for `keys` (misses are simply absent). Records
    /// the access for LRU eviction and the hit/miss counters.
    pub fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, StoreError> {
        let cf_entries = self.cf(CF_ENTRIES)?;
        let index_keys: Vec<Vec<u8>> = keys.iter().map(|k| ns.index_key(k)).collect();
        let values = self
            .inner
            .db
            .batched_multi_get_cf(cf_entries, &index_keys, false);
        let now = now_ms();
        let mut found = BTreeMap::new();
        let mut to_touch = Vec::new();
        for ((key, ik), value) in keys.iter().zip(&index_keys).zip(values) {
            let Some(raw) = value.map_err(db_err)? else {
                continue;
            };
            let value = decode_entry(&raw)?;
            if self.expired(value.created_ms, now) {
                continue;
            }
            if self.stale(value.accessed_ms, now) {
                to_touch.push(ik.clone());
            }
            found.insert(*key, value.entry);
        }
        let hits = found.len() as u64;
        self.inner.hits.fetch_add(hits, Ordering::Relaxed);
        self.inner
            .misses
            .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        if !to_touch.is_empty() {
            self.touch_entries(to_touch, now)?;
        }
        Ok(found)
    }

    fn touch_entries(&self, keys: Vec<Vec<u8>>, now: u64) -> Result<(), StoreError> {
        // When a GC pass or a write holds the lock, park the accesses
        // instead of stalling the lookup; whoever takes the lock next (the
        // next touch, or eviction before it picks victims) records them.
        let _guard = match self.inner.lock.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let mut pending = lock(&self.inner.pending_touches);
                // Bounded: beyond this, accesses are dropped (they only
                // refine the LRU order).
                if pending.len() < MAX_PENDING_TOUCHES {
                    pending.extend(keys.into_iter().map(|ik| (ik, now)));
                }
                return Ok(());
            }
        };
        let mut touches: Vec<(Vec<u8>, u64)> = keys.into_iter().map(|ik| (ik, now)).collect();
        touches.append(&mut lock(&self.inner.pending_touches));
        self.record_touches_locked(touches)
    }

    /// Records accesses (index key, time); caller holds the write lock.
    fn record_touches_locked(&self, touches: Vec<(Vec<u8>, u64)>) -> Result<(), StoreError> {
        if touches.is_empty() {
            return Ok(());
        }
        let (cf_entries, cf_lru) = (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?);
        // Latest time per entry; one rewrite each.
        let mut latest: HashMap<Vec<u8>, u64> = HashMap::new();
        for (ik, at) in touches {
            let t = latest.entry(ik).or_default();
            *t = (*t).max(at);
        }
        let mut batch = WriteBatch::default();
        for (ik, at) in latest {
            // Re-read under the lock: the entry may have been deleted since
            // the unlocked read and must not be resurrected.
            let Some(raw) = self.inner.db.get_cf(cf_entries, &ik).map_err(db_err)? else {
                continue;
            };
            let value = decode_entry(&raw)?;
            if value.accessed_ms >= at {
                continue;
            }
            let mut updated = raw;
            updated[9..17].copy_from_slice(&at.to_be_bytes());
            batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &ik));
            batch.put_cf(cf_lru, lru_key(at, &ik), b"");
            batch.put_cf(cf_entries, &ik, updated);
        }
        // Access times are a hint for eviction; losing the last few to a
        // crash is harmless, so no fsync here.
        self.inner.db.write(batch).map_err(db_err)
    }

    /// Removes the entry under `key`; false when there was none. Its blob
    /// stays until GC finds it unreferenced.
    pub fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, StoreError> {
        let ik = ns.index_key(key);
        let _guard = self.write_lock();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let Some(raw) = self.inner.db.get_cf(cf_entries, &ik).map_err(db_err)? else {
            return Ok(false);
        };
        let value = decode_entry(&raw)?;
        let mut batch = WriteBatch::default();
        self.remove_entry_into(&mut batch, cf_entries, cf_lru, cf_blobs, &ik, &value)?;
        self.inner.db.write_opt(batch, &durable()).map_err(db_err)?;
        self.inner.entries.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    fn remove_entry_into(
        &self,
        batch: &mut WriteBatch,
        cf_entries: &ColumnFamily,
        cf_lru: &ColumnFamily,
        cf_blobs: &ColumnFamily,
        ik: &[u8],
        value: &EntryValue,
    ) -> Result<(), StoreError> {
        batch.delete_cf(cf_entries, ik);
        batch.delete_cf(cf_lru, lru_key(value.accessed_ms, ik));
        if let Some(layer) = &value.entry.layer {
            let deltas = HashMap::from([(layer.digest.clone(), -1)]);
            self.apply_ref_deltas(batch, cf_blobs, &deltas)?;
        }
        Ok(())
    }

    /// Entries of a namespace in key order, optionally only keys whose hex
    /// starts with `prefix`, starting after `after`, at most `limit`.
    pub fn list_entries(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>, StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        let ns_prefix = ns.prefix();
        let mut start = ns_prefix.clone();
        match after {
            Some(k) => start.extend_from_slice(k.as_bytes()),
            None => {
                let even = &prefix[..prefix.len() & !1];
                start.extend(hex::decode(even).unwrap_or_default());
            }
        }
        let now = now_ms();
        let mut out = Vec::new();
        let iter = self.inner.db.iterator_cf(
            self.cf(CF_ENTRIES)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&ns_prefix) || k.len() != ns_prefix.len() + 32 {
                break;
            }
            let key = key_from_index_key(&k)?;
            if after == Some(&key) {
                continue;
            }
            let hex = key.to_hex();
            if !hex.starts_with(&prefix) {
                if hex.as_str() > prefix.as_str() {
                    break;
                }
                continue;
            }
            let value = decode_entry(&v)?;
            if self.expired(value.created_ms, now) {
                continue;
            }
            out.push(EntryRecord {
                key,
                created_ms: value.created_ms,
                last_access_ms: value.accessed_ms,
                entry: value.entry,
            });
        }
        Ok(out)
    }

    // ---- blobs -------------------------------------------------------

    /// A writer for a new blob; nothing is visible until
    /// [`BlobWriter::commit`] succeeds.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        let (path, file) = self
            .inner
            .content
            .create_temp()
            .map_err(|e| StoreError::io("creating an upload file", e))?;
        Ok(BlobWriter {
            store: self.clone(),
            path: Some(path),
            out: Some(Sha256Writer::new(BufWriter::with_capacity(1 << 20, file))),
            written_back: 0,
        })
    }

    fn install_blob(
        &self,
        temp: &Path,
        digest: &Digest,
        size: u64,
    ) -> Result<BlobCommit, StoreError> {
        let _guard = self.write_lock();
        let created = self
            .inner
            .content
            .install(temp, digest)
            .map_err(|e| StoreError::io(format!("storing blob {digest}"), e))?;
        let existing = self.blob_meta(digest)?;
        let now = now_ms();
        if !created && existing.is_some() {
            return Ok(BlobCommit::Existed);
        }
        let meta = match existing {
            Some(meta) => BlobMeta { size, ..meta },
            None => BlobMeta {
                size,
                created_ms: now,
                accessed_ms: now,
                refs: 0,
            },
        };
        // No WAL sync needed: the file itself is durable (fsynced, renamed,
        // directory fsynced), and recovery adopts a blob file whose index
        // record was lost.
        self.inner
            .db
            .put_cf(self.cf(CF_BLOBS)?, digest_key(digest)?, meta.encode())
            .map_err(db_err)?;
        if existing.is_none() {
            self.inner.blobs.fetch_add(1, Ordering::Relaxed);
            self.inner.bytes.fetch_add(size, Ordering::Relaxed);
        }
        Ok(if created {
            BlobCommit::Created
        } else {
            BlobCommit::Existed
        })
    }

    /// Adopts the file at `src` as blob `expected` by hard-linking it into
    /// the content store: one copy of the bytes on disk, shared with
    /// whoever owns `src` (the embedded cache and the executor's local
    /// store under one `--cache-dir`). The bytes are hashed first and
    /// refused unless they match `expected`. `Ok(None)` when `src` cannot be
    /// linked here (another filesystem, links not permitted): the caller
    /// copies instead. Committed blobs are never written in place, so
    /// sharing the inode is safe.
    pub fn link_blob(
        &self,
        src: &Path,
        expected: &Digest,
    ) -> Result<Option<BlobCommit>, StoreError> {
        if self.blob_meta(expected)?.is_some() && self.inner.content.blob_path(expected).is_file() {
            return Ok(Some(BlobCommit::Existed));
        }
        let temp = match self.inner.content.link_temp(src) {
            Ok(p) => p,
            Err(e) if content::cannot_link(&e) => return Ok(None),
            Err(e) => {
                return Err(StoreError::io(
                    format!("linking {} into the content store", src.display()),
                    e,
                ));
            }
        };
        let checked =
            hash_file(&temp).map_err(|e| StoreError::io(format!("reading {}", src.display()), e));
        let result = match checked {
            Ok((actual, _)) if actual != *expected => Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            }),
            Ok((_, size)) => self.install_blob(&temp, expected, size).map(Some),
            Err(e) => Err(e),
        };
        if result.is_err() {
            let _ = std::fs::remove_file(&temp);
        }
        result
    }

    /// Where a committed blob's file is. Only meaningful while the blob is
    /// pinned (an [`OpenBlob`] is held): eviction may remove it otherwise.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.content.blob_path(digest)
    }

    /// Index metadata of a stored blob.
    pub fn stat_blob(&self, digest: &Digest) -> Result<Option<BlobInfo>, StoreError> {
        Ok(self.blob_meta(digest)?.map(|m| BlobInfo {
            digest: digest.clone(),
            size: m.size,
            created_ms: m.created_ms,
            last_access_ms: m.accessed_ms,
            references: m.refs,
        }))
    }

    /// Opens a stored blob for reading. The returned handle pins the blob:
    /// eviction leaves it alone until the handle is dropped.
    pub fn open_blob(&self, digest: &Digest) -> Result<Option<OpenBlob>, StoreError> {
        let pin = self.pin(digest);
        let Some(meta) = self.blob_meta(digest)? else {
            return Ok(None);
        };
        let path = self.inner.content.blob_path(digest);
        let file = match File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::io(format!("opening {}", path.display()), e)),
        };
        let size = file
            .metadata()
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?
            .len();
        let now = now_ms();
        if self.stale(meta.accessed_ms, now) {
            let _guard = self.write_lock();
            if let Some(mut current) = self.blob_meta(digest)? {
                current.accessed_ms = now;
                self.inner
                    .db
                    .put_cf(self.cf(CF_BLOBS)?, digest_key(digest)?, current.encode())
                    .map_err(db_err)?;
            }
        }
        Ok(Some(OpenBlob { file, size, pin }))
    }

    /// Keeps `digest` from being evicted or collected until the guard drops
    /// (uploads pin the digest they are writing).
    pub fn pin(&self, digest: &Digest) -> PinGuard {
        *lock(&self.inner.pins).entry(digest.clone()).or_default() += 1;
        PinGuard {
            store: self.clone(),
            digest: digest.clone(),
        }
    }

    fn is_pinned(&self, digest: &Digest) -> bool {
        lock(&self.inner.pins).contains_key(digest)
    }

    // ---- maintenance -------------------------------------------------

    /// True when stored blob bytes exceed `max_size`.
    pub fn over_limit(&self) -> bool {
        self.inner
            .config
            .max_size
            .is_some_and(|max| self.inner.bytes.load(Ordering::Relaxed) > max)
    }

    /// One GC pass: drop expired entries, unreferenced blobs older than the
    /// grace period, then evict least-recently-used entries (and the blobs
    /// only they referenced) until under `max_size`.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _guard = self.write_lock();
        self.inner.gc_runs.fetch_add(1, Ordering::Relaxed);
        let mut report = GcReport::default();
        let now = now_ms();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);

        if self.inner.config.entry_ttl.is_some() {
            let mut batch = WriteBatch::default();
            for item in self.inner.db.iterator_cf(cf_entries, IteratorMode::Start) {
                let (k, v) = item.map_err(db_err)?;
                let value = decode_entry(&v)?;
                if self.expired(value.created_ms, now) {
                    // Written per entry: two expired entries may share a blob
                    // and each decrement must see the previous one.
                    self.remove_entry_into(&mut batch, cf_entries, cf_lru, cf_blobs, &k, &value)?;
                    self.inner
                        .db
                        .write(std::mem::take(&mut batch))
                        .map_err(db_err)?;
                    report.entries_expired += 1;
                }
            }
            self.inner
                .entries
                .fetch_sub(report.entries_expired, Ordering::Relaxed);
            self.inner
                .expired
                .fetch_add(report.entries_expired, Ordering::Relaxed);
        }

        let grace = self.inner.config.blob_grace.as_millis() as u64;
        self.collect_blobs(&mut report, |meta| {
            now.saturating_sub(meta.created_ms) >= grace
        })?;

        if let Some(max) = self.inner.config.max_size {
            self.evict_locked(max, &mut report)?;
            // Still over? What is left is unreferenced blobs within their
            // grace period (uploads whose entries have not arrived yet) and
            // pinned ones: they are kept, the limit is exceeded briefly.
        }
        // Eviction batches skip fsync (recovery repairs a lost one); make
        // the pass durable once at the end.
        self.inner.db.flush_wal(true).map_err(db_err)?;
        info!(?report, "gc finished");
        Ok(report)
    }

    /// Evicts least-recently-used entries, and the blobs only they
    /// referenced, until stored blob bytes are at most `max_bytes` (or no
    /// entry is left). Pinned blobs stay until a later pass.
    pub fn evict(&self, max_bytes: u64) -> Result<GcReport, StoreError> {
        let _guard = self.write_lock();
        let mut report = GcReport::default();
        self.evict_locked(max_bytes, &mut report)?;
        self.inner.db.flush_wal(true).map_err(db_err)?;
        Ok(report)
    }

    /// Caller holds the write lock.
    fn evict_locked(&self, max: u64, report: &mut GcReport) -> Result<(), StoreError> {
        // The LRU order must include accesses parked while the lock was busy.
        let parked = std::mem::take(&mut *lock(&self.inner.pending_touches));
        self.record_touches_locked(parked)?;
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut lru_iter = self.inner.db.iterator_cf(cf_lru, IteratorMode::Start);
        while self.inner.bytes.load(Ordering::Relaxed) > max {
            let Some(item) = lru_iter.next() else { break };
            let (lk, _) = item.map_err(db_err)?;
            if lk.len() < 8 {
                continue;
            }
            let ik = &lk[8..];
            let mut batch = WriteBatch::default();
            match self.inner.db.get_cf(cf_entries, ik).map_err(db_err)? {
                Some(raw) => {
                    let value = decode_entry(&raw)?;
                    if lru_key(value.accessed_ms, ik) != lk.as_ref() {
                        batch.delete_cf(cf_lru, &lk);
                    } else {
                        self.remove_entry_into(
                            &mut batch, cf_entries, cf_lru, cf_blobs, ik, &value,
                        )?;
                        report.entries_evicted += 1;
                        self.inner.entries.fetch_sub(1, Ordering::Relaxed);
                        self.inner.evicted.fetch_add(1, Ordering::Relaxed);
                        crate::telemetry::record_eviction(
                            now_ms().saturating_sub(value.accessed_ms),
                        );
                    }
                    self.inner.db.write(batch).map_err(db_err)?;
                    if let Some(layer) = &value.entry.layer {
                        self.remove_blob_if_unreferenced(&layer.digest, report)?;
                    }
                }
                None => {
                    batch.delete_cf(cf_lru, &lk);
                    self.inner.db.write(batch).map_err(db_err)?;
                }
            }
        }
        Ok(())
    }

    fn collect_blobs(
        &self,
        report: &mut GcReport,
        eligible: impl Fn(&BlobMeta) -> bool,
    ) -> Result<(), StoreError> {
        let mut victims = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_BLOBS)?, IteratorMode::Start)
        {
            let (k, v) = item.map_err(db_err)?;
            let meta = BlobMeta::decode(&v)?;
            if meta.refs == 0 && eligible(&meta) {
                victims.push((digest_from_key(&k)?, meta));
            }
        }
        victims.sort_by_key(|(_, m)| m.accessed_ms);
        for (digest, _) in victims {
            self.remove_blob_if_unreferenced(&digest, report)?;
        }
        Ok(())
    }

    /// Caller holds the write lock.
    fn remove_blob_if_unreferenced(
        &self,
        digest: &Digest,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let Some(meta) = self.blob_meta(digest)? else {
            return Ok(());
        };
        if meta.refs > 0 {
            return Ok(());
        }
        if self.is_pinned(digest) {
            report.blobs_pinned += 1;
            return Ok(());
        }
        self.inner
            .db
            .delete_cf(self.cf(CF_BLOBS)?, digest_key(digest)?)
            .map_err(db_err)?;
        self.inner
            .content
            .remove(digest)
            .map_err(|e| StoreError::io(format!("removing blob {digest}"), e))?;
        report.blobs_removed += 1;
        report.bytes_freed += meta.size;
        self.inner.blobs.fetch_sub(1, Ordering::Relaxed);
        self.inner.bytes.fetch_sub(meta.size, Ordering::Relaxed);
        self.inner.blobs_removed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Re-hashes every stored blob. Corrupt or missing blobs are reported;
    /// with `repair`, corrupt ones are moved to `quarantine/` and they and
    /// the entries naming them leave the index.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            quarantined: repair,
            ..Default::default()
        };
        let mut digests = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_BLOBS)?, IteratorMode::Start)
        {
            let (k, _) = item.map_err(db_err)?;
            digests.push(digest_from_key(&k)?);
        }
        for digest in digests {
            let Some(blob) = self.open_blob(&digest)? else {
                if self.blob_meta(&digest)?.is_some() {
                    report.missing.push(digest);
                }
                continue;
            };
            let mut hasher = Sha256Writer::new(io::sink());
            let mut reader = io::BufReader::with_capacity(1 << 20, blob.file);
            io::copy(&mut reader, &mut hasher)
                .map_err(|e| StoreError::io(format!("reading blob {digest}"), e))?;
            let (_, actual, n) = hasher.finish();
            report.blobs_checked += 1;
            report.bytes_checked += n;
            if actual != digest {
                warn!(%digest, %actual, "blob content does not match its digest");
                report.corrupt.push(digest);
            }
        }
        if repair && !(report.corrupt.is_empty() && report.missing.is_empty()) {
            let _guard = self.write_lock();
            let bad: HashSet<Digest> = report
                .corrupt
                .iter()
                .chain(&report.missing)
                .cloned()
                .collect();
            for digest in &report.corrupt {
                let path = self
                    .inner
                    .content
                    .quarantine(digest)
                    .map_err(|e| StoreError::io(format!("quarantining blob {digest}"), e))?;
                warn!(%digest, path = %path.display(), "quarantined a corrupt blob");
            }
            report.entries_dropped = self.drop_blobs_and_entries(&bad)?;
        }
        Ok(report)
    }

    /// Caller holds the write lock.
    fn drop_blobs_and_entries(&self, bad: &HashSet<Digest>) -> Result<u64, StoreError> {
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for item in self.inner.db.iterator_cf(cf_entries, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let value = decode_entry(&v)?;
            if value
                .entry
                .layer
                .as_ref()
                .is_some_and(|l| bad.contains(&l.digest))
            {
                batch.delete_cf(cf_entries, &k);
                batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &k));
                dropped += 1;
            }
        }
        for digest in bad {
            if let Some(meta) = self.blob_meta(digest)? {
                batch.delete_cf(cf_blobs, digest_key(digest)?);
                self.inner.blobs.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(meta.size, Ordering::Relaxed);
            }
        }
        self.inner.db.write_opt(batch, &durable()).map_err(db_err)?;
        self.inner.entries.fetch_sub(dropped, Ordering::Relaxed);
        Ok(dropped)
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let hits = i.hits.load(Ordering::Relaxed);
        let misses = i.misses.load(Ordering::Relaxed);
        Stats {
            entries: i.entries.load(Ordering::Relaxed),
            blobs: i.blobs.load(Ordering::Relaxed),
            blob_bytes: i.bytes.load(Ordering::Relaxed),
            max_size: i.config.max_size,
            lookups_hit: hits,
            lookups_miss: misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            entries_evicted: i.evicted.load(Ordering::Relaxed),
            entries_expired: i.expired.load(Ordering::Relaxed),
            blobs_removed: i.blobs_removed.load(Ordering::Relaxed),
            gc_runs: i.gc_runs.load(Ordering::Relaxed),
            pinned_blobs: lock(&i.pins).len() as u64,
        }
    }

    /// Whether the data volume accepts a new file (for `/readyz`).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let (path, mut file) = self
            .inner
            .content
            .create_temp()
            .map_err(|e| StoreError::io("creating a probe file", e))?;
        let result = file.write_all(b"ok").and_then(|()| file.sync_all());
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| StoreError::io("writing a probe file", e))
    }

    /// Makes everything acknowledged durable (WAL synced, memtables
    /// flushed); called at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush_wal(true).map_err(db_err)?;
        for cf in [CF_ENTRIES, CF_LRU, CF_BLOBS] {
            self.inner.db.flush_cf(self.cf(cf)?).map_err(db_err)?;
        }
        Ok(())
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these locks leaves no half-applied
    // state (RocksDB batches are atomic), so a poisoned lock is usable.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Keeps a blob from being removed while it is being read or written.
pub struct PinGuard {
    store: Store,
    digest: Digest,
}

impl Drop for PinGuard {
    fn drop(&mut self) {
        let mut pins = lock(&self.store.inner.pins);
        if let Some(n) = pins.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                pins.remove(&self.digest);
            }
        }
    }
}

/// A stored blob opened for reading, pinned while this value lives.
pub struct OpenBlob {
    pub file: File,
    pub size: u64,
    pub pin: PinGuard,
}

/// Writes a new blob to a temporary file while hashing it (containerd's
/// content writer). Dropping it without a successful commit removes the
/// temporary file.
pub struct BlobWriter {
    store: Store,
    path: Option<PathBuf>,
    out: Option<Sha256Writer<BufWriter<File>>>,
    /// Bytes already handed to the kernel's writeback.
    written_back: u64,
}

/// Start writeback every this many bytes, so the fsync at commit has
/// little left to flush (RocksDB's `bytes_per_sync`, for blobs).
const WRITEBACK_STEP: u64 = 8 << 20;

impl BlobWriter {
    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.out.as_ref().map_or(0, |o| o.bytes_written())
    }

    /// Flushes and fsyncs the data, and installs it under `expected` only
    /// if its sha256 matches; otherwise removes it and fails.
    pub fn commit(mut self, expected: &Digest) -> Result<BlobCommit, StoreError> {
        let (Some(out), Some(path)) = (self.out.take(), self.path.clone()) else {
            return Err(StoreError::Corrupt("blob writer already used".into()));
        };
        let (buffered, actual, size) = out.finish();
        let file = buffered
            .into_inner()
            .map_err(|e| StoreError::io("writing upload", e.into_error()))?;
        file.sync_all()
            .map_err(|e| StoreError::io("syncing upload", e))?;
        drop(file);
        if actual != *expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        let result = self.store.install_blob(&path, expected, size);
        if result.is_ok() {
            self.path = None;
        }
        result
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(out) = &mut self.out else {
            return Err(io::Error::other("blob writer already committed"));
        };
        let n = out.write(buf)?;
        let end = out.bytes_written();
        if end - self.written_back >= WRITEBACK_STEP {
            let buffered = out.get_mut();
            buffered.flush()?;
            start_writeback(buffered.get_ref(), self.written_back, end);
            self.written_back = end;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        match &mut self.out {
            Some(out) => out.flush(),
            None => Ok(()),
        }
    }
}

fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256Writer::new(io::sink());
    io::copy(&mut File::open(path)?, &mut hasher)?;
    let (_, digest, size) = hasher.finish();
    Ok((digest, size))
}

/// Asks the kernel to start writing `[from, to)` of `file` to disk without
/// waiting; purely a hint, so errors are ignored.
fn start_writeback(file: &File, from: u64, to: u64) {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        // SAFETY: sync_file_range only reads its integer arguments; the fd
        // is valid for the duration of the borrow of `file`.
        unsafe {
            libc::sync_file_range(
                file.as_raw_fd(),
                from as libc::off64_t,
                (to - from) as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, from, to);
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        drop(self.out.take());
        if let Some(path) = self.path.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::LayerDescriptor;

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn put_blob(store: &Store, bytes: &[u8]) -> Digest {
        let digest = Digest::of_bytes(bytes);
        let mut w = store.blob_writer().unwrap();
        w.write_all(bytes).unwrap();
        w.commit(&digest).unwrap();
        digest
    }

    fn entry_for(digest: Option<&Digest>, size: u64, by: &str) -> CacheEntry {
        CacheEntry {
            layer: digest.map(|d| LayerDescriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: d.clone(),
                size,
                diff_id: d.clone(),
            }),
            created_by: by.into(),
            created: "2026-11-24T00:00:00Z".into(),
            extra: BTreeMap::new(),
        }
    }

    fn files_in(dir: &Path) -> usize {
        walk(dir).len()
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        if let Ok(rd) = std::fs::read_dir(dir) {
            for e in rd.flatten() {
                if e.file_type().unwrap().is_dir() {
                    out.extend(walk(&e.path()));
                } else {
                    out.push(e.path());
                }
            }
        }
        out
    }

    #[test]
    fn linked_blob_shares_the_source_inode_and_is_indexed() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache"), StoreConfig::default()).unwrap();
        let src = dir.path().join("layer");
        std::fs::write(&src, b"layer bytes").unwrap();
        let d = Digest::of_bytes(b"layer bytes");
        assert_eq!(
            store.link_blob(&src, &d).unwrap(),
            Some(BlobCommit::Created)
        );
        let stored = store.blob_path(&d);
        assert_eq!(
            std::fs::metadata(&stored).unwrap().ino(),
            std::fs::metadata(&src).unwrap().ino()
        );
        assert_eq!(store.stat_blob(&d).unwrap().unwrap().size, 11);
        assert_eq!(
            store.link_blob(&src, &d).unwrap(),
            Some(BlobCommit::Existed)
        );
        assert_eq!(files_in(&dir.path().join("cache/tmp")), 0);
    }

    #[test]
    fn linked_blob_with_other_bytes_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("cache"), StoreConfig::default()).unwrap();
        let src = dir.path().join("layer");
        std::fs::write(&src, b"evil").unwrap();
        let want = Digest::of_bytes(b"good");
        let err = store.link_blob(&src, &want).unwrap_err();
        assert!(
            matches!(err, StoreError::DigestMismatch { ref actual, .. } if *actual == Digest::of_bytes(b"evil")),
            "{err}"
        );
        assert!(store.stat_blob(&want).unwrap().is_none());
        assert!(!store.blob_path(&want).exists());
        assert_eq!(files_in(&dir.path().join("cache/tmp")), 0);
    }

    #[test]
    fn entries_are_first_writer_wins() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let ns = Namespace::default();
        let d = put_blob(&store, b"layer");
        let e1 = entry_for(Some(&d), 5, "RUN a");
        let e2 = entry_for(Some(&d), 5, "RUN b");
        assert_eq!(
            store.put_entry(&ns, &key(1), &e1).unwrap(),
            PutOutcome::Created
        );
        assert_eq!(
            store.put_entry(&ns, &key(1), &e1).unwrap(),
            PutOutcome::Identical
        );
        assert!(matches!(
            store.put_entry(&ns, &key(1), &e2).unwrap(),
            PutOutcome::Conflict { existing } if *existing == e1
        ));
        assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), Some(e1));
        assert_eq!(store.stat_blob(&d).unwrap().unwrap().references, 1);
    }

    #[test]
    fn entry_naming_an_unknown_blob_or_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let ns = Namespace::default();
        let missing = Digest::of_bytes(b"nope");
        let err = store
            .put_entry(&ns, &key(1), &entry_for(Some(&missing), 4, "RUN x"))
            .unwrap_err();
        assert!(matches!(err, StoreError::MissingBlob(d) if d == missing));
        let d = put_blob(&store, b"12345");
        let err = store
            .put_entry(&ns, &key(1), &entry_for(Some(&d), 4, "RUN x"))
            .unwrap_err();
        assert!(matches!(err, StoreError::LayerSizeMismatch { .. }), "{err}");
        assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
        assert_eq!(
            store
                .put_entry(&ns, &key(2), &entry_for(None, 0, "RUN true"))
                .unwrap(),
            PutOutcome::Created
        );
    }

    #[test]
    fn a_mismatched_blob_leaves_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let claimed = Digest::of_bytes(b"good");
        let mut w = store.blob_writer().unwrap();
        w.write_all(b"evil").unwrap();
        let err = w.commit(&claimed).unwrap_err();
        assert!(
            matches!(err, StoreError::DigestMismatch { ref actual, .. } if *actual == Digest::of_bytes(b"evil"))
        );
        assert!(store.stat_blob(&claimed).unwrap().is_none());
        assert_eq!(files_in(&dir.path().join("blobs")), 0);
        assert_eq!(files_in(&dir.path().join("tmp")), 0);
    }

    #[test]
    fn namespaces_do_not_see_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let a = Namespace::new("team-a").unwrap();
        let b = Namespace::new("team-b").unwrap();
        let e = entry_for(None, 0, "RUN a");
        store.put_entry(&a, &key(7), &e).unwrap();
        assert!(store.lookup(&b, &[key(7)]).unwrap().is_empty());
        assert!(
            store
                .lookup(&Namespace::default(), &[key(7)])
                .unwrap()
                .is_empty()
        );
        assert_eq!(store.lookup(&a, &[key(7)]).unwrap().len(), 1);
        assert_eq!(
            store
                .put_entry(&b, &key(7), &entry_for(None, 0, "RUN b"))
                .unwrap(),
            PutOutcome::Created
        );
        assert_eq!(store.list_entries(&a, "", None, 10).unwrap().len(), 1);
        assert!(Namespace::new("Bad/NS").is_err());
    }

    #[test]
    fn reopening_drops_entries_whose_blob_vanished_and_adopts_unknown_files() {
        let dir = tempfile::tempdir().unwrap();
        let ns = Namespace::default();
        let (gone, kept) = {
            let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
            let gone = put_blob(&store, b"gone");
            let kept = put_blob(&store, b"kept");
            store
                .put_entry(&ns, &key(1), &entry_for(Some(&gone), 4, "RUN 1"))
                .unwrap();
            store
                .put_entry(&ns, &key(2), &entry_for(Some(&kept), 4, "RUN 2"))
                .unwrap();
            (gone, kept)
        };
        std::fs::remove_file(dir.path().join("blobs").join(gone.sharded_path())).unwrap();
        let stray = Digest::of_bytes(b"stray");
        let p = dir.path().join("blobs").join(stray.sharded_path());
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, b"stray").unwrap();
        std::fs::write(dir.path().join("tmp/upload-leftover"), b"partial").unwrap();

        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let report = store.recovery_report();
        assert_eq!(report.blobs_missing, vec![gone.clone()]);
        assert_eq!(report.entries_dropped, 1);
        assert_eq!(report.blobs_adopted, 1);
        assert_eq!(report.temp_files_removed, 1);
        assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
        assert!(store.get_entry(&ns, &key(2)).unwrap().is_some());
        assert_eq!(store.stat_blob(&stray).unwrap().unwrap().references, 0);
        assert_eq!(store.stat_blob(&kept).unwrap().unwrap().references, 1);
        assert_eq!(store.stats().blob_bytes, 4 + 5);
    }

    #[test]
    fn eviction_removes_least_recently_used_entries_first() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_size: Some(250),
            blob_grace: Duration::from_secs(3600),
            access_granularity: Duration::ZERO,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let ns = Namespace::default();
        let mut digests = Vec::new();
        for i in 0..3u8 {
            let bytes = vec![i; 100];
            let d = put_blob(&store, &bytes);
            store
                .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
                .unwrap();
            digests.push(d);
            std::thread::sleep(Duration::from_millis(5));
        }
        // Key 0 becomes the most recently used; key 1 is now the oldest.
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(store.lookup(&ns, &[key(0)]).unwrap().len(), 1);
        assert!(store.over_limit());
        let report = store.gc().unwrap();
        assert_eq!(report.entries_evicted, 1);
        assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
        assert!(store.get_entry(&ns, &key(0)).unwrap().is_some());
        assert!(store.stat_blob(&digests[1]).unwrap().is_none());
        assert!(
            !dir.path()
                .join("blobs")
                .join(digests[1].sharded_path())
                .exists()
        );
    }

    #[test]
    fn evict_on_demand_frees_down_to_the_given_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let ns = Namespace::default();
        for i in 0..3u8 {
            let d = put_blob(&store, &[i; 100]);
            store
                .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
                .unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        let report = store.evict(150).unwrap();
        assert_eq!(report.entries_evicted, 2);
        assert_eq!(report.bytes_freed, 200);
        assert_eq!(store.stats().blob_bytes, 100);
        assert!(
            store.get_entry(&ns, &key(2)).unwrap().is_some(),
            "newest stays"
        );
        assert!(store.get_entry(&ns, &key(0)).unwrap().is_none());
    }

    #[test]
    fn accesses_seen_while_the_lock_is_busy_still_count_for_eviction() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            access_granularity: Duration::ZERO,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let ns = Namespace::default();
        for i in 0..3u8 {
            let d = put_blob(&store, &[i; 100]);
            store
                .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
                .unwrap();
            std::thread::sleep(Duration::from_millis(3));
        }
        {
            let _busy = store.write_lock();
            assert_eq!(store.lookup(&ns, &[key(0)]).unwrap().len(), 1);
        }
        assert_eq!(store.evict(200).unwrap().entries_evicted, 1);
        assert!(
            store.get_entry(&ns, &key(0)).unwrap().is_some(),
            "recently read"
        );
        assert!(
            store.get_entry(&ns, &key(1)).unwrap().is_none(),
            "least recently used"
        );
    }

    #[test]
    fn eviction_never_removes_a_pinned_blob() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            max_size: Some(50),
            blob_grace: Duration::ZERO,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let ns = Namespace::default();
        let a = put_blob(&store, &[1u8; 100]);
        store
            .put_entry(&ns, &key(1), &entry_for(Some(&a), 100, "RUN a"))
            .unwrap();
        let b = put_blob(&store, &[2u8; 100]);
        store
            .put_entry(&ns, &key(2), &entry_for(Some(&b), 100, "RUN b"))
            .unwrap();
        let reading = store.open_blob(&a).unwrap().unwrap();
        let report = store.gc().unwrap();
        assert_eq!(report.entries_evicted, 2);
        assert!(report.blobs_pinned >= 1);
        assert!(store.stat_blob(&a).unwrap().is_some());
        assert!(dir.path().join("blobs").join(a.sharded_path()).exists());
        assert!(store.stat_blob(&b).unwrap().is_none());
        drop(reading);
        store.gc().unwrap();
        assert!(store.stat_blob(&a).unwrap().is_none());
        assert_eq!(store.stats().blob_bytes, 0);
    }

    #[test]
    fn gc_keeps_pinned_and_young_unreferenced_blobs() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            blob_grace: Duration::ZERO,
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let loose = put_blob(&store, b"loose");
        let held = put_blob(&store, b"held");
        let pin = store.pin(&held);
        let report = store.gc().unwrap();
        assert_eq!(report.blobs_removed, 1);
        assert_eq!(report.blobs_pinned, 1);
        assert!(store.stat_blob(&loose).unwrap().is_none());
        assert!(store.stat_blob(&held).unwrap().is_some());
        drop(pin);
        assert_eq!(store.gc().unwrap().blobs_removed, 1);

        let dir2 = tempfile::tempdir().unwrap();
        let young = Store::open(dir2.path(), StoreConfig::default()).unwrap();
        let d = put_blob(&young, b"young");
        assert_eq!(young.gc().unwrap().blobs_removed, 0);
        assert!(young.stat_blob(&d).unwrap().is_some());
    }

    #[test]
    fn expired_entries_are_not_served_and_gc_removes_them() {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            entry_ttl: Some(Duration::from_millis(50)),
            ..StoreConfig::default()
        };
        let store = Store::open(dir.path(), config).unwrap();
        let ns = Namespace::default();
        store
            .put_entry(&ns, &key(1), &entry_for(None, 0, "RUN"))
            .unwrap();
        assert!(store.get_entry(&ns, &key(1)).unwrap().is_some());
        std::thread::sleep(Duration::from_millis(80));
        assert!(store.get_entry(&ns, &key(1)).unwrap().is_none());
        assert_eq!(store.gc().unwrap().entries_expired, 1);
        assert_eq!(store.stats().entries, 0);
        // A new entry may take the expired one's place.
        assert_eq!(
            store
                .put_entry(&ns, &key(1), &entry_for(None, 0, "RUN 2"))
                .unwrap(),
            PutOutcome::Created
        );
    }

    #[test]
    fn verify_quarantines_corrupt_blobs_and_drops_their_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let ns = Namespace::default();
        let good = put_blob(&store, b"good");
        let bad = put_blob(&store, b"bad!");
        store
            .put_entry(&ns, &key(1), &entry_for(Some(&good), 4, "RUN"))
            .unwrap();
        store
            .put_entry(&ns, &key(2), &entry_for(Some(&bad), 4, "RUN"))
            .unwrap();
        std::fs::write(dir.path().join("blobs").join(bad.sharded_path()), b"rot!").unwrap();
        let dry = store.verify(false).unwrap();
        assert_eq!(dry.corrupt, vec![bad.clone()]);
        assert!(store.get_entry(&ns, &key(2)).unwrap().is_some());
        let report = store.verify(true).unwrap();
        assert_eq!(report.corrupt, vec![bad.clone()]);
        assert_eq!(report.entries_dropped, 1);
        assert!(store.get_entry(&ns, &key(2)).unwrap().is_none());
        assert!(store.open_blob(&bad).unwrap().is_none());
        assert!(dir.path().join("quarantine").join(bad.hex()).exists());
        assert!(store.get_entry(&ns, &key(1)).unwrap().is_some());
    }

    #[test]
    fn listing_pages_through_a_namespace_with_a_prefix() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let ns = Namespace::default();
        for i in [0x10u8, 0x11, 0x12, 0x20] {
            store
                .put_entry(&ns, &key(i), &entry_for(None, 0, "RUN"))
                .unwrap();
        }
        let first = store.list_entries(&ns, "1", None, 2).unwrap();
        assert_eq!(
            first.iter().map(|r| r.key).collect::<Vec<_>>(),
            vec![key(0x10), key(0x11)]
        );
        let rest = store.list_entries(&ns, "1", Some(&key(0x11)), 10).unwrap();
        assert_eq!(
            rest.iter().map(|r| r.key).collect::<Vec<_>>(),
            vec![key(0x12)]
        );
        assert_eq!(store.list_entries(&ns, "", None, 100).unwrap().len(), 4);
    }
}
