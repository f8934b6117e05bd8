//! Mountable layers: a layer turned, in one streaming pass over its tar,
//! into an EROFS image that is mounted read-only as an overlay lower
//! instead of being unpacked file by file (docs/architecture.md,
//! "Mountable layers"; the choice of EROFS is in docs/decisions.md).
//!
//! [`ImageCache`] owns `<state>/images/v<FORMAT_VERSION>/`: one image per
//! layer, named after the layer's diff_id, and beside it the sha256 of the
//! image recorded when it was written. The kernel never parses bytes kiln
//! did not write or check: an image is hashed in full when it is adopted
//! (before it is stored), when it was written here (right after the build
//! that wrote it mounted it: [`ImageCache::place_unhashed`], then
//! [`ImageCache::record_hash`]; until then no other build sees it) and,
//! once per boot, before it is mounted again; a [`Stamp`] records
//! what the file looked like then (device, inode, size, mtime and ctime in
//! nanoseconds, the boot), and a later mount in the same boot whose file
//! still looks exactly like that skips the re-hash. Any write through the
//! filesystem changes the ctime, which no one can set back (utimensat sets
//! only atime and mtime), so a rewritten, truncated or replaced image is
//! hashed again and refused (removed and rebuilt, never mounted). What a
//! stamp cannot see is a change below the filesystem (media bit-rot, a raw
//! write to the block device); [`ImageCache::hash_every_mount`] (the
//! executor's `--rehash-layer-images`) hashes before every mount instead
//! (docs/security.md, "Layer images").

pub mod from_tar;
pub mod mount;
pub mod writer;

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use kiln_common::{Digest, Sha256Writer};

pub use from_tar::{ConvertError, ConvertStats, convert_layer};

/// Bumped whenever the writer's output for the same layer changes; part of
/// the image's local name and of its cache key.
pub const FORMAT_VERSION: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("layer image {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("converting layer {diff_id} to an image: {source}")]
    Convert {
        diff_id: Digest,
        #[source]
        source: ConvertError,
    },
    #[error("layer image {path} has digest {actual}, recorded {expected}: not mounted")]
    Corrupt {
        path: PathBuf,
        expected: Digest,
        actual: Digest,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> ImageError + '_ {
    move |source| ImageError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A verified image, ready to mount.
#[derive(Debug, Clone)]
pub struct Image {
    pub path: PathBuf,
    pub digest: Digest,
    pub size: u64,
}

/// A converted image not yet in the cache ([`ImageCache::convert_stream`]);
/// removed when dropped uncommitted.
#[derive(Debug)]
pub struct Converted {
    tmp: tempfile::NamedTempFile,
    pub stats: ConvertStats,
}

/// An image in place but not hashed yet ([`ImageCache::place_unhashed`]).
#[derive(Debug, Clone)]
pub struct Unhashed {
    pub path: PathBuf,
    pub size: u64,
}

#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    tmp: PathBuf,
    /// Whether a matching [`Stamp`] stands in for hashing the image again.
    trust_stamps: bool,
}

/// What an image file looked like right after it was hashed in full: if
/// it still looks the same, in the same boot, its bytes are the ones that
/// were hashed (see the module documentation for what this does and does
/// not cover).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    pub boot_id: String,
    pub digest: Digest,
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime_ns: i128,
    pub ctime_ns: i128,
}

impl Stamp {
    fn of(meta: &fs::Metadata, digest: &Digest, boot_id: &str) -> Self {
        let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
        Stamp {
            boot_id: boot_id.to_string(),
            digest: digest.clone(),
            dev: meta.dev(),
            ino: meta.ino(),
            size: meta.len(),
            mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
            ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
        }
    }

    /// The stamp file's text ([`Stamp::parse`] reads it back).
    pub fn render(&self) -> String {
        format!(
            "kiln-image-stamp v1\nboot {}\ndigest {}\ndev {}\nino {}\nsize {}\nmtime_ns {}\nctime_ns {}\n",
            self.boot_id, self.digest, self.dev, self.ino, self.size, self.mtime_ns, self.ctime_ns
        )
    }

    /// The stamp in `text`, or `None` when it is not one (a damaged stamp
    /// only costs a full hash).
    pub fn parse(text: &str) -> Option<Self> {
        let mut lines = text.lines();
        if lines.next()? != "kiln-image-stamp v1" {
            return None;
        }
        let mut field = |name: &str| {
            let line = lines.next()?;
            line.strip_prefix(name)?
                .strip_prefix(' ')
                .map(str::to_owned)
        };
        Some(Stamp {
            boot_id: field("boot")?,
            digest: field("digest")?.parse().ok()?,
            dev: field("dev")?.parse().ok()?,
            ino: field("ino")?.parse().ok()?,
            size: field("size")?.parse().ok()?,
            mtime_ns: field("mtime_ns")?.parse().ok()?,
            ctime_ns: field("ctime_ns")?.parse().ok()?,
        })
    }
}

/// This boot's id: a stamp from another boot is not trusted (what happened
/// to the disk while the machine was down, no ctime tells).
fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let id = id.trim();
    (!id.is_empty()).then(|| id.to_string())
}

/// The sha256 of a file's bytes and its length.
pub fn file_digest(path: &Path) -> io::Result<(Digest, u64)> {
    let mut f = File::open(path)?;
    let mut w = Sha256Writer::new(io::sink());
    io::copy(&mut f, &mut w)?;
    let (_, digest, len) = w.finish();
    Ok((digest, len))
}

impl ImageCache {
    /// Opens (creating) the image directory under `state_dir`.
    pub fn new(state_dir: &Path) -> Result<Self, ImageError> {
        let dir = state_dir.join("images").join(format!("v{FORMAT_VERSION}"));
        let tmp = state_dir.join("images").join("tmp");
        for d in [&dir, &tmp] {
            fs::create_dir_all(d).map_err(io_err(d))?;
        }
        Ok(ImageCache {
            dir,
            tmp,
            trust_stamps: true,
        })
    }

    /// This cache, hashing every image in full before each mount instead of
    /// trusting its stamp (`--rehash-layer-images`).
    pub fn hash_every_mount(mut self) -> Self {
        self.trust_stamps = false;
        self
    }

    pub fn image_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.erofs", diff_id.hex()))
    }

    fn digest_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.sha256", diff_id.hex()))
    }

    /// Where the [`Stamp`] of `diff_id`'s image is kept.
    pub fn stamp_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.stamp", diff_id.hex()))
    }

    /// Whether the image at `path` still looks as its stamp recorded it
    /// right after a full hash that found `digest`, in this boot.
    fn stamp_holds(&self, diff_id: &Digest, path: &Path, digest: &Digest) -> Option<u64> {
        if !self.trust_stamps {
            return None;
        }
        let boot = boot_id()?;
        let stamp = Stamp::parse(&fs::read_to_string(self.stamp_path(diff_id)).ok()?)?;
        let meta = fs::symlink_metadata(path).ok()?;
        (meta.is_file() && stamp == Stamp::of(&meta, digest, &boot)).then_some(meta.len())
    }

    /// Records what the image at `path` looks like now, after a full hash
    /// found `digest` while it looked like `before`; a file that changed
    /// meanwhile gets no stamp (the next mount hashes it again).
    fn write_stamp(&self, diff_id: &Digest, path: &Path, digest: &Digest, before: &fs::Metadata) {
        let Some(boot) = boot_id() else { return };
        let Ok(after) = fs::symlink_metadata(path) else {
            return;
        };
        let stamp = Stamp::of(&after, digest, &boot);
        if stamp != Stamp::of(before, digest, &boot) {
            return;
        }
        let spath = self.stamp_path(diff_id);
        let stmp = self
            .tmp
            .join(format!("{}.stamp.{}", diff_id.hex(), std::process::id()));
        if fs::write(&stmp, stamp.render()).is_err() || fs::rename(&stmp, &spath).is_err() {
            let _ = fs::remove_file(&stmp);
        }
    }

    /// The image of `diff_id` if one is stored and its bytes still have the
    /// digest recorded for them. A stored image that does not is removed
    /// and reported as [`ImageError::Corrupt`].
    pub fn verified(&self, diff_id: &Digest) -> Result<Option<Image>, ImageError> {
        let dpath = self.digest_path(diff_id);
        let recorded = match fs::read_to_string(&dpath) {
            Ok(s) => s,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&dpath)(e)),
        };
        let path = self.image_path(diff_id);
        let expected = recorded.trim().parse::<Digest>().ok();
        if let Some(exp) = &expected
            && let Some(size) = self.stamp_holds(diff_id, &path, exp)
        {
            return Ok(Some(Image {
                path,
                digest: exp.clone(),
                size,
            }));
        }
        let before = fs::symlink_metadata(&path).ok();
        let actual = match file_digest(&path) {
            Ok((d, size)) => Some((d, size)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        match (expected, actual) {
            (Some(exp), Some((act, size))) if exp == act => {
                if let Some(before) = &before {
                    self.write_stamp(diff_id, &path, &act, before);
                }
                Ok(Some(Image {
                    path,
                    digest: act,
                    size,
                }))
            }
            (exp, act) => {
                let _ = fs::remove_file(self.stamp_path(diff_id));
                let _ = fs::remove_file(&dpath);
                let _ = fs::remove_file(&path);
                let none = || Digest::of_bytes(b"");
                Err(ImageError::Corrupt {
                    path,
                    expected: exp.unwrap_or_else(none),
                    actual: act.map(|(d, _)| d).unwrap_or_else(none),
                })
            }
        }
    }

    /// Converts the layer blob at `blob` (verified against `diff_id` while
    /// it streams) into this cache's image for `diff_id`.
    pub fn convert(
        &self,
        blob: &Path,
        diff_id: &Digest,
        max_expanded_size: u64,
    ) -> Result<(Image, ConvertStats), ImageError> {
        let layer = File::open(blob).map_err(io_err(blob))?;
        let converted = self.convert_stream(layer, diff_id, max_expanded_size)?;
        let stats = converted.stats.clone();
        Ok((self.commit_converted(converted, diff_id)?, stats))
    }

    /// Converts a layer read from `layer` (compressed or not; verified
    /// against `diff_id` while it streams) into an image that is not in the
    /// cache yet: the caller commits it with [`Self::commit_converted`] once
    /// it knows the layer's bytes are the right ones (a download still
    /// checking their digest), or drops it, which removes it.
    pub fn convert_stream<R: io::Read + Send>(
        &self,
        layer: R,
        diff_id: &Digest,
        max_expanded_size: u64,
    ) -> Result<Converted, ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix("image-")
            .tempfile_in(&self.tmp)
            .map_err(io_err(&self.tmp))?;
        let out = tmp.reopen().map_err(io_err(tmp.path()))?;
        let (file, stats) = convert_layer(layer, Some(diff_id), out, &self.tmp, max_expanded_size)
            .map_err(|source| ImageError::Convert {
                diff_id: diff_id.clone(),
                source,
            })?;
        // No fsync: every mount verifies the image against the digest
        // recorded below, so an image a crash left incomplete is rebuilt,
        // never mounted; waiting for the disk here would double the cost.
        drop(file);
        Ok(Converted { tmp, stats })
    }

    /// Puts a converted image in place as the image of `diff_id` without
    /// hashing it: the process that wrote it may mount it now (the bytes
    /// are its own, in an owner-only directory), but [`Self::verified`]
    /// does not see it until [`Self::record_hash`] recorded its digest, so
    /// no other build mounts it before that (an image whose process died
    /// first is converted again).
    pub fn place_unhashed(
        &self,
        converted: Converted,
        diff_id: &Digest,
    ) -> Result<Unhashed, ImageError> {
        // An earlier image's digest and stamp must not vouch for these bytes.
        let _ = fs::remove_file(self.digest_path(diff_id));
        let _ = fs::remove_file(self.stamp_path(diff_id));
        use std::os::unix::fs::PermissionsExt;
        let tmp = converted.tmp;
        let _ = fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444));
        let path = self.image_path(diff_id);
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        let size = fs::metadata(&path).map_err(io_err(&path))?.len();
        Ok(Unhashed { path, size })
    }

    /// Hashes an image placed by [`Self::place_unhashed`] and records its
    /// digest and stamp: from then on it is a stored image like any other.
    pub fn record_hash(&self, diff_id: &Digest, placed: &Unhashed) -> Result<Image, ImageError> {
        let path = &placed.path;
        let before = fs::symlink_metadata(path).map_err(io_err(path))?;
        let (digest, size) = file_digest(path).map_err(io_err(path))?;
        self.write_stamp(diff_id, path, &digest, &before);
        let dpath = self.digest_path(diff_id);
        let dtmp = self
            .tmp
            .join(format!("{}.sha256.{}", diff_id.hex(), std::process::id()));
        fs::write(&dtmp, format!("{digest}\n")).map_err(io_err(&dtmp))?;
        fs::rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        Ok(Image {
            path: path.clone(),
            digest,
            size,
        })
    }

    /// Puts a converted image in place as the image of `diff_id`.
    pub fn commit_converted(
        &self,
        converted: Converted,
        diff_id: &Digest,
    ) -> Result<Image, ImageError> {
        self.commit(converted.tmp, diff_id, None)
    }

    /// Stores an image that came from elsewhere (the cache server), written
    /// to `tmp` (from [`ImageCache::temp_file`]), only if its bytes have
    /// `expected`.
    pub fn insert_verified(
        &self,
        tmp: tempfile::NamedTempFile,
        diff_id: &Digest,
        expected: &Digest,
    ) -> Result<Image, ImageError> {
        let (actual, _) = file_digest(tmp.path()).map_err(io_err(tmp.path()))?;
        if &actual != expected {
            return Err(ImageError::Corrupt {
                path: tmp.path().to_path_buf(),
                expected: expected.clone(),
                actual,
            });
        }
        self.commit(tmp, diff_id, Some(actual))
    }

    /// Moves a blob already verified as `digest` (a download in the local
    /// store, on the same filesystem) into place as the image of `diff_id`,
    /// hashing it again on the way.
    pub fn adopt(
        &self,
        blob: &Path,
        diff_id: &Digest,
        digest: &Digest,
    ) -> Result<Image, ImageError> {
        let tmp = tempfile::Builder::new()
            .prefix("adopt-")
            .tempfile_in(&self.tmp)
            .map_err(io_err(&self.tmp))?;
        fs::rename(blob, tmp.path()).map_err(io_err(blob))?;
        self.insert_verified(tmp, diff_id, digest)
    }

    /// A temporary file in this cache's directory, for [`Self::insert_verified`].
    pub fn temp_file(&self) -> Result<tempfile::NamedTempFile, ImageError> {
        tempfile::Builder::new()
            .prefix("download-")
            .tempfile_in(&self.tmp)
            .map_err(io_err(&self.tmp))
    }

    /// Hashes the finished image (unless the caller just did), then renames
    /// it into place and records its digest (digest file last: its presence
    /// means a complete image).
    fn commit(
        &self,
        tmp: tempfile::NamedTempFile,
        diff_id: &Digest,
        hashed: Option<Digest>,
    ) -> Result<Image, ImageError> {
        let hashed_meta = fs::symlink_metadata(tmp.path()).map_err(io_err(tmp.path()))?;
        let (digest, size) = match hashed {
            Some(d) => (
                d,
                fs::metadata(tmp.path()).map_err(io_err(tmp.path()))?.len(),
            ),
            None => file_digest(tmp.path()).map_err(io_err(tmp.path()))?,
        };
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444));
        // Changing the mode and renaming change the ctime: the stamp is
        // taken of the file in place, compared with the file as hashed
        // (less its ctime, which only the kernel sets).
        let path = self.image_path(diff_id);
        let _ = fs::remove_file(self.stamp_path(diff_id));
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        if let Ok(now) = fs::symlink_metadata(&path)
            && (
                now.dev(),
                now.ino(),
                now.len(),
                now.mtime(),
                now.mtime_nsec(),
            ) == (
                hashed_meta.dev(),
                hashed_meta.ino(),
                hashed_meta.len(),
                hashed_meta.mtime(),
                hashed_meta.mtime_nsec(),
            )
        {
            self.write_stamp(diff_id, &path, &digest, &now);
        }
        let dpath = self.digest_path(diff_id);
        let dtmp = self
            .tmp
            .join(format!("{}.sha256.{}", diff_id.hex(), std::process::id()));
        fs::write(&dtmp, format!("{digest}\n")).map_err(io_err(&dtmp))?;
        fs::rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        Ok(Image { path, digest, size })
    }
}
