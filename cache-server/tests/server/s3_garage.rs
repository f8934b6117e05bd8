//! Replicas on a distributed S3-compatible store: a three-node Garage
//! cluster on 127.0.0.1 (replication factor 3, quorum 2). What only a
//! multi-node store can show: a storage node going down leaves the cache
//! serving through replicas talking to the other nodes, the replica whose
//! node died answers `503` promptly (so executors move on), and after the
//! node comes back it serves what was written while it was away. Garage
//! also accepts `If-None-Match: *` and overwrites anyway; the replicas must
//! notice at start-up and keep entries first-writer-wins without it.
//! (Every scenario of `s3_replicas.rs` also runs on Garage.)

use crate::common;
use crate::s3_support;

use std::time::{Duration, Instant};

use common::{bytes, client, entry, key, put_blob, put_entry};
use kiln_common::{CacheEntry, CacheKey, Digest};
use reqwest::StatusCode;
use s3_support::{Replica, S3Server};

const EAGER: &[&str] = &["--miss-recheck", "0", "--hit-recheck", "0s"];

async fn lookup(c: &reqwest::Client, url: &str, keys: &[CacheKey]) -> (StatusCode, usize) {
    let r = c
        .post(format!("{url}/v1/lookup"))
        .json(&serde_json::json!({ "keys": keys }))
        .send()
        .await
        .unwrap();
    let status = r.status();
    let found = if status.is_success() {
        let body: serde_json::Value = r.json().await.unwrap();
        body["entries"].as_object().map_or(0, |m| m.len())
    } else {
        0
    };
    (status, found)
}

/// Stores step `n` (a 50 kB blob and its entry) through `url`.
async fn store_step(c: &reqwest::Client, url: &str, n: u64) -> CacheEntry {
    let data = bytes(900 + n, 50_000);
    let (status, digest) = put_blob(c, url, None, &data).await;
    assert!(status.is_success(), "blob {n} via {url}: {status}");
    let e = entry(Some((&digest, data.len() as u64)), &format!("RUN step {n}"));
    let status = put_entry(c, url, None, &key(n), &e).await.status();
    assert_eq!(status, StatusCode::CREATED, "entry {n} via {url}");
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_overwrites_on_if_none_match_is_detected_and_entries_stay_first_writer_wins() {
    let test =
        "a_store_that_overwrites_on_if_none_match_is_detected_and_entries_stay_first_writer_wins";
    let Some(garage) = S3Server::start_garage(test) else {
        return;
    };
    let Some(s3s) = S3Server::start(test) else {
        return;
    };
    let replicas: Vec<Replica> = (0..3)
        .map(|node| Replica::start_on(&garage, node, "fww", EAGER))
        .collect();
    for r in &replicas {
        assert!(
            r.log_text().contains("does not refuse to overwrite"),
            "the replica did not notice Garage ignores If-None-Match:\n{}",
            r.log_text()
        );
    }
    let honest = Replica::start(&s3s, "fww", EAGER);
    assert!(
        honest.log_text().contains("honours conditional writes"),
        "{}",
        honest.log_text()
    );
    // The probe objects are gone again.
    assert!(s3s.keys().await.is_empty(), "{:?}", s3s.keys().await);
    assert!(garage.keys().await.is_empty(), "{:?}", garage.keys().await);

    let c = client();
    let first = store_step(&c, &replicas[0].url, 1).await;
    // The same entry again through another node's replica: identical.
    let again = put_entry(&c, &replicas[1].url, None, &key(1), &first).await;
    assert_eq!(again.status(), StatusCode::OK);
    // A different entry for the key: refused, the first one stays.
    let data = bytes(77, 1000);
    let (_, other_digest) = put_blob(&c, &replicas[2].url, None, &data).await;
    let other = entry(Some((&other_digest, 1000)), "RUN something else");
    let conflict = put_entry(&c, &replicas[2].url, None, &key(1), &other).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    for r in &replicas {
        let got: CacheEntry = c
            .get(format!("{}/v1/entries/{}", r.url, key(1)))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got, first, "through {}", r.url);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storage_node_going_down_leaves_the_cache_serving_and_its_replica_catches_up_after() {
    let Some(mut garage) = S3Server::start_garage(
        "a_storage_node_going_down_leaves_the_cache_serving_and_its_replica_catches_up_after",
    ) else {
        return;
    };
    let replicas: Vec<Replica> = (0..3)
        .map(|node| Replica::start_on(&garage, node, "node-down", EAGER))
        .collect();
    let c = client();
    let mut written = Vec::new();
    for n in 0..6 {
        written.push(store_step(&c, &replicas[n as usize % 3].url, n).await);
    }

    garage.kill_node(2);
    // Two of three nodes are a quorum: replicas on nodes 0 and 1 keep
    // reading and writing.
    for n in 6..12 {
        written.push(store_step(&c, &replicas[n as usize % 2].url, n).await);
    }
    let keys: Vec<CacheKey> = (0..12).map(key).collect();
    for r in &replicas[..2] {
        assert_eq!(
            lookup(&c, &r.url, &keys).await,
            (StatusCode::OK, 12),
            "{}",
            r.url
        );
    }
    // The replica whose node is gone says so quickly, so executors move on
    // to the next --cache-server instead of waiting.
    let started = Instant::now();
    let data = bytes(5, 1000);
    let blob = c
        .put(format!(
            "{}/v1/blobs/{}",
            replicas[2].url,
            Digest::of_bytes(&data)
        ))
        .body(data)
        .send()
        .await
        .unwrap();
    let took = started.elapsed();
    assert_eq!(blob.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(
        took < Duration::from_secs(30),
        "the replica of the dead node took {took:?} to fail"
    );
    let ready = c
        .get(format!("{}/readyz", replicas[2].url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);

    // Back up: node 2's replica serves everything, including what was
    // written while its node was down.
    garage.restart_node(2).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, found) = lookup(&c, &replicas[2].url, &keys).await;
        if status == StatusCode::OK && found == 12 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "after the restart node 2's replica finds {found} of 12 ({status})"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for (n, e) in written.iter().enumerate() {
        let layer = e.layer.as_ref().unwrap();
        let got = c
            .get(format!("{}/v1/blobs/{}", replicas[2].url, layer.digest))
            .send()
            .await
            .unwrap();
        assert_eq!(got.status(), StatusCode::OK, "blob of step {n}");
        let body = got.bytes().await.unwrap();
        assert_eq!(Digest::of_bytes(&body), layer.digest, "blob of step {n}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_same_blob_uploaded_through_two_replicas_at_once_succeeds_for_both() {
    let Some(garage) = S3Server::start_garage(
        "the_same_blob_uploaded_through_two_replicas_at_once_succeeds_for_both",
    ) else {
        return;
    };
    // Small parts: every upload is a multipart upload of several parts, and
    // Garage drops the other uploads of a key when one completes.
    let part = ["--s3-part-size", "5MiB"];
    let a = Replica::start_on(&garage, 0, "same-blob", &part);
    let b = Replica::start_on(&garage, 1, "same-blob", &part);
    let c = client();
    for round in 0..6u64 {
        let data = bytes(4000 + round, 23 << 20);
        let digest = Digest::of_bytes(&data);
        let upload = |url: String| {
            let (c, data, digest) = (c.clone(), data.clone(), digest.clone());
            async move {
                c.put(format!("{url}/v1/blobs/{digest}"))
                    .body(data)
                    .send()
                    .await
                    .unwrap()
                    .status()
            }
        };
        let (first, second) = tokio::join!(upload(a.url.clone()), upload(b.url.clone()));
        for (status, via) in [(first, &a), (second, &b)] {
            assert!(
                status.is_success(),
                "round {round}: upload via {} answered {status}\n{}",
                via.url,
                via.log_text()
            );
        }
        let got = c
            .get(format!("{}/v1/blobs/{digest}", b.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(Digest::of_bytes(&got), digest, "round {round}");
    }
}
