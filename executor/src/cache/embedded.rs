//! The embedded cache: the cache server's storage engine (the RocksDB index
//! and content store of `kiln-storage`) opened in-process on a local
//! directory. Same index, same content store, same guarantees as
//! the server, without a network hop; the default when no server is given.
//! Blobs are shared with the executor's local store by hard links, so each
//! blob is on disk once under `--cache-dir`.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use kiln_common::{CacheEntry, CacheKey, Digest, VerifyingReader};
use kiln_storage::{Namespace, PutOutcome, Store, StoreConfig};

use super::{Cache, CacheError};
use crate::store::LocalStore;

pub struct EmbeddedCache {
    store: Store,
    dir: PathBuf,
    namespace: Namespace,
}

impl EmbeddedCache {
    pub fn open(dir: &Path, entry_ttl: Option<std::time::Duration>) -> Result<Self, CacheError> {
        let config = StoreConfig {
            entry_ttl,
            // One executor at a time uses this index; a small block cache is
            // plenty and keeps the executor's memory small.
            block_cache_bytes: 8 << 20,
            ..StoreConfig::default()
        };
        let store = Store::open(dir, config).map_err(|e| CacheError::Unavailable {
            location: dir.display().to_string(),
            message: e.to_string(),
        })?;
        Ok(Self {
            store,
            dir: dir.to_path_buf(),
            namespace: Namespace::default(),
        })
    }

    fn err(&self, e: impl std::fmt::Display) -> CacheError {
        CacheError::Unavailable {
            location: self.location(),
            message: e.to_string(),
        }
    }
}

impl Cache for EmbeddedCache {
    fn location(&self) -> String {
        format!("embedded cache {}", self.dir.display())
    }

    fn lookup(&self, keys: &[CacheKey]) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
        self.store
            .lookup(&self.namespace, keys)
            .map_err(|e| self.err(e))
    }

    fn fetch_blob(
        &self,
        digest: &Digest,
        size: u64,
        local: &LocalStore,
    ) -> Result<PathBuf, CacheError> {
        if local.contains(digest) {
            return Ok(local.path(digest));
        }
        let blob_err = |message: String| CacheError::Blob {
            digest: digest.clone(),
            message,
        };
        let open = self
            .store
            .open_blob(digest)
            .map_err(|e| self.err(e))?
            .ok_or_else(|| CacheError::NotFound(digest.clone()))?;
        if open.size != size {
            return Err(blob_err(format!(
                "the cache holds {} bytes, the entry names {size}",
                open.size
            )));
        }
        // One copy under --cache-dir: link the cache's file into the local
        // store (the pin in `open` keeps eviction away meanwhile); copy
        // only when the two are on different filesystems.
        if let Some(path) = local
            .link_from(&self.store.blob_path(digest), digest, open.size)
            .map_err(|e| blob_err(e.to_string()))?
        {
            return Ok(path);
        }
        let mut reader = VerifyingReader::new(open.file, digest.clone()).with_size(open.size);
        let mut writer = local.writer().map_err(|e| blob_err(e.to_string()))?;
        io::copy(&mut reader, &mut writer).map_err(|e| blob_err(e.to_string()))?;
        writer
            .commit(digest, Some(open.size))
            .map_err(|e| blob_err(e.to_string()))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, CacheError> {
        Ok(self
            .store
            .stat_blob(digest)
            .map_err(|e| self.err(e))?
            .is_some())
    }

    fn put_blob(&self, digest: &Digest, path: &Path) -> Result<(), CacheError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        // One copy under --cache-dir: the local store's file becomes the
        // cache's blob by a hard link (hashed first, like any upload).
        if self
            .store
            .link_blob(path, digest)
            .map_err(|e| self.err(e))?
            .is_some()
        {
            return Ok(());
        }
        let mut file =
            fs::File::open(path).map_err(|e| self.err(format!("{}: {e}", path.display())))?;
        let mut writer = self.store.blob_writer().map_err(|e| self.err(e))?;
        io::copy(&mut file, &mut writer).map_err(|e| self.err(e))?;
        writer.commit(digest).map_err(|e| self.err(e))?;
        Ok(())
    }

    fn put_entry(&self, key: &CacheKey, entry: &CacheEntry) -> Result<(), CacheError> {
        match self
            .store
            .put_entry(&self.namespace, key, entry)
            .map_err(|e| self.err(e))?
        {
            PutOutcome::Created | PutOutcome::Identical | PutOutcome::Conflict { .. } => Ok(()),
        }
    }
}
