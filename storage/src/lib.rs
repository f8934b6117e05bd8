//! kiln-storage: where kiln keeps blobs and cache entries on a local disk.
//! No HTTP and no object storage: the cache server serves this over HTTP,
//! the executor opens it in-process.
//!
//! - [`content`]: THE content store: blobs by digest on the filesystem, one
//!   [`BlobWriter`] that hashes while it writes (temporary file, fsync,
//!   verify, rename), hard-linked adoption of files that already hold a
//!   blob's bytes. Used by the executor's local store too.
//! - [`index`] (feature `index`, on by default): the RocksDB index over a
//!   content store, [`Store`]: first-writer-wins entries per namespace,
//!   reference-counted blobs, GC, LRU eviction, verify, crash recovery.
//! - [`error`]: the contract's refusals and the class of every storage
//!   error (what the cache server's API maps to a status).
//! - [`namespace`] and [`reports`]: the storage vocabulary both cache
//!   backends (this one and the cache server's object-store replica) speak.
//!
//! The executor built without the `index` feature (the static executor)
//! gets the content store and the vocabulary, and no C++ dependency.

use std::time::{SystemTime, UNIX_EPOCH};

pub mod content;
pub mod error;
#[cfg(feature = "index")]
pub mod index;
#[cfg(feature = "index")]
pub mod metrics;
pub mod namespace;
pub mod reports;

pub use content::{BlobWriter, ContentError, ContentStore, StagedBlob};
pub use error::{Classify, ContractError, ErrorClass};
#[cfg(feature = "index")]
pub use index::{OpenBlob, PinGuard, Store, StoreConfig, StoreError};
pub use namespace::{InvalidNamespace, Namespace};
pub use reports::{
    BlobCommit, BlobInfo, EntryRecord, GcReport, PutOutcome, RecoveryReport, Stats, VerifyReport,
};

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
