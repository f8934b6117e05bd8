//! Specifications of a replica (in-memory buckets, several replicas).

use std::collections::BTreeMap;
use std::time::Duration;

use kiln_common::{CacheEntry, CacheKey, Digest};

use crate::objstore::ObjError;
use crate::objstore::bucket::{Bucket, EntryCreate, EntryObject, RefMarker};
use kiln_storage::{ContractError, Namespace, PutOutcome, now_ms};

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
    let evicting = f.replica("gc", evicting_everything());
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

/// GC that evicts every entry it sees (a 1-byte limit), with no blob
/// grace.
fn evicting_everything() -> ReplicaConfig {
    ReplicaConfig {
        max_size: Some(1),
        ..no_grace()
    }
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
async fn the_old_entrys_marker_is_collected_after_a_pass_that_stopped_between_entry_and_marker() {
    let mut f = Fixture::new();
    let evicting = f.replica("gc", evicting_everything());
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
