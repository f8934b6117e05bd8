//! Object-storage mode: several cache-server replicas sharing one bucket,
//! selected with `--storage s3://bucket/prefix` (AWS S3 and S3-compatible
//! stores), `gs://bucket/prefix` (Google Cloud Storage) or
//! `az://container/prefix` (Azure Blob Storage).
//!
//! The storage backend of a server is a [`Storage`]: the local content store
//! with its RocksDB index ([`kiln_storage::Store`], the default), or a
//! [`Replica`] over a bucket. In object-storage mode the bucket is the truth
//! (blobs, entries, GC lease: see [`bucket`]), each replica's RocksDB is only
//! a cache of the entries it has seen ([`index`]), and a replica is a
//! [`crate::backend::Backend`], so the same router as the local mode
//! ([`crate::api`]) serves it. docs/object-storage.md describes the
//! guarantees, flags and deployment.
//!
//! - [`bucket`]: layout of the bucket and the object operations (verified
//!   blob uploads, first-writer-wins entries, reference markers, leases);
//! - [`index`]: the local index cache;
//! - [`replica`]: lookups with bounded staleness, entry writes, GC;
//! - [`admin`]: paging through entries and verifying blobs in the bucket;
//! - [`backend`]: the replica as a storage backend of the HTTP API;
//! - [`serve`]: the `--storage*`/`--s3-*` flags and starting a replica.
//!
//! - [`url`]: the `--storage` URL ([`StorageUrl`]) and each store's naming
//!   rules;
//! - [`connect`]: connecting to the store it names ([`connect_checked`]);
//!   everything above it sees only object_store's `ObjectStore`, whichever
//!   of the three it is;
//! - [`unconditional`]: the store as seen when its conditional writes are
//!   not to be relied on;
//! - [`error`]: [`ObjError`] and its class.

pub mod admin;
pub mod backend;
pub mod bucket;
mod connect;
mod error;
pub mod index;
pub mod replica;
pub mod serve;
mod unconditional;
mod url;

use std::sync::Arc;
use std::time::Duration;

pub use admin::ReplicaVerifyReport;
pub use bucket::Bucket;
pub use connect::{ObjectStorageConfig, connect, connect_checked};
pub use error::ObjError;
pub use replica::{Replica, ReplicaConfig, ReplicaGcReport};
pub use url::{Scheme, StorageUrl, parse_storage_url};

use kiln_storage::Store;

/// Where a server keeps its cache: chosen by `--storage`.
#[derive(Clone)]
pub enum Storage {
    /// Local content store and RocksDB index in `--data` (the default).
    Local(Store),
    /// A replica over a shared bucket.
    Object(Arc<Replica>),
}

/// Part size when none is configured: 16 MiB parts keep a 10 GiB layer
/// under S3's 10,000-part limit.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// Default of `--presign-ttl` when redirects are switched on.
pub const DEFAULT_PRESIGN_TTL: Duration = Duration::from_secs(300);
