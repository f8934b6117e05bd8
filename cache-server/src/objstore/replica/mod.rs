//! One cache-server replica over a shared bucket: the operations of the
//! HTTP API (lookup, entries, blobs, GC) with the bucket as the truth and
//! the [`LocalIndex`] as a cache in front of it.
//!
//! Visibility across replicas (docs/object-storage.md):
//! - an entry written through any replica is found by every other one at
//!   most `miss_recheck` after it was written (a local miss asks the bucket
//!   again once that long has passed since it last asked for that key; 0
//!   asks every time);
//! - an entry removed from the bucket (GC, `DELETE`), or replaced by
//!   another write of its key after that, stops being served by other
//!   replicas at most `hit_recheck` later (a stale hit is read again, not
//!   only checked for existence);
//! - a lookup never fails because the bucket does not answer: keys it could
//!   not ask about are misses, cached entries it could not confirm are hits.
//!
//! GC safety, for blobs older than `blob_grace` that no entry named when GC
//! listed the bucket (younger ones are never deleted):
//! - GC: write the intent `gc/doomed/<blob>` (g0), LIST `refs/<blob>/` (g1),
//!   delete the blob only if that found no marker (g2), remove the intent;
//! - writer: put its marker `refs/<blob>/<ns>/<key>.<nonce>` (w0), then
//!   HEAD the intent (w1) and the blob (w2), and create the entry, which
//!   records `<nonce>`, only if there is no fresh intent and the blob is
//!   there.
//!
//! If w0 < g1, GC sees the marker and keeps the blob. Otherwise g0 < g1 <
//! w0 < w1: the writer sees the intent, or it was already removed, which
//! happens after g2, so the blob is gone at w2. Either way no entry is
//! created for a blob GC deletes (given the read-after-write consistency S3
//! has had since 2020). A refused writer gets `422 missing_blob` and uploads
//! again. Intents older than `lease_ttl` (a crashed GC) are ignored and
//! cleared.
//!
//! That holds as long as a live entry's marker is never removed. Markers
//! are per write (the nonce), so the only marker with an entry's path is
//! the one its own write put, and it is removed only
//! - after that entry object was deleted (eviction, TTL, `DELETE`, an
//!   expired entry replaced), by its exact nonce, read from the entry; or
//! - when it is older than the marker grace (`blob_grace` and `lease_ttl`
//!   both) and the entry under its key, read right before, is absent or
//!   records another nonce: its write was refused, lost the
//!   first-writer-wins race, died, or its entry is gone. A writer creates
//!   its entry right after its marker, so one that old is done with
//!   trying (the assumption `blob_grace` has always made of writers).
//!
//! A writer re-creating a key GC is evicting puts a marker no deletion of
//! the old entry's names; docs/object-storage.md goes through the
//! interleavings, and what happens to markers of the previous version
//! (`<key hex>` without a nonce).
//!
//! Files: `entries.rs` (lookups, writes), `blobs.rs`, `gc.rs`: one
//! `impl Replica` block each.

use std::path::Path;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use kiln_common::CacheKey;
use serde::{Deserialize, Serialize};

use super::ObjError;
use super::bucket::{Bucket, EntryObject};
use super::index::LocalIndex;
use kiln_storage::{GcReport, Namespace};

mod blobs;
mod entries;
mod gc;
#[cfg(test)]
mod tests;

/// Bucket requests one lookup sends at the same time.
const LOOKUP_CONCURRENCY: usize = 32;
pub(super) const GC_LEASE: &str = "gc";

/// How a replica behaves; see docs/object-storage.md for the flags.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// A local miss asks the bucket again after this long (0: always).
    pub miss_recheck: Duration,
    /// A cached hit is confirmed in the bucket again after this long.
    pub hit_recheck: Duration,
    /// Entries older than this are not served and are removed by GC.
    pub entry_ttl: Option<Duration>,
    /// GC evicts the oldest entries while the bucket holds more blob bytes.
    pub max_size: Option<u64>,
    /// Blobs younger than this are never deleted by GC.
    pub blob_grace: Duration,
    /// How long the GC lease lasts without renewal.
    pub lease_ttl: Duration,
    /// This replica's name in the GC lease.
    pub holder: String,
    /// Answer blob GETs with a redirect to a URL signed for this long.
    pub presign: Option<Duration>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            miss_recheck: Duration::from_secs(2),
            hit_recheck: Duration::from_secs(60),
            entry_ttl: None,
            max_size: None,
            blob_grace: Duration::from_secs(600),
            lease_ttl: Duration::from_secs(300),
            holder: default_holder(),
            presign: None,
        }
    }
}

/// `hostname-pid`, which is the pod name and a number in Kubernetes.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "replica".into());
    format!("{host}-{}", std::process::id())
}

/// What a GC request did: the report, or that another replica holds the
/// lease and this one did nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaGcReport {
    #[serde(flatten)]
    pub report: GcReport,
    /// False when another replica holds the GC lease.
    pub lease_held: bool,
}

/// Whether two entry objects are the same write (same marker nonce).
/// Entries without a nonce (no layer, or legacy) are never "the same".
fn same_write(a: &EntryObject, b: &EntryObject) -> bool {
    a.ref_nonce.is_some() && a.ref_nonce == b.ref_nonce
}

type EntryId = (Namespace, CacheKey);

/// One replica.
pub struct Replica {
    bucket: Bucket,
    index: LocalIndex,
    config: ReplicaConfig,
    hits: AtomicU64,
    misses: AtomicU64,
    gc_runs: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
    blobs_removed: AtomicU64,
    /// Sizes seen by the last GC listing (this replica's).
    listed: std::sync::Mutex<(u64, u64, u64)>,
}

impl Replica {
    /// Opens the local index cache in `data/replica-index` over `bucket`.
    pub fn open(bucket: Bucket, data: &Path, config: ReplicaConfig) -> Result<Replica, ObjError> {
        std::fs::create_dir_all(data).map_err(|e| ObjError::Io {
            context: format!("creating {}", data.display()),
            source: e,
        })?;
        let index = LocalIndex::open(&data.join("replica-index"))?;
        Ok(Replica {
            bucket,
            index,
            config,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            gc_runs: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            blobs_removed: AtomicU64::new(0),
            listed: std::sync::Mutex::new((0, 0, 0)),
        })
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    fn expired(&self, created_ms: u64, now: u64) -> bool {
        self.config
            .entry_ttl
            .is_some_and(|ttl| now.saturating_sub(created_ms) > ttl.as_millis() as u64)
    }
}
