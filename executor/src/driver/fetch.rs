//! Layer blobs into the local store when a step needs their bytes: from
//! the cache, or, for a base-image layer, from the cache first and then its
//! registry (shared through the cache afterwards, so the cluster pulls each
//! base layer from outside once).
//!
//! Promises: [`Fetcher`] holds only what fetching reads (the store, the
//! cache, the registry client, the resolved base layers) and changes no
//! build state; it says what it did ([`Fetched`]) or why it could not
//! ([`FetchFailure`]), and the driver records that (bytes downloaded, a
//! lost hit) and hands the upload of a pulled base layer to its uploader.

use super::*;
use crate::cache::CacheError;
use crate::registry::client::PulledImage;

/// The fetch phase's view of the build.
pub(super) struct Fetcher<'a> {
    pub(super) services: &'a Services,
    pub(super) base_layers: &'a HashMap<Digest, (PulledImage, LayerRef)>,
    /// The cache mode reads (`--cache-mode` other than write-only).
    pub(super) reads_cache: bool,
    pub(super) log: &'a crate::log::Logger,
}

/// Where a layer's blob came from.
#[derive(Debug)]
pub(super) enum Fetched<'a> {
    /// It was in the local store already.
    Local,
    /// From the cache: `bytes` downloaded.
    Cache { bytes: u64 },
    /// A base layer, from its image's registry: to be shared through the
    /// cache.
    Registry {
        pulled: &'a PulledImage,
        base_layer: &'a LayerRef,
    },
}

/// Why a layer's blob could not be had.
#[derive(Debug)]
pub(super) enum FetchFailure {
    /// The layer of the cache hit `key`: the cache could not deliver it,
    /// and only the cache has it (the step must be built instead).
    LostHit {
        key: CacheKey,
        reason: String,
    },
    Step(StepError),
}

impl<'a> Fetcher<'a> {
    /// Makes sure a layer's blob is in the local store. A base-image layer
    /// is tried in the cache first and otherwise pulled from its registry;
    /// a cache failure on the way is a warning then, not an error.
    pub(super) fn fetch(&self, layer: &LayerRef) -> Result<Fetched<'a>, FetchFailure> {
        if layer.blob.is_file() {
            return Ok(Fetched::Local);
        }
        let digest = &layer.desc.digest;
        let store = &self.services.store;
        let mut cache_error = None;
        if let Some(cache) = self.services.cache.as_ref().filter(|_| self.reads_cache) {
            let _progress = self.log.progress(
                &format!("fetching layer {digest} from the cache"),
                Some(layer.desc.size),
                crate::log::bytes_received(),
            );
            match cache.fetch_blob(digest, layer.desc.size, store) {
                Ok(_) => {
                    return Ok(Fetched::Cache {
                        bytes: layer.desc.size,
                    });
                }
                Err(e) => cache_error = Some(e),
            }
        }
        let Some((pulled, base_layer)) = self.base_layers.get(digest) else {
            return Err(match (layer.hit, cache_error) {
                (Some(key), Some(e)) => FetchFailure::LostHit {
                    key,
                    reason: kiln_common::errors::chain(&e),
                },
                (None, Some(source)) => FetchFailure::Step(StepError::Cache {
                    what: format!("fetching layer {digest} from the cache"),
                    source,
                }),
                (_, None) => FetchFailure::Step(StepError::invalid(format!(
                    "layer {digest} is not available locally and there is no cache"
                ))),
            });
        };
        if let Some(e) = cache_error.filter(|e| !matches!(e, CacheError::NotFound(_))) {
            self.log.warn(&format!(
                "the cache could not deliver base layer {digest} ({e}); pulling it from the registry"
            ));
        }
        self.log.info(&format!(
            "pulling layer {digest} ({} bytes)",
            layer.desc.size
        ));
        let _progress = self.log.progress(
            &format!("pulling layer {digest}"),
            Some(layer.desc.size),
            crate::log::bytes_received(),
        );
        self.services
            .runtime
            .block_on(
                self.services
                    .client
                    .fetch_blob(pulled, &base_layer.desc, store),
            )
            .map_err(|source| {
                FetchFailure::Step(StepError::Registry {
                    what: format!("pulling base layer {digest}"),
                    source,
                })
            })?;
        Ok(Fetched::Registry { pulled, base_layer })
    }
}

impl Driver {
    /// [`Fetcher::fetch`] for a step of this driver, with what it did
    /// recorded: bytes downloaded, a pulled base layer shared through the
    /// cache, a lost hit (see [`Driver::lose_hit`]).
    pub(super) fn ensure_blob(&mut self, layer: &LayerRef) -> Result<(), StepError> {
        let fetched = Fetcher {
            services: &self.services,
            base_layers: &self.resolved.base_layers,
            reads_cache: self.opts.cache.mode.reads(),
            log: &self.opts.log,
        }
        .fetch(layer);
        match fetched {
            Ok(Fetched::Local) => Ok(()),
            Ok(Fetched::Cache { bytes }) => {
                self.record.bytes_downloaded += bytes;
                Ok(())
            }
            Ok(Fetched::Registry { pulled, base_layer }) => {
                share_base_layer(&self.services.store, &mut self.uploader, pulled, base_layer);
                Ok(())
            }
            Err(FetchFailure::LostHit { key, reason }) => {
                Err(self.lose_hit(key, &layer.desc.digest, reason))
            }
            Err(FetchFailure::Step(e)) => Err(e),
        }
    }
}

/// Uploads a base layer just pulled from its registry into the store,
/// with the entry that keeps it in the cache (so LRU eviction treats it
/// like any layer), in the background.
pub(super) fn share_base_layer(
    store: &LocalStore,
    uploader: &mut Uploader,
    pulled: &PulledImage,
    base_layer: &LayerRef,
) {
    let digest = base_layer.desc.digest.clone();
    let entry = CacheEntry {
        layer: Some(LayerDescriptor {
            media_type: base_layer.desc.media_type.clone(),
            digest: digest.clone(),
            size: base_layer.desc.size,
            diff_id: base_layer.diff_id.clone(),
        }),
        created_by: format!("base layer of {}", pulled.reference),
        created: rfc3339(unix_now()),
        extra: BTreeMap::new(),
    };
    let blob = Some((digest.clone(), store.path(&digest)));
    uploader.upload(keys::base_layer_key(&digest), entry, blob);
}
