//! `/healthz`, `/readyz` and `/metrics`.

use std::sync::Arc;

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use metrics::{counter, gauge};
use metrics_exporter_prometheus::PrometheusHandle;

use crate::backend::Backend;
use crate::telemetry as t;

use super::*;

pub(super) async fn healthz() -> Json<serde_json::Value> {
    Json(serde_json::json!({"status": "ok"}))
}

pub(super) async fn readyz<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
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

pub(super) async fn render_metrics<B: Backend>(State(state): State<Arc<AppState<B>>>) -> Response {
    metrics_response(&state.backend.stats(), &state.metrics)
}

/// `/metrics`: the storage gauges from `stats`, then everything recorded.
pub(super) fn metrics_response(stats: &Stats, metrics: &PrometheusHandle) -> Response {
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
