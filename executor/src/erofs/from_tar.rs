//! One layer tar stream to one EROFS image, in a single pass, with the
//! meaning [`crate::build::unpack`] gives the same stream in overlay-lower mode: an
//! image mounted as an overlay lower shows the files a directory unpacked by
//! `unpack_layer(.., UnpackOptions::overlay_lower(), ..)` would hold.
//!
//! The rules are the unpacker's, applied to the in-memory tree instead of a
//! directory: names with `..` are rejected, parents resolve inside the root
//! (symlinks followed as if the root were `/`, at most 40), a later entry
//! replaces an earlier one of the same name (a directory over a directory
//! merges), hard links point at an earlier entry (never a directory),
//! `.wh.NAME` becomes an overlay whiteout (a 0:0 character device) and
//! `.wh..wh..opq` the `trusted.overlay.opaque=y` xattr, `trusted.overlay.*`
//! xattrs from the layer are dropped, and the expanded size is charged
//! against the same limit. Where the unpacker stamps "now" (directories it
//! creates implicitly, whiteouts) the image has 0, so that an image depends
//! only on its layer.

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use kiln_common::Digest;

use super::writer::{ImageWriter, Kind, Meta, Node, NodeId, ROOT, WriteError};
use crate::build::unpack::{
    ENTRY_OVERHEAD, MAX_SYMLINKS, OPAQUE_MARKER, PaxSparse, SparseError, WHITEOUT_PREFIX,
    components, lossy, pax_value, read_pax, xattrs_of,
};

/// Largest sparse file (apparent size) converted; larger ones make the
/// layer fall back to unpacking.
const MAX_SPARSE_IMAGED: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error("layer entry {entry:?} rejected: {reason}")]
    Unsafe { entry: String, reason: String },
    #[error("reading layer: {0}")]
    Read(#[source] io::Error),
    #[error(
        "layer entry {entry:?}: the layer expands to more than {limit} bytes (--max-layer-size)"
    )]
    TooLarge { entry: String, limit: u64 },
    #[error("layer entry {entry:?}: invalid sparse file: {reason}")]
    Sparse { entry: String, reason: String },
    /// Valid for the unpacker but not representable here (an xattr EROFS
    /// has no prefix for): the caller unpacks instead.
    #[error("layer entry {entry:?}: {reason}")]
    Unsupported { entry: String, reason: String },
    #[error(transparent)]
    Write(#[from] WriteError),
}

/// What a conversion did, for logs.
#[derive(Debug, Default, Clone)]
pub struct ConvertStats {
    pub entries: u64,
    pub file_bytes: u64,
    pub image_bytes: u64,
    pub warnings: Vec<String>,
}

/// Converts a (possibly compressed) layer into an image written to `out`.
/// With `diff_id`, the uncompressed stream must hash to it. `tmp_dir` holds
/// the expansion of PAX sparse files while they are copied in.
pub fn convert_layer<R: Read + Send>(
    layer: R,
    diff_id: Option<&Digest>,
    out: File,
    tmp_dir: &Path,
    max_expanded_size: u64,
) -> Result<(File, ConvertStats), ConvertError> {
    let mut c = Converter {
        w: ImageWriter::new(out).map_err(|e| ConvertError::Write(e.into()))?,
        stats: ConvertStats::default(),
        expanded: 0,
        limit: max_expanded_size,
        tmp_dir,
    };
    // Decompression and the diff_id's hash run on their own thread, as for
    // the unpacker, so they overlap with the image writes.
    let (result, produced) = crate::build::unpack::with_decompressed(layer, diff_id, |reader| {
        let mut archive = tar::Archive::new(reader);
        for entry in archive.entries().map_err(ConvertError::Read)? {
            let mut entry = entry.map_err(ConvertError::Read)?;
            c.entry(&mut entry)?;
        }
        // The digest covers the padding after the end-of-archive marker
        // too: read to the end, where a mismatch surfaces.
        io::copy(&mut archive.into_inner(), &mut io::sink()).map_err(ConvertError::Read)?;
        Ok::<(), ConvertError>(())
    });
    result?;
    produced.map_err(ConvertError::Read)?;
    let Converter { w, mut stats, .. } = c;
    let (file, len) = w.finish()?;
    stats.image_bytes = len;
    Ok((file, stats))
}

struct Converter<'a> {
    w: ImageWriter,
    stats: ConvertStats,
    expanded: u64,
    limit: u64,
    tmp_dir: &'a Path,
}

fn unsafe_entry(raw: &[u8], reason: impl Into<String>) -> ConvertError {
    ConvertError::Unsafe {
        entry: lossy(raw),
        reason: reason.into(),
    }
}

impl Converter<'_> {
    fn charge(&mut self, raw: &[u8], content: u64) -> Result<(), ConvertError> {
        let total = self
            .expanded
            .saturating_add(ENTRY_OVERHEAD)
            .saturating_add(content);
        if total > self.limit {
            return Err(ConvertError::TooLarge {
                entry: lossy(raw),
                limit: self.limit,
            });
        }
        self.expanded = total;
        Ok(())
    }

    fn lookup(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.w.node(dir).kind {
            Kind::Dir(c) => c.get(name).copied(),
            _ => None,
        }
    }

    fn new_dir(&mut self) -> NodeId {
        self.w.add(Node {
            kind: Kind::Dir(Default::default()),
            meta: Meta {
                mode: 0o755,
                ..Meta::default()
            },
        })
    }

    /// The unpacker's `resolve_dir`: `parts` as a directory inside the
    /// root, symlinks followed as if the root were `/`.
    fn resolve_dir(
        &mut self,
        raw: &[u8],
        parts: &[&std::ffi::OsStr],
        create: bool,
    ) -> Result<NodeId, ConvertError> {
        let mut todo: Vec<Vec<u8>> = parts.iter().rev().map(|p| p.as_bytes().to_vec()).collect();
        let mut stack: Vec<NodeId> = vec![ROOT];
        let mut links = 0;
        while let Some(c) = todo.pop() {
            if c.is_empty() || c == b"." {
                continue;
            }
            if c == b".." {
                if stack.len() > 1 {
                    stack.pop();
                }
                continue;
            }
            let here = *stack.last().unwrap_or(&ROOT);
            match self.lookup(here, &c) {
                Some(id) => match &self.w.node(id).kind {
                    Kind::Dir(_) => stack.push(id),
                    Kind::Symlink(target) => {
                        links += 1;
                        if links > MAX_SYMLINKS {
                            return Err(unsafe_entry(
                                raw,
                                "too many levels of symbolic links in its parent path",
                            ));
                        }
                        let target = target.clone();
                        if target.starts_with(b"/") {
                            stack.truncate(1);
                        }
                        for part in target.split(|b| *b == b'/').rev() {
                            todo.push(part.to_vec());
                        }
                    }
                    _ => {
                        return Err(unsafe_entry(
                            raw,
                            format!("parent {} is not a directory", lossy(&c)),
                        ));
                    }
                },
                None if create => {
                    let d = self.new_dir();
                    if let Some(children) = self.w.children_mut(here) {
                        children.insert(c, d);
                    }
                    stack.push(d);
                }
                None => {
                    return Err(unsafe_entry(
                        raw,
                        format!("hard link target parent {} does not exist", lossy(&c)),
                    ));
                }
            }
        }
        Ok(*stack.last().unwrap_or(&ROOT))
    }

    fn set(&mut self, parent: NodeId, name: &[u8], id: NodeId) {
        if let Some(children) = self.w.children_mut(parent) {
            children.insert(name.to_vec(), id);
        }
    }

    fn entry<R: Read>(&mut self, e: &mut tar::Entry<'_, R>) -> Result<(), ConvertError> {
        let kind = e.header().entry_type();
        if matches!(
            kind,
            tar::EntryType::XGlobalHeader | tar::EntryType::XHeader
        ) {
            return Ok(());
        }
        let pax = read_pax(e).map_err(|err| match err {
            crate::build::unpack::UnpackError::Read(io) => ConvertError::Read(io),
            other => ConvertError::Read(io::Error::other(other.to_string())),
        })?;
        let pax_sparse = PaxSparse::detect(&pax);
        let raw = match pax_value(&pax, "GNU.sparse.name") {
            Some(name) if pax_sparse.is_some() => name.to_vec(),
            _ => e.path_bytes().into_owned(),
        };
        let Some(parts) = components(&raw) else {
            return Err(unsafe_entry(&raw, "its name contains '..'"));
        };
        if parts.iter().any(|p| p.len() > 255) {
            return Err(ConvertError::Unsupported {
                entry: lossy(&raw),
                reason: "a name component longer than 255 bytes".into(),
            });
        }
        let is_file = matches!(
            kind,
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse
        );
        let content = match &pax_sparse {
            Some(sparse) if is_file => {
                sparse.real_size(&raw).map_err(|_| ConvertError::Sparse {
                    entry: lossy(&raw),
                    reason: "no GNU.sparse.size or GNU.sparse.realsize".into(),
                })?
            }
            _ if is_file => e.size(),
            _ => 0,
        };
        self.charge(&raw, content)?;
        // The image's holes are found by reading zeros, so a huge sparse
        // file (a 1 KB entry describing 64 GiB) costs its apparent size in
        // reads here; the unpacker seeks over the holes instead.
        let sparse = kind == tar::EntryType::GNUSparse || pax_sparse.is_some();
        if is_file && sparse && content > MAX_SPARSE_IMAGED {
            return Err(ConvertError::Unsupported {
                entry: lossy(&raw),
                reason: format!("sparse file larger than {MAX_SPARSE_IMAGED} bytes"),
            });
        }
        self.stats.entries += 1;
        let Some((name, parent_parts)) = parts.split_last() else {
            return Ok(());
        };
        let name = name.as_bytes().to_vec();
        let parent = self.resolve_dir(&raw, parent_parts, true)?;

        if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX.as_bytes()) {
            if name == OPAQUE_MARKER.as_bytes() {
                self.w
                    .node_mut(parent)
                    .meta
                    .xattrs
                    .insert("trusted.overlay.opaque".into(), b"y".to_vec());
                return Ok(());
            }
            if hidden.is_empty() || hidden == b"." || hidden == b".." {
                return Err(unsafe_entry(&raw, "whiteout of an invalid name"));
            }
            let w = self.w.add(Node {
                kind: Kind::Char { major: 0, minor: 0 },
                meta: Meta::default(),
            });
            self.set(parent, hidden, w);
            return Ok(());
        }

        let header = e.header().clone();
        let mode = (header.mode().map_err(ConvertError::Read)? & 0o7777) as u16;
        let mtime = header.mtime().unwrap_or(0);
        let (uid, gid) = (
            header.uid().map_err(ConvertError::Read)? as u32,
            header.gid().map_err(ConvertError::Read)? as u32,
        );
        let mut xattrs = std::collections::BTreeMap::new();
        for (xname, value) in xattrs_of(&pax) {
            if xname.starts_with("trusted.overlay.") {
                let msg = format!("ignored xattr {xname} on {}", lossy(&raw));
                self.stats.warnings.push(msg);
                continue;
            }
            if !super::writer::xattr_supported(&xname) {
                return Err(ConvertError::Unsupported {
                    entry: lossy(&raw),
                    reason: format!("xattr {xname} cannot be stored in an EROFS image"),
                });
            }
            xattrs.insert(xname, value);
        }
        let meta = Meta {
            mode,
            uid,
            gid,
            mtime,
            mtime_nsec: 0,
            xattrs,
        };
        let existing = self.lookup(parent, &name);

        match kind {
            tar::EntryType::Directory => {
                match existing.filter(|id| matches!(self.w.node(*id).kind, Kind::Dir(_))) {
                    Some(id) => {
                        // A directory over a directory keeps its content and
                        // the xattrs it had (the unpacker only adds).
                        let node = self.w.node_mut(id);
                        let mut merged = std::mem::take(&mut node.meta.xattrs);
                        merged.extend(meta.xattrs.clone());
                        node.meta = Meta {
                            xattrs: merged,
                            ..meta
                        };
                    }
                    None => {
                        let id = self.w.add(Node {
                            kind: Kind::Dir(Default::default()),
                            meta,
                        });
                        self.set(parent, &name, id);
                    }
                }
            }
            tar::EntryType::Regular | tar::EntryType::Continuous | tar::EntryType::GNUSparse => {
                let data = match &pax_sparse {
                    Some(sparse) => self.sparse_data(&raw, sparse, e, content)?,
                    // GNU sparse entries read back expanded (the tar crate
                    // pads the holes with zeros); zero blocks stay holes.
                    None => self.w.write_data(e).map_err(ConvertError::Read)?,
                };
                self.stats.file_bytes += content;
                let id = self.w.add(Node { kind: data, meta });
                self.set(parent, &name, id);
            }
            tar::EntryType::Symlink => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw, "symlink without a target"))?
                    .into_owned();
                // symlink(2) makes every link 0777, whatever the header says.
                let id = self.w.add(Node {
                    kind: Kind::Symlink(target),
                    meta: Meta {
                        mode: 0o777,
                        ..meta
                    },
                });
                self.set(parent, &name, id);
            }
            tar::EntryType::Link => {
                let target = e
                    .link_name_bytes()
                    .ok_or_else(|| unsafe_entry(&raw, "hard link without a target"))?
                    .into_owned();
                let Some(tparts) = components(&target) else {
                    return Err(unsafe_entry(&raw, "its hard link target contains '..'"));
                };
                let Some((tname, tparent)) = tparts.split_last() else {
                    return Err(unsafe_entry(&raw, "hard link to the root directory"));
                };
                let tdir = self.resolve_dir(&raw, tparent, false)?;
                let Some(tid) = self.lookup(tdir, tname.as_bytes()) else {
                    return Err(unsafe_entry(&raw, "hard link target does not exist"));
                };
                if matches!(self.w.node(tid).kind, Kind::Dir(_)) {
                    return Err(unsafe_entry(&raw, "hard link to a directory"));
                }
                self.set(parent, &name, tid);
            }
            tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                let kind = match kind {
                    tar::EntryType::Char => Kind::Char { major, minor },
                    tar::EntryType::Block => Kind::Block { major, minor },
                    _ => Kind::Fifo,
                };
                let id = self.w.add(Node { kind, meta });
                self.set(parent, &name, id);
            }
            other => {
                self.stats.warnings.push(format!(
                    "skipped entry {} of unsupported tar type {other:?}",
                    lossy(&raw)
                ));
            }
        }
        Ok(())
    }

    /// A PAX sparse file: expanded into a temporary sparse file by the
    /// unpacker's own map reader, then copied in (its holes read as zero
    /// blocks, which stay holes in the image).
    fn sparse_data(
        &mut self,
        raw: &[u8],
        sparse: &PaxSparse,
        data: &mut dyn Read,
        real_size: u64,
    ) -> Result<Kind, ConvertError> {
        let mut tmp = tempfile::tempfile_in(self.tmp_dir).map_err(ConvertError::Read)?;
        sparse
            .write(data, &mut tmp, real_size)
            .map_err(|err| match err {
                SparseError::Invalid(reason) => ConvertError::Sparse {
                    entry: lossy(raw),
                    reason,
                },
                SparseError::Io(e) => ConvertError::Read(e),
            })?;
        tmp.rewind().map_err(ConvertError::Read)?;
        self.w.write_data(&mut tmp).map_err(ConvertError::Read)
    }
}
