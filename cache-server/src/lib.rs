//! kiln-cache-server: kiln's cluster-wide, content-addressed layer cache.
//!
//! - [`backend`]: the storage seam, [`backend::Backend`], and its local
//!   implementation over a [`Store`] (the RocksDB index and content store of
//!   the `kiln-storage` crate, which has no HTTP in it).
//! - [`api`]: the HTTP routes of docs/cache-api.md over any backend.
//! - [`auth`]: tokens file, scopes, namespaces.
//! - [`server`]: binding, TLS, HTTP/1.1 + HTTP/2, GC task, graceful shutdown.
//! - [`conn`]: per-connection limits: timeouts, the connection cap, the
//!   open-file limit.
//! - [`config`]: flags, `KILN_CACHE_*` environment and config file.
//! - [`telemetry`]: logging and Prometheus metrics.
//! - [`client`] and [`cli`]: the `kiln-cache` admin command line.
//! - [`units`]: sizes and durations as written by humans.
//! - [`objstore`]: replicas over S3-compatible object storage (the other
//!   backend).

pub mod api;
pub mod auth;
pub mod backend;
pub mod cli;
pub mod client;
pub mod config;
pub mod conn;
pub mod objstore;
pub mod server;
pub mod telemetry;
pub mod units;

pub use kiln_storage::{
    BlobCommit, Namespace, PutOutcome, Store, StoreConfig, StoreError, index::BlobWriter,
};
