//! The HTTP API (docs/cache-api.md): routes, auth checks, status codes and
//! streaming of blob bodies, over a [`Store`].
//!
//! Handlers stay thin: they authenticate, parse, call the store and map
//! [`StoreError`]s to statuses. Blob bodies are streamed in both directions
//! through a bounded channel to a blocking thread that does the file I/O,
//! so no blob is ever held in memory and the async workers never block on
//! the disk. Every error answer is `{"error":{"code","message"}}`.

use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use kiln_common::wire::MAX_LOOKUP_KEYS;
use kiln_common::{CacheEntry, CacheKey, Digest, ErrorBody, LookupRequest, LookupResponse};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, error, warn};

use crate::auth::{Auth, AuthError, Principal, Scope};
use crate::store::{BlobCommit, EntryRecord, PinGuard, PutOutcome, Stats, Store, StoreError};
use crate::telemetry as t;

/// Largest JSON request body (lookups, entries) we read; a full lookup of
/// MAX_LOOKUP_KEYS keys is ~70 KiB.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Upload bytes handed to the writer thread at a time.
const UPLOAD_BATCH: usize = 1 << 20;
/// Size of the chunks blob bodies are read from disk in.
const CHUNK: usize = 256 << 10;
/// Default and maximum page size of `GET /v1/admin/entries`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Shared state of all handlers.
pub struct AppState {
    pub store: Store,
    pub auth: Auth,
    /// Woken when an upload pushes the store over its size limit.
    pub gc_wakeup: Arc<Notify>,
    pub metrics: PrometheusHandle,
}

/// The full router with metrics middleware.
pub fn router(state: Arc<AppState>) -> Router {
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
        .route("/v1/admin/entries", get(admin_entries))
        .route("/v1/admin/gc", post(admin_gc))
        .route("/v1/admin/verify", post(admin_verify))
        .route_layer(middleware::from_fn(track))
        .fallback(not_found_route)
        .with_state(state)
}

/// An error answer.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    pub(crate) fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub(crate) fn internal(message: impl std::fmt::Display) -> Self {
        error!(error = %message, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response =
            (self.status, Json(ErrorBody::new(self.code, self.message))).into_response();
        if self.status == StatusCode::UNAUTHORIZED {
            response
                .headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let message = e.to_string();
        match e {
            StoreError::NoSpace { .. } => {
                warn!(error = %message, "cache volume is full");
                Self::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "insufficient_storage",
                    message,
                )
            }
            StoreError::DigestMismatch { .. } => {
                Self::new(StatusCode::BAD_REQUEST, "digest_mismatch", message)
            }
            StoreError::MissingBlob(_) => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "missing_blob", message)
            }
            StoreError::LayerSizeMismatch { .. } => {
                Self::new(StatusCode::UNPROCESSABLE_ENTITY, "size_mismatch", message)
            }
            StoreError::BadNamespace(_) => Self::bad_request(message),
            _ => Self::internal(message),
        }
    }
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let message = e.to_string();
        match e {
            AuthError::Missing | AuthError::BadToken => {
                Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
            }
            AuthError::Forbidden(_) => Self::new(StatusCode::FORBIDDEN, "forbidden", message),
            AuthError::Read { .. } | AuthError::Invalid { .. } => Self::internal(message),
        }
    }
}

pub(crate) type ApiResult<T> = Result<T, ApiError>;

fn authorize(state: &AppState, headers: &HeaderMap, scope: Scope) -> ApiResult<Principal> {
    authorize_with(&state.auth, headers, scope)
}

/// Checks the request's bearer token against `auth` for `scope` (shared by
/// the local and the object-storage routers).
pub(crate) fn authorize_with(
    auth: &Auth,
    headers: &HeaderMap,
    scope: Scope,
) -> ApiResult<Principal> {
    let value = match headers.get(header::AUTHORIZATION) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::from(AuthError::BadToken))?,
        ),
        None => None,
    };
    Ok(auth.require(value, scope)?)
}

pub(crate) fn parse_key(text: &str) -> ApiResult<CacheKey> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{text:?} is not a cache key (expected 64 lowercase hex characters)"
        ))
    })
}

pub(crate) fn parse_digest(text: &str) -> ApiResult<Digest> {
    text.parse()
        .map_err(|e| ApiError::bad_request(format!("{e}")))
}

pub(crate) async fn read_json_body<T: serde::de::DeserializeOwned>(
    body: Body,
    what: &str,
) -> ApiResult<T> {
    let bytes = axum::body::to_bytes(body, MAX_JSON_BODY)
        .await
        .map_err(|_| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                format!("{what} body is larger than {MAX_JSON_BODY} bytes (or was cut short)"),
            )
        })?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ApiError::bad_request(format!("invalid {what} JSON: {e}")))
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

/// A batch lookup carries at most `MAX_LOOKUP_KEYS` keys (413 beyond).
pub(crate) fn check_lookup_size(keys: usize) -> ApiResult<()> {
    if keys > MAX_LOOKUP_KEYS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_keys",
            format!("a lookup may carry at most {MAX_LOOKUP_KEYS} keys, this one has {keys}"),
        ));
    }
    Ok(())
}

// ---- middleware ----------------------------------------------------------

pub(crate) async fn track(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
    let route = matched.map_or_else(|| "unmatched".to_owned(), |m| m.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let start = Instant::now();
    let response = next.run(request).await;
    let elapsed = start.elapsed();
    let status = response.status().as_u16();
    counter!(t::HTTP_REQUESTS, "route" => route.clone(), "method" => method.clone(), "status" => status.to_string())
        .increment(1);
    histogram!(t::HTTP_DURATION, "route" => route.clone(), "method" => method.clone())
        .record(elapsed.as_secs_f64());
    debug!(%method, %route, status, elapsed_us = elapsed.as_micros() as u64, "request");
    response
}

pub(crate) async fn not_found_route() -> ApiError {
    ApiError::not_found("no such route (see docs/cache-api.md)")
}

// ---- health and metrics --------------------------------------------------

pub(crate) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz(State(state): State<Arc<AppState>>) -> Response {
    let store = state.store.clone();
    match tokio::task::spawn_blocking(move || store.check_writable()).await {
        Ok(Ok(())) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Ok(Err(e)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("storage is not writable: {e}"),
        )
        .into_response(),
        Err(e) => ApiError::internal(e).into_response(),
    }
}

async fn render_metrics(State(state): State<Arc<AppState>>) -> Response {
    metrics_response(&state.store.stats(), &state.metrics)
}

/// `/metrics`: the storage gauges from `stats`, then everything recorded
/// (shared by the local and the object-storage routers).
pub(crate) fn metrics_response(stats: &Stats, metrics: &PrometheusHandle) -> Response {
    gauge!(t::ENTRIES).set(stats.entries as f64);
    gauge!(t::BLOBS).set(stats.blobs as f64);
    gauge!(t::BLOB_BYTES).set(stats.blob_bytes as f64);
    counter!(t::EVICTIONS).absolute(stats.entries_evicted);
    counter!(t::EXPIRATIONS).absolute(stats.entries_expired);
    counter!(t::BLOBS_REMOVED).absolute(stats.blobs_removed);
    counter!(t::GC_RUNS).absolute(stats.gc_runs);
    metrics.run_upkeep();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        metrics.render(),
    )
        .into_response()
}

// ---- entries ---------------------------------------------------------------

async fn lookup(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<LookupResponse>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let request: LookupRequest = read_json_body(body, "lookup").await?;
    check_lookup_size(request.keys.len())?;
    // Point reads that almost always hit the block cache: cheaper inline
    // than a hop to the blocking pool.
    let entries = state.store.lookup(&principal.namespace, &request.keys)?;
    let hits = entries.len() as u64;
    counter!(t::LOOKUP_KEYS, "result" => "hit").increment(hits);
    counter!(t::LOOKUP_KEYS, "result" => "miss").increment(request.keys.len() as u64 - hits);
    Ok(Json(LookupResponse { entries }))
}

async fn get_entry(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<CacheEntry>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let key = parse_key(&key)?;
    let found = state.store.get_entry(&principal.namespace, &key)?;
    counter!(t::LOOKUP_KEYS, "result" => if found.is_some() { "hit" } else { "miss" }).increment(1);
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no entry for key {key}")))
}

async fn put_entry(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let principal = authorize(&state, &headers, Scope::Write)?;
    let key = parse_key(&key)?;
    let entry: CacheEntry = read_json_body(body, "entry").await?;
    let store = state.store.clone();
    let (k, e) = (key, entry.clone());
    let outcome = blocking(move || store.put_entry(&principal.namespace, &k, &e)).await?;
    match outcome {
        PutOutcome::Created => Ok((StatusCode::CREATED, Json(entry)).into_response()),
        PutOutcome::Identical => Ok((StatusCode::OK, Json(entry)).into_response()),
        PutOutcome::Conflict { .. } => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("key {key} already holds a different entry; entries are immutable"),
        )),
    }
}

async fn delete_entry(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let principal = authorize(&state, &headers, Scope::Admin)?;
    let key = parse_key(&key)?;
    let store = state.store.clone();
    let k = key;
    if blocking(move || store.delete_entry(&principal.namespace, &k)).await? {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no entry for key {key}")))
    }
}

// ---- blobs -----------------------------------------------------------------

fn blob_headers(digest: &Digest) -> [(header::HeaderName, String); 4] {
    [
        (header::CONTENT_TYPE, "application/octet-stream".to_owned()),
        (header::ACCEPT_RANGES, "bytes".to_owned()),
        (header::ETAG, format!("\"{digest}\"")),
        (
            header::HeaderName::from_static("docker-content-digest"),
            digest.to_string(),
        ),
    ]
}

async fn head_blob(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    match state.store.stat_blob(&digest)? {
        Some(info) => {
            let mut response = StatusCode::OK.into_response();
            let h = response.headers_mut();
            for (name, value) in blob_headers(&digest) {
                h.insert(
                    name,
                    HeaderValue::try_from(value).map_err(ApiError::internal)?,
                );
            }
            h.insert(header::CONTENT_LENGTH, HeaderValue::from(info.size));
            Ok(response)
        }
        None => Ok(StatusCode::NOT_FOUND.into_response()),
    }
}

/// A single byte range, resolved against the blob size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeRequest {
    /// No (usable) Range header: the whole blob.
    Full,
    /// Inclusive first and last byte.
    Partial(u64, u64),
    /// Syntactically fine but outside the blob: 416.
    Unsatisfiable,
}

/// Parses a `Range` header for a blob of `size` bytes. Only single
/// `bytes=` ranges are honoured; anything else is ignored (answered with
/// the whole blob), as RFC 9110 allows.
pub fn parse_range(value: Option<&str>, size: u64) -> RangeRequest {
    let Some(spec) = value.and_then(|v| v.trim().strip_prefix("bytes=")) else {
        return RangeRequest::Full;
    };
    if spec.contains(',') {
        return RangeRequest::Full;
    }
    let Some((first, last)) = spec.split_once('-') else {
        return RangeRequest::Full;
    };
    let (first, last) = (first.trim(), last.trim());
    match (first.is_empty(), last.is_empty()) {
        (true, true) => RangeRequest::Full,
        (true, false) => match last.parse::<u64>() {
            // Suffix range: the last N bytes.
            Ok(0) => RangeRequest::Unsatisfiable,
            Ok(_) if size == 0 => RangeRequest::Unsatisfiable,
            Ok(n) => RangeRequest::Partial(size.saturating_sub(n), size - 1),
            Err(_) => RangeRequest::Full,
        },
        (false, _) => {
            let Ok(start) = first.parse::<u64>() else {
                return RangeRequest::Full;
            };
            let end = if last.is_empty() {
                u64::MAX
            } else {
                match last.parse::<u64>() {
                    Ok(end) if end >= start => end,
                    _ => return RangeRequest::Full,
                }
            };
            if start >= size {
                RangeRequest::Unsatisfiable
            } else {
                RangeRequest::Partial(start, end.min(size - 1))
            }
        }
    }
}

async fn get_blob(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    let Some(blob) = state.store.open_blob(&digest)? else {
        return Err(ApiError::not_found(format!("no blob {digest}")));
    };
    let range = parse_range(
        headers.get(header::RANGE).and_then(|v| v.to_str().ok()),
        blob.size,
    );
    let (status, start, len) = match range {
        RangeRequest::Full => (StatusCode::OK, 0, blob.size),
        RangeRequest::Partial(first, last) => {
            (StatusCode::PARTIAL_CONTENT, first, last - first + 1)
        }
        RangeRequest::Unsatisfiable => {
            let mut response = ApiError::new(
                StatusCode::RANGE_NOT_SATISFIABLE,
                "range_not_satisfiable",
                format!("blob {digest} has {} bytes", blob.size),
            )
            .into_response();
            response.headers_mut().insert(
                header::CONTENT_RANGE,
                HeaderValue::try_from(format!("bytes */{}", blob.size))
                    .map_err(ApiError::internal)?,
            );
            return Ok(response);
        }
    };
    let size = blob.size;
    let body = file_body(blob.file, start, len, blob.pin);
    let mut response = Response::new(body);
    *response.status_mut() = status;
    let h = response.headers_mut();
    for (name, value) in blob_headers(&digest) {
        h.insert(
            name,
            HeaderValue::try_from(value).map_err(ApiError::internal)?,
        );
    }
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    if status == StatusCode::PARTIAL_CONTENT {
        h.insert(
            header::CONTENT_RANGE,
            HeaderValue::try_from(format!("bytes {start}-{}/{size}", start + len - 1))
                .map_err(ApiError::internal)?,
        );
    }
    Ok(response)
}

/// Streams `len` bytes of `file` from `start`, read on a blocking thread.
/// The pin keeps the blob from eviction until the last byte is handed over
/// or the client goes away.
fn file_body(file: std::fs::File, start: u64, len: u64, pin: PinGuard) -> Body {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let _pin = pin;
        let mut offset = start;
        let end = start + len;
        while offset < end {
            let want = CHUNK.min((end - offset) as usize);
            let mut buf = BytesMut::zeroed(want);
            let result = file.read_at(&mut buf, offset).and_then(|n| {
                if n == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than its recorded size",
                    ))
                } else {
                    Ok(n)
                }
            });
            match result {
                Ok(n) => {
                    buf.truncate(n);
                    offset += n as u64;
                    counter!(t::BYTES_SENT).increment(n as u64);
                    if tx.blocking_send(Ok(buf.freeze())).is_err() {
                        return; // client went away
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Body::from_stream(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

#[derive(Serialize)]
pub(crate) struct BlobPutResponse {
    pub(crate) digest: Digest,
    pub(crate) size: u64,
}

/// Decrements the uploads-in-flight gauge however the handler ends.
pub(crate) struct InFlight;

impl InFlight {
    pub(crate) fn start() -> Self {
        gauge!(t::UPLOADS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(t::UPLOADS_IN_FLIGHT).decrement(1.0);
    }
}

async fn put_blob(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Write)?;
    let digest = parse_digest(&digest)?;
    let _in_flight = InFlight::start();
    let _pin = state.store.pin(&digest);

    // `Some(batch)` carries data, `None` says the body is complete. If the
    // channel closes without `None` (the client went away and this handler
    // was dropped, or the body failed) the writer drops the upload.
    let (tx, mut rx) = mpsc::channel::<Option<Vec<Bytes>>>(4);
    let store = state.store.clone();
    let expected = digest.clone();
    let writer = tokio::task::spawn_blocking(move || -> Result<(BlobCommit, u64), StoreError> {
        let mut w = store.blob_writer()?;
        loop {
            match rx.blocking_recv() {
                Some(Some(chunks)) => {
                    for chunk in chunks {
                        w.write_all(&chunk).map_err(|e| {
                            StoreError::io(format!("writing upload of {expected}"), e)
                        })?;
                    }
                }
                Some(None) => break,
                None => {
                    return Err(StoreError::io(
                        format!("upload of {expected}"),
                        io::Error::new(
                            io::ErrorKind::ConnectionAborted,
                            "client aborted the upload",
                        ),
                    ));
                }
            }
        }
        let size = w.bytes_written();
        Ok((w.commit(&expected)?, size))
    });

    let mut stream = body.into_data_stream();
    let mut writer_gone = false;
    let mut aborted = None;
    // Chunks are handed to the writer thread in batches of about a MiB:
    // one thread hop per batch instead of per (often 16 KiB) chunk.
    let mut batch: Vec<Bytes> = Vec::new();
    let mut batched = 0usize;
    loop {
        let next = stream.next().await;
        let flush = match &next {
            Some(Ok(chunk)) => {
                counter!(t::BYTES_RECEIVED).increment(chunk.len() as u64);
                batched += chunk.len();
                batched >= UPLOAD_BATCH
            }
            _ => true,
        };
        if let Some(Ok(chunk)) = &next
            && !writer_gone
        {
            batch.push(chunk.clone());
        }
        if flush && !batch.is_empty() {
            // After a write failure (e.g. a full disk) keep reading, so the
            // client gets our answer instead of a reset.
            if tx.send(Some(std::mem::take(&mut batch))).await.is_err() {
                writer_gone = true;
            }
            batched = 0;
        }
        match next {
            Some(Ok(_)) => {}
            Some(Err(e)) => {
                aborted = Some(e.to_string());
                break;
            }
            None => {
                let _ = tx.send(None).await;
                break;
            }
        }
    }
    drop(tx);
    let result = writer.await.map_err(ApiError::internal)?;
    if let Some(reason) = aborted {
        return Err(ApiError::bad_request(format!(
            "upload of {digest} was cut short: {reason}"
        )));
    }
    let (outcome, size) = result?;
    if state.store.over_limit() {
        state.gc_wakeup.notify_one();
    }
    let status = match outcome {
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
        HeaderValue::try_from(digest.to_string()).map_err(ApiError::internal)?,
    );
    Ok(response)
}

// ---- admin -------------------------------------------------------------------

async fn admin_stats(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<crate::store::Stats>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.store.stats()))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

/// One page of `GET /v1/admin/entries`.
#[derive(Debug, Serialize, Deserialize)]
pub struct EntryPage {
    pub entries: Vec<EntryRecord>,
    /// Pass as `after` to get the next page; absent on the last page.
    pub next: Option<CacheKey>,
}

async fn admin_entries(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<ListQuery>,
) -> ApiResult<Json<EntryPage>> {
    let principal = authorize(&state, &headers, Scope::Admin)?;
    if !query.prefix.bytes().all(|b| b.is_ascii_hexdigit()) || query.prefix.len() > 64 {
        return Err(ApiError::bad_request(format!(
            "prefix {:?} is not hex",
            query.prefix
        )));
    }
    let after = query.after.as_deref().map(parse_key).transpose()?;
    let limit = query.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let store = state.store.clone();
    let entries = blocking(move || {
        store.list_entries(&principal.namespace, &query.prefix, after.as_ref(), limit)
    })
    .await?;
    let next = if entries.len() == limit {
        entries.last().map(|r| r.key)
    } else {
        None
    };
    Ok(Json(EntryPage { entries, next }))
}

async fn admin_gc(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> ApiResult<Json<crate::store::GcReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    let store = state.store.clone();
    Ok(Json(blocking(move || store.gc()).await?))
}

#[derive(Debug, Deserialize)]
struct VerifyQuery {
    #[serde(default = "yes")]
    repair: bool,
}

fn yes() -> bool {
    true
}

async fn admin_verify(
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
    Query(query): Query<VerifyQuery>,
) -> ApiResult<Json<crate::store::VerifyReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    let store = state.store.clone();
    Ok(Json(blocking(move || store.verify(query.repair)).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_follow_rfc_9110() {
        use RangeRequest::*;
        assert_eq!(parse_range(None, 10), Full);
        assert_eq!(parse_range(Some("bytes=0-4"), 10), Partial(0, 4));
        assert_eq!(parse_range(Some("bytes=5-"), 10), Partial(5, 9));
        assert_eq!(parse_range(Some("bytes=5-100"), 10), Partial(5, 9));
        assert_eq!(parse_range(Some("bytes=-3"), 10), Partial(7, 9));
        assert_eq!(parse_range(Some("bytes=-30"), 10), Partial(0, 9));
        assert_eq!(parse_range(Some("bytes=10-"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=-0"), 10), Unsatisfiable);
        assert_eq!(parse_range(Some("bytes=0-0"), 0), Unsatisfiable);
        // Ignored: other units, multiple ranges, garbage, reversed.
        assert_eq!(parse_range(Some("items=0-1"), 10), Full);
        assert_eq!(parse_range(Some("bytes=0-1,3-4"), 10), Full);
        assert_eq!(parse_range(Some("bytes=x-y"), 10), Full);
        assert_eq!(parse_range(Some("bytes=5-2"), 10), Full);
    }
}
