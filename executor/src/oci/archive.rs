//! `docker load` tarballs (`--tar-path`). The archive holds `manifest.json`
//! (Docker's format: config path, repo tags, layer paths) and, beside it, a
//! complete OCI layout (`oci-layout`, `index.json`, `blobs/sha256/...`) whose
//! blob files the `manifest.json` points into, as Docker 25+ writes it, so
//! both `docker load` and OCI tools read the same file. Layers are streamed
//! from their files into the tar; nothing is held in memory.
//!
//! Such tarballs (from `docker save`, skopeo or kiln) are also read back as
//! base images ([`read_docker_archive`]), streaming each member once into
//! the local store.

use std::fs::File;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};

use kiln_common::Digest;
use serde::Serialize;

use super::layout::REF_NAME_ANNOTATION;
use super::reference::{DOCKER_HUB, ImageRef};
use super::types::{Index, to_canonical_json};
use super::{BlobSource, ImageDocuments};

#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    #[error("image archive {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("writing image archive: blob {0} is not available locally")]
    MissingBlob(Digest),
    #[error("image archive {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

#[derive(Serialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestEntry {
    config: String,
    repo_tags: Vec<String>,
    layers: Vec<String>,
}

fn blob_name(d: &Digest) -> String {
    format!("blobs/sha256/{}", d.hex())
}

/// Writes `image` as a `docker load` tarball to `out`, tagged with `tags`
/// (written the way `docker load` expects: `docker.io/library/x:t` becomes
/// `x:t`).
pub fn write_docker_archive<W: Write>(
    out: W,
    image: &ImageDocuments,
    layers: &dyn BlobSource,
    tags: &[ImageRef],
) -> io::Result<W> {
    let mut tar = tar::Builder::new(out);
    tar.mode(tar::HeaderMode::Deterministic);
    let append_bytes = |tar: &mut tar::Builder<W>, name: &str, bytes: &[u8]| {
        let mut h = tar::Header::new_ustar();
        h.set_size(bytes.len() as u64);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, name, bytes)
    };
    let append_dir = |tar: &mut tar::Builder<W>, name: &str| {
        let mut h = tar::Header::new_ustar();
        h.set_size(0);
        h.set_mode(0o755);
        h.set_entry_type(tar::EntryType::Directory);
        tar.append_data(&mut h, name, io::empty())
    };
    append_dir(&mut tar, "blobs/")?;
    append_dir(&mut tar, "blobs/sha256/")?;
    let mut seen = std::collections::HashSet::new();
    for layer in &image.manifest.layers {
        if !seen.insert(layer.digest.clone()) {
            continue;
        }
        let path = layers.blob_path(&layer.digest).ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::NotFound,
                ArchiveError::MissingBlob(layer.digest.clone()),
            )
        })?;
        let file = File::open(&path)?;
        let len = file.metadata()?.len();
        let mut h = tar::Header::new_ustar();
        h.set_size(len);
        h.set_mode(0o644);
        h.set_entry_type(tar::EntryType::Regular);
        tar.append_data(&mut h, blob_name(&layer.digest), file)?;
    }
    append_bytes(
        &mut tar,
        &blob_name(&image.manifest.config.digest),
        &image.config_bytes,
    )?;
    append_bytes(
        &mut tar,
        &blob_name(&image.manifest_digest),
        &image.manifest_bytes,
    )?;

    let repo_tags: Vec<String> = tags.iter().map(docker_tag).collect();
    let manifest_json = vec![DockerManifestEntry {
        config: blob_name(&image.manifest.config.digest),
        repo_tags: repo_tags.clone(),
        layers: image
            .manifest
            .layers
            .iter()
            .map(|l| blob_name(&l.digest))
            .collect(),
    }];
    append_bytes(
        &mut tar,
        "manifest.json",
        &to_canonical_json(&manifest_json),
    )?;

    let mut desc = image.manifest_descriptor();
    if let Some(first) = tags.first() {
        let mut ann = std::collections::BTreeMap::new();
        ann.insert("io.containerd.image.name".to_string(), first.to_string());
        if let Some(t) = first.tag() {
            ann.insert(REF_NAME_ANNOTATION.to_string(), t.to_string());
        }
        desc.annotations = Some(ann);
    }
    append_bytes(
        &mut tar,
        "index.json",
        &to_canonical_json(&Index::oci(vec![desc])),
    )?;
    append_bytes(&mut tar, "oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#)?;
    tar.into_inner()
}

/// Writes the archive to `path` (through a temporary file renamed into
/// place, so a failed write never leaves a truncated tarball).
pub fn write_docker_archive_file(
    path: &Path,
    image: &ImageDocuments,
    layers: &dyn BlobSource,
    tags: &[ImageRef],
) -> Result<(), ArchiveError> {
    let err = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let tmp = tempfile::Builder::new()
        .prefix(".kiln-archive-")
        .tempfile_in(dir)
        .map_err(err)?;
    let out = io::BufWriter::with_capacity(1 << 20, tmp.as_file());
    let out = write_docker_archive(out, image, layers, tags).map_err(err)?;
    out.into_inner().map_err(|e| err(e.into_error()))?;
    tmp.as_file().sync_all().map_err(err)?;
    tmp.persist(path).map_err(|e| err(e.error))?;
    Ok(())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct DockerManifestIn {
    config: String,
    #[serde(default)]
    repo_tags: Option<Vec<String>>,
    layers: Vec<String>,
}

/// Reads a `docker save` / `docker load` tarball (as written by Docker or
/// by [`write_docker_archive`]) as a base image: every file of the archive
/// is streamed once into `store` under its digest (the archive's
/// `manifest.json` may come last, so nothing is known in advance), then the
/// image named `tag` (or the only one) is assembled into an OCI manifest
/// whose layers point at those blobs. Layers keep their compression; their
/// media type says which.
pub fn read_docker_archive(
    path: &Path,
    store: &crate::store::LocalStore,
    tag: Option<&str>,
) -> Result<ImageDocuments, ArchiveError> {
    use super::types::{Descriptor, ImageConfig, media};
    let io_err = |source| ArchiveError::Io {
        path: path.to_path_buf(),
        source,
    };
    let invalid = |reason: String| ArchiveError::Invalid {
        path: path.to_path_buf(),
        reason,
    };
    let file = File::open(path).map_err(io_err)?;
    let mut archive = tar::Archive::new(io::BufReader::with_capacity(1 << 20, file));
    let mut files: std::collections::HashMap<String, (Digest, u64)> =
        std::collections::HashMap::new();
    let mut manifest_json = None;
    for entry in archive.entries().map_err(io_err)? {
        let mut entry = entry.map_err(io_err)?;
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let name = String::from_utf8_lossy(&entry.path_bytes())
            .trim_start_matches("./")
            .to_string();
        if name == "manifest.json" {
            let mut buf = Vec::new();
            io::Read::take(&mut entry, 8 << 20)
                .read_to_end(&mut buf)
                .map_err(io_err)?;
            manifest_json = Some(buf);
            continue;
        }
        let mut w = store.writer()?;
        io::copy(&mut entry, &mut w).map_err(io_err)?;
        files.insert(name, w.commit_computed()?);
    }
    let manifest_json = manifest_json.ok_or_else(|| invalid("no manifest.json".into()))?;
    let entries: Vec<DockerManifestIn> = serde_json::from_slice(&manifest_json)
        .map_err(|e| invalid(format!("manifest.json: {e}")))?;
    let entry = match tag {
        Some(t) => entries
            .iter()
            .find(|e| e.repo_tags.iter().flatten().any(|rt| same_tag(rt, t)))
            .ok_or_else(|| invalid(format!("no image tagged {t}")))?,
        None if entries.len() == 1 => &entries[0],
        None => {
            return Err(invalid(format!(
                "{} images; name one by its tag",
                entries.len()
            )));
        }
    };
    let lookup = |name: &str| {
        files
            .get(name.trim_start_matches("./"))
            .cloned()
            .ok_or_else(|| {
                invalid(format!(
                    "manifest.json names {name}, which is not in the archive"
                ))
            })
    };
    let (config_digest, _) = lookup(&entry.config)?;
    let config_bytes = store.read_small(&config_digest)?;
    let config: ImageConfig = serde_json::from_slice(&config_bytes)
        .map_err(|e| invalid(format!("config {}: {e}", entry.config)))?;
    let mut layers = Vec::new();
    for name in &entry.layers {
        let (digest, size) = lookup(name)?;
        let mut magic = [0u8; 4];
        let n = io::Read::read(&mut store.open(&digest)?, &mut magic).map_err(io_err)?;
        let media_type = match &magic[..n] {
            [0x1f, 0x8b, ..] => media::OCI_LAYER_GZIP,
            [0x28, 0xb5, 0x2f, 0xfd] => media::OCI_LAYER_ZSTD,
            _ => media::OCI_LAYER,
        };
        layers.push(Descriptor::new(media_type, digest, size));
    }
    // The config bytes are kept as they are: its digest is the image ID.
    let mut image = ImageDocuments::build(&config, layers, false);
    image.config_bytes = config_bytes;
    image.manifest.config.digest = config_digest;
    image.manifest.config.size = image.config_bytes.len() as u64;
    image.manifest_bytes = super::to_canonical_json(&image.manifest);
    image.manifest_digest = Digest::of_bytes(&image.manifest_bytes);
    Ok(image)
}

/// Tags compare after Docker's normalisation: `busybox:1` and
/// `docker.io/library/busybox:1` are the same tag.
fn same_tag(a: &str, b: &str) -> bool {
    match (ImageRef::parse(a), ImageRef::parse(b)) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Docker's short form of a tag: no `docker.io/`, no `library/`.
fn docker_tag(r: &ImageRef) -> String {
    let name = if r.registry() == DOCKER_HUB {
        r.repository()
            .strip_prefix("library/")
            .unwrap_or(r.repository())
            .to_string()
    } else {
        r.name()
    };
    format!("{name}:{}", r.tag().unwrap_or("latest"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oci::types::{Descriptor, ImageConfig, media};
    use crate::store::LocalStore;
    use std::io::Read;

    #[test]
    fn archive_has_manifest_json_pointing_at_blobs_with_short_tags() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("s")).unwrap();
        let layer = store.put_bytes(b"layer bytes").unwrap();
        let image = ImageDocuments::build(
            &ImageConfig::default(),
            vec![Descriptor::new(media::OCI_LAYER, layer.clone(), 11)],
            false,
        );
        let path = dir.path().join("img.tar");
        let tags = [
            ImageRef::parse("busybox:v1").unwrap(),
            ImageRef::parse("localhost:5000/a/b").unwrap(),
        ];
        write_docker_archive_file(&path, &image, &store, &tags).unwrap();

        let mut files = std::collections::HashMap::new();
        let mut ar = tar::Archive::new(File::open(&path).unwrap());
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut s = Vec::new();
            e.read_to_end(&mut s).unwrap();
            files.insert(e.path().unwrap().to_string_lossy().into_owned(), s);
        }
        let m: serde_json::Value = serde_json::from_slice(&files["manifest.json"]).unwrap();
        assert_eq!(
            m[0]["RepoTags"],
            serde_json::json!(["busybox:v1", "localhost:5000/a/b:latest"])
        );
        let cfg = m[0]["Config"].as_str().unwrap();
        assert_eq!(Digest::of_bytes(&files[cfg]), image.manifest.config.digest);
        let l0 = m[0]["Layers"][0].as_str().unwrap();
        assert_eq!(files[l0], b"layer bytes");
        assert_eq!(
            Digest::of_bytes(&files[&blob_name(&image.manifest_digest)]),
            image.manifest_digest
        );
    }

    #[test]
    fn archive_written_by_kiln_reads_back_as_the_same_image() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("s")).unwrap();
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(b"pretend tar").unwrap();
        let gz = gz.finish().unwrap();
        let layer = store.put_bytes(&gz).unwrap();
        let config = ImageConfig {
            os: "linux".into(),
            architecture: "amd64".into(),
            ..Default::default()
        };
        let image = ImageDocuments::build(
            &config,
            vec![Descriptor::new(
                media::OCI_LAYER_GZIP,
                layer.clone(),
                gz.len() as u64,
            )],
            false,
        );
        let path = dir.path().join("img.tar");
        let tags = [ImageRef::parse("localhost:5000/a:v1").unwrap()];
        write_docker_archive_file(&path, &image, &store, &tags).unwrap();

        let other = LocalStore::new(dir.path().join("other")).unwrap();
        let back = read_docker_archive(&path, &other, Some("localhost:5000/a:v1")).unwrap();
        assert_eq!(back.manifest_digest, image.manifest_digest);
        assert_eq!(back.manifest.layers, image.manifest.layers);
        assert!(other.contains(&layer));
        let err = read_docker_archive(&path, &other, Some("nope:1")).unwrap_err();
        assert!(err.to_string().contains("nope:1"), "{err}");
    }

    #[test]
    fn archive_without_manifest_json_is_rejected() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.tar");
        let mut b = tar::Builder::new(File::create(&path).unwrap());
        let mut h = tar::Header::new_gnu();
        h.set_size(1);
        h.set_mode(0o644);
        h.set_cksum();
        b.append_data(&mut h, "x", &b"x"[..]).unwrap();
        b.finish().unwrap();
        let store = LocalStore::new(dir.path().join("s")).unwrap();
        let err = read_docker_archive(&path, &store, None).unwrap_err();
        assert!(err.to_string().contains("no manifest.json"), "{err}");
    }

    #[test]
    fn missing_layer_fails_without_leaving_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path().join("s")).unwrap();
        let image = ImageDocuments::build(
            &ImageConfig::default(),
            vec![Descriptor::new(
                media::OCI_LAYER,
                Digest::of_bytes(b"absent"),
                6,
            )],
            false,
        );
        let path = dir.path().join("img.tar");
        let err = write_docker_archive_file(&path, &image, &store, &[]).unwrap_err();
        assert!(
            err.to_string()
                .contains(&Digest::of_bytes(b"absent").to_string()),
            "{err}"
        );
        assert!(!path.exists());
    }
}
