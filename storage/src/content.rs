//! The content store: blob bytes on the local filesystem, by digest. The one
//! implementation behind the cache server's local backend, the executor's
//! embedded cache and the executor's own store of pulled and built blobs.
//!
//! Layout under a root directory:
//! - `blobs/sha256/<aa>/<hex>`: committed blobs, only ever created by an
//!   atomic `rename` of a fully written, fsynced temporary file whose sha256
//!   (and size, when the caller knows it) matched; the shard directory is
//!   fsynced after the rename, so a committed blob survives a crash.
//! - `tmp/`: writes in progress. Nothing here is ever served;
//!   [`ContentStore::remove_temp_files`] clears what a crash left behind.
//! - `quarantine/`: blobs a verification found corrupt, kept for
//!   inspection (created when first needed).
//!
//! Promises:
//! - a blob is never visible under its digest while partial or while its
//!   bytes hash to something else ([`BlobWriter`] hashes while it writes,
//!   [`BlobWriter::seal`] refuses a mismatch);
//! - a writer or staged blob dropped before it is installed leaves nothing
//!   behind;
//! - committed blobs are never written in place, so a blob may share its
//!   inode with another store's copy ([`ContentStore::link_from`]: one copy
//!   of the bytes on disk under one `--cache-dir`);
//! - committed blobs are readable by everyone (`0644`): they are content,
//!   not secrets, and may be hard-linked into an OCI layout.
//!
//! This module knows nothing about an index; [`crate::index::Store`] decides
//! when a blob may be installed or removed there.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use kiln_common::{Digest, Sha256Writer};

pub use kiln_common::errors::cannot_link;

/// What [`ContentStore::scan`] found: blobs with their sizes, and stray
/// paths that are not blobs.
pub type Scan = (Vec<(Digest, u64)>, Vec<PathBuf>);

/// Why a content store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ContentError {
    #[error("content store {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
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

impl ContentError {
    fn io(context: impl std::fmt::Display) -> impl FnOnce(io::Error) -> ContentError {
        let context = context.to_string();
        move |source| ContentError::Io { context, source }
    }

    /// True when the failure is a full disk or exhausted quota.
    pub fn is_no_space(&self) -> bool {
        matches!(self, ContentError::Io { source, .. } if is_no_space(source))
    }
}

/// Paths of a content store below one root directory; cheap to clone.
#[derive(Debug, Clone)]
pub struct ContentStore {
    root: PathBuf,
    blobs: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
    /// Every byte written by this store's writers is added here (the
    /// executor's pull progress).
    progress: Option<Arc<AtomicU64>>,
}

impl ContentStore {
    /// Opens (creating the directories if needed) the store rooted at `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self, ContentError> {
        let root = dir.into();
        let store = Self {
            blobs: root.join("blobs"),
            tmp: root.join("tmp"),
            quarantine: root.join("quarantine"),
            root,
            progress: None,
        };
        for dir in [store.blobs.join("sha256"), store.tmp.clone()] {
            fs::create_dir_all(&dir).map_err(ContentError::io(dir.display()))?;
        }
        Ok(store)
    }

    /// Adds every byte later written by this store's writers to `counter`.
    pub fn with_progress(mut self, counter: Arc<AtomicU64>) -> Self {
        self.progress = Some(counter);
        self
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the blob lives (or would live).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.sharded_path())
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Size of a stored blob.
    pub fn size(&self, digest: &Digest) -> Result<u64, ContentError> {
        self.file_size(digest)?
            .ok_or_else(|| ContentError::NotFound(digest.clone()))
    }

    /// Size of a committed blob on disk, if present.
    pub fn file_size(&self, digest: &Digest) -> Result<Option<u64>, ContentError> {
        let p = self.path(digest);
        match fs::metadata(&p) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(ContentError::io(p.display())(e)),
        }
    }

    /// Opens a blob for reading.
    pub fn open(&self, digest: &Digest) -> Result<File, ContentError> {
        let p = self.path(digest);
        match File::open(&p) {
            Ok(f) => Ok(f),
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                Err(ContentError::NotFound(digest.clone()))
            }
            Err(e) => Err(ContentError::io(p.display())(e)),
        }
    }

    /// Reads a small blob (config, manifest) into memory.
    pub fn read_small(&self, digest: &Digest) -> Result<Vec<u8>, ContentError> {
        let p = self.path(digest);
        fs::read(&p).map_err(|e| {
            if e.kind() == io::ErrorKind::NotFound {
                ContentError::NotFound(digest.clone())
            } else {
                ContentError::io(p.display())(e)
            }
        })
    }

    /// Stores small in-memory content (configs, manifests) and returns its
    /// digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, ContentError> {
        let digest = Digest::of_bytes(bytes);
        if self.contains(&digest) {
            return Ok(digest);
        }
        let mut w = self.writer()?;
        w.write_all(bytes)
            .map_err(ContentError::io(self.tmp.display()))?;
        w.commit(&digest, Some(bytes.len() as u64))?;
        Ok(digest)
    }

    /// A new, exclusively created temporary file.
    pub fn create_temp(&self) -> Result<(PathBuf, File), ContentError> {
        loop {
            let path = self.temp_name("upload");
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(ContentError::io(path.display())(e)),
            }
        }
    }

    fn temp_name(&self, kind: &str) -> PathBuf {
        self.tmp.join(format!(
            "{kind}-{}",
            hex::encode(rand::random::<[u8; 12]>())
        ))
    }

    /// Starts writing a new blob; nothing is visible until it is committed.
    pub fn writer(&self) -> Result<BlobWriter, ContentError> {
        let (path, file) = self.create_temp()?;
        Ok(BlobWriter {
            path: Some(path),
            out: Some(Sha256Writer::new(BufWriter::with_capacity(1 << 20, file))),
            written_back: 0,
            store: self.clone(),
        })
    }

    /// Hard-links `src` to a new temporary name and checks that its bytes
    /// are `expected` (and `expected_size`, when given): a blob adopted from
    /// a file that already holds its bytes, without copying them.
    /// `Ok(None)` when `src` cannot be linked here (another filesystem,
    /// links not permitted): the caller copies instead.
    pub fn stage_link(
        &self,
        src: &Path,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<Option<StagedBlob>, ContentError> {
        let temp = loop {
            let path = self.temp_name("link");
            match fs::hard_link(src, &path) {
                Ok(()) => break path,
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) if cannot_link(&e) => return Ok(None),
                Err(e) => {
                    return Err(ContentError::io(format!(
                        "linking {} into {}",
                        src.display(),
                        self.tmp.display()
                    ))(e));
                }
            }
        };
        // From here on, dropping `staged` removes the link.
        let mut staged = StagedBlob {
            path: Some(temp),
            digest: expected.clone(),
            size: 0,
        };
        let (actual, size) = hash_file(staged.temp_path())
            .map_err(ContentError::io(format!("reading {}", src.display())))?;
        check(expected, expected_size, &actual, size)?;
        staged.size = size;
        Ok(Some(staged))
    }

    /// Adopts the file at `src` as blob `expected` by hard-linking it in (see
    /// [`ContentStore::stage_link`]); returns where the blob is now.
    pub fn link_from(
        &self,
        src: &Path,
        expected: &Digest,
        expected_size: u64,
    ) -> Result<Option<PathBuf>, ContentError> {
        let dest = self.path(expected);
        if dest.is_file() {
            return Ok(Some(dest));
        }
        match self.stage_link(src, expected, Some(expected_size))? {
            Some(staged) => {
                self.install(staged)?;
                Ok(Some(dest))
            }
            None => Ok(None),
        }
    }

    /// Atomically moves a staged blob to its final name and makes the
    /// rename durable. Returns false (and removes the staged file) when the
    /// blob was already present.
    pub fn install(&self, mut staged: StagedBlob) -> Result<bool, ContentError> {
        let ctx = || format!("storing blob {}", staged.digest);
        let target = self.path(&staged.digest);
        let Some(temp) = staged.path.take() else {
            return Ok(false);
        };
        if target.exists() {
            fs::remove_file(&temp).map_err(ContentError::io(ctx()))?;
            return Ok(false);
        }
        let result = (|| {
            let shard = target
                .parent()
                .ok_or_else(|| io::Error::other("blob path has no parent"))?;
            if !shard.exists() {
                fs::create_dir_all(shard)?;
                // The new shard directory's own entry must be durable too.
                if let Some(algo_dir) = shard.parent() {
                    fsync_dir(algo_dir)?;
                }
            }
            fs::rename(&temp, &target)?;
            fsync_dir(shard)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&temp);
        }
        result.map_err(ContentError::io(ctx()))?;
        Ok(true)
    }

    /// Removes every leftover temporary file; returns how many there were.
    pub fn remove_temp_files(&self) -> Result<usize, ContentError> {
        let ctx = ContentError::io(self.tmp.display());
        let remove = || -> io::Result<usize> {
            let mut removed = 0;
            for entry in fs::read_dir(&self.tmp)? {
                let entry = entry?;
                if entry.file_type()?.is_dir() {
                    fs::remove_dir_all(entry.path())?;
                } else {
                    fs::remove_file(entry.path())?;
                }
                removed += 1;
            }
            Ok(removed)
        };
        remove().map_err(ctx)
    }

    /// Removes a committed blob; false when it was not there.
    pub fn remove(&self, digest: &Digest) -> Result<bool, ContentError> {
        match fs::remove_file(self.path(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(ContentError::io(format!("removing blob {digest}"))(e)),
        }
    }

    /// Moves a blob out of the served tree into `quarantine/`.
    pub fn quarantine(&self, digest: &Digest) -> Result<PathBuf, ContentError> {
        let ctx = ContentError::io(format!("quarantining blob {digest}"));
        let target = self.quarantine.join(digest.hex());
        fs::create_dir_all(&self.quarantine)
            .and_then(|()| fs::rename(self.path(digest), &target))
            .map_err(ctx)?;
        Ok(target)
    }

    /// Every committed blob on disk with its size. Files whose names are
    /// not digests are reported separately so recovery can log them.
    pub fn scan(&self) -> Result<Scan, ContentError> {
        let root = self.blobs.join("sha256");
        let scan = || -> io::Result<Scan> {
            let mut blobs = Vec::new();
            let mut strays = Vec::new();
            if !root.exists() {
                return Ok((blobs, strays));
            }
            for shard in fs::read_dir(&root)? {
                let shard = shard?;
                if !shard.file_type()?.is_dir() {
                    strays.push(shard.path());
                    continue;
                }
                for file in fs::read_dir(shard.path())? {
                    let file = file?;
                    let name = file.file_name();
                    match name.to_str().map(Digest::from_hex) {
                        Some(Ok(digest)) if file.file_type()?.is_file() => {
                            blobs.push((digest, file.metadata()?.len()));
                        }
                        _ => strays.push(file.path()),
                    }
                }
            }
            Ok((blobs, strays))
        };
        scan().map_err(ContentError::io(root.display()))
    }
}

fn check(
    expected: &Digest,
    expected_size: Option<u64>,
    actual: &Digest,
    size: u64,
) -> Result<(), ContentError> {
    if actual != expected {
        return Err(ContentError::DigestMismatch {
            expected: expected.clone(),
            actual: actual.clone(),
        });
    }
    if let Some(want) = expected_size
        && want != size
    {
        return Err(ContentError::SizeMismatch {
            digest: expected.clone(),
            expected: want,
            actual: size,
        });
    }
    Ok(())
}

/// A fully written, fsynced temporary file whose bytes are known to be
/// `digest`, waiting for [`ContentStore::install`]. Dropping it removes the
/// file.
#[derive(Debug)]
pub struct StagedBlob {
    path: Option<PathBuf>,
    digest: Digest,
    size: u64,
}

impl StagedBlob {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    fn temp_path(&self) -> &Path {
        self.path.as_deref().unwrap_or(Path::new(""))
    }
}

impl Drop for StagedBlob {
    fn drop(&mut self) {
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// Writes a new blob to a temporary file while hashing it (containerd's
/// content writer). Dropping it without a successful commit removes the
/// temporary file.
pub struct BlobWriter {
    store: ContentStore,
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

    /// Flushes and fsyncs the bytes and checks them against `expected` (and
    /// `expected_size`, when given); on a mismatch removes them and fails.
    /// The result is installed by [`ContentStore::install`] (or an index
    /// that owns this content store).
    pub fn seal(
        mut self,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<StagedBlob, ContentError> {
        let (Some(out), Some(path)) = (self.out.take(), self.path.take()) else {
            return Err(ContentError::Io {
                context: "blob writer".into(),
                source: io::Error::other("already used"),
            });
        };
        // From here on, dropping `staged` removes the temporary file.
        let mut staged = StagedBlob {
            path: Some(path),
            digest: expected.clone(),
            size: 0,
        };
        let (buffered, actual, size) = out.finish();
        check(expected, expected_size, &actual, size)?;
        let ctx = || ContentError::io(staged.temp_path().display());
        let file = buffered.into_inner().map_err(|e| ctx()(e.into_error()))?;
        use std::os::unix::fs::PermissionsExt;
        file.set_permissions(fs::Permissions::from_mode(0o644))
            .map_err(ctx())?;
        file.sync_all().map_err(ctx())?;
        staged.size = size;
        Ok(staged)
    }

    /// Seals and installs the blob under `expected` in the writer's store;
    /// returns where it is.
    pub fn commit(
        self,
        expected: &Digest,
        expected_size: Option<u64>,
    ) -> Result<PathBuf, ContentError> {
        let store = self.store.clone();
        store.install(self.seal(expected, expected_size)?)?;
        Ok(store.path(expected))
    }

    /// Commits under whatever digest the bytes have (for content kiln made
    /// itself), returning it with the size.
    pub fn commit_computed(self) -> Result<(Digest, u64), ContentError> {
        let Some(out) = &self.out else {
            return Err(ContentError::Io {
                context: "blob writer".into(),
                source: io::Error::other("already used"),
            });
        };
        let (digest, size) = (out.current_digest(), out.bytes_written());
        self.commit(&digest, Some(size))?;
        Ok((digest, size))
    }
}

impl Write for BlobWriter {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(out) = &mut self.out else {
            return Err(io::Error::other("blob writer already committed"));
        };
        let n = out.write(buf)?;
        if let Some(progress) = &self.store.progress {
            progress.fetch_add(n as u64, Ordering::Relaxed);
        }
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

impl Drop for BlobWriter {
    fn drop(&mut self) {
        drop(self.out.take());
        if let Some(path) = self.path.take() {
            let _ = fs::remove_file(path);
        }
    }
}

/// The sha256 and size of a file's bytes.
pub fn hash_file(path: &Path) -> io::Result<(Digest, u64)> {
    let mut hasher = Sha256Writer::new(io::sink());
    io::copy(
        &mut io::BufReader::with_capacity(1 << 20, File::open(path)?),
        &mut hasher,
    )?;
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

/// fsync on a directory makes the names created or renamed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// True for "the disk is full" errors (ENOSPC, EDQUOT).
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
        || err.kind() == io::ErrorKind::QuotaExceeded
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn tmp_files(store: &ContentStore) -> usize {
        fs::read_dir(store.tmp_dir()).unwrap().count()
    }

    #[test]
    fn committed_blob_is_readable_under_its_sharded_path() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
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
    fn a_second_commit_of_the_same_bytes_keeps_one_blob_and_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        let digest = Digest::of_bytes(b"abc");
        for _ in 0..2 {
            let mut w = store.writer().unwrap();
            w.write_all(b"abc").unwrap();
            store.install(w.seal(&digest, Some(3)).unwrap()).unwrap();
        }
        assert_eq!(fs::read(store.path(&digest)).unwrap(), b"abc");
        assert_eq!(tmp_files(&store), 0, "duplicate temp file must be removed");
        let (blobs, strays) = store.scan().unwrap();
        assert_eq!(blobs, vec![(digest, 3)]);
        assert!(strays.is_empty());
    }

    #[test]
    fn commit_with_wrong_digest_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        let want = Digest::of_bytes(b"other");
        let mut w = store.writer().unwrap();
        w.write_all(b"hello").unwrap();
        let err = w.commit(&want, None).unwrap_err();
        assert!(matches!(err, ContentError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&want));
        assert!(!store.contains(&Digest::of_bytes(b"hello")));
        assert_eq!(tmp_files(&store), 0);
    }

    #[test]
    fn commit_with_wrong_size_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        let d = Digest::of_bytes(b"hello");
        let mut w = store.writer().unwrap();
        w.write_all(b"hello").unwrap();
        assert!(matches!(
            w.commit(&d, Some(4)),
            Err(ContentError::SizeMismatch { .. })
        ));
        assert!(!store.contains(&d));
        assert_eq!(tmp_files(&store), 0);
    }

    #[test]
    fn dropped_writer_removes_its_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        let mut w = store.writer().unwrap();
        w.write_all(b"abandoned").unwrap();
        assert_eq!(tmp_files(&store), 1);
        drop(w);
        assert_eq!(tmp_files(&store), 0);
    }

    #[test]
    fn writes_are_counted_into_the_progress_counter() {
        let dir = tempfile::tempdir().unwrap();
        let counter = Arc::new(AtomicU64::new(0));
        let store = ContentStore::new(dir.path())
            .unwrap()
            .with_progress(counter.clone());
        store.put_bytes(b"twelve bytes").unwrap();
        assert_eq!(counter.load(Ordering::Relaxed), 12);
    }

    #[test]
    fn linked_blob_shares_the_inode_and_wrong_bytes_are_refused() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path().join("store")).unwrap();
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
            Err(ContentError::DigestMismatch { .. })
        ));
        let wrong_size = ContentStore::new(dir.path().join("store2")).unwrap();
        assert!(matches!(
            wrong_size.link_from(&src, &d, 4),
            Err(ContentError::SizeMismatch { .. })
        ));
        assert!(!store.contains(&other) && !wrong_size.contains(&d));
        assert_eq!(tmp_files(&store) + tmp_files(&wrong_size), 0);
    }

    #[test]
    fn missing_blob_is_reported_by_digest() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        let d = Digest::of_bytes(b"nope");
        let err = store.open(&d).unwrap_err();
        assert!(err.to_string().contains(&d.to_string()));
        assert_eq!(store.put_bytes(b"nope").unwrap(), d);
        assert!(store.contains(&d));
    }

    #[test]
    fn leftover_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let store = ContentStore::new(dir.path()).unwrap();
        store.create_temp().unwrap();
        store.create_temp().unwrap();
        assert_eq!(store.remove_temp_files().unwrap(), 2);
        assert_eq!(tmp_files(&store), 0);
    }
}
