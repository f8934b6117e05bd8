//! Logs (`tracing`, text or JSON) and Prometheus metrics (`metrics`).
//!
//! Metric names are constants here so the handlers, the docs and the tests
//! agree on them. The recorder is process-global; [`metrics_handle`]
//! installs it once and hands the same handle to every server.

use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const HTTP_REQUESTS: &str = "kiln_cache_http_requests_total";
pub const HTTP_DURATION: &str = "kiln_cache_http_request_duration_seconds";
pub const LOOKUP_KEYS: &str = "kiln_cache_lookup_keys_total";
pub const BYTES_RECEIVED: &str = "kiln_cache_blob_bytes_received_total";
pub const BYTES_SENT: &str = "kiln_cache_blob_bytes_sent_total";
pub const UPLOADS_IN_FLIGHT: &str = "kiln_cache_uploads_in_flight";
pub const ENTRIES: &str = "kiln_cache_entries";
pub const BLOBS: &str = "kiln_cache_blobs";
pub const BLOB_BYTES: &str = "kiln_cache_blob_bytes";
pub const EVICTIONS: &str = "kiln_cache_evictions_total";
pub const EXPIRATIONS: &str = "kiln_cache_expirations_total";
pub const BLOBS_REMOVED: &str = "kiln_cache_blobs_removed_total";
pub const GC_RUNS: &str = "kiln_cache_gc_runs_total";

/// Log output format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Installs the global `tracing` subscriber (filter from `RUST_LOG`,
/// default `info`). Logs go to stderr.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

/// The process-wide Prometheus recorder's handle.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            // Latency buckets from 100µs (a cached lookup) to 60s (a large
            // blob over a slow link).
            let buckets = [
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
            ];
            let builder = PrometheusBuilder::new();
            let builder = match builder
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_owned()), &buckets)
            {
                Ok(b) => b,
                Err(_) => PrometheusBuilder::new(),
            };
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already (an
            // embedding program's); ours then renders an empty page.
            let _ = metrics::set_global_recorder(recorder);
            handle
        })
        .clone()
}
