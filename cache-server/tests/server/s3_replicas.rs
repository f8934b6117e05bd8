//! Several `kiln-cache-server` replicas on one bucket of a real
//! S3-compatible server: what one replica stores the others serve, a killed
//! replica leaves the others serving, a bad upload leaves nothing in the
//! bucket, and GC by the lease holder never takes a blob a live entry
//! names, nor the reference marker protecting it, while another replica
//! writes.

use crate::common;
use crate::s3_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use common::{
    bytes, client, entry, get_blob, key, put_blob, put_entry,
    uploads_under_a_wrong_digest_are_refused,
};
use kiln_cache_server::Namespace;
use kiln_cache_server::objstore::bucket::RefMarker;
use kiln_common::{CacheEntry, CacheKey, Digest};
use reqwest::StatusCode;
use s3_support::{Replica, S3Server};

/// Replicas that look a missing key up in the bucket every time.
const EAGER: &[&str] = &["--miss-recheck", "0"];

/// Every scenario runs twice: on s3s-fs (one process; honours conditional
/// writes) and on a three-node Garage cluster (distributed; overwrites on
/// `If-None-Match`, so its replicas detect that and work without
/// conditional writes).
macro_rules! on_both_stores {
    ($($scenario:ident: $threads:literal),* $(,)?) => {$(
        mod $scenario {
            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn on_s3s_fs() {
                let test = concat!(stringify!($scenario), "::on_s3s_fs");
                if let Some(s3) = super::S3Server::start(test) {
                    super::$scenario(s3).await;
                }
            }

            #[tokio::test(flavor = "multi_thread", worker_threads = $threads)]
            async fn on_garage() {
                let test = concat!(stringify!($scenario), "::on_garage");
                if let Some(s3) = super::S3Server::start_garage(test) {
                    super::$scenario(s3).await;
                }
            }
        }
    )*};
}

on_both_stores! {
    an_entry_and_blob_written_through_one_replica_are_served_by_the_others: 2,
    killing_a_replica_mid_sequence_leaves_the_others_serving: 2,
    a_digest_mismatch_on_upload_leaves_nothing_in_the_bucket: 2,
    gc_by_the_lease_holder_while_another_replica_writes_loses_nothing_referenced: 4,
    blob_gets_can_redirect_to_a_presigned_bucket_url: 2,
}

async fn lookup(
    c: &reqwest::Client,
    url: &str,
    keys: &[CacheKey],
) -> reqwest::Result<BTreeMap<CacheKey, CacheEntry>> {
    #[derive(serde::Deserialize)]
    struct Answer {
        entries: BTreeMap<CacheKey, CacheEntry>,
    }
    let answer: Answer = c
        .post(format!("{url}/v1/lookup"))
        .json(&serde_json::json!({ "keys": keys }))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    Ok(answer.entries)
}

async fn an_entry_and_blob_written_through_one_replica_are_served_by_the_others(s3: S3Server) {
    let replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start_on(&s3, i % s3.nodes(), "shared", EAGER))
        .collect();
    let c = client();
    let data = bytes(1, 300_000);
    let (status, digest) = put_blob(&c, &replicas[0].url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);
    let e = entry(Some((&digest, data.len() as u64)), "RUN make");
    assert_eq!(
        put_entry(&c, &replicas[0].url, None, &key(1), &e)
            .await
            .status(),
        StatusCode::CREATED
    );

    for r in &replicas[1..] {
        let found = lookup(&c, &r.url, &[key(1), key(2)]).await.unwrap();
        assert_eq!(found.get(&key(1)), Some(&e), "lookup through {}", r.url);
        assert_eq!(found.len(), 1);
        let (status, body) = get_blob(&c, &r.url, &digest).await;
        assert_eq!(status, StatusCode::OK);
        assert!(body == data, "blob through {} differs", r.url);
        let ranged = c
            .get(format!("{}/v1/blobs/{digest}", r.url))
            .header("range", "bytes=100-199")
            .send()
            .await
            .unwrap();
        assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(ranged.bytes().await.unwrap().as_ref(), &data[100..200]);
        let head = c
            .head(format!("{}/v1/blobs/{digest}", r.url))
            .send()
            .await
            .unwrap();
        assert_eq!(head.status(), StatusCode::OK);
        assert_eq!(
            head.headers()["content-length"].to_str().unwrap(),
            data.len().to_string()
        );
    }

    // First writer wins across replicas; the same entry again is fine.
    let other = entry(Some((&digest, data.len() as u64)), "RUN something else");
    let conflict = put_entry(&c, &replicas[2].url, None, &key(1), &other).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    assert_eq!(
        put_entry(&c, &replicas[1].url, None, &key(1), &e)
            .await
            .status(),
        StatusCode::OK
    );
    // A blob uploaded through one replica may be named through another.
    let e2 = entry(Some((&digest, data.len() as u64)), "RUN again");
    assert_eq!(
        put_entry(&c, &replicas[2].url, None, &key(2), &e2)
            .await
            .status(),
        StatusCode::CREATED
    );
    assert_eq!(
        lookup(&c, &replicas[0].url, &[key(2)])
            .await
            .unwrap()
            .get(&key(2)),
        Some(&e2)
    );
}

async fn killing_a_replica_mid_sequence_leaves_the_others_serving(s3: S3Server) {
    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start_on(&s3, i % s3.nodes(), "failover", EAGER))
        .collect();
    let urls: Vec<String> = replicas.iter().map(|r| r.url.clone()).collect();
    let c = client();
    let mut written = Vec::new();
    let mut failed_over = 0;
    for n in 0..30u64 {
        if n == 10 {
            replicas[0].kill9();
        }
        // Like the executor: round-robin start, next URL on a connection
        // error.
        let data = bytes(100 + n, 20_000);
        let digest = Digest::of_bytes(&data);
        let e = entry(Some((&digest, data.len() as u64)), &format!("RUN step {n}"));
        let mut done = false;
        for attempt in 0..urls.len() {
            let url = &urls[(n as usize + attempt) % urls.len()];
            let blob = c
                .put(format!("{url}/v1/blobs/{digest}"))
                .body(data.clone())
                .send()
                .await;
            let Ok(blob) = blob else {
                failed_over += 1;
                continue;
            };
            assert!(
                blob.status().is_success(),
                "blob PUT via {url}: {}",
                blob.status()
            );
            let status = put_entry(&c, url, None, &key(n), &e).await.status();
            assert_eq!(status, StatusCode::CREATED, "entry PUT via {url}");
            done = true;
            break;
        }
        assert!(done, "no replica took step {n}");
        written.push((key(n), e, data));
    }
    assert!(failed_over > 0, "the killed replica was never tried");

    let keys: Vec<CacheKey> = written.iter().map(|(k, _, _)| *k).collect();
    for url in &urls[1..] {
        let found = lookup(&c, url, &keys).await.unwrap();
        assert_eq!(found.len(), written.len(), "lookup through {url}");
        for (k, e, data) in &written {
            assert_eq!(found.get(k), Some(e));
            let digest = e.layer.as_ref().unwrap().digest.clone();
            let (status, body) = get_blob(&c, url, &digest).await;
            assert_eq!(status, StatusCode::OK);
            assert!(&body == data);
        }
    }
    assert!(
        c.get(format!("{}/healthz", urls[0])).send().await.is_err(),
        "the killed replica still answers"
    );
}

async fn a_digest_mismatch_on_upload_leaves_nothing_in_the_bucket(s3: S3Server) {
    let replica = Replica::start(&s3, "mismatch", &["--s3-part-size", "5MiB"]);
    let c = client();
    // 12 MiB goes up as a multipart upload; 1 KiB as a single PUT.
    uploads_under_a_wrong_digest_are_refused(&c, &replica.url, &[12 << 20, 1024]).await;
    let keys = s3.keys().await;
    assert!(keys.is_empty(), "objects left in the bucket: {keys:?}");

    // And the right bytes under their digest do arrive (12 MiB, multipart).
    let data = bytes(8, 12 << 20);
    let (status, digest) = put_blob(&c, &replica.url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        s3.keys().await,
        vec![format!("mismatch/blobs/sha256/{}", digest.hex())]
    );
}

async fn gc_by_the_lease_holder_while_another_replica_writes_loses_nothing_referenced(
    s3: S3Server,
) {
    // No grace at all: GC may take any unreferenced blob at once, the
    // harshest setting for a writer between its blob and its entry.
    let flags = ["--miss-recheck", "0", "--blob-grace", "0s"];
    let collector = Replica::start(&s3, "gc", &flags);
    let writer = Replica::start_on(&s3, 1 % s3.nodes(), "gc", &flags);
    let c = client();

    // Orphans GC should remove.
    let mut orphans = Vec::new();
    for n in 0..5 {
        let (status, d) = put_blob(&c, &collector.url, None, &bytes(500 + n, 5000)).await;
        assert_eq!(status, StatusCode::CREATED);
        orphans.push(d);
    }

    let stop = Arc::new(AtomicBool::new(false));
    let gc_task = {
        let (url, stop, c) = (collector.url.clone(), stop.clone(), c.clone());
        tokio::spawn(async move {
            let mut passes = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = c.post(format!("{url}/v1/admin/gc")).send().await.unwrap();
                assert_eq!(r.status(), StatusCode::OK);
                let report: serde_json::Value = r.json().await.unwrap();
                if report["leaseHeld"] == true || report["lease_held"] == true {
                    passes += 1;
                }
            }
            passes
        })
    };

    let mut acked = Vec::new();
    for n in 0..40u64 {
        let data = bytes(1000 + n, 4000);
        let digest = Digest::of_bytes(&data);
        let e = entry(Some((&digest, data.len() as u64)), &format!("RUN {n}"));
        // An executor re-uploads when the entry is refused for a missing
        // blob (GC took it between the two requests).
        let mut created = false;
        for _ in 0..5 {
            let (status, _) = put_blob(&c, &writer.url, None, &data).await;
            assert!(status.is_success());
            let r = put_entry(&c, &writer.url, None, &key(n), &e).await;
            match r.status() {
                StatusCode::CREATED => {
                    created = true;
                    break;
                }
                StatusCode::UNPROCESSABLE_ENTITY => continue,
                other => panic!("entry {n}: {other}"),
            }
        }
        assert!(created, "entry {n} never stuck");
        acked.push((key(n), e, data));
    }
    stop.store(true, Ordering::Relaxed);
    let passes = gc_task.await.unwrap();
    assert!(passes > 0, "the collector never held the lease");

    // One more pass with nothing in flight.
    let r = c
        .post(format!("{}/v1/admin/gc", collector.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let keys: Vec<CacheKey> = acked.iter().map(|(k, _, _)| *k).collect();
    for url in [&collector.url, &writer.url] {
        let found = lookup(&c, url, &keys).await.unwrap();
        assert_eq!(found.len(), acked.len(), "entries lost (via {url})");
        for (_, e, data) in &acked {
            let digest = &e.layer.as_ref().unwrap().digest;
            let (status, body) = get_blob(&c, url, digest).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "blob {digest} of a live entry is gone"
            );
            assert!(&body == data);
        }
    }
    // Every live entry's own marker, by the nonce its object records, is
    // still there: no GC deletion of another write's marker took it.
    let bucket = s3.bucket("gc");
    let markers: Vec<RefMarker> = bucket
        .list_refs()
        .await
        .unwrap()
        .into_iter()
        .map(|(m, _)| m)
        .collect();
    let ns = Namespace::default();
    for (k, _, _) in &acked {
        let object = bucket.read_entry(&ns, k).await.unwrap().unwrap();
        assert!(object.ref_nonce.is_some(), "entry {k} records no marker");
        let own = RefMarker::of_entry(&ns, k, &object).unwrap();
        assert!(markers.contains(&own), "the marker of entry {k} is gone");
    }
    for d in &orphans {
        let head = c
            .head(format!("{}/v1/blobs/{d}", writer.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            head.status(),
            StatusCode::NOT_FOUND,
            "orphan {d} survived GC"
        );
    }
}

async fn blob_gets_can_redirect_to_a_presigned_bucket_url(s3: S3Server) {
    let replica = Replica::start(&s3, "presign", &["--presign-ttl", "5m"]);
    let c = client();
    let data = bytes(9, 70_000);
    let (status, digest) = put_blob(&c, &replica.url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);

    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("{}/v1/blobs/{digest}", replica.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    assert!(location.starts_with(&s3.endpoint), "{location}");
    assert!(location.contains("X-Amz-Signature"), "{location}");

    // Following it, a client gets the bytes straight from the bucket.
    let (status, body) = get_blob(&c, &replica.url, &digest).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    let missing = Digest::of_bytes(b"never uploaded");
    let (status, _) = get_blob(&c, &replica.url, &missing).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
