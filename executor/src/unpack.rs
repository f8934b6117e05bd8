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
//! root were `/` (like `openat2(RESOLVE_IN_ROOT)`), and the last component is
//! never followed. Owners, modes (setuid/setgid/sticky set after chown),
//! xattrs, device nodes (skipped with a warning where mknod is not allowed),
//! hard links (inside the root only) and mtimes (directories last) are kept.

use std::collections::{HashMap, HashSet};
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use kiln_common::{Digest, VerifyingReader};

const WHITEOUT_PREFIX: &str = ".wh.";
const OPAQUE_MARKER: &str = ".wh..wh..opq";
const MAX_SYMLINKS: usize = 40;

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
}

impl Default for UnpackOptions {
    fn default() -> Self {
        UnpackOptions {
            mode: UnpackMode::Apply,
            // SAFETY: geteuid has no preconditions and cannot fail.
            preserve_ownership: unsafe { libc::geteuid() } == 0,
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
///
/// Decompression and hashing run on a second thread, handing the tar stream
/// over in 1 MiB chunks through a bounded channel (4 chunks), so that they
/// overlap with the file system work without memory growing with the layer.
pub fn unpack_layer<R: Read + Send>(
    layer: R,
    root: &Path,
    opts: &UnpackOptions,
    diff_id: Option<&Digest>,
) -> Result<UnpackStats, UnpackError> {
    const CHUNK: usize = 1 << 20;
    let (tx, rx) = std::sync::mpsc::sync_channel::<io::Result<Vec<u8>>>(4);
    let unpack_failed = std::sync::atomic::AtomicBool::new(false);
    let unpack_failed = &unpack_failed;
    std::thread::scope(|scope| {
        let producer = scope.spawn(move || -> io::Result<()> {
            let plain = decompress(BufReader::with_capacity(256 * 1024, layer))?;
            let mut src: Box<dyn Read> = match diff_id {
                Some(d) => Box::new(VerifyingReader::new(plain, d.clone())),
                None => plain,
            };
            // The tar reader stops at the end-of-archive marker; reading on
            // to EOF makes the digest cover the padding after it too.
            let mut consumer_gone = false;
            loop {
                if unpack_failed.load(std::sync::atomic::Ordering::Relaxed) {
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
                    // The tar reader finished (or failed); keep reading
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
        let result = unpack_tar(reader, root, opts);
        if result.is_err() {
            unpack_failed.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let produced = producer
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("decompression thread panicked")));
        let stats = result?;
        produced.map_err(UnpackError::Read)?;
        Ok(stats)
    })
}

/// The reading end of the decompression thread's channel.
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<io::Result<Vec<u8>>>,
    buf: Vec<u8>,
    pos: usize,
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
    };
    let mut archive = tar::Archive::new(tar_stream);
    for entry in archive.entries().map_err(UnpackError::Read)? {
        let mut entry = entry.map_err(UnpackError::Read)?;
        u.entry(&mut entry)?;
    }
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
}

/// Splits an entry name into components; `None` if it contains `..`.
fn components(raw: &[u8]) -> Option<Vec<&OsStr>> {
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

fn lossy(raw: &[u8]) -> String {
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
        let mut todo: Vec<OsString> = parts.iter().rev().map(|p| p.to_os_string()).collect();
        let mut stack: Vec<OsString> = Vec::new();
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c.is_empty() || c == "." {
                continue;
            }
            if c == ".." {
                // `..` at the root stays at the root, as in a chroot.
                stack.pop();
                continue;
            }
            let mut host = self.root.clone();
            host.extend(stack.iter());
            host.push(&c);
            match fs::symlink_metadata(&host) {
                Ok(m) if m.is_dir() => stack.push(c),
                Ok(m) if m.file_type().is_symlink() => {
                    links += 1;
                    if links > MAX_SYMLINKS {
                        return Err(Self::unsafe_entry(
                            entry,
                            "too many levels of symbolic links in its parent path",
                        ));
                    }
                    let target = fs::read_link(&host).map_err(self.io(entry, "readlink", &host))?;
                    let t = target.as_os_str().as_bytes();
                    if t.starts_with(b"/") {
                        stack.clear();
                    }
                    for part in t.split(|b| *b == b'/').rev() {
                        todo.push(OsStr::from_bytes(part).to_os_string());
                    }
                }
                Ok(_) => {
                    return Err(Self::unsafe_entry(
                        entry,
                        format!("parent {} is not a directory", host.display()),
                    ));
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                    fs::create_dir(&host).map_err(self.io(entry, "mkdir", &host))?;
                    stack.push(c);
                }
                Err(e) => return Err(self.io(entry, "lstat", &host)(e)),
            }
        }
        let mut out = self.root.clone();
        out.extend(stack.iter());
        self.resolved.insert(key, out.clone());
        Ok(out)
    }

    /// Removes whatever is at `path` (a directory recursively).
    fn remove_existing(&mut self, entry: &[u8], path: &Path) -> Result<(), UnpackError> {
        match fs::symlink_metadata(path) {
            Ok(m) if m.is_dir() => {
                self.resolved.clear();
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

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), UnpackError> {
        let raw = e.path_bytes().into_owned();
        let Some(parts) = components(&raw) else {
            return Err(Self::unsafe_entry(&raw, "its name contains '..'"));
        };
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        self.stats.entries += 1;
        let Some((name, parent_parts)) = parts.split_last() else {
            // The root itself ("./"): its metadata belongs to the caller.
            return Ok(());
        };
        let name = name.to_os_string();
        let parent = self.resolve_dir(&raw, parent_parts, true)?;

        if let Some(hidden) = name.as_bytes().strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            return self.whiteout(&raw, &parent, &name, hidden);
        }
        let path = parent.join(&name);
        let header = e.header().clone();
        let mode = header.mode().map_err(UnpackError::Read)? & 0o7777;
        let mtime = header.mtime().unwrap_or(0);
        let xattrs = read_xattrs(e)?;

        match kind {
            tar::EntryType::Directory => {
                match fs::symlink_metadata(&path) {
                    Ok(m) if m.is_dir() => {}
                    Ok(_) => {
                        self.remove_existing(&raw, &path)?;
                        fs::create_dir(&path).map_err(self.io(&raw, "mkdir", &path))?;
                    }
                    Err(_) => fs::create_dir(&path).map_err(self.io(&raw, "mkdir", &path))?,
                }
                self.set_owner(&raw, &path, &header)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(self.io(&raw, "chmod", &path))?;
                self.set_xattrs(&raw, &path, &xattrs)?;
                self.dir_times.push((path.clone(), mtime));
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                self.remove_existing(&raw, &path)?;
                let mut f = OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                    .open(&path)
                    .map_err(self.io(&raw, "create", &path))?;
                let n = io::copy(e, &mut f).map_err(self.io(&raw, "write", &path))?;
                self.stats.file_bytes += n;
                if self.opts.preserve_ownership {
                    let (uid, gid) = owner(&header)?;
                    std::os::unix::fs::fchown(&f, Some(uid), Some(gid))
                        .map_err(self.io(&raw, "chown", &path))?;
                }
                f.set_permissions(fs::Permissions::from_mode(mode))
                    .map_err(self.io(&raw, "chmod", &path))?;
                self.set_xattrs(&raw, &path, &xattrs)?;
                set_fd_mtime(&f, mtime).map_err(self.io(&raw, "set mtime", &path))?;
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| Self::unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                self.remove_existing(&raw, &path)?;
                // The target is stored verbatim: it is data, and every later
                // lookup through it is resolved inside the root.
                std::os::unix::fs::symlink(OsStr::from_bytes(&target), &path)
                    .map_err(self.io(&raw, "symlink", &path))?;
                self.resolved.clear();
                self.set_owner(&raw, &path, &header)?;
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
                    self.remove_existing(&raw, &path)?;
                    // linkat without AT_SYMLINK_FOLLOW: links the name itself.
                    fs::hard_link(&tpath, &path).map_err(self.io(&raw, "link", &path))?;
                }
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                self.remove_existing(&raw, &path)?;
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
                match mknod(&path, ftype | mode, major, minor) {
                    Ok(()) => {}
                    Err(err) if err.raw_os_error() == Some(libc::EPERM) => {
                        let msg =
                            format!("skipped device node {} (mknod not permitted)", lossy(&raw));
                        tracing::warn!("{msg}");
                        self.stats.warnings.push(msg);
                        return Ok(());
                    }
                    Err(err) => return Err(self.io(&raw, "mknod", &path)(err)),
                }
                self.set_owner(&raw, &path, &header)?;
                fs::set_permissions(&path, fs::Permissions::from_mode(mode))
                    .map_err(self.io(&raw, "chmod", &path))?;
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
                self.remove_existing(raw, &target)?;
                mknod(&target, libc::S_IFCHR, 0, 0).map_err(self.io(raw, "mknod whiteout", &target))
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

fn read_xattrs<R: Read>(e: &mut tar::Entry<'_, R>) -> Result<Vec<(String, Vec<u8>)>, UnpackError> {
    let mut out = Vec::new();
    if let Some(exts) = e.pax_extensions().map_err(UnpackError::Read)? {
        for ext in exts {
            let ext = ext.map_err(UnpackError::Read)?;
            if let Ok(key) = ext.key()
                && let Some(name) = key.strip_prefix("SCHILY.xattr.")
            {
                out.push((name.to_string(), ext.value_bytes().to_vec()));
            }
        }
    }
    Ok(out)
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
}
