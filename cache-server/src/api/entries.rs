//! `/v1/lookup` and `/v1/entries/{key}`: batch lookups, first-writer-wins
//! puts, reads and deletes of entries.

use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use kiln_common::{CacheEntry, LookupRequest, LookupResponse};
use metrics::counter;

use crate::auth::Scope;
use crate::backend::Backend;
use crate::telemetry as t;

use super::*;

pub(super) async fn lookup<B: Backend>(
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

pub(super) async fn get_entry<B: Backend>(
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

pub(super) async fn put_entry<B: Backend>(
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

pub(super) async fn delete_entry<B: Backend>(
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
