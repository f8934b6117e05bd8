//! Crash safety: `kill -9` with many uploads and entry writes in flight.

use crate::common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use kiln_common::{CacheEntry, CacheKey, Digest};
use reqwest::StatusCode;

const WRITERS: u64 = 80;

/// Entries the server acknowledged (201) with the blob bytes they name.
type Acked = Arc<Mutex<Vec<(CacheKey, CacheEntry, Vec<u8>)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_loses_nothing_acknowledged_and_serves_nothing_corrupt() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let url = server.url.clone();
    let acked: Acked = Arc::default();
    let in_flight = Arc::new(std::sync::atomic::AtomicU64::new(0));

    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (url, acked, in_flight) = (url.clone(), acked.clone(), in_flight.clone());
        tasks.push(tokio::spawn(async move {
            let c = client();
            for round in 0u64.. {
                let seed = w * 10_000 + round;
                let blob = bytes(seed, 128 << 10);
                let digest = Digest::of_bytes(&blob);
                // Slow, chunked bodies keep many uploads open at the kill.
                let chunks: Vec<Vec<u8>> = blob.chunks(16 << 10).map(<[u8]>::to_vec).collect();
                let stream = futures::stream::unfold(chunks.into_iter(), |mut it| async move {
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    it.next()
                        .map(|c| (Ok::<_, std::io::Error>(bytes::Bytes::from(c)), it))
                });
                in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let put = c
                    .put(format!("{url}/v1/blobs/{digest}"))
                    .body(reqwest::Body::wrap_stream(stream))
                    .send()
                    .await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                match put {
                    Ok(r) if r.status().is_success() => {}
                    _ => return,
                }
                let k = key(seed);
                let e = entry(
                    Some((&digest, blob.len() as u64)),
                    &format!("RUN step {seed}"),
                );
                in_flight.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let put = c.put(format!("{url}/v1/entries/{k}")).json(&e).send().await;
                in_flight.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                match put {
                    Ok(r) if r.status() == StatusCode::CREATED => {
                        acked.lock().unwrap().push((k, e, blob));
                    }
                    _ => return,
                }
            }
        }));
    }

    // Let uploads and entry writes run, then pull the plug mid-stream.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let open_uploads = in_flight.load(std::sync::atomic::Ordering::SeqCst);
    server.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        open_uploads >= 50,
        "only {open_uploads} uploads and entry writes were in flight at the kill"
    );
    assert!(
        acked.len() >= 20,
        "only {} entries were acknowledged",
        acked.len()
    );

    let server = Server::start(data.path(), &[]);
    assert!(
        files_below(&data.path().join("tmp")).is_empty(),
        "temporary upload files survived the restart"
    );
    assert_blob_files_match_names(data.path());
    let c = client();
    for (k, e, blob) in &acked {
        let r = c
            .get(format!("{}/v1/entries/{k}", server.url))
            .send()
            .await
            .unwrap();
        assert_eq!(
            r.status(),
            StatusCode::OK,
            "acknowledged entry {k} was lost"
        );
        assert_eq!(&r.json::<CacheEntry>().await.unwrap(), e);
        let digest = &e.layer.as_ref().unwrap().digest;
        let got = c
            .get(format!("{}/v1/blobs/{digest}", server.url))
            .send()
            .await
            .unwrap()
            .bytes()
            .await
            .unwrap();
        assert_eq!(got.as_ref(), blob.as_slice(), "blob {digest}");
    }
    // Whatever the index lists is served intact.
    let report: serde_json::Value = c
        .post(format!("{}/v1/admin/verify?repair=false", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(report["corrupt"], serde_json::json!([]), "{report}");
    assert_eq!(report["missing"], serde_json::json!([]), "{report}");
    assert!(report["blobs_checked"].as_u64().unwrap() >= acked.len() as u64);
}
