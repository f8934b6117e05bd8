//! Size limit, LRU eviction, GC and TTL against the real binary.

use crate::common;

use std::time::{Duration, Instant};

use common::*;
use reqwest::StatusCode;

async fn stats(c: &reqwest::Client, url: &str) -> serde_json::Value {
    c.get(format!("{url}/v1/admin/stats"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_workload_larger_than_max_size_evicts_least_recently_used_entries() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        data.path(),
        &["--max-size", "1MiB", "--access-granularity", "0"],
    );
    let c = client();
    const N: u64 = 20;
    const SIZE: usize = 200 << 10;
    for i in 0..N {
        let blob = bytes(i, SIZE);
        let (status, d) = put_blob(&c, &server.url, None, &blob).await;
        assert_eq!(status, StatusCode::CREATED);
        let r = put_entry(
            &c,
            &server.url,
            None,
            &key(i),
            &entry(Some((&d, SIZE as u64)), "RUN"),
        )
        .await;
        assert_eq!(r.status(), StatusCode::CREATED);
        // Keep entry 0 hot: it is read after every later write.
        if i >= 1 {
            c.get(format!("{}/v1/entries/{}", server.url, key(0)))
                .send()
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // Uploads over the limit wake GC in the background; wait for it.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = stats(&c, &server.url).await;
        if s["blob_bytes"].as_u64().unwrap() <= 1 << 20 {
            assert!(s["entries_evicted"].as_u64().unwrap() > 0, "{s}");
            break;
        }
        assert!(Instant::now() < deadline, "still over the limit: {s}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let on_disk: u64 = files_below(&data.path().join("blobs"))
        .iter()
        .map(|p| std::fs::metadata(p).unwrap().len())
        .sum();
    assert!(on_disk <= 1 << 20, "{on_disk} bytes of blobs on disk");

    let get = |k| {
        let c = c.clone();
        let url = format!("{}/v1/entries/{}", server.url, key(k));
        async move { c.get(url).send().await.unwrap().status() }
    };
    assert_eq!(get(0).await, StatusCode::OK, "the hot entry survives");
    assert_eq!(
        get(N - 1).await,
        StatusCode::OK,
        "the newest entry survives"
    );
    assert_eq!(
        get(1).await,
        StatusCode::NOT_FOUND,
        "an old cold entry is evicted"
    );
    let metrics = c
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(metrics.contains("kiln_cache_evictions_total"), "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn gc_removes_unreferenced_blobs_only_after_the_grace_period() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--blob-grace", "1s"]);
    let c = client();
    let (_, loose) = put_blob(&c, &server.url, None, b"orphan").await;
    let (_, used) = put_blob(&c, &server.url, None, b"used").await;
    put_entry(
        &c,
        &server.url,
        None,
        &key(1),
        &entry(Some((&used, 4)), "RUN"),
    )
    .await;

    let gc = || async {
        c.post(format!("{}/v1/admin/gc", server.url))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    assert_eq!(gc().await["blobs_removed"], 0, "young orphans are kept");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(gc().await["blobs_removed"], 1);
    let head = |d: kiln_common::Digest| {
        let c = c.clone();
        let url = format!("{}/v1/blobs/{d}", server.url);
        async move { c.head(url).send().await.unwrap().status() }
    };
    assert_eq!(head(loose).await, StatusCode::NOT_FOUND);
    assert_eq!(head(used.clone()).await, StatusCode::OK);

    // Deleting the entry makes its blob collectable.
    c.delete(format!("{}/v1/entries/{}", server.url, key(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(gc().await["blobs_removed"], 1);
    assert_eq!(head(used).await, StatusCode::NOT_FOUND);
    assert!(files_below(&data.path().join("blobs")).is_empty());
    assert_eq!(stats(&c, &server.url).await["gc_runs"], 3);
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_expire_after_the_ttl() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--entry-ttl", "1s"]);
    let c = client();
    put_entry(&c, &server.url, None, &key(1), &entry(None, "RUN")).await;
    let url = format!("{}/v1/entries/{}", server.url, key(1));
    assert_eq!(c.get(&url).send().await.unwrap().status(), StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let gc: serde_json::Value = c
        .post(format!("{}/v1/admin/gc", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gc["entries_expired"], 1);
    assert_eq!(stats(&c, &server.url).await["entries"], 0);
    // The key is free again.
    let r = put_entry(&c, &server.url, None, &key(1), &entry(None, "RUN again")).await;
    assert_eq!(r.status(), StatusCode::CREATED);
}
