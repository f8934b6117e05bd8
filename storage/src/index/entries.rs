//! Entries: first-writer-wins puts, batched lookups that record accesses
//! for eviction, deletes and listings.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;

use kiln_common::{CacheEntry, CacheKey, Digest};
use rocksdb::{ColumnFamily, Direction, IteratorMode, WriteBatch};

use super::codec::{
    EntryValue, decode_entry, digest_key, encode_entry, index_key, key_from_index_key, lru_key,
    ns_prefix,
};
use super::db::{CF_BLOBS, CF_ENTRIES, CF_LRU, db_err, durable};
use super::{MAX_PENDING_TOUCHES, Store, StoreError, lock};
use crate::error::ContractError;
use crate::namespace::Namespace;
use crate::now_ms;
use crate::reports::{EntryRecord, PutOutcome};

impl Store {
    /// Stores `entry` under `key` unless one is already there
    /// (first writer wins). The blob it names must be stored already.
    pub fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, StoreError> {
        let outcome = self.put_entry_unsynced(ns, key, entry)?;
        if !matches!(outcome, PutOutcome::Conflict { .. }) {
            // Identical too: the first writer may not have synced yet.
            self.sync_wal()?;
        }
        Ok(outcome)
    }

    /// Syncs the WAL. Called after the write lock is released, so
    /// concurrent writers share fsyncs (group commit) instead of queueing
    /// one fsync each behind the lock; nothing is acknowledged before it.
    pub(super) fn sync_wal(&self) -> Result<(), StoreError> {
        self.inner.db.flush_wal(true).map_err(db_err)
    }

    pub(super) fn put_entry_unsynced(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, StoreError> {
        let json = serde_json::to_vec(entry)
            .map_err(|e| StoreError::Corrupt(format!("serializing entry: {e}")))?;
        let ik = index_key(ns, key);
        let now = now_ms();
        let _guard = self.write_lock();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let mut deltas: HashMap<Digest, i64> = HashMap::new();
        let mut replaced = false;
        if let Some(raw) = self
            .inner
            .db
            .get_pinned_cf(cf_entries, &ik)
            .map_err(db_err)?
        {
            let existing = decode_entry(&raw)?;
            if !self.expired(existing.created_ms, now) {
                return Ok(if existing.entry == *entry {
                    PutOutcome::Identical
                } else {
                    PutOutcome::Conflict {
                        existing: Box::new(existing.entry),
                    }
                });
            }
            // An expired entry is as good as absent: replace it.
            batch.delete_cf(cf_lru, lru_key(existing.accessed_ms, &ik));
            if let Some(layer) = &existing.entry.layer {
                *deltas.entry(layer.digest.clone()).or_default() -= 1;
            }
            replaced = true;
        }
        if let Some(layer) = &entry.layer {
            let meta = self
                .blob_meta(&layer.digest)?
                .ok_or_else(|| ContractError::MissingBlob(layer.digest.clone()))?;
            let on_disk = self.inner.content.file_size(&layer.digest)?;
            if on_disk.is_none() {
                return Err(ContractError::MissingBlob(layer.digest.clone()).into());
            }
            if meta.size != layer.size {
                return Err(ContractError::LayerSizeMismatch {
                    digest: layer.digest.clone(),
                    entry_size: layer.size,
                    blob_size: meta.size,
                }
                .into());
            }
            *deltas.entry(layer.digest.clone()).or_default() += 1;
        }
        self.apply_ref_deltas(&mut batch, cf_blobs, &deltas)?;
        batch.put_cf(cf_entries, &ik, encode_entry(now, now, &json));
        batch.put_cf(cf_lru, lru_key(now, &ik), b"");
        self.inner.db.write(batch).map_err(db_err)?;
        if !replaced {
            self.inner.entries.fetch_add(1, Ordering::Relaxed);
        }
        Ok(PutOutcome::Created)
    }

    pub(super) fn apply_ref_deltas(
        &self,
        batch: &mut WriteBatch,
        cf_blobs: &ColumnFamily,
        deltas: &HashMap<Digest, i64>,
    ) -> Result<(), StoreError> {
        for (digest, delta) in deltas {
            if *delta == 0 {
                continue;
            }
            if let Some(mut meta) = self.blob_meta(digest)? {
                meta.refs = meta.refs.saturating_add_signed(*delta);
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            }
        }
        Ok(())
    }

    /// The entry under `key`, if present and not expired.
    pub fn get_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<Option<CacheEntry>, StoreError> {
        Ok(self.lookup(ns, std::slice::from_ref(key))?.remove(key))
    }

    /// The entries present for `keys` (misses are simply absent). Records
    /// the access for LRU eviction and the hit/miss counters.
    pub fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, StoreError> {
        let cf_entries = self.cf(CF_ENTRIES)?;
        let index_keys: Vec<Vec<u8>> = keys.iter().map(|k| index_key(ns, k)).collect();
        let values = self
            .inner
            .db
            .batched_multi_get_cf(cf_entries, &index_keys, false);
        let now = now_ms();
        let mut found = BTreeMap::new();
        let mut to_touch = Vec::new();
        for ((key, ik), value) in keys.iter().zip(&index_keys).zip(values) {
            let Some(raw) = value.map_err(db_err)? else {
                continue;
            };
            let value = decode_entry(&raw)?;
            if self.expired(value.created_ms, now) {
                continue;
            }
            if self.stale(value.accessed_ms, now) {
                to_touch.push(ik.clone());
            }
            found.insert(*key, value.entry);
        }
        let hits = found.len() as u64;
        self.inner.hits.fetch_add(hits, Ordering::Relaxed);
        self.inner
            .misses
            .fetch_add(keys.len() as u64 - hits, Ordering::Relaxed);
        if !to_touch.is_empty() {
            self.touch_entries(to_touch, now)?;
        }
        Ok(found)
    }

    pub(super) fn touch_entries(&self, keys: Vec<Vec<u8>>, now: u64) -> Result<(), StoreError> {
        // When a GC pass or a write holds the lock, park the accesses
        // instead of stalling the lookup; whoever takes the lock next (the
        // next touch, or eviction before it picks victims) records them.
        let _guard = match self.inner.lock.try_lock() {
            Ok(guard) => guard,
            Err(std::sync::TryLockError::Poisoned(p)) => p.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                let mut pending = lock(&self.inner.pending_touches);
                // Bounded: beyond this, accesses are dropped (they only
                // refine the LRU order).
                if pending.len() < MAX_PENDING_TOUCHES {
                    pending.extend(keys.into_iter().map(|ik| (ik, now)));
                }
                return Ok(());
            }
        };
        let mut touches: Vec<(Vec<u8>, u64)> = keys.into_iter().map(|ik| (ik, now)).collect();
        touches.append(&mut lock(&self.inner.pending_touches));
        self.record_touches_locked(touches)
    }

    /// Records accesses (index key, time); caller holds the write lock.
    pub(super) fn record_touches_locked(
        &self,
        touches: Vec<(Vec<u8>, u64)>,
    ) -> Result<(), StoreError> {
        if touches.is_empty() {
            return Ok(());
        }
        let (cf_entries, cf_lru) = (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?);
        // Latest time per entry; one rewrite each.
        let mut latest: HashMap<Vec<u8>, u64> = HashMap::new();
        for (ik, at) in touches {
            let t = latest.entry(ik).or_default();
            *t = (*t).max(at);
        }
        let mut batch = WriteBatch::default();
        for (ik, at) in latest {
            // Re-read under the lock: the entry may have been deleted since
            // the unlocked read and must not be resurrected.
            let Some(raw) = self.inner.db.get_cf(cf_entries, &ik).map_err(db_err)? else {
                continue;
            };
            let value = decode_entry(&raw)?;
            if value.accessed_ms >= at {
                continue;
            }
            let mut updated = raw;
            updated[9..17].copy_from_slice(&at.to_be_bytes());
            batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &ik));
            batch.put_cf(cf_lru, lru_key(at, &ik), b"");
            batch.put_cf(cf_entries, &ik, updated);
        }
        // Access times are a hint for eviction; losing the last few to a
        // crash is harmless, so no fsync here.
        self.inner.db.write(batch).map_err(db_err)
    }

    /// Removes the entry under `key`; false when there was none. Its blob
    /// stays until GC finds it unreferenced.
    pub fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, StoreError> {
        let ik = index_key(ns, key);
        let _guard = self.write_lock();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let Some(raw) = self.inner.db.get_cf(cf_entries, &ik).map_err(db_err)? else {
            return Ok(false);
        };
        let value = decode_entry(&raw)?;
        let mut batch = WriteBatch::default();
        self.remove_entry_into(&mut batch, cf_entries, cf_lru, cf_blobs, &ik, &value)?;
        self.inner.db.write_opt(batch, &durable()).map_err(db_err)?;
        self.inner.entries.fetch_sub(1, Ordering::Relaxed);
        Ok(true)
    }

    pub(super) fn remove_entry_into(
        &self,
        batch: &mut WriteBatch,
        cf_entries: &ColumnFamily,
        cf_lru: &ColumnFamily,
        cf_blobs: &ColumnFamily,
        ik: &[u8],
        value: &EntryValue,
    ) -> Result<(), StoreError> {
        batch.delete_cf(cf_entries, ik);
        batch.delete_cf(cf_lru, lru_key(value.accessed_ms, ik));
        if let Some(layer) = &value.entry.layer {
            let deltas = HashMap::from([(layer.digest.clone(), -1)]);
            self.apply_ref_deltas(batch, cf_blobs, &deltas)?;
        }
        Ok(())
    }

    /// Entries of a namespace in key order, optionally only keys whose hex
    /// starts with `prefix`, starting after `after`, at most `limit`.
    pub fn list_entries(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>, StoreError> {
        let prefix = prefix.to_ascii_lowercase();
        let ns_prefix = ns_prefix(ns);
        let mut start = ns_prefix.clone();
        match after {
            Some(k) => start.extend_from_slice(k.as_bytes()),
            None => {
                let even = &prefix[..prefix.len() & !1];
                start.extend(hex::decode(even).unwrap_or_default());
            }
        }
        let now = now_ms();
        let mut out = Vec::new();
        let iter = self.inner.db.iterator_cf(
            self.cf(CF_ENTRIES)?,
            IteratorMode::From(&start, Direction::Forward),
        );
        for item in iter {
            if out.len() >= limit {
                break;
            }
            let (k, v) = item.map_err(db_err)?;
            if !k.starts_with(&ns_prefix) || k.len() != ns_prefix.len() + 32 {
                break;
            }
            let key = key_from_index_key(&k)?;
            if after == Some(&key) {
                continue;
            }
            let hex = key.to_hex();
            if !hex.starts_with(&prefix) {
                if hex.as_str() > prefix.as_str() {
                    break;
                }
                continue;
            }
            let value = decode_entry(&v)?;
            if self.expired(value.created_ms, now) {
                continue;
            }
            out.push(EntryRecord {
                key,
                created_ms: value.created_ms,
                last_access_ms: value.accessed_ms,
                entry: value.entry,
            });
        }
        Ok(out)
    }
}
