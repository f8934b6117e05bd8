//! Object-storage mode: several cache-server replicas sharing one S3 (or
//! S3-compatible) bucket, selected with `--storage s3://bucket/prefix`.
//!
//! The storage backend of a server is a [`Storage`]: the local content store
//! with its RocksDB index ([`crate::store::Store`], the default), or a
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
//! - [`serve`]: the `--storage`/`--s3-*` flags and starting a replica.

pub mod admin;
pub mod backend;
pub mod bucket;
pub mod index;
pub mod replica;
pub mod serve;

use std::sync::Arc;
use std::time::Duration;

use kiln_common::Digest;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::{ClientConfigKey, RetryConfig};

pub use admin::ReplicaVerifyReport;
pub use bucket::Bucket;
pub use replica::{Replica, ReplicaConfig, ReplicaGcReport};

use crate::store::Store;

/// Why an object-storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error("object storage: {context}: {source}")]
    Store {
        context: String,
        #[source]
        source: object_store::Error,
    },
    #[error("uploaded content does not match its digest: expected {expected}, got {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("the entry names blob {0}, which this cache does not have; upload it first")]
    MissingBlob(Digest),
    #[error(
        "the entry says blob {digest} has {entry_size} bytes, but the stored blob has {blob_size}"
    )]
    LayerSizeMismatch {
        digest: Digest,
        entry_size: u64,
        blob_size: u64,
    },
    #[error("{0}")]
    Conflict(String),
    #[error("local index cache: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt object {path}: {message}")]
    Corrupt { path: String, message: String },
    #[error("object storage settings: {0}")]
    Config(String),
}

/// Where a server keeps its cache: chosen by `--storage`.
#[derive(Clone)]
pub enum Storage {
    /// Local content store and RocksDB index in `--data` (the default).
    Local(Store),
    /// A replica over a shared bucket.
    Object(Arc<Replica>),
}

/// Settings of object-storage mode (flags `--storage`, `--s3-*`, and the
/// usual `AWS_*` environment variables underneath them).
#[derive(Debug, Clone)]
pub struct ObjectStorageConfig {
    /// `s3://bucket` or `s3://bucket/prefix`.
    pub url: String,
    /// Endpoint of an S3-compatible store (e.g. `http://127.0.0.1:9000`);
    /// `AWS_ENDPOINT_URL` otherwise, AWS itself when neither is set.
    pub endpoint: Option<String>,
    /// `AWS_REGION` / `AWS_DEFAULT_REGION` otherwise.
    pub region: Option<String>,
    /// Multipart part size (at least 5 MiB).
    pub part_size: usize,
    pub replica: ReplicaConfig,
}

/// Bucket and prefix of an `s3://bucket/prefix` URL.
pub fn parse_storage_url(url: &str) -> Result<(String, String), ObjError> {
    let rest = url.strip_prefix("s3://").ok_or_else(|| {
        ObjError::Config(format!(
            "--storage {url:?}: expected s3://bucket[/prefix] (only S3 and S3-compatible stores are supported)"
        ))
    })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let valid = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '.');
    if bucket.len() < 3 || bucket.len() > 63 || !bucket.chars().all(valid) {
        return Err(ObjError::Config(format!(
            "--storage {url:?}: {bucket:?} is not a bucket name (3-63 of a-z, 0-9, '-', '.')"
        )));
    }
    Ok((bucket.to_owned(), prefix.trim_matches('/').to_owned()))
}

/// Connects to the bucket: `AWS_*` environment first (credentials, region,
/// endpoint, `AWS_CONDITIONAL_PUT`, ...), then the explicit settings.
/// Plain-HTTP endpoints are allowed when the endpoint says `http://`.
pub fn connect(config: &ObjectStorageConfig) -> Result<Bucket, ObjError> {
    build_bucket(config, ConditionalWrites::AsConfigured)
}

/// Connects like [`connect`], then checks that the store really refuses to
/// overwrite on a conditional create ([`Bucket::honours_conditional_create`])
/// and reconnects without conditional writes when it does not, or when the
/// check itself fails (the fallbacks are correct everywhere; assuming a
/// guarantee the store does not give is not). Says which it chose.
pub async fn connect_checked(config: &ObjectStorageConfig) -> Result<Bucket, ObjError> {
    let bucket = build_bucket(config, ConditionalWrites::AsConfigured)?;
    let probe_id = format!("{}-{:032x}", config.replica.holder, rand::random::<u128>());
    let mut answer = bucket.honours_conditional_create(&probe_id).await;
    // A store that is still coming up gets a few seconds before the
    // replica settles for the fallbacks.
    for pause in [1, 2, 4] {
        if answer.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_secs(pause)).await;
        answer = bucket.honours_conditional_create(&probe_id).await;
    }
    match answer {
        Ok(true) => {
            tracing::info!(storage = %config.url, "the store honours conditional writes");
            Ok(bucket)
        }
        Ok(false) => {
            tracing::warn!(
                storage = %config.url,
                "the store does not refuse to overwrite on If-None-Match (or AWS_CONDITIONAL_PUT=disabled): \
                 entries are written check-write-read-back and the GC lease is check-then-write; \
                 run GC on one replica only (docs/object-storage.md)"
            );
            build_bucket(config, ConditionalWrites::Off)
        }
        Err(e) => {
            tracing::warn!(
                storage = %config.url, error = %e,
                "could not check whether the store honours conditional writes; working without them until restarted"
            );
            build_bucket(config, ConditionalWrites::Off)
        }
    }
}

enum ConditionalWrites {
    /// `AWS_CONDITIONAL_PUT` or object_store's default (`If-None-Match` /
    /// `If-Match`).
    AsConfigured,
    Off,
}

fn build_bucket(
    config: &ObjectStorageConfig,
    conditional: ConditionalWrites,
) -> Result<Bucket, ObjError> {
    let (bucket, prefix) = parse_storage_url(&config.url)?;
    // A bucket that cannot be reached should fail a request while the
    // executor still waits for it (its lookups give up after 10 s and move
    // on to the next --cache-server), not after object_store's default of
    // ten retries: a refused or unanswered connect costs 2 s, three times.
    // object_store's 30 s request timeout covers the whole response body
    // and its retry budget counts from the first byte, so with the defaults
    // a blob GET that streams for longer than three minutes (a large layer
    // to a slow client) would be cut off; both are set far above any
    // transfer instead. A request to a store that accepts and then never
    // answers is bounded by the HTTP client going away, which drops it.
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(3600),
        ..RetryConfig::default()
    };
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(&bucket)
        .with_retry(retry)
        .with_config(
            AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
            "2s",
        )
        .with_config(AmazonS3ConfigKey::Client(ClientConfigKey::Timeout), "1h");
    if let ConditionalWrites::Off = conditional {
        builder = builder.with_conditional_put(S3ConditionalPut::Disabled);
    }
    let endpoint = config
        .endpoint
        .clone()
        .or_else(|| std::env::var("AWS_ENDPOINT_URL").ok())
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    if let Some(endpoint) = &endpoint {
        builder = builder
            .with_endpoint(endpoint)
            .with_allow_http(endpoint.starts_with("http://"));
    }
    if let Some(region) = &config.region {
        builder = builder.with_region(region);
    }
    let s3 = Arc::new(
        builder
            .build()
            .map_err(|e| ObjError::Config(format!("{}: {e}", config.url)))?,
    );
    let mut bucket = Bucket::new(s3.clone(), &prefix, config.part_size);
    if config.replica.presign.is_some() {
        bucket = bucket.with_signer(s3);
    }
    Ok(bucket)
}

/// Part size when none is configured: 16 MiB parts keep a 10 GiB layer
/// under S3's 10,000-part limit.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// Default of `--presign-ttl` when redirects are switched on.
pub const DEFAULT_PRESIGN_TTL: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(
            parse_storage_url("s3://kiln-cache").unwrap(),
            ("kiln-cache".into(), String::new())
        );
        assert_eq!(
            parse_storage_url("s3://kiln-cache/team/a/").unwrap(),
            ("kiln-cache".into(), "team/a".into())
        );
        for bad in ["gs://x/y", "s3://", "s3://AB", "kiln-cache"] {
            let err = parse_storage_url(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }
}
