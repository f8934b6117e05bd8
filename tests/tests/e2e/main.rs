//! The end-to-end tests, one module per area, linked into ONE test binary
//! (`cargo test --release -p kiln-e2e --test e2e [MODULE::][NAME]`): every
//! test binary links RocksDB through the executor, so one binary instead of
//! one per file saves a link of several hundred megabytes per file on a cold
//! build (docs/performance.md, "Cold CI"). The harness is the `kiln-e2e`
//! library (tests/src/).

mod build;
mod cache;
mod cache_repo;
mod cache_tls;
mod compat;
mod differential;
mod gitlab_kaniko_job;
mod hostile_cache;
mod isolation_chroot;
mod isolation_none;
mod kaniko_contexts;
mod kaniko_flags;
mod kaniko_registry;
mod kaniko_runtime;
mod mountable_layers;
mod parallel_stages;
mod registry;
mod replicas;
mod robust;
