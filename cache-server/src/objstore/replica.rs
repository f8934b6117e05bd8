//! One cache-server replica over a shared bucket: the operations of the
//! HTTP API (lookup, entries, blobs, GC) with the bucket as the truth and
//! the [`LocalIndex`] as a cache in front of it.
//!
//! Visibility across replicas (docs/object-storage.md):
//! - an entry written through any replica is found by every other one at
//!   most `miss_recheck` after it was written (a local miss asks the bucket
//!   again once that long has passed since it last asked for that key; 0
//!   asks every time);
//! - an entry removed from the bucket (GC, `DELETE`), or replaced by
//!   another write of its key after that, stops being served by other
//!   replicas at most `hit_recheck` later (a stale hit is read again, not
//!   only checked for existence);
//! - a lookup never fails because the bucket does not answer: keys it could
//!   not ask about are misses, cached entries it could not confirm are hits.
//!
//! GC safety, for blobs older than `blob_grace` that no entry named when GC
//! listed the bucket (younger ones are never deleted):
//! - GC: write the intent `gc/doomed/<blob>` (g0), LIST `refs/<blob>/` (g1),
//!   delete the blob only if that found no marker (g2), remove the intent;
//! - writer: put its marker `refs/<blob>/<ns>/<key>.<nonce>` (w0), then
//!   HEAD the intent (w1) and the blob (w2), and create the entry, which
//!   records `<nonce>`, only if there is no fresh intent and the blob is
//!   there.
//!
//! If w0 < g1, GC sees the marker and keeps the blob. Otherwise g0 < g1 <
//! w0 < w1: the writer sees the intent, or it was already removed, which
//! happens after g2, so the blob is gone at w2. Either way no entry is
//! created for a blob GC deletes (given the read-after-write consistency S3
//! has had since 2020). A refused writer gets `422 missing_blob` and uploads
//! again. Intents older than `lease_ttl` (a crashed GC) are ignored and
//! cleared.
//!
//! That holds as long as a live entry's marker is never removed. Markers
//! are per write (the nonce), so the only marker with an entry's path is
//! the one its own write put, and it is removed only
//! - after that entry object was deleted (eviction, TTL, `DELETE`, an
//!   expired entry replaced), by its exact nonce, read from the entry; or
//! - when it is older than the marker grace (`blob_grace` and `lease_ttl`
//!   both) and the entry under its key, read right before, is absent or
//!   records another nonce: its write was refused, lost the
//!   first-writer-wins race, died, or its entry is gone. A writer creates
//!   its entry right after its marker, so one that old is done with
//!   trying (the assumption `blob_grace` has always made of writers).
//!
//! A writer re-creating a key GC is evicting puts a marker no deletion of
//! the old entry's names; docs/object-storage.md goes through the
//! interleavings, and what happens to markers of the previous version
//! (`<key hex>` without a nonce).

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
use kiln_storage::{ContractError, GcReport, Namespace, PutOutcome, Stats, now_ms};

/// Bucket requests one lookup sends at the same time.
const LOOKUP_CONCURRENCY: usize = 32;
pub(super) const GC_LEASE: &str = "gc";

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

/// Whether two entry objects are the same write (same marker nonce).
/// Entries without a nonce (no layer, or legacy) are never "the same".
fn same_write(a: &EntryObject, b: &EntryObject) -> bool {
    a.ref_nonce.is_some() && a.ref_nonce == b.ref_nonce
}

type EntryId = (Namespace, CacheKey);

/// What one GC pass decided from its listings.
struct GcPlan {
    now: u64,
    report: GcReport,
    blobs: Vec<(Digest, object_store::ObjectMeta)>,
    live_entries: u64,
    /// Entries to remove (expired, evicted).
    doomed: Vec<ListedEntry>,
    /// The markers the writes of the doomed entries put, exactly (by
    /// nonce): removed after the entries.
    doomed_markers: Vec<RefMarker>,
    /// Markers older than the marker grace whose write looked dead (no
    /// entry, or an entry of another write); checked again before removal.
    stale_markers: Vec<RefMarker>,
    /// Blobs some marker still protects after the removals.
    referenced: HashSet<Digest>,
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
    async fn remove_object(
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
    /// `max_size` (each entry object, then its write's marker), drop
    /// markers whose write is dead, then delete blobs that no marker names
    /// and that are older than `blob_grace`.
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

    /// The pass in phases (separate so tests can run a writer between
    /// them): plan from the listings, remove entries, then their markers
    /// and dead ones, then collect blobs.
    async fn gc_pass(&self) -> Result<GcReport, ObjError> {
        let plan = self.plan_gc().await?;
        if !plan.doomed.is_empty() {
            self.renew_lease().await?;
        }
        self.remove_entries(&plan).await?;
        self.remove_markers(&plan).await?;
        self.renew_lease().await?;
        self.collect_blobs(plan).await
    }

    /// Lists the bucket and decides: which entries go, which marker each
    /// of their writes put, which markers look dead, which blobs stay.
    async fn plan_gc(&self) -> Result<GcPlan, ObjError> {
        let mut report = GcReport::default();
        let now = now_ms();
        let c = &self.config;
        // A marker is written right before its entry; one younger than this
        // may belong to a writer still between the two, so it counts
        // whatever the entries say. Never shorter than the lease, whatever
        // `blob_grace` says.
        let marker_grace = c.blob_grace.max(c.lease_ttl).as_millis() as u64;
        // Blobs first, then markers, then entries: a blob uploaded after
        // the blob listing is simply not considered this pass.
        let blobs = self.bucket.list_blobs().await?;
        let refs = self.bucket.list_refs().await?;
        let entries = self.bucket.list_entries().await?;

        let listed: HashSet<EntryId> = entries.iter().map(|e| (e.ns.clone(), e.key)).collect();
        let mut by_key: HashMap<EntryId, Vec<(RefMarker, u64)>> = HashMap::new();
        for (marker, modified_ms) in refs {
            by_key
                .entry((marker.ns.clone(), marker.key))
                .or_default()
                .push((marker, modified_ms));
        }
        // Which of several markers of one key is the entry's own takes the
        // entry's nonce: one GET each. A key with one marker and an entry
        // is taken to be that entry's own without a GET (see
        // docs/object-storage.md for when that keeps a dead marker).
        let ambiguous = by_key
            .iter()
            .filter(|(id, markers)| markers.len() > 1 && listed.contains(*id))
            .map(|(id, _)| id.clone())
            .collect();
        let mut current = self.read_entries(ambiguous).await?;

        // Markers that count for an entry (freed when it goes), and for
        // each blob every marker that still protects it.
        let mut owned: HashMap<EntryId, Vec<RefMarker>> = HashMap::new();
        let mut holders: HashMap<Digest, HashSet<RefMarker>> = HashMap::new();
        let mut stale_markers = Vec::new();
        for (id, markers) in by_key {
            for (marker, modified_ms) in markers {
                let own = match current.get(&id) {
                    Some(Some(object)) => marker.written_for(object),
                    Some(None) => false,
                    None => listed.contains(&id),
                };
                if own {
                    owned.entry(id.clone()).or_default().push(marker.clone());
                    holders
                        .entry(marker.blob.clone())
                        .or_default()
                        .insert(marker);
                } else if now.saturating_sub(modified_ms) < marker_grace {
                    // A writer between its marker and its entry, maybe:
                    // protects its blob, but is not this key's entry's.
                    holders
                        .entry(marker.blob.clone())
                        .or_default()
                        .insert(marker);
                } else {
                    // Its write lost the race, was refused, died, or its
                    // entry was removed: checked again before it goes.
                    stale_markers.push(marker);
                }
            }
        }

        // Entries to remove: expired ones, then the oldest while over size.
        let blob_sizes: HashMap<Digest, u64> =
            blobs.iter().map(|(d, m)| (d.clone(), m.size)).collect();
        let mut total: u64 = blob_sizes.values().sum();
        let mut free = |e: &ListedEntry, total: &mut u64| {
            for marker in owned.get(&(e.ns.clone(), e.key)).into_iter().flatten() {
                if let Some(set) = holders.get_mut(&marker.blob)
                    && set.remove(marker)
                    && set.is_empty()
                {
                    *total =
                        total.saturating_sub(blob_sizes.get(&marker.blob).copied().unwrap_or(0));
                }
            }
        };
        let mut ordered: Vec<&ListedEntry> = entries.iter().collect();
        ordered.sort_by_key(|e| e.last_modified_ms);
        let mut doomed: Vec<ListedEntry> = Vec::new();
        let mut rest = Vec::new();
        for e in ordered {
            if self.expired(e.last_modified_ms, now) {
                free(e, &mut total);
                doomed.push(e.clone());
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
                doomed.push(e.clone());
                report.entries_evicted += 1;
                // The bucket keeps no access times: the entry's age since
                // creation stands in for its idle time (docs/object-storage.md).
                crate::telemetry::record_eviction(now.saturating_sub(e.last_modified_ms));
            }
        }

        // The exact marker of each doomed entry's write, from the entry
        // itself: any other marker of its key is another write's.
        let unknown = doomed
            .iter()
            .map(|e| (e.ns.clone(), e.key))
            .filter(|id| !current.contains_key(id))
            .collect();
        current.extend(self.read_entries(unknown).await?);
        let doomed_markers = doomed
            .iter()
            .filter_map(|e| {
                let object = current.get(&(e.ns.clone(), e.key))?.as_ref()?;
                RefMarker::of_entry(&e.ns, &e.key, object)
            })
            .collect();
        let referenced = holders
            .into_iter()
            .filter(|(_, set)| !set.is_empty())
            .map(|(digest, _)| digest)
            .collect();
        Ok(GcPlan {
            now,
            report,
            blobs,
            live_entries: entries.len() as u64 - doomed.len() as u64,
            doomed,
            doomed_markers,
            stale_markers,
            referenced,
        })
    }

    /// The entry objects under `ids` now (`None`: absent). An object that
    /// does not parse is left out, so GC treats it as unknown and keeps
    /// the markers of its key rather than guess.
    async fn read_entries(
        &self,
        ids: Vec<EntryId>,
    ) -> Result<HashMap<EntryId, Option<EntryObject>>, ObjError> {
        let read: Vec<(EntryId, Result<Option<EntryObject>, ObjError>)> =
            futures::stream::iter(ids)
                .map(|(ns, key)| async move {
                    let object = self.bucket.read_entry(&ns, &key).await;
                    ((ns, key), object)
                })
                .buffer_unordered(LOOKUP_CONCURRENCY)
                .collect()
                .await;
        let mut out = HashMap::with_capacity(read.len());
        for (id, object) in read {
            match object {
                Ok(object) => {
                    out.insert(id, object);
                }
                Err(e @ ObjError::Corrupt { .. }) => {
                    warn!(error = %e, "gc keeps the markers of an unreadable entry")
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }

    /// Deletes the doomed entry objects (before their markers: an entry
    /// must never be left without the marker protecting its blob).
    async fn remove_entries(&self, plan: &GcPlan) -> Result<(), ObjError> {
        let entry_paths = plan
            .doomed
            .iter()
            .map(|e| self.bucket.entry_path(&e.ns, &e.key))
            .collect();
        self.bucket.delete_many(entry_paths).await?;
        self.index
            .remove_many(plan.doomed.iter().map(|e| (&e.ns, &e.key)))?;
        Ok(())
    }

    /// Deletes the markers of the removed entries' writes, exactly by
    /// nonce, then the stale markers whose write is still dead.
    async fn remove_markers(&self, plan: &GcPlan) -> Result<(), ObjError> {
        let marker_paths = plan
            .doomed_markers
            .iter()
            .map(|m| self.bucket.ref_marker_path(m))
            .collect();
        self.bucket.delete_many(marker_paths).await?;
        if plan.stale_markers.is_empty() {
            return Ok(());
        }
        // Read again right before: the listing is a while ago. A marker
        // goes only if the entry now there is not its write (absent, or
        // naming another nonce); an unreadable entry keeps it.
        let ids = plan
            .stale_markers
            .iter()
            .map(|m| (m.ns.clone(), m.key))
            .collect::<HashSet<_>>()
            .into_iter()
            .collect();
        let current = self.read_entries(ids).await?;
        let dead = plan
            .stale_markers
            .iter()
            .filter(|m| match current.get(&(m.ns.clone(), m.key)) {
                Some(Some(object)) => !m.written_for(object),
                Some(None) => true,
                None => false,
            })
            .map(|m| self.bucket.ref_marker_path(m))
            .collect();
        self.bucket.delete_many(dead).await?;
        Ok(())
    }

    /// Clears stale intents and deletes the blobs no marker protects,
    /// each through the intent protocol of the module docs.
    async fn collect_blobs(&self, plan: GcPlan) -> Result<GcReport, ObjError> {
        let GcPlan {
            now,
            mut report,
            blobs,
            live_entries,
            referenced,
            ..
        } = plan;
        let grace = self.config.blob_grace.as_millis() as u64;
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
            let young =
                now.saturating_sub(meta.last_modified.timestamp_millis().max(0) as u64) < grace;
            if referenced.contains(digest) || young {
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
        *self.listed.lock().unwrap_or_else(|p| p.into_inner()) =
            (live_entries, remaining_blobs, remaining_bytes);
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
            Err(ObjError::Contract(ContractError::MissingBlob(_)))
        ));
        let d = put_blob(&a, b"abc").await;
        assert!(matches!(
            a.put_entry(&ns, &key(1), &entry(&d, 4, "RUN")).await,
            Err(ObjError::Contract(ContractError::LayerSizeMismatch { .. }))
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
            Err(ObjError::Contract(ContractError::MissingBlob(_)))
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

    /// A replica that cached E1 must not go on serving it once the key was
    /// deleted (evicted) and written again with E2: checking that *an*
    /// object exists under the key is not enough.
    #[tokio::test]
    async fn a_key_deleted_and_written_again_is_served_with_its_new_entry_after_hit_recheck() {
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
        let d1 = put_blob(&a, b"first").await;
        let d2 = put_blob(&a, b"second").await;
        let e1 = entry(&d1, 5, "RUN build (first)");
        let e2 = entry(&d2, 6, "RUN build (again)");
        a.put_entry(&ns, &key(1), &e1).await.unwrap();
        assert_eq!(b.lookup(&ns, &[key(1)]).await.unwrap()[&key(1)], e1);
        assert!(a.delete_entry(&ns, &key(1)).await.unwrap());
        a.put_entry(&ns, &key(1), &e2).await.unwrap();
        assert_eq!(b.lookup(&ns, &[key(1)]).await.unwrap()[&key(1)], e2);
    }

    /// The gap the per-write nonces close: GC evicts E1 and, between the
    /// deletion of E1's object and of E1's marker, a writer re-creates the
    /// same key naming the same blob. GC's marker deletion must not take
    /// the new entry's marker, and no later pass may take the blob.
    #[tokio::test]
    async fn gc_evicting_a_key_while_a_writer_recreates_it_keeps_the_new_entrys_blob() {
        let mut f = Fixture::new();
        // Evicts every entry it sees; no blob grace at all.
        let evicting = f.replica(
            "gc",
            ReplicaConfig {
                max_size: Some(1),
                ..no_grace()
            },
        );
        let writer = f.replica("w", no_grace());
        let later = f.replica("later", no_grace());
        let ns = Namespace::default();
        let d = put_blob(&writer, b"layer bytes").await;
        let e1 = entry(&d, 11, "RUN build (first)");
        assert_eq!(
            writer.put_entry(&ns, &key(1), &e1).await.unwrap(),
            PutOutcome::Created
        );

        // GC decides to evict E1 and deletes its entry object...
        let plan = evicting.plan_gc().await.unwrap();
        assert_eq!(plan.doomed.len(), 1);
        evicting.remove_entries(&plan).await.unwrap();
        // ...the step is rebuilt at that very moment: E2, same key and blob...
        let e2 = entry(&d, 11, "RUN build (again)");
        assert_eq!(
            writer.put_entry(&ns, &key(1), &e2).await.unwrap(),
            PutOutcome::Created
        );
        // ...then GC's marker deletion and blob collection run.
        evicting.remove_markers(&plan).await.unwrap();
        evicting.collect_blobs(plan).await.unwrap();

        // The next pass (by a replica without a size limit) finds E2's
        // marker and keeps the blob.
        assert!(later.gc().await.unwrap().lease_held);
        assert!(
            later.blob_size(&d).await.unwrap().is_some(),
            "the blob of live entry E2 was deleted"
        );
        assert!(later.bucket.has_refs(&d).await.unwrap());
        let found = later.lookup(&ns, &[key(1)]).await.unwrap();
        assert_eq!(found.get(&key(1)), Some(&e2));
    }

    /// Every marker in the bucket, sorted for comparisons.
    async fn markers(r: &Replica) -> Vec<RefMarker> {
        let mut all: Vec<RefMarker> = r
            .bucket
            .list_refs()
            .await
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        all.sort_by_key(|m| (m.key, m.nonce.map(|n| n.to_string())));
        all
    }

    /// GC with no marker grace at all (`blob_grace` and `lease_ttl` 0):
    /// every marker whose write is not the entry there is collectable.
    fn sweeping() -> ReplicaConfig {
        ReplicaConfig {
            lease_ttl: Duration::ZERO,
            ..no_grace()
        }
    }

    #[tokio::test]
    async fn the_old_entrys_marker_is_collected_after_a_pass_that_stopped_between_entry_and_marker()
    {
        let mut f = Fixture::new();
        let evicting = f.replica(
            "gc",
            ReplicaConfig {
                max_size: Some(1),
                ..no_grace()
            },
        );
        let writer = f.replica("w", no_grace());
        let sweeper = f.replica("sweep", sweeping());
        let ns = Namespace::default();
        let d = put_blob(&writer, b"layer").await;
        writer
            .put_entry(&ns, &key(1), &entry(&d, 5, "RUN 1"))
            .await
            .unwrap();
        let m1 = markers(&writer).await;
        assert_eq!(m1.len(), 1);

        // GC removes E1's object and dies before E1's marker.
        let plan = evicting.plan_gc().await.unwrap();
        assert_eq!(plan.doomed_markers, m1);
        evicting.remove_entries(&plan).await.unwrap();
        drop(plan);
        let e2 = entry(&d, 5, "RUN 2");
        writer.put_entry(&ns, &key(1), &e2).await.unwrap();
        let both = markers(&writer).await;
        assert_eq!(both.len(), 2, "M1 and M2 are different objects");

        // E2 names M2's nonce, not M1's: M1 goes, M2 and the blob stay.
        sweeper.gc().await.unwrap();
        let left = markers(&sweeper).await;
        assert_eq!(left.len(), 1);
        assert_ne!(left, m1);
        let stored = sweeper
            .bucket
            .read_entry(&ns, &key(1))
            .await
            .unwrap()
            .unwrap();
        assert!(left[0].written_for(&stored));
        assert!(sweeper.blob_size(&d).await.unwrap().is_some());
        assert_eq!(
            sweeper.lookup(&ns, &[key(1)]).await.unwrap().get(&key(1)),
            Some(&e2)
        );
        // And the same holds pass after pass.
        sweeper.gc().await.unwrap();
        assert_eq!(markers(&sweeper).await, left);
        assert!(sweeper.blob_size(&d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_writer_that_loses_the_race_leaves_no_marker_that_outlives_the_grace() {
        let mut f = Fixture::new();
        let (a, b) = (f.replica("a", no_grace()), f.replica("b", no_grace()));
        let sweeper = f.replica("sweep", sweeping());
        let ns = Namespace::default();
        let d = put_blob(&a, b"shared layer").await;
        let other = put_blob(&a, b"the loser's layer").await;
        assert_eq!(
            a.put_entry(&ns, &key(1), &entry(&d, 12, "RUN a"))
                .await
                .unwrap(),
            PutOutcome::Created
        );
        let winner = markers(&a).await;
        // Losers remove their own markers, same blob or not.
        assert!(matches!(
            b.put_entry(&ns, &key(1), &entry(&d, 12, "RUN b"))
                .await
                .unwrap(),
            PutOutcome::Conflict { .. }
        ));
        assert!(matches!(
            b.put_entry(&ns, &key(1), &entry(&other, 17, "RUN c"))
                .await
                .unwrap(),
            PutOutcome::Conflict { .. }
        ));
        assert_eq!(
            b.put_entry(&ns, &key(1), &entry(&d, 12, "RUN a"))
                .await
                .unwrap(),
            PutOutcome::Identical
        );
        assert_eq!(markers(&a).await, winner);

        // Losers that died before removing them: their markers are dead
        // (the entry names the winner's nonce)...
        for blob in [&d, &other] {
            let lost = RefMarker::new(blob.clone(), ns.clone(), key(1));
            b.bucket.put_ref(&lost).await.unwrap();
        }
        assert_eq!(markers(&a).await.len(), 3);
        // ...but while young they still count: their writer might be about
        // to create its entry.
        assert_eq!(a.gc().await.unwrap().report.blobs_removed, 0);
        assert_eq!(markers(&a).await.len(), 3);
        // Past the marker grace they go, and so does the blob only they
        // protected; the winner's marker and blob stay.
        assert_eq!(sweeper.gc().await.unwrap().report.blobs_removed, 1);
        assert_eq!(markers(&a).await, winner);
        assert!(a.blob_size(&other).await.unwrap().is_none());
        assert!(a.blob_size(&d).await.unwrap().is_some());
        assert_eq!(a.lookup(&ns, &[key(1)]).await.unwrap().len(), 1);
    }

    /// An entry and its marker as the previous version wrote them: no
    /// nonce anywhere.
    async fn put_legacy(r: &Replica, ns: &Namespace, k: CacheKey, e: &CacheEntry) -> RefMarker {
        let object = EntryObject {
            created_ms: now_ms(),
            entry: e.clone(),
            ref_nonce: None,
        };
        let marker = RefMarker::of_entry(ns, &k, &object).unwrap();
        assert_eq!(marker.nonce, None);
        r.bucket.put_ref(&marker).await.unwrap();
        assert_eq!(
            r.bucket.create_entry(ns, &k, &object).await.unwrap(),
            EntryCreate::Created
        );
        marker
    }

    #[tokio::test]
    async fn entries_and_markers_of_the_previous_version_keep_working() {
        let mut f = Fixture::new();
        let a = f.replica("a", sweeping());
        let ns = Namespace::default();
        let d = put_blob(&a, b"old layer").await;
        let old1 = put_legacy(&a, &ns, key(1), &entry(&d, 9, "RUN old 1")).await;
        let old2 = put_legacy(&a, &ns, key(2), &entry(&d, 9, "RUN old 2")).await;

        // A legacy marker under a legacy entry naming its blob is live,
        // even with no grace at all and next to a dead new-style marker of
        // the same key (which makes GC read the entry to tell them apart);
        // a new write losing to a legacy entry removes only its own marker.
        let lost = RefMarker::new(d.clone(), ns.clone(), key(1));
        a.bucket.put_ref(&lost).await.unwrap();
        a.gc().await.unwrap();
        assert_eq!(markers(&a).await, vec![old1.clone(), old2.clone()]);
        assert!(matches!(
            a.put_entry(&ns, &key(1), &entry(&d, 9, "RUN new"))
                .await
                .unwrap(),
            PutOutcome::Conflict { .. }
        ));
        a.gc().await.unwrap();
        assert_eq!(markers(&a).await, vec![old1.clone(), old2.clone()]);
        assert!(a.blob_size(&d).await.unwrap().is_some());
        assert_eq!(a.lookup(&ns, &[key(1), key(2)]).await.unwrap().len(), 2);

        // DELETE removes a legacy entry's legacy marker.
        assert!(a.delete_entry(&ns, &key(1)).await.unwrap());
        assert_eq!(markers(&a).await, vec![old2.clone()]);

        // A legacy entry removed by a GC of the previous version that died
        // before the marker, then written again by this version: the new
        // entry names a nonce, so the legacy marker is dead and goes.
        a.bucket.delete_entry(&ns, &key(2)).await.unwrap();
        let e = entry(&d, 9, "RUN new 2");
        assert_eq!(
            a.put_entry(&ns, &key(2), &e).await.unwrap(),
            PutOutcome::Created
        );
        a.gc().await.unwrap();
        let left = markers(&a).await;
        assert_eq!(left.len(), 1);
        assert!(left[0].nonce.is_some());
        assert!(a.blob_size(&d).await.unwrap().is_some());
        assert_eq!(
            a.lookup(&ns, &[key(2)]).await.unwrap().get(&key(2)),
            Some(&e)
        );
    }
}
