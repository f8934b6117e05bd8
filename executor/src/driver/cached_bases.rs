//! Base images pinned by digest, resolved from the cache: a `FROM
//! name@sha256:…` (or `name:tag@sha256:…`) base names its documents by
//! content, so the index (if any), manifest and config are blobs the cache
//! can hold like layers, each kept by an entry under [`document_key`]
//! (docs/executor-cache.md, "Base images pinned by digest"). A fresh
//! executor with a warm cache then needs no registry at all: the documents
//! come from the cache, verified against the digests that name them, and
//! the layers (or their mountable images) as for any base.
//!
//! A tag is never resolved from the cache: only the registry knows what it
//! points at now, and a cache answer could be stale, so a tag reference
//! still needs the registry, and its error says so when it is down.

use super::*;
use crate::oci::layout::select_platform;
use crate::oci::{ImageConfig, Index, Manifest, media};
use crate::registry::RegistryError;
use crate::registry::client::{MAX_CONFIG_SIZE, MAX_MANIFEST_SIZE, PulledImage};

/// The key of the entry that keeps one base-image document (index,
/// manifest or config) in the cache, by the document's digest. Its
/// `layer` descriptor names the blob: the document's media type as the
/// registry served it, its digest, its size, and `diffId` equal to the
/// digest (a document has no uncompressed form).
pub(super) fn document_key(digest: &Digest) -> CacheKey {
    kiln_common::cache_key::CacheKeyBuilder::new()
        .str("kind", "base image document")
        .digest("document", digest)
        .finish()
}

/// Why a document could not be had from the cache (logged; the registry
/// is asked instead).
type Miss = String;

impl Driver {
    /// The base `r` resolved from the cache, when it is pinned by digest
    /// and the cache holds its documents; `None` otherwise (the registry
    /// resolves it).
    pub(super) fn base_from_cache(&mut self, r: &ImageRef) -> Option<PulledImage> {
        let digest = r.digest()?.clone();
        if !self.opts.cache.mode.reads() {
            return None;
        }
        let cache = self.services.cache.clone()?;
        match self.documents_from_cache(cache.as_ref(), &digest) {
            Ok(docs) => {
                self.log(&format!(
                    "resolved {r} from the cache (pinned by digest: manifest {}, config {})",
                    docs.manifest_digest, docs.manifest.config.digest
                ));
                Some(self.services.client.pulled_from_documents(r, docs))
            }
            Err(why) => {
                self.log(&format!(
                    "base {r}: not resolved from the cache ({why}); asking the registry"
                ));
                None
            }
        }
    }

    /// One document by digest: its entry (for the media type and size),
    /// then its blob, which the cache checks against the digest as it
    /// copies it into the store.
    fn cached_document(
        &self,
        cache: &dyn Cache,
        digest: &Digest,
        max_size: u64,
    ) -> Result<(String, Vec<u8>), Miss> {
        let key = document_key(digest);
        let entry = cache
            .lookup(&[key])
            .map_err(|e| e.to_string())?
            .remove(&key)
            .ok_or_else(|| format!("no entry for {digest}"))?;
        let desc = entry
            .layer
            .filter(|d| &d.digest == digest)
            .ok_or_else(|| format!("the entry for {digest} names another blob"))?;
        if desc.size > max_size {
            return Err(format!(
                "{digest}: {} bytes, more than a document may have",
                desc.size
            ));
        }
        cache
            .fetch_blob(digest, desc.size, &self.services.store)
            .map_err(|e| e.to_string())?;
        let bytes = self
            .services
            .store
            .read_small(digest)
            .map_err(|e| e.to_string())?;
        // The store commits only verified bytes, but a blob it already had
        // is not re-read by `fetch_blob`: check what is parsed.
        if &Digest::of_bytes(&bytes) != digest {
            return Err(format!("the stored blob {digest} does not hash to it"));
        }
        Ok((desc.media_type, bytes))
    }

    fn documents_from_cache(
        &self,
        cache: &dyn Cache,
        digest: &Digest,
    ) -> Result<ImageDocuments, Miss> {
        let (mut media_type, mut bytes) = self.cached_document(cache, digest, MAX_MANIFEST_SIZE)?;
        let mut manifest_digest = digest.clone();
        if media::is_index(&media_type) {
            let index: Index = serde_json::from_slice(&bytes)
                .map_err(|e| format!("index {digest} is invalid: {e}"))?;
            let entry =
                select_platform(&index.manifests, &self.services.platform).ok_or_else(|| {
                    format!(
                        "index {digest} has no manifest for {}",
                        self.services.platform
                    )
                })?;
            manifest_digest = entry.digest.clone();
            (media_type, bytes) =
                self.cached_document(cache, &manifest_digest, MAX_MANIFEST_SIZE)?;
        }
        if !media::is_manifest(&media_type) {
            return Err(format!("{manifest_digest} has media type {media_type}"));
        }
        let manifest: Manifest = serde_json::from_slice(&bytes)
            .map_err(|e| format!("manifest {manifest_digest} is invalid: {e}"))?;
        let (_, config_bytes) =
            self.cached_document(cache, &manifest.config.digest, MAX_CONFIG_SIZE)?;
        let config: ImageConfig = serde_json::from_slice(&config_bytes)
            .map_err(|e| format!("config {} is invalid: {e}", manifest.config.digest))?;
        Ok(ImageDocuments {
            manifest_digest,
            manifest_media_type: media_type,
            manifest_bytes: bytes,
            manifest,
            config_bytes,
            config,
        })
    }

    /// Uploads the documents of a digest-pinned base just resolved by the
    /// registry, so that the next executor can resolve it from the cache.
    /// In the background like layers; a failure is a warning.
    pub(super) fn share_base_documents(&mut self, r: &ImageRef, pulled: &PulledImage) {
        let Some(pinned) = r.digest() else { return };
        if self.services.cache.is_none() || !self.opts.cache.mode.writes() {
            return;
        }
        let docs = &pulled.image;
        let mut shared = vec![
            (
                docs.manifest_media_type.clone(),
                docs.manifest_bytes.clone(),
            ),
            (
                docs.manifest.config.media_type.clone(),
                docs.config_bytes.clone(),
            ),
        ];
        if pinned != &docs.manifest_digest {
            // Pinned to an index: the registry client kept only the
            // platform's manifest, ask for the index itself (by digest,
            // once: the next build finds it in the cache).
            match self
                .services
                .runtime
                .block_on(self.services.client.get_manifest(r))
            {
                Ok(raw) if &raw.digest == pinned => shared.push((raw.media_type, raw.bytes)),
                Ok(raw) => self.warn(&format!(
                    "base {r}: the registry served {} for it; its index is not cached",
                    raw.digest
                )),
                Err(e) => self.warn(&format!("base {r}: fetching its index to cache it: {e}")),
            }
        }
        for (media_type, bytes) in shared {
            let digest = match self.services.store.put_bytes(&bytes) {
                Ok(d) => d,
                Err(e) => {
                    self.warn(&format!("base {r}: storing a document to cache it: {e}"));
                    continue;
                }
            };
            let entry = CacheEntry {
                layer: Some(LayerDescriptor {
                    media_type,
                    digest: digest.clone(),
                    size: bytes.len() as u64,
                    diff_id: digest.clone(),
                }),
                created_by: format!("base image document of {}", pulled.reference),
                created: rfc3339(unix_now()),
                extra: BTreeMap::new(),
            };
            let path = self.services.store.path(&digest);
            self.uploader
                .upload(document_key(&digest), entry, Some((digest, path)));
        }
    }
}

/// The message of a base that the registry could not resolve: when the
/// registry did not answer at all, it says that a tag needs the registry
/// (and how to build without it).
pub(super) fn registry_resolve_error(r: &ImageRef, e: RegistryError) -> BaseError {
    if !matches!(e, RegistryError::Http { .. }) {
        return BaseError::Registry(e);
    }
    let hint = match r.digest() {
        None => format!(
            "the registry {} is needed to resolve the tag {:?}: a tag is never \
             resolved from the cache; a FROM pinned by digest, {}@sha256:…, builds from the \
             cache alone once the cache holds that image",
            r.registry(),
            r.tag().unwrap_or("latest"),
            r.name()
        ),
        Some(d) => format!(
            "the registry {} did not answer and the cache does not hold the \
             documents of {d}",
            r.registry()
        ),
    };
    BaseError::RegistryUnavailable {
        source: Box::new(e),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn document_keys_differ_from_base_layer_keys_of_the_same_digest() {
        let d = Digest::of_bytes(b"manifest");
        assert_ne!(document_key(&d), keys::base_layer_key(&d));
        assert_eq!(document_key(&d), document_key(&d));
    }
}
