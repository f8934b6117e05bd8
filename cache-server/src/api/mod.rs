//! The HTTP API (docs/cache-api.md): routes, auth checks, status codes,
//! ranges and streaming of blob bodies, over any storage [`Backend`] (the
//! local store or a replica over a bucket: one router, one set of
//! handlers).
//!
//! Handlers stay thin: they authenticate, parse, call the backend and map
//! its errors to statuses (by the error's [`ErrorClass`], in one place:
//! [`ApiError`]'s `From`). Blob bodies stream in both directions, so no blob is
//! ever held in memory. Every error answer is `{"error":{"code","message"}}`.

//!
//! Files: `error.rs` (ApiError and the one mapping of storage error
//! classes to statuses), `health.rs` (health, readiness, metrics),
//! `entries.rs`, `blobs.rs` (reads, ranges, uploads), `admin.rs`, and
//! `conformance.rs` (the specifications every backend must pass).
use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Body;
use axum::extract::{MatchedPath, Request};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::routing::{get, post};
use kiln_common::wire::MAX_LOOKUP_KEYS;
use kiln_common::{CacheKey, Digest};
use metrics::{counter, histogram};
use metrics_exporter_prometheus::PrometheusHandle;
use tracing::debug;

use crate::auth::{Auth, AuthError, Principal, Scope};
use crate::backend::Backend;
use crate::telemetry as t;

mod admin;
mod blobs;
#[cfg(test)]
mod conformance;
mod entries;
mod error;
mod health;

pub use blobs::{RangeRequest, parse_range};
pub use error::ApiError;

use admin::{admin_entries, admin_gc, admin_stats, admin_verify};
use blobs::{get_blob, head_blob, put_blob};
use entries::{delete_entry, get_entry, lookup, put_entry};
use health::{healthz, readyz, render_metrics};

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
