//! The layer cache as the executor sees it.
//!
//! [`Cache`] promises four things: `lookup` answers for many keys at once
//! (misses are simply absent), `fetch_blob` puts a blob into the executor's
//! local store only after its digest and size checked out (a cache that
//! sends more bytes than asked for is cut off at the size), `put_blob` makes a layer
//! available to every other executor, and `put_entry` records a step's
//! result first-writer-wins (a conflicting entry is the cache's to keep, not
//! an error of this build). Lookups get the keys as chains (each stage's
//! filesystem keys in build order) and a cache may hold writes back until
//! [`Cache::finish`]; both default to the plain calls. Three
//! implementations:
//!
//! - [`embedded::EmbeddedCache`]: the cache server's own storage engine
//!   (`kiln-storage`), in-process, on `--cache-dir` (the default: no server needed);
//! - [`http::HttpCache`]: a `kiln-cache-server` (`--cache-server`), one URL
//!   or several tried in order;
//! - [`registry::RegistryCache`]: a repository of an OCI registry
//!   (`--cache-repo`), entries as artifact manifests, layers as blobs.
//!
//! The driver treats every cache error as a reason to build without the
//! cache, never as a reason to fail the build.

#[cfg(feature = "embedded-cache")]
pub mod embedded;
pub mod http;
pub mod registry;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use kiln_common::{CacheEntry, CacheKey, Digest};

use crate::store::LocalStore;

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache at {location}: {message}")]
    Unavailable { location: String, message: String },
    #[error("cache blob {digest}: {message}")]
    Blob { digest: Digest, message: String },
    #[error("cache blob {0}: not in the cache")]
    NotFound(Digest),
}

/// How the build uses the cache (`--cache-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheMode {
    ReadWrite,
    /// Look up only: nothing is uploaded (e.g. untrusted branches).
    ReadOnly,
    /// Upload only: every step runs.
    WriteOnly,
}

impl CacheMode {
    pub fn reads(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::ReadOnly)
    }
    pub fn writes(self) -> bool {
        matches!(self, CacheMode::ReadWrite | CacheMode::WriteOnly)
    }
}

pub trait Cache: Send + Sync {
    /// Where the cache is, for messages.
    fn location(&self) -> String;

    fn lookup(&self, keys: &[CacheKey]) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError>;

    /// Copies the blob into `store` (verified against `digest` and exactly
    /// `size` bytes) unless it is there already; returns its path in the store.
    fn fetch_blob(
        &self,
        digest: &Digest,
        size: u64,
        store: &LocalStore,
    ) -> Result<PathBuf, CacheError>;

    fn has_blob(&self, digest: &Digest) -> Result<bool, CacheError>;

    /// Uploads the blob at `path`, whose digest the caller computed.
    fn put_blob(&self, digest: &Digest, path: &Path) -> Result<(), CacheError>;

    fn put_entry(&self, key: &CacheKey, entry: &CacheEntry) -> Result<(), CacheError>;

    /// [`Cache::lookup`] of a whole build, with the structure of its keys:
    /// one chain per stage, each step's key derived from the one before.
    /// A cache whose lookups cost a request per key uses it to ask for
    /// fewer (a step nobody finished has no successor anybody built).
    fn lookup_chains(
        &self,
        chains: &[Vec<CacheKey>],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
        let mut seen = std::collections::BTreeSet::new();
        let keys: Vec<CacheKey> = chains
            .iter()
            .flatten()
            .copied()
            .filter(|k| seen.insert(*k))
            .collect();
        self.lookup(&keys)
    }

    /// The build's uploads are done; `chains` are its keys as for
    /// [`Cache::lookup_chains`], without hits whose layer could not be had.
    /// A cache that holds writes back (the registry one) makes them now.
    fn finish(&self, chains: &[Vec<CacheKey>]) -> Result<(), CacheError> {
        let _ = chains;
        Ok(())
    }
}
