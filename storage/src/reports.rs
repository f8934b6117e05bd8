//! The shared storage vocabulary: what storage operations answer, the same
//! for the local RocksDB store and the object-store replica (and, for the
//! admin reports, the JSON of the admin API).

use kiln_common::{CacheEntry, Digest};
use serde::{Deserialize, Serialize};

/// The admin API's reports are the storage engine's answers: one type each,
/// defined with the other wire types in `kiln-common`.
pub use kiln_common::wire::admin::{EntryRecord, GcReport, Stats, VerifyReport};

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

/// What start-up reconciliation repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoveryReport {
    pub temp_files_removed: u64,
    pub blobs_adopted: u64,
    pub blobs_missing: Vec<Digest>,
    pub entries_dropped: u64,
    pub references_fixed: u64,
}
