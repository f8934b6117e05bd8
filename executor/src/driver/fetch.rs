//! Layer blobs into the local store when a step needs their bytes: from
//! the cache, or, for a base-image layer, from the cache first and then its
//! registry (shared through the cache afterwards, so the cluster pulls each
//! base layer from outside once).

use super::*;
use crate::cache::CacheError;

impl Driver {
    /// Makes sure a layer's blob is in the local store, from the cache.
    /// A base-image layer is tried in the cache first and otherwise pulled
    /// from its registry, then shared through the cache so the cluster pulls
    /// each base layer from outside once. A cache hit's layer that the cache
    /// cannot deliver intact is recorded as lost (see [`Driver::lose_hit`]).
    pub(super) fn ensure_blob(&mut self, layer: &LayerRef) -> Result<(), StepError> {
        if layer.blob.is_file() {
            return Ok(());
        }
        let digest = layer.desc.digest.clone();
        let mut cache_error = None;
        if let Some(cache) = self
            .services
            .cache
            .clone()
            .filter(|_| self.opts.cache.mode.reads())
        {
            let _progress = self.opts.log.progress(
                &format!("fetching layer {digest} from the cache"),
                Some(layer.desc.size),
                crate::log::bytes_received(),
            );
            match cache.fetch_blob(&digest, layer.desc.size, &self.services.store) {
                Ok(_) => {
                    self.record.bytes_downloaded += layer.desc.size;
                    return Ok(());
                }
                Err(e) => cache_error = Some(e),
            }
        }
        let is_base = self.resolved.base_layers.contains_key(&digest);
        if let (Some(key), Some(e), false) = (layer.hit, &cache_error, is_base) {
            return Err(self.lose_hit(key, &digest, kiln_common::errors::chain(e)));
        }
        if let Some(e) = cache_error
            .as_ref()
            .filter(|e| !matches!(e, CacheError::NotFound(_)))
            && is_base
        {
            self.warn(&format!(
                "the cache could not deliver base layer {digest} ({e}); pulling it from the registry"
            ));
        }
        let Some((pulled, base_layer)) = self.resolved.base_layers.get(&digest).cloned() else {
            return Err(match cache_error {
                Some(source) => StepError::Cache {
                    what: format!("fetching layer {digest} from the cache"),
                    source,
                },
                None => StepError::invalid(format!(
                    "layer {digest} is not available locally and there is no cache"
                )),
            });
        };
        self.log(&format!(
            "pulling layer {digest} ({} bytes)",
            layer.desc.size
        ));
        let _progress = self.opts.log.progress(
            &format!("pulling layer {digest}"),
            Some(layer.desc.size),
            crate::log::bytes_received(),
        );
        self.services
            .runtime
            .block_on(self.services.client.fetch_blob(
                &pulled,
                &base_layer.desc,
                &self.services.store,
            ))
            .map_err(|source| StepError::Registry {
                what: format!("pulling base layer {digest}"),
                source,
            })?;
        self.share_base_layer(&pulled, &base_layer);
        Ok(())
    }
}
