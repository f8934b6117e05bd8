//! The HTTP API (docs/cache-api.md): routes, auth checks, status codes,
//! ranges and streaming of blob bodies, over any storage [`Backend`] (the
//! local store or a replica over a bucket: one router, one set of
//! handlers).
//!
//! Handlers stay thin: they authenticate, parse, call the backend and map
//! its errors to statuses (by the error's [`ErrorClass`], in one place:
//! [`ApiError`]'s `From`). Blob bodies stream in both directions, so no blob is
//! ever held in memory. Every error answer is `{"error":{"code","message"}}`.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::{StreamExt, TryStreamExt};
use kiln_common::wire::BlobPutResponse;
use kiln_common::wire::MAX_LOOKUP_KEYS;
use kiln_common::wire::admin::EntryPage;
use kiln_common::{CacheEntry, CacheKey, Digest, ErrorBody, LookupRequest, LookupResponse};
use metrics::{counter, gauge, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Deserialize;
use tracing::{debug, error, warn};

use crate::auth::{Auth, AuthError, Principal, Scope};
use crate::backend::{Backend, Upload};
use crate::telemetry as t;
use kiln_storage::{BlobCommit, Classify, ErrorClass, PutOutcome, Stats};

/// Largest JSON request body (lookups, entries) we read; a full lookup of
/// MAX_LOOKUP_KEYS keys is ~70 KiB.
pub const MAX_JSON_BODY: usize = 1 << 20;
/// Default and maximum page size of `GET /v1/admin/entries`.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

/// Shared state of all handlers.
pub struct AppState<B> {
    pub backend: Arc<B>,
    pub auth: Auth,
    pub metrics: PrometheusHandle,
}

/// The full router with metrics middleware.
pub fn router<B: Backend>(state: Arc<AppState<B>>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz::<B>))
        .route("/metrics", get(render_metrics::<B>))
        .route("/v1/lookup", post(lookup::<B>))
        .route(
            "/v1/entries/{key}",
            get(get_entry::<B>)
                .put(put_entry::<B>)
                .delete(delete_entry::<B>),
        )
        .route(
            "/v1/blobs/{digest}",
            get(get_blob::<B>).head(head_blob::<B>).put(put_blob::<B>),
        )
        .route("/v1/admin/stats", get(admin_stats::<B>))
        .route("/v1/admin/entries", get(admin_entries::<B>))
        .route("/v1/admin/gc", post(admin_gc::<B>))
        .route("/v1/admin/verify", post(admin_verify::<B>))
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

/// The one mapping of storage failures to HTTP: every backend error says
/// its [`ErrorClass`], and the class alone decides the status and code.
impl<E: Classify + std::fmt::Display> From<E> for ApiError {
    fn from(e: E) -> Self {
        let message = e.to_string();
        let (status, code) = match e.class() {
            ErrorClass::Invalid => (StatusCode::BAD_REQUEST, "bad_request"),
            ErrorClass::DigestMismatch => (StatusCode::BAD_REQUEST, "digest_mismatch"),
            ErrorClass::MissingBlob => (StatusCode::UNPROCESSABLE_ENTITY, "missing_blob"),
            ErrorClass::SizeMismatch => (StatusCode::UNPROCESSABLE_ENTITY, "size_mismatch"),
            ErrorClass::Conflict => (StatusCode::CONFLICT, "conflict"),
            ErrorClass::NotFound => (StatusCode::NOT_FOUND, "not_found"),
            ErrorClass::Full => {
                warn!(error = %message, "the cache's storage is full");
                (StatusCode::INSUFFICIENT_STORAGE, "insufficient_storage")
            }
            ErrorClass::Unavailable => {
                warn!(error = %message, "the cache's storage does not answer");
                (StatusCode::SERVICE_UNAVAILABLE, "storage_unavailable")
            }
            ErrorClass::Internal => return Self::internal(message),
        };
        Self::new(status, code, message)
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

type ApiResult<T> = Result<T, ApiError>;

/// Checks the request's bearer token for `scope`.
fn authorize<B>(state: &AppState<B>, headers: &HeaderMap, scope: Scope) -> ApiResult<Principal> {
    let value = match headers.get(header::AUTHORIZATION) {
        Some(v) => Some(
            v.to_str()
                .map_err(|_| ApiError::from(AuthError::BadToken))?,
        ),
        None => None,
    };
    Ok(state.auth.require(value, scope)?)
}

fn parse_key(text: &str) -> ApiResult<CacheKey> {
    text.parse().map_err(|_| {
        ApiError::bad_request(format!(
            "{text:?} is not a cache key (expected 64 lowercase hex characters)"
        ))
    })
}

fn parse_digest(text: &str) -> ApiResult<Digest> {
    text.parse()
        .map_err(|e| ApiError::bad_request(format!("{e}")))
}

async fn read_json_body<T: serde::de::DeserializeOwned>(body: Body, what: &str) -> ApiResult<T> {
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

/// A batch lookup carries at most `MAX_LOOKUP_KEYS` keys (413 beyond).
fn check_lookup_size(keys: usize) -> ApiResult<()> {
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

async fn track(matched: Option<MatchedPath>, request: Request, next: Next) -> Response {
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

async fn not_found_route() -> ApiError {
    ApiError::not_found("no such route (see docs/cache-api.md)")
}

// ---- health and metrics --------------------------------------------------

async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

async fn readyz<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
    match state.backend.ready().await {
        Ok(()) => Json(serde_json::json!({"status": "ready"})).into_response(),
        Err(e) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("storage is not ready: {e}"),
        )
        .into_response(),
    }
}

async fn render_metrics<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
    metrics_response(&state.backend.stats(), &state.metrics)
}

/// `/metrics`: the storage gauges from `stats`, then everything recorded.
fn metrics_response(stats: &Stats, metrics: &PrometheusHandle) -> Response {
    gauge!(t::ENTRIES).set(stats.entries as f64);
    gauge!(t::BLOBS).set(stats.blobs as f64);
    gauge!(t::BLOB_BYTES).set(stats.blob_bytes as f64);
    if let Some(max) = stats.max_size {
        gauge!(t::MAX_SIZE).set(max as f64);
    }
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

async fn lookup<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Json<LookupResponse>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let request: LookupRequest = read_json_body(body, "lookup").await?;
    check_lookup_size(request.keys.len())?;
    let entries = state
        .backend
        .lookup(&principal.namespace, &request.keys)
        .await?;
    let hits = entries.len() as u64;
    counter!(t::LOOKUP_KEYS, "result" => "hit").increment(hits);
    counter!(t::LOOKUP_KEYS, "result" => "miss").increment(request.keys.len() as u64 - hits);
    Ok(Json(LookupResponse { entries }))
}

async fn get_entry<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<Json<CacheEntry>> {
    let principal = authorize(&state, &headers, Scope::Read)?;
    let key = parse_key(&key)?;
    let found = state.backend.get_entry(&principal.namespace, &key).await?;
    counter!(t::LOOKUP_KEYS, "result" => if found.is_some() { "hit" } else { "miss" }).increment(1);
    found
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no entry for key {key}")))
}

async fn put_entry<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(key): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    let principal = authorize(&state, &headers, Scope::Write)?;
    let key = parse_key(&key)?;
    let entry: CacheEntry = read_json_body(body, "entry").await?;
    let outcome = state
        .backend
        .put_entry(&principal.namespace, &key, &entry)
        .await?;
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

async fn delete_entry<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(key): Path<String>,
) -> ApiResult<StatusCode> {
    let principal = authorize(&state, &headers, Scope::Admin)?;
    let key = parse_key(&key)?;
    let deleted = state
        .backend
        .delete_entry(&principal.namespace, &key)
        .await?;
    if deleted {
        Ok(StatusCode::NO_CONTENT)
    } else {
        Err(ApiError::not_found(format!("no entry for key {key}")))
    }
}

// ---- blobs -----------------------------------------------------------------

fn blob_headers(h: &mut HeaderMap, digest: &Digest) -> ApiResult<()> {
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    h.insert(
        header::ETAG,
        HeaderValue::try_from(format!("\"{digest}\"")).map_err(ApiError::internal)?,
    );
    h.insert(
        header::HeaderName::from_static("docker-content-digest"),
        HeaderValue::try_from(digest.to_string()).map_err(ApiError::internal)?,
    );
    Ok(())
}

async fn head_blob<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    match state.backend.blob_size(&digest).await? {
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

async fn get_blob<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Read)?;
    let digest = parse_digest(&digest)?;
    let backend = &state.backend;
    if let Some(url) = backend.blob_redirect(&digest).await? {
        if backend.blob_size(&digest).await?.is_none() {
            return Err(ApiError::not_found(format!("no blob {digest}")));
        }
        let mut response = StatusCode::TEMPORARY_REDIRECT.into_response();
        response.headers_mut().insert(
            header::LOCATION,
            HeaderValue::try_from(url).map_err(ApiError::internal)?,
        );
        return Ok(response);
    }
    // Without a Range header one read does it; with one, the size decides
    // what the range means (suffixes, 416) before the bytes are read.
    let range = match headers.get(header::RANGE).and_then(|v| v.to_str().ok()) {
        None => None,
        Some(value) => {
            let Some(size) = backend.blob_size(&digest).await? else {
                return Err(ApiError::not_found(format!("no blob {digest}")));
            };
            match parse_range(Some(value), size) {
                RangeRequest::Full => None,
                RangeRequest::Partial(first, last) => Some(first..last + 1),
                RangeRequest::Unsatisfiable => {
                    let mut response = ApiError::new(
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        "range_not_satisfiable",
                        format!("blob {digest} has {size} bytes"),
                    )
                    .into_response();
                    response.headers_mut().insert(
                        header::CONTENT_RANGE,
                        HeaderValue::try_from(format!("bytes */{size}"))
                            .map_err(ApiError::internal)?,
                    );
                    return Ok(response);
                }
            }
        }
    };
    let partial = range.is_some();
    let Some(read) = backend.read_blob(&digest, range).await? else {
        return Err(ApiError::not_found(format!("no blob {digest}")));
    };
    let (size, served) = (read.size, read.range.clone());
    let stream = read
        .stream
        .inspect_ok(|chunk| counter!(t::BYTES_SENT).increment(chunk.len() as u64));
    let mut response = Response::new(Body::from_stream(stream));
    blob_headers(response.headers_mut(), &digest)?;
    response.headers_mut().insert(
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
            .map_err(ApiError::internal)?,
        );
    }
    Ok(response)
}

/// Decrements the uploads-in-flight gauge however the handler ends.
struct InFlight;

impl InFlight {
    fn start() -> Self {
        gauge!(t::UPLOADS_IN_FLIGHT).increment(1.0);
        InFlight
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        gauge!(t::UPLOADS_IN_FLIGHT).decrement(1.0);
    }
}

async fn put_blob<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: Body,
) -> ApiResult<Response> {
    authorize(&state, &headers, Scope::Write)?;
    let digest = parse_digest(&digest)?;
    let _in_flight = InFlight::start();
    let mut upload = Some(state.backend.begin_upload(&digest).await?);
    let mut failed: Option<B::Error> = None;
    let mut stream = body.into_data_stream();
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                counter!(t::BYTES_RECEIVED).increment(chunk.len() as u64);
                let Some(up) = &mut upload else { continue };
                if let Err(e) = up.write(chunk).await {
                    // Dropped: aborted. The rest of the body is still read,
                    // so the client gets this answer (e.g. a full disk)
                    // instead of a reset.
                    upload = None;
                    failed = Some(e);
                }
            }
            // The client went away or the body broke: dropping the upload
            // aborts it, nothing becomes visible.
            Err(e) => {
                return Err(ApiError::bad_request(format!(
                    "upload of {digest} was cut short: {e}"
                )));
            }
        }
    }
    if let Some(e) = failed {
        return Err(e.into());
    }
    let Some(upload) = upload else {
        return Err(ApiError::internal(format!("upload of {digest} lost")));
    };
    let (outcome, size) = upload.commit().await?;
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

async fn admin_stats<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> ApiResult<Json<Stats>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.stats()))
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

async fn admin_entries<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
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
    let entries = state
        .backend
        .list_entries(&principal.namespace, &query.prefix, after.as_ref(), limit)
        .await?;
    let next = if entries.len() == limit {
        entries.last().map(|r| r.key)
    } else {
        None
    };
    Ok(Json(EntryPage { entries, next }))
}

async fn admin_gc<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> ApiResult<Json<B::GcReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.gc().await?))
}

#[derive(Debug, Deserialize)]
struct VerifyQuery {
    #[serde(default = "yes")]
    repair: bool,
}

fn yes() -> bool {
    true
}

async fn admin_verify<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Query(query): Query<VerifyQuery>,
) -> ApiResult<Json<B::VerifyReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.verify(query.repair).await?))
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

    /// The HTTP behaviour every backend must show, through the one router.
    /// `corrupt` changes a stored blob's bytes (same length) and `lose`
    /// removes them, both behind the backend's back.
    async fn conformance(api: &Api, corrupt: impl AsyncFn(&Digest), lose: impl AsyncFn(&Digest)) {
        let status = |r: reqwest::Response| r.status();
        let data = vec![7u8; 1000];
        let digest = Digest::of_bytes(&data);
        let blob_path = format!("/v1/blobs/{digest}");
        let entry_path = format!("/v1/entries/{}", key(1));

        assert_eq!(
            api.json(api.as_ops(Method::GET, "/readyz")).await["status"],
            "ready"
        );
        let no_token = api
            .http
            .get(format!("{}{blob_path}", api.url))
            .send()
            .await
            .unwrap();
        assert_eq!(no_token.status(), StatusCode::UNAUTHORIZED);

        // Uploads are verified against their digest.
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
            status(api.as_ops(Method::HEAD, &blob_path).send().await.unwrap()),
            StatusCode::NOT_FOUND
        );

        // An entry needs its blob (and one of the size it says, below).
        let never = Digest::of_bytes(b"never uploaded");
        let early = api
            .as_ops(Method::PUT, &entry_path)
            .json(&entry_json(Some((&never, 14)), "RUN a"))
            .send()
            .await
            .unwrap();
        assert_eq!(early.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body: serde_json::Value = early.json().await.unwrap();
        assert_eq!(body["error"]["code"], "missing_blob");

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

        // First writer wins.
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
        let absent = api
            .as_ops(Method::GET, &format!("/v1/entries/{}", key(2)))
            .send()
            .await
            .unwrap();
        assert_eq!(absent.status(), StatusCode::NOT_FOUND);
        let bad_key = api
            .as_ops(Method::GET, "/v1/entries/nothex")
            .send()
            .await
            .unwrap();
        assert_eq!(bad_key.status(), StatusCode::BAD_REQUEST);

        // Namespaces: team-a sees none of the default namespace's entries
        // and has first-writer-wins of its own.
        let theirs = api
            .json(
                api.as_team(Method::POST, "/v1/lookup")
                    .json(&serde_json::json!({"keys": [key(1)]})),
            )
            .await;
        assert_eq!(theirs["entries"], serde_json::json!({}));
        let team_put = api
            .as_team(Method::PUT, &entry_path)
            .json(&entry_json(None, "RUN team"))
            .send()
            .await
            .unwrap();
        assert_eq!(team_put.status(), StatusCode::CREATED);
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

        // Blob reads: whole, ranges, 416 past the end, HEAD.
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
        let none = api
            .as_ops(
                Method::GET,
                &format!("/v1/blobs/{}", Digest::of_bytes(b"none")),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(none.status(), StatusCode::NOT_FOUND);

        // Admin entries: key order, pages joined by `next`, hex prefixes.
        for n in 10..15 {
            let r = api
                .as_ops(Method::PUT, &format!("/v1/entries/{}", key(n)))
                .json(&entry_json(None, &format!("RUN {n}")))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
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
        let bad_prefix = api
            .as_ops(Method::GET, "/v1/admin/entries?prefix=xyz")
            .send()
            .await
            .unwrap();
        assert_eq!(bad_prefix.status(), StatusCode::BAD_REQUEST);

        // Deleting the only entry naming the blob lets GC take it.
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
            status(api.as_ops(Method::GET, &blob_path).send().await.unwrap()),
            StatusCode::NOT_FOUND
        );

        // Verify finds a corrupt and a missing blob; repair removes them
        // and the entries naming them.
        let (rotten, lost) = (vec![2u8; 2000], vec![3u8; 300]);
        let (rotten_d, lost_d) = (Digest::of_bytes(&rotten), Digest::of_bytes(&lost));
        for (n, bytes, d) in [(20, &rotten, &rotten_d), (30, &lost, &lost_d)] {
            let r = api
                .as_ops(Method::PUT, &format!("/v1/blobs/{d}"))
                .body(bytes.clone())
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
            let r = api
                .as_ops(Method::PUT, &format!("/v1/entries/{}", key(n)))
                .json(&entry_json(Some((d, bytes.len())), "RUN layer"))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), StatusCode::CREATED);
        }
        let sized = api
            .as_ops(Method::PUT, &format!("/v1/entries/{}", key(21)))
            .json(&entry_json(Some((&rotten_d, 1999)), "RUN layer"))
            .send()
            .await
            .unwrap();
        assert_eq!(sized.status(), StatusCode::UNPROCESSABLE_ENTITY);
        let body: serde_json::Value = sized.json().await.unwrap();
        assert_eq!(body["error"]["code"], "size_mismatch");
        corrupt(&rotten_d).await;
        lose(&lost_d).await;
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
        let r = api
            .as_ops(Method::HEAD, &format!("/v1/blobs/{rotten_d}"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        let clean = api.json(api.as_ops(Method::POST, "/v1/admin/verify")).await;
        assert_eq!(clean["corrupt"], serde_json::json!([]), "{clean}");
        assert_eq!(clean["missing"], serde_json::json!([]), "{clean}");
        assert_eq!(
            api.list_all(100).await.0.len(),
            5,
            "the layerless entries stay"
        );
    }

    #[tokio::test]
    async fn both_backends_answer_the_same_http_conformance_sequence() {
        // The local store in a temporary directory.
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
        conformance(
            &api,
            async |d: &Digest| {
                let path = blobs.join(d.sharded_path());
                let len = std::fs::metadata(&path).unwrap().len() as usize;
                std::fs::write(&path, vec![0xEE; len]).unwrap();
            },
            async |d: &Digest| std::fs::remove_file(blobs.join(d.sharded_path())).unwrap(),
        )
        .await;

        // A replica over an in-memory bucket.
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
        conformance(
            &api,
            async |d: &Digest| {
                let path = bucket.blob_path(d);
                let len = mem.head(&path).await.unwrap().size as usize;
                mem.put(&path, PutPayload::from(vec![0xEE; len]))
                    .await
                    .unwrap();
            },
            async |d: &Digest| mem.delete(&bucket.blob_path(d)).await.unwrap(),
        )
        .await;
    }
}
