//! Metrics the index records through the `metrics` facade; whoever installs
//! a recorder (the cache server's Prometheus exporter) exports them, and
//! without one they cost nothing.

/// Idle time of each evicted entry, in seconds (a histogram).
pub const EVICTED_IDLE: &str = "kiln_cache_evicted_entry_idle_seconds";

/// Records one eviction of an entry last used `idle_ms` ago.
pub fn record_eviction(idle_ms: u64) {
    metrics::histogram!(EVICTED_IDLE).record(idle_ms as f64 / 1000.0);
}
