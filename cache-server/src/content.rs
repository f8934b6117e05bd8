//! The content store: blob bytes on the local filesystem, by digest.
//!
//! Layout under the data directory:
//! - `blobs/sha256/<aa>/<hex>`: committed blobs, only ever created by an
//!   atomic `rename` of a fully written, fsynced temporary file whose sha256
//!   matched `<hex>`; the shard directory is fsynced after the rename, so a
//!   committed blob survives a crash.
//! - `tmp/`: uploads in progress. Nothing here is ever served; start-up
//!   removes whatever a crash left behind.
//! - `quarantine/`: blobs `verify` found corrupt, kept for inspection.
//!
//! This module knows nothing about the index; [`crate::store`] decides when
//! a blob may be installed or removed.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use kiln_common::Digest;

/// What [`ContentStore::scan`] found: blobs with their sizes, and stray
/// paths that are not blobs.
pub type Scan = (Vec<(Digest, u64)>, Vec<PathBuf>);

/// Paths of the content store below one data directory.
#[derive(Debug, Clone)]
pub struct ContentStore {
    blobs: PathBuf,
    tmp: PathBuf,
    quarantine: PathBuf,
}

impl ContentStore {
    /// Creates the directories if needed.
    pub fn open(data: &Path) -> io::Result<Self> {
        let store = Self {
            blobs: data.join("blobs"),
            tmp: data.join("tmp"),
            quarantine: data.join("quarantine"),
        };
        for dir in [&store.blobs, &store.tmp, &store.quarantine] {
            fs::create_dir_all(dir)?;
        }
        Ok(store)
    }

    pub fn blob_path(&self, digest: &Digest) -> PathBuf {
        self.blobs.join(digest.sharded_path())
    }

    pub fn tmp_dir(&self) -> &Path {
        &self.tmp
    }

    /// A new, exclusively created temporary file for an upload.
    pub fn create_temp(&self) -> io::Result<(PathBuf, File)> {
        loop {
            let name = format!("upload-{}", hex::encode(rand::random::<[u8; 12]>()));
            let path = self.tmp.join(name);
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => return Ok((path, file)),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// A new temporary name that is a hard link to `src`: a blob adopted
    /// from a file that already holds its bytes, without copying them.
    pub fn link_temp(&self, src: &Path) -> io::Result<PathBuf> {
        loop {
            let name = format!("link-{}", hex::encode(rand::random::<[u8; 12]>()));
            let path = self.tmp.join(name);
            match fs::hard_link(src, &path) {
                Ok(()) => return Ok(path),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Removes every leftover temporary file; returns how many there were.
    pub fn remove_temp_files(&self) -> io::Result<usize> {
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
    }

    /// Atomically moves a verified, fsynced temporary file to its final
    /// name and makes the rename durable. Returns false (and removes the
    /// temporary file) when the blob was already present.
    pub fn install(&self, temp: &Path, digest: &Digest) -> io::Result<bool> {
        let target = self.blob_path(digest);
        if target.exists() {
            fs::remove_file(temp)?;
            return Ok(false);
        }
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
        fs::rename(temp, &target)?;
        fsync_dir(shard)?;
        Ok(true)
    }

    /// Removes a committed blob; false when it was not there.
    pub fn remove(&self, digest: &Digest) -> io::Result<bool> {
        match fs::remove_file(self.blob_path(digest)) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Moves a blob out of the served tree into `quarantine/`.
    pub fn quarantine(&self, digest: &Digest) -> io::Result<PathBuf> {
        let target = self.quarantine.join(digest.hex());
        fs::rename(self.blob_path(digest), &target)?;
        Ok(target)
    }

    /// Size of a committed blob on disk, if present.
    pub fn file_size(&self, digest: &Digest) -> io::Result<Option<u64>> {
        match fs::metadata(self.blob_path(digest)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Every committed blob on disk with its size. Files whose names are
    /// not digests are reported separately so recovery can log them.
    pub fn scan(&self) -> io::Result<Scan> {
        let mut blobs = Vec::new();
        let mut strays = Vec::new();
        let root = self.blobs.join("sha256");
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
    }
}

/// fsync on a directory makes the names created or renamed in it durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

pub use kiln_common::errors::cannot_link;

/// True for "the disk is full" errors (ENOSPC, EDQUOT).
pub fn is_no_space(err: &io::Error) -> bool {
    matches!(err.raw_os_error(), Some(libc::ENOSPC) | Some(libc::EDQUOT))
        || err.kind() == io::ErrorKind::StorageFull
        || err.kind() == io::ErrorKind::QuotaExceeded
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn install_moves_the_file_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        let digest = Digest::of_bytes(b"abc");
        let (tmp, mut f) = cs.create_temp().unwrap();
        f.write_all(b"abc").unwrap();
        assert!(cs.install(&tmp, &digest).unwrap());
        assert_eq!(fs::read(cs.blob_path(&digest)).unwrap(), b"abc");
        assert!(!tmp.exists());

        let (tmp2, mut f2) = cs.create_temp().unwrap();
        f2.write_all(b"abc").unwrap();
        assert!(!cs.install(&tmp2, &digest).unwrap());
        assert!(!tmp2.exists(), "duplicate temp file must be removed");
        let (blobs, strays) = cs.scan().unwrap();
        assert_eq!(blobs, vec![(digest, 3)]);
        assert!(strays.is_empty());
    }

    #[test]
    fn leftover_temp_files_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let cs = ContentStore::open(dir.path()).unwrap();
        cs.create_temp().unwrap();
        cs.create_temp().unwrap();
        assert_eq!(cs.remove_temp_files().unwrap(), 2);
        assert_eq!(fs::read_dir(cs.tmp_dir()).unwrap().count(), 0);
    }
}
