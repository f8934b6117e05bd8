//! The HTTP API against the real binary: every route and status.

use crate::common;

use std::time::Duration;

use common::*;
use kiln_common::wire::MAX_LOOKUP_KEYS;
use kiln_common::{CacheEntry, Digest, LookupResponse};
use reqwest::StatusCode;
use reqwest::header::{CONTENT_LENGTH, CONTENT_RANGE, RANGE};

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics_answer() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let c = client();
    let r = c
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let r = c
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    put_blob(&c, &server.url, None, b"metrics blob").await;
    let r = c
        .post(format!("{}/v1/lookup", server.url))
        .json(&serde_json::json!({"keys": [key(1)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let text = c
        .get(format!("{}/metrics", server.url))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for needle in [
        "kiln_cache_http_requests_total{route=\"/v1/blobs/{digest}\",method=\"PUT\",status=\"201\"} 1",
        "kiln_cache_http_request_duration_seconds_bucket",
        "kiln_cache_lookup_keys_total{result=\"miss\"} 1",
        "kiln_cache_blob_bytes_received_total 12",
        "kiln_cache_blobs 1",
        "kiln_cache_blob_bytes 12",
        "kiln_cache_uploads_in_flight 0",
        "kiln_cache_gc_runs_total 0",
    ] {
        assert!(text.contains(needle), "metrics lack {needle:?}:\n{text}");
    }
    assert!(server.log_text().contains("listening on 127.0.0.1:"));
    assert!(
        server.log_text().contains("OPEN"),
        "open mode must be logged"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn blobs_round_trip_with_head_and_ranges() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let c = client();
    let blob = bytes(7, 3 << 20);
    let (status, digest) = put_blob(&c, &server.url, None, &blob).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, _) = put_blob(&c, &server.url, None, &blob).await;
    assert_eq!(status, StatusCode::OK, "second identical upload");

    let url = format!("{}/v1/blobs/{digest}", server.url);
    let head = c.head(&url).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(
        head.headers()[CONTENT_LENGTH],
        (3 << 20).to_string().as_str()
    );
    assert_eq!(
        head.headers()["docker-content-digest"],
        digest.to_string().as_str()
    );

    let full = c.get(&url).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.bytes().await.unwrap().as_ref(), blob.as_slice());

    let part = c
        .get(&url)
        .header(RANGE, "bytes=10-19")
        .send()
        .await
        .unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        part.headers()[CONTENT_RANGE],
        format!("bytes 10-19/{}", blob.len()).as_str()
    );
    assert_eq!(part.bytes().await.unwrap().as_ref(), &blob[10..20]);

    let tail = c.get(&url).header(RANGE, "bytes=-5").send().await.unwrap();
    assert_eq!(tail.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(
        tail.bytes().await.unwrap().as_ref(),
        &blob[blob.len() - 5..]
    );

    let open = c
        .get(&url)
        .header(RANGE, format!("bytes={}-", blob.len() - 3))
        .send()
        .await
        .unwrap();
    assert_eq!(
        open.bytes().await.unwrap().as_ref(),
        &blob[blob.len() - 3..]
    );

    let bad = c
        .get(&url)
        .header(RANGE, format!("bytes={}-", blob.len()))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(
        bad.headers()[CONTENT_RANGE],
        format!("bytes */{}", blob.len()).as_str()
    );

    let missing = Digest::of_bytes(b"never uploaded");
    let url = format!("{}/v1/blobs/{missing}", server.url);
    assert_eq!(
        c.head(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    let r = c.get(&url).send().await.unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blob_that_does_not_match_its_digest_is_refused_and_not_kept() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let c = client();
    let claimed = Digest::of_bytes(b"what the client promised");
    let r = c
        .put(format!("{}/v1/blobs/{claimed}", server.url))
        .body(bytes(1, 100_000))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["error"]["code"], "digest_mismatch");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains(&claimed.to_string())
    );
    let head = c
        .head(format!("{}/v1/blobs/{claimed}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert!(files_below(&data.path().join("blobs")).is_empty());
    assert!(files_below(&data.path().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_keys_digests_and_bodies_are_400() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let c = client();
    for url in [
        format!("{}/v1/entries/xyz", server.url),
        format!("{}/v1/blobs/sha256:abc", server.url),
        format!("{}/v1/blobs/md5:{}", server.url, "0".repeat(32)),
    ] {
        let r = c.get(&url).send().await.unwrap();
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(error_code(r).await, "bad_request");
    }
    let r = c
        .post(format!("{}/v1/lookup", server.url))
        .body("{\"keys\": [\"nothex\"]}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .put(format!("{}/v1/entries/{}", server.url, key(1)))
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = c
        .get(format!("{}/v1/nope", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(error_code(r).await, "not_found");
}

#[tokio::test(flavor = "multi_thread")]
async fn entries_are_immutable_and_need_their_blob() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let c = client();
    let layer = bytes(3, 50_000);
    let digest = Digest::of_bytes(&layer);
    let mut e: CacheEntry = entry(Some((&digest, layer.len() as u64)), "RUN make");
    e.extra
        .insert("futureField".into(), serde_json::json!({"kept": true}));

    let r = put_entry(&c, &server.url, None, &key(1), &e).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(error_code(r).await, "missing_blob");

    put_blob(&c, &server.url, None, &layer).await;
    let mut wrong_size = e.clone();
    wrong_size.layer.as_mut().unwrap().size += 1;
    let r = put_entry(&c, &server.url, None, &key(1), &wrong_size).await;
    assert_eq!(r.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let r = put_entry(&c, &server.url, None, &key(1), &e).await;
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = put_entry(&c, &server.url, None, &key(1), &e).await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = put_entry(&c, &server.url, None, &key(1), &entry(None, "RUN other")).await;
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(error_code(r).await, "conflict");

    let got: serde_json::Value = c
        .get(format!("{}/v1/entries/{}", server.url, key(1)))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["futureField"]["kept"], true, "unknown fields are kept");
    assert_eq!(serde_json::from_value::<CacheEntry>(got).unwrap(), e);

    let r = put_entry(&c, &server.url, None, &key(2), &entry(None, "ENV-only")).await;
    assert_eq!(r.status(), StatusCode::CREATED, "layer: null needs no blob");

    let r = c
        .get(format!("{}/v1/entries/{}", server.url, key(3)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::NOT_FOUND);

    let found: LookupResponse = c
        .post(format!("{}/v1/lookup", server.url))
        .json(&serde_json::json!({"keys": [key(1), key(2), key(3)]}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(found.entries.len(), 2);
    assert_eq!(found.entries[&key(1)], e);
    assert!(!found.entries.contains_key(&key(3)));

    let too_many: Vec<_> = (0..MAX_LOOKUP_KEYS as u64 + 1).map(key).collect();
    let r = c
        .post(format!("{}/v1/lookup", server.url))
        .json(&serde_json::json!({ "keys": too_many }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let exactly: Vec<_> = (0..MAX_LOOKUP_KEYS as u64).map(key).collect();
    let r = c
        .post(format!("{}/v1/lookup", server.url))
        .json(&serde_json::json!({ "keys": exactly }))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);

    let url = format!("{}/v1/entries/{}", server.url, key(1));
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        c.delete(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        c.get(&url).send().await.unwrap().status(),
        StatusCode::NOT_FOUND
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_routes_report_list_and_collect() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &["--blob-grace", "0s"]);
    let c = client();
    let referenced = bytes(10, 1000);
    let (_, d) = put_blob(&c, &server.url, None, &referenced).await;
    for i in 0..5 {
        put_entry(
            &c,
            &server.url,
            None,
            &key(i),
            &entry(Some((&d, 1000)), &format!("RUN {i}")),
        )
        .await;
    }
    let (_, loose) = put_blob(&c, &server.url, None, b"nobody names me").await;

    let stats: serde_json::Value = c
        .get(format!("{}/v1/admin/stats", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(stats["entries"], 5);
    assert_eq!(stats["blobs"], 2);
    assert_eq!(stats["blob_bytes"], 1000 + 15);

    let page: serde_json::Value = c
        .get(format!("{}/v1/admin/entries?limit=2", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(page["entries"].as_array().unwrap().len(), 2);
    assert_eq!(page["entries"][0]["key"], key(0).to_string());
    let next = page["next"].as_str().unwrap();
    let rest: serde_json::Value = c
        .get(format!(
            "{}/v1/admin/entries?after={next}&limit=10",
            server.url
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(rest["entries"].as_array().unwrap().len(), 3);
    assert!(rest["next"].is_null());
    let prefixed: serde_json::Value = c
        .get(format!(
            "{}/v1/admin/entries?prefix={}",
            server.url,
            &key(3).to_string()[..16]
        ))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(prefixed["entries"].as_array().unwrap().len(), 1);

    let gc: serde_json::Value = c
        .post(format!("{}/v1/admin/gc", server.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(gc["blobs_removed"], 1);
    let gone = c
        .head(format!("{}/v1/blobs/{loose}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    let kept = c
        .head(format!("{}/v1/blobs/{d}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(kept.status(), StatusCode::OK);
    assert_eq!(files_below(&data.path().join("blobs")).len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_uploads_of_one_blob_all_succeed_and_store_one_file() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let blob = bytes(42, 4 << 20);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (url, blob) = (server.url.clone(), blob.clone());
        tasks.push(tokio::spawn(async move {
            put_blob(&client(), &url, None, &blob).await.0
        }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert!(
        statuses
            .iter()
            .all(|s| *s == StatusCode::CREATED || *s == StatusCode::OK),
        "{statuses:?}"
    );
    assert_eq!(
        statuses
            .iter()
            .filter(|s| **s == StatusCode::CREATED)
            .count(),
        1,
        "exactly one upload creates the blob: {statuses:?}"
    );
    let files = files_below(&data.path().join("blobs"));
    assert_eq!(files.len(), 1);
    assert_eq!(std::fs::read(&files[0]).unwrap(), blob);
    assert!(files_below(&data.path().join("tmp")).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn http2_with_prior_knowledge_is_served() {
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .unwrap();
    let blob = bytes(5, 2 << 20);
    let (status, digest) = put_blob(&h2, &server.url, None, &blob).await;
    assert_eq!(status, StatusCode::CREATED);
    let r = h2
        .get(format!("{}/v1/blobs/{digest}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().as_ref(), blob.as_slice());
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_in_flight_upload_finish_then_exits_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    let blob = bytes(9, 1 << 20);
    let digest = Digest::of_bytes(&blob);
    let chunks: Vec<Vec<u8>> = blob.chunks(64 << 10).map(<[u8]>::to_vec).collect();
    let stream = futures::stream::unfold(chunks.into_iter(), |mut it| async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        it.next()
            .map(|chunk| (Ok::<_, std::io::Error>(bytes::Bytes::from(chunk)), it))
    });
    let url = format!("{}/v1/blobs/{digest}", server.url);
    let upload = tokio::spawn(async move {
        client()
            .put(url)
            .body(reqwest::Body::wrap_stream(stream))
            .send()
            .await
            .map(|r| r.status())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let status = tokio::task::spawn_blocking(move || {
        let status = server.terminate(Duration::from_secs(20));
        (status, server.log_text())
    })
    .await
    .unwrap();
    assert_eq!(upload.await.unwrap().unwrap(), StatusCode::CREATED);
    assert!(
        status.0.success(),
        "exit status {:?}\n{}",
        status.0,
        status.1
    );
    assert!(status.1.contains("store flushed"), "{}", status.1);
    let stored = data.path().join("blobs").join(digest.sharded_path());
    assert_eq!(std::fs::read(stored).unwrap(), blob);
}

#[tokio::test(flavor = "multi_thread")]
async fn flags_beat_environment_which_beats_the_config_file() {
    let conf = tempfile::tempdir().unwrap();
    let file = conf.path().join("cache.toml");
    std::fs::write(
        &file,
        "max_size = \"1MiB\"\nentry_ttl = \"1h\"\nlog_format = \"json\"\n",
    )
    .unwrap();
    let max_size = |server: &Server| {
        let url = format!("{}/v1/admin/stats", server.url);
        async move {
            client()
                .get(url)
                .send()
                .await
                .unwrap()
                .json::<serde_json::Value>()
                .await
                .unwrap()["max_size"]
                .as_u64()
                .unwrap()
        }
    };
    let config = file.to_str().unwrap();

    let data = tempfile::tempdir().unwrap();
    let from_file = Server::start(data.path(), &["--config", config]);
    assert_eq!(max_size(&from_file).await, 1 << 20);
    assert!(
        from_file.log_text().contains("\"listening on 127.0.0.1:"),
        "log_format = json from the file: {}",
        from_file.log_text()
    );
    drop(from_file);

    let env = [("KILN_CACHE_MAX_SIZE", "2MiB")];
    let from_env = Server::start_with_env(data.path(), &["--config", config], &env);
    assert_eq!(max_size(&from_env).await, 2 << 20);
    drop(from_env);

    let from_flag = Server::start_with_env(
        data.path(),
        &["--config", config, "--max-size", "3MiB"],
        &env,
    );
    assert_eq!(max_size(&from_flag).await, 3 << 20);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upload_cut_short_by_the_client_leaves_nothing() {
    use tokio::io::AsyncWriteExt;
    let data = tempfile::tempdir().unwrap();
    let server = Server::start(data.path(), &[]);
    let blob = bytes(11, 1 << 20);
    let digest = Digest::of_bytes(&blob);
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", server.port))
        .await
        .unwrap();
    let head = format!(
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-length: {}\r\n\r\n",
        blob.len()
    );
    conn.write_all(head.as_bytes()).await.unwrap();
    conn.write_all(&blob[..300_000]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        files_below(&data.path().join("tmp")).len(),
        1,
        "upload in progress"
    );
    drop(conn);

    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !files_below(&data.path().join("tmp")).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "temp file left behind"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let head = client()
        .head(format!("{}/v1/blobs/{digest}", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), StatusCode::NOT_FOUND);
    assert!(files_below(&data.path().join("blobs")).is_empty());
}
