//! Logs (`tracing`, text or JSON) and Prometheus metrics (`metrics`).
//!
//! Metric names are constants here so the handlers, the docs and the tests
//! agree on them, and every family is described here once ([`FAMILIES`]):
//! its HELP text is what `promtool check metrics` and dashboards read. Names
//! follow Prometheus conventions (base units in the name, `_total` on
//! counters); docs/cache-server.md lists them, docs/operations.md the
//! renames. The recorder is process-global; [`metrics_handle`] installs it
//! once and hands the same handle to every server.
//!
//! Log lines carry ANSI colour only when stderr is a terminal and `NO_COLOR`
//! is unset ([`use_ansi`]): files and pod logs get plain text.

use std::io::IsTerminal;
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
pub const MAX_SIZE: &str = "kiln_cache_max_size_bytes";
pub use kiln_storage::metrics::EVICTED_IDLE;

/// Whether a family is a counter, a gauge or a histogram (for its HELP line).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric family the server exports: name, kind, HELP text.
pub const FAMILIES: &[(&str, Kind, &str)] = &[
    (
        HTTP_REQUESTS,
        Kind::Counter,
        "HTTP requests answered, by route template, method and status code.",
    ),
    (
        HTTP_DURATION,
        Kind::Histogram,
        "Time from receiving a request to its response headers, by route template and method.",
    ),
    (
        LOOKUP_KEYS,
        Kind::Counter,
        "Cache keys looked up (batch lookups count each key), by result: hit or miss.",
    ),
    (
        BYTES_RECEIVED,
        Kind::Counter,
        "Blob body bytes received by uploads (counted as they arrive, before verification).",
    ),
    (
        BYTES_SENT,
        Kind::Counter,
        "Blob body bytes sent by downloads.",
    ),
    (
        UPLOADS_IN_FLIGHT,
        Kind::Gauge,
        "Blob uploads currently being received.",
    ),
    (ENTRIES, Kind::Gauge, "Cache entries stored."),
    (BLOBS, Kind::Gauge, "Blobs stored."),
    (
        BLOB_BYTES,
        Kind::Gauge,
        "Bytes of blobs stored; eviction keeps this at or under kiln_cache_max_size_bytes.",
    ),
    (
        MAX_SIZE,
        Kind::Gauge,
        "The configured size limit (max_size) in blob bytes; absent when the cache is unlimited.",
    ),
    (
        EVICTIONS,
        Kind::Counter,
        "Entries evicted (least recently used first) to bring stored bytes under max_size.",
    ),
    (
        EVICTED_IDLE,
        Kind::Histogram,
        "Time since an evicted entry was last used, observed at eviction; evictions of recently used entries mean the cache is too small.",
    ),
    (
        EXPIRATIONS,
        Kind::Counter,
        "Entries removed because they outlived entry_ttl.",
    ),
    (
        BLOBS_REMOVED,
        Kind::Counter,
        "Blobs removed by GC because no entry referenced them any more.",
    ),
    (GC_RUNS, Kind::Counter, "Garbage collection passes run."),
];

/// Buckets of [`EVICTED_IDLE`]: from an hour to a month, around the usual
/// rebuild intervals (a day, a week).
pub const EVICTED_IDLE_BUCKETS: [f64; 7] = [
    3_600.0,
    21_600.0,
    86_400.0,
    259_200.0,
    604_800.0,
    1_209_600.0,
    2_592_000.0,
];

/// Records one evicted entry's idle time (now − last access), in seconds.
pub use kiln_storage::metrics::record_eviction;

/// Log output format (`--log-format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// Whether log lines may carry ANSI colour: only when stderr is a terminal
/// and `NO_COLOR` (<https://no-color.org>) is unset or empty. Every kiln
/// binary decides with this.
pub fn use_ansi() -> bool {
    ansi_allowed(
        std::io::stderr().is_terminal(),
        std::env::var_os("NO_COLOR").as_deref(),
    )
}

fn ansi_allowed(terminal: bool, no_color: Option<&std::ffi::OsStr>) -> bool {
    terminal && no_color.is_none_or(|v| v.is_empty())
}

/// Installs the global `tracing` subscriber (filter from `RUST_LOG`,
/// default `info`). Logs go to stderr, coloured only where [`use_ansi`]
/// allows.
pub fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(use_ansi())
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
            // Fails only on an empty bucket list, which these are not.
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HTTP_DURATION.to_owned()), &buckets)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(EVICTED_IDLE.to_owned()),
                        &EVICTED_IDLE_BUCKETS,
                    )
                })
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder is installed already (an
            // embedding program's); ours then renders an empty page.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe_families();
            }
            handle
        })
        .clone()
}

/// Gives every family its HELP text (the recorder keeps it and prints it
/// above the family's samples).
fn describe_families() {
    for &(name, kind, help) in FAMILIES {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::ffi::OsStr;

    #[test]
    fn colour_only_on_a_terminal_without_no_color() {
        assert!(ansi_allowed(true, None));
        assert!(ansi_allowed(true, Some(OsStr::new(""))));
        assert!(!ansi_allowed(true, Some(OsStr::new("1"))));
        assert!(!ansi_allowed(false, None));
    }

    #[test]
    fn family_names_follow_prometheus_conventions() {
        for &(name, kind, help) in FAMILIES {
            assert!(!help.is_empty(), "{name}");
            assert_eq!(
                name.ends_with("_total"),
                kind == Kind::Counter,
                "{name}: counters and only counters end in _total"
            );
            assert!(name.starts_with("kiln_cache_"), "{name}");
        }
        let mut names: Vec<_> = FAMILIES.iter().map(|f| f.0).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), FAMILIES.len(), "a family is described twice");
    }
}
