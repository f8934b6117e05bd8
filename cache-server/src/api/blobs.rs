//! `/v1/blobs/{digest}`: streamed reads (whole, RFC 9110 ranges, HEAD,
//! presigned redirects) and streamed uploads verified against their digest.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures::{StreamExt, TryStreamExt};
use kiln_common::Digest;
use kiln_common::wire::BlobPutResponse;
use metrics::{counter, gauge};

use crate::auth::Scope;
use crate::backend::{Backend, Upload};
use crate::telemetry as t;

use super::*;

pub(super) fn blob_headers(h: &mut HeaderMap, digest: &Digest) -> ApiResult<()> {
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

pub(super) async fn head_blob<B: Backend>(
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

pub(super) async fn get_blob<B: Backend>(
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
pub(super) struct InFlight;

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

pub(super) async fn put_blob<B: Backend>(
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
