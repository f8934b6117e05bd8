//! Specifications of the bucket layout (an in-memory object store).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest};
use object_store::path::Path;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutPayload};

use crate::objstore::ObjError;
use kiln_storage::{BlobCommit, ContractError, Namespace};

use super::*;
use object_store::memory::InMemory;
use std::collections::BTreeMap;

fn bucket() -> (Bucket, Arc<InMemory>) {
    let mem = Arc::new(InMemory::new());
    (Bucket::new(mem.clone(), "cache/v1", MIN_PART_SIZE), mem)
}

fn key(n: u8) -> CacheKey {
    CacheKey::from_bytes([n; 32])
}

fn entry(by: &str) -> EntryObject {
    EntryObject {
        created_ms: 1,
        entry: CacheEntry {
            layer: None,
            created_by: by.into(),
            created: "2026-11-24T12:00:00Z".into(),
            extra: BTreeMap::new(),
        },
        ref_nonce: None,
    }
}

fn pseudo_random(len: usize) -> Vec<u8> {
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn upload(b: &Bucket, expected: &Digest, data: &[u8]) -> Result<BlobCommit, ObjError> {
    let mut up = b.blob_upload(expected).await?;
    for chunk in data.chunks(64 << 10) {
        up.write(Bytes::copy_from_slice(chunk)).await?;
    }
    up.commit().await
}

#[tokio::test]
async fn the_conditional_write_probe_says_yes_for_a_store_that_refuses_overwrites_and_leaves_nothing()
 {
    let (b, _) = bucket();
    assert!(b.honours_conditional_create("r1-probe").await.unwrap());
    assert!(b.list_all().await.unwrap().is_empty());
}

#[tokio::test]
async fn small_and_multipart_blobs_round_trip_under_their_digest() {
    let (b, _) = bucket();
    for len in [0, 1000, MIN_PART_SIZE * 2 + 12345] {
        let data = pseudo_random(len);
        let d = Digest::of_bytes(&data);
        assert_eq!(upload(&b, &d, &data).await.unwrap(), BlobCommit::Created);
        assert_eq!(b.blob_size(&d).await.unwrap(), Some(len as u64));
        let read = b.get_blob(&d, None).await.unwrap().unwrap();
        let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), data);
        assert_eq!(upload(&b, &d, &data).await.unwrap(), BlobCommit::Existed);
    }
    let (d, meta) = &b.list_blobs().await.unwrap()[0];
    assert!(meta.location.as_ref().starts_with("cache/v1/blobs/sha256/"));
    assert!(b.blob_size(d).await.unwrap().is_some());
}

#[tokio::test]
async fn a_digest_mismatch_leaves_no_object_at_all() {
    let (b, mem) = bucket();
    for len in [10, MIN_PART_SIZE * 2 + 1] {
        let data = pseudo_random(len);
        let wrong = Digest::of_bytes(b"something else");
        let err = upload(&b, &wrong, &data).await.unwrap_err();
        assert!(
            matches!(
                err,
                ObjError::Contract(ContractError::DigestMismatch { .. })
            ),
            "{err}"
        );
    }
    let all: Vec<ObjectMeta> = mem.list(None).try_collect().await.unwrap();
    assert!(all.is_empty(), "{all:?}");
}

#[tokio::test]
async fn an_existing_blob_still_refuses_wrong_bytes() {
    let (b, _) = bucket();
    let data = pseudo_random(100);
    let d = Digest::of_bytes(&data);
    upload(&b, &d, &data).await.unwrap();
    let err = upload(&b, &d, b"not it").await.unwrap_err();
    assert!(matches!(
        err,
        ObjError::Contract(ContractError::DigestMismatch { .. })
    ));
}

#[tokio::test]
async fn ranges_are_served_from_the_object() {
    let (b, _) = bucket();
    let data = pseudo_random(1000);
    let d = Digest::of_bytes(&data);
    upload(&b, &d, &data).await.unwrap();
    let read = b.get_blob(&d, Some(10..20)).await.unwrap().unwrap();
    assert_eq!((read.size, read.range.clone()), (1000, 10..20));
    let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
    assert_eq!(got.concat(), &data[10..20]);
    assert!(
        b.get_blob(&Digest::of_bytes(b"x"), None)
            .await
            .unwrap()
            .is_none()
    );
}

#[tokio::test]
async fn the_first_entry_written_wins_and_later_ones_see_it() {
    let (b, _) = bucket();
    let ns = Namespace::default();
    assert_eq!(
        b.create_entry(&ns, &key(1), &entry("first")).await.unwrap(),
        EntryCreate::Created
    );
    assert_eq!(
        b.create_entry(&ns, &key(1), &entry("second"))
            .await
            .unwrap(),
        EntryCreate::Exists(entry("first"))
    );
    assert_eq!(
        b.read_entry(&ns, &key(1)).await.unwrap(),
        Some(entry("first"))
    );
    let other = Namespace::new("team-a").unwrap();
    assert_eq!(b.read_entry(&other, &key(1)).await.unwrap(), None);
    let listed = b.list_entries().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].ns.clone(), listed[0].key), (ns, key(1)));
}

#[tokio::test]
async fn reference_markers_list_and_parse_back() {
    let (b, mem) = bucket();
    let d = Digest::of_bytes(b"blob");
    let ns = Namespace::new("team-a").unwrap();
    assert!(!b.has_refs(&d).await.unwrap());
    let first = RefMarker::new(d.clone(), ns.clone(), key(7));
    let second = RefMarker::new(d.clone(), ns.clone(), key(7));
    assert_ne!(first.nonce, second.nonce, "every write has its own nonce");
    b.put_ref(&first).await.unwrap();
    b.put_ref(&second).await.unwrap();
    assert!(b.has_refs(&d).await.unwrap());
    let mut listed: Vec<RefMarker> = b
        .list_refs()
        .await
        .unwrap()
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    listed.sort_by_key(|m| m.nonce.map(|n| n.to_string()));
    let mut expected = vec![first.clone(), second.clone()];
    expected.sort_by_key(|m| m.nonce.map(|n| n.to_string()));
    assert_eq!(listed, expected);
    let nonce = first.nonce.unwrap();
    assert_eq!(
        b.ref_marker_path(&first).as_ref(),
        format!(
            "cache/v1/refs/{}/team-a/{}.{nonce}",
            d.hex(),
            "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"
        )
    );
    assert_eq!(nonce.to_string().len(), 22);

    // Deleting one write's marker leaves the other write's.
    b.delete_ref(&first).await.unwrap();
    assert!(b.has_refs(&d).await.unwrap());
    b.delete_ref(&second).await.unwrap();
    assert!(!b.has_refs(&d).await.unwrap());

    // A marker of the previous version (no nonce) still parses, and
    // objects that are no marker are skipped.
    let legacy = format!("cache/v1/refs/{}/_/{}", d.hex(), key(8).to_hex());
    mem.put(&Path::from(legacy.as_str()), PutPayload::new())
        .await
        .unwrap();
    let junk = format!("cache/v1/refs/{}/_/{}.NOTHEX", d.hex(), key(8).to_hex());
    mem.put(&Path::from(junk.as_str()), PutPayload::new())
        .await
        .unwrap();
    let listed = b.list_refs().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let legacy_marker = RefMarker {
        blob: d.clone(),
        ns: Namespace::default(),
        key: key(8),
        nonce: None,
    };
    assert_eq!(listed[0].0, legacy_marker);
    assert_eq!(b.ref_marker_path(&legacy_marker).as_ref(), legacy);
}

#[test]
fn entry_objects_record_their_marker_nonce_and_old_ones_still_read() {
    let d = Digest::of_bytes(b"layer");
    let mut object = entry("RUN x");
    object.entry.layer = Some(kiln_common::LayerDescriptor {
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
        digest: d.clone(),
        size: 5,
        diff_id: d.clone(),
    });
    let marker = RefMarker::new(d.clone(), Namespace::default(), key(1));
    object.ref_nonce = marker.nonce;
    let json: serde_json::Value = serde_json::to_value(&object).unwrap();
    assert_eq!(json["refNonce"], marker.nonce.unwrap().to_string());
    assert!(marker.written_for(&object));
    assert_eq!(
        RefMarker::of_entry(&Namespace::default(), &key(1), &object),
        Some(marker.clone())
    );

    // As the previous version wrote it: no nonce, a legacy marker.
    let mut old = json.clone();
    old.as_object_mut().unwrap().remove("refNonce");
    let old: EntryObject = serde_json::from_value(old).unwrap();
    assert_eq!(old.ref_nonce, None);
    assert!(!marker.written_for(&old));
    let legacy = RefMarker::of_entry(&Namespace::default(), &key(1), &old).unwrap();
    assert_eq!(legacy.nonce, None);
    assert!(legacy.written_for(&old));
    assert!(!legacy.written_for(&object));

    // The last one spells 16 zero bytes with non-zero padding bits:
    // not the canonical name, so not a nonce.
    let bad_values = ["", "00", "!!!!!!!!!!!!!!!!!!!!!!", "AAAAAAAAAAAAAAAAAAAAAB"];
    for bad in bad_values {
        assert!(bad.parse::<RefNonce>().is_err(), "{bad:?}");
    }
    let mut bad = json;
    bad["refNonce"] = "xyz".into();
    assert!(serde_json::from_value::<EntryObject>(bad).is_err());
}

#[tokio::test]
async fn a_lease_has_one_holder_until_it_expires_or_is_released() {
    let (b, _) = bucket();
    let ttl = Duration::from_secs(60);
    assert!(b.acquire_lease("gc", "a", ttl).await.unwrap());
    assert!(!b.acquire_lease("gc", "b", ttl).await.unwrap());
    assert!(b.acquire_lease("gc", "a", ttl).await.unwrap(), "renewal");
    b.release_lease("gc", "b").await.unwrap();
    assert!(
        !b.acquire_lease("gc", "b", ttl).await.unwrap(),
        "not b's to release"
    );
    b.release_lease("gc", "a").await.unwrap();
    assert!(b.acquire_lease("gc", "b", ttl).await.unwrap());
    // An expired lease goes to whoever asks next.
    assert!(b.acquire_lease("gc2", "a", Duration::ZERO).await.unwrap());
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(b.acquire_lease("gc2", "b", ttl).await.unwrap());
}
