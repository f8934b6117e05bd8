//! Maintenance: GC (expiry, unreferenced blobs, eviction down to the size
//! limit), on-demand eviction, verification, counters and flushing.

use std::collections::HashSet;
use std::io::{self, Write};
use std::sync::atomic::Ordering;

use kiln_common::{Digest, Sha256Writer};
use rocksdb::{IteratorMode, WriteBatch};
use tracing::{info, warn};

use super::codec::{BlobMeta, decode_entry, digest_from_key, digest_key, lru_key};
use super::db::{CF_BLOBS, CF_ENTRIES, CF_LRU, db_err, durable};
use super::{Store, StoreError, lock};
use crate::now_ms;
use crate::reports::{GcReport, Stats, VerifyReport};

impl Store {
    /// True when stored blob bytes exceed `max_size`.
    pub fn over_limit(&self) -> bool {
        self.inner
            .config
            .max_size
            .is_some_and(|max| self.inner.bytes.load(Ordering::Relaxed) > max)
    }

    /// One GC pass: drop expired entries, unreferenced blobs older than the
    /// grace period, then evict least-recently-used entries (and the blobs
    /// only they referenced) until under `max_size`.
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        let _guard = self.write_lock();
        self.inner.gc_runs.fetch_add(1, Ordering::Relaxed);
        let mut report = GcReport::default();
        let now = now_ms();
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);

        if self.inner.config.entry_ttl.is_some() {
            let mut batch = WriteBatch::default();
            for item in self.inner.db.iterator_cf(cf_entries, IteratorMode::Start) {
                let (k, v) = item.map_err(db_err)?;
                let value = decode_entry(&v)?;
                if self.expired(value.created_ms, now) {
                    // Written per entry: two expired entries may share a blob
                    // and each decrement must see the previous one.
                    self.remove_entry_into(&mut batch, cf_entries, cf_lru, cf_blobs, &k, &value)?;
                    self.inner
                        .db
                        .write(std::mem::take(&mut batch))
                        .map_err(db_err)?;
                    report.entries_expired += 1;
                }
            }
            self.inner
                .entries
                .fetch_sub(report.entries_expired, Ordering::Relaxed);
            self.inner
                .expired
                .fetch_add(report.entries_expired, Ordering::Relaxed);
        }

        let grace = self.inner.config.blob_grace.as_millis() as u64;
        self.collect_blobs(&mut report, |meta| {
            now.saturating_sub(meta.created_ms) >= grace
        })?;

        if let Some(max) = self.inner.config.max_size {
            self.evict_locked(max, &mut report)?;
            // Still over? What is left is unreferenced blobs within their
            // grace period (uploads whose entries have not arrived yet) and
            // pinned ones: they are kept, the limit is exceeded briefly.
        }
        // Eviction batches skip fsync (recovery repairs a lost one); make
        // the pass durable once at the end.
        self.inner.db.flush_wal(true).map_err(db_err)?;
        info!(?report, "gc finished");
        Ok(report)
    }

    /// Evicts least-recently-used entries, and the blobs only they
    /// referenced, until stored blob bytes are at most `max_bytes` (or no
    /// entry is left). Pinned blobs stay until a later pass.
    pub fn evict(&self, max_bytes: u64) -> Result<GcReport, StoreError> {
        let _guard = self.write_lock();
        let mut report = GcReport::default();
        self.evict_locked(max_bytes, &mut report)?;
        self.inner.db.flush_wal(true).map_err(db_err)?;
        Ok(report)
    }

    /// Caller holds the write lock.
    pub(super) fn evict_locked(&self, max: u64, report: &mut GcReport) -> Result<(), StoreError> {
        // The LRU order must include accesses parked while the lock was busy.
        let parked = std::mem::take(&mut *lock(&self.inner.pending_touches));
        self.record_touches_locked(parked)?;
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut lru_iter = self.inner.db.iterator_cf(cf_lru, IteratorMode::Start);
        while self.inner.bytes.load(Ordering::Relaxed) > max {
            let Some(item) = lru_iter.next() else { break };
            let (lk, _) = item.map_err(db_err)?;
            if lk.len() < 8 {
                continue;
            }
            let ik = &lk[8..];
            let mut batch = WriteBatch::default();
            match self.inner.db.get_cf(cf_entries, ik).map_err(db_err)? {
                Some(raw) => {
                    let value = decode_entry(&raw)?;
                    if lru_key(value.accessed_ms, ik) != lk.as_ref() {
                        batch.delete_cf(cf_lru, &lk);
                    } else {
                        self.remove_entry_into(
                            &mut batch, cf_entries, cf_lru, cf_blobs, ik, &value,
                        )?;
                        report.entries_evicted += 1;
                        self.inner.entries.fetch_sub(1, Ordering::Relaxed);
                        self.inner.evicted.fetch_add(1, Ordering::Relaxed);
                        crate::metrics::record_eviction(now_ms().saturating_sub(value.accessed_ms));
                    }
                    self.inner.db.write(batch).map_err(db_err)?;
                    if let Some(layer) = &value.entry.layer {
                        self.remove_blob_if_unreferenced(&layer.digest, report)?;
                    }
                }
                None => {
                    batch.delete_cf(cf_lru, &lk);
                    self.inner.db.write(batch).map_err(db_err)?;
                }
            }
        }
        Ok(())
    }

    pub(super) fn collect_blobs(
        &self,
        report: &mut GcReport,
        eligible: impl Fn(&BlobMeta) -> bool,
    ) -> Result<(), StoreError> {
        let mut victims = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_BLOBS)?, IteratorMode::Start)
        {
            let (k, v) = item.map_err(db_err)?;
            let meta = BlobMeta::decode(&v)?;
            if meta.refs == 0 && eligible(&meta) {
                victims.push((digest_from_key(&k)?, meta));
            }
        }
        victims.sort_by_key(|(_, m)| m.accessed_ms);
        for (digest, _) in victims {
            self.remove_blob_if_unreferenced(&digest, report)?;
        }
        Ok(())
    }

    /// Caller holds the write lock.
    pub(super) fn remove_blob_if_unreferenced(
        &self,
        digest: &Digest,
        report: &mut GcReport,
    ) -> Result<(), StoreError> {
        let Some(meta) = self.blob_meta(digest)? else {
            return Ok(());
        };
        if meta.refs > 0 {
            return Ok(());
        }
        if self.is_pinned(digest) {
            report.blobs_pinned += 1;
            return Ok(());
        }
        self.inner
            .db
            .delete_cf(self.cf(CF_BLOBS)?, digest_key(digest)?)
            .map_err(db_err)?;
        self.inner.content.remove(digest)?;
        report.blobs_removed += 1;
        report.bytes_freed += meta.size;
        self.inner.blobs.fetch_sub(1, Ordering::Relaxed);
        self.inner.bytes.fetch_sub(meta.size, Ordering::Relaxed);
        self.inner.blobs_removed.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Re-hashes every stored blob. Corrupt or missing blobs are reported;
    /// with `repair`, corrupt ones are moved to `quarantine/` and they and
    /// the entries naming them leave the index.
    pub fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let mut report = VerifyReport {
            quarantined: repair,
            ..Default::default()
        };
        let mut digests = Vec::new();
        for item in self
            .inner
            .db
            .iterator_cf(self.cf(CF_BLOBS)?, IteratorMode::Start)
        {
            let (k, _) = item.map_err(db_err)?;
            digests.push(digest_from_key(&k)?);
        }
        for digest in digests {
            let Some(blob) = self.open_blob(&digest)? else {
                if self.blob_meta(&digest)?.is_some() {
                    report.missing.push(digest);
                }
                continue;
            };
            let mut hasher = Sha256Writer::new(io::sink());
            let mut reader = io::BufReader::with_capacity(1 << 20, blob.file);
            io::copy(&mut reader, &mut hasher)
                .map_err(|e| StoreError::io(format!("reading blob {digest}"), e))?;
            let (_, actual, n) = hasher.finish();
            report.blobs_checked += 1;
            report.bytes_checked += n;
            if actual != digest {
                warn!(%digest, %actual, "blob content does not match its digest");
                report.corrupt.push(digest);
            }
        }
        if repair && !(report.corrupt.is_empty() && report.missing.is_empty()) {
            let _guard = self.write_lock();
            let bad: HashSet<Digest> = report
                .corrupt
                .iter()
                .chain(&report.missing)
                .cloned()
                .collect();
            for digest in &report.corrupt {
                let path = self.inner.content.quarantine(digest)?;
                warn!(%digest, path = %path.display(), "quarantined a corrupt blob");
            }
            report.entries_dropped = self.drop_blobs_and_entries(&bad)?;
        }
        Ok(report)
    }

    /// Caller holds the write lock.
    pub(super) fn drop_blobs_and_entries(&self, bad: &HashSet<Digest>) -> Result<u64, StoreError> {
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let mut dropped = 0;
        for item in self.inner.db.iterator_cf(cf_entries, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let value = decode_entry(&v)?;
            if value
                .entry
                .layer
                .as_ref()
                .is_some_and(|l| bad.contains(&l.digest))
            {
                batch.delete_cf(cf_entries, &k);
                batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &k));
                dropped += 1;
            }
        }
        for digest in bad {
            if let Some(meta) = self.blob_meta(digest)? {
                batch.delete_cf(cf_blobs, digest_key(digest)?);
                self.inner.blobs.fetch_sub(1, Ordering::Relaxed);
                self.inner.bytes.fetch_sub(meta.size, Ordering::Relaxed);
            }
        }
        self.inner.db.write_opt(batch, &durable()).map_err(db_err)?;
        self.inner.entries.fetch_sub(dropped, Ordering::Relaxed);
        Ok(dropped)
    }

    /// Current counters.
    pub fn stats(&self) -> Stats {
        let i = &self.inner;
        let hits = i.hits.load(Ordering::Relaxed);
        let misses = i.misses.load(Ordering::Relaxed);
        Stats {
            entries: i.entries.load(Ordering::Relaxed),
            blobs: i.blobs.load(Ordering::Relaxed),
            blob_bytes: i.bytes.load(Ordering::Relaxed),
            max_size: i.config.max_size,
            lookups_hit: hits,
            lookups_miss: misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            entries_evicted: i.evicted.load(Ordering::Relaxed),
            entries_expired: i.expired.load(Ordering::Relaxed),
            blobs_removed: i.blobs_removed.load(Ordering::Relaxed),
            gc_runs: i.gc_runs.load(Ordering::Relaxed),
            pinned_blobs: lock(&i.pins).len() as u64,
        }
    }

    /// Whether the data volume accepts a new file (for `/readyz`).
    pub fn check_writable(&self) -> Result<(), StoreError> {
        let (path, mut file) = self.inner.content.create_temp()?;
        let result = file.write_all(b"ok").and_then(|()| file.sync_all());
        let _ = std::fs::remove_file(&path);
        result.map_err(|e| StoreError::io("writing a probe file", e))
    }

    /// Makes everything acknowledged durable (WAL synced, memtables
    /// flushed); called at shutdown.
    pub fn flush(&self) -> Result<(), StoreError> {
        self.inner.db.flush_wal(true).map_err(db_err)?;
        for cf in [CF_ENTRIES, CF_LRU, CF_BLOBS] {
            self.inner.db.flush_cf(self.cf(cf)?).map_err(db_err)?;
        }
        Ok(())
    }
}
