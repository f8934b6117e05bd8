//! Specifications of the index (one store per test, on a temporary
//! directory).

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_common::{CacheEntry, CacheKey, Digest, LayerDescriptor};

use super::*;
use crate::error::ContractError;
use crate::namespace::Namespace;
use crate::reports::{BlobCommit, PutOutcome};

fn key(n: u8) -> CacheKey {
    CacheKey::from_bytes([n; 32])
}

fn put_blob(store: &Store, bytes: &[u8]) -> Digest {
    let digest = Digest::of_bytes(bytes);
    let mut w = store.blob_writer().unwrap();
    w.write_all(bytes).unwrap();
    w.commit(&digest).unwrap();
    digest
}

fn entry_for(digest: Option<&Digest>, size: u64, by: &str) -> CacheEntry {
    CacheEntry {
        layer: digest.map(|d| LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d.clone(),
            size,
            diff_id: d.clone(),
        }),
        created_by: by.into(),
        created: "2026-11-24T00:00:00Z".into(),
        extra: BTreeMap::new(),
    }
}

fn files_in(dir: &Path) -> usize {
    walk(dir).len()
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

#[test]
fn linked_blob_shares_the_source_inode_and_is_indexed() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cache"), StoreConfig::default()).unwrap();
    let src = dir.path().join("layer");
    std::fs::write(&src, b"layer bytes").unwrap();
    let d = Digest::of_bytes(b"layer bytes");
    assert_eq!(
        store.link_blob(&src, &d).unwrap(),
        Some(BlobCommit::Created)
    );
    let stored = store.blob_path(&d);
    assert_eq!(
        std::fs::metadata(&stored).unwrap().ino(),
        std::fs::metadata(&src).unwrap().ino()
    );
    assert_eq!(store.stat_blob(&d).unwrap().unwrap().size, 11);
    assert_eq!(
        store.link_blob(&src, &d).unwrap(),
        Some(BlobCommit::Existed)
    );
    assert_eq!(files_in(&dir.path().join("cache/tmp")), 0);
}

#[test]
fn linked_blob_with_other_bytes_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(&dir.path().join("cache"), StoreConfig::default()).unwrap();
    let src = dir.path().join("layer");
    std::fs::write(&src, b"evil").unwrap();
    let want = Digest::of_bytes(b"good");
    let err = store.link_blob(&src, &want).unwrap_err();
    assert!(
        matches!(err, StoreError::Contract(ContractError::DigestMismatch { ref actual, .. }) if *actual == Digest::of_bytes(b"evil")),
        "{err}"
    );
    assert!(store.stat_blob(&want).unwrap().is_none());
    assert!(!store.blob_path(&want).exists());
    assert_eq!(files_in(&dir.path().join("cache/tmp")), 0);
}

#[test]
fn entries_are_first_writer_wins() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ns = Namespace::default();
    let d = put_blob(&store, b"layer");
    let e1 = entry_for(Some(&d), 5, "RUN a");
    let e2 = entry_for(Some(&d), 5, "RUN b");
    assert_eq!(
        store.put_entry(&ns, &key(1), &e1).unwrap(),
        PutOutcome::Created
    );
    assert_eq!(
        store.put_entry(&ns, &key(1), &e1).unwrap(),
        PutOutcome::Identical
    );
    assert!(matches!(
        store.put_entry(&ns, &key(1), &e2).unwrap(),
        PutOutcome::Conflict { existing } if *existing == e1
    ));
    assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), Some(e1));
    assert_eq!(store.stat_blob(&d).unwrap().unwrap().references, 1);
}

#[test]
fn entry_naming_an_unknown_blob_or_wrong_size_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ns = Namespace::default();
    let missing = Digest::of_bytes(b"nope");
    let err = store
        .put_entry(&ns, &key(1), &entry_for(Some(&missing), 4, "RUN x"))
        .unwrap_err();
    assert!(matches!(err, StoreError::Contract(ContractError::MissingBlob(d)) if d == missing));
    let d = put_blob(&store, b"12345");
    let err = store
        .put_entry(&ns, &key(1), &entry_for(Some(&d), 4, "RUN x"))
        .unwrap_err();
    assert!(
        matches!(
            err,
            StoreError::Contract(ContractError::LayerSizeMismatch { .. })
        ),
        "{err}"
    );
    assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
    assert_eq!(
        store
            .put_entry(&ns, &key(2), &entry_for(None, 0, "RUN true"))
            .unwrap(),
        PutOutcome::Created
    );
}

#[test]
fn a_mismatched_blob_leaves_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let claimed = Digest::of_bytes(b"good");
    let mut w = store.blob_writer().unwrap();
    w.write_all(b"evil").unwrap();
    let err = w.commit(&claimed).unwrap_err();
    assert!(
        matches!(err, StoreError::Contract(ContractError::DigestMismatch { ref actual, .. }) if *actual == Digest::of_bytes(b"evil"))
    );
    assert!(store.stat_blob(&claimed).unwrap().is_none());
    assert_eq!(files_in(&dir.path().join("blobs")), 0);
    assert_eq!(files_in(&dir.path().join("tmp")), 0);
}

#[test]
fn namespaces_do_not_see_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let a = Namespace::new("team-a").unwrap();
    let b = Namespace::new("team-b").unwrap();
    let e = entry_for(None, 0, "RUN a");
    store.put_entry(&a, &key(7), &e).unwrap();
    assert!(store.lookup(&b, &[key(7)]).unwrap().is_empty());
    assert!(
        store
            .lookup(&Namespace::default(), &[key(7)])
            .unwrap()
            .is_empty()
    );
    assert_eq!(store.lookup(&a, &[key(7)]).unwrap().len(), 1);
    assert_eq!(
        store
            .put_entry(&b, &key(7), &entry_for(None, 0, "RUN b"))
            .unwrap(),
        PutOutcome::Created
    );
    assert_eq!(store.list_entries(&a, "", None, 10).unwrap().len(), 1);
    assert!(Namespace::new("Bad/NS").is_err());
}

#[test]
fn reopening_drops_entries_whose_blob_vanished_and_adopts_unknown_files() {
    let dir = tempfile::tempdir().unwrap();
    let ns = Namespace::default();
    let (gone, kept) = {
        let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
        let gone = put_blob(&store, b"gone");
        let kept = put_blob(&store, b"kept");
        store
            .put_entry(&ns, &key(1), &entry_for(Some(&gone), 4, "RUN 1"))
            .unwrap();
        store
            .put_entry(&ns, &key(2), &entry_for(Some(&kept), 4, "RUN 2"))
            .unwrap();
        (gone, kept)
    };
    std::fs::remove_file(dir.path().join("blobs").join(gone.sharded_path())).unwrap();
    let stray = Digest::of_bytes(b"stray");
    let p = dir.path().join("blobs").join(stray.sharded_path());
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, b"stray").unwrap();
    std::fs::write(dir.path().join("tmp/upload-leftover"), b"partial").unwrap();

    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let report = store.recovery_report();
    assert_eq!(report.blobs_missing, vec![gone.clone()]);
    assert_eq!(report.entries_dropped, 1);
    assert_eq!(report.blobs_adopted, 1);
    assert_eq!(report.temp_files_removed, 1);
    assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
    assert!(store.get_entry(&ns, &key(2)).unwrap().is_some());
    assert_eq!(store.stat_blob(&stray).unwrap().unwrap().references, 0);
    assert_eq!(store.stat_blob(&kept).unwrap().unwrap().references, 1);
    assert_eq!(store.stats().blob_bytes, 4 + 5);
}

#[test]
fn eviction_removes_least_recently_used_entries_first() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        max_size: Some(250),
        blob_grace: Duration::from_secs(3600),
        access_granularity: Duration::ZERO,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let ns = Namespace::default();
    let mut digests = Vec::new();
    for i in 0..3u8 {
        let bytes = vec![i; 100];
        let d = put_blob(&store, &bytes);
        store
            .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
            .unwrap();
        digests.push(d);
        std::thread::sleep(Duration::from_millis(5));
    }
    // Key 0 becomes the most recently used; key 1 is now the oldest.
    std::thread::sleep(Duration::from_millis(5));
    assert_eq!(store.lookup(&ns, &[key(0)]).unwrap().len(), 1);
    assert!(store.over_limit());
    let report = store.gc().unwrap();
    assert_eq!(report.entries_evicted, 1);
    assert_eq!(store.get_entry(&ns, &key(1)).unwrap(), None);
    assert!(store.get_entry(&ns, &key(0)).unwrap().is_some());
    assert!(store.stat_blob(&digests[1]).unwrap().is_none());
    assert!(
        !dir.path()
            .join("blobs")
            .join(digests[1].sharded_path())
            .exists()
    );
}

#[test]
fn evict_on_demand_frees_down_to_the_given_size() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ns = Namespace::default();
    for i in 0..3u8 {
        let d = put_blob(&store, &[i; 100]);
        store
            .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    let report = store.evict(150).unwrap();
    assert_eq!(report.entries_evicted, 2);
    assert_eq!(report.bytes_freed, 200);
    assert_eq!(store.stats().blob_bytes, 100);
    assert!(
        store.get_entry(&ns, &key(2)).unwrap().is_some(),
        "newest stays"
    );
    assert!(store.get_entry(&ns, &key(0)).unwrap().is_none());
}

#[test]
fn accesses_seen_while_the_lock_is_busy_still_count_for_eviction() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        access_granularity: Duration::ZERO,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let ns = Namespace::default();
    for i in 0..3u8 {
        let d = put_blob(&store, &[i; 100]);
        store
            .put_entry(&ns, &key(i), &entry_for(Some(&d), 100, "RUN"))
            .unwrap();
        std::thread::sleep(Duration::from_millis(3));
    }
    {
        let _busy = store.write_lock();
        assert_eq!(store.lookup(&ns, &[key(0)]).unwrap().len(), 1);
    }
    assert_eq!(store.evict(200).unwrap().entries_evicted, 1);
    assert!(
        store.get_entry(&ns, &key(0)).unwrap().is_some(),
        "recently read"
    );
    assert!(
        store.get_entry(&ns, &key(1)).unwrap().is_none(),
        "least recently used"
    );
}

#[test]
fn eviction_never_removes_a_pinned_blob() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        max_size: Some(50),
        blob_grace: Duration::ZERO,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let ns = Namespace::default();
    let a = put_blob(&store, &[1u8; 100]);
    store
        .put_entry(&ns, &key(1), &entry_for(Some(&a), 100, "RUN a"))
        .unwrap();
    let b = put_blob(&store, &[2u8; 100]);
    store
        .put_entry(&ns, &key(2), &entry_for(Some(&b), 100, "RUN b"))
        .unwrap();
    let reading = store.open_blob(&a).unwrap().unwrap();
    let report = store.gc().unwrap();
    assert_eq!(report.entries_evicted, 2);
    assert!(report.blobs_pinned >= 1);
    assert!(store.stat_blob(&a).unwrap().is_some());
    assert!(dir.path().join("blobs").join(a.sharded_path()).exists());
    assert!(store.stat_blob(&b).unwrap().is_none());
    drop(reading);
    store.gc().unwrap();
    assert!(store.stat_blob(&a).unwrap().is_none());
    assert_eq!(store.stats().blob_bytes, 0);
}

#[test]
fn gc_keeps_pinned_and_young_unreferenced_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        blob_grace: Duration::ZERO,
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let loose = put_blob(&store, b"loose");
    let held = put_blob(&store, b"held");
    let pin = store.pin(&held);
    let report = store.gc().unwrap();
    assert_eq!(report.blobs_removed, 1);
    assert_eq!(report.blobs_pinned, 1);
    assert!(store.stat_blob(&loose).unwrap().is_none());
    assert!(store.stat_blob(&held).unwrap().is_some());
    drop(pin);
    assert_eq!(store.gc().unwrap().blobs_removed, 1);

    let dir2 = tempfile::tempdir().unwrap();
    let young = Store::open(dir2.path(), StoreConfig::default()).unwrap();
    let d = put_blob(&young, b"young");
    assert_eq!(young.gc().unwrap().blobs_removed, 0);
    assert!(young.stat_blob(&d).unwrap().is_some());
}

#[test]
fn expired_entries_are_not_served_and_gc_removes_them() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        entry_ttl: Some(Duration::from_millis(50)),
        ..StoreConfig::default()
    };
    let store = Store::open(dir.path(), config).unwrap();
    let ns = Namespace::default();
    store
        .put_entry(&ns, &key(1), &entry_for(None, 0, "RUN"))
        .unwrap();
    assert!(store.get_entry(&ns, &key(1)).unwrap().is_some());
    std::thread::sleep(Duration::from_millis(80));
    assert!(store.get_entry(&ns, &key(1)).unwrap().is_none());
    assert_eq!(store.gc().unwrap().entries_expired, 1);
    assert_eq!(store.stats().entries, 0);
    // A new entry may take the expired one's place.
    assert_eq!(
        store
            .put_entry(&ns, &key(1), &entry_for(None, 0, "RUN 2"))
            .unwrap(),
        PutOutcome::Created
    );
}

#[test]
fn verify_quarantines_corrupt_blobs_and_drops_their_entries() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ns = Namespace::default();
    let good = put_blob(&store, b"good");
    let bad = put_blob(&store, b"bad!");
    store
        .put_entry(&ns, &key(1), &entry_for(Some(&good), 4, "RUN"))
        .unwrap();
    store
        .put_entry(&ns, &key(2), &entry_for(Some(&bad), 4, "RUN"))
        .unwrap();
    std::fs::write(dir.path().join("blobs").join(bad.sharded_path()), b"rot!").unwrap();
    let dry = store.verify(false).unwrap();
    assert_eq!(dry.corrupt, vec![bad.clone()]);
    assert!(store.get_entry(&ns, &key(2)).unwrap().is_some());
    let report = store.verify(true).unwrap();
    assert_eq!(report.corrupt, vec![bad.clone()]);
    assert_eq!(report.entries_dropped, 1);
    assert!(store.get_entry(&ns, &key(2)).unwrap().is_none());
    assert!(store.open_blob(&bad).unwrap().is_none());
    assert!(dir.path().join("quarantine").join(bad.hex()).exists());
    assert!(store.get_entry(&ns, &key(1)).unwrap().is_some());
}

#[test]
fn listing_pages_through_a_namespace_with_a_prefix() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path(), StoreConfig::default()).unwrap();
    let ns = Namespace::default();
    for i in [0x10u8, 0x11, 0x12, 0x20] {
        store
            .put_entry(&ns, &key(i), &entry_for(None, 0, "RUN"))
            .unwrap();
    }
    let first = store.list_entries(&ns, "1", None, 2).unwrap();
    assert_eq!(
        first.iter().map(|r| r.key).collect::<Vec<_>>(),
        vec![key(0x10), key(0x11)]
    );
    let rest = store.list_entries(&ns, "1", Some(&key(0x11)), 10).unwrap();
    assert_eq!(
        rest.iter().map(|r| r.key).collect::<Vec<_>>(),
        vec![key(0x12)]
    );
    assert_eq!(store.list_entries(&ns, "", None, 100).unwrap().len(), 4);
}
