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
//! This module parses the `--storage` URL ([`StorageUrl`]) and connects to
//! the store it names ([`connect_checked`]); everything above it sees only
//! object_store's `ObjectStore`, whichever of the three it is.

pub mod admin;
pub mod backend;
pub mod bucket;
pub mod index;
pub mod replica;
pub mod serve;

use std::sync::Arc;
use std::time::Duration;

use std::ops::Range;
use std::pin::Pin;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    ClientConfigKey, CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta,
    ObjectStore, PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
    RetryConfig,
};

pub use admin::ReplicaVerifyReport;
pub use bucket::Bucket;
pub use replica::{Replica, ReplicaConfig, ReplicaGcReport};

use kiln_storage::{Classify, ContractError, ErrorClass, Store};

impl Classify for ObjError {
    fn class(&self) -> ErrorClass {
        match self {
            ObjError::Contract(e) => e.class(),
            ObjError::Conflict(_) => ErrorClass::Conflict,
            // The bucket does not answer: an executor moves on to its next
            // cache server.
            ObjError::Store { .. } => ErrorClass::Unavailable,
            ObjError::Db(_)
            | ObjError::Io { .. }
            | ObjError::Corrupt { .. }
            | ObjError::Config(_) => ErrorClass::Internal,
        }
    }
}

/// Why an object-storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ObjError {
    #[error("object storage: {context}: {source}")]
    Store {
        context: String,
        #[source]
        source: object_store::Error,
    },
    /// The storage contract's refusals, the same as the local store's.
    #[error(transparent)]
    Contract(#[from] ContractError),
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

/// Settings of object-storage mode (flags `--storage`, `--storage-*`,
/// `--s3-*`, and the store's usual environment variables underneath them:
/// `AWS_*`, `GOOGLE_*`, `AZURE_*`).
#[derive(Debug, Clone)]
pub struct ObjectStorageConfig {
    /// `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or
    /// `az://container[/prefix]`.
    pub url: String,
    /// Endpoint of the store: an S3-compatible server (e.g.
    /// `http://127.0.0.1:9000`; `AWS_ENDPOINT_URL` otherwise, AWS itself
    /// when neither is set), GCS's base URL (`GOOGLE_BASE_URL` otherwise),
    /// or an Azure account URL (`AZURE_STORAGE_ENDPOINT` otherwise,
    /// `https://<account>.blob.core.windows.net`).
    pub endpoint: Option<String>,
    /// S3 only: `AWS_REGION` / `AWS_DEFAULT_REGION` otherwise.
    pub region: Option<String>,
    /// Multipart part size (at least 5 MiB).
    pub part_size: usize,
    pub replica: ReplicaConfig,
}

/// The kind of store a `--storage` URL names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `s3://`: AWS S3 and S3-compatible stores.
    S3,
    /// `gs://`: Google Cloud Storage.
    Gcs,
    /// `az://`: a container of Azure Blob Storage.
    Azure,
}

impl Scheme {
    const ALL: [Scheme; 3] = [Scheme::S3, Scheme::Gcs, Scheme::Azure];

    fn url_prefix(self) -> &'static str {
        match self {
            Scheme::S3 => "s3://",
            Scheme::Gcs => "gs://",
            Scheme::Azure => "az://",
        }
    }

    /// What the first URL segment names: a bucket, or Azure's container.
    fn container_word(self) -> &'static str {
        match self {
            Scheme::Azure => "container",
            Scheme::S3 | Scheme::Gcs => "bucket",
        }
    }

    /// `None` when `name` is a valid bucket (container) name of this
    /// store; otherwise the rule it breaks.
    fn name_rule_broken(self, name: &str) -> Option<&'static str> {
        let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
        let ends_alnum = name.starts_with(alnum) && name.ends_with(alnum);
        match self {
            Scheme::S3 => {
                let valid = |c: char| alnum(c) || matches!(c, '-' | '.');
                let ok = (3..=63).contains(&name.len()) && name.chars().all(valid);
                (!ok).then_some("3-63 of a-z, 0-9, '-', '.'")
            }
            // https://cloud.google.com/storage/docs/buckets#naming
            Scheme::Gcs => {
                const RULE: &str = "3-63 of a-z, 0-9, '-', '_', '.' (up to 222 with dots, \
                                    at most 63 between dots), starting and ending with a \
                                    letter or digit";
                let valid = |c: char| alnum(c) || matches!(c, '-' | '_' | '.');
                let max = if name.contains('.') { 222 } else { 63 };
                let ok = (3..=max).contains(&name.len())
                    && name.chars().all(valid)
                    && ends_alnum
                    && name
                        .split('.')
                        .all(|part| !part.is_empty() && part.len() <= 63);
                (!ok).then_some(RULE)
            }
            // https://learn.microsoft.com/en-us/rest/api/storageservices/naming-and-referencing-containers--blobs--and-metadata
            Scheme::Azure => {
                let valid = |c: char| alnum(c) || c == '-';
                let ok = (3..=63).contains(&name.len())
                    && name.chars().all(valid)
                    && ends_alnum
                    && !name.contains("--");
                (!ok).then_some(
                    "3-63 of a-z, 0-9, '-', starting and ending with a letter or digit, \
                     no '--'",
                )
            }
        }
    }
}

/// A parsed `--storage` URL: which store, which bucket (container), and
/// the prefix inside it ("" for its root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageUrl {
    pub scheme: Scheme,
    pub bucket: String,
    pub prefix: String,
}

/// Parses `s3://bucket[/prefix]`, `gs://bucket[/prefix]` or
/// `az://container[/prefix]`, checking the name by that store's rules.
pub fn parse_storage_url(url: &str) -> Result<StorageUrl, ObjError> {
    let (scheme, rest) = Scheme::ALL
        .iter()
        .find_map(|s| url.strip_prefix(s.url_prefix()).map(|rest| (*s, rest)))
        .ok_or_else(|| {
            ObjError::Config(format!(
                "--storage {url:?}: expected s3://bucket[/prefix] (S3 and S3-compatible \
                 stores), gs://bucket[/prefix] (Google Cloud Storage) or \
                 az://container[/prefix] (Azure Blob Storage)"
            ))
        })?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    if let Some(rule) = scheme.name_rule_broken(bucket) {
        let word = scheme.container_word();
        return Err(ObjError::Config(format!(
            "--storage {url:?}: {bucket:?} is not a {word} name ({rule})"
        )));
    }
    Ok(StorageUrl {
        scheme,
        bucket: bucket.to_owned(),
        prefix: prefix.trim_matches('/').to_owned(),
    })
}

/// Connects to the bucket: the store's own environment first (`AWS_*`,
/// `GOOGLE_*` or `AZURE_*`: credentials, region, endpoint, ...), then the
/// explicit settings. Plain-HTTP endpoints are allowed when the endpoint
/// says `http://`.
pub fn connect(config: &ObjectStorageConfig) -> Result<Bucket, ObjError> {
    build_bucket(config, ConditionalWrites::AsConfigured)
}

/// Connects like [`connect`], then checks that the store really refuses to
/// overwrite on a conditional create ([`Bucket::honours_conditional_create`])
/// and reconnects without conditional writes when it does not, or when the
/// check itself fails (the fallbacks are correct everywhere; assuming a
/// guarantee the store does not give is not). Says which it chose. The same
/// for every scheme.
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
    /// What the store's client does by default (`If-None-Match` /
    /// `If-Match`; for S3 also `AWS_CONDITIONAL_PUT`).
    AsConfigured,
    Off,
}

/// The store and, when `--presign-ttl` asks for redirects, its URL signer.
type Connected = (Arc<dyn ObjectStore>, Option<Arc<dyn Signer>>);

fn build_bucket(
    config: &ObjectStorageConfig,
    conditional: ConditionalWrites,
) -> Result<Bucket, ObjError> {
    let url = parse_storage_url(&config.url)?;
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
    const CLIENT_BUDGET: [(ClientConfigKey, &str); 2] = [
        (ClientConfigKey::ConnectTimeout, "2s"),
        (ClientConfigKey::Timeout, "1h"),
    ];
    let retry = RetryConfig {
        max_retries: 3,
        retry_timeout: Duration::from_secs(3600),
        ..RetryConfig::default()
    };
    let built = |e: object_store::Error| ObjError::Config(format!("{}: {e}", config.url));
    let (store, signer): Connected = match url.scheme {
        Scheme::S3 => {
            let mut builder = AmazonS3Builder::from_env()
                .with_bucket_name(&url.bucket)
                .with_retry(retry);
            for (key, value) in CLIENT_BUDGET {
                builder = builder.with_config(AmazonS3ConfigKey::Client(key), value);
            }
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
            let s3 = Arc::new(builder.build().map_err(built)?);
            (s3.clone(), Some(s3))
        }
        Scheme::Gcs => {
            // GOOGLE_SERVICE_ACCOUNT(_KEY), GOOGLE_APPLICATION_CREDENTIALS,
            // GOOGLE_BASE_URL, ... then the workload's identity.
            let mut builder = GoogleCloudStorageBuilder::from_env()
                .with_bucket_name(&url.bucket)
                .with_retry(retry);
            for (key, value) in CLIENT_BUDGET {
                builder = builder.with_config(GoogleConfigKey::Client(key), value);
            }
            if let Some(endpoint) = &config.endpoint {
                builder = builder.with_base_url(endpoint);
            }
            if let Some(base) = builder.get_config_value(&GoogleConfigKey::BaseUrl)
                && base.starts_with("http://")
            {
                builder = builder
                    .with_config(GoogleConfigKey::Client(ClientConfigKey::AllowHttp), "true");
            }
            let gcs = Arc::new(builder.build().map_err(built)?);
            (gcs.clone(), Some(gcs))
        }
        Scheme::Azure => {
            // AZURE_STORAGE_ACCOUNT_NAME, AZURE_STORAGE_ACCOUNT_KEY (or a
            // SAS, a token, a service principal, workload identity, ...),
            // AZURE_STORAGE_ENDPOINT, AZURE_STORAGE_USE_EMULATOR.
            let mut builder = MicrosoftAzureBuilder::from_env()
                .with_container_name(&url.bucket)
                .with_retry(retry);
            for (key, value) in CLIENT_BUDGET {
                builder = builder.with_config(AzureConfigKey::Client(key), value);
            }
            let emulator = builder
                .get_config_value(&AzureConfigKey::UseEmulator)
                .is_some_and(|v| {
                    matches!(
                        v.to_ascii_lowercase().as_str(),
                        "true" | "1" | "yes" | "y" | "on"
                    )
                });
            if let Some(endpoint) = &config.endpoint {
                if emulator {
                    // object_store takes the emulator's address from
                    // AZURITE_BLOB_STORAGE_URL alone and would quietly
                    // ignore this one.
                    return Err(ObjError::Config(format!(
                        "{}: --storage-endpoint {endpoint:?} cannot be used with \
                         AZURE_STORAGE_USE_EMULATOR: give the emulator's address in \
                         AZURITE_BLOB_STORAGE_URL instead, or drop \
                         AZURE_STORAGE_USE_EMULATOR and give the account's URL \
                         (e.g. http://127.0.0.1:10000/devstoreaccount1) with \
                         AZURE_STORAGE_ACCOUNT_NAME and AZURE_STORAGE_ACCOUNT_KEY",
                        config.url
                    )));
                }
                builder = builder.with_endpoint(endpoint.clone());
            }
            if let Some(endpoint) = builder.get_config_value(&AzureConfigKey::Endpoint)
                && endpoint.starts_with("http://")
            {
                builder = builder.with_allow_http(true);
            }
            let azure = Arc::new(builder.build().map_err(built)?);
            (azure.clone(), Some(azure))
        }
    };
    // S3's client has a switch for this (above); the others do not, so
    // their conditional puts are refused in front of them instead.
    let store: Arc<dyn ObjectStore> = match (url.scheme, conditional) {
        (Scheme::Gcs | Scheme::Azure, ConditionalWrites::Off) => {
            Arc::new(WithoutConditionalWrites(store))
        }
        _ => store,
    };
    let mut bucket = Bucket::new(store, &url.prefix, config.part_size);
    if config.replica.presign.is_some()
        && let Some(signer) = signer
    {
        bucket = bucket.with_signer(signer);
    }
    Ok(bucket)
}

/// A store whose conditional writes are not to be relied on (the start-up
/// probe found it overwriting, or could not tell): a conditional put
/// (`PutMode::Create` or `Update`) answers `NotImplemented` without a
/// request, which sends every caller in [`bucket`] down its documented
/// fallback, as `AWS_CONDITIONAL_PUT=disabled` does for S3. Everything else
/// goes to the store unchanged.
#[derive(Debug)]
struct WithoutConditionalWrites(Arc<dyn ObjectStore>);

impl std::fmt::Display for WithoutConditionalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (without conditional writes)", self.0)
    }
}

/// What object_store's `#[async_trait]` methods return.
type BoxFut<'a, T> =
    Pin<Box<dyn std::future::Future<Output = object_store::Result<T>> + Send + 'a>>;

// The trait is declared with `#[async_trait]`; its methods are written out
// here in that macro's expanded form, each handing the inner store's own
// boxed future back.
impl ObjectStore for WithoutConditionalWrites {
    fn put_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> BoxFut<'async_trait, PutResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        if let PutMode::Create | PutMode::Update(_) = opts.mode {
            let refused = object_store::Error::NotImplemented {
                operation: format!("`put_opts` with mode `{:?}`", opts.mode),
                implementer: self.to_string(),
            };
            return Box::pin(std::future::ready(Err(refused)));
        }
        self.0.put_opts(location, payload, opts)
    }

    fn put_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFut<'async_trait, Box<dyn MultipartUpload>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.put_multipart_opts(location, opts)
    }

    fn get_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        options: GetOptions,
    ) -> BoxFut<'async_trait, GetResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.get_opts(location, options)
    }

    fn get_ranges<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        ranges: &'life2 [Range<u64>],
    ) -> BoxFut<'async_trait, Vec<Bytes>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.get_ranges(location, ranges)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list_with_offset(prefix, offset)
    }

    fn list_with_delimiter<'life0, 'life1, 'async_trait>(
        &'life0 self,
        prefix: Option<&'life1 Path>,
    ) -> BoxFut<'async_trait, ListResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.list_with_delimiter(prefix)
    }

    fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: CopyOptions,
    ) -> BoxFut<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.copy_opts(from, to, options)
    }

    fn rename_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: RenameOptions,
    ) -> BoxFut<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.rename_opts(from, to, options)
    }
}

/// Part size when none is configured: 16 MiB parts keep a 10 GiB layer
/// under S3's 10,000-part limit.
pub const DEFAULT_PART_SIZE: usize = 16 << 20;

/// Default of `--presign-ttl` when redirects are switched on.
pub const DEFAULT_PRESIGN_TTL: Duration = Duration::from_secs(300);

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::Digest;
    use object_store::memory::InMemory;

    fn parsed(url: &str) -> (Scheme, String, String) {
        let u = parse_storage_url(url).unwrap();
        (u.scheme, u.bucket, u.prefix)
    }

    #[test]
    fn storage_urls_name_a_bucket_and_an_optional_prefix() {
        assert_eq!(
            parsed("s3://kiln-cache"),
            (Scheme::S3, "kiln-cache".into(), String::new())
        );
        assert_eq!(
            parsed("s3://kiln-cache/team/a/"),
            (Scheme::S3, "kiln-cache".into(), "team/a".into())
        );
        assert_eq!(
            parsed("gs://kiln_cache.example.com/ci"),
            (Scheme::Gcs, "kiln_cache.example.com".into(), "ci".into())
        );
        assert_eq!(
            parsed("az://kiln-cache/team/b"),
            (Scheme::Azure, "kiln-cache".into(), "team/b".into())
        );
        for bad in [
            "s3://",
            "s3://AB",
            "kiln-cache",
            "https://kiln-cache",
            "gcs://kiln-cache",
            "azure://kiln-cache",
        ] {
            let err = parse_storage_url(bad).unwrap_err().to_string();
            assert!(err.contains(bad), "{err}");
        }
    }

    #[test]
    fn each_scheme_checks_names_by_its_own_rules() {
        let long = |n: usize| "a".repeat(n);
        let dotted_222 = format!("{}.{}.{}.{}", long(63), long(63), long(63), long(30));
        assert_eq!(dotted_222.len(), 222);
        let dotted_223 = format!("{dotted_222}a");
        for (url, ok) in [
            // S3 as before.
            (format!("s3://{}", long(63)), true),
            (format!("s3://{}", long(64)), false),
            ("s3://kiln_cache".into(), false),
            // GCS: '_' allowed, dots allow up to 222, 63 between dots.
            ("gs://kiln_cache-1".into(), true),
            (format!("gs://{}", long(63)), true),
            (format!("gs://{}", long(64)), false),
            (format!("gs://{dotted_222}"), true),
            (format!("gs://{dotted_223}"), false),
            (format!("gs://{}.com", long(64)), false),
            ("gs://ab".into(), false),
            ("gs://-kiln".into(), false),
            ("gs://kiln_".into(), false),
            ("gs://Kiln".into(), false),
            ("gs://kiln..cache".into(), false),
            // Azure: a-z, 0-9, '-' only, no '--', alphanumeric ends.
            ("az://kiln-cache-1".into(), true),
            ("az://abc".into(), true),
            (format!("az://{}", long(63)), true),
            (format!("az://{}", long(64)), false),
            ("az://ab".into(), false),
            ("az://kiln.cache".into(), false),
            ("az://kiln_cache".into(), false),
            ("az://kiln--cache".into(), false),
            ("az://-kiln".into(), false),
            ("az://kiln-".into(), false),
            ("az://Kiln".into(), false),
        ] {
            let result = parse_storage_url(&url);
            assert_eq!(result.is_ok(), ok, "{url}: {result:?}");
            if let Err(e) = result {
                let e = e.to_string();
                let word = if url.starts_with("az") {
                    "container"
                } else {
                    "bucket"
                };
                assert!(e.contains(&url) && e.contains(word), "{e}");
            }
        }
    }

    fn config(url: &str, endpoint: Option<&str>) -> ObjectStorageConfig {
        ObjectStorageConfig {
            url: url.into(),
            endpoint: endpoint.map(str::to_owned),
            region: None,
            part_size: DEFAULT_PART_SIZE,
            replica: ReplicaConfig {
                presign: Some(DEFAULT_PRESIGN_TTL),
                ..ReplicaConfig::default()
            },
        }
    }

    #[tokio::test]
    async fn gcs_and_azure_stores_are_built_with_their_endpoint_and_prefix() {
        // Neither builder talks to the network before the first request.
        // GCS without credentials would look for application default
        // credentials (none here) and then the metadata server, lazily.
        let bucket = connect(&config("gs://kiln-cache/ci", Some("http://127.0.0.1:1"))).unwrap();
        let debug = format!("{bucket:?}");
        assert!(
            debug.contains("kiln-cache") && debug.contains("\"ci\""),
            "{debug}"
        );
        // Azure needs an account outside the emulator; an account URL as
        // the endpoint (Azurite's path-style one here).
        // The well-known development key of Azurite, public.
        const KEY: &str = "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
        let built = MicrosoftAzureBuilder::new()
            .with_container_name("kiln-cache")
            .with_account("devstoreaccount1")
            .with_access_key(KEY)
            .with_endpoint("http://127.0.0.1:1/devstoreaccount1".into())
            .with_allow_http(true)
            .build()
            .unwrap();
        let url = built
            .signed_url(
                http::Method::GET,
                &Path::from("ci/blobs/sha256/ab"),
                Duration::from_secs(60),
            )
            .await
            .unwrap()
            .to_string();
        assert!(
            url.starts_with("http://127.0.0.1:1/devstoreaccount1/kiln-cache/ci/blobs/sha256/ab?")
                && url.contains("sig="),
            "{url}"
        );
    }

    #[tokio::test]
    async fn without_conditional_writes_conditional_puts_take_the_fallback() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plain = Bucket::new(inner.clone(), "p", DEFAULT_PART_SIZE);
        assert!(plain.honours_conditional_create("probe").await.unwrap());
        let off = Bucket::new(
            Arc::new(WithoutConditionalWrites(inner.clone())),
            "p",
            DEFAULT_PART_SIZE,
        );
        assert!(!off.honours_conditional_create("probe").await.unwrap());
        // Plain writes, reads, listings and multipart uploads pass through.
        let payload = bytes::Bytes::from_static(b"layer");
        let digest = Digest::of_bytes(&payload);
        let mut upload = off.blob_upload(&digest).await.unwrap();
        upload.write(payload).await.unwrap();
        upload.commit().await.unwrap();
        assert_eq!(off.blob_size(&digest).await.unwrap(), Some(5));
        assert_eq!(off.list_blobs().await.unwrap().len(), 1);
        assert!(
            off.acquire_lease("gc", "r1", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(off.delete_blob(&digest).await.unwrap());
    }
}
