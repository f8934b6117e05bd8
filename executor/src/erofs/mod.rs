//! Mountable layers: a layer turned, in one streaming pass over its tar,
//! into an EROFS image that is mounted read-only as an overlay lower
//! instead of being unpacked file by file (docs/architecture.md,
//! "Mountable layers"; the choice of EROFS is in docs/decisions.md).
//!
//! [`ImageCache`] owns `<state>/images/v<FORMAT_VERSION>/`: one image per
//! layer, named after the layer's diff_id, and beside it the sha256 of the
//! image recorded when it was written. An image is verified against that
//! digest before every mount, so the kernel never parses bytes kiln did not
//! write or check (a truncated or corrupted image is removed and rebuilt,
//! never mounted).

pub mod from_tar;
pub mod mount;
pub mod writer;

use std::fs::{self, File};
use std::io;
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

#[derive(Debug, Clone)]
pub struct ImageCache {
    dir: PathBuf,
    tmp: PathBuf,
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
        Ok(ImageCache { dir, tmp })
    }

    pub fn image_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.erofs", diff_id.hex()))
    }

    fn digest_path(&self, diff_id: &Digest) -> PathBuf {
        self.dir.join(format!("{}.sha256", diff_id.hex()))
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
        let actual = match file_digest(&path) {
            Ok((d, size)) => Some((d, size)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(io_err(&path)(e)),
        };
        match (expected, actual) {
            (Some(exp), Some((act, size))) if exp == act => Ok(Some(Image {
                path,
                digest: act,
                size,
            })),
            (exp, act) => {
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
        let image = self.commit(tmp, diff_id, None)?;
        Ok((image, stats))
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
        let (digest, size) = match hashed {
            Some(d) => (
                d,
                fs::metadata(tmp.path()).map_err(io_err(tmp.path()))?.len(),
            ),
            None => file_digest(tmp.path()).map_err(io_err(tmp.path()))?,
        };
        use std::os::unix::fs::PermissionsExt;
        let _ = fs::set_permissions(tmp.path(), fs::Permissions::from_mode(0o444));
        let path = self.image_path(diff_id);
        tmp.persist(&path).map_err(|e| io_err(&path)(e.error))?;
        let dpath = self.digest_path(diff_id);
        let dtmp = self
            .tmp
            .join(format!("{}.sha256.{}", diff_id.hex(), std::process::id()));
        fs::write(&dtmp, format!("{digest}\n")).map_err(io_err(&dtmp))?;
        fs::rename(&dtmp, &dpath).map_err(io_err(&dpath))?;
        Ok(Image { path, digest, size })
    }
}
