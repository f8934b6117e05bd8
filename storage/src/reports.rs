//! The shared storage vocabulary: what storage operations answer, the same
//! for the local RocksDB store and the object-store replica (and, for the
//! admin reports, the JSON of the admin API).

use kiln_common::{CacheEntry, CacheKey, Digest};
use serde::{Deserialize, Serialize};

/// Result of storing an entry (first writer wins).
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

/// Result of committing a blob to an index.
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

/// What a verification pass found.
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
