//! An EROFS image writer: a tree of inodes in memory, file data streamed to
//! the image file as it arrives, metadata written once at the end.
//!
//! Layout (4 KiB blocks, no compression, no shared xattrs):
//!
//! ```text
//! block 0            superblock at byte 1024
//! blocks 1..D        file data, each file in contiguous blocks (FLAT_PLAIN);
//!                    all-zero blocks are left as holes of the image file
//! blocks D..M        full blocks of large directories and symlinks
//! blocks M..         metadata: 64-byte extended inodes with inline xattrs
//!                    and, where they fit in the inode's block, the tails of
//!                    directories and symlinks (FLAT_INLINE); root first
//! ```
//!
//! Promises: memory holds one [`Node`] per inode (its name in its parent's
//! map, owner, mode, mtime, xattrs, symlink target; about 150 bytes plus the
//! name for a plain file), never file data; the image is a function of the
//! tree and the data alone (no timestamps, no UUID), so the same layer gives
//! the same bytes on every node. Every inode keeps its exact mode, uid, gid,
//! mtime (seconds and nanoseconds), xattrs and rdev; hard links are one inode
//! under several names.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

pub const BLOCK: u64 = 4096;
const SUPER_OFFSET: u64 = 1024;
const MAGIC: u32 = 0xE0F5_E1E2;
const INODE_SIZE: u64 = 64;
const DIRENT_SIZE: usize = 12;
/// Largest inline xattr area one inode may carry (it must share a block
/// with the inode).
const MAX_XATTR_BODY: usize = (BLOCK - INODE_SIZE) as usize;

const FORMAT_EXTENDED: u16 = 1;
const LAYOUT_FLAT_PLAIN: u16 = 0;
const LAYOUT_FLAT_INLINE: u16 = 2;

pub type NodeId = usize;

/// What an inode is; the permission bits live in [`Meta::mode`].
#[derive(Debug, Clone)]
pub enum Kind {
    Dir(BTreeMap<Vec<u8>, NodeId>),
    File { blkaddr: u32, size: u64 },
    Symlink(Vec<u8>),
    Char { major: u32, minor: u32 },
    Block { major: u32, minor: u32 },
    Fifo,
}

#[derive(Debug, Clone, Default)]
pub struct Meta {
    /// Permission bits (07777).
    pub mode: u16,
    pub uid: u32,
    pub gid: u32,
    pub mtime: u64,
    pub mtime_nsec: u32,
    /// Full names (`user.x`, `trusted.overlay.opaque`), last value wins.
    pub xattrs: BTreeMap<String, Vec<u8>>,
}

#[derive(Debug, Clone)]
pub struct Node {
    pub kind: Kind,
    pub meta: Meta,
}

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("writing the image: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Unsupported(String),
}

/// An image being built; see the module documentation.
pub struct ImageWriter {
    file: File,
    nodes: Vec<Node>,
    /// Next free block of the data area.
    next_block: u64,
    buf: Vec<u8>,
}

pub const ROOT: NodeId = 0;

impl ImageWriter {
    /// Starts an image in `file` (truncated), with an empty root directory.
    pub fn new(file: File) -> io::Result<Self> {
        file.set_len(0)?;
        Ok(ImageWriter {
            file,
            nodes: vec![Node {
                kind: Kind::Dir(BTreeMap::new()),
                meta: Meta {
                    mode: 0o755,
                    ..Meta::default()
                },
            }],
            next_block: 1,
            buf: vec![0; 1 << 20],
        })
    }

    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id]
    }

    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id]
    }

    pub fn add(&mut self, node: Node) -> NodeId {
        self.nodes.push(node);
        self.nodes.len() - 1
    }

    /// The children of a directory (`None` for other kinds).
    pub fn children_mut(&mut self, dir: NodeId) -> Option<&mut BTreeMap<Vec<u8>, NodeId>> {
        match &mut self.nodes[dir].kind {
            Kind::Dir(c) => Some(c),
            _ => None,
        }
    }

    /// Streams one file's content into the data area and returns its
    /// `Kind::File`. Blocks of zeros are not written, so holes (of sparse
    /// files, or just zeros) stay holes in the image file.
    pub fn write_data(&mut self, r: &mut dyn Read) -> io::Result<Kind> {
        let start = self.next_block;
        let mut size = 0u64;
        loop {
            let mut filled = 0;
            while filled < self.buf.len() {
                match r.read(&mut self.buf[filled..]) {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            if filled == 0 {
                break;
            }
            let base = (start * BLOCK) + size;
            // Contiguous runs of non-zero blocks, one pwrite each.
            let chunk = &self.buf[..filled];
            let mut run_start: Option<usize> = None;
            let mut off = 0;
            while off < filled {
                let end = (off + BLOCK as usize).min(filled);
                let zero = chunk[off..end].iter().all(|b| *b == 0);
                match (zero, run_start) {
                    (false, None) => run_start = Some(off),
                    (true, Some(s)) => {
                        self.file.write_all_at(&chunk[s..off], base + s as u64)?;
                        run_start = None;
                    }
                    _ => {}
                }
                off = end;
            }
            if let Some(s) = run_start {
                self.file.write_all_at(&chunk[s..filled], base + s as u64)?;
            }
            size += filled as u64;
            if filled < self.buf.len() {
                break;
            }
        }
        let blocks = size.div_ceil(BLOCK);
        self.next_block = start + blocks;
        let blkaddr = if size == 0 {
            0
        } else {
            u32::try_from(start)
                .map_err(|_| io::Error::other("image larger than 16 TiB of blocks"))?
        };
        if u32::try_from(self.next_block).is_err() {
            return Err(io::Error::other("image larger than 16 TiB of blocks"));
        }
        Ok(Kind::File { blkaddr, size })
    }

    /// Writes the directories, inodes and superblock; returns the image's
    /// length in bytes. Nodes not reachable from the root (replaced or
    /// removed by later tar entries) are left out.
    pub fn finish(mut self) -> Result<(File, u64), WriteError> {
        // Reachable inodes in breadth-first order (root first, so its nid
        // fits the superblock's 16 bits), link counts, and each directory's
        // parent for `..`.
        let n = self.nodes.len();
        let mut order = Vec::new();
        let mut seen = vec![false; n];
        let mut links = vec![0u32; n];
        let mut parent = vec![ROOT; n];
        seen[ROOT] = true;
        order.push(ROOT);
        let mut i = 0;
        while i < order.len() {
            let id = order[i];
            i += 1;
            if let Kind::Dir(children) = &self.nodes[id].kind {
                for &c in children.values() {
                    links[c] += 1;
                    if let Kind::Dir(_) = self.nodes[c].kind {
                        links[id] += 1;
                        parent[c] = id;
                    }
                    if !seen[c] {
                        seen[c] = true;
                        order.push(c);
                    }
                }
            }
        }
        links[ROOT] += 1;
        for &id in &order {
            if matches!(self.nodes[id].kind, Kind::Dir(_)) {
                links[id] += 1; // "."
            }
        }

        // Pass 1: sizes, layouts and positions.
        struct Placed {
            nid: u64,
            xattr_body: Vec<u8>,
            /// Directory or symlink content size.
            size: u64,
            inline: bool,
            /// First block of the content's full (or all, when not inline)
            /// blocks in the data area.
            blkaddr: u64,
        }
        let mut placed: Vec<Option<Placed>> = (0..n).map(|_| None).collect();
        let mut cursor = 0u64;
        for &id in &order {
            let node = &self.nodes[id];
            let xattr_body = xattr_body(&node.meta.xattrs)?;
            let size = match &node.kind {
                Kind::Dir(children) => dir_size(children),
                Kind::Symlink(t) => t.len() as u64,
                _ => 0,
            };
            let tail = size % BLOCK;
            let fixed = INODE_SIZE + xattr_body.len() as u64;
            let inline = matches!(node.kind, Kind::Dir(_) | Kind::Symlink(_))
                && tail != 0
                && fixed + tail <= BLOCK;
            let need = fixed + if inline { tail } else { 0 };
            if cursor % BLOCK + need > BLOCK {
                cursor = cursor.next_multiple_of(BLOCK);
            }
            let nid = cursor / 32;
            cursor = (cursor + need).next_multiple_of(32);
            let content_blocks = if inline {
                size / BLOCK
            } else {
                size.div_ceil(BLOCK)
            };
            let blkaddr = if content_blocks > 0 {
                let b = self.next_block;
                self.next_block += content_blocks;
                b
            } else {
                0
            };
            placed[id] = Some(Placed {
                nid,
                xattr_body,
                size,
                inline,
                blkaddr,
            });
        }
        let meta_blkaddr = self.next_block;
        let total_blocks = meta_blkaddr + cursor.div_ceil(BLOCK);
        if u32::try_from(total_blocks).is_err() {
            return Err(WriteError::Unsupported(
                "image larger than 2^32 blocks".into(),
            ));
        }
        if placed[ROOT].as_ref().map(|p| p.nid) != Some(0) {
            return Err(WriteError::Unsupported("root not first".into()));
        }
        let nid_of = |id: NodeId| placed[id].as_ref().map_or(0, |p| p.nid);

        // Pass 2: content blocks and inodes, in the order placed.
        let mut meta = BufWriter::with_capacity(1 << 20, self.file.try_clone()?);
        meta.seek(SeekFrom::Start(meta_blkaddr * BLOCK))?;
        let mut written = 0u64;
        for (ino, &id) in order.iter().enumerate() {
            let p = placed[id].as_ref().expect("placed in pass 1");
            let node = &self.nodes[id];
            let content: Vec<u8> = match &node.kind {
                Kind::Dir(children) => {
                    let mut entries: Vec<(&[u8], u64, u8)> = Vec::with_capacity(children.len() + 2);
                    entries.push((b".", p.nid, 2));
                    entries.push((b"..", nid_of(parent[id]), 2));
                    for (name, &c) in children {
                        entries.push((name, nid_of(c), file_type(&self.nodes[c].kind)));
                    }
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                    dir_content(&entries)
                }
                Kind::Symlink(t) => t.clone(),
                _ => Vec::new(),
            };
            debug_assert_eq!(content.len() as u64, p.size);
            let full = if p.inline {
                (p.size / BLOCK * BLOCK) as usize
            } else {
                content.len()
            };
            if full > 0 {
                self.file
                    .write_all_at(&content[..full], p.blkaddr * BLOCK)?;
            }
            let (layout, size, i_u) = match &node.kind {
                Kind::File { blkaddr, size } => (LAYOUT_FLAT_PLAIN, *size, *blkaddr),
                Kind::Dir(_) | Kind::Symlink(_) => (
                    if p.inline {
                        LAYOUT_FLAT_INLINE
                    } else {
                        LAYOUT_FLAT_PLAIN
                    },
                    p.size,
                    p.blkaddr as u32,
                ),
                Kind::Char { major, minor } | Kind::Block { major, minor } => {
                    (LAYOUT_FLAT_PLAIN, 0, encode_dev(*major, *minor))
                }
                Kind::Fifo => (LAYOUT_FLAT_PLAIN, 0, 0),
            };
            let type_bits: u16 = match node.kind {
                Kind::Dir(_) => 0o040000,
                Kind::File { .. } => 0o100000,
                Kind::Symlink(_) => 0o120000,
                Kind::Char { .. } => 0o020000,
                Kind::Block { .. } => 0o060000,
                Kind::Fifo => 0o010000,
            };
            let offset = p.nid * 32;
            if offset > written {
                io::copy(&mut io::repeat(0).take(offset - written), &mut meta)?;
                written = offset;
            }
            let icount: u16 = if p.xattr_body.is_empty() {
                0
            } else {
                ((p.xattr_body.len() - 12) / 4 + 1) as u16
            };
            let mut inode = [0u8; INODE_SIZE as usize];
            inode[0..2].copy_from_slice(&(FORMAT_EXTENDED | (layout << 1)).to_le_bytes());
            inode[2..4].copy_from_slice(&icount.to_le_bytes());
            inode[4..6].copy_from_slice(&(type_bits | (node.meta.mode & 0o7777)).to_le_bytes());
            inode[8..16].copy_from_slice(&size.to_le_bytes());
            inode[16..20].copy_from_slice(&i_u.to_le_bytes());
            inode[20..24].copy_from_slice(&(ino as u32 + 1).to_le_bytes());
            inode[24..28].copy_from_slice(&node.meta.uid.to_le_bytes());
            inode[28..32].copy_from_slice(&node.meta.gid.to_le_bytes());
            inode[32..40].copy_from_slice(&node.meta.mtime.to_le_bytes());
            inode[40..44].copy_from_slice(&node.meta.mtime_nsec.to_le_bytes());
            inode[44..48].copy_from_slice(&links[id].to_le_bytes());
            meta.write_all(&inode)?;
            meta.write_all(&p.xattr_body)?;
            written += INODE_SIZE + p.xattr_body.len() as u64;
            if p.inline {
                meta.write_all(&content[full..])?;
                written += (content.len() - full) as u64;
            }
        }
        let pad = cursor.next_multiple_of(BLOCK) - written;
        io::copy(&mut io::repeat(0).take(pad), &mut meta)?;
        let file = meta.into_inner().map_err(|e| e.into_error())?;
        drop(file);

        let mut sb = [0u8; 128];
        sb[0..4].copy_from_slice(&MAGIC.to_le_bytes());
        sb[12] = 12; // blkszbits
        sb[14..16].copy_from_slice(&0u16.to_le_bytes()); // root_nid
        sb[16..24].copy_from_slice(&(order.len() as u64).to_le_bytes()); // inos
        sb[36..40].copy_from_slice(&(total_blocks as u32).to_le_bytes());
        sb[40..44].copy_from_slice(&(meta_blkaddr as u32).to_le_bytes());
        self.file.write_all_at(&sb, SUPER_OFFSET)?;
        let len = total_blocks * BLOCK;
        self.file.set_len(len)?;
        Ok((self.file, len))
    }
}

/// `new_encode_dev`, as EROFS stores `rdev`.
fn encode_dev(major: u32, minor: u32) -> u32 {
    (minor & 0xff) | (major << 8) | ((minor & !0xff) << 12)
}

fn file_type(kind: &Kind) -> u8 {
    match kind {
        Kind::File { .. } => 1,
        Kind::Dir(_) => 2,
        Kind::Char { .. } => 3,
        Kind::Block { .. } => 4,
        Kind::Fifo => 5,
        Kind::Symlink(_) => 7,
    }
}

/// A directory's content size: entries (with `.` and `..`) packed into
/// blocks in name order, each block `dirents | names`, no entry split.
fn dir_size(children: &BTreeMap<Vec<u8>, NodeId>) -> u64 {
    let mut names: Vec<&[u8]> = children.keys().map(Vec::as_slice).collect();
    names.push(b".");
    names.push(b"..");
    names.sort();
    let mut total = 0u64;
    let mut used = 0usize;
    for name in names {
        let need = DIRENT_SIZE + name.len();
        if used + need > BLOCK as usize {
            total += BLOCK;
            used = 0;
        }
        used += need;
    }
    total + used as u64
}

fn dir_content(entries: &[(&[u8], u64, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut block: Vec<&(&[u8], u64, u8)> = Vec::new();
    let mut used = 0usize;
    let flush = |out: &mut Vec<u8>, block: &[&(&[u8], u64, u8)], pad: bool| {
        let start = out.len();
        let mut nameoff = block.len() * DIRENT_SIZE;
        for (name, nid, ft) in block.iter().map(|e| **e) {
            out.extend_from_slice(&nid.to_le_bytes());
            out.extend_from_slice(&(nameoff as u16).to_le_bytes());
            out.push(ft);
            out.push(0);
            nameoff += name.len();
        }
        for (name, _, _) in block.iter().map(|e| **e) {
            out.extend_from_slice(name);
        }
        if pad {
            out.resize(start + BLOCK as usize, 0);
        }
    };
    for e in entries {
        let need = DIRENT_SIZE + e.0.len();
        if used + need > BLOCK as usize {
            flush(&mut out, &block, true);
            block.clear();
            used = 0;
        }
        block.push(e);
        used += need;
    }
    flush(&mut out, &block, false);
    out
}

/// The prefix index EROFS stores instead of a name's namespace.
fn xattr_index(name: &str) -> Option<(u8, &str)> {
    if name == "system.posix_acl_access" {
        return Some((2, ""));
    }
    if name == "system.posix_acl_default" {
        return Some((3, ""));
    }
    for (prefix, index) in [("user.", 1), ("trusted.", 4), ("security.", 6)] {
        if let Some(rest) = name.strip_prefix(prefix) {
            return Some((index, rest));
        }
    }
    None
}

/// Whether EROFS can store an xattr of this name.
pub fn xattr_supported(name: &str) -> bool {
    xattr_index(name).is_some_and(|(_, rest)| rest.len() <= 255)
}

/// The inline xattr area: a 12-byte header, then `(name_len, index,
/// value_size, name, value)` entries, each padded to 4 bytes.
fn xattr_body(xattrs: &BTreeMap<String, Vec<u8>>) -> Result<Vec<u8>, WriteError> {
    if xattrs.is_empty() {
        return Ok(Vec::new());
    }
    let mut out = vec![0u8; 12];
    for (name, value) in xattrs {
        let (index, rest) = xattr_index(name)
            .filter(|(_, r)| r.len() <= 255)
            .ok_or_else(|| WriteError::Unsupported(format!("xattr {name} has no EROFS prefix")))?;
        let value_len = u16::try_from(value.len())
            .map_err(|_| WriteError::Unsupported(format!("xattr {name} is too large")))?;
        let start = out.len();
        out.push(rest.len() as u8);
        out.push(index);
        out.extend_from_slice(&value_len.to_le_bytes());
        out.extend_from_slice(rest.as_bytes());
        out.extend_from_slice(value);
        out.resize(start + (out.len() - start).next_multiple_of(4), 0);
    }
    if out.len() > MAX_XATTR_BODY {
        return Err(WriteError::Unsupported(
            "an inode's xattrs exceed one block".into(),
        ));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_blocks_never_split_an_entry_and_sizes_agree() {
        let mut children = BTreeMap::new();
        for i in 0..700 {
            children.insert(format!("file-with-a-long-name-{i:05}").into_bytes(), 1);
        }
        let mut entries: Vec<(&[u8], u64, u8)> = vec![(b".", 0, 2), (b"..", 0, 2)];
        for k in children.keys() {
            entries.push((k, 1, 1));
        }
        entries.sort_by(|a, b| a.0.cmp(b.0));
        let content = dir_content(&entries);
        assert_eq!(content.len() as u64, dir_size(&children));
        assert!(content.len() as u64 > 2 * BLOCK);
        // Each full block starts with a dirent whose nameoff counts its
        // block's entries.
        let first_nameoff = u16::from_le_bytes([content[8], content[9]]) as usize;
        assert_eq!(first_nameoff % DIRENT_SIZE, 0);
    }

    #[test]
    fn device_numbers_use_the_kernels_new_encoding() {
        assert_eq!(encode_dev(0, 0), 0);
        assert_eq!(encode_dev(1, 3), 0x103);
        assert_eq!(encode_dev(8, 0x1234), 0x34 | (8 << 8) | (0x1200 << 12));
    }
}
