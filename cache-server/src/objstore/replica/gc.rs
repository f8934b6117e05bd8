//! GC under the lease: expiry, eviction, unreferenced blobs behind a
//! deletion intent, stale markers (the GC side of GC safety).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;

use futures::StreamExt;
use kiln_common::Digest;
use tracing::{info, warn};

use crate::objstore::ObjError;
use crate::objstore::bucket::{EntryObject, ListedEntry, RefMarker};
use kiln_storage::{GcReport, Stats, now_ms};

use super::*;

/// What one GC pass decided from its listings.
pub(super) struct GcPlan {
    pub(super) now: u64,
    pub(super) report: GcReport,
    pub(super) blobs: Vec<(Digest, object_store::ObjectMeta)>,
    pub(super) live_entries: u64,
    /// Entries to remove (expired, evicted).
    pub(super) doomed: Vec<ListedEntry>,
    /// The markers the writes of the doomed entries put, exactly (by
    /// nonce): removed after the entries.
    pub(super) doomed_markers: Vec<RefMarker>,
    /// Markers older than the marker grace whose write looked dead (no
    /// entry, or an entry of another write); checked again before removal.
    pub(super) stale_markers: Vec<RefMarker>,
    /// Blobs some marker still protects after the removals.
    pub(super) referenced: HashSet<Digest>,
}

impl Replica {
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

    pub(super) async fn renew_lease(&self) -> Result<(), ObjError> {
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
    pub(super) async fn gc_pass(&self) -> Result<GcReport, ObjError> {
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
    pub(super) async fn plan_gc(&self) -> Result<GcPlan, ObjError> {
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
    pub(super) async fn read_entries(
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
    pub(super) async fn remove_entries(&self, plan: &GcPlan) -> Result<(), ObjError> {
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
    pub(super) async fn remove_markers(&self, plan: &GcPlan) -> Result<(), ObjError> {
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
    pub(super) async fn collect_blobs(&self, plan: GcPlan) -> Result<GcReport, ObjError> {
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
    pub(super) async fn collect_blob(&self, digest: &Digest) -> Result<bool, ObjError> {
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
