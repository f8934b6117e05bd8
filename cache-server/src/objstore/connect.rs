//! Connecting to the store a `--storage` URL names (S3, GCS, Azure), with
//! the client budget and retry settings every request gets, and the
//! start-up check of conditional writes.

use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
use object_store::gcp::{GoogleCloudStorageBuilder, GoogleConfigKey};
use object_store::signer::Signer;
use object_store::{ClientConfigKey, RetryConfig};

use super::unconditional::WithoutConditionalWrites;
use super::url::{Scheme, parse_storage_url};
use super::{Bucket, ObjError, ReplicaConfig};

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::{DEFAULT_PART_SIZE, DEFAULT_PRESIGN_TTL};
    use object_store::path::Path;

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
}
