//! Server configuration from flags, `KILN_CACHE_*` environment variables
//! and a TOML config file, in that order of precedence, then defaults.
//!
//! clap resolves flags over environment; every field is optional there so
//! that the config file can fill in what neither gave. [`ServerArgs::resolve`]
//! produces the one [`ServerConfig`] the server runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::objstore::ObjectStorageConfig;
use crate::objstore::serve::ObjectArgs;
use crate::store::StoreConfig;
use crate::telemetry::LogFormat;
use crate::units::{parse_duration, parse_size};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("{setting}: {message}")]
    Invalid {
        setting: &'static str,
        message: String,
    },
    #[error("--data (KILN_CACHE_DATA, or data = \"...\" in the config file) is required")]
    MissingData,
    #[error("--tls-cert and --tls-key must be given together")]
    HalfTls,
    #[error(transparent)]
    Object(#[from] crate::objstore::ObjError),
}

/// Command line of `kiln-cache-server`.
#[derive(Debug, Default, Clone, clap::Parser)]
#[command(
    name = "kiln-cache-server",
    version,
    about = "kiln's content-addressed layer cache server",
    long_about = "kiln's content-addressed layer cache server.\n\n\
        Every setting can also come from a KILN_CACHE_<NAME> environment variable \
        (e.g. KILN_CACHE_MAX_SIZE) or from the TOML file given with --config \
        (keys as the flag names with '_' for '-', e.g. max_size = \"10GiB\"). \
        Flags win over the environment, the environment over the file."
)]
pub struct ServerArgs {
    /// Address to listen on; port 0 picks a free port (the bound address is
    /// logged as "listening on ADDR:PORT") [default: 0.0.0.0:8080].
    #[arg(long, env = "KILN_CACHE_LISTEN", value_name = "ADDR:PORT")]
    pub listen: Option<SocketAddr>,
    /// Data directory: RocksDB index, blobs, temporary uploads.
    #[arg(long, env = "KILN_CACHE_DATA", value_name = "DIR")]
    pub data: Option<PathBuf>,
    /// Evict least-recently-used entries above this many blob bytes
    /// (e.g. 10GiB, 500MB). Unlimited by default.
    #[arg(long, env = "KILN_CACHE_MAX_SIZE", value_name = "SIZE")]
    pub max_size: Option<String>,
    /// Entries older than this are not served and are removed by GC
    /// (e.g. 14d, 12h). Never by default.
    #[arg(long, env = "KILN_CACHE_ENTRY_TTL", value_name = "DURATION")]
    pub entry_ttl: Option<String>,
    /// Unreferenced blobs younger than this survive GC, so a client can PUT
    /// the entry after the blob [default: 10m].
    #[arg(long, env = "KILN_CACHE_BLOB_GRACE", value_name = "DURATION")]
    pub blob_grace: Option<String>,
    /// How often GC runs; 0 runs it only on demand and when over the size
    /// limit [default: 10m].
    #[arg(long, env = "KILN_CACHE_GC_INTERVAL", value_name = "DURATION")]
    pub gc_interval: Option<String>,
    /// TOML file of token hashes and scopes; without it the server is open.
    #[arg(long, env = "KILN_CACHE_TOKENS", value_name = "FILE")]
    pub tokens: Option<PathBuf>,
    /// PEM certificate chain; enables TLS (with --tls-key).
    #[arg(long, env = "KILN_CACHE_TLS_CERT", value_name = "FILE")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "KILN_CACHE_TLS_KEY", value_name = "FILE")]
    pub tls_key: Option<PathBuf>,
    /// TOML config file.
    #[arg(long, env = "KILN_CACHE_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Log format [default: text]; the level comes from RUST_LOG (default info).
    #[arg(long, env = "KILN_CACHE_LOG_FORMAT", value_enum)]
    pub log_format: Option<LogFormat>,
    /// Write the bound port to this file once listening (for scripts/tests).
    #[arg(long, env = "KILN_CACHE_PORT_FILE", value_name = "FILE")]
    pub port_file: Option<PathBuf>,
    /// How long shutdown waits for in-flight requests [default: 30s].
    #[arg(long, env = "KILN_CACHE_SHUTDOWN_TIMEOUT", value_name = "DURATION")]
    pub shutdown_timeout: Option<String>,
    /// Accesses of one entry closer together than this are recorded once
    /// (LRU precision vs. write load) [default: 60s].
    #[arg(long, env = "KILN_CACHE_ACCESS_GRANULARITY", value_name = "DURATION")]
    pub access_granularity: Option<String>,
    /// RocksDB block cache size [default: 64MiB].
    #[arg(long, env = "KILN_CACHE_BLOCK_CACHE", value_name = "SIZE")]
    pub block_cache: Option<String>,
    /// Object-storage mode: --storage s3://bucket/prefix and its settings
    /// (docs/object-storage.md). Flags and environment only.
    #[command(flatten)]
    pub object: ObjectArgs,
}

/// The config file: same names as the flags, snake_case.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<SocketAddr>,
    data: Option<PathBuf>,
    max_size: Option<String>,
    entry_ttl: Option<String>,
    blob_grace: Option<String>,
    gc_interval: Option<String>,
    tokens: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    log_format: Option<LogFormat>,
    port_file: Option<PathBuf>,
    shutdown_timeout: Option<String>,
    block_cache: Option<String>,
    access_granularity: Option<String>,
}

/// Everything the server needs, resolved.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub store: StoreConfig,
    pub gc_interval: Duration,
    pub tokens: Option<PathBuf>,
    pub tls: Option<(PathBuf, PathBuf)>,
    pub log_format: LogFormat,
    pub port_file: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    /// `None`: the local store in `data` (the default).
    pub object: Option<ObjectStorageConfig>,
}

impl ServerArgs {
    /// Merges the config file (if any) under the flags/environment.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        // Paths in the config file are relative to the file's directory.
        let base = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let rel = |p: Option<PathBuf>| p.map(|p| base.join(p));

        let size = |setting, v: Option<String>| -> Result<Option<u64>, ConfigError> {
            v.map(|s| {
                parse_size(&s).map_err(|e| ConfigError::Invalid {
                    setting,
                    message: e.to_string(),
                })
            })
            .transpose()
        };
        let duration = |setting, v: Option<String>| -> Result<Option<Duration>, ConfigError> {
            v.map(|s| {
                parse_duration(&s).map_err(|e| ConfigError::Invalid {
                    setting,
                    message: e.to_string(),
                })
            })
            .transpose()
        };

        let data = self
            .data
            .or_else(|| rel(file.data))
            .ok_or(ConfigError::MissingData)?;
        let defaults = StoreConfig::default();
        let store = StoreConfig {
            max_size: size("max-size", self.max_size.or(file.max_size))?,
            entry_ttl: duration("entry-ttl", self.entry_ttl.or(file.entry_ttl))?
                .filter(|d| !d.is_zero()),
            blob_grace: duration("blob-grace", self.blob_grace.or(file.blob_grace))?
                .unwrap_or(defaults.blob_grace),
            block_cache_bytes: size("block-cache", self.block_cache.or(file.block_cache))?
                .map_or(defaults.block_cache_bytes, |b| b as usize),
            access_granularity: duration(
                "access-granularity",
                self.access_granularity.or(file.access_granularity),
            )?
            .unwrap_or(defaults.access_granularity),
        };
        let object = self.object.resolve(&store)?;
        let tls = match (
            self.tls_cert.or_else(|| rel(file.tls_cert)),
            self.tls_key.or_else(|| rel(file.tls_key)),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(ConfigError::HalfTls),
        };
        Ok(ServerConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 8080))),
            data,
            store,
            gc_interval: duration("gc-interval", self.gc_interval.or(file.gc_interval))?
                .unwrap_or(Duration::from_secs(600)),
            tokens: self.tokens.or_else(|| rel(file.tokens)),
            tls,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            port_file: self.port_file.or(file.port_file),
            shutdown_timeout: duration(
                "shutdown-timeout",
                self.shutdown_timeout.or(file.shutdown_timeout),
            )?
            .unwrap_or(Duration::from_secs(30)),
            object,
        })
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    toml::from_str(&text).map_err(|e| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn flags_win_over_the_config_file_which_fills_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache.toml");
        std::fs::write(
            &file,
            "data = \"store\"\nmax_size = \"1GiB\"\nentry_ttl = \"7d\"\nlisten = \"127.0.0.1:9000\"\n",
        )
        .unwrap();
        let args = ServerArgs::try_parse_from([
            "kiln-cache-server",
            "--config",
            file.to_str().unwrap(),
            "--max-size",
            "2GiB",
        ])
        .unwrap();
        let cfg = args.resolve().unwrap();
        assert_eq!(cfg.store.max_size, Some(2 << 30));
        assert_eq!(cfg.store.entry_ttl, Some(Duration::from_secs(7 * 86_400)));
        assert_eq!(cfg.data, dir.path().join("store"));
        assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
        assert_eq!(cfg.gc_interval, Duration::from_secs(600));
    }

    #[test]
    fn storage_selects_object_storage_which_shares_the_size_settings() {
        let args = ServerArgs::try_parse_from([
            "kiln-cache-server",
            "--data",
            "/x",
            "--max-size",
            "1GiB",
            "--storage",
            "s3://kiln-cache/ci",
            "--miss-recheck",
            "0",
        ])
        .unwrap();
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(object.url, "s3://kiln-cache/ci");
        assert_eq!(object.replica.max_size, Some(1 << 30));
        assert_eq!(object.replica.miss_recheck, Duration::ZERO);
        let local = ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x"]).unwrap();
        assert!(local.resolve().unwrap().object.is_none());
        let bad = ServerArgs::try_parse_from([
            "kiln-cache-server",
            "--data",
            "/x",
            "--storage",
            "gs://b/p",
        ])
        .unwrap();
        let err = bad.resolve().unwrap_err().to_string();
        assert!(err.contains("gs://b/p"), "{err}");
    }

    #[test]
    fn bad_values_name_the_setting() {
        let args = ServerArgs::try_parse_from([
            "kiln-cache-server",
            "--data",
            "/tmp/x",
            "--max-size",
            "lots",
        ])
        .unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("max-size") && err.contains("lots"), "{err}");
        let args =
            ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x", "--tls-cert", "c"])
                .unwrap();
        assert!(matches!(args.resolve(), Err(ConfigError::HalfTls)));
        assert!(matches!(
            ServerArgs::default().resolve(),
            Err(ConfigError::MissingData)
        ));
    }
}
