//! Start-up reconciliation: the index is made to agree with the files
//! after a crash (missing blobs and the entries naming them dropped,
//! renamed-but-unindexed blobs adopted, reference counts recomputed).

use std::collections::HashMap;
use std::sync::atomic::Ordering;

use kiln_common::Digest;
use rocksdb::{IteratorMode, WriteBatch};
use tracing::{info, warn};

use super::codec::{
    BlobMeta, decode_entry, digest_from_key, digest_key, key_from_index_key, lru_key,
};
use super::db::{CF_BLOBS, CF_ENTRIES, CF_LRU, db_err, durable};
use super::{Store, StoreError};
use crate::now_ms;
use crate::reports::RecoveryReport;

impl Store {
    pub(super) fn recover(&self) -> Result<RecoveryReport, StoreError> {
        let _guard = self.write_lock();
        let mut report = RecoveryReport {
            temp_files_removed: self.inner.content.remove_temp_files()? as u64,
            ..Default::default()
        };
        let (files, strays) = self.inner.content.scan()?;
        for stray in strays {
            warn!(path = %stray.display(), "ignoring a file in the blob directory that is not a blob");
        }
        let on_disk: HashMap<Digest, u64> = files.into_iter().collect();
        let db = &self.inner.db;
        let (cf_entries, cf_lru, cf_blobs) =
            (self.cf(CF_ENTRIES)?, self.cf(CF_LRU)?, self.cf(CF_BLOBS)?);
        let mut batch = WriteBatch::default();
        let now = now_ms();

        let mut metas: HashMap<Digest, BlobMeta> = HashMap::new();
        for item in db.iterator_cf(cf_blobs, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let digest = digest_from_key(&k)?;
            let meta = BlobMeta::decode(&v)?;
            if on_disk.contains_key(&digest) {
                metas.insert(digest, meta);
            } else {
                warn!(%digest, "blob is in the index but missing on disk; dropping it and the entries naming it");
                batch.delete_cf(cf_blobs, &k);
                report.blobs_missing.push(digest);
            }
        }
        for (digest, size) in &on_disk {
            if !metas.contains_key(digest) {
                // Renamed into place (so verified) but the index write was
                // lost to a crash: adopt it as unreferenced.
                report.blobs_adopted += 1;
                metas.insert(
                    digest.clone(),
                    BlobMeta {
                        size: *size,
                        created_ms: now,
                        accessed_ms: now,
                        refs: 0,
                    },
                );
            }
        }

        let mut refs: HashMap<Digest, u64> = HashMap::new();
        let mut entries = 0u64;
        for item in db.iterator_cf(cf_entries, IteratorMode::Start) {
            let (k, v) = item.map_err(db_err)?;
            let value = match decode_entry(&v) {
                Ok(value) => value,
                Err(e) => {
                    warn!(error = %e, "dropping an unreadable index entry");
                    batch.delete_cf(cf_entries, &k);
                    report.entries_dropped += 1;
                    continue;
                }
            };
            if let Some(layer) = &value.entry.layer {
                if !metas.contains_key(&layer.digest) {
                    warn!(key = %key_from_index_key(&k)?, digest = %layer.digest,
                        "dropping an entry whose blob is missing");
                    batch.delete_cf(cf_entries, &k);
                    batch.delete_cf(cf_lru, lru_key(value.accessed_ms, &k));
                    report.entries_dropped += 1;
                    continue;
                }
                *refs.entry(layer.digest.clone()).or_default() += 1;
            }
            entries += 1;
        }

        let mut bytes = 0u64;
        for (digest, meta) in &mut metas {
            let want = refs.get(digest).copied().unwrap_or(0);
            let size = on_disk.get(digest).copied().unwrap_or(meta.size);
            if meta.refs != want || meta.size != size {
                report.references_fixed += u64::from(meta.refs != want);
                meta.refs = want;
                meta.size = size;
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            } else if report.blobs_adopted > 0 {
                batch.put_cf(cf_blobs, digest_key(digest)?, meta.encode());
            }
            bytes += meta.size;
        }
        db.write_opt(batch, &durable()).map_err(db_err)?;

        self.inner.entries.store(entries, Ordering::Relaxed);
        self.inner
            .blobs
            .store(metas.len() as u64, Ordering::Relaxed);
        self.inner.bytes.store(bytes, Ordering::Relaxed);
        info!(
            entries,
            blobs = metas.len(),
            bytes,
            temp_files_removed = report.temp_files_removed,
            blobs_adopted = report.blobs_adopted,
            blobs_missing = report.blobs_missing.len(),
            entries_dropped = report.entries_dropped,
            "store opened"
        );
        Ok(report)
    }
}
