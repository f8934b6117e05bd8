//! JSON types of the cache server's HTTP API (see docs/cache-api.md),
//! shared by the server, the executor's HTTP cache and the `kiln-cache`
//! admin client, so no client depends on the server's code.
//!
//! - [`data`]: the data plane (lookups, entries, blob uploads, error bodies).
//! - [`admin`]: the admin API (stats, entry listings, GC and verify reports).

pub mod admin;
pub mod data;

pub use data::*;
