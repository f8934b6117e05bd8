//! The executor's local content store: blobs by digest under
//! `<dir>/blobs/sha256/<aa>/<hex>`, where pulled base-image blobs and built
//! layers land so that a second build does not download them again.
//!
//! Writes go through [`BlobWriter`]: bytes stream into a temporary file in
//! `<dir>/tmp` while their sha256 is computed, and [`BlobWriter::commit`]
//! fsyncs and renames the file to its final name only if the digest (and
//! size, when given) match. A blob is never visible under its digest while
//! partial, and a dropped writer leaves nothing behind. A blob whose bytes
//! already sit in a file on the same filesystem (the embedded cache's copy)
//! is hard-linked in by [`LocalStore::link_from`], never copied.

use std::fs::{self, File};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use kiln_common::errors::cannot_link;
use kiln_common::{Digest, Sha256Writer};

use crate::blobs::BlobSource;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("content store {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("blob {expected} not committed: the bytes written have digest {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("blob {digest} not committed: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("blob {0} is not in the local store")]
    NotFound(Digest),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct LocalStore {
    root: PathBuf,
}

impl LocalStore {
    /// Opens (creating if needed) a store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let root = dir.into();
        for sub in ["blobs/sha256", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err(&p))?;
        }
        Ok(LocalStore { root })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob lives (or would live).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root.join("blobs").join(digest.sharded_path())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, StoreError> {
        let p = self.path(digest);
        match fs::metadata(&p) {
            Ok(m) => Ok(m.len()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(digest.clone()))
            }
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Opens a blob for reading.
    pub fn open(&self, digest: &Digest) -> Result<File, StoreError> {
        let p = self.path(digest);
        match File::open(&p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(StoreError::NotFound(digest.clone()))
            }
            Err(e) => Err(io_err(&p)(e)),
        }
    }

    /// Starts writing a new blob.
    pub fn writer(&self) -> Result<BlobWriter, StoreError> {
        let tmp_dir = self.root.join("tmp");
        let tmp = tempfile::Builder::new()
            .prefix("blob-")
            .tempfile_in(&tmp_dir)
            .map_err(io_err(&tmp_dir))?;
        let file = tmp.reopen().map_err(io_err(tmp.path()))?;
        Ok(BlobWriter {
            store: self.clone(),
            tmp,
            out: Sha256Writer::new(BufWriter::with_capacity(256 * 1024, file)),
        })
    }

    /// Adopts the file at `src` as blob `expected` by hard-linking it in:
    /// the bytes stay one copy on disk, shared with the file's owner (the
    /// embedded cache under the same `--cache-dir`). They are hashed first
    /// and refused unless they match `expected` and `expected_size`.
    /// `Ok(None)` when `src` cannot be linked here (another filesystem,
    /// links not permitted): the caller copies instead. Blobs are never
    /// written in place, so sharing the inode is safe.
    pub fn link_from(
        &self,
        src: &Path,
        expected: &Digest,
        expected_size: u64,
    ) -> Result<Option<PathBuf>, StoreError> {
        let dest = self.path(expected);
        if dest.is_file() {
            return Ok(Some(dest));
        }
        let tmp_dir = self.root.join("tmp");
        let tmp = match tempfile::Builder::new()
            .prefix("link-")
            .make_in(&tmp_dir, |p| fs::hard_link(src, p))
        {
            Ok(t) => t,
            Err(e) if cannot_link(&e) => return Ok(None),
            Err(e) => return Err(io_err(src)(e)),
        };
        let mut hasher = Sha256Writer::new(io::sink());
        io::copy(
            &mut File::open(tmp.path()).map_err(io_err(src))?,
            &mut hasher,
        )
        .map_err(io_err(src))?;
        let (_, actual, size) = hasher.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if size != expected_size {
            return Err(StoreError::SizeMismatch {
                digest: expected.clone(),
                expected: expected_size,
                actual: size,
            });
        }
        let parent = dest.parent().unwrap_or(self.root());
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        tmp.persist(&dest).map_err(|e| io_err(&dest)(e.error))?;
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(Some(dest))
    }

    /// Stores small in-memory content (configs, manifests) and returns its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, StoreError> {
        let digest = Digest::of_bytes(bytes);
        if self.contains(&digest) {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write_all(bytes).map_err(io_err(&self.root))?;
        w.commit(&digest, Some(bytes.len() as u64))?;
        Ok(digest)
    }

    /// Reads a small blob (config, manifest) into memory.
    pub fn read_small(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let p = self.path(digest);
        fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                StoreError::NotFound(digest.clone())
            } else {
                io_err(&p)(e)
            }
        })
    }
}

impl BlobSource for LocalStore {
    fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let p = self.path(digest);
        p.is_file().then_some(p)
    }
}

/// A blob being written; see the module documentation.
pub struct BlobWriter {
    store: LocalStore,
    tmp: tempfile::NamedTempFile,
    out: Sha256Writer<BufWriter<File>>,
}

impl BlobWriter {
    /// Bytes written so far.
    pub fn bytes_written(&self) -> u64 {
        self.out.bytes_written()
    }

    /// Makes the blob visible under `expected` if the bytes match it (and
    /// `expected_size`, when given); otherwise discards them.
    pub fn commit(
        self,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<PathBuf, StoreError> {
        let BlobWriter { store, tmp, out } = self;
        let (buf, actual, size) = out.finish();
        if &actual != expected {
            return Err(StoreError::DigestMismatch {
                expected: expected.clone(),
                actual,
            });
        }
        if let Some(want) = expected_size
            && want != size
        {
            return Err(StoreError::SizeMismatch {
                digest: expected.clone(),
                expected: want,
                actual: size,
            });
        }
        let file = buf
            .into_inner()
            .map_err(|e| io_err(tmp.path())(e.into_error()))?;
        // Blobs are content, not secrets: readable like the files of an OCI
        // layout they may be hard-linked into.
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(io_err(tmp.path()))?;
        file.sync_all().map_err(io_err(tmp.path()))?;
        let dest = store.path(expected);
        let parent = dest.parent().unwrap_or(store.root());
        fs::create_dir_all(parent).map_err(io_err(parent))?;
        tmp.persist(&dest).map_err(|e| io_err(&dest)(e.error))?;
        // The rename is durable only once the directory entry is on disk.
        if let Ok(d) = File::open(parent) {
            let _ = d.sync_all();
        }
        Ok(dest)
    }

    /// Commits under whatever digest the bytes have (for content kiln made
    /// itself), returning it with the size.
    pub fn commit_computed(self) -> Result<(Digest, u64), StoreError> {
        let digest = self.out.current_digest();
        let size = self.out.bytes_written();
        self.commit(&digest, Some(size))?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        // What the progress of a pull (registry or cache, whichever writes
        // the blob) is measured with.
        crate::log::bytes_received().fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tmp_files(store: &LocalStore) -> usize {
        fs::read_dir(store.root().join("tmp")).unwrap().count()
    }

    #[test]
    fn committed_blob_is_readable_under_its_sharded_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let d = Digest::of_bytes(b"hello");
        let mut w = store.writer().unwrap();
        w.write_all(b"hel").unwrap();
        w.write_all(b"lo").unwrap();
        assert!(!store.contains(&d), "partial blob must not be visible");
        let path = w.commit(&d, Some(5)).unwrap();
        assert_eq!(
            path,
            dir.path()
                .join("blobs/sha256")
                .join(&d.hex()[..2])
                .join(d.hex())
        );
        let mut s = String::new();
        store.open(&d).unwrap().read_to_string(&mut s).unwrap();
        assert_eq!(s, "hello");
        assert_eq!(store.size(&d).unwrap(), 5);
        assert_eq!(tmp_files(&store), 0);
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o644
        );
    }

    #[test]
    fn commit_with_wrong_digest_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let want = Digest::of_bytes(b"other");
        let mut w = store.writer().unwrap();
        w.write_all(b"hello").unwrap();
        let err = w.commit(&want, None).unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&want));
        assert!(!store.contains(&Digest::of_bytes(b"hello")));
        assert_eq!(tmp_files(&store), 0);
    }

    #[test]
    fn commit_with_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let d = Digest::of_bytes(b"hello");
        let mut w = store.writer().unwrap();
        w.write_all(b"hello").unwrap();
        assert!(matches!(
            w.commit(&d, Some(4)),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert!(!store.contains(&d));
    }

    #[test]
    fn dropped_writer_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"abandoned").unwrap();
        assert_eq!(tmp_files(&store), 1);
        drop(w);
        assert_eq!(tmp_files(&store), 0);
    }

    #[test]
    fn linked_blob_shares_the_inode_and_wrong_bytes_are_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        let src = dir.path().join("blob");
        fs::write(&src, b"hello").unwrap();
        let d = Digest::of_bytes(b"hello");
        let path = store.link_from(&src, &d, 5).unwrap().unwrap();
        assert_eq!(path, store.path(&d));
        assert_eq!(
            fs::metadata(&path).unwrap().ino(),
            fs::metadata(&src).unwrap().ino()
        );
        let other = Digest::of_bytes(b"other");
        assert!(matches!(
            store.link_from(&src, &other, 5),
            Err(StoreError::DigestMismatch { .. })
        ));
        let wrong_size = LocalStore::new(dir.path().join("store2")).unwrap();
        assert!(matches!(
            wrong_size.link_from(&src, &d, 4),
            Err(StoreError::SizeMismatch { .. })
        ));
        assert!(!store.contains(&other) && !wrong_size.contains(&d));
        assert_eq!(tmp_files(&store) + tmp_files(&wrong_size), 0);
    }

    #[test]
    fn missing_blob_is_reported_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let d = Digest::of_bytes(b"nope");
        let err = store.open(&d).unwrap_err();
        assert!(err.to_string().contains(&d.to_string()));
        assert_eq!(store.put_bytes(b"nope").unwrap(), d);
        assert!(store.contains(&d));
    }
}
