//! OCI image layout directories (`oci-layout`, `index.json`,
//! `blobs/sha256/<hex>`), read as base images (`oci-layout://PATH[:REF]`)
//! and written as build outputs. Images are named by the
//! `org.opencontainers.image.ref.name` annotation of their `index.json`
//! entry. `index.json` is replaced atomically (write + rename), blobs are
//! written under their final name only after their digest was checked.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

use kiln_common::{Digest, Sha256Writer};

pub use super::platform::select_platform;
use super::types::{Descriptor, ImageConfig, Index, Manifest, media, to_canonical_json};
use super::{BlobSource, ImageDocuments, Platform};

pub const REF_NAME_ANNOTATION: &str = "org.opencontainers.image.ref.name";
pub const LAYOUT_SCHEME: &str = "oci-layout://";
const OCI_LAYOUT_FILE: &str = r#"{"imageLayoutVersion":"1.0.0"}"#;

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("OCI layout {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("OCI layout {path}: invalid JSON in {file}: {source}")]
    Json {
        path: PathBuf,
        file: String,
        source: serde_json::Error,
    },
    #[error("{0} is not an OCI image layout (no oci-layout file)")]
    NotALayout(PathBuf),
    #[error("OCI layout {path}: no image named {name:?} in index.json")]
    RefNotFound { path: PathBuf, name: String },
    #[error(
        "OCI layout {path}: index.json holds {count} images; name one with oci-layout://PATH:REF"
    )]
    Ambiguous { path: PathBuf, count: usize },
    #[error("OCI layout {path}: no manifest for platform {platform}")]
    NoPlatform { path: PathBuf, platform: String },
    #[error("OCI layout {path}: blob {digest} is missing")]
    MissingBlob { path: PathBuf, digest: Digest },
    #[error("OCI layout {path}: blob {digest} does not match its digest (got {actual})")]
    Corrupt {
        path: PathBuf,
        digest: Digest,
        actual: Digest,
    },
    #[error("OCI layout {path}: unsupported media type {media_type} for {digest}")]
    MediaType {
        path: PathBuf,
        media_type: String,
        digest: Digest,
    },
}

/// Splits `oci-layout://PATH[:REF]` (the scheme is optional) into the
/// directory and the optional reference name. A `:` belongs to the
/// reference only when it comes after the last `/`.
pub fn parse_layout_reference(s: &str) -> (PathBuf, Option<String>) {
    let s = s.strip_prefix(LAYOUT_SCHEME).unwrap_or(s);
    let last_slash = s.rfind('/').map(|i| i + 1).unwrap_or(0);
    match s[last_slash..].rfind(':') {
        Some(i) if i > 0 => {
            let at = last_slash + i;
            (PathBuf::from(&s[..at]), Some(s[at + 1..].to_string()))
        }
        _ => (PathBuf::from(s), None),
    }
}

/// An OCI image layout directory.
#[derive(Debug, Clone)]
pub struct OciLayout {
    root: PathBuf,
}

impl OciLayout {
    /// Opens an existing layout.
    pub fn open(path: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = path.into();
        if !root.join("oci-layout").is_file() {
            return Err(LayoutError::NotALayout(root));
        }
        Ok(OciLayout { root })
    }

    /// Opens a layout, creating the directory structure if it is missing.
    pub fn create(path: impl Into<PathBuf>) -> Result<Self, LayoutError> {
        let root = path.into();
        let blobs = root.join("blobs/sha256");
        fs::create_dir_all(&blobs).map_err(|e| io_err(&root, e))?;
        if !root.join("oci-layout").exists() {
            write_atomic(&root, "oci-layout", OCI_LAYOUT_FILE.as_bytes())?;
        }
        let layout = OciLayout { root };
        if !layout.root.join("index.json").exists() {
            layout.write_index(&Index::oci(Vec::new()))?;
        }
        Ok(layout)
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a blob in this layout (whether or not it exists).
    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.root
            .join("blobs")
            .join(digest.algorithm())
            .join(digest.hex())
    }

    pub fn index(&self) -> Result<Index, LayoutError> {
        let bytes = fs::read(self.root.join("index.json")).map_err(|e| io_err(&self.root, e))?;
        serde_json::from_slice(&bytes).map_err(|source| LayoutError::Json {
            path: self.root.clone(),
            file: "index.json".into(),
            source,
        })
    }

    fn write_index(&self, index: &Index) -> Result<(), LayoutError> {
        write_atomic(&self.root, "index.json", &to_canonical_json(index))
    }

    fn read_blob(&self, digest: &Digest) -> Result<Vec<u8>, LayoutError> {
        let bytes = fs::read(self.path(digest)).map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => LayoutError::MissingBlob {
                path: self.root.clone(),
                digest: digest.clone(),
            },
            _ => io_err(&self.root, e),
        })?;
        let actual = Digest::of_bytes(&bytes);
        if &actual != digest {
            return Err(LayoutError::Corrupt {
                path: self.root.clone(),
                digest: digest.clone(),
                actual,
            });
        }
        Ok(bytes)
    }

    fn parse<T: serde::de::DeserializeOwned>(
        &self,
        digest: &Digest,
        bytes: &[u8],
    ) -> Result<T, LayoutError> {
        serde_json::from_slice(bytes).map_err(|source| LayoutError::Json {
            path: self.root.clone(),
            file: format!("blobs/{}", digest.sharded_path().display()),
            source,
        })
    }

    /// Finds the image named `ref_name` (or the only image when `None`),
    /// descending into nested indexes to the manifest for `platform`.
    pub fn resolve(
        &self,
        ref_name: Option<&str>,
        platform: &Platform,
    ) -> Result<ImageDocuments, LayoutError> {
        let index = self.index()?;
        let entry = match ref_name {
            Some(name) => index
                .manifests
                .iter()
                .find(|d| ref_name_of(d) == Some(name))
                .ok_or_else(|| LayoutError::RefNotFound {
                    path: self.root.clone(),
                    name: name.to_string(),
                })?,
            None if index.manifests.len() == 1 => &index.manifests[0],
            None => {
                return Err(LayoutError::Ambiguous {
                    path: self.root.clone(),
                    count: index.manifests.len(),
                });
            }
        };
        let mut desc = entry.clone();
        // Bounded: an index pointing at itself must not loop forever.
        for _ in 0..8 {
            let bytes = self.read_blob(&desc.digest)?;
            if media::is_index(&desc.media_type) {
                let nested: Index = self.parse(&desc.digest, &bytes)?;
                desc = select_platform(&nested.manifests, platform)
                    .ok_or_else(|| LayoutError::NoPlatform {
                        path: self.root.clone(),
                        platform: platform.to_string(),
                    })?
                    .clone();
                continue;
            }
            if !media::is_manifest(&desc.media_type) {
                return Err(LayoutError::MediaType {
                    path: self.root.clone(),
                    media_type: desc.media_type.clone(),
                    digest: desc.digest.clone(),
                });
            }
            let manifest: Manifest = self.parse(&desc.digest, &bytes)?;
            let config_bytes = self.read_blob(&manifest.config.digest)?;
            let config: ImageConfig = self.parse(&manifest.config.digest, &config_bytes)?;
            return Ok(ImageDocuments {
                manifest_digest: desc.digest.clone(),
                manifest_media_type: desc.media_type.clone(),
                manifest_bytes: bytes,
                manifest,
                config_bytes,
                config,
            });
        }
        Err(LayoutError::MediaType {
            path: self.root.clone(),
            media_type: "index nested too deeply".into(),
            digest: desc.digest,
        })
    }

    /// Writes `bytes` as a blob (if absent) and returns its digest.
    pub fn put_bytes(&self, bytes: &[u8]) -> Result<Digest, LayoutError> {
        let digest = Digest::of_bytes(bytes);
        let dest = self.path(&digest);
        if !dest.exists() {
            let name = format!("blobs/sha256/{}", digest.hex());
            write_atomic(&self.root, &name, bytes)?;
        }
        Ok(digest)
    }

    /// Copies a blob from `source` into the layout: a hard link when both are
    /// on one filesystem, else a streamed copy checked against the digest.
    pub fn copy_blob(&self, digest: &Digest, source: &dyn BlobSource) -> Result<(), LayoutError> {
        let dest = self.path(digest);
        if dest.exists() {
            return Ok(());
        }
        let src = source
            .blob_path(digest)
            .ok_or_else(|| LayoutError::MissingBlob {
                path: self.root.clone(),
                digest: digest.clone(),
            })?;
        if fs::hard_link(&src, &dest).is_ok() {
            return Ok(());
        }
        let dir = self.root.join("blobs/sha256");
        let tmp = tempfile::Builder::new()
            .prefix(".tmp-")
            .tempfile_in(&dir)
            .map_err(|e| io_err(&self.root, e))?;
        let mut input = File::open(&src).map_err(|e| io_err(&src, e))?;
        let mut out = Sha256Writer::new(io::BufWriter::new(tmp.as_file()));
        io::copy(&mut input, &mut out).map_err(|e| io_err(&self.root, e))?;
        let (buf, actual, _) = out.finish();
        buf.into_inner()
            .map_err(|e| io_err(&self.root, e.into_error()))?;
        if &actual != digest {
            return Err(LayoutError::Corrupt {
                path: src,
                digest: digest.clone(),
                actual,
            });
        }
        tmp.as_file()
            .sync_all()
            .map_err(|e| io_err(&self.root, e))?;
        tmp.persist(&dest).map_err(|e| io_err(&dest, e.error))?;
        Ok(())
    }

    /// Adds an image (config, layers, manifest) and names it `ref_name` in
    /// `index.json`, replacing an earlier image of the same name.
    pub fn add_image(
        &self,
        image: &ImageDocuments,
        layers: &dyn BlobSource,
        ref_name: Option<&str>,
    ) -> Result<(), LayoutError> {
        for layer in &image.manifest.layers {
            self.copy_blob(&layer.digest, layers)?;
        }
        self.put_bytes(&image.config_bytes)?;
        self.put_bytes(&image.manifest_bytes)?;
        let mut desc = image.manifest_descriptor();
        if let Some(name) = ref_name {
            desc.annotations = Some([(REF_NAME_ANNOTATION.to_string(), name.to_string())].into());
        }
        let mut index = self.index()?;
        index.manifests.retain(|d| match ref_name {
            Some(name) => ref_name_of(d) != Some(name),
            None => d.digest != image.manifest_digest,
        });
        index.manifests.push(desc);
        self.write_index(&index)
    }

    /// Adds an index (a multi-platform image whose manifests are already in
    /// the layout) under `ref_name`, replacing an earlier one of that name.
    pub fn add_index(&self, index: &Index, ref_name: &str) -> Result<Descriptor, LayoutError> {
        for m in &index.manifests {
            if !self.path(&m.digest).is_file() {
                return Err(LayoutError::MissingBlob {
                    path: self.root.clone(),
                    digest: m.digest.clone(),
                });
            }
        }
        let bytes = to_canonical_json(index);
        let digest = self.put_bytes(&bytes)?;
        let mut desc = Descriptor::new(media::OCI_INDEX, digest, bytes.len() as u64);
        desc.annotations = Some([(REF_NAME_ANNOTATION.to_string(), ref_name.to_string())].into());
        let mut top = self.index()?;
        top.manifests.retain(|d| ref_name_of(d) != Some(ref_name));
        top.manifests.push(desc.clone());
        self.write_index(&top)?;
        Ok(desc)
    }
}

impl BlobSource for OciLayout {
    fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let p = self.path(digest);
        p.is_file().then_some(p)
    }
}

fn ref_name_of(d: &Descriptor) -> Option<&str> {
    d.annotations
        .as_ref()?
        .get(REF_NAME_ANNOTATION)
        .map(String::as_str)
}

fn io_err(path: &Path, source: io::Error) -> LayoutError {
    LayoutError::Io {
        path: path.to_path_buf(),
        source,
    }
}

fn write_atomic(root: &Path, name: &str, bytes: &[u8]) -> Result<(), LayoutError> {
    let dest = root.join(name);
    let dir = dest.parent().unwrap_or(root);
    let mut tmp = tempfile::Builder::new()
        .prefix(".tmp-")
        .tempfile_in(dir)
        .map_err(|e| io_err(root, e))?;
    tmp.write_all(bytes).map_err(|e| io_err(root, e))?;
    tmp.as_file().sync_all().map_err(|e| io_err(root, e))?;
    tmp.persist(&dest).map_err(|e| io_err(&dest, e.error))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::types::RootFs;
    use crate::store::LocalStore;

    fn sample_image(store: &LocalStore) -> ImageDocuments {
        let layer = b"not really a tar, but a blob";
        let d = store.put_bytes(layer).unwrap();
        let config = ImageConfig {
            architecture: "amd64".into(),
            os: "linux".into(),
            rootfs: RootFs {
                kind: "layers".into(),
                diff_ids: vec![d.clone()],
            },
            ..Default::default()
        };
        ImageDocuments::build(
            &config,
            vec![Descriptor::new(media::OCI_LAYER, d, layer.len() as u64)],
            false,
        )
    }

    #[test]
    fn layout_reference_splits_path_and_ref_name() {
        assert_eq!(
            parse_layout_reference("oci-layout:///a/b:v1"),
            (PathBuf::from("/a/b"), Some("v1".into()))
        );
        assert_eq!(
            parse_layout_reference("oci-layout://rel/dir"),
            (PathBuf::from("rel/dir"), None)
        );
        assert_eq!(
            parse_layout_reference("/a:b/dir"),
            (PathBuf::from("/a:b/dir"), None)
        );
    }

    #[test]
    fn written_image_reads_back_by_name_with_same_digests() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        let image = sample_image(&store);
        let layout = OciLayout::create(dir.path().join("layout")).unwrap();
        layout.add_image(&image, &store, Some("v1")).unwrap();
        layout.add_image(&image, &store, Some("v1")).unwrap();
        assert_eq!(
            layout.index().unwrap().manifests.len(),
            1,
            "same name replaces"
        );

        let again = OciLayout::open(dir.path().join("layout")).unwrap();
        let got = again
            .resolve(Some("v1"), &"linux/amd64".parse().unwrap())
            .unwrap();
        assert_eq!(got.manifest_digest, image.manifest_digest);
        assert_eq!(got.manifest.layers, image.manifest.layers);
        assert_eq!(got.config, image.config);
        assert!(again.path(&image.manifest.layers[0].digest).is_file());
        let text = fs::read_to_string(dir.path().join("layout/oci-layout")).unwrap();
        assert!(text.contains("imageLayoutVersion"));
    }

    #[test]
    fn unknown_name_and_missing_layout_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(matches!(
            OciLayout::open(dir.path()),
            Err(LayoutError::NotALayout(_))
        ));
        let layout = OciLayout::create(dir.path()).unwrap();
        let err = layout.resolve(Some("nope"), &Platform::host()).unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn corrupted_blob_is_detected_when_resolving() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        let image = sample_image(&store);
        let layout = OciLayout::create(dir.path().join("layout")).unwrap();
        layout.add_image(&image, &store, Some("v1")).unwrap();
        let cfg = layout.path(&image.manifest.config.digest);
        fs::remove_file(&cfg).unwrap();
        fs::write(&cfg, b"{}").unwrap();
        let err = layout
            .resolve(Some("v1"), &"linux/amd64".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, LayoutError::Corrupt { .. }), "{err}");
    }

    #[test]
    fn multi_platform_index_resolves_per_platform() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("store")).unwrap();
        let amd = sample_image(&store);
        let mut arm_config = amd.config.clone();
        arm_config.architecture = "arm64".into();
        arm_config.variant = Some("v8".into());
        let arm = ImageDocuments::build(&arm_config, amd.manifest.layers.clone(), false);
        let layout = OciLayout::create(dir.path().join("layout")).unwrap();
        layout.add_image(&amd, &store, None).unwrap();
        layout.add_image(&arm, &store, None).unwrap();
        let entry = |img: &ImageDocuments| Descriptor {
            platform: Some(img.config.platform()),
            ..img.manifest_descriptor()
        };
        let unknown = Descriptor::new(media::OCI_MANIFEST, Digest::of_bytes(b"absent"), 1);
        assert!(
            layout
                .add_index(&Index::oci(vec![entry(&amd), unknown]), "multi")
                .is_err()
        );
        layout
            .add_index(&Index::oci(vec![entry(&amd), entry(&arm)]), "multi")
            .unwrap();
        let got = layout
            .resolve(Some("multi"), &"linux/arm64".parse().unwrap())
            .unwrap();
        assert_eq!(got.manifest_digest, arm.manifest_digest);
        let got = layout
            .resolve(Some("multi"), &"linux/amd64".parse().unwrap())
            .unwrap();
        assert_eq!(got.manifest_digest, amd.manifest_digest);
        let err = layout
            .resolve(Some("multi"), &"linux/s390x".parse().unwrap())
            .unwrap_err();
        assert!(matches!(err, LayoutError::NoPlatform { .. }), "{err}");
    }

    #[test]
    fn index_entries_are_selected_by_platform() {
        let d = |s: &[u8], p: &str| Descriptor {
            platform: Some(p.parse().unwrap()),
            ..Descriptor::new(media::OCI_MANIFEST, Digest::of_bytes(s), 1)
        };
        let entries = vec![
            Descriptor::new(media::OCI_MANIFEST, Digest::of_bytes(b"attestation"), 1),
            d(b"amd", "linux/amd64"),
            d(b"arm", "linux/arm64/v8"),
        ];
        let got = select_platform(&entries, &"linux/arm64".parse().unwrap()).unwrap();
        assert_eq!(got.digest, Digest::of_bytes(b"arm"));
        assert!(select_platform(&entries, &"linux/s390x".parse().unwrap()).is_none());
    }
}
