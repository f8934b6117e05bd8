//! The bucket layer against a real S3-compatible server: verified uploads
//! (single PUT and multipart), conditional entry creation, leases.

use crate::s3_support;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_cache_server::BlobCommit;
use kiln_cache_server::Namespace;
use kiln_cache_server::objstore::ObjError;
use kiln_cache_server::objstore::bucket::{EntryCreate, EntryObject};
use kiln_common::{CacheEntry, CacheKey, Digest};
use s3_support::S3Server;

fn pseudo_random(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

async fn upload(
    bucket: &kiln_cache_server::objstore::Bucket,
    expected: &Digest,
    data: &[u8],
) -> Result<BlobCommit, ObjError> {
    let mut up = bucket.blob_upload(expected).await?;
    for chunk in data.chunks(256 << 10) {
        up.write(Bytes::copy_from_slice(chunk)).await?;
    }
    up.commit().await
}

#[tokio::test]
async fn multipart_and_single_uploads_are_visible_only_when_verified() {
    let Some(s3) = S3Server::start("multipart_and_single_uploads_are_visible_only_when_verified")
    else {
        return;
    };
    let bucket = s3.bucket("bucket-test");
    // 12 MiB: three 5 MiB parts, the last one short.
    let big = pseudo_random(1, 12 << 20);
    let small = pseudo_random(2, 1000);
    let wrong = Digest::of_bytes(b"not these bytes");
    for data in [&big, &small] {
        let err = upload(&bucket, &wrong, data).await.unwrap_err();
        assert!(
            matches!(
                err,
                ObjError::Contract(kiln_storage::ContractError::DigestMismatch { .. })
            ),
            "{err}"
        );
    }
    assert_eq!(
        s3.keys().await,
        Vec::<String>::new(),
        "a mismatch left objects"
    );

    for data in [&big, &small] {
        let d = Digest::of_bytes(data);
        assert_eq!(
            upload(&bucket, &d, data).await.unwrap(),
            BlobCommit::Created
        );
        assert_eq!(
            upload(&bucket, &d, data).await.unwrap(),
            BlobCommit::Existed
        );
        let read = bucket.get_blob(&d, None).await.unwrap().unwrap();
        assert_eq!(read.size, data.len() as u64);
        let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert_eq!(&got.concat(), data);
    }
    assert_eq!(s3.keys().await.len(), 2);
}

#[tokio::test]
async fn conditional_writes_make_the_first_entry_and_one_lease_holder_win() {
    let Some(s3) =
        S3Server::start("conditional_writes_make_the_first_entry_and_one_lease_holder_win")
    else {
        return;
    };
    let bucket = s3.bucket("cond");
    let ns = Namespace::default();
    let key = CacheKey::from_bytes([9; 32]);
    let object = |by: &str| EntryObject {
        created_ms: 1,
        entry: CacheEntry {
            layer: None,
            created_by: by.into(),
            created: "2026-11-24T12:00:00Z".into(),
            extra: BTreeMap::new(),
        },
        ref_nonce: None,
    };
    assert_eq!(
        bucket.create_entry(&ns, &key, &object("a")).await.unwrap(),
        EntryCreate::Created
    );
    assert_eq!(
        bucket.create_entry(&ns, &key, &object("b")).await.unwrap(),
        EntryCreate::Exists(object("a"))
    );

    let ttl = Duration::from_secs(60);
    assert!(bucket.acquire_lease("gc", "one", ttl).await.unwrap());
    assert!(!bucket.acquire_lease("gc", "two", ttl).await.unwrap());
    assert!(
        bucket.acquire_lease("gc", "one", ttl).await.unwrap(),
        "renewal"
    );
    bucket.release_lease("gc", "one").await.unwrap();
    assert!(bucket.acquire_lease("gc", "two", ttl).await.unwrap());
}
