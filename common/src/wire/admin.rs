//! JSON types of the admin API (`/v1/admin/*`, docs/cache-api.md). The
//! storage engine answers with these same types (`kiln-storage` re-exports
//! them), so what an admin call prints is what the store reported.

use serde::{Deserialize, Serialize};

use crate::{CacheEntry, CacheKey, Digest};

/// An entry with its bookkeeping, as listed by admin calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntryRecord {
    pub key: CacheKey,
    pub created_ms: u64,
    pub last_access_ms: u64,
    pub entry: CacheEntry,
}

/// One page of `GET /v1/admin/entries`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryPage {
    pub entries: Vec<EntryRecord>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<CacheKey>,
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

/// A GC or verify answer as a client reads it. A replica over object
/// storage adds whether it held the GC lease (`false`: another replica did,
/// nothing was done); the local store leaves it out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leased<T> {
    #[serde(flatten)]
    pub report: T,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_held: Option<bool>,
}

impl<T> Leased<T> {
    /// True when another replica holds the GC lease and this one did nothing.
    pub fn refused(&self) -> bool {
        self.lease_held == Some(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_leased_report_reads_both_backends_answers() {
        let local: Leased<GcReport> = serde_json::from_str(
            r#"{"entries_expired":1,"entries_evicted":0,"blobs_removed":2,"bytes_freed":3,"blobs_pinned":0}"#,
        )
        .unwrap();
        assert_eq!(local.report.blobs_removed, 2);
        assert!(!local.refused());
        let refused: Leased<GcReport> = serde_json::from_str(
            r#"{"entries_expired":0,"entries_evicted":0,"blobs_removed":0,"bytes_freed":0,"blobs_pinned":0,"lease_held":false}"#,
        )
        .unwrap();
        assert!(refused.refused());
    }
}
