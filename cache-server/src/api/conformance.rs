//! The HTTP contract every storage backend must keep, as named
//! specifications run through the one router against both backends: the
//! local RocksDB store (`local::*`) and a replica over an in-memory bucket
//! (`object_storage::*`). A backend that answers one differently fails the
//! same-named test.

use std::sync::Arc;

use axum::http::StatusCode;
use kiln_common::{CacheKey, Digest};

use super::{AppState, router};
use crate::auth::{Auth, Scope};
use crate::backend::Backend;
use std::path::Path as FsPath;
use std::time::Duration;

use object_store::memory::InMemory;
use object_store::{ObjectStoreExt, PutPayload};
use reqwest::Method;
use tokio::sync::Notify;

use crate::auth::{generate_token, token_toml};
use crate::backend::LocalBackend;
use crate::objstore::bucket::{Bucket, MIN_PART_SIZE};
use crate::objstore::{Replica, ReplicaConfig};
use kiln_storage::{Store, StoreConfig};

/// A client of one served router with two all-scope tokens: `ops` in
/// the default namespace, `team` in `team-a`.
struct Api {
    url: String,
    ops: String,
    team: String,
    http: reqwest::Client,
}

impl Api {
    /// Serves `backend` through the one router on 127.0.0.1; the server
    /// task ends with the test's runtime.
    async fn serve<B: Backend>(backend: B, dir: &FsPath) -> Api {
        let (ops, team) = (generate_token(), generate_token());
        let all = [Scope::Read, Scope::Write, Scope::Admin];
        let tokens = dir.join("tokens.toml");
        let toml = token_toml(&ops, Some("ops"), &all, None)
            + &token_toml(&team, Some("team"), &all, Some("team-a"));
        std::fs::write(&tokens, toml).unwrap();
        let state = Arc::new(AppState {
            backend: Arc::new(backend),
            auth: Auth::from_file(&tokens).unwrap(),
            metrics: crate::telemetry::metrics_handle(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        Api {
            url,
            ops,
            team,
            http: reqwest::Client::new(),
        }
    }

    fn as_ops(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.ops)
    }

    fn as_team(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(&self.team)
    }

    async fn json(&self, request: reqwest::RequestBuilder) -> serde_json::Value {
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "{}", response.status());
        response.json().await.unwrap()
    }

    /// Every key `as_ops` lists, page by page (`limit` per page).
    async fn list_all(&self, limit: usize) -> (Vec<CacheKey>, usize) {
        let (mut keys, mut pages) = (Vec::new(), 0);
        let mut after: Option<String> = None;
        loop {
            let mut path = format!("/v1/admin/entries?limit={limit}");
            if let Some(a) = &after {
                path.push_str(&format!("&after={a}"));
            }
            let page = self.json(self.as_ops(Method::GET, &path)).await;
            pages += 1;
            for record in page["entries"].as_array().unwrap() {
                assert!(record["created_ms"].as_u64().unwrap() > 0, "{record}");
                keys.push(record["key"].as_str().unwrap().parse().unwrap());
            }
            match page["next"].as_str() {
                Some(next) => after = Some(next.to_owned()),
                None => return (keys, pages),
            }
        }
    }
}

fn key(n: u8) -> CacheKey {
    CacheKey::from_bytes([n; 32])
}

fn entry_json(layer: Option<(&Digest, usize)>, by: &str) -> serde_json::Value {
    serde_json::json!({
        "layer": layer.map(|(digest, size)| serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
            "digest": digest, "size": size, "diffId": digest,
        })),
        "createdBy": by,
        "created": "2026-11-24T12:00:00Z",
    })
}

/// A served backend and the two ways of damaging its blobs behind its back.
struct Fixture {
    api: Api,
    damage: Damage,
    _dir: tempfile::TempDir,
}

enum Damage {
    /// The local store's blob directory.
    Files(std::path::PathBuf),
    /// The bucket under a replica.
    Bucket(Arc<InMemory>, Bucket),
}

impl Fixture {
    /// The local store in a temporary directory.
    async fn local() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let config = StoreConfig {
            blob_grace: Duration::ZERO,
            ..Default::default()
        };
        let store = Store::open(&dir.path().join("data"), config).unwrap();
        let blobs = dir.path().join("data").join("blobs");
        let api = Api::serve(
            LocalBackend::new(store, Arc::new(Notify::new())),
            dir.path(),
        )
        .await;
        Fixture {
            api,
            damage: Damage::Files(blobs),
            _dir: dir,
        }
    }

    /// A replica over an in-memory bucket.
    async fn replica() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mem = Arc::new(InMemory::new());
        let bucket = Bucket::new(mem.clone(), "cache", MIN_PART_SIZE);
        let config = ReplicaConfig {
            miss_recheck: Duration::ZERO,
            blob_grace: Duration::ZERO,
            ..Default::default()
        };
        let replica = Replica::open(bucket.clone(), &dir.path().join("data"), config).unwrap();
        let api = Api::serve(replica, dir.path()).await;
        Fixture {
            api,
            damage: Damage::Bucket(mem, bucket),
            _dir: dir,
        }
    }

    /// Changes a stored blob's bytes (same length).
    async fn corrupt(&self, d: &Digest) {
        match &self.damage {
            Damage::Files(blobs) => {
                let path = blobs.join(d.sharded_path());
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                std::fs::write(&path, vec![0xEE; len]).unwrap();
            }
            Damage::Bucket(mem, bucket) => {
                let path = bucket.blob_path(d);
                let len = mem.head(&path).await.unwrap().size as usize;
                mem.put(&path, PutPayload::from(vec![0xEE; len]))
                    .await
                    .unwrap();
            }
        }
    }

    /// Removes a stored blob's bytes.
    async fn lose(&self, d: &Digest) {
        match &self.damage {
            Damage::Files(blobs) => std::fs::remove_file(blobs.join(d.sharded_path())).unwrap(),
            Damage::Bucket(mem, bucket) => mem.delete(&bucket.blob_path(d)).await.unwrap(),
        }
    }
}

/// Runs each named specification against both backends.
macro_rules! against_both_backends {
    ($($spec:ident),* $(,)?) => {
        mod local {
            $(
                #[tokio::test]
                async fn $spec() {
                    super::$spec(&super::Fixture::local().await).await;
                }
            )*
        }
        mod object_storage {
            $(
                #[tokio::test]
                async fn $spec() {
                    super::$spec(&super::Fixture::replica().await).await;
                }
            )*
        }
    };
}

against_both_backends!(
    readiness_and_tokens_are_checked,
    uploads_are_verified_against_their_digest,
    an_entry_needs_its_blob_with_the_size_it_names,
    entries_are_first_writer_wins_and_looked_up_in_batches,
    namespaces_see_and_delete_only_their_own_entries,
    blobs_are_read_whole_by_range_and_by_head,
    admin_listing_pages_in_key_order_and_filters_by_prefix,
    deleting_the_last_entry_naming_a_blob_lets_gc_take_it,
    verify_reports_and_repairs_corrupt_and_missing_blobs,
);

fn status(r: reqwest::Response) -> StatusCode {
    r.status()
}

async fn status_of(request: reqwest::RequestBuilder) -> StatusCode {
    request.send().await.unwrap().status()
}

/// The 1000-byte blob most specifications use.
fn data() -> (Vec<u8>, Digest) {
    let data = vec![7u8; 1000];
    let digest = Digest::of_bytes(&data);
    (data, digest)
}

async fn upload(api: &Api, bytes: &[u8]) -> Digest {
    let d = Digest::of_bytes(bytes);
    assert_eq!(
        status_of(
            api.as_ops(Method::PUT, &format!("/v1/blobs/{d}"))
                .body(bytes.to_vec())
        )
        .await,
        StatusCode::CREATED
    );
    d
}

async fn put_entry(api: &Api, n: u8, layer: Option<(&Digest, usize)>, by: &str) {
    assert_eq!(
        status_of(
            api.as_ops(Method::PUT, &format!("/v1/entries/{}", key(n)))
                .json(&entry_json(layer, by))
        )
        .await,
        StatusCode::CREATED
    );
}

async fn readiness_and_tokens_are_checked(f: &Fixture) {
    let api = &f.api;
    let (_, digest) = data();
    assert_eq!(
        api.json(api.as_ops(Method::GET, "/readyz")).await["status"],
        "ready"
    );
    assert_eq!(
        status_of(api.http.get(format!("{}/v1/blobs/{digest}", api.url))).await,
        StatusCode::UNAUTHORIZED
    );
}

async fn uploads_are_verified_against_their_digest(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    let blob_path = format!("/v1/blobs/{digest}");
    let wrong = api
        .as_ops(
            Method::PUT,
            &format!("/v1/blobs/{}", Digest::of_bytes(b"x")),
        )
        .body(data.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
    let body: serde_json::Value = wrong.json().await.unwrap();
    assert_eq!(body["error"]["code"], "digest_mismatch");
    assert_eq!(
        status_of(api.as_ops(Method::HEAD, &blob_path)).await,
        StatusCode::NOT_FOUND
    );

    let put = || {
        api.as_ops(Method::PUT, &blob_path)
            .body(data.clone())
            .send()
    };
    let created = put().await.unwrap();
    assert_eq!(created.status(), StatusCode::CREATED);
    assert_eq!(
        created.headers()["docker-content-digest"],
        digest.to_string()
    );
    let body: serde_json::Value = created.json().await.unwrap();
    assert_eq!(body["size"], 1000);
    assert_eq!(status(put().await.unwrap()), StatusCode::OK);
}

async fn an_entry_needs_its_blob_with_the_size_it_names(f: &Fixture) {
    let api = &f.api;
    let never = Digest::of_bytes(b"never uploaded");
    let early = api
        .as_ops(Method::PUT, &format!("/v1/entries/{}", key(1)))
        .json(&entry_json(Some((&never, 14)), "RUN a"))
        .send()
        .await
        .unwrap();
    assert_eq!(early.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = early.json().await.unwrap();
    assert_eq!(body["error"]["code"], "missing_blob");

    let rotten_d = upload(api, &[2u8; 2000]).await;
    let sized = api
        .as_ops(Method::PUT, &format!("/v1/entries/{}", key(21)))
        .json(&entry_json(Some((&rotten_d, 1999)), "RUN layer"))
        .send()
        .await
        .unwrap();
    assert_eq!(sized.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let body: serde_json::Value = sized.json().await.unwrap();
    assert_eq!(body["error"]["code"], "size_mismatch");
}

async fn entries_are_first_writer_wins_and_looked_up_in_batches(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    upload(api, &data).await;
    let entry_path = format!("/v1/entries/{}", key(1));
    let put_entry = |by: &str, size: usize| {
        api.as_ops(Method::PUT, &entry_path)
            .json(&entry_json(Some((&digest, size)), by))
            .send()
    };
    assert_eq!(
        status(put_entry("RUN a", 1000).await.unwrap()),
        StatusCode::CREATED
    );
    assert_eq!(
        status(put_entry("RUN a", 1000).await.unwrap()),
        StatusCode::OK
    );
    let conflict = put_entry("RUN b", 1000).await.unwrap();
    assert_eq!(conflict.status(), StatusCode::CONFLICT);

    let found = api
        .json(
            api.as_ops(Method::POST, "/v1/lookup")
                .json(&serde_json::json!({"keys": [key(1), key(2)]})),
        )
        .await;
    assert_eq!(found["entries"][key(1).to_hex()]["createdBy"], "RUN a");
    assert_eq!(found["entries"].as_object().unwrap().len(), 1);
    let got = api.json(api.as_ops(Method::GET, &entry_path)).await;
    assert_eq!(got["createdBy"], "RUN a");
    assert_eq!(
        status_of(api.as_ops(Method::GET, &format!("/v1/entries/{}", key(2)))).await,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        status_of(api.as_ops(Method::GET, "/v1/entries/nothex")).await,
        StatusCode::BAD_REQUEST
    );
}

async fn namespaces_see_and_delete_only_their_own_entries(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    upload(api, &data).await;
    put_entry(api, 1, Some((&digest, 1000)), "RUN a").await;
    let entry_path = format!("/v1/entries/{}", key(1));

    // team-a sees none of the default namespace's entries and has
    // first-writer-wins of its own.
    let theirs = api
        .json(
            api.as_team(Method::POST, "/v1/lookup")
                .json(&serde_json::json!({"keys": [key(1)]})),
        )
        .await;
    assert_eq!(theirs["entries"], serde_json::json!({}));
    assert_eq!(
        status_of(
            api.as_team(Method::PUT, &entry_path)
                .json(&entry_json(None, "RUN team"))
        )
        .await,
        StatusCode::CREATED
    );
    let team_page = api
        .json(api.as_team(Method::GET, "/v1/admin/entries"))
        .await;
    assert_eq!(team_page["entries"].as_array().unwrap().len(), 1);
    assert_eq!(team_page["entries"][0]["entry"]["createdBy"], "RUN team");
    assert_eq!(
        status(
            api.as_team(Method::DELETE, &entry_path)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        api.json(api.as_ops(Method::GET, &entry_path)).await["createdBy"],
        "RUN a"
    );
}

async fn blobs_are_read_whole_by_range_and_by_head(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    upload(api, &data).await;
    let blob_path = format!("/v1/blobs/{digest}");
    let head = api.as_ops(Method::HEAD, &blob_path).send().await.unwrap();
    assert_eq!(head.status(), StatusCode::OK);
    assert_eq!(head.headers()["content-length"], "1000");
    assert_eq!(head.headers()["etag"], format!("\"{digest}\""));
    assert_eq!(head.headers()["docker-content-digest"], digest.to_string());
    let whole = api.as_ops(Method::GET, &blob_path).send().await.unwrap();
    assert_eq!(whole.status(), StatusCode::OK);
    assert_eq!(whole.headers()["accept-ranges"], "bytes");
    assert_eq!(whole.bytes().await.unwrap(), data);
    let range = api
        .as_ops(Method::GET, &blob_path)
        .header("range", "bytes=-10")
        .send()
        .await
        .unwrap();
    assert_eq!(range.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(range.headers()["content-range"], "bytes 990-999/1000");
    assert_eq!(range.headers()["content-length"], "10");
    assert_eq!(range.bytes().await.unwrap().len(), 10);
    let middle = api
        .as_ops(Method::GET, &blob_path)
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(middle.headers()["content-range"], "bytes 100-199/1000");
    assert_eq!(middle.bytes().await.unwrap(), &data[100..200]);
    let beyond = api
        .as_ops(Method::GET, &blob_path)
        .header("range", "bytes=5000-")
        .send()
        .await
        .unwrap();
    assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    assert_eq!(beyond.headers()["content-range"], "bytes */1000");
    assert_eq!(
        status_of(api.as_ops(
            Method::GET,
            &format!("/v1/blobs/{}", Digest::of_bytes(b"none")),
        ))
        .await,
        StatusCode::NOT_FOUND
    );
}

async fn admin_listing_pages_in_key_order_and_filters_by_prefix(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    upload(api, &data).await;
    put_entry(api, 1, Some((&digest, 1000)), "RUN a").await;
    for n in 10..15 {
        put_entry(api, n, None, &format!("RUN {n}")).await;
    }
    let expected = vec![key(1), key(10), key(11), key(12), key(13), key(14)];
    assert_eq!(api.list_all(2).await, (expected.clone(), 4));
    assert_eq!(api.list_all(1000).await, (expected, 1));
    let by_prefix = api
        .json(api.as_ops(
            Method::GET,
            &format!("/v1/admin/entries?prefix={}", &key(12).to_hex()[..6]),
        ))
        .await;
    assert_eq!(by_prefix["entries"].as_array().unwrap().len(), 1);
    assert_eq!(by_prefix["entries"][0]["key"], key(12).to_hex());
    let full_key = api
        .json(api.as_ops(
            Method::GET,
            &format!("/v1/admin/entries?prefix={}", key(13).to_hex()),
        ))
        .await;
    assert_eq!(full_key["entries"][0]["key"], key(13).to_hex());
    assert_eq!(
        status_of(api.as_ops(Method::GET, "/v1/admin/entries?prefix=xyz")).await,
        StatusCode::BAD_REQUEST
    );
}

async fn deleting_the_last_entry_naming_a_blob_lets_gc_take_it(f: &Fixture) {
    let api = &f.api;
    let (data, digest) = data();
    upload(api, &data).await;
    put_entry(api, 1, Some((&digest, 1000)), "RUN a").await;
    let entry_path = format!("/v1/entries/{}", key(1));
    assert_eq!(
        status(
            api.as_ops(Method::DELETE, &entry_path)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        status(
            api.as_ops(Method::DELETE, &entry_path)
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NOT_FOUND
    );
    let gc = api.json(api.as_ops(Method::POST, "/v1/admin/gc")).await;
    assert_eq!(gc["blobs_removed"], 1, "{gc}");
    assert_eq!(
        status(
            api.as_ops(Method::GET, &format!("/v1/blobs/{digest}"))
                .send()
                .await
                .unwrap()
        ),
        StatusCode::NOT_FOUND
    );
}

async fn verify_reports_and_repairs_corrupt_and_missing_blobs(f: &Fixture) {
    let api = &f.api;
    for n in 10..15 {
        put_entry(api, n, None, &format!("RUN {n}")).await;
    }
    // A corrupt and a missing blob; repair removes them and the entries
    // naming them.
    let (rotten, lost) = (vec![2u8; 2000], vec![3u8; 300]);
    let (rotten_d, lost_d) = (upload(api, &rotten).await, upload(api, &lost).await);
    put_entry(api, 20, Some((&rotten_d, rotten.len())), "RUN layer").await;
    put_entry(api, 30, Some((&lost_d, lost.len())), "RUN layer").await;
    f.corrupt(&rotten_d).await;
    f.lose(&lost_d).await;
    let dry = api
        .json(api.as_ops(Method::POST, "/v1/admin/verify?repair=false"))
        .await;
    assert_eq!(dry["corrupt"], serde_json::json!([rotten_d]), "{dry}");
    assert_eq!(dry["missing"], serde_json::json!([lost_d]), "{dry}");
    assert_eq!(dry["blobs_checked"], 1, "{dry}");
    assert_eq!(dry["entries_dropped"], 0, "{dry}");
    assert_eq!(
        status(
            api.as_ops(Method::GET, &format!("/v1/entries/{}", key(20)))
                .send()
                .await
                .unwrap()
        ),
        StatusCode::OK
    );
    let repaired = api.json(api.as_ops(Method::POST, "/v1/admin/verify")).await;
    assert_eq!(
        repaired["corrupt"],
        serde_json::json!([rotten_d]),
        "{repaired}"
    );
    assert_eq!(repaired["entries_dropped"], 2, "{repaired}");
    for n in [20, 30] {
        let r = api
            .as_ops(Method::GET, &format!("/v1/entries/{}", key(n)))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND, "entry {n}");
    }
    assert_eq!(
        status_of(api.as_ops(Method::HEAD, &format!("/v1/blobs/{rotten_d}"))).await,
        StatusCode::NOT_FOUND
    );
    let clean = api.json(api.as_ops(Method::POST, "/v1/admin/verify")).await;
    assert_eq!(clean["corrupt"], serde_json::json!([]), "{clean}");
    assert_eq!(clean["missing"], serde_json::json!([]), "{clean}");
    assert_eq!(
        api.list_all(100).await.0.len(),
        5,
        "the layerless entries stay"
    );
}
