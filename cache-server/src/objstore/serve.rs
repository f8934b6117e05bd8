//! Flags of object-storage mode and starting a replica inside the server:
//! [`ObjectArgs`] is flattened into the server's command line; when
//! `--storage s3://...` (or `gs://`, `az://`) is set, [`open`] connects the
//! replica and [`run`] gives the server its router and GC task. Credentials
//! never come from flags: the store's usual environment (`AWS_*`,
//! `GOOGLE_*`, `AZURE_*`) or the instance/pod identity object_store finds
//! supplies them.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::replica::default_holder;
use super::{
    DEFAULT_PART_SIZE, DEFAULT_PRESIGN_TTL, ObjError, ObjectStorageConfig, Replica, ReplicaConfig,
    Scheme,
};
use crate::api::{self, AppState};
use crate::auth::Auth;
use crate::backend::gc_loop;
use crate::telemetry;
use crate::units::{parse_duration, parse_size};
use kiln_storage::StoreConfig;

/// Flags of object-storage mode (all also `KILN_CACHE_*` variables and
/// config-file keys, named as the flags with `_` for `-`).
#[derive(Debug, Default, Clone, clap::Args)]
pub struct ObjectArgs {
    /// Where blobs and entries live: `local` (the --data directory, the
    /// default), or a bucket shared between replicas: `s3://bucket[/prefix]`
    /// (S3 and S3-compatible), `gs://bucket[/prefix]` (Google Cloud
    /// Storage) or `az://container[/prefix]` (Azure Blob Storage).
    /// Credentials come from the store's environment (AWS_*, GOOGLE_*,
    /// AZURE_*) or the pod's identity, never from flags or the config file.
    #[arg(long, env = "KILN_CACHE_STORAGE", value_name = "URL")]
    pub storage: Option<String>,
    /// Endpoint of the store: an S3-compatible server (e.g.
    /// http://minio:9000), a GCS base URL, or an Azure account URL
    /// [default: AWS_ENDPOINT_URL / GOOGLE_BASE_URL / AZURE_STORAGE_ENDPOINT,
    /// else the cloud's own].
    #[arg(long, env = "KILN_CACHE_STORAGE_ENDPOINT", value_name = "URL")]
    pub storage_endpoint: Option<String>,
    /// The older name of --storage-endpoint, still accepted.
    #[arg(long, env = "KILN_CACHE_S3_ENDPOINT", value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// Region of an s3:// bucket [default: AWS_REGION, else us-east-1].
    #[arg(long, env = "KILN_CACHE_S3_REGION", value_name = "REGION")]
    pub s3_region: Option<String>,
    /// Multipart upload part size, at least 5MiB [default: 16MiB].
    #[arg(long, env = "KILN_CACHE_STORAGE_PART_SIZE", value_name = "SIZE")]
    pub storage_part_size: Option<String>,
    /// The older name of --storage-part-size, still accepted.
    #[arg(long, env = "KILN_CACHE_S3_PART_SIZE", value_name = "SIZE")]
    pub s3_part_size: Option<String>,
    /// A key this replica found missing is looked up in the bucket again
    /// after this long; 0 asks every time [default: 2s].
    #[arg(long, env = "KILN_CACHE_MISS_RECHECK", value_name = "DURATION")]
    pub miss_recheck: Option<String>,
    /// An entry this replica has cached is confirmed in the bucket again
    /// after this long [default: 60s].
    #[arg(long, env = "KILN_CACHE_HIT_RECHECK", value_name = "DURATION")]
    pub hit_recheck: Option<String>,
    /// How long the GC lease lasts without renewal [default: 5m].
    #[arg(long, env = "KILN_CACHE_GC_LEASE_TTL", value_name = "DURATION")]
    pub gc_lease_ttl: Option<String>,
    /// Answer blob GETs with a redirect to a URL signed for this long
    /// (clients then download straight from the bucket). Off by default.
    #[arg(long, env = "KILN_CACHE_PRESIGN_TTL", value_name = "DURATION")]
    pub presign_ttl: Option<String>,
    /// This replica's name in the GC lease [default: hostname-pid].
    #[arg(long, env = "KILN_CACHE_REPLICA_ID", value_name = "NAME")]
    pub replica_id: Option<String>,
}

/// One setting's value and where it came from, so an error names what to
/// fix: the flag (or its variable: clap does not say which), or the key
/// and the config file.
struct Setting<'a> {
    /// The flag's name without `--`; the file key is the same with `_`.
    name: &'static str,
    value: &'a str,
    file: Option<&'a Path>,
}

impl Setting<'_> {
    fn error(&self, message: impl std::fmt::Display) -> ObjError {
        match self.file {
            None => ObjError::Config(format!("--{}: {message}", self.name)),
            Some(path) => ObjError::Config(format!(
                "config file {}: {}: {message}",
                path.display(),
                self.name.replace('-', "_")
            )),
        }
    }

    fn duration(&self) -> Result<Duration, ObjError> {
        parse_duration(self.value).map_err(|e| self.error(e))
    }
}

impl ObjectArgs {
    /// `None` for the local store; the object-storage settings otherwise.
    /// Each setting comes from `self` (flags over environment, as clap
    /// merged them) or else from `file`, the same settings read from the
    /// config file at the path given with them. `store` supplies the
    /// settings both modes share (size limit, TTL, blob grace).
    pub fn resolve(
        &self,
        file: Option<(&ObjectArgs, &Path)>,
        store: &StoreConfig,
    ) -> Result<Option<ObjectStorageConfig>, ObjError> {
        let pick = |name: &'static str, get: fn(&ObjectArgs) -> &Option<String>| {
            if let Some(value) = get(self) {
                return Some(Setting {
                    name,
                    value,
                    file: None,
                });
            }
            let (args, path) = file?;
            get(args).as_deref().map(|value| Setting {
                name,
                value,
                file: Some(path),
            })
        };
        let storage = match pick("storage", |a| &a.storage) {
            None => return Ok(None),
            Some(s) if matches!(s.value, "local" | "") => return Ok(None),
            Some(s) => s,
        };
        let url = match super::parse_storage_url(storage.value) {
            Ok(url) => url,
            // The URL check names `--storage`; from the file, say the key
            // and the file instead.
            Err(e) => {
                return Err(match (e, storage.file) {
                    (ObjError::Config(message), Some(_)) => {
                        storage.error(message.trim_start_matches("--storage "))
                    }
                    (e, _) => e,
                });
            }
        };
        let part_size = match renamed(
            self,
            file,
            "storage-part-size",
            |a| &a.storage_part_size,
            "s3-part-size",
            |a| &a.s3_part_size,
        )? {
            Some(s) => {
                let size = parse_size(s.value).map_err(|e| s.error(e))?;
                if size < super::bucket::MIN_PART_SIZE as u64 {
                    return Err(s.error(format!(
                        "{:?}: parts must be at least 5MiB (S3's and GCS's smallest part)",
                        s.value
                    )));
                }
                size as usize
            }
            None => DEFAULT_PART_SIZE,
        };
        let duration = |name, get| pick(name, get).map(|s| s.duration()).transpose();
        let text = |name, get| pick(name, get).map(|s| s.value.to_owned());
        let defaults = ReplicaConfig::default();
        let presign = duration("presign-ttl", |a| &a.presign_ttl)?
            .map(|d| if d.is_zero() { DEFAULT_PRESIGN_TTL } else { d });
        let endpoint = renamed(
            self,
            file,
            "storage-endpoint",
            |a| &a.storage_endpoint,
            "s3-endpoint",
            |a| &a.s3_endpoint,
        )?
        .map(|s| s.value.to_owned());
        let region = match pick("s3-region", |a| &a.s3_region) {
            Some(s) if url.scheme != Scheme::S3 => {
                return Err(s.error(format!(
                    "{:?}: a region is only given for s3:// storage, not for {}",
                    s.value, storage.value
                )));
            }
            s => s.map(|s| s.value.to_owned()),
        };
        Ok(Some(ObjectStorageConfig {
            url: storage.value.to_owned(),
            endpoint,
            region,
            part_size,
            replica: ReplicaConfig {
                miss_recheck: duration("miss-recheck", |a| &a.miss_recheck)?
                    .unwrap_or(defaults.miss_recheck),
                hit_recheck: duration("hit-recheck", |a| &a.hit_recheck)?
                    .unwrap_or(defaults.hit_recheck),
                entry_ttl: store.entry_ttl,
                max_size: store.max_size,
                blob_grace: store.blob_grace,
                lease_ttl: duration("gc-lease-ttl", |a| &a.gc_lease_ttl)?
                    .unwrap_or(defaults.lease_ttl),
                holder: text("replica-id", |a| &a.replica_id).unwrap_or_else(default_holder),
                presign,
            },
        }))
    }
}

type Getter = fn(&ObjectArgs) -> &Option<String>;

/// A setting with a new name and an older one, both accepted: from the
/// flags (or variables) first, else from the file, as [`ObjectArgs::resolve`]
/// does for every setting. Within one layer the two names must agree.
fn renamed<'a>(
    args: &'a ObjectArgs,
    file: Option<(&'a ObjectArgs, &'a Path)>,
    new: &'static str,
    new_get: Getter,
    old: &'static str,
    old_get: Getter,
) -> Result<Option<Setting<'a>>, ObjError> {
    fn layer<'a>(
        args: &'a ObjectArgs,
        file: Option<&'a Path>,
        (new, new_get): (&'static str, Getter),
        (old, old_get): (&'static str, Getter),
    ) -> Result<Option<Setting<'a>>, ObjError> {
        let found = |name, get: Getter| {
            get(args)
                .as_deref()
                .map(|value| Setting { name, value, file })
        };
        match (found(new, new_get), found(old, old_get)) {
            (Some(n), Some(o)) if n.value != o.value => {
                let old_name = match file {
                    None => format!("--{old}"),
                    Some(_) => old.replace('-', "_"),
                };
                Err(n.error(format!(
                    "{:?}, but {old_name} (its older name) says {:?}: give one",
                    n.value, o.value
                )))
            }
            (n, o) => Ok(n.or(o)),
        }
    }
    match layer(args, None, (new, new_get), (old, old_get))? {
        Some(setting) => Ok(Some(setting)),
        None => match file {
            Some((args, path)) => layer(args, Some(path), (new, new_get), (old, old_get)),
            None => Ok(None),
        },
    }
}

/// Connects to the bucket and opens the local index cache in `data`.
pub async fn open(config: &ObjectStorageConfig, data: &Path) -> Result<Arc<Replica>, ObjError> {
    let bucket = super::connect_checked(config).await?;
    let data = data.to_owned();
    let replica_config = config.replica.clone();
    let replica = tokio::task::spawn_blocking(move || Replica::open(bucket, &data, replica_config))
        .await
        .map_err(|e| ObjError::Config(format!("opening the local index cache: {e}")))??;
    // Not fatal: the bucket may come up after the pods; /readyz says so.
    match replica.check_ready().await {
        Ok(()) => {
            info!(storage = %config.url, replica = %config.replica.holder, "object storage reachable")
        }
        Err(e) => warn!(storage = %config.url, error = %e, "object storage does not answer yet"),
    }
    Ok(Arc::new(replica))
}

/// The router over `replica` (the same as the local mode's) and its GC
/// task, which stops when `stop` changes.
pub fn run(
    replica: Arc<Replica>,
    auth: Auth,
    gc_interval: Duration,
    stop: watch::Receiver<bool>,
) -> (Router, JoinHandle<()>) {
    let state = Arc::new(AppState {
        backend: replica.clone(),
        auth,
        metrics: telemetry::metrics_handle(),
    });
    // Every replica tries on its interval; the lease lets one of them do
    // the pass. Nothing wakes it early: the bucket's size is only known
    // from a GC listing.
    let gc = tokio::spawn(gc_loop(replica, gc_interval, None, stop));
    (api::router(state), gc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        object: ObjectArgs,
    }

    #[test]
    fn local_is_the_default_and_s3_settings_resolve() {
        let store = StoreConfig::default();
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert!(cli.object.resolve(None, &store).unwrap().is_none());
        let cli = Cli::try_parse_from([
            "x",
            "--storage",
            "s3://kiln-cache/ci",
            "--miss-recheck",
            "0s",
            "--presign-ttl",
            "2m",
            "--replica-id",
            "r1",
        ])
        .unwrap();
        let cfg = cli.object.resolve(None, &store).unwrap().unwrap();
        assert_eq!(cfg.replica.miss_recheck, Duration::ZERO);
        assert_eq!(cfg.replica.presign, Some(Duration::from_secs(120)));
        assert_eq!(cfg.replica.holder, "r1");
        assert_eq!(cfg.part_size, DEFAULT_PART_SIZE);
        let cli = Cli::try_parse_from(["x", "--storage", "s3://b1c/x", "--s3-part-size", "1MiB"])
            .unwrap();
        let err = cli.object.resolve(None, &store).unwrap_err().to_string();
        assert!(err.contains("5MiB"), "{err}");
    }
}
