//! One cache-server replica over a shared bucket: the operations of the
//! HTTP API (lookup, entries, blobs, GC) with the bucket as the truth and
//! the [`LocalIndex`] as a cache in front of it.
//!
//! Visibility across replicas (docs/object-storage.md):
//! - an entry written through any replica is found by every other one at
//!   most `miss_recheck` after it was written (a local miss asks the bucket
//!   again once that long has passed since it last asked for that key; 0
//!   asks every time);
//! - an entry removed from the bucket (GC, `DELETE`) stops being served by
//!   other replicas at most `hit_recheck` later;
//! - a lookup never fails because the bucket does not answer: keys it could
//!   not ask about are misses, cached entries it could not confirm are hits.
//!
//! GC safety, for blobs older than `blob_grace` that no entry named when GC
//! listed the bucket (younger ones are never deleted):
//! - GC: write the intent `gc/doomed/<blob>` (g0), LIST `refs/<blob>/` (g1),
//!   delete the blob only if that found no marker (g2), remove the intent;
//! - writer: put its marker `refs/<blob>/<ns>/<key>` (w0), then HEAD the
//!   intent (w1) and the blob (w2), and create the entry only if there is
//!   no fresh intent and the blob is there.
//!
//! If w0 < g1, GC sees the marker and keeps the blob. Otherwise g0 < g1 <
//! w0 < w1: the writer sees the intent, or it was already removed, which
//! happens after g2, so the blob is gone at w2. Either way no entry is
//! created for a blob GC deletes (given the read-after-write consistency S3
//! has had since 2020). A refused writer gets `422 missing_blob` and uploads
//! again. Intents older than `lease_ttl` (a crashed GC) are ignored and
//! cleared.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest};
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::ObjError;
use super::bucket::{
    BlobRead, BlobUpload, Bucket, EntryCreate, EntryObject, ListedEntry, RefMarker,
};
use super::index::LocalIndex;
use crate::store::{GcReport, Namespace, PutOutcome, Stats, now_ms};

/// Bucket requests one lookup sends at the same time.
const LOOKUP_CONCURRENCY: usize = 32;
const GC_LEASE: &str = "gc";

/// How a replica behaves; see docs/object-storage.md for the flags.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    /// A local miss asks the bucket again after this long (0: always).
    pub miss_recheck: Duration,
    /// A cached hit is confirmed in the bucket again after this long.
    pub hit_recheck: Duration,
    /// Entries older than this are not served and are removed by GC.
    pub entry_ttl: Option<Duration>,
    /// GC evicts the oldest entries while the bucket holds more blob bytes.
    pub max_size: Option<u64>,
    /// Blobs younger than this are never deleted by GC.
    pub blob_grace: Duration,
    /// How long the GC lease lasts without renewal.
    pub lease_ttl: Duration,
    /// This replica's name in the GC lease.
    pub holder: String,
    /// Answer blob GETs with a redirect to a URL signed for this long.
    pub presign: Option<Duration>,
}

impl Default for ReplicaConfig {
    fn default() -> Self {
        Self {
            miss_recheck: Duration::from_secs(2),
            hit_recheck: Duration::from_secs(60),
            entry_ttl: None,
            max_size: None,
            blob_grace: Duration::from_secs(600),
            lease_ttl: Duration::from_secs(300),
            holder: default_holder(),
            presign: None,
        }
    }
}

/// `hostname-pid`, which is the pod name and a number in Kubernetes.
pub fn default_holder() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "replica".into());
    format!("{host}-{}", std::process::id())
}

/// What a GC request did: the report, or that another replica holds the
/// lease and this one did nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaGcReport {
    #[serde(flatten)]
    pub report: GcReport,
    /// False when another replica holds the GC lease.
    pub lease_held: bool,
}

/// One replica.
pub struct Replica {
    bucket: Bucket,
    index: LocalIndex,
    config: ReplicaConfig,
    hits: AtomicU64,
    misses: AtomicU64,
    gc_runs: AtomicU64,
    evicted: AtomicU64,
    expired: AtomicU64,
    blobs_removed: AtomicU64,
    /// Sizes seen by the last GC listing (this replica's).
    listed: std::sync::Mutex<(u64, u64, u64)>,
}

impl Replica {
    /// Opens the local index cache in `data/replica-index` over `bucket`.
    pub fn open(bucket: Bucket, data: &Path, config: ReplicaConfig) -> Result<Replica, ObjError> {
        std::fs::create_dir_all(data).map_err(|e| ObjError::Io {
            context: format!("creating {}", data.display()),
            source: e,
        })?;
        let index = LocalIndex::open(&data.join("replica-index"))?;
        Ok(Replica {
            bucket,
            index,
            config,
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            gc_runs: AtomicU64::new(0),
            evicted: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            blobs_removed: AtomicU64::new(0),
            listed: std::sync::Mutex::new((0, 0, 0)),
        })
    }

    pub fn bucket(&self) -> &Bucket {
        &self.bucket
    }

    pub fn config(&self) -> &ReplicaConfig {
        &self.config
    }

    fn expired(&self, created_ms: u64, now: u64) -> bool {
        self.config
            .entry_ttl
            .is_some_and(|ttl| now.saturating_sub(created_ms) > ttl.as_millis() as u64)
    }

    // ---- entries -------------------------------------------------------

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
        let mut confirm = Vec::new();
        let mut fetch = Vec::new();
        for (key, cached) in keys.iter().zip(cached) {
            match cached {
                Some(c) if now.saturating_sub(c.confirmed_ms) < hit_recheck => {
                    if !self.expired(c.object.created_ms, now) {
                        found.insert(*key, c.object.entry);
                    }
                }
                Some(c) => confirm.push((*key, c.object)),
                None => {
                    let recent = self
                        .index
                        .miss_checked(ns, key)
                        .is_some_and(|at| now.saturating_sub(at) < miss_recheck);
                    if !recent {
                        fetch.push(*key);
                    }
                }
            }
        }

        // Stale hits: one HEAD each, since entries never change, only go.
        let confirmed: Vec<(CacheKey, EntryObject, Result<bool, ObjError>)> =
            futures::stream::iter(confirm)
                .map(|(key, object)| async move {
                    let exists = self.bucket.entry_exists(ns, &key).await;
                    (key, object, exists)
                })
                .buffer_unordered(LOOKUP_CONCURRENCY)
                .collect()
                .await;
        for (key, object, exists) in confirmed {
            // The bucket not answering is no reason to fail a lookup: the
            // cached entry was true a moment ago, serve it.
            let exists = exists.unwrap_or_else(|e| {
                warn!(%key, error = %e, "could not confirm a cached entry; serving it");
                true
            });
            if exists {
                self.index.put(ns, &key, &object, now)?;
                if !self.expired(object.created_ms, now) {
                    found.insert(key, object.entry);
                }
            } else {
                self.index.remove(ns, &key)?;
                self.index.record_miss(ns, &key, now);
            }
        }

        let fetched: Vec<(CacheKey, Result<Option<EntryObject>, ObjError>)> =
            futures::stream::iter(fetch)
                .map(|key| async move { (key, self.bucket.read_entry(ns, &key).await) })
                .buffer_unordered(LOOKUP_CONCURRENCY)
                .collect()
                .await;
        for (key, object) in fetched {
            // A lookup is a cache question: when the bucket does not answer,
            // the honest answer is a miss (the build runs the step), not an
            // error that fails the build.
            let object = match object {
                Ok(object) => object,
                Err(e) => {
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
                None => self.index.record_miss(ns, &key, now),
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
        if let Some(layer) = &entry.layer {
            // Marker first, then look: see the module docs for why this
            // order makes GC and writers safe against each other. On a
            // refusal the marker stays; GC drops it after `blob_grace`.
            self.bucket.put_ref(&layer.digest, ns, key).await?;
            if let Some(since) = self.bucket.doomed_since(&layer.digest).await?
                && now_ms().saturating_sub(since) < self.config.lease_ttl.as_millis() as u64
            {
                return Err(ObjError::MissingBlob(layer.digest.clone()));
            }
            let size = self
                .bucket
                .blob_size(&layer.digest)
                .await?
                .ok_or_else(|| ObjError::MissingBlob(layer.digest.clone()))?;
            if size != layer.size {
                return Err(ObjError::LayerSizeMismatch {
                    digest: layer.digest.clone(),
                    entry_size: layer.size,
                    blob_size: size,
                });
            }
        }
        let object = EntryObject {
            created_ms: now_ms(),
            entry: entry.clone(),
        };
        let mut created = self.bucket.create_entry(ns, key, &object).await?;
        if let EntryCreate::Exists(existing) = &created
            && self.expired(existing.created_ms, object.created_ms)
        {
            // An expired entry is as good as absent (as in the local store):
            // replace it. Two replicas doing this at once still end with
            // one winner, through the conditional create.
            self.remove_object(ns, key, existing).await?;
            // The old entry's marker may have been ours too (same blob).
            if let Some(layer) = &entry.layer {
                self.bucket.put_ref(&layer.digest, ns, key).await?;
            }
            created = self.bucket.create_entry(ns, key, &object).await?;
        }
        match created {
            EntryCreate::Created => {
                self.index.put(ns, key, &object, now_ms())?;
                Ok(PutOutcome::Created)
            }
            EntryCreate::Exists(existing) => {
                self.index.put(ns, key, &existing, now_ms())?;
                if existing.entry == *entry {
                    return Ok(PutOutcome::Identical);
                }
                // Our marker protects a blob this key does not name.
                if let Some(layer) = &entry.layer
                    && existing.entry.layer.as_ref().map(|l| &l.digest) != Some(&layer.digest)
                {
                    self.bucket.delete_ref(&layer.digest, ns, key).await?;
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

    /// Deletes an entry object, then its marker (never the other way
    /// round: an entry must not outlive the marker protecting its blob).
    async fn remove_object(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        existing: &EntryObject,
    ) -> Result<(), ObjError> {
        self.bucket.delete_entry(ns, key).await?;
        self.index.remove(ns, key)?;
        if let Some(layer) = &existing.entry.layer {
            self.bucket.delete_ref(&layer.digest, ns, key).await?;
        }
        Ok(())
    }

    // ---- blobs ---------------------------------------------------------

    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ObjError> {
        self.bucket.blob_size(digest).await
    }

    pub async fn get_blob(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<BlobRead>, ObjError> {
        self.bucket.get_blob(digest, range).await
    }

    pub async fn blob_upload(&self, expected: &Digest) -> Result<BlobUpload, ObjError> {
        self.bucket.blob_upload(expected).await
    }

    /// A signed URL for the blob when redirects are configured.
    pub async fn presigned_get(&self, digest: &Digest) -> Result<Option<String>, ObjError> {
        match self.config.presign {
            Some(ttl) => self.bucket.presigned_get(digest, ttl).await,
            None => Ok(None),
        }
    }

    // ---- GC --------------------------------------------------------------

    /// One GC pass if this replica gets (or holds) the GC lease: expire
    /// entries past their TTL, evict the oldest entries while over
    /// `max_size`, drop stale reference markers, then delete blobs that no
    /// marker names and that are older than `blob_grace`.
    pub async fn gc(&self) -> Result<ReplicaGcReport, ObjError> {
        let c = &self.config;
        if !self
            .bucket
            .acquire_lease(GC_LEASE, &c.holder, c.lease_ttl)
            .await?
        {
            info!("gc skipped: another replica holds the GC lease");
            return Ok(ReplicaGcReport::default());
        }
        self.gc_runs.fetch_add(1, Ordering::Relaxed);
        let result = self.gc_pass().await;
        if let Err(e) = self.bucket.release_lease(GC_LEASE, &c.holder).await {
            warn!(error = %e, "could not release the GC lease; it expires by itself");
        }
        let report = result?;
        info!(?report, "gc finished");
        Ok(ReplicaGcReport {
            report,
            lease_held: true,
        })
    }

    async fn renew_lease(&self) -> Result<(), ObjError> {
        let c = &self.config;
        if self
            .bucket
            .acquire_lease(GC_LEASE, &c.holder, c.lease_ttl)
            .await?
        {
            Ok(())
        } else {
            Err(ObjError::Conflict(
                "the GC lease expired and another replica took it; stopping this pass".into(),
            ))
        }
    }

    async fn gc_pass(&self) -> Result<GcReport, ObjError> {
        let mut report = GcReport::default();
        let now = now_ms();
        let grace = self.config.blob_grace.as_millis() as u64;
        // Blobs first, then markers, then entries: a blob uploaded after
        // the blob listing is simply not considered this pass.
        let blobs = self.bucket.list_blobs().await?;
        let refs = self.bucket.list_refs().await?;
        let entries = self.bucket.list_entries().await?;

        let live: HashSet<(Namespace, CacheKey)> =
            entries.iter().map(|e| (e.ns.clone(), e.key)).collect();
        let blob_sizes: HashMap<Digest, u64> =
            blobs.iter().map(|(d, m)| (d.clone(), m.size)).collect();
        let mut total: u64 = blob_sizes.values().sum();
        let mut referencing: HashMap<Digest, HashSet<(Namespace, CacheKey)>> = HashMap::new();
        let mut names: HashMap<(Namespace, CacheKey), Vec<Digest>> = HashMap::new();
        let mut stale_markers = Vec::new();
        // A marker is written right before its entry; one whose entry is
        // missing for longer than this belongs to a writer that is gone.
        // Never shorter than the lease, whatever `blob_grace` says.
        let marker_grace = grace.max(self.config.lease_ttl.as_millis() as u64);
        for (marker, modified_ms) in &refs {
            let entry = (marker.ns.clone(), marker.key);
            if live.contains(&entry) {
                referencing
                    .entry(marker.blob.clone())
                    .or_default()
                    .insert(entry.clone());
                names.entry(entry).or_default().push(marker.blob.clone());
            } else if now.saturating_sub(*modified_ms) >= marker_grace {
                // A writer that died (or was refused) between marker and
                // entry, or an entry deleted before its marker. Its entry
                // may still have been created after the listing: checked
                // again below before the marker goes.
                stale_markers.push(marker.clone());
            } else {
                // Young marker whose entry may be on its way: counts.
                referencing
                    .entry(marker.blob.clone())
                    .or_default()
                    .insert(entry);
            }
        }

        // Entries to remove: expired ones, then the oldest while over size.
        let mut doomed: Vec<&ListedEntry> = Vec::new();
        let mut ordered: Vec<&ListedEntry> = entries.iter().collect();
        ordered.sort_by_key(|e| e.last_modified_ms);
        let mut free = |e: &ListedEntry, total: &mut u64| {
            let id = (e.ns.clone(), e.key);
            for blob in names.get(&id).into_iter().flatten() {
                if let Some(set) = referencing.get_mut(blob) {
                    set.remove(&id);
                    if set.is_empty() {
                        *total = total.saturating_sub(blob_sizes.get(blob).copied().unwrap_or(0));
                    }
                }
            }
        };
        let mut rest = Vec::new();
        for e in ordered {
            if self.expired(e.last_modified_ms, now) {
                free(e, &mut total);
                doomed.push(e);
                report.entries_expired += 1;
            } else {
                rest.push(e);
            }
        }
        if let Some(max) = self.config.max_size {
            for e in rest {
                if total <= max {
                    break;
                }
                free(e, &mut total);
                doomed.push(e);
                report.entries_evicted += 1;
            }
        }

        if !doomed.is_empty() {
            self.renew_lease().await?;
            let entry_paths = doomed
                .iter()
                .map(|e| self.bucket.entry_path(&e.ns, &e.key))
                .collect();
            // Entries before their markers, so no entry is ever left
            // without the marker that protects its blob.
            self.bucket.delete_many(entry_paths).await?;
            let marker_paths = refs
                .iter()
                .filter(|(m, _)| doomed.iter().any(|e| e.ns == m.ns && e.key == m.key))
                .map(|(m, _)| self.bucket.ref_marker_path(m))
                .collect();
            self.bucket.delete_many(marker_paths).await?;
            self.index
                .remove_many(doomed.iter().map(|e| (&e.ns, &e.key)))?;
        }
        if !stale_markers.is_empty() {
            let checked: Vec<(RefMarker, Result<bool, ObjError>)> =
                futures::stream::iter(stale_markers)
                    .map(|m| async move {
                        let exists = self.bucket.entry_exists(&m.ns, &m.key).await;
                        (m, exists)
                    })
                    .buffer_unordered(LOOKUP_CONCURRENCY)
                    .collect()
                    .await;
            let mut orphaned = Vec::new();
            for (marker, exists) in checked {
                if !exists? {
                    orphaned.push(self.bucket.ref_marker_path(&marker));
                }
            }
            self.bucket.delete_many(orphaned).await?;
        }

        self.renew_lease().await?;
        // Intents a crashed pass left behind would refuse writers forever.
        let lease = self.config.lease_ttl.as_millis() as u64;
        let stale_intents = self
            .bucket
            .list_doomed()
            .await?
            .into_iter()
            .filter(|(_, at)| now.saturating_sub(*at) >= lease)
            .map(|(path, _)| path)
            .collect();
        self.bucket.delete_many(stale_intents).await?;

        let mut remaining_bytes = 0u64;
        let mut remaining_blobs = 0u64;
        let mut candidates = Vec::new();
        for (digest, meta) in &blobs {
            let referenced = referencing.get(digest).is_some_and(|s| !s.is_empty());
            let young =
                now.saturating_sub(meta.last_modified.timestamp_millis().max(0) as u64) < grace;
            if referenced || young {
                remaining_bytes += meta.size;
                remaining_blobs += 1;
            } else {
                candidates.push((digest.clone(), meta.size));
            }
        }
        let outcomes: Vec<(u64, Result<bool, ObjError>)> = futures::stream::iter(candidates)
            .map(|(digest, size)| async move { (size, self.collect_blob(&digest).await) })
            .buffer_unordered(LOOKUP_CONCURRENCY)
            .collect()
            .await;
        for (size, outcome) in outcomes {
            if outcome? {
                report.blobs_removed += 1;
                report.bytes_freed += size;
            } else {
                remaining_bytes += size;
                remaining_blobs += 1;
            }
        }
        self.evicted
            .fetch_add(report.entries_evicted, Ordering::Relaxed);
        self.expired
            .fetch_add(report.entries_expired, Ordering::Relaxed);
        self.blobs_removed
            .fetch_add(report.blobs_removed, Ordering::Relaxed);
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) = (
            entries.len() as u64 - doomed.len() as u64,
            remaining_blobs,
            remaining_bytes,
        );
        Ok(report)
    }

    /// Deletes an unreferenced blob unless a writer has just claimed it:
    /// announce, re-check markers, delete, withdraw the announcement.
    async fn collect_blob(&self, digest: &Digest) -> Result<bool, ObjError> {
        self.bucket.put_doomed(digest).await?;
        let result = async {
            if self.bucket.has_refs(digest).await? {
                return Ok(false);
            }
            self.bucket.delete_blob(digest).await
        }
        .await;
        // Withdrawn even after a failure: a leftover intent would make
        // writers refuse this blob until it goes stale.
        self.bucket.delete_doomed(digest).await?;
        result
    }

    /// Counters; entry and blob totals are those of this replica's last GC
    /// listing (counting the bucket on every call would cost a LIST).
    pub fn stats(&self) -> Stats {
        let hits = self.hits.load(Ordering::Relaxed);
        let misses = self.misses.load(Ordering::Relaxed);
        let (entries, blobs, blob_bytes) = *self.listed.lock().unwrap_or_else(|p| p.into_inner());
        Stats {
            entries,
            blobs,
            blob_bytes,
            max_size: self.config.max_size,
            lookups_hit: hits,
            lookups_miss: misses,
            hit_ratio: if hits + misses == 0 {
                0.0
            } else {
                hits as f64 / (hits + misses) as f64
            },
            entries_evicted: self.evicted.load(Ordering::Relaxed),
            entries_expired: self.expired.load(Ordering::Relaxed),
            blobs_removed: self.blobs_removed.load(Ordering::Relaxed),
            gc_runs: self.gc_runs.load(Ordering::Relaxed),
            pinned_blobs: 0,
        }
    }

    /// Whether the bucket answers (for `/readyz`).
    pub async fn check_ready(&self) -> Result<(), ObjError> {
        self.bucket
            .blob_size(&Digest::of_bytes(b"kiln readiness probe"))
            .await
            .map(|_| ())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::bucket::MIN_PART_SIZE;
    use bytes::Bytes;
    use kiln_common::LayerDescriptor;
    use object_store::memory::InMemory;
    use std::sync::Arc;

    struct Fixture {
        mem: Arc<InMemory>,
        _dirs: Vec<tempfile::TempDir>,
    }

    impl Fixture {
        fn new() -> Self {
            Fixture {
                mem: Arc::new(InMemory::new()),
                _dirs: Vec::new(),
            }
        }

        fn replica(&mut self, name: &str, config: ReplicaConfig) -> Replica {
            let dir = tempfile::tempdir().unwrap();
            let bucket = Bucket::new(self.mem.clone(), "p", MIN_PART_SIZE);
            let replica = Replica::open(
                bucket,
                dir.path(),
                ReplicaConfig {
                    holder: name.into(),
                    ..config
                },
            )
            .unwrap();
            self._dirs.push(dir);
            replica
        }
    }

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn entry(digest: &Digest, size: u64, by: &str) -> CacheEntry {
        CacheEntry {
            layer: Some(LayerDescriptor {
                media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                digest: digest.clone(),
                size,
                diff_id: Digest::of_bytes(by.as_bytes()),
            }),
            created_by: by.into(),
            created: "2026-11-24T12:00:00Z".into(),
            extra: BTreeMap::new(),
        }
    }

    async fn put_blob(r: &Replica, data: &[u8]) -> Digest {
        let d = Digest::of_bytes(data);
        let mut up = r.blob_upload(&d).await.unwrap();
        up.write(Bytes::copy_from_slice(data)).await.unwrap();
        up.commit().await.unwrap();
        d
    }

    fn no_grace() -> ReplicaConfig {
        ReplicaConfig {
            miss_recheck: Duration::ZERO,
            blob_grace: Duration::ZERO,
            ..Default::default()
        }
    }

    #[tokio::test]
    async fn an_entry_written_through_one_replica_is_found_through_another() {
        let mut f = Fixture::new();
        let (a, b) = (f.replica("a", no_grace()), f.replica("b", no_grace()));
        let ns = Namespace::default();
        assert!(b.lookup(&ns, &[key(1)]).await.unwrap().is_empty());
        let d = put_blob(&a, b"layer").await;
        let e = entry(&d, 5, "RUN a");
        assert_eq!(
            a.put_entry(&ns, &key(1), &e).await.unwrap(),
            PutOutcome::Created
        );
        let found = b.lookup(&ns, &[key(1), key(2)]).await.unwrap();
        assert_eq!(found.get(&key(1)), Some(&e));
        assert_eq!(found.len(), 1);
        // First writer wins across replicas.
        let other = entry(&d, 5, "RUN b");
        assert!(matches!(
            b.put_entry(&ns, &key(1), &other).await.unwrap(),
            PutOutcome::Conflict { .. }
        ));
        assert_eq!(
            b.put_entry(&ns, &key(1), &e).await.unwrap(),
            PutOutcome::Identical
        );
    }

    #[tokio::test]
    async fn a_miss_is_not_rechecked_before_miss_recheck_passes() {
        let mut f = Fixture::new();
        let a = f.replica("a", no_grace());
        let b = f.replica(
            "b",
            ReplicaConfig {
                miss_recheck: Duration::from_secs(3600),
                ..no_grace()
            },
        );
        let ns = Namespace::default();
        assert!(b.lookup(&ns, &[key(1)]).await.unwrap().is_empty());
        let d = put_blob(&a, b"x").await;
        a.put_entry(&ns, &key(1), &entry(&d, 1, "RUN"))
            .await
            .unwrap();
        assert!(
            b.lookup(&ns, &[key(1)]).await.unwrap().is_empty(),
            "remembered miss"
        );
        assert_eq!(a.lookup(&ns, &[key(1)]).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_entry_naming_a_missing_or_wrong_sized_blob_is_refused() {
        let mut f = Fixture::new();
        let a = f.replica("a", no_grace());
        let ns = Namespace::default();
        let missing = Digest::of_bytes(b"nope");
        assert!(matches!(
            a.put_entry(&ns, &key(1), &entry(&missing, 4, "RUN")).await,
            Err(ObjError::MissingBlob(_))
        ));
        let d = put_blob(&a, b"abc").await;
        assert!(matches!(
            a.put_entry(&ns, &key(1), &entry(&d, 4, "RUN")).await,
            Err(ObjError::LayerSizeMismatch { .. })
        ));
    }

    #[tokio::test]
    async fn gc_deletes_only_blobs_no_entry_names_and_only_one_replica_runs_it() {
        let mut f = Fixture::new();
        let (a, b) = (f.replica("a", no_grace()), f.replica("b", no_grace()));
        let ns = Namespace::default();
        let kept = put_blob(&a, b"kept").await;
        let orphan = put_blob(&b, b"orphan").await;
        a.put_entry(&ns, &key(1), &entry(&kept, 4, "RUN"))
            .await
            .unwrap();

        // b holds the lease: a's pass does nothing.
        assert!(
            b.bucket
                .acquire_lease(GC_LEASE, "b", Duration::from_secs(60))
                .await
                .unwrap()
        );
        let skipped = a.gc().await.unwrap();
        assert!(!skipped.lease_held);
        assert!(a.blob_size(&orphan).await.unwrap().is_some());

        let report = b.gc().await.unwrap();
        assert!(report.lease_held);
        assert_eq!(report.report.blobs_removed, 1);
        assert!(a.blob_size(&orphan).await.unwrap().is_none());
        assert!(a.blob_size(&kept).await.unwrap().is_some());
        assert_eq!(b.lookup(&ns, &[key(1)]).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn eviction_removes_the_oldest_entries_until_under_the_limit() {
        let mut f = Fixture::new();
        let a = f.replica(
            "a",
            ReplicaConfig {
                max_size: Some(150),
                ..no_grace()
            },
        );
        let ns = Namespace::default();
        let mut digests = Vec::new();
        for n in 0..3u8 {
            let d = put_blob(&a, &[n; 100]).await;
            a.put_entry(&ns, &key(n), &entry(&d, 100, &format!("RUN {n}")))
                .await
                .unwrap();
            digests.push(d);
            // Distinct last-modified times for a deterministic order.
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let report = a.gc().await.unwrap().report;
        assert_eq!(report.entries_evicted, 2);
        assert_eq!(report.blobs_removed, 2);
        assert!(a.blob_size(&digests[2]).await.unwrap().is_some());
        assert!(a.blob_size(&digests[0]).await.unwrap().is_none());
        let found = a.lookup(&ns, &[key(0), key(1), key(2)]).await.unwrap();
        assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![key(2)]);
    }

    #[tokio::test]
    async fn gc_keeps_young_blobs_whose_entry_has_not_arrived_yet() {
        let mut f = Fixture::new();
        let a = f.replica(
            "a",
            ReplicaConfig {
                blob_grace: Duration::from_secs(600),
                ..no_grace()
            },
        );
        let d = put_blob(&a, b"just uploaded").await;
        assert_eq!(a.gc().await.unwrap().report.blobs_removed, 0);
        assert!(a.blob_size(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_writer_refuses_a_blob_gc_announced_until_the_intent_goes_or_is_stale() {
        let mut f = Fixture::new();
        let a = f.replica("a", no_grace());
        let stale = f.replica(
            "b",
            ReplicaConfig {
                lease_ttl: Duration::ZERO,
                ..no_grace()
            },
        );
        let ns = Namespace::default();
        let d = put_blob(&a, b"x").await;
        a.bucket.put_doomed(&d).await.unwrap();
        assert!(matches!(
            a.put_entry(&ns, &key(1), &entry(&d, 1, "RUN")).await,
            Err(ObjError::MissingBlob(_))
        ));
        assert!(a.bucket.has_refs(&d).await.unwrap(), "the marker stays");
        // An intent older than the lease is a crashed GC's: ignored.
        assert_eq!(
            stale
                .put_entry(&ns, &key(2), &entry(&d, 1, "RUN"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        a.bucket.delete_doomed(&d).await.unwrap();
        assert_eq!(
            a.put_entry(&ns, &key(1), &entry(&d, 1, "RUN"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
    }

    #[tokio::test]
    async fn an_expired_entry_is_not_served_and_may_be_replaced() {
        let mut f = Fixture::new();
        let a = f.replica(
            "a",
            ReplicaConfig {
                entry_ttl: Some(Duration::from_millis(1)),
                ..no_grace()
            },
        );
        let ns = Namespace::default();
        let d = put_blob(&a, b"x").await;
        a.put_entry(&ns, &key(1), &entry(&d, 1, "RUN old"))
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(a.lookup(&ns, &[key(1)]).await.unwrap().is_empty());
        let new = entry(&d, 1, "RUN new");
        assert_eq!(
            a.put_entry(&ns, &key(1), &new).await.unwrap(),
            PutOutcome::Created
        );
        let stored = a.bucket.read_entry(&ns, &key(1)).await.unwrap().unwrap();
        assert_eq!(stored.entry, new);
        assert!(a.bucket.has_refs(&d).await.unwrap());
    }

    #[tokio::test]
    async fn a_deleted_entry_stops_being_served_by_other_replicas_after_hit_recheck() {
        let mut f = Fixture::new();
        let a = f.replica("a", no_grace());
        let b = f.replica(
            "b",
            ReplicaConfig {
                hit_recheck: Duration::ZERO,
                ..no_grace()
            },
        );
        let ns = Namespace::default();
        let d = put_blob(&a, b"x").await;
        a.put_entry(&ns, &key(1), &entry(&d, 1, "RUN"))
            .await
            .unwrap();
        assert_eq!(b.lookup(&ns, &[key(1)]).await.unwrap().len(), 1);
        assert!(a.delete_entry(&ns, &key(1)).await.unwrap());
        assert!(b.lookup(&ns, &[key(1)]).await.unwrap().is_empty());
        assert!(!b.bucket.has_refs(&d).await.unwrap());
    }
}
