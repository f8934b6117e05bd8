//! `/v1/admin/*`: stats, entry pages, GC and verify.

use std::sync::Arc;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use kiln_common::wire::admin::EntryPage;
use serde::Deserialize;

use crate::auth::Scope;
use crate::backend::Backend;

use super::*;

pub(super) async fn admin_stats<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> ApiResult<Json<Stats>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.stats()))
}

#[derive(Debug, Deserialize)]
pub(super) struct ListQuery {
    #[serde(default)]
    prefix: String,
    after: Option<String>,
    limit: Option<usize>,
}

pub(super) async fn admin_entries<B: Backend>(
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

pub(super) async fn admin_gc<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
) -> ApiResult<Json<B::GcReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.gc().await?))
}

#[derive(Debug, Deserialize)]
pub(super) struct VerifyQuery {
    #[serde(default = "yes")]
    repair: bool,
}

pub(super) fn yes() -> bool {
    true
}

pub(super) async fn admin_verify<B: Backend>(
    State(state): State<Arc<AppState<B>>>,
    headers: HeaderMap,
    Query(query): Query<VerifyQuery>,
) -> ApiResult<Json<B::VerifyReport>> {
    authorize(&state, &headers, Scope::Admin)?;
    Ok(Json(state.backend.verify(query.repair).await?))
}
