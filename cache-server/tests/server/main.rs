//! The cache server's integration tests against the real `kiln-cache-server`
//! and `kiln-cache` binaries, one module per area, linked into ONE test
//! binary (`cargo test --release -p kiln-cache-server --test server
//! [MODULE::][NAME]`) so that a cold build links RocksDB once for them, not
//! once per file.

mod common;
mod s3_support;

mod api;
mod auth;
mod azure;
mod cli;
mod crash;
mod diskfull;
mod eviction;
mod s3_admin;
mod s3_bucket;
mod s3_config;
mod s3_garage;
mod s3_replicas;
mod telemetry;
mod tls;
