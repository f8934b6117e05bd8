//! The HTTP API (docs/cache-api.md) over a [`Replica`]: the same routes,
//! statuses and error bodies as the local mode, so executors and
//! `kiln-cache` cannot tell the two apart.
//!
//! Blob bodies stream in both directions between the client and the bucket
//! (upload parts are bounded, see [`crate::objstore::bucket::BlobUpload`]);
//! nothing is spooled on local disk. With `--presign-ttl`, blob GETs answer
//! `307` to a signed bucket URL instead of carrying the bytes. Failures of
//! the bucket answer `503 storage_unavailable`, so an executor with several
//! `--cache-server` URLs moves on to the next one.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use kiln_common::{CacheEntry, Digest, LookupRequest, LookupResponse};
use metrics::counter;
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::warn;

use super::{ObjError, Replica, ReplicaGcReport};
use crate::api::{
    ApiError as HttpError, ApiResult as HttpResult, BlobPutResponse, InFlight, RangeRequest,
    authorize_with, check_lookup_size, healthz, metrics_response, not_found_route, parse_digest,
    parse_key, parse_range, read_json_body, track,
};
use crate::auth::{Auth, Principal, Scope};
use crate::store::{BlobCommit, PutOutcome};
use crate::telemetry as t;

/// Shared state of the handlers.
pub struct ReplicaState {
    pub replica: Arc<Replica>,
    pub auth: Auth,
    pub metrics: PrometheusHandle,
}

/// The router of object-storage mode.
pub fn router(state: Arc<ReplicaState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .route("/v1/lookup", post(lookup))
        .route(
            "/v1/entries/{key}",
            get(get_entry).put(put_entry).delete(delete_entry),
        )
        .route(
            "/v1/blobs/{digest}",
            get(get_blob).head(head_blob).put(put_blob),
        )
        .route("/v1/admin/stats", get(admin_stats))
        .route("/v1/admin/gc", post(admin_gc))
        .route_layer(middleware::from_fn(track))
        .fallback(not_found_route)
        .with_state(state)
}

impl From<ObjError> for HttpError {
    fn from(e: ObjError) -> Self {
        let message = e.to_string();
        match e {
            ObjError::DigestMismatch { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "digest_mismatch", message)
            }
            ObjError::MissingBlob(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_blob", message)
            }
            ObjError::LayerSizeMismatch { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "size_mismatch", message)
            }
            ObjError::Conflict(_) => Self::new(StatusCode::CONFLICT, "conflict", message),
            ObjError::Store { .. } => {
                warn!(error = %message, "object storage request failed");
                Self::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "storage_unavailable",
                    message,
                )
            }
            _ => Self::internal(message),
        }
    }
}

fn authorize(state: &ReplicaState, headers: &HeaderMap, scope: Scope) -> HttpResult<Principal> {
    authorize_with(&state.auth, headers, scope)
}

async fn readyz(State(state): State<Arc<ReplicaState>>) -> Response {
    match state.replica.check_ready().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => HttpError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("object storage does not answer: {e}"),
        )
        .into_response(),
    }
}

async fn render_metrics(State(state): State<Arc<ReplicaState>>) -> Response {
    metrics_response(&state.replica.stats(), &state.metrics)
}

// ---- entries -----------------------------------------------------------------

async fn lookup(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    body: Body,
) -> HttpResult<Json<LookupResponse>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let request: LookupRequest = read_json_body(body, "lookup").await?;
    check_lookup_size(request.keys.len())?;
    let entries = state
        .replica
        .lookup(&principal.namespace, &request.keys)
        .await?;
    let hits = entries.len() as u64;
    counter!(t::LOOKUP_KEYS, "result" => "hit").increment(hits);
    counter!(t::LOOKUP_KEYS, "result" => "miss").increment(request.keys.len() as u64 - hits);
    Ok(Json(LookupResponse { entries }))
}

async fn get_entry(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> HttpResult<Json<CacheEntry>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let key = parse_key(&key)?;
    let mut found = state
        .replica
        .lookup(&principal.namespace, std::slice::from_ref(&key))
        .await?;
    let found = found.remove(&key);
    counter!(t::LOOKUP_KEYS, "result" => if found.is_some() { "hit" } else { "miss" }).increment(1);
    found
        .map(Json)
        .ok_or_else(|| HttpError::not_found(format!("no entry for key {key}")))
}

async fn put_entry(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Body,
) -> HttpResult<Response> {
    let principal = authorize(&state, &headers, Scope::Write)?;
    let key = parse_key(&key)?;
    let entry: CacheEntry = read_json_body(body, "entry").await?;
    match state
        .replica
        .put_entry(&principal.namespace, &key, &entry)
        .await?
    {
        PutOutcome::Created => Ok((StatusCode::CREATED, Json(entry)).into_response()),
        PutOutcome::Identical => Ok((StatusCode::OK, Json(entry)).into_response()),
        PutOutcome::Conflict { .. } => Err(HttpError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("key {key} already holds a different entry; entries are immutable"),
        )),
    }
}

async fn delete_entry(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> HttpResult<StatusCode> {
    let principal = authorize(&state, &headers, Scope::Admin)?;
    let key = parse_key(&key)?;
    if state
        .replica
        .delete_entry(&principal.namespace, &key)
        .await?
    {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(HttpError::not_found(format!("no entry for key {key}")))
    }
}

// ---- blobs -----------------------------------------------------------------

fn blob_headers(h: &mut HeaderMap, digest: &Digest) -> HttpResult<()> {
    let digest_value = HeaderValue::try_from(digest.to_string()).map_err(HttpError::internal)?;
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::ETAG,
        HeaderValue::try_from(format!("\"{digest}\"")).map_err(HttpError::internal)?,
    );
    h.insert(
        header::HeaderName::from_static("docker-content-digest"),
        digest_value,
    );
    Ok(())
}

async fn head_blob(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> HttpResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    match state.replica.blob_size(&digest).await? {
        Some(size) => {
            let mut response = StatusCode::OK.into_response();
            blob_headers(response.headers_mut(), &digest)?;
            response
                .headers_mut()
                .insert(header::CONTENT_LENGTH, HeaderValue::from(size));
            Ok(response)
        }
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

async fn get_blob(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> HttpResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    if let Some(url) = state.replica.presigned_get(&digest).await? {
        if state.replica.blob_size(&digest).await?.is_none() {
            return Err(HttpError::not_found(format!("no blob {digest}")));
        }
        let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
        response.headers_mut().insert(
            header::LOCATION,
            HeaderValue::try_from(url).map_err(HttpError::internal)?,
        );
        return Ok(response);
    }
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    // Without a Range header one GET does it; with one, the size decides
    // what the range means (suffixes, 416) before the bytes are fetched.
    let range = match range_header {
        None => None,
        Some(value) => {
            let Some(size) = state.replica.blob_size(&digest).await? else {
                return Err(HttpError::not_found(format!("no blob {digest}")));
            };
            match parse_range(Some(value), size) {
                RangeRequest::Full => None,
                RangeRequest::Partial(first, last) => Some(first..last + 1),
                RangeRequest::Unsatisfiable => {
                    let mut response = HttpError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("blob {digest} has {size} bytes"),
                    )
                    .into_response();
                    response.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::try_from(format!("bytes */{size}"))
                            .map_err(HttpError::internal)?,
                    );
                    return Ok(response);
                }
            }
        }
    };
    let partial = range.is_some();
    let Some(read) = state.replica.get_blob(&digest, range).await? else {
        return Err(HttpError::not_found(format!("no blob {digest}")));
    };
    let (size, served) = (read.size, read.range.clone());
    let stream = read
        .stream
        .inspect_ok(|chunk| counter!(t::BYTES_SENT).increment(chunk.len() as u64))
        .map_err(std::io::Error::other);
    let mut response = Response::new(Body::from_stream(stream));
    blob_headers(response.headers_mut(), &digest)?;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_LENGTH,
        HeaderValue::from(served.end - served.start),
    );
    if partial {
        *response.status_mut() = StatusCode::PARTIAL_CONTENT;
        response.headers_mut().insert(
            header::CONTENT_RANGE,
            HeaderValue::try_from(format!(
                "bytes {}-{}/{size}",
                served.start,
                served.end.saturating_sub(1)
            ))
            .map_err(HttpError::internal)?,
        );
    }
    Ok(response)
}

async fn put_blob(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: Body,
) -> HttpResult<Response> {
    authorize(&state, &headers, Scope::Write)?;
    let digest = parse_digest(&digest)?;
    let _in_flight = InFlight::start();
    let mut upload = state.replica.blob_upload(&digest).await?;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                counter!(t::BYTES_RECEIVED).increment(chunk.len() as u64);
                upload.write(chunk).await?;
            }
            // Dropping the upload aborts it: nothing reaches the bucket.
            Err(e) => {
                return Err(HttpError::bad_request(format!(
                    "upload of {digest} was cut short: {e}"
                )));
            }
        }
    }
    let size = upload.bytes_written();
    let status = match upload.commit().await? {
        BlobCommit::Created => StatusCode::CREATED,
        BlobCommit::Existed => StatusCode::OK,
    };
    let mut response = (
        status,
        Json(BlobPutResponse {
            digest: digest.clone(),
            size,
        }),
    )
        .into_response();
    response.headers_mut().insert(
        header::HeaderName::from_static("docker-content-digest"),
        HeaderValue::try_from(digest.to_string()).map_err(HttpError::internal)?,
    );
    Ok(response)
}

// ---- admin -------------------------------------------------------------------

async fn admin_stats(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
) -> HttpResult<Json<crate::store::Stats>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.replica.stats()))
}

async fn admin_gc(
    State(state): State<Arc<ReplicaState>>,
    headers: HeaderMap,
) -> HttpResult<Json<ReplicaGcReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.replica.gc().await?))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::bucket::{Bucket, MIN_PART_SIZE};
    use crate::objstore::{Replica, ReplicaConfig};
    use kiln_common::CacheKey;
    use object_store::memory::InMemory;
    use std::time::Duration;

    /// The router over an in-memory bucket on 127.0.0.1; the server task
    /// ends with the test's runtime.
    async fn serve(dir: &std::path::Path) -> String {
        let bucket = Bucket::new(Arc::new(InMemory::new()), "", MIN_PART_SIZE);
        let config = ReplicaConfig {
            miss_recheck: Duration::ZERO,
            blob_grace: Duration::ZERO,
            ..Default::default()
        };
        let replica = Arc::new(Replica::open(bucket, dir, config).unwrap());
        let state = Arc::new(ReplicaState {
            replica,
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
