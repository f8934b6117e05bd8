//! A [`Replica`] as a [`Backend`], so the one router of [`crate::api`]
//! serves object-storage mode with the same routes, statuses and error
//! bodies as the local mode: executors and `kiln-cache` cannot tell the two
//! apart.
//!
//! Blob bodies stream in both directions between the client and the bucket
//! (upload parts are bounded, see [`BlobUpload`]); nothing is spooled on
//! local disk. With `--presign-ttl`, [`Backend::blob_redirect`] hands out
//! signed bucket URLs that blob GETs answer `307` with. Failures of the
//! bucket answer `503 storage_unavailable`, so an executor with several
//! `--cache-server` URLs moves on to the next one.

use std::collections::BTreeMap;
use std::ops::Range;

use bytes::Bytes;
use futures::TryStreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest};

use super::admin::ReplicaVerifyReport;
use super::bucket::BlobUpload;
use super::{ObjError, Replica, ReplicaGcReport};
use crate::backend::{Backend, BlobRead, Upload};
use kiln_storage::{BlobCommit, EntryRecord, Namespace, PutOutcome, Stats};

impl Backend for Replica {
    type Error = ObjError;
    type Upload = BlobUpload;
    type GcReport = ReplicaGcReport;
    type VerifyReport = ReplicaVerifyReport;

    async fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, ObjError> {
        Replica::lookup(self, ns, keys).await
    }

    async fn get_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<Option<CacheEntry>, ObjError> {
        Ok(Replica::lookup(self, ns, std::slice::from_ref(key))
            .await?
            .remove(key))
    }

    async fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, ObjError> {
        Replica::put_entry(self, ns, key, entry).await
    }

    async fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, ObjError> {
        Replica::delete_entry(self, ns, key).await
    }

    async fn list_entries(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>, ObjError> {
        self.list_entry_page(ns, prefix, after, limit).await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ObjError> {
        Replica::blob_size(self, digest).await
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BlobRead>, ObjError> {
        Ok(self.get_blob(digest, range).await?.map(|read| BlobRead {
            size: read.size,
            range: read.range,
            stream: Box::pin(read.stream.map_err(std::io::Error::other)),
        }))
    }

    async fn blob_redirect(&self, digest: &Digest) -> Result<Option<String>, ObjError> {
        self.presigned_get(digest).await
    }

    async fn begin_upload(&self, digest: &Digest) -> Result<BlobUpload, ObjError> {
        self.blob_upload(digest).await
    }

    async fn gc(&self) -> Result<ReplicaGcReport, ObjError> {
        Replica::gc(self).await
    }

    async fn verify(&self, repair: bool) -> Result<ReplicaVerifyReport, ObjError> {
        Replica::verify(self, repair).await
    }

    fn stats(&self) -> Stats {
        Replica::stats(self)
    }

    async fn ready(&self) -> Result<(), ObjError> {
        self.check_ready().await
    }
}

impl Upload for BlobUpload {
    type Error = ObjError;

    async fn write(&mut self, chunk: Bytes) -> Result<(), ObjError> {
        BlobUpload::write(self, chunk).await
    }

    async fn commit(self) -> Result<(BlobCommit, u64), ObjError> {
        let size = self.bytes_written();
        Ok((BlobUpload::commit(self).await?, size))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use kiln_common::{CacheKey, Digest};
    use object_store::memory::InMemory;
    use reqwest::StatusCode;

    use crate::api::{AppState, router};
    use crate::auth::Auth;
    use crate::objstore::bucket::{Bucket, MIN_PART_SIZE};
    use crate::objstore::{Replica, ReplicaConfig};

    /// The router over an in-memory bucket on 127.0.0.1; the server task
    /// ends with the test's runtime.
    async fn serve(dir: &std::path::Path) -> String {
        let bucket = Bucket::new(Arc::new(InMemory::new()), "", MIN_PART_SIZE);
        // The refused entry write below leaves its reference marker, which
        // protects the blob for max(blob_grace, lease_ttl): both zero, so
        // the GC at the end may collect it.
        let config = ReplicaConfig {
            miss_recheck: Duration::ZERO,
            blob_grace: Duration::ZERO,
            lease_ttl: Duration::ZERO,
            ..Default::default()
        };
        let replica = Arc::new(Replica::open(bucket, dir, config).unwrap());
        let state = Arc::new(AppState {
            backend: replica,
            auth: Auth::Open,
            metrics: crate::telemetry::metrics_handle(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, router(state)).await });
        url
    }

    fn entry_json(digest: &Digest, size: usize, by: &str) -> serde_json::Value {
        serde_json::json!({
            "layer": {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest, "size": size, "diffId": digest,
            },
            "createdBy": by,
            "created": "2026-11-24T12:00:00Z",
        })
    }

    #[tokio::test]
    async fn the_api_answers_like_the_local_server() {
        let dir = tempfile::tempdir().unwrap();
        let url = serve(dir.path()).await;
        let c = reqwest::Client::new();
        let data = vec![7u8; 1000];
        let digest = Digest::of_bytes(&data);
        let key = CacheKey::from_bytes([1; 32]);

        let wrong = c
            .put(format!("{url}/v1/blobs/{}", Digest::of_bytes(b"x")))
            .body(data.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(wrong.status(), StatusCode::BAD_REQUEST);
        let body: serde_json::Value = wrong.json().await.unwrap();
        assert_eq!(body["error"]["code"], "digest_mismatch");

        let early = c
            .put(format!("{url}/v1/entries/{key}"))
            .json(&entry_json(&digest, 1000, "RUN a"))
            .send()
            .await
            .unwrap();
        assert_eq!(early.status(), StatusCode::UNPROCESSABLE_ENTITY);

        let put = |body: Vec<u8>| c.put(format!("{url}/v1/blobs/{digest}")).body(body).send();
        assert_eq!(
            put(data.clone()).await.unwrap().status(),
            StatusCode::CREATED
        );
        assert_eq!(put(data.clone()).await.unwrap().status(), StatusCode::OK);

        let put_entry = |by: &'static str| {
            c.put(format!("{url}/v1/entries/{key}"))
                .json(&entry_json(&digest, 1000, by))
                .send()
        };
        assert_eq!(
            put_entry("RUN a").await.unwrap().status(),
            StatusCode::CREATED
        );
        assert_eq!(put_entry("RUN a").await.unwrap().status(), StatusCode::OK);
        assert_eq!(
            put_entry("RUN b").await.unwrap().status(),
            StatusCode::CONFLICT
        );

        let found: serde_json::Value = c
            .post(format!("{url}/v1/lookup"))
            .json(&serde_json::json!({"keys": [key, CacheKey::from_bytes([2; 32])]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(found["entries"][key.to_hex()]["createdBy"], "RUN a");
        assert_eq!(found["entries"].as_object().unwrap().len(), 1);

        let range = c
            .get(format!("{url}/v1/blobs/{digest}"))
            .header("range", "bytes=-10")
            .send()
            .await
            .unwrap();
        assert_eq!(range.status(), StatusCode::PARTIAL_CONTENT);
        assert_eq!(range.headers()["content-range"], "bytes 990-999/1000");
        assert_eq!(range.bytes().await.unwrap().len(), 10);
        let beyond = c
            .get(format!("{url}/v1/blobs/{digest}"))
            .header("range", "bytes=5000-")
            .send()
            .await
            .unwrap();
        assert_eq!(beyond.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        let missing = c
            .head(format!("{url}/v1/blobs/{}", Digest::of_bytes(b"none")))
            .send()
            .await
            .unwrap();
        assert_eq!(missing.status(), StatusCode::NOT_FOUND);

        let deleted = c
            .delete(format!("{url}/v1/entries/{key}"))
            .send()
            .await
            .unwrap();
        assert_eq!(deleted.status(), StatusCode::NO_CONTENT);
        let gc: serde_json::Value = c
            .post(format!("{url}/v1/admin/gc"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(gc["lease_held"], true);
        assert_eq!(gc["blobs_removed"], 1);
        let gone = c
            .get(format!("{url}/v1/blobs/{digest}"))
            .send()
            .await
            .unwrap();
        assert_eq!(gone.status(), StatusCode::NOT_FOUND);
    }
}
