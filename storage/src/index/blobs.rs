//! Blobs in the index: uploads ([`BlobWriter`], the content store's writer
//! whose commit also records the blob), hard-linked adoption, reads that pin
//! a blob against eviction.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use kiln_common::Digest;

use super::codec::{BlobMeta, digest_key};
use super::db::{CF_BLOBS, db_err};
use super::{Store, StoreError, lock};
use crate::content::{self, StagedBlob};
use crate::now_ms;
use crate::reports::{BlobCommit, BlobInfo};

impl Store {
    /// A writer for a new blob; nothing is visible until
    /// [`BlobWriter::commit`] succeeds.
    pub fn blob_writer(&self) -> Result<BlobWriter, StoreError> {
        Ok(BlobWriter {
            store: self.clone(),
            inner: self.inner.content.writer()?,
        })
    }

    /// The content store this index records blobs of.
    pub fn content(&self) -> &content::ContentStore {
        &self.inner.content
    }

    pub(super) fn install_blob(&self, staged: StagedBlob) -> Result<BlobCommit, StoreError> {
        let (digest, size) = (staged.digest().clone(), staged.size());
        let _guard = self.write_lock();
        let created = self.inner.content.install(staged)?;
        let existing = self.blob_meta(&digest)?;
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
            .put_cf(self.cf(CF_BLOBS)?, digest_key(&digest)?, meta.encode())
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
        if self.blob_meta(expected)?.is_some() && self.inner.content.contains(expected) {
            return Ok(Some(BlobCommit::Existed));
        }
        match self.inner.content.stage_link(src, expected, None)? {
            Some(staged) => self.install_blob(staged).map(Some),
            None => Ok(None),
        }
    }

    /// Where a committed blob's file is. Only meaningful while the blob is
    /// pinned (an [`OpenBlob`] is held): eviction may remove it otherwise.
    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.inner.content.path(digest)
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
        let path = self.inner.content.path(digest);
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

    pub(super) fn is_pinned(&self, digest: &Digest) -> bool {
        lock(&self.inner.pins).contains_key(digest)
    }
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

/// Writes a new blob while hashing it ([`content::BlobWriter`]); its
/// commit installs the blob in the content store and records it in the
/// index. Dropping it without a successful commit removes the temporary
/// file.
pub struct BlobWriter {
    store: Store,
    inner: content::BlobWriter,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.inner.bytes_written()
    }

    /// Flushes and fsyncs the data, and installs it under `expected` only
    /// if its sha256 matches; otherwise removes it and fails.
    pub fn commit(self, expected: &Digest) -> Result<BlobCommit, StoreError> {
        let staged = self.inner.seal(expected, None)?;
        self.store.install_blob(staged)
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.inner.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
