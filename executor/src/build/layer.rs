//! The layer writer: a [`Change`] in, a compressed OCI layer blob out, with
//! its digest (compressed) and diff_id (uncompressed) computed in the same
//! streaming pass.
//!
//! Promises:
//! - deterministic bytes: entries sorted by path with parents first, empty
//!   uname/gname, PAX records (never GNU extensions) for long names, long
//!   link targets, large ids and sizes, and xattrs; hard links within the
//!   layer written once and then as link entries; mtimes kept, clamped or
//!   overridden ([`MtimePolicy`]) for reproducible builds;
//! - one pass, constant memory: tar → sha256 (diff_id) → bounded channel →
//!   compressor thread (gzip and zstd spread over all cores, with bytes
//!   independent of the thread count: [`compress`]) → sha256 (digest) →
//!   temporary file, renamed to `<out_dir>/<digest hex>` only when complete;
//! - an empty change gives `None`: no layer at all.

use crate::build::compress::{self, ParallelGzip};
use crate::build::fsutil;
use crate::build::snapshot::{Change, ChangeKind};
use kiln_common::{Digest, Sha256Writer};
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

pub const MEDIA_TYPE_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
pub const MEDIA_TYPE_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
pub const MEDIA_TYPE_TAR: &str = "application/vnd.oci.image.layer.v1.tar";

/// Size of the chunks handed from the tar writer to the compressor.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads: bounds memory to ~2 MiB.
const CHANNEL_DEPTH: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip {
        level: u32,
    },
    Zstd {
        level: i32,
    },
    /// Uncompressed tar (digest == diff_id); useful for tests and local stores.
    None,
}

impl Default for Compression {
    fn default() -> Self {
        Compression::Gzip { level: 6 }
    }
}

impl Compression {
    pub fn media_type(&self) -> &'static str {
        match self {
            Compression::Gzip { .. } => MEDIA_TYPE_GZIP,
            Compression::Zstd { .. } => MEDIA_TYPE_ZSTD,
            Compression::None => MEDIA_TYPE_TAR,
        }
    }
}

/// What to write as each entry's mtime.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MtimePolicy {
    /// The file's own mtime (whole seconds).
    #[default]
    Keep,
    /// `min(mtime, epoch)`: the `SOURCE_DATE_EPOCH` rule.
    Clamp(u64),
    /// Every entry gets `epoch`.
    Set(u64),
}

impl MtimePolicy {
    fn apply(&self, mtime: i64) -> u64 {
        let m = mtime.max(0) as u64;
        match *self {
            MtimePolicy::Keep => m,
            MtimePolicy::Clamp(e) => m.min(e),
            MtimePolicy::Set(e) => e,
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LayerOptions {
    pub compression: Compression,
    pub mtime: MtimePolicy,
    /// Compression threads; 0 (the default) means all cores. The layer's
    /// bytes are the same for every value ([`compress`]).
    pub threads: usize,
}

/// A written layer blob.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// `<out_dir>/<digest hex>`.
    pub path: PathBuf,
    pub media_type: &'static str,
    /// sha256 of the compressed bytes (the blob's name).
    pub digest: Digest,
    /// Compressed size in bytes.
    pub size: u64,
    /// sha256 of the uncompressed tar (goes into the config's rootfs).
    pub diff_id: Digest,
    pub uncompressed_size: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("reading {path} for the layer: {source}")]
    Source {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{path} changed size while being archived ({expected} bytes announced)")]
    SourceChanged { path: PathBuf, expected: u64 },
    #[error("writing layer into {dir}: {source}")]
    Output {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("compressing layer: {0}")]
    Compress(#[source] io::Error),
    /// The tar stream could not be handed on (the compressor stopped; its
    /// own error is reported instead when there is one).
    #[error("writing the layer stream: {0}")]
    Stream(#[source] io::Error),
}

/// Writes `change` as a compressed layer into `out_dir`. Returns `None`
/// (and writes nothing) when the change is empty.
pub fn write_layer(
    change: &Change,
    opts: &LayerOptions,
    out_dir: &Path,
) -> Result<Option<Layer>, LayerError> {
    if change.is_empty() {
        return Ok(None);
    }
    write_any_layer(change, opts, out_dir).map(Some)
}

/// An empty layer (a tar of no entries), for `--force-build-metadata`,
/// which gives every instruction a layer as Kaniko does.
pub fn write_empty_layer(opts: &LayerOptions, out_dir: &Path) -> Result<Layer, LayerError> {
    write_any_layer(&Change::default(), opts, out_dir)
}

fn write_any_layer(
    change: &Change,
    opts: &LayerOptions,
    out_dir: &Path,
) -> Result<Layer, LayerError> {
    let out_err = |source| LayerError::Output {
        dir: out_dir.to_path_buf(),
        source,
    };
    let tmp = tempfile::Builder::new()
        .prefix(".layer-")
        .suffix(".tmp")
        .tempfile_in(out_dir)
        .map_err(out_err)?;
    let file = tmp.as_file().try_clone().map_err(out_err)?;

    let (tx, rx) = sync_channel::<Vec<u8>>(CHANNEL_DEPTH);
    let compression = opts.compression;
    let threads = opts.threads;
    let compressor = std::thread::Builder::new()
        .name("layer-compress".into())
        .spawn(move || compress(rx, compression, threads, file))
        .map_err(LayerError::Compress)?;

    let mut tar_sink = Sha256Writer::new(ChannelWriter::new(tx));
    let tar_result = write_tar(change, opts.mtime, &mut tar_sink);
    let (channel, diff_id, uncompressed_size) = tar_sink.finish();
    // Flushing and dropping the sender ends the compressor's input.
    let flush_result = channel.close();
    let compressed = compressor
        .join()
        .map_err(|_| LayerError::Compress(io::Error::other("compressor thread panicked")))?;
    // Report the root cause: a source-file error stops the tar writer and
    // the compressor only sees its input end; a compressor error (disk
    // full) makes the tar writer's sends fail.
    let (digest, size) = match (tar_result, compressed) {
        (Err(LayerError::Stream(_)), Err(c)) => return Err(LayerError::Compress(c)),
        (Err(e), _) => return Err(e),
        (Ok(()), Err(c)) => return Err(LayerError::Compress(c)),
        (Ok(()), Ok(v)) => v,
    };
    flush_result.map_err(LayerError::Stream)?;

    let path = out_dir.join(digest.hex());
    tmp.persist(&path).map_err(|e| out_err(e.error))?;
    Ok(Layer {
        path,
        media_type: opts.compression.media_type(),
        digest,
        size,
        diff_id,
        uncompressed_size,
    })
}

fn compress(
    rx: Receiver<Vec<u8>>,
    compression: Compression,
    threads: usize,
    file: File,
) -> io::Result<(Digest, u64)> {
    let hashed = Sha256Writer::new(BufWriter::with_capacity(CHUNK, file));
    let hashed = match compression {
        Compression::Gzip { level } => {
            let mut enc = ParallelGzip::new(hashed, level, threads)?;
            for chunk in rx {
                enc.write_all(&chunk)?;
            }
            enc.finish()?
        }
        Compression::Zstd { level } => {
            let mut enc = compress::zstd_encoder(hashed, level, threads)?;
            for chunk in rx {
                enc.write_all(&chunk)?;
            }
            enc.finish()?
        }
        Compression::None => {
            let mut w = hashed;
            for chunk in rx {
                w.write_all(&chunk)?;
            }
            w
        }
    };
    let (mut buf, digest, size) = hashed.finish();
    buf.flush()?;
    buf.get_ref().sync_all()?;
    Ok((digest, size))
}

/// A `Write` that hands full chunks to another thread.
struct ChannelWriter {
    tx: Option<SyncSender<Vec<u8>>>,
    buf: Vec<u8>,
}

impl ChannelWriter {
    fn new(tx: SyncSender<Vec<u8>>) -> Self {
        ChannelWriter {
            tx: Some(tx),
            buf: Vec::with_capacity(CHUNK),
        }
    }

    fn send(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let chunk = std::mem::replace(&mut self.buf, Vec::with_capacity(CHUNK));
        match &self.tx {
            Some(tx) => tx
                .send(chunk)
                .map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "compressor stopped")),
            None => Err(io::Error::new(io::ErrorKind::BrokenPipe, "channel closed")),
        }
    }

    fn close(mut self) -> io::Result<()> {
        let r = self.send();
        self.tx = None;
        r
    }
}

impl Write for ChannelWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let room = CHUNK - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == CHUNK {
            self.send()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Writes the uncompressed tar of `change` to `out` (exposed so tests and
/// tools can compare layer bytes directly).
pub fn write_tar<W: Write>(
    change: &Change,
    mtime: MtimePolicy,
    out: &mut W,
) -> Result<(), LayerError> {
    let mut tw = TarWriter {
        out,
        links: HashMap::new(),
        mtime,
    };
    for entry in change.entries() {
        match &entry.kind {
            ChangeKind::Delete => {
                let name = entry.path.file_name().unwrap_or_default();
                let mut wh = b".wh.".to_vec();
                wh.extend_from_slice(name.as_bytes());
                let path = match entry.path.parent() {
                    Some(p) if !p.as_os_str().is_empty() => {
                        p.join(std::ffi::OsStr::from_bytes(&wh))
                    }
                    _ => PathBuf::from(std::ffi::OsStr::from_bytes(&wh)),
                };
                tw.marker(&path)?;
            }
            ChangeKind::Write { source, opaque } => {
                tw.entry(&entry.path, source)?;
                if *opaque {
                    tw.marker(&entry.path.join(".wh..wh..opq"))?;
                }
            }
        }
    }
    tw.out.write_all(&[0u8; 1024]).map_err(tw_out_err)?;
    Ok(())
}

fn tw_out_err(source: io::Error) -> LayerError {
    LayerError::Stream(source)
}

struct TarWriter<'a, W: Write> {
    out: &'a mut W,
    /// (dev, inode) of multiply-linked files already written -> their path.
    links: HashMap<(u64, u64), PathBuf>,
    mtime: MtimePolicy,
}

/// What goes into one header, before PAX overflow handling.
struct EntryHead<'p> {
    path: &'p [u8],
    kind: tar::EntryType,
    mode: u32,
    uid: u64,
    gid: u64,
    mtime: u64,
    size: u64,
    link: Option<Vec<u8>>,
    dev: Option<(u32, u32)>,
    xattrs: Vec<(String, Vec<u8>)>,
}

const USTAR_NAME_MAX: usize = 100;
const USTAR_ID_MAX: u64 = 0o7777777;
const USTAR_SIZE_MAX: u64 = 0o77777777777;

impl<W: Write> TarWriter<'_, W> {
    /// A zero-length whiteout or opaque marker.
    fn marker(&mut self, path: &Path) -> Result<(), LayerError> {
        self.header(EntryHead {
            path: path.as_os_str().as_bytes(),
            kind: tar::EntryType::Regular,
            mode: 0,
            uid: 0,
            gid: 0,
            mtime: self.mtime.apply(0),
            size: 0,
            link: None,
            dev: None,
            xattrs: Vec::new(),
        })
    }

    fn entry(&mut self, path: &Path, source: &Path) -> Result<(), LayerError> {
        let src_err = |e| LayerError::Source {
            path: source.to_path_buf(),
            source: e,
        };
        let meta = std::fs::symlink_metadata(source).map_err(src_err)?;
        let ft = meta.file_type();
        let mut name = path.as_os_str().as_bytes().to_vec();
        let mut head = EntryHead {
            path: &[],
            kind: tar::EntryType::Regular,
            mode: meta.mode() & 0o7777,
            uid: meta.uid() as u64,
            gid: meta.gid() as u64,
            mtime: self.mtime.apply(meta.mtime()),
            size: 0,
            link: None,
            dev: None,
            xattrs: fsutil::list_xattrs(source).map_err(src_err)?,
        };
        let mut content = false;
        if ft.is_dir() {
            head.kind = tar::EntryType::Directory;
            name.push(b'/');
        } else if ft.is_symlink() {
            head.kind = tar::EntryType::Symlink;
            head.link = Some(
                std::fs::read_link(source)
                    .map_err(src_err)?
                    .as_os_str()
                    .as_bytes()
                    .to_vec(),
            );
        } else if ft.is_file() {
            let key = (meta.dev(), meta.ino());
            match self.links.get(&key) {
                Some(first) if meta.nlink() > 1 => {
                    head.kind = tar::EntryType::Link;
                    head.link = Some(first.as_os_str().as_bytes().to_vec());
                }
                _ => {
                    if meta.nlink() > 1 {
                        self.links.insert(key, path.to_path_buf());
                    }
                    head.size = meta.len();
                    content = true;
                }
            }
        } else if ft.is_char_device() || ft.is_block_device() {
            head.kind = if ft.is_char_device() {
                tar::EntryType::Char
            } else {
                tar::EntryType::Block
            };
            let rdev = meta.rdev();
            head.dev = Some((libc::major(rdev), libc::minor(rdev)));
        } else if ft.is_fifo() {
            head.kind = tar::EntryType::Fifo;
        } else {
            // Sockets cannot be represented in tar; Docker skips them too.
            return Ok(());
        }
        head.path = &name;
        let size = head.size;
        self.header(head)?;
        if content {
            let file = File::open(source).map_err(src_err)?;
            let copied = io::copy(&mut file.take(size), &mut self.out).map_err(src_err)?;
            if copied != size {
                return Err(LayerError::SourceChanged {
                    path: source.to_path_buf(),
                    expected: size,
                });
            }
            self.pad(size)?;
        }
        Ok(())
    }

    fn pad(&mut self, size: u64) -> Result<(), LayerError> {
        let rem = (size % 512) as usize;
        if rem != 0 {
            self.out
                .write_all(&[0u8; 512][..512 - rem])
                .map_err(tw_out_err)?;
        }
        Ok(())
    }

    fn header(&mut self, head: EntryHead<'_>) -> Result<(), LayerError> {
        let mut pax: Vec<(String, Vec<u8>)> = Vec::new();
        if head.path.len() > USTAR_NAME_MAX {
            pax.push(("path".into(), head.path.to_vec()));
        }
        if let Some(link) = &head.link
            && link.len() > USTAR_NAME_MAX
        {
            pax.push(("linkpath".into(), link.clone()));
        }
        if head.uid > USTAR_ID_MAX {
            pax.push(("uid".into(), head.uid.to_string().into_bytes()));
        }
        if head.gid > USTAR_ID_MAX {
            pax.push(("gid".into(), head.gid.to_string().into_bytes()));
        }
        if head.size > USTAR_SIZE_MAX {
            pax.push(("size".into(), head.size.to_string().into_bytes()));
        }
        for (k, v) in &head.xattrs {
            pax.push((format!("SCHILY.xattr.{k}"), v.clone()));
        }
        if !pax.is_empty() {
            let mut body = Vec::new();
            for (k, v) in &pax {
                pax_record(&mut body, k, v);
            }
            let mut h = tar::Header::new_ustar();
            set_name(&mut h, b"PaxHeader");
            h.set_entry_type(tar::EntryType::XHeader);
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(head.mtime);
            h.set_size(body.len() as u64);
            h.set_cksum();
            self.out.write_all(h.as_bytes()).map_err(tw_out_err)?;
            self.out.write_all(&body).map_err(tw_out_err)?;
            self.pad(body.len() as u64)?;
        }
        let mut h = tar::Header::new_ustar();
        set_name(&mut h, &head.path[..head.path.len().min(USTAR_NAME_MAX)]);
        h.set_entry_type(head.kind);
        h.set_mode(head.mode);
        h.set_uid(head.uid.min(USTAR_ID_MAX));
        h.set_gid(head.gid.min(USTAR_ID_MAX));
        h.set_mtime(head.mtime);
        h.set_size(head.size.min(USTAR_SIZE_MAX));
        if let Some(link) = &head.link {
            let n = link.len().min(USTAR_NAME_MAX);
            if let Some(u) = h.as_ustar_mut() {
                u.linkname[..n].copy_from_slice(&link[..n]);
            }
        }
        if let Some((major, minor)) = head.dev {
            h.set_device_major(major).map_err(tw_out_err)?;
            h.set_device_minor(minor).map_err(tw_out_err)?;
        }
        h.set_cksum();
        self.out.write_all(h.as_bytes()).map_err(tw_out_err)
    }
}

/// Writes raw name bytes (the tar crate's `set_path` refuses some valid
/// names and would switch to GNU extensions for long ones).
fn set_name(h: &mut tar::Header, name: &[u8]) {
    if let Some(u) = h.as_ustar_mut() {
        u.name = [0; 100];
        u.name[..name.len()].copy_from_slice(name);
    }
}

/// One PAX record: `"<len> <key>=<value>\n"`, where `<len>` counts itself.
fn pax_record(out: &mut Vec<u8>, key: &str, value: &[u8]) {
    let rest = key.len() + value.len() + 3;
    let mut len = rest + 1;
    while len != rest + len.to_string().len() {
        len = rest + len.to_string().len();
    }
    out.extend_from_slice(len.to_string().as_bytes());
    out.push(b' ');
    out.extend_from_slice(key.as_bytes());
    out.push(b'=');
    out.extend_from_slice(value);
    out.push(b'\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::snapshot::ChangeEntry;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn write(path: PathBuf) -> ChangeEntry {
        ChangeEntry {
            path,
            kind: ChangeKind::Write {
                source: PathBuf::new(),
                opaque: false,
            },
        }
    }

    /// A change over every file under `root` (as a snapshotter would give).
    fn change_of(root: &Path, extra: Vec<ChangeEntry>) -> Change {
        let mut entries = extra;
        for e in walkdir_all(root) {
            let rel = e.strip_prefix(root).unwrap().to_path_buf();
            let mut w = write(rel);
            w.kind = ChangeKind::Write {
                source: e.clone(),
                opaque: false,
            };
            entries.push(w);
        }
        Change::new(entries, root)
    }

    fn walkdir_all(root: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        let mut stack = vec![root.to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap() {
                let p = e.unwrap().path();
                if std::fs::symlink_metadata(&p).unwrap().is_dir() {
                    stack.push(p.clone());
                }
                out.push(p);
            }
        }
        out
    }

    struct Read_ {
        path: String,
        kind: tar::EntryType,
        mode: u32,
        uid: u64,
        mtime: u64,
        link: Option<String>,
        data: Vec<u8>,
        xattrs: Vec<(String, Vec<u8>)>,
        uname: Vec<u8>,
    }

    fn read_tar(bytes: &[u8]) -> Vec<Read_> {
        let mut ar = tar::Archive::new(bytes);
        let mut out = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut xattrs = Vec::new();
            if let Some(exts) = e.pax_extensions().unwrap() {
                for ext in exts {
                    let ext = ext.unwrap();
                    if let Some(k) = ext.key().unwrap().strip_prefix("SCHILY.xattr.") {
                        xattrs.push((k.to_string(), ext.value_bytes().to_vec()));
                    }
                }
            }
            let h = e.header().clone();
            let mut data = Vec::new();
            e.read_to_end(&mut data).unwrap();
            out.push(Read_ {
                path: String::from_utf8(e.path_bytes().to_vec()).unwrap(),
                kind: h.entry_type(),
                mode: h.mode().unwrap(),
                uid: h.uid().unwrap(),
                mtime: h.mtime().unwrap(),
                link: e
                    .link_name_bytes()
                    .map(|l| String::from_utf8(l.to_vec()).unwrap()),
                data,
                xattrs,
                uname: h.username_bytes().unwrap_or_default().to_vec(),
            });
        }
        out
    }

    fn tar_bytes(change: &Change, mtime: MtimePolicy) -> Vec<u8> {
        let mut v = Vec::new();
        write_tar(change, mtime, &mut v).unwrap();
        v
    }

    #[test]
    fn entries_are_sorted_parents_first_with_metadata_preserved() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        std::fs::create_dir_all(r.join("b/c")).unwrap();
        std::fs::write(r.join("b/c/f"), b"hello").unwrap();
        std::fs::write(r.join("a"), b"x").unwrap();
        std::fs::set_permissions(r.join("a"), std::fs::Permissions::from_mode(0o4755)).unwrap();
        std::os::unix::fs::chown(r.join("b/c/f"), Some(1234), Some(5678)).unwrap();
        symlink("../a", r.join("b/l")).unwrap();
        let entries = read_tar(&tar_bytes(&change_of(r, vec![]), MtimePolicy::Keep));
        let paths: Vec<_> = entries.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, vec!["a", "b/", "b/c/", "b/c/f", "b/l"]);
        assert_eq!(entries[0].mode, 0o4755);
        assert_eq!(entries[3].uid, 1234);
        assert_eq!(entries[3].data, b"hello");
        assert_eq!(entries[4].kind, tar::EntryType::Symlink);
        assert_eq!(entries[4].link.as_deref(), Some("../a"));
        assert!(entries.iter().all(|e| e.uname.is_empty()));
    }

    #[test]
    fn same_change_gives_identical_bytes_and_mtime_policy_applies() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("f"), b"data").unwrap();
        let c = change_of(d.path(), vec![]);
        let a = tar_bytes(&c, MtimePolicy::Set(42));
        let b = tar_bytes(&c, MtimePolicy::Set(42));
        assert_eq!(a, b);
        assert!(read_tar(&a).iter().all(|e| e.mtime == 42));
        let clamped = read_tar(&tar_bytes(&c, MtimePolicy::Clamp(u64::MAX)));
        assert!(clamped[0].mtime > 1_600_000_000);
    }

    #[test]
    fn long_names_links_and_xattrs_use_pax() {
        let d = tempfile::tempdir().unwrap();
        let long = "n".repeat(150);
        let f = d.path().join(&long);
        std::fs::write(&f, b"z").unwrap();
        symlink("t".repeat(120), d.path().join("l")).unwrap();
        let c = fsutil::cstring(&f).unwrap();
        let n = fsutil::cstring("user.k").unwrap();
        // SAFETY: valid pointers and lengths.
        let rc = unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), b"v".as_ptr().cast(), 1, 0) };
        assert_eq!(rc, 0);
        let bytes = tar_bytes(&change_of(d.path(), vec![]), MtimePolicy::Keep);
        let entries = read_tar(&bytes);
        assert_eq!(entries[0].path, "l");
        assert_eq!(entries[0].link.as_deref(), Some("t".repeat(120).as_str()));
        assert_eq!(entries[1].path, long);
        assert_eq!(entries[1].xattrs, vec![("user.k".into(), b"v".to_vec())]);
        // PAX, not GNU long-name entries ('L' type).
        assert!(!bytes.windows(13).any(|w| w == b"././@LongLink"));
    }

    #[test]
    fn hardlinks_within_the_layer_become_link_entries() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("a"), b"same").unwrap();
        std::fs::hard_link(d.path().join("a"), d.path().join("b")).unwrap();
        let entries = read_tar(&tar_bytes(&change_of(d.path(), vec![]), MtimePolicy::Keep));
        assert_eq!(entries[0].path, "a");
        assert_eq!(entries[0].data, b"same");
        assert_eq!(entries[1].kind, tar::EntryType::Link);
        assert_eq!(entries[1].link.as_deref(), Some("a"));
        assert!(entries[1].data.is_empty());
    }

    #[test]
    fn deletions_and_opaque_dirs_become_oci_whiteouts() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("dir")).unwrap();
        let c = Change::new(
            vec![
                ChangeEntry {
                    path: "dir".into(),
                    kind: ChangeKind::Write {
                        source: d.path().join("dir"),
                        opaque: true,
                    },
                },
                ChangeEntry {
                    path: "gone/file".into(),
                    kind: ChangeKind::Delete,
                },
                ChangeEntry {
                    path: "top".into(),
                    kind: ChangeKind::Delete,
                },
            ],
            d.path(),
        );
        std::fs::create_dir(d.path().join("gone")).unwrap();
        let paths: Vec<_> = read_tar(&tar_bytes(&c, MtimePolicy::Keep))
            .into_iter()
            .map(|e| e.path)
            .collect();
        assert_eq!(
            paths,
            vec![
                "dir/",
                "dir/.wh..wh..opq",
                "gone/",
                "gone/.wh.file",
                ".wh.top"
            ]
        );
    }

    #[test]
    fn empty_change_writes_no_layer() {
        let out = tempfile::tempdir().unwrap();
        let got = write_layer(&Change::default(), &LayerOptions::default(), out.path()).unwrap();
        assert!(got.is_none());
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn digests_match_the_blob_and_the_decompressed_tar() {
        let src = tempfile::tempdir().unwrap();
        let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(src.path().join("big"), &big).unwrap();
        std::fs::write(src.path().join("small"), b"s").unwrap();
        let change = change_of(src.path(), vec![]);
        let expected_tar = tar_bytes(&change, MtimePolicy::Keep);
        for compression in [
            Compression::Gzip { level: 1 },
            Compression::Zstd { level: 3 },
            Compression::None,
        ] {
            let out = tempfile::tempdir().unwrap();
            let opts = LayerOptions {
                compression,
                mtime: MtimePolicy::Keep,
                threads: 2,
            };
            let layer = write_layer(&change, &opts, out.path()).unwrap().unwrap();
            let blob = std::fs::read(&layer.path).unwrap();
            assert_eq!(layer.path, out.path().join(layer.digest.hex()));
            assert_eq!(Digest::of_bytes(&blob), layer.digest);
            assert_eq!(blob.len() as u64, layer.size);
            let mut tar = Vec::new();
            match compression {
                Compression::Gzip { .. } => {
                    flate2::read::GzDecoder::new(&blob[..])
                        .read_to_end(&mut tar)
                        .unwrap();
                }
                Compression::Zstd { .. } => {
                    zstd::Decoder::new(&blob[..])
                        .unwrap()
                        .read_to_end(&mut tar)
                        .unwrap();
                }
                Compression::None => tar = blob.clone(),
            }
            assert_eq!(tar, expected_tar);
            assert_eq!(Digest::of_bytes(&tar), layer.diff_id);
            assert_eq!(tar.len() as u64, layer.uncompressed_size);
            // Only the final blob remains: no temporary file.
            assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 1);
        }
    }

    #[test]
    fn missing_source_is_an_error_naming_the_file_and_leaves_nothing() {
        let out = tempfile::tempdir().unwrap();
        let c = Change::new(
            vec![ChangeEntry {
                path: "x".into(),
                kind: ChangeKind::Write {
                    source: "/nonexistent/kiln/x".into(),
                    opaque: false,
                },
            }],
            Path::new("/nonexistent/kiln"),
        );
        let err = write_layer(&c, &LayerOptions::default(), out.path()).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/kiln/x"), "{err}");
        assert_eq!(std::fs::read_dir(out.path()).unwrap().count(), 0);
    }

    #[test]
    fn pax_record_length_counts_itself() {
        let mut v = Vec::new();
        pax_record(&mut v, "path", &[b'a'; 92]);
        assert_eq!(v.len(), 102);
        assert!(v.starts_with(b"102 path="));
        let mut v = Vec::new();
        pax_record(&mut v, "k", b"v");
        assert_eq!(v, b"6 k=v\n");
    }
}
