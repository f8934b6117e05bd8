//! Lookups (local index first, the bucket behind it) and entry writes
//! with their reference markers (the writer's side of GC safety).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use futures::StreamExt;
use kiln_common::{CacheEntry, CacheKey};
use tracing::warn;

use crate::objstore::ObjError;
use crate::objstore::bucket::{EntryCreate, EntryObject, RefMarker};
use kiln_storage::{ContractError, Namespace, PutOutcome, now_ms};

use super::*;

impl Replica {
    /// The entries present for `keys`: from the local cache while fresh,
    /// otherwise from the bucket (at most [`LOOKUP_CONCURRENCY`] requests at
    /// a time).
    pub async fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, ObjError> {
        let now = now_ms();
        let cached = self.index.get(ns, keys)?;
        let hit_recheck = self.config.hit_recheck.as_millis() as u64;
        let miss_recheck = self.config.miss_recheck.as_millis() as u64;
        let mut found = BTreeMap::new();
        // Keys to read from the bucket, with what this replica cached for
        // them when that is merely stale (served if the bucket fails).
        let mut fetch: Vec<(CacheKey, Option<EntryObject>)> = Vec::new();
        for (key, cached) in keys.iter().zip(cached) {
            match cached {
                Some(c) if now.saturating_sub(c.confirmed_ms) < hit_recheck => {
                    if !self.expired(c.object.created_ms, now) {
                        found.insert(*key, c.object.entry);
                    }
                }
                // A stale hit is read again, not just checked for existence:
                // the key may have been evicted and written again with
                // another entry (another layer) since it was cached. The
                // object is a few hundred bytes, so a GET costs what a
                // HEAD does.
                Some(c) => fetch.push((*key, Some(c.object))),
                None => {
                    let recent = self
                        .index
                        .miss_checked(ns, key)
                        .is_some_and(|at| now.saturating_sub(at) < miss_recheck);
                    if !recent {
                        fetch.push((*key, None));
                    }
                }
            }
        }

        type Fetched = (
            CacheKey,
            Option<EntryObject>,
            Result<Option<EntryObject>, ObjError>,
        );
        let fetched: Vec<Fetched> = futures::stream::iter(fetch)
            .map(|(key, cached)| async move {
                let read = self.bucket.read_entry(ns, &key).await;
                (key, cached, read)
            })
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
        for (key, cached, read) in fetched {
            let object = match (read, cached) {
                (Ok(object), _) => object,
                // The bucket answered, with something unreadable: no entry
                // to serve, cached or not.
                (Err(e @ ObjError::Corrupt { .. }), _) => {
                    warn!(%key, error = %e, "unreadable entry object; answering a miss");
                    self.index.remove(ns, &key)?;
                    continue;
                }
                // The bucket not answering is no reason to fail a lookup:
                // a cached entry was true a moment ago, serve it...
                (Err(e), Some(cached)) => {
                    warn!(%key, error = %e, "could not re-read a cached entry; serving it");
                    if !self.expired(cached.created_ms, now) {
                        found.insert(key, cached.entry);
                    }
                    continue;
                }
                // ...and otherwise the honest answer is a miss (the build
                // runs the step), not an error that fails the build.
                (Err(e), None) => {
                    warn!(%key, error = %e, "bucket lookup failed; answering a miss");
                    continue;
                }
            };
            match object {
                Some(object) => {
                    self.index.put(ns, &key, &object, now)?;
                    if !self.expired(object.created_ms, now) {
                        found.insert(key, object.entry);
                    }
                }
                None => {
                    self.index.remove(ns, &key)?;
                    self.index.record_miss(ns, &key, now);
                }
            }
        }

        let hits = found.len() as u64;
        self.hits.fetch_add(hits, Ordering::Relaxed);
        self.misses
            .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        Ok(found)
    }

    /// Creates `entry` under `key` unless one exists (first writer wins
    /// across all replicas). The blob it names must be in the bucket.
    pub async fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, ObjError> {
        // This write's own marker, under a fresh nonce: no other write of
        // this key (an older entry being removed, a racing writer) shares
        // its path, so removing theirs never removes ours.
        let marker = entry
            .layer
            .as_ref()
            .map(|layer| RefMarker::new(layer.digest.clone(), ns.clone(), *key));
        if let (Some(layer), Some(marker)) = (&entry.layer, &marker) {
            // Marker first, then look: see the module docs for why this
            // order makes GC and writers safe against each other.
            self.bucket.put_ref(marker).await?;
            if let Some(since) = self.bucket.doomed_since(&layer.digest).await?
                && now_ms().saturating_sub(since) < self.config.lease_ttl.as_millis() as u64
            {
                // The marker stays: written before GC's last look, it makes
                // GC keep the blob, which the client's retry then finds.
                // No entry names its nonce, so GC drops it once it is older
                // than the marker grace.
                return Err(ContractError::MissingBlob(layer.digest.clone()).into());
            }
            let refused = match self.bucket.blob_size(&layer.digest).await? {
                None => Some(ContractError::MissingBlob(layer.digest.clone())),
                Some(size) if size != layer.size => Some(ContractError::LayerSizeMismatch {
                    digest: layer.digest.clone(),
                    entry_size: layer.size,
                    blob_size: size,
                }),
                Some(_) => None,
            };
            if let Some(refused) = refused {
                // No entry will name this write: its marker protects
                // nothing (the client's retry is a new write, new marker).
                if let Err(e) = self.bucket.delete_ref(marker).await {
                    warn!(%key, error = %e, "could not remove the marker of a refused write; GC will");
                }
                return Err(refused.into());
            }
        }
        let object = EntryObject {
            created_ms: now_ms(),
            entry: entry.clone(),
            ref_nonce: marker.as_ref().and_then(|m| m.nonce),
        };
        let mut created = self.bucket.create_entry(ns, key, &object).await?;
        if let EntryCreate::Exists(existing) = &created
            && !same_write(existing, &object)
            && self.expired(existing.created_ms, object.created_ms)
        {
            // An expired entry is as good as absent (as in the local store):
            // replace it. Two replicas doing this at once still end with
            // one winner, through the conditional create. Only the old
            // write's marker goes with it; ours has another nonce.
            self.remove_object(ns, key, existing).await?;
            created = self.bucket.create_entry(ns, key, &object).await?;
        }
        match created {
            EntryCreate::Created => {
                self.index.put(ns, key, &object, now_ms())?;
                Ok(PutOutcome::Created)
            }
            // Our own create, answered "exists" because the client library
            // retried it after a lost response: the nonce says it is ours.
            EntryCreate::Exists(existing) if same_write(&existing, &object) => {
                self.index.put(ns, key, &existing, now_ms())?;
                Ok(PutOutcome::Created)
            }
            EntryCreate::Exists(existing) => {
                self.index.put(ns, key, &existing, now_ms())?;
                // We lost: the entry there names another write, so our
                // marker protects nothing. If this delete fails, GC
                // collects the marker (it is dead by the same argument).
                if let Some(marker) = &marker
                    && let Err(e) = self.bucket.delete_ref(marker).await
                {
                    warn!(%key, error = %e, "could not remove the marker of a write that lost; GC will");
                }
                if existing.entry == *entry {
                    return Ok(PutOutcome::Identical);
                }
                Ok(PutOutcome::Conflict {
                    existing: Box::new(existing.entry),
                })
            }
        }
    }

    /// Removes the entry under `key` from the bucket; false when absent.
    pub async fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, ObjError> {
        let existing = self.bucket.read_entry(ns, key).await?;
        self.index.remove(ns, key)?;
        let Some(existing) = existing else {
            return Ok(false);
        };
        self.remove_object(ns, key, &existing).await?;
        Ok(true)
    }

    /// Deletes an entry object, then the marker its write put (never the
    /// other way round: an entry must not outlive the marker protecting its
    /// blob). Should the object deleted be a newer write than `existing`
    /// (replaced in between), that write's marker stays behind, dead, for GC.
    pub(super) async fn remove_object(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        existing: &EntryObject,
    ) -> Result<(), ObjError> {
        self.bucket.delete_entry(ns, key).await?;
        self.index.remove(ns, key)?;
        if let Some(marker) = RefMarker::of_entry(ns, key, existing) {
            self.bucket.delete_ref(&marker).await?;
        }
        Ok(())
    }
}
