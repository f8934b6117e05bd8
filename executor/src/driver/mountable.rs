//! The mountable path for read-only layers: under `--isolation chroot` with
//! the overlay snapshotter, a base or cached layer becomes an EROFS image
//! (kept in `<cache-dir>/images/`, keyed by its diff_id and the image
//! format version) mounted read-only as its overlay lower, instead of being
//! unpacked file by file. Every image mount belongs to this build and goes
//! in [`Driver::unmount_layers`]. Any failure to convert or mount falls
//! back to unpacking, which also gives a hostile layer its usual error.

use super::*;
use crate::erofs::{Converted, Image, ImageCache, Unhashed, mount};

/// The media type of a layer image's cache entry.
pub(super) const IMAGE_MEDIA_TYPE: &str = "application/vnd.kiln.layer.erofs.v1";

/// The cache key of a layer's image (kiln_common's derived-artifact keys).
pub(super) fn image_key(diff_id: &Digest) -> CacheKey {
    kiln_common::cache_key::derived_artifact_key(
        "erofs",
        diff_id,
        u64::from(crate::erofs::FORMAT_VERSION),
    )
}

/// The cache entry of `image`, the image of layer `diff_id`.
fn image_entry(diff_id: &Digest, image: &Image) -> CacheEntry {
    CacheEntry {
        layer: Some(LayerDescriptor {
            media_type: IMAGE_MEDIA_TYPE.to_string(),
            digest: image.digest.clone(),
            size: image.size,
            diff_id: diff_id.clone(),
        }),
        created_by: format!(
            "kiln: EROFS image v{} of layer {diff_id}",
            crate::erofs::FORMAT_VERSION
        ),
        created: rfc3339(unix_now()),
        extra: Default::default(),
    }
}

/// This build's mounted layer images.
#[derive(Default)]
pub(super) struct LayerMounts {
    pub(super) images: Option<ImageCache>,
    /// diff_id -> mount point, mounted once per build.
    pub(super) mounted: HashMap<Digest, PathBuf>,
    /// Layer images that stages building at once mounted twice (each at
    /// its own place); unmounted with the others.
    pub(super) extra: Vec<PathBuf>,
}

impl Driver {
    /// The mounted image of `layer` as an overlay lower, or `None` when the
    /// mountable path is off or did not work (the caller unpacks).
    pub(super) fn mounted_layer(&mut self, layer: &LayerRef) -> Option<PathBuf> {
        let images = self.mounts.images.clone()?;
        if let Some(dir) = self.mounts.mounted.get(&layer.diff_id) {
            return Some(dir.clone());
        }
        match self.mount_layer_image(&images, layer) {
            Ok(dir) => Some(dir),
            Err(e) => {
                self.log(&format!(
                    "layer {}: not mounted as an image, unpacking instead: {e}",
                    layer.desc.digest
                ));
                None
            }
        }
    }

    fn mount_layer_image(
        &mut self,
        images: &ImageCache,
        layer: &LayerRef,
    ) -> Result<PathBuf, String> {
        let started = Instant::now();
        let local = match images.verified(&layer.diff_id) {
            Ok(found) => found,
            Err(e) => {
                self.log(&format!(
                    "layer {}: {e}; building it again",
                    layer.desc.digest
                ));
                None
            }
        };
        let downloaded = match local {
            Some(_) => None,
            None => self.image_from_cache(images, layer),
        };
        let (path, size, name, how, placed) = match (local, downloaded) {
            (Some(image), _) => (
                image.path,
                image.size,
                image.digest.to_string(),
                "from the local image cache".to_string(),
                None,
            ),
            (None, Some(image)) => (
                image.path,
                image.size,
                image.digest.to_string(),
                "downloaded from the cache".to_string(),
                None,
            ),
            (None, None) => {
                let converted = match self.convert_while_pulling(images, layer) {
                    Some(done) => done?,
                    None => {
                        self.ensure_blob(layer)?;
                        let blob = fs::File::open(&layer.blob)
                            .map_err(|e| format!("{}: {e}", layer.blob.display()))?;
                        images
                            .convert_stream(blob, &layer.diff_id, self.services.unpack_limit)
                            .map_err(|e| e.to_string())?
                    }
                };
                for w in &converted.stats.warnings {
                    self.log(&format!("layer {}: {w}", layer.desc.digest));
                }
                let how = format!(
                    "converted {} entries in {} ms, hashed in the background",
                    converted.stats.entries,
                    started.elapsed().as_millis()
                );
                // Mounted before it is hashed: the bytes are the ones this
                // process just wrote; the hash (for the record, the stamp
                // and the cache server) runs beside the build's steps.
                let placed = images
                    .place_unhashed(converted, &layer.diff_id)
                    .map_err(|e| e.to_string())?;
                let name = format!("of layer {}", layer.diff_id);
                (placed.path.clone(), placed.size, name, how, Some(placed))
            }
        };
        let dir = self.work.join("layer-mounts").join(layer.diff_id.hex());
        fs::create_dir_all(&dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        if let Err(e) = mount::mount_image(&path, &dir) {
            if placed.is_some() {
                // Not hashed, so no build would ever mount it: not kept.
                let _ = fs::remove_file(&path);
            }
            return Err(format!("mounting {}: {e}", path.display()));
        }
        if let Some(placed) = placed {
            self.hash_and_share_image(images, layer, placed);
        }
        self.log(&format!(
            "layer {}: mounted image {name} ({size} bytes, {how}) in {} ms",
            layer.desc.digest,
            started.elapsed().as_millis()
        ));
        self.mounts
            .mounted
            .insert(layer.diff_id.clone(), dir.clone());
        Ok(dir)
    }

    /// Pulls a base layer from its registry and converts it in the same
    /// pass: the download is written to the store (hashed as it goes, and
    /// committed only if it has the layer's digest) while the same bytes are
    /// decompressed (and checked against the diff_id) on one thread and
    /// written into the image on another, so the layer costs about the
    /// slowest of download, decompression and image writes instead of their
    /// sum. The image is committed only when both checks passed; otherwise
    /// it is removed, and a blob that does not match is never stored.
    /// `None` when this does not apply (the blob is here already, the layer
    /// is not a registry base, or the cache may have it: then the usual
    /// fetch, which asks the cache first) or the download failed (the usual
    /// fetch retries it).
    fn convert_while_pulling(
        &mut self,
        images: &ImageCache,
        layer: &LayerRef,
    ) -> Option<Result<Converted, String>> {
        if layer.blob.is_file() {
            return None;
        }
        let (pulled, base_layer) = self.resolved.base_layers.get(&layer.desc.digest).cloned()?;
        if let Some(cache) = self
            .services
            .cache
            .clone()
            .filter(|_| self.opts.cache.mode.reads())
            && !matches!(cache.has_blob(&layer.desc.digest), Ok(false))
        {
            return None;
        }
        let digest = &layer.desc.digest;
        self.log(&format!(
            "pulling layer {digest} ({} bytes), converting it as it downloads",
            layer.desc.size
        ));
        let _progress = self.opts.log.progress(
            &format!("pulling layer {digest}"),
            Some(layer.desc.size),
            crate::log::bytes_received(),
        );
        let (tx, rx) = std::sync::mpsc::sync_channel(8);
        let (diff_id, limit) = (&layer.diff_id, self.services.unpack_limit);
        let (fetched, converted) = std::thread::scope(|scope| {
            let converter = scope.spawn(move || {
                images
                    .convert_stream(crate::build::unpack::ChannelReader::new(rx), diff_id, limit)
                    .map_err(|e| e.to_string())
            });
            let fetched = self
                .services
                .runtime
                .block_on(self.services.client.fetch_blob_teed(
                    &pulled,
                    &base_layer.desc,
                    &self.services.store,
                    tx,
                ));
            let converted = converter
                .join()
                .unwrap_or_else(|_| Err("the conversion thread panicked".to_string()));
            (fetched, converted)
        });
        if let Err(e) = fetched {
            self.log(&format!(
                "layer {digest}: pulling while converting failed ({e}); pulling it again"
            ));
            return None;
        }
        fetch::share_base_layer(
            &self.services.store,
            &mut self.uploader,
            &pulled,
            &base_layer,
        );
        Some(converted)
    }

    /// Whether images go to and come from the cache: only a cache server.
    /// The embedded cache is on this node's `--cache-dir` already, where
    /// the image cache keeps images itself (a second copy would be waste).
    fn shares_images(&self) -> bool {
        self.services.cache.is_some() && !self.opts.cache.servers.is_empty()
    }

    /// The layer's image from the cache server, verified (against the
    /// entry's digest while it downloads, and again before it is stored).
    fn image_from_cache(&mut self, images: &ImageCache, layer: &LayerRef) -> Option<Image> {
        if !self.shares_images() || !self.opts.cache.mode.reads() {
            return None;
        }
        let cache = self.services.cache.clone()?;
        let key = image_key(&layer.diff_id);
        let entry = match cache.lookup(&[key]) {
            Ok(mut found) => found.remove(&key)?,
            Err(e) => {
                self.log(&format!(
                    "warning: looking up the image of layer {}: {e}",
                    layer.desc.digest
                ));
                return None;
            }
        };
        let desc = entry
            .layer
            .filter(|d| d.media_type == IMAGE_MEDIA_TYPE && d.diff_id == layer.diff_id)?;
        let fetched = cache
            .fetch_blob(&desc.digest, desc.size, &self.services.store)
            .map_err(|e| e.to_string())
            .and_then(|path| {
                images
                    .adopt(&path, &layer.diff_id, &desc.digest)
                    .map_err(|e| e.to_string())
            });
        match fetched {
            Ok(image) => {
                self.record.bytes_downloaded += image.size;
                Some(image)
            }
            Err(e) => {
                self.log(&format!(
                    "warning: the cache's image of layer {} is not usable: {e}",
                    layer.desc.digest
                ));
                None
            }
        }
    }

    /// Hashes a freshly converted, already mounted image and records its
    /// digest, then uploads it with its entry (docs/cache-api.md, "Layer
    /// images"), all on a background thread that the build waits for with
    /// its uploads. Only layers the cluster shares through the cache anyway
    /// are uploaded (base layers from a registry, cache hits); a local
    /// `oci-layout://` or `docker-archive://` base stays local, like its
    /// layers.
    fn hash_and_share_image(&mut self, images: &ImageCache, layer: &LayerRef, placed: Unhashed) {
        let shared =
            self.resolved.base_layers.contains_key(&layer.desc.digest) || layer.hit.is_some();
        let cache = self
            .uploader
            .cache()
            .filter(|_| shared && self.shares_images());
        let images = images.clone();
        let diff_id = layer.diff_id.clone();
        let key = image_key(&diff_id);
        self.uploader.spawn(move || {
            let started = Instant::now();
            let image = images.record_hash(&diff_id, &placed).map_err(|e| {
                crate::cache::CacheError::Blob {
                    digest: diff_id.clone(),
                    message: format!("hashing the layer image: {e}"),
                }
            })?;
            let mut bytes = 0;
            if let Some(cache) = cache {
                cache.put_blob(&image.digest, &image.path)?;
                cache.put_entry(&key, &image_entry(&diff_id, &image))?;
                bytes = image.size;
            }
            Ok(UploadDone {
                key,
                bytes,
                millis: started.elapsed().as_millis() as u64,
            })
        });
    }

    /// Unmounts every layer image this build mounted (after the overlays
    /// over them are gone).
    pub(super) fn unmount_layers(&mut self) {
        for (_, dir) in self.mounts.mounted.drain() {
            if let Err(e) = mount::unmount(&dir) {
                tracing::warn!("unmounting layer image at {}: {e}", dir.display());
            }
        }
    }
}
