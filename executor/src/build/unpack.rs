//! Unpacking image layers (tar streams, gzip/zstd/uncompressed detected by
//! their magic bytes) into directories, in one of two modes:
//!
//! - [`UnpackMode::Apply`]: layers are applied in order onto one root;
//!   OCI whiteouts (`.wh.name`) delete the lower file and opaque markers
//!   (`.wh..wh..opq`) empty the directory's lower content.
//! - [`UnpackMode::OverlayLower`]: one layer is unpacked into its own empty
//!   directory for use as an overlayfs lower dir; whiteouts become overlay
//!   whiteouts (char device 0:0) and opaque markers the
//!   `trusted.overlay.opaque=y` xattr.
//!
//! Promises: memory does not grow with the layer (everything is streamed);
//! nothing is ever created, changed or removed outside the root. Entry names
//! with `..` are rejected; absolute names are taken relative to the root;
//! every parent directory is resolved component by component inside the root,
//! with symlinks (including ones made by earlier entries) followed as if the
//! root were `/` (like `openat2(RESOLVE_IN_ROOT)`; the walk is kiln's one
//! in-root resolver, [`crate::build::fsutil::walk_in_root`]), and the last
//! component is never followed. Owners, modes (setuid/setgid/sticky set after chown),
//! xattrs, device nodes (skipped with a warning where mknod is not allowed),
//! hard links (inside the root only) and mtimes (directories last) are kept.
//!
//! A layer is untrusted input: sparse files (GNU `S` entries and the PAX
//! `GNU.sparse.*` formats 0.0, 0.1 and 1.0) are written sparsely, their
//! holes left as holes, and a layer's expanded size (file contents with the
//! holes of sparse files, plus 512 bytes per entry) is checked against
//! [`UnpackOptions::max_expanded_size`] before anything of an entry that
//! would exceed it is written.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_common::{Digest, VerifyingReader};

pub(crate) const WHITEOUT_PREFIX: &str = ".wh.";
pub(crate) const OPAQUE_MARKER: &str = ".wh..wh..opq";
pub(crate) use crate::build::fsutil::MAX_SYMLINKS;
use crate::build::fsutil::{WalkError, walk_in_root};
/// Default for [`UnpackOptions::max_expanded_size`] (`--max-layer-size`).
pub const DEFAULT_MAX_EXPANDED_SIZE: u64 = 32 << 30;
/// What each entry counts towards the expanded size besides its content:
/// its header, and the inode it costs.
pub(crate) const ENTRY_OVERHEAD: u64 = 512;
/// Most data regions a PAX sparse map may list.
const MAX_SPARSE_REGIONS: usize = 1 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnpackMode {
    Apply,
    OverlayLower,
}

#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub mode: UnpackMode,
    /// Set owners from the tar headers (needs root or CAP_CHOWN). When off,
    /// files belong to the unpacking user.
    pub preserve_ownership: bool,
    /// Largest expanded size of one layer: the apparent sizes of its files
    /// (sparse holes included) plus 512 bytes per entry.
    pub max_expanded_size: u64,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            mode: UnpackMode::Apply,
            // SAFETY: geteuid has no preconditions and cannot fail.
            preserve_ownership: unsafe { libc::geteuid() } == 0,
            max_expanded_size: DEFAULT_MAX_EXPANDED_SIZE,
        }
    }
}

impl UnpackOptions {
    pub fn overlay_lower() -> Self {
        UnpackOptions {
            mode: UnpackMode::OverlayLower,
            ..Default::default()
        }
    }
}

/// What an unpack did, for logs and reports.
#[derive(Debug, Default, Clone)]
pub struct UnpackStats {
    pub entries: u64,
    /// Apparent size of the files written (holes of sparse files included).
    pub file_bytes: u64,
    /// Entries not reproduced exactly (device nodes without permission,
    /// xattrs the filesystem refused), one message each.
    pub warnings: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum UnpackError {
    #[error("layer entry {entry:?} rejected: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("layer entry {entry:?}: {op} {path}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("reading layer: {0}")]
    Read(#[source] io::Error),
    #[error(
        "layer entry {entry:?}: the layer expands to more than {limit} bytes (--max-layer-size)"
    )]
    TooLarge { entry: String, limit: u64 },
    #[error("layer entry {entry:?}: invalid sparse file: {reason}")]
    Sparse { entry: String, reason: String },
}

/// Wraps a layer stream in the decompressor its first bytes call for
/// (gzip `1f 8b`, zstd `28 b5 2f fd`, otherwise plain tar).
pub fn decompress<'a, R: BufRead + 'a>(mut r: R) -> io::Result<Box<dyn Read + 'a>> {
    let head = r.fill_buf()?;
    if head.starts_with(&[0x1f, 0x8b]) {
        Ok(Box::new(flate2::bufread::MultiGzDecoder::new(r)))
    } else if head.starts_with(&[0x28, 0xb5, 0x2f, 0xfd]) {
        Ok(Box::new(zstd::Decoder::with_buffer(r)?))
    } else {
        Ok(Box::new(r))
    }
}

/// Unpacks one (possibly compressed) layer into `root`. When `diff_id` is
/// given, the uncompressed stream must hash to it or the unpack fails.
/// Decompression and hashing overlap with the file system work
/// ([`with_decompressed`]).
pub fn unpack_layer<R: Read + Send>(
    layer: R,
    root: &Path,
    opts: &UnpackOptions,
    diff_id: Option<&Digest>,
) -> Result<UnpackStats, UnpackError> {
    let (result, produced) = with_decompressed(layer, diff_id, |tar| unpack_tar(tar, root, opts));
    let stats = result?;
    produced.map_err(UnpackError::Read)?;
    Ok(stats)
}

/// Runs `consume` on the uncompressed tar stream of `layer`, decompressed
/// (and, with `diff_id`, hashed against it) on a second thread that hands it
/// over in 1 MiB chunks through a bounded channel (4 chunks): the two
/// overlap, and memory does not grow with the layer. When `consume` returns
/// early but successfully (the tar reader stops at the end-of-archive
/// marker) the thread reads on to EOF, so the digest covers the padding
/// after it too; when `consume` fails, the thread stops. Returns what
/// `consume` returned and the thread's own outcome (a read, decompression
/// or digest error), in that order of importance.
pub(crate) fn with_decompressed<R: Read + Send, T, E>(
    layer: R,
    diff_id: Option<&Digest>,
    consume: impl FnOnce(ChannelReader) -> Result<T, E>,
) -> (Result<T, E>, io::Result<()>) {
    const CHUNK: usize = 1 << 20;
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let consumer_failed = std::sync::atomic::AtomicBool::new(false);
    let consumer_failed = &consumer_failed;
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || -> io::Result<()> {
            let plain = decompress(BufReader::with_capacity(256 * 1024, layer))?;
            let mut src: Box<dyn Read> = match diff_id {
                Some(d) => Box::new(VerifyingReader::new(plain, d.clone())),
                None => plain,
            };
            let mut consumer_gone = false;
            loop {
                if consumer_failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Ok(());
                }
                let mut buf = vec![0u8; CHUNK];
                let mut filled = 0;
                while filled < CHUNK {
                    match src.read(&mut buf[filled..]) {
                        Ok(0) => break,
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let msg = e.to_string();
                            let _ = tx.send(Err(e));
                            return Err(io::Error::new(io::ErrorKind::InvalidData, msg));
                        }
                    }
                }
                if filled == 0 {
                    return Ok(());
                }
                buf.truncate(filled);
                if !consumer_gone && tx.send(Ok(buf)).is_err() {
                    // The consumer finished (or failed); keep reading
                    // only to verify the digest.
                    consumer_gone = true;
                    if diff_id.is_none() {
                        return Ok(());
                    }
                }
            }
        });
        let reader = ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        };
        let result = consume(reader);
        if result.is_err() {
            consumer_failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("decompression thread panicked")));
        (result, produced)
    })
}

/// The reading end of the decompression thread's channel.
pub(crate) struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
}

impl ChannelReader {
    /// A reader of the chunks sent on `rx`, in order; a sent error is
    /// returned by `read`, the sender's end is the end of the stream.
    pub(crate) fn new(rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>) -> Self {
        ChannelReader {
            rx,
            buf: Vec::new(),
            pos: 0,
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(Ok(chunk)) => {
                    self.buf = chunk;
                    self.pos = 0;
                }
                Ok(Err(e)) => return Err(e),
                // Sender gone: end of stream.
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Applies layer files (each optionally with its diff_id) in order onto `root`.
pub fn apply_layers<'a, I>(
    layers: I,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError>
where
    I: IntoIterator<Item = (&'a Path, Option<&'a Digest>)>,
{
    let mut total = UnpackStats::default();
    for (path, diff_id) in layers {
        let f = File::open(path).map_err(|source| UnpackError::Io {
            entry: String::new(),
            op: "open layer",
            path: path.to_path_buf(),
            source,
        })?;
        let s = unpack_layer(f, root, opts, diff_id)?;
        total.entries += s.entries;
        total.file_bytes += s.file_bytes;
        total.warnings.extend(s.warnings);
    }
    Ok(total)
}

/// Unpacks an uncompressed tar stream into `root`.
pub fn unpack_tar<R: Read>(
    tar_stream: R,
    root: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, UnpackError> {
    let mut u = Unpacker {
        root: root.to_path_buf(),
        opts: opts.clone(),
        stats: UnpackStats::default(),
        resolved: HashMap::new(),
        written: HashSet::new(),
        dir_times: Vec::new(),
        expanded: 0,
        plain_dirs: HashMap::new(),
        fresh_dirs: HashSet::new(),
        created: HashSet::new(),
        pool: None,
        umask: current_umask(),
        // SAFETY: geteuid/getegid have no preconditions and cannot fail.
        ids: unsafe { (libc::geteuid(), libc::getegid()) },
    };
    let mut archive = tar::Archive::new(tar_stream);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        u.entry(&mut entry)?;
    }
    u.barrier()?;
    u.finish_dirs()?;
    Ok(u.stats)
}

struct Unpacker {
    root: PathBuf,
    opts: UnpackOptions,
    stats: UnpackStats,
    /// Parent path (as in the tar) -> resolved host directory. Cleared
    /// whenever a directory or symlink is replaced or removed, since that can
    /// change where names resolve.
    resolved: HashMap<Vec<u8>, PathBuf>,
    /// Host paths this layer wrote, which an opaque marker must not remove.
    written: HashSet<PathBuf>,
    dir_times: Vec<(PathBuf, u64)>,
    /// Expanded size so far (see [`UnpackOptions::max_expanded_size`]).
    expanded: u64,
    /// Directories known to be "plain" (true) or not: new entries in a
    /// plain directory get exactly the unpacker's own ids and
    /// `mode & !umask`, because its group is our gid (so neither a setgid
    /// bit nor the `grpid` mount option changes a new entry's group), it has
    /// no setgid bit (which new directories would inherit) and no default
    /// ACL (which would replace the umask). In them a `chown` to our own ids
    /// and a `chmod` to the mode given at creation would change nothing and
    /// are skipped; everywhere else they are always made. Filled as
    /// directories are created, or checked once (`lstat`, `lgetxattr`).
    plain_dirs: HashMap<PathBuf, bool>,
    /// Directories this unpack created (empty when made): a name in one is
    /// free unless this unpack used it (`created`).
    fresh_dirs: HashSet<PathBuf>,
    /// Every host path this unpack created or replaced.
    created: HashSet<PathBuf>,
    /// Writes small new files on worker threads ([`FilePool`]); started
    /// with the first such file.
    pool: Option<FilePool>,
    /// The process umask, when it could be read.
    umask: Option<u32>,
    /// Effective uid and gid: the owner of what this process creates.
    ids: (u32, u32),
}

/// Regular files at most this big go to the [`FilePool`] (read into memory
/// first); bigger ones are streamed by the unpacking thread.
const POOL_FILE_MAX: u64 = 256 * 1024;
/// Files queued for the pool: bounds its memory to about 8 MiB.
const POOL_QUEUE: usize = 32;
/// Worker threads of the pool. Creating a file mostly waits for the file
/// system, not the CPU, so this does not follow the core count.
const POOL_WORKERS: usize = 4;

/// One new regular file for the pool: create (`O_EXCL`, never following a
/// link), write, chown and chmod when needed, set the mtime.
struct FileJob {
    raw: Vec<u8>,
    path: PathBuf,
    data: Vec<u8>,
    create_mode: u32,
    chmod: Option<u32>,
    chown: Option<(u32, u32)>,
    mtime: u64,
}

impl FileJob {
    fn run(self) -> Result<(), UnpackError> {
        let err = |op: &'static str| {
            let entry = lossy(&self.raw);
            let path = self.path.clone();
            move |source| UnpackError::Io {
                entry,
                op,
                path,
                source,
            }
        };
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(self.create_mode)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&self.path)
            .map_err(err("create"))?;
        io::Write::write_all(&mut f, &self.data).map_err(err("write"))?;
        if let Some((uid, gid)) = self.chown {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid)).map_err(err("chown"))?;
        }
        if let Some(mode) = self.chmod {
            f.set_permissions(fs::Permissions::from_mode(mode))
                .map_err(err("chmod"))?;
        }
        set_fd_mtime(&f, self.mtime).map_err(err("set mtime"))
    }
}

/// Worker threads writing [`FileJob`]s, with a count of unfinished jobs to
/// wait on and the first error.
struct FilePool {
    jobs: Option<std::sync::mpsc::SyncSender<FileJob>>,
    workers: Vec<std::thread::JoinHandle<()>>,
    state: std::sync::Arc<PoolState>,
}

#[derive(Default)]
struct PoolState {
    /// (jobs submitted and not finished, first error).
    progress: std::sync::Mutex<(usize, Option<UnpackError>)>,
    done: std::sync::Condvar,
}

impl FilePool {
    fn new() -> FilePool {
        let (tx, rx) = std::sync::mpsc::sync_channel::<FileJob>(POOL_QUEUE);
        let rx = std::sync::Arc::new(std::sync::Mutex::new(rx));
        let state = std::sync::Arc::new(PoolState::default());
        let mut workers = Vec::new();
        for i in 0..POOL_WORKERS {
            let rx = std::sync::Arc::clone(&rx);
            let state = std::sync::Arc::clone(&state);
            let spawned = std::thread::Builder::new()
                .name(format!("unpack-{i}"))
                .spawn(move || {
                    loop {
                        let job = match rx.lock() {
                            Ok(rx) => match rx.recv() {
                                Ok(job) => job,
                                Err(_) => return,
                            },
                            Err(_) => return,
                        };
                        // A panic must still count the job as finished,
                        // or `wait` would never return.
                        let result =
                            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| job.run()))
                                .unwrap_or_else(|_| {
                                    Err(UnpackError::Read(io::Error::other(
                                        "an unpack worker thread panicked",
                                    )))
                                });
                        let mut p = state.progress.lock().unwrap_or_else(|e| e.into_inner());
                        p.0 -= 1;
                        if let (Err(e), None) = (result, &p.1) {
                            p.1 = Some(e);
                        }
                        // Only `wait` listens, and only for "all done".
                        if p.0 == 0 {
                            state.done.notify_all();
                        }
                    }
                });
            // With no worker at all, `submit` runs the jobs itself.
            if let Ok(handle) = spawned {
                workers.push(handle);
            }
        }
        FilePool {
            jobs: Some(tx),
            workers,
            state,
        }
    }

    fn submit(&mut self, job: FileJob) -> Result<(), UnpackError> {
        if self.workers.is_empty() {
            return job.run();
        }
        {
            let mut p = self
                .state
                .progress
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if let Some(e) = p.1.take() {
                return Err(e);
            }
            p.0 += 1;
        }
        let sent = self.jobs.as_ref().map(|tx| tx.send(job));
        if !matches!(sent, Some(Ok(()))) {
            return Err(UnpackError::Read(io::Error::other(
                "the unpack worker threads stopped",
            )));
        }
        Ok(())
    }

    fn wait(&self) -> Result<(), UnpackError> {
        let mut p = self
            .state
            .progress
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        while p.0 > 0 {
            p = self.state.done.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        match p.1.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for FilePool {
    fn drop(&mut self) {
        // Closing the queue ends the workers once it is drained.
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

/// Reads the umask without changing it (`umask(2)` can only set it, which
/// would race with other threads creating files).
fn current_umask() -> Option<u32> {
    let status = fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("Umask:"))?;
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).ok()
}

/// How to create an entry in a directory, decided before creating it.
struct Creation {
    /// Mode to pass to the creating call.
    mode: u32,
    /// The entry already has `mode` (no chmod needed afterwards).
    mode_exact: bool,
    /// The entry is owned as the header says once created (no chown needed).
    owner_exact: bool,
}

/// Splits an entry name into components; `None` if it contains `..`.
pub(crate) fn components(raw: &[u8]) -> Option<Vec<&OsStr>> {
    let mut out = Vec::new();
    for c in raw.split(|b| *b == b'/') {
        match c {
            b"" | b"." => {}
            b".." => return None,
            c => out.push(OsStr::from_bytes(c)),
        }
    }
    Some(out)
}

pub(crate) fn lossy(raw: &[u8]) -> String {
    String::from_utf8_lossy(raw).into_owned()
}

impl Unpacker {
    fn io(
        &self,
        entry: &[u8],
        op: &'static str,
        path: &Path,
    ) -> impl FnOnce(io::Error) -> UnpackError {
        let entry = lossy(entry);
        let path = path.to_path_buf();
        move |source| UnpackError::Io {
            entry,
            op,
            path,
            source,
        }
    }

    fn unsafe_entry(entry: &[u8], reason: impl Into<String>) -> UnpackError {
        UnpackError::Unsafe {
            entry: lossy(entry),
            reason: reason.into(),
        }
    }

    /// Resolves `parts` as a directory inside the root, following symlinks
    /// as if the root were `/`. Missing directories are created when
    /// `create` is set.
    fn resolve_dir(
        &mut self,
        entry: &[u8],
        parts: &[&OsStr],
        create: bool,
    ) -> Result<PathBuf, UnpackError> {
        let key: Vec<u8> = parts
            .iter()
            .flat_map(|p| p.as_bytes().iter().copied().chain([b'/']))
            .collect();
        if let Some(p) = self.resolved.get(&key) {
            return Ok(p.clone());
        }
        // Looking names up must see every file created so far.
        self.barrier()?;
        let root = self.root.clone();
        let path: PathBuf = parts.iter().collect();
        let walked = walk_in_root(&root, &path, |host, meta| match meta {
            Ok(m) if m.is_dir() => Ok(()),
            Ok(_) => Err(Self::unsafe_entry(
                entry,
                format!("parent {} is not a directory", host.display()),
            )),
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                fs::create_dir(host).map_err(self.io(entry, "mkdir", host))?;
                // A new directory inherits setgid and default ACLs
                // from its parent only.
                if host
                    .parent()
                    .is_some_and(|p| self.plain_dirs.get(p) == Some(&true))
                {
                    self.plain_dirs.insert(host.to_path_buf(), true);
                }
                self.fresh_dirs.insert(host.to_path_buf());
                self.created.insert(host.to_path_buf());
                Ok(())
            }
            Err(e) => Err(self.io(entry, "lstat", host)(e)),
        });
        let out = match walked {
            Ok(out) => out,
            Err(WalkError::TooManyLinks) => {
                return Err(Self::unsafe_entry(
                    entry,
                    "too many levels of symbolic links in its parent path",
                ));
            }
            Err(WalkError::ReadLink { path, source }) => {
                return Err(self.io(entry, "readlink", &path)(source));
            }
            Err(WalkError::Visit(e)) => return Err(e),
        };
        self.resolved.insert(key, out.clone());
        Ok(out)
    }

    /// Removes whatever is at `path` (a directory recursively).
    fn remove_existing(&mut self, entry: &[u8], path: &Path) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                self.resolved.clear();
                self.plain_dirs.retain(|p, _| !p.starts_with(path));
                self.fresh_dirs.retain(|p| !p.starts_with(path));
                fs::remove_dir_all(path).map_err(self.io(entry, "remove", path))
            }
            Ok(m) => {
                if m.file_type().is_symlink() {
                    self.resolved.clear();
                }
                fs::remove_file(path).map_err(self.io(entry, "remove", path))
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(self.io(entry, "lstat", path)(e)),
        }
    }

    /// Hands a small new file to the worker pool (see `entry`).
    #[allow(clippy::too_many_arguments)]
    fn pool_file<R: Read>(
        &mut self,
        e: &mut tar::Entry<'_, R>,
        raw: Vec<u8>,
        path: PathBuf,
        parent: &Path,
        header: &tar::Header,
        mode: u32,
        mtime: u64,
        content: u64,
    ) -> Result<(), UnpackError> {
        let how = self.creation(parent, header, mode);
        let chown = match (self.opts.preserve_ownership, how.owner_exact) {
            (true, false) => Some(owner(header)?),
            _ => None,
        };
        let mut data = Vec::with_capacity(content as usize);
        e.read_to_end(&mut data).map_err(UnpackError::Read)?;
        self.stats.file_bytes += content;
        self.created.insert(path.clone());
        if self.opts.mode == UnpackMode::Apply {
            self.written.insert(path.clone());
        }
        let job = FileJob {
            raw,
            path,
            data,
            create_mode: how.mode,
            chmod: (!how.mode_exact).then_some(mode),
            chown,
            mtime,
        };
        let pool = match &mut self.pool {
            Some(pool) => pool,
            none => none.insert(FilePool::new()),
        };
        pool.submit(job)
    }

    /// Waits until the worker pool has written every file handed to it;
    /// the first error any of them met is returned here.
    fn barrier(&mut self) -> Result<(), UnpackError> {
        match &self.pool {
            Some(pool) => pool.wait(),
            None => Ok(()),
        }
    }

    /// Creates the entry at `path` with `create`; if the name is taken,
    /// removes what is there (as [`Self::remove_existing`]) and creates it
    /// again. Trying first saves an `lstat` per entry on a fresh root.
    fn create_replacing<T>(
        &mut self,
        raw: &[u8],
        op: &'static str,
        path: &Path,
        mut create: impl FnMut(&Path) -> io::Result<T>,
    ) -> Result<T, UnpackError> {
        match create(path) {
            Ok(t) => Ok(t),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                self.remove_existing(raw, path)?;
                create(path).map_err(self.io(raw, op, path))
            }
            Err(e) => Err(self.io(raw, op, path)(e)),
        }
    }

    /// How to create an entry with `mode` (permission and special bits)
    /// owned by the header's ids in directory `parent`; see `plain_dirs`.
    fn creation(&mut self, parent: &Path, header: &tar::Header, mode: u32) -> Creation {
        let plain = self.is_plain(parent);
        let owner_exact = !self.opts.preserve_ownership
            || (plain && owner(header).is_ok_and(|ids| ids == self.ids));
        // Special bits are set by chmod after chown (which clears them).
        match self.umask {
            Some(umask) if plain && mode & 0o7000 == 0 && mode & umask == 0 => Creation {
                mode,
                mode_exact: true,
                owner_exact,
            },
            _ => Creation {
                mode: 0o600,
                mode_exact: false,
                owner_exact,
            },
        }
    }

    /// Whether `dir` is plain (see `plain_dirs`), checking it once.
    fn is_plain(&mut self, dir: &Path) -> bool {
        if let Some(known) = self.plain_dirs.get(dir) {
            return *known;
        }
        use std::os::unix::fs::MetadataExt;
        let plain = match fs::symlink_metadata(dir) {
            Ok(m) => {
                m.is_dir()
                    && m.gid() == self.ids.1
                    && m.mode() & libc::S_ISGID == 0
                    && !has_default_acl(dir)
            }
            Err(_) => false,
        };
        self.plain_dirs.insert(dir.to_path_buf(), plain);
        plain
    }

    /// Counts `content` bytes (plus the entry's overhead) towards the
    /// layer's expanded size, refusing the entry if that exceeds the limit.
    fn charge(&mut self, raw: &[u8], content: u64) -> Result<(), UnpackError> {
        let total = self
            .expanded
            .saturating_add(ENTRY_OVERHEAD)
            .saturating_add(content);
        if total > self.opts.max_expanded_size {
            return Err(UnpackError::TooLarge {
                entry: lossy(raw),
                limit: self.opts.max_expanded_size,
            });
        }
        self.expanded = total;
        Ok(())
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let pax = read_pax(e)?;
        let pax_sparse = PaxSparse::detect(&pax);
        // A PAX sparse file's real name is in the extension; the header
        // names a placeholder (`GNUSparseFile.0/...`).
        let raw = match pax_value(&pax, "GNU.sparse.name") {
            Some(name) if pax_sparse.is_some() => name.to_vec(),
            _ => e.path_bytes().into_owned(),
        };
        let Some(parts) = components(&raw) else {
            return Err(Self::unsafe_entry(&raw, "its name contains '..'"));
        };
        let is_file = matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
        );
        let content = match &pax_sparse {
            Some(sparse) if is_file => sparse.real_size(&raw)?,
            _ if is_file => e.size(),
            _ => 0,
        };
        self.charge(&raw, content)?;
        self.stats.entries += 1;
        let Some((name, parent_parts)) = parts.split_last() else {
            // The root itself ("./"): its metadata belongs to the caller.
            return Ok(());
        };
        let name = name.to_os_string();
        let parent = self.resolve_dir(&raw, parent_parts, true)?;
        let path = parent.join(&name);
        let whiteout = name.as_bytes().starts_with(WHITEOUT_PREFIX.as_bytes());

        // A small plain file under a new name in a directory this unpack
        // made cannot meet anything on disk: a worker creates and writes it
        // while this thread goes on. Everything else waits until the
        // workers are done, so it sees the tree exactly as a one-by-one
        // unpack would.
        if matches!(kind, tar::EntryType::Regular | tar::EntryType::Continuous)
            && !whiteout
            && pax_sparse.is_none()
            && content <= POOL_FILE_MAX
            && !pax.iter().any(|(k, _)| k.starts_with("SCHILY.xattr."))
            && self.fresh_dirs.contains(&parent)
            && !self.created.contains(&path)
        {
            let header = e.header().clone();
            let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
            let mtime = header.mtime().unwrap_or(0);
            return self.pool_file(e, raw, path, &parent, &header, mode, mtime, content);
        }
        self.barrier()?;
        self.created.insert(path.clone());

        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&raw, &parent, &name, hidden);
        }
        let header = e.header().clone();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = xattrs_of(&pax);

        match kind {
            tar::EntryType::Directory => {
                let how = self.creation(&parent, &header, mode);
                let mkdir = |p: &Path| {
                    std::fs::DirBuilder::new()
                        .mode(if how.mode_exact { how.mode } else { 0o777 })
                        .create(p)
                };
                let created = match mkdir(&path) {
                    Ok(()) => true,
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        match fs::symlink_metadata(&path) {
                            Ok(m) if m.is_dir() => false,
                            _ => {
                                self.remove_existing(&raw, &path)?;
                                mkdir(&path).map_err(self.io(&raw, "mkdir", &path))?;
                                true
                            }
                        }
                    }
                    Err(e) => return Err(self.io(&raw, "mkdir", &path)(e)),
                };
                if !(created && how.owner_exact) {
                    self.set_owner(&raw, &path, &header)?;
                }
                if !(created && how.mode_exact) {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                        .map_err(self.io(&raw, "chmod", &path))?;
                }
                self.set_xattrs(&raw, &path, &xattrs)?;
                // Known plain only when made here in a plain parent and left
                // with our group, no setgid bit and no default ACL; any
                // other directory is checked when first used.
                let acl = xattrs.iter().any(|(k, _)| k == "system.posix_acl_default");
                let our_group = !self.opts.preserve_ownership
                    || owner(&header).is_ok_and(|(_, gid)| gid == self.ids.1);
                if created
                    && self.plain_dirs.get(&parent) == Some(&true)
                    && our_group
                    && mode & libc::S_ISGID == 0
                    && !acl
                {
                    self.plain_dirs.insert(path.clone(), true);
                } else {
                    self.plain_dirs.remove(&path);
                }
                if created {
                    self.fresh_dirs.insert(path.clone());
                }
                self.dir_times.push((path.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let mut how = self.creation(&parent, &header, mode);
                let f = if kind == tar::EntryType::GNUSparse {
                    self.remove_existing(&raw, &path)?;
                    how.mode_exact = false;
                    // The tar crate holds the GNU sparse map (including its
                    // extension headers, which it reads itself) and seeks
                    // over the holes when it writes the file.
                    e.set_preserve_permissions(false);
                    e.set_preserve_mtime(false);
                    e.set_unpack_xattrs(false);
                    match e.unpack(&path).map_err(self.io(&raw, "write", &path))? {
                        tar::Unpacked::File(f) => f,
                        _ => {
                            return Err(Self::unsafe_entry(
                                &raw,
                                "sparse entry that is not a regular file",
                            ));
                        }
                    }
                } else {
                    let mut f = self.create_replacing(&raw, "create", &path, |p| {
                        OpenOptions::new()
                            .write(true)
                            .create_new(true)
                            .mode(how.mode)
                            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                            .open(p)
                    })?;
                    match &pax_sparse {
                        Some(sparse) => {
                            sparse.write(e, &mut f, content).map_err(|err| match err {
                                SparseError::Invalid(reason) => UnpackError::Sparse {
                                    entry: lossy(&raw),
                                    reason,
                                },
                                SparseError::Io(source) => self.io(&raw, "write", &path)(source),
                            })?
                        }
                        None => {
                            io::copy(e, &mut f).map_err(self.io(&raw, "write", &path))?;
                        }
                    }
                    f
                };
                self.stats.file_bytes += content;
                if self.opts.preserve_ownership && !how.owner_exact {
                    let (uid, gid) = owner(&header)?;
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                        .map_err(self.io(&raw, "chown", &path))?;
                }
                // No special bits (see `creation`), so chown left the mode.
                if !how.mode_exact {
                    f.set_permissions(fs::Permissions::from_mode(mode))
                        .map_err(self.io(&raw, "chmod", &path))?;
                }
                self.set_xattrs(&raw, &path, &xattrs)?;
                set_fd_mtime(&f, mtime).map_err(self.io(&raw, "set mtime", &path))?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Self::unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                let how = self.creation(&parent, &header, 0o777);
                // The target is stored verbatim: it is data, and every later
                // lookup through it is resolved inside the root.
                self.create_replacing(&raw, "symlink", &path, |p| {
                    std::os::unix::fs::symlink(OsStr::from_bytes(&target), p)
                })?;
                self.resolved.clear();
                if !how.owner_exact {
                    self.set_owner(&raw, &path, &header)?;
                }
                self.set_xattrs(&raw, &path, &xattrs)?;
                set_path_mtime(&path, mtime, true).map_err(self.io(&raw, "set mtime", &path))?;
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Self::unsafe_entry(&raw, "hard link without a target"))?
                    .into_owned();
                let Some(tparts) = components(&target) else {
                    return Err(Self::unsafe_entry(
                        &raw,
                        "its hard link target contains '..'",
                    ));
                };
                let Some((tname, tparent)) = tparts.split_last() else {
                    return Err(Self::unsafe_entry(&raw, "hard link to the root directory"));
                };
                let tdir = self.resolve_dir(&raw, tparent, false)?;
                let tpath = tdir.join(tname);
                match fs::symlink_metadata(&tpath) {
                    Ok(m) if m.is_dir() => {
                        return Err(Self::unsafe_entry(&raw, "hard link to a directory"));
                    }
                    Ok(_) => {}
                    Err(err) => return Err(self.io(&raw, "hard link target", &tpath)(err)),
                }
                if tpath != path {
                    // linkat without AT_SYMLINK_FOLLOW: links the name itself.
                    self.create_replacing(&raw, "link", &path, |p| fs::hard_link(&tpath, p))?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let how = self.creation(&parent, &header, mode);
                let (ftype, major, minor) = match kind {
                    tar::EntryType::Char => {
                        (libc::S_IFCHR, header.device_major(), header.device_minor())
                    }
                    tar::EntryType::Block => {
                        (libc::S_IFBLK, header.device_major(), header.device_minor())
                    }
                    _ => (libc::S_IFIFO, Ok(Some(0)), Ok(Some(0))),
                };
                let major = major.ok().flatten().unwrap_or(0);
                let minor = minor.ok().flatten().unwrap_or(0);
                let made = self.create_replacing(&raw, "mknod", &path, |p| {
                    mknod(p, ftype | how.mode, major, minor)
                });
                match made {
                    Ok(()) => {}
                    Err(UnpackError::Io { source, .. })
                        if source.raw_os_error() == Some(libc::EPERM) =>
                    {
                        let msg =
                            format!("skipped device node {} (mknod not permitted)", lossy(&raw));
                        tracing::warn!("{msg}");
                        self.stats.warnings.push(msg);
                        return Ok(());
                    }
                    Err(err) => return Err(err),
                }
                if !how.owner_exact {
                    self.set_owner(&raw, &path, &header)?;
                }
                if !how.mode_exact {
                    fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                        .map_err(self.io(&raw, "chmod", &path))?;
                }
                self.set_xattrs(&raw, &path, &xattrs)?;
                set_path_mtime(&path, mtime, true).map_err(self.io(&raw, "set mtime", &path))?;
            }
            other => {
                let msg = format!(
                    "skipped entry {} of unsupported tar type {other:?}",
                    lossy(&raw)
                );
                tracing::warn!("{msg}");
                self.stats.warnings.push(msg);
                return Ok(());
            }
        }
        if self.opts.mode == UnpackMode::Apply {
            self.written.insert(path);
        }
        Ok(())
    }

    fn whiteout(
        &mut self,
        raw: &[u8],
        parent: &Path,
        name: &OsStr,
        hidden: &[u8],
    ) -> Result<(), UnpackError> {
        let opaque = name == OPAQUE_MARKER;
        if !opaque && (hidden.is_empty() || hidden == b"." || hidden == b"..") {
            return Err(Self::unsafe_entry(raw, "whiteout of an invalid name"));
        }
        match (self.opts.mode, opaque) {
            (UnpackMode::Apply, true) => self.make_opaque(raw, parent),
            (UnpackMode::Apply, false) => {
                let target = parent.join(OsStr::from_bytes(hidden));
                self.remove_existing(raw, &target)
            }
            (UnpackMode::OverlayLower, true) => lsetxattr(parent, "trusted.overlay.opaque", b"y")
                .map_err(self.io(raw, "set opaque xattr", parent)),
            (UnpackMode::OverlayLower, false) => {
                let target = parent.join(OsStr::from_bytes(hidden));
                self.create_replacing(raw, "mknod whiteout", &target, |p| {
                    mknod(p, libc::S_IFCHR, 0, 0)
                })
            }
        }
    }

    /// Removes everything under `dir` that this layer did not write.
    fn make_opaque(&mut self, raw: &[u8], dir: &Path) -> Result<(), UnpackError> {
        let rd = fs::read_dir(dir).map_err(self.io(raw, "read dir", dir))?;
        for child in rd {
            let child = child.map_err(self.io(raw, "read dir", dir))?;
            let p = child.path();
            if self.written.contains(&p) {
                let is_dir = child.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir {
                    self.make_opaque(raw, &p)?;
                }
            } else {
                self.remove_existing(raw, &p)?;
            }
        }
        Ok(())
    }

    fn set_owner(&self, raw: &[u8], path: &Path, header: &tar::Header) -> Result<(), UnpackError> {
        if !self.opts.preserve_ownership {
            return Ok(());
        }
        let (uid, gid) = owner(header)?;
        std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(self.io(raw, "chown", path))
    }

    fn set_xattrs(
        &mut self,
        raw: &[u8],
        path: &Path,
        xattrs: &[(String, Vec<u8>)],
    ) -> Result<(), UnpackError> {
        for (name, value) in xattrs {
            // overlayfs reads its own xattrs (opaque, redirect, metacopy)
            // from lower directories; a layer must not forge them.
            if name.starts_with("trusted.overlay.") {
                let msg = format!("ignored xattr {name} on {}", lossy(raw));
                tracing::warn!("{msg}");
                self.stats.warnings.push(msg);
                continue;
            }
            if let Err(err) = lsetxattr(path, name, value) {
                let msg = format!("could not set xattr {name} on {}: {err}", lossy(raw));
                tracing::warn!("{msg}");
                self.stats.warnings.push(msg);
            }
        }
        Ok(())
    }

    /// Directory mtimes are set last, deepest first, since creating their
    /// contents changed them.
    fn finish_dirs(&mut self) -> Result<(), UnpackError> {
        let mut dirs = std::mem::take(&mut self.dir_times);
        dirs.sort_by_key(|(p, _)| std::cmp::Reverse(p.components().count()));
        for (p, t) in dirs {
            match set_path_mtime(&p, t, true) {
                Ok(()) => {}
                // Removed by a later whiteout in the same layer.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(self.io(b"", "set mtime", &p)(e)),
            }
        }
        Ok(())
    }
}

fn owner(h: &tar::Header) -> Result<(u32, u32), UnpackError> {
    let uid = h.uid().map_err(UnpackError::Read)?;
    let gid = h.gid().map_err(UnpackError::Read)?;
    Ok((uid as u32, gid as u32))
}

/// The entry's PAX extension records (empty without any).
pub(crate) fn read_pax<R: Read>(
    e: &mut tar::Entry<'_, R>,
) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    if let Some(exts) = e.pax_extensions().map_err(UnpackError::Read)? {
        for ext in exts {
            let ext = ext.map_err(UnpackError::Read)?;
            if let Ok(key) = ext.key() {
                out.push((key.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
}

pub(crate) fn pax_value<'a>(pax: &'a [(String, Vec<u8>)], key: &str) -> Option<&'a [u8]> {
    pax.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_slice())
}

pub(crate) fn xattrs_of(pax: &[(String, Vec<u8>)]) -> Vec<(String, Vec<u8>)> {
    pax.iter()
        .filter_map(|(k, v)| {
            k.strip_prefix("SCHILY.xattr.")
                .map(|name| (name.to_string(), v.clone()))
        })
        .collect()
}

/// A PAX-format sparse file (GNU tar `--sparse --format=posix`): the entry
/// holds only the data regions, one after the other; the map says where
/// they go. Format 0.0 lists the map as repeated `GNU.sparse.offset` /
/// `GNU.sparse.numbytes` records, 0.1 as `GNU.sparse.map`, 1.0 as decimal
/// lines at the start of the entry's data (padded to 512 bytes).
#[derive(Debug)]
pub(crate) enum PaxSparse {
    /// Map known from the extension records.
    Listed {
        real_size: Option<u64>,
        regions: Result<Vec<(u64, u64)>, String>,
    },
    /// 1.0: map at the start of the data.
    InData { real_size: Option<u64> },
}

pub(crate) enum SparseError {
    Invalid(String),
    Io(io::Error),
}

impl From<io::Error> for SparseError {
    fn from(e: io::Error) -> Self {
        SparseError::Io(e)
    }
}

fn parse_u64(bytes: &[u8]) -> Option<u64> {
    std::str::from_utf8(bytes).ok()?.trim().parse().ok()
}

impl PaxSparse {
    pub(crate) fn detect(pax: &[(String, Vec<u8>)]) -> Option<PaxSparse> {
        if !pax.iter().any(|(k, _)| k.starts_with("GNU.sparse.")) {
            return None;
        }
        let get = |k: &str| pax_value(pax, k).and_then(parse_u64);
        if get("GNU.sparse.major") == Some(1) {
            return Some(PaxSparse::InData {
                real_size: get("GNU.sparse.realsize"),
            });
        }
        let real_size = get("GNU.sparse.size").or_else(|| get("GNU.sparse.realsize"));
        let regions = if let Some(map) = pax_value(pax, "GNU.sparse.map") {
            let numbers: Option<Vec<u64>> = if map.is_empty() {
                Some(Vec::new())
            } else {
                map.split(|b| *b == b',').map(parse_u64).collect()
            };
            match numbers {
                Some(n) if n.len() % 2 == 0 => Ok(n.chunks(2).map(|c| (c[0], c[1])).collect()),
                _ => Err("GNU.sparse.map is not a list of offset,size pairs".to_string()),
            }
        } else {
            let offsets: Vec<Option<u64>> = pax
                .iter()
                .filter(|(k, _)| k == "GNU.sparse.offset")
                .map(|(_, v)| parse_u64(v))
                .collect();
            let sizes: Vec<Option<u64>> = pax
                .iter()
                .filter(|(k, _)| k == "GNU.sparse.numbytes")
                .map(|(_, v)| parse_u64(v))
                .collect();
            if offsets.len() != sizes.len() || offsets.iter().chain(&sizes).any(Option::is_none) {
                Err("GNU.sparse.offset and GNU.sparse.numbytes do not pair up".to_string())
            } else {
                Ok(offsets
                    .into_iter()
                    .flatten()
                    .zip(sizes.into_iter().flatten())
                    .collect())
            }
        };
        Some(PaxSparse::Listed { real_size, regions })
    }

    pub(crate) fn real_size(&self, raw: &[u8]) -> Result<u64, UnpackError> {
        let size = match self {
            PaxSparse::Listed { real_size, .. } | PaxSparse::InData { real_size } => *real_size,
        };
        size.ok_or_else(|| UnpackError::Sparse {
            entry: lossy(raw),
            reason: "no GNU.sparse.size or GNU.sparse.realsize".into(),
        })
    }

    /// Writes the data regions of `data` (the entry) where the map puts
    /// them; the file is `real_size` long and holes stay holes.
    pub(crate) fn write(
        &self,
        data: &mut dyn Read,
        f: &mut File,
        real_size: u64,
    ) -> Result<(), SparseError> {
        use std::io::{Seek, SeekFrom};
        let mut data = BufReader::new(data);
        let regions = match self {
            PaxSparse::Listed { regions, .. } => regions.clone().map_err(SparseError::Invalid)?,
            PaxSparse::InData { .. } => read_sparse_map(&mut data)?,
        };
        if regions.len() > MAX_SPARSE_REGIONS {
            return Err(SparseError::Invalid(format!(
                "more than {MAX_SPARSE_REGIONS} data regions"
            )));
        }
        let mut end = 0u64;
        for &(offset, len) in &regions {
            let stop = offset.checked_add(len).filter(|s| *s <= real_size);
            let Some(stop) = stop.filter(|_| offset >= end) else {
                return Err(SparseError::Invalid(
                    "data regions overlap, are out of order or exceed the file's size".into(),
                ));
            };
            f.seek(SeekFrom::Start(offset))?;
            let copied = io::copy(&mut (&mut data).take(len), f)?;
            if copied != len {
                return Err(SparseError::Invalid(
                    "the entry holds less data than its map lists".into(),
                ));
            }
            end = stop;
        }
        // Trailing zero padding of the archive block is all that may follow.
        f.set_len(real_size)?;
        Ok(())
    }
}

/// The 1.0 map at the start of the data: the number of regions, then
/// offset and size of each, one decimal number a line, padded with zeros
/// to a 512-byte boundary.
fn read_sparse_map(data: &mut impl BufRead) -> Result<Vec<(u64, u64)>, SparseError> {
    let mut consumed = 0u64;
    let mut number = |data: &mut dyn BufRead| -> Result<u64, SparseError> {
        let mut line = Vec::new();
        let n = data.take(21).read_until(b'\n', &mut line)?;
        consumed += n as u64;
        if line.last() != Some(&b'\n') {
            return Err(SparseError::Invalid("malformed sparse map".into()));
        }
        parse_u64(&line[..line.len() - 1])
            .ok_or_else(|| SparseError::Invalid("malformed sparse map".into()))
    };
    let count = number(data)?;
    if count > MAX_SPARSE_REGIONS as u64 {
        return Err(SparseError::Invalid(format!(
            "more than {MAX_SPARSE_REGIONS} data regions"
        )));
    }
    let mut regions = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let offset = number(data)?;
        let len = number(data)?;
        regions.push((offset, len));
    }
    let padding = (512 - consumed % 512) % 512;
    let skipped = io::copy(&mut data.take(padding), &mut io::sink())?;
    if skipped != padding {
        return Err(SparseError::Invalid("truncated sparse map".into()));
    }
    Ok(regions)
}

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

fn mknod(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let c = cpath(path)?;
    // SAFETY: c is a valid NUL-terminated path; mknod only reads it.
    let r = unsafe {
        libc::mknod(
            c.as_ptr(),
            mode as libc::mode_t,
            libc::makedev(major, minor),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// True unless `dir` certainly has no default ACL (errors count as "has
/// one": the caller then makes every chown and chmod).
fn has_default_acl(dir: &Path) -> bool {
    let Ok(c) = cpath(dir) else { return true };
    // SAFETY: valid NUL-terminated strings; a NULL buffer of size 0 only
    // asks for the value's size.
    let r = unsafe {
        libc::lgetxattr(
            c.as_ptr(),
            c"system.posix_acl_default".as_ptr(),
            std::ptr::null_mut(),
            0,
        )
    };
    if r >= 0 {
        return true;
    }
    !matches!(
        io::Error::last_os_error().raw_os_error(),
        Some(libc::ENODATA) | Some(libc::EOPNOTSUPP)
    )
}

fn lsetxattr(path: &Path, name: &str, value: &[u8]) -> io::Result<()> {
    let c = cpath(path)?;
    let n = CString::new(name)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "xattr name contains NUL"))?;
    // SAFETY: pointers are valid for the given lengths for the whole call.
    let r = unsafe {
        libc::lsetxattr(
            c.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn timespecs(mtime: u64) -> [libc::timespec; 2] {
    let t = libc::timespec {
        tv_sec: mtime as libc::time_t,
        tv_nsec: 0,
    };
    [t, t]
}

fn set_path_mtime(path: &Path, mtime: u64, nofollow: bool) -> io::Result<()> {
    let c = cpath(path)?;
    let ts = timespecs(mtime);
    let flags = if nofollow {
        libc::AT_SYMLINK_NOFOLLOW
    } else {
        0
    };
    // SAFETY: c and ts are valid for the duration of the call.
    let r = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), ts.as_ptr(), flags) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn set_fd_mtime(f: &File, mtime: u64) -> io::Result<()> {
    let ts = timespecs(mtime);
    // SAFETY: the fd is open for the lifetime of `f`; ts is valid.
    let r = unsafe { libc::futimens(f.as_raw_fd(), ts.as_ptr()) };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::MetadataExt;

    /// Builds a tar by hand so that hostile names are written verbatim (the
    /// tar crate's convenience setters refuse `..`).
    struct TarBuilder {
        b: tar::Builder<Vec<u8>>,
    }

    impl TarBuilder {
        fn new() -> Self {
            TarBuilder {
                b: tar::Builder::new(Vec::new()),
            }
        }
        fn header(kind: tar::EntryType, name: &str, mode: u32) -> tar::Header {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(kind);
            h.set_mode(mode);
            h.set_mtime(1_000_000);
            h.set_uid(0);
            h.set_gid(0);
            let bytes = name.as_bytes();
            h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
            h
        }
        fn file(mut self, name: &str, data: &[u8]) -> Self {
            self = self.file_mode(name, data, 0o644);
            self
        }
        fn file_mode(mut self, name: &str, data: &[u8], mode: u32) -> Self {
            let mut h = Self::header(tar::EntryType::Regular, name, mode);
            h.set_size(data.len() as u64);
            h.set_cksum();
            self.b.append(&h, data).unwrap();
            self
        }
        fn dir(mut self, name: &str) -> Self {
            let mut h = Self::header(tar::EntryType::Directory, name, 0o755);
            h.set_size(0);
            h.set_cksum();
            self.b.append(&h, io::empty()).unwrap();
            self
        }
        fn link(mut self, kind: tar::EntryType, name: &str, target: &str) -> Self {
            let mut h = Self::header(kind, name, 0o777);
            h.set_size(0);
            let t = target.as_bytes();
            h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
            h.set_cksum();
            self.b.append(&h, io::empty()).unwrap();
            self
        }
        fn symlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Symlink, name, target)
        }
        fn hardlink(self, name: &str, target: &str) -> Self {
            self.link(tar::EntryType::Link, name, target)
        }
        fn bytes(self) -> Vec<u8> {
            self.b.into_inner().unwrap()
        }
    }

    /// A sandbox: `outside/` is a sibling of the root that must stay empty.
    struct Sandbox {
        _dir: tempfile::TempDir,
        root: PathBuf,
        outside: PathBuf,
    }

    impl Sandbox {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            let root = dir.path().join("root");
            let outside = dir.path().join("outside");
            fs::create_dir(&root).unwrap();
            fs::create_dir(&outside).unwrap();
            Sandbox {
                _dir: dir,
                root,
                outside,
            }
        }
        fn unpack(&self, tar: &[u8]) -> Result<UnpackStats, UnpackError> {
            unpack_layer(tar, &self.root, &UnpackOptions::default(), None)
        }
        fn assert_outside_untouched(&self) {
            let n = fs::read_dir(&self.outside).unwrap().count();
            assert_eq!(n, 0, "something was written outside the root");
            assert!(!self.root.parent().unwrap().join("escaped").exists());
        }
    }

    fn outside_rel(sb: &Sandbox) -> String {
        // ../outside from the root, and the absolute host path.
        sb.outside.to_string_lossy().into_owned()
    }

    #[test]
    fn files_dirs_symlinks_and_hardlinks_are_created_with_modes_and_mtimes() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .dir("bin/")
            .file_mode("bin/busybox", b"#!ELF", 0o4755)
            .symlink("bin/sh", "busybox")
            .hardlink("bin/ls", "bin/busybox")
            .file("etc/passwd", b"root:x:0:0::/root:/bin/sh\n")
            .bytes();
        let stats = sb.unpack(&tar).unwrap();
        assert_eq!(stats.entries, 5);
        let bb = fs::metadata(sb.root.join("bin/busybox")).unwrap();
        assert_eq!(bb.mode() & 0o7777, 0o4755, "setuid survives chown");
        assert_eq!(bb.mtime(), 1_000_000);
        assert_eq!(
            fs::read_link(sb.root.join("bin/sh")).unwrap(),
            Path::new("busybox")
        );
        assert_eq!(
            fs::metadata(sb.root.join("bin/ls")).unwrap().ino(),
            bb.ino()
        );
        assert_eq!(
            fs::metadata(sb.root.join("bin")).unwrap().mtime(),
            1_000_000,
            "dir mtime set after contents"
        );
        assert_eq!(
            fs::read(sb.root.join("etc/passwd")).unwrap(),
            b"root:x:0:0::/root:/bin/sh\n"
        );
    }

    /// Appends a regular file with the given owner and mode.
    fn owned_file(
        mut t: TarBuilder,
        name: &str,
        data: &[u8],
        ids: (u64, u64),
        mode: u32,
    ) -> TarBuilder {
        let mut h = TarBuilder::header(tar::EntryType::Regular, name, mode);
        h.set_uid(ids.0);
        h.set_gid(ids.1);
        h.set_size(data.len() as u64);
        h.set_cksum();
        t.b.append(&h, data).unwrap();
        t
    }

    #[test]
    fn many_small_files_keep_entry_order_owners_modes_and_mtimes() {
        // SAFETY: geteuid has no preconditions.
        let root = unsafe { libc::geteuid() } == 0;
        let sb = Sandbox::new();
        let modes = [0o644, 0o600, 0o755, 0o664, 0o400, 0o4755];
        let mut t = TarBuilder::new().dir("d/");
        for i in 0..300 {
            t = t.file_mode(
                &format!("d/f{i}"),
                format!("file {i}").as_bytes(),
                modes[i % 6],
            );
        }
        // Later entries of the same name win, links see their target,
        // a whiteout removes what this layer wrote before it.
        t = t
            .file("d/f5", b"second")
            .hardlink("d/h7", "d/f7")
            .file("d/.wh.f9", b"")
            .file("d/sub/deep", b"implicit parent");
        t = owned_file(t, "d/own", b"o", (1234, 5678), 0o640);
        // A setgid directory of another group: its new files would
        // inherit that group without the chown.
        let mut h = TarBuilder::header(tar::EntryType::Directory, "g/", 0o2775);
        h.set_gid(4321);
        h.set_size(0);
        h.set_cksum();
        t.b.append(&h, &[][..]).unwrap();
        t = owned_file(t, "g/x", b"x", (0, 0), 0o644);
        let stats = sb.unpack(&t.bytes()).unwrap();
        assert_eq!(stats.entries, 1 + 300 + 4 + 1 + 1 + 1);
        let d = sb.root.join("d");
        for i in (0..300).filter(|i| *i != 5 && *i != 9) {
            let p = d.join(format!("f{i}"));
            assert_eq!(fs::read(&p).unwrap(), format!("file {i}").as_bytes());
            let m = fs::metadata(&p).unwrap();
            assert_eq!(m.mode() & 0o7777, modes[i % 6], "mode of f{i}");
            assert_eq!(m.mtime(), 1_000_000);
            if root {
                assert_eq!((m.uid(), m.gid()), (0, 0));
            }
        }
        assert_eq!(fs::read(d.join("f5")).unwrap(), b"second");
        assert!(!d.join("f9").exists());
        assert_eq!(
            fs::metadata(d.join("h7")).unwrap().ino(),
            fs::metadata(d.join("f7")).unwrap().ino()
        );
        assert_eq!(fs::read(d.join("sub/deep")).unwrap(), b"implicit parent");
        assert_eq!(fs::metadata(&d).unwrap().mtime(), 1_000_000);
        let own = fs::metadata(d.join("own")).unwrap();
        assert_eq!(own.mode() & 0o7777, 0o640);
        let gx = fs::metadata(sb.root.join("g/x")).unwrap();
        assert_eq!(gx.mode() & 0o7777, 0o644);
        if root {
            assert_eq!((own.uid(), own.gid()), (1234, 5678));
            assert_eq!(
                gx.gid(),
                0,
                "chowned back from the setgid directory's group"
            );
            assert_eq!(fs::metadata(sb.root.join("g")).unwrap().gid(), 4321);
        }
    }

    #[test]
    fn gzip_and_zstd_layers_are_detected_by_magic() {
        let tar = TarBuilder::new().file("a", b"A").bytes();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&tar).unwrap();
        let gz = gz.finish().unwrap();
        let zst = zstd::encode_all(&tar[..], 1).unwrap();
        for (name, data) in [("plain", tar.clone()), ("gzip", gz), ("zstd", zst)] {
            let sb = Sandbox::new();
            let diff_id = Digest::of_bytes(&tar);
            unpack_layer(
                &data[..],
                &sb.root,
                &UnpackOptions::default(),
                Some(&diff_id),
            )
            .unwrap();
            assert_eq!(fs::read(sb.root.join("a")).unwrap(), b"A", "{name}");
        }
    }

    #[test]
    fn wrong_diff_id_fails_the_unpack() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new().file("a", b"A").bytes();
        let err = unpack_layer(
            &tar[..],
            &sb.root,
            &UnpackOptions::default(),
            Some(&Digest::of_bytes(b"x")),
        );
        assert!(err.is_err());
    }

    #[test]
    fn dotdot_entry_is_rejected_and_nothing_escapes() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new().file("../escaped", b"x").bytes();
        let err = sb.unpack(&tar).unwrap_err();
        assert!(err.to_string().contains("../escaped"), "{err}");
        sb.assert_outside_untouched();
        let tar = TarBuilder::new().file("a/../../outside/x", b"x").bytes();
        assert!(sb.unpack(&tar).is_err());
        sb.assert_outside_untouched();
    }

    #[test]
    fn absolute_entry_lands_inside_the_root() {
        let sb = Sandbox::new();
        let abs = format!("{}/x", outside_rel(&sb));
        let tar = TarBuilder::new().file(&abs, b"x").bytes();
        sb.unpack(&tar).unwrap();
        sb.assert_outside_untouched();
        assert!(sb.root.join(abs.trim_start_matches('/')).is_file());
    }

    #[test]
    fn absolute_symlink_to_outside_is_followed_inside_the_root() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .symlink("evil", &outside_rel(&sb))
            .file("evil/x", b"x")
            .bytes();
        sb.unpack(&tar).unwrap();
        sb.assert_outside_untouched();
        // The link resolved as if the root were `/`.
        assert!(
            sb.root
                .join(outside_rel(&sb).trim_start_matches('/'))
                .join("x")
                .is_file()
        );
    }

    #[test]
    fn relative_symlink_climbing_out_is_clamped_at_the_root() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .dir("a/")
            .symlink("a/up", "../../../../outside")
            .file("a/up/x", b"x")
            .bytes();
        sb.unpack(&tar).unwrap();
        sb.assert_outside_untouched();
        assert!(sb.root.join("outside/x").is_file());
    }

    #[test]
    fn file_entry_replaces_a_symlink_instead_of_writing_through_it() {
        let sb = Sandbox::new();
        let target = sb.outside.join("victim");
        let tar = TarBuilder::new()
            .symlink("f", target.to_str().unwrap())
            .file("f", b"overwritten?")
            .bytes();
        sb.unpack(&tar).unwrap();
        sb.assert_outside_untouched();
        assert!(fs::symlink_metadata(sb.root.join("f")).unwrap().is_file());
    }

    #[test]
    fn pre_existing_symlink_in_root_is_not_followed_out() {
        let sb = Sandbox::new();
        std::os::unix::fs::symlink(&sb.outside, sb.root.join("lnk")).unwrap();
        let tar = TarBuilder::new().file("lnk/x", b"x").bytes();
        sb.unpack(&tar).unwrap();
        sb.assert_outside_untouched();
    }

    #[test]
    fn symlink_loop_in_parent_path_is_an_error_not_a_hang() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .symlink("a", "b")
            .symlink("b", "a")
            .file("a/x", b"x")
            .bytes();
        let err = sb.unpack(&tar).unwrap_err();
        assert!(err.to_string().contains("too many levels"), "{err}");
    }

    /// The unpacker and `resolve_in_root` (COPY, RUN's working directory,
    /// the chroot runner's mounts) used to be two resolvers; they are one
    /// walk now and must land a parent path in the same place.
    #[test]
    fn unpack_and_resolve_in_root_agree_on_a_tricky_parent_path() {
        use crate::build::fsutil::resolve_in_root;
        use std::os::unix::fs::symlink;
        let sb = Sandbox::new();
        fs::create_dir_all(sb.root.join("d")).unwrap();
        fs::create_dir_all(sb.root.join("y/z")).unwrap();
        // Climbs above the root (clamped), then an absolute link with `.`
        // and `..` inside, then a name that does not exist yet.
        symlink("../../../x", sb.root.join("d/up")).unwrap();
        symlink("/y/./z/../z", sb.root.join("x")).unwrap();
        let expected = resolve_in_root(&sb.root, Path::new("d/up/new")).unwrap();
        assert_eq!(expected, sb.root.join("y/z/new"));
        let tar = TarBuilder::new().file("d/up/new/file", b"x").bytes();
        sb.unpack(&tar).unwrap();
        assert!(expected.join("file").is_file());
        sb.assert_outside_untouched();
    }

    /// One limit for both callers: Linux's 40 symlinks per lookup.
    #[test]
    fn unpack_and_resolve_in_root_share_the_40_symlink_limit() {
        use crate::build::fsutil::resolve_in_root;
        use std::os::unix::fs::symlink;
        for (links, ok) in [(40, true), (41, false)] {
            let sb = Sandbox::new();
            fs::create_dir(sb.root.join("dir")).unwrap();
            // l1 -> l2 -> ... -> l<links> -> dir
            for i in 1..=links {
                let target = if i == links {
                    "dir".to_string()
                } else {
                    format!("l{}", i + 1)
                };
                symlink(target, sb.root.join(format!("l{i}"))).unwrap();
            }
            let resolved = resolve_in_root(&sb.root, Path::new("l1/f"));
            assert_eq!(resolved.is_ok(), ok, "resolve_in_root, {links} links");
            if ok {
                assert_eq!(resolved.unwrap(), sb.root.join("dir/f"));
            }
            let tar = TarBuilder::new().file("l1/f", b"x").bytes();
            let unpacked = sb.unpack(&tar);
            assert_eq!(unpacked.is_ok(), ok, "unpack, {links} links: {unpacked:?}");
            assert_eq!(sb.root.join("dir/f").is_file(), ok);
        }
    }

    #[test]
    fn forged_overlay_xattrs_are_not_applied() {
        let sb = Sandbox::new();
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_mode(0o755);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_size(0);
        h.set_path("d").unwrap();
        h.set_cksum();
        b.append_pax_extensions([
            ("SCHILY.xattr.trusted.overlay.redirect", &b"/elsewhere"[..]),
            ("SCHILY.xattr.user.kiln", &b"ok"[..]),
        ])
        .unwrap();
        b.append(&h, io::empty()).unwrap();
        let stats = unpack_layer(
            &b.into_inner().unwrap()[..],
            &sb.root,
            &UnpackOptions::overlay_lower(),
            None,
        )
        .unwrap();
        assert_eq!(stats.warnings.len(), 1, "{:?}", stats.warnings);
        let c = cpath(&sb.root.join("d")).unwrap();
        let name = CString::new("trusted.overlay.redirect").unwrap();
        let mut buf = [0u8; 32];
        // SAFETY: valid pointers and length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, -1, "overlay xattr must not be set");
    }

    #[test]
    fn hardlink_to_outside_is_rejected() {
        let sb = Sandbox::new();
        fs::write(sb.outside.join("secret"), b"s").unwrap();
        let tar = TarBuilder::new().hardlink("h", "../outside/secret").bytes();
        let err = sb.unpack(&tar).unwrap_err();
        assert!(err.to_string().contains("\"h\""), "{err}");
        // An absolute target is looked up inside the root, where it is absent.
        let abs = sb.outside.join("secret");
        let tar = TarBuilder::new()
            .hardlink("h2", abs.to_str().unwrap())
            .bytes();
        assert!(sb.unpack(&tar).is_err());
        // Through a symlink pointing outside: resolved inside too.
        let tar = TarBuilder::new()
            .symlink("out", sb.outside.to_str().unwrap())
            .hardlink("h3", "out/secret")
            .bytes();
        assert!(sb.unpack(&tar).is_err());
        assert_eq!(fs::metadata(sb.outside.join("secret")).unwrap().nlink(), 1);
        for h in ["h", "h2", "h3"] {
            assert!(!sb.root.join(h).exists());
        }
    }

    #[test]
    fn whiteouts_delete_lower_files_and_opaque_dirs_hide_lower_content() {
        let sb = Sandbox::new();
        let lower = TarBuilder::new()
            .file("etc/keep", b"k")
            .file("etc/gone", b"g")
            .file("opq/old", b"o")
            .file("opq/sub/old2", b"o")
            .bytes();
        sb.unpack(&lower).unwrap();
        let upper = TarBuilder::new()
            .file("opq/new", b"n")
            .file(".wh.nothing-there", b"")
            .file("etc/.wh.gone", b"")
            .file("opq/.wh..wh..opq", b"")
            .bytes();
        sb.unpack(&upper).unwrap();
        assert!(sb.root.join("etc/keep").exists());
        assert!(!sb.root.join("etc/gone").exists());
        assert!(!sb.root.join("etc/.wh.gone").exists());
        assert!(
            sb.root.join("opq/new").exists(),
            "same-layer content survives the opaque marker"
        );
        assert!(!sb.root.join("opq/old").exists());
        assert!(!sb.root.join("opq/sub").exists());
    }

    #[test]
    fn whiteout_through_symlink_cannot_delete_outside() {
        let sb = Sandbox::new();
        fs::write(sb.outside.join("precious"), b"p").unwrap();
        let tar = TarBuilder::new()
            .symlink("out", sb.outside.to_str().unwrap())
            .file("out/.wh.precious", b"")
            .file("out/.wh..wh..opq", b"")
            .bytes();
        sb.unpack(&tar).unwrap();
        assert!(sb.outside.join("precious").exists());
    }

    #[test]
    fn overlay_lower_mode_converts_whiteouts_to_overlay_form() {
        let sb = Sandbox::new();
        let tar = TarBuilder::new()
            .file("d/.wh..wh..opq", b"")
            .file("d/f", b"f")
            .file(".wh.removed", b"")
            .bytes();
        unpack_layer(&tar[..], &sb.root, &UnpackOptions::overlay_lower(), None).unwrap();
        let m = fs::symlink_metadata(sb.root.join("removed")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(m.file_type().is_char_device());
        assert_eq!(m.rdev(), 0);
        let c = cpath(&sb.root.join("d")).unwrap();
        let name = CString::new("trusted.overlay.opaque").unwrap();
        let mut buf = [0u8; 4];
        // SAFETY: valid pointers and length.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                name.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        assert_eq!(n, 1, "opaque xattr set");
        assert_eq!(buf[0], b'y');
        assert!(sb.root.join("d/f").exists());
    }

    #[test]
    fn directory_replaces_file_and_file_replaces_directory() {
        let sb = Sandbox::new();
        sb.unpack(
            &TarBuilder::new()
                .file("x", b"1")
                .dir("y/")
                .file("y/z", b"z")
                .bytes(),
        )
        .unwrap();
        sb.unpack(&TarBuilder::new().dir("x/").file("y", b"2").bytes())
            .unwrap();
        assert!(sb.root.join("x").is_dir());
        assert_eq!(fs::read(sb.root.join("y")).unwrap(), b"2");
    }

    #[test]
    fn large_file_is_streamed() {
        // 64 MiB of zeros through gzip: would be obvious in RSS if buffered,
        // and checks that copy sizes add up.
        let sb = Sandbox::new();
        let size = 64 << 20;
        let mut tar = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_gnu();
        h.set_size(size);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_path("big").unwrap();
        h.set_cksum();
        tar.append(&h, io::repeat(0).take(size)).unwrap();
        let raw = tar.into_inner().unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(&raw).unwrap();
        let gz = gz.finish().unwrap();
        let s = sb.unpack(&gz).unwrap();
        assert_eq!(s.file_bytes, size);
        assert_eq!(fs::metadata(sb.root.join("big")).unwrap().len(), size);
    }

    #[test]
    fn device_nodes_and_fifos_are_created_when_permitted() {
        let sb = Sandbox::new();
        let mut h = TarBuilder::header(tar::EntryType::Char, "dev/null", 0o666);
        h.set_device_major(1).unwrap();
        h.set_device_minor(3).unwrap();
        h.set_size(0);
        h.set_cksum();
        let mut b = TarBuilder::new();
        b.b.append(&h, io::empty()).unwrap();
        let mut f = TarBuilder::header(tar::EntryType::Fifo, "fifo", 0o600);
        f.set_size(0);
        f.set_cksum();
        b.b.append(&f, io::empty()).unwrap();
        let stats = sb.unpack(&b.bytes()).unwrap();
        use std::os::unix::fs::FileTypeExt;
        let m = fs::symlink_metadata(sb.root.join("dev/null"));
        match m {
            Ok(m) => {
                assert!(m.file_type().is_char_device());
                assert_eq!(m.rdev(), libc::makedev(1, 3));
            }
            Err(_) => assert_eq!(stats.warnings.len(), 1, "skipped with a warning"),
        }
        assert!(
            fs::symlink_metadata(sb.root.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
    }

    const GIB: u64 = 1 << 30;

    /// A GNU sparse entry (`S`) with the given data regions (each filled
    /// with its index + 1), extension headers after 4 regions, as GNU tar
    /// writes them; returns the whole archive.
    fn gnu_sparse_tar(name: &str, real_size: u64, regions: &[(u64, u64)]) -> Vec<u8> {
        let mut h = TarBuilder::header(tar::EntryType::GNUSparse, name, 0o640);
        let data_len: u64 = regions.iter().map(|r| r.1).sum();
        h.set_size(data_len);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(real_size);
        for (slot, (offset, len)) in gnu.sparse.iter_mut().zip(regions) {
            slot.set_offset(*offset);
            slot.set_length(*len);
        }
        gnu.set_is_extended(regions.len() > 4);
        h.set_cksum();
        let mut out = h.as_bytes().to_vec();
        let mut rest = regions.iter().skip(4).peekable();
        while rest.peek().is_some() {
            let mut ext = tar::GnuExtSparseHeader::new();
            for slot in ext.sparse.iter_mut() {
                if let Some((offset, len)) = rest.next() {
                    slot.set_offset(*offset);
                    slot.set_length(*len);
                }
            }
            ext.set_is_extended(rest.peek().is_some());
            out.extend_from_slice(ext.as_bytes());
        }
        for (i, (_, len)) in regions.iter().enumerate() {
            out.extend(std::iter::repeat_n(i as u8 + 1, *len as usize));
        }
        out.resize(out.len().next_multiple_of(512), 0);
        out.extend_from_slice(&[0; 1024]);
        out
    }

    /// A PAX sparse 1.0 entry (`GNU.sparse.major=1`): the map in the data.
    fn pax_sparse_1_0_tar(name: &str, real_size: u64, regions: &[(u64, u64)]) -> Vec<u8> {
        let mut map = format!("{}\n", regions.len());
        for (offset, len) in regions {
            map.push_str(&format!("{offset}\n{len}\n"));
        }
        let mut data = map.into_bytes();
        data.resize(data.len().next_multiple_of(512), 0);
        for (i, (_, len)) in regions.iter().enumerate() {
            data.extend(std::iter::repeat_n(i as u8 + 1, *len as usize));
        }
        let mut b = tar::Builder::new(Vec::new());
        let real = real_size.to_string();
        b.append_pax_extensions([
            ("GNU.sparse.major", &b"1"[..]),
            ("GNU.sparse.minor", &b"0"[..]),
            ("GNU.sparse.name", name.as_bytes()),
            ("GNU.sparse.realsize", real.as_bytes()),
        ])
        .unwrap();
        let mut h = TarBuilder::header(tar::EntryType::Regular, "GNUSparseFile.0/x", 0o640);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        b.into_inner().unwrap()
    }

    fn roomy() -> UnpackOptions {
        UnpackOptions {
            max_expanded_size: 128 * GIB,
            ..UnpackOptions::default()
        }
    }

    /// Checks a sparse file's size, that it occupies next to no disk, and
    /// that each region reads back with its fill byte and a hole as zeros.
    fn assert_sparse(path: &Path, real_size: u64, regions: &[(u64, u64)]) {
        use std::io::{Seek, SeekFrom};
        let m = fs::metadata(path).unwrap();
        assert_eq!(m.len(), real_size);
        assert!(
            m.blocks() * 512 < 8 << 20,
            "{} blocks allocated for {} data bytes: holes were written",
            m.blocks(),
            regions.iter().map(|r| r.1).sum::<u64>()
        );
        let mut f = File::open(path).unwrap();
        for (i, (offset, len)) in regions.iter().enumerate() {
            let mut buf = vec![0u8; *len as usize];
            f.seek(SeekFrom::Start(*offset)).unwrap();
            f.read_exact(&mut buf).unwrap();
            assert!(buf.iter().all(|b| *b == i as u8 + 1), "region {i}");
        }
        let mut hole = [1u8; 64];
        f.seek(SeekFrom::Start(regions[0].0 + regions[0].1))
            .unwrap();
        f.read_exact(&mut hole).unwrap();
        assert_eq!(hole, [0; 64], "a hole reads as zeros");
    }

    #[test]
    fn gnu_sparse_file_is_written_with_its_holes_as_holes() {
        let sb = Sandbox::new();
        let size = 64 * GIB;
        let regions = [(0, 512), (size - 1024, 1024)];
        let tar = gnu_sparse_tar("sparse", size, &regions);
        assert!(tar.len() < 4096, "the layer is small");
        let stats = unpack_layer(&tar[..], &sb.root, &roomy(), None).unwrap();
        assert_eq!(stats.file_bytes, size);
        assert_sparse(&sb.root.join("sparse"), size, &regions);
        let mode = fs::metadata(sb.root.join("sparse")).unwrap().mode();
        assert_eq!(mode & 0o7777, 0o640);
    }

    #[test]
    fn gnu_sparse_file_with_extension_headers_keeps_its_holes() {
        let sb = Sandbox::new();
        let size = 8 * GIB;
        let mut regions: Vec<(u64, u64)> = (0..30).map(|i| (i * (256 << 20), 512)).collect();
        // GNU tar ends the map with an empty region at the file's size when
        // the file ends in a hole.
        regions.push((size, 0));
        let tar = gnu_sparse_tar("many", size, &regions);
        unpack_layer(&tar[..], &sb.root, &roomy(), None).unwrap();
        assert_sparse(&sb.root.join("many"), size, &regions);
    }

    #[test]
    fn pax_sparse_1_0_file_gets_its_real_name_and_keeps_its_holes() {
        let sb = Sandbox::new();
        let size = 16 * GIB;
        let regions = [(4096, 100), (10 * GIB, 3000)];
        let tar = pax_sparse_1_0_tar("usr/lib/sparse.img", size, &regions);
        unpack_layer(&tar[..], &sb.root, &roomy(), None).unwrap();
        assert_sparse(&sb.root.join("usr/lib/sparse.img"), size, &regions);
        assert!(!sb.root.join("GNUSparseFile.0").exists());
    }

    #[test]
    fn pax_sparse_0_1_file_keeps_its_holes() {
        let sb = Sandbox::new();
        let size = 4 * GIB;
        let mut b = tar::Builder::new(Vec::new());
        b.append_pax_extensions([
            ("GNU.sparse.size", &b"4294967296"[..]),
            ("GNU.sparse.numblocks", &b"2"[..]),
            ("GNU.sparse.map", &b"0,10,4294967000,20"[..]),
            ("GNU.sparse.name", &b"old"[..]),
        ])
        .unwrap();
        let mut h = TarBuilder::header(tar::EntryType::Regular, "GNUSparseFile.0/old", 0o600);
        let mut data = vec![1u8; 10];
        data.extend([2u8; 20]);
        h.set_size(data.len() as u64);
        h.set_cksum();
        b.append(&h, &data[..]).unwrap();
        let tar = b.into_inner().unwrap();
        unpack_layer(&tar[..], &sb.root, &roomy(), None).unwrap();
        assert_sparse(&sb.root.join("old"), size, &[(0, 10), (4294967000, 20)]);
    }

    #[test]
    fn sparse_map_beyond_the_file_is_rejected() {
        let sb = Sandbox::new();
        let tar = pax_sparse_1_0_tar("bad", 1000, &[(900, 512)]);
        let err = unpack_layer(&tar[..], &sb.root, &roomy(), None).unwrap_err();
        assert!(err.to_string().contains("invalid sparse file"), "{err}");
    }

    #[test]
    fn a_small_layer_expanding_past_the_limit_fails_before_writing_it() {
        let sb = Sandbox::new();
        // The case: ~1 KB of layer, 64 GiB of file, default limit.
        let tar = gnu_sparse_tar("bomb", 64 * GIB, &[(64 * GIB - 512, 512)]);
        let err = unpack_layer(&tar[..], &sb.root, &UnpackOptions::default(), None).unwrap_err();
        assert!(matches!(err, UnpackError::TooLarge { .. }), "{err}");
        assert!(err.to_string().contains("--max-layer-size"), "{err}");
        assert!(err.to_string().contains("bomb"), "{err}");
        assert!(!sb.root.join("bomb").exists(), "nothing of it was written");
        // Plain files count their content, plus each entry's header.
        let tar = TarBuilder::new()
            .file("a", &[7; 4000])
            .file("b", &[7; 4000])
            .bytes();
        let small = UnpackOptions {
            max_expanded_size: 6000,
            ..UnpackOptions::default()
        };
        let err = unpack_layer(&tar[..], &sb.root, &small, None).unwrap_err();
        assert!(err.to_string().contains("\"b\""), "{err}");
        assert!(sb.root.join("a").is_file());
        assert!(!sb.root.join("b").exists());
        let exact = UnpackOptions {
            max_expanded_size: 2 * (4000 + ENTRY_OVERHEAD),
            ..UnpackOptions::default()
        };
        unpack_layer(&tar[..], &sb.root, &exact, None).unwrap();
    }
}
