//! Server configuration from flags, `KILN_CACHE_*` environment variables
//! and a TOML config file, in that order of precedence, then defaults.
//!
//! clap resolves flags over environment; every field is optional there so
//! that the config file can fill in what neither gave. [`ServerArgs::resolve`]
//! produces the one [`ServerConfig`] the server runs with. The file's keys
//! are the flags' names with `_` for `-`, object-storage settings included
//! (flat, like the rest); unknown keys are refused, and so are keys that
//! look like credentials, which only ever come from the environment or the
//! pod's identity. An invalid value names the flag, or the key and the file
//! it came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::objstore::ObjectStorageConfig;
use crate::objstore::serve::ObjectArgs;
use crate::telemetry::LogFormat;
use crate::units::{UnitError, parse_duration, parse_size};
use kiln_storage::StoreConfig;

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
    #[error("config file {path}: {key}: {message}")]
    InvalidInFile {
        path: String,
        key: &'static str,
        message: String,
    },
    #[error(
        "config file {path}: {key:?} looks like a credential, and credentials are never read \
         from the config file: remove it, and give the server AWS_ACCESS_KEY_ID and \
         AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN) in its environment, e.g. from a \
         Kubernetes Secret (for gs:// GOOGLE_SERVICE_ACCOUNT or \
         GOOGLE_APPLICATION_CREDENTIALS, for az:// AZURE_STORAGE_ACCOUNT_NAME and \
         AZURE_STORAGE_ACCOUNT_KEY), or let it use the pod's or instance's identity (IRSA, \
         workload identity, instance metadata)"
    )]
    Credentials { path: String, key: String },
    #[error("--data (KILN_CACHE_DATA, or data = \"...\" in the config file) is required")]
    MissingData,
    #[error("--tls-cert and --tls-key must be given together")]
    HalfTls,
    #[error("--tls-client-ca needs TLS: give --tls-cert and --tls-key too")]
    ClientCaWithoutTls,
    #[error(transparent)]
    Object(#[from] crate::objstore::ObjError),
}

/// kiln's cache port (docs/decisions.md, "The cache server listens on port
/// 7070"): the server's default, `kiln-cache`'s and the manifests'.
pub const DEFAULT_PORT: u16 = 7070;

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
    /// logged as "listening on ADDR:PORT") [default: 0.0.0.0:7070].
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
    /// PEM CA certificate(s): require every client to present a certificate
    /// signed by one of them (mutual TLS). Needs --tls-cert.
    #[arg(long, env = "KILN_CACHE_TLS_CLIENT_CA", value_name = "FILE")]
    pub tls_client_ca: Option<PathBuf>,
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
    /// A client must send a complete request head within this long of
    /// connecting or of its previous response; an idle connection is closed
    /// after it too [default: 30s].
    #[arg(long, env = "KILN_CACHE_HEADER_READ_TIMEOUT", value_name = "DURATION")]
    pub header_read_timeout: Option<String>,
    /// A request body (an upload) that sends nothing for this long fails,
    /// and so does a response the client stops reading [default: 60s].
    #[arg(long, env = "KILN_CACHE_BODY_READ_TIMEOUT", value_name = "DURATION")]
    pub body_read_timeout: Option<String>,
    /// Connections served at once; more wait in the listen backlog
    /// [default: half the open-file limit less 128, at most 4096].
    #[arg(long, env = "KILN_CACHE_MAX_CONNECTIONS", value_name = "N")]
    pub max_connections: Option<usize>,
    /// Accesses of one entry closer together than this are recorded once
    /// (LRU precision vs. write load) [default: 60s].
    #[arg(long, env = "KILN_CACHE_ACCESS_GRANULARITY", value_name = "DURATION")]
    pub access_granularity: Option<String>,
    /// RocksDB block cache size [default: 64MiB].
    #[arg(long, env = "KILN_CACHE_BLOCK_CACHE", value_name = "SIZE")]
    pub block_cache: Option<String>,
    /// Object-storage mode: --storage s3://bucket/prefix and its settings
    /// (docs/object-storage.md).
    #[command(flatten)]
    pub object: ObjectArgs,
}

/// The config file: same names as the flags, snake_case. The object-storage
/// keys are flat like the others (serde's `flatten` would not work with
/// `deny_unknown_fields`), and become an [`ObjectArgs`] for its resolution.
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
    tls_client_ca: Option<PathBuf>,
    log_format: Option<LogFormat>,
    port_file: Option<PathBuf>,
    shutdown_timeout: Option<String>,
    header_read_timeout: Option<String>,
    body_read_timeout: Option<String>,
    max_connections: Option<usize>,
    block_cache: Option<String>,
    access_granularity: Option<String>,
    storage: Option<String>,
    storage_endpoint: Option<String>,
    s3_endpoint: Option<String>,
    s3_region: Option<String>,
    storage_part_size: Option<String>,
    s3_part_size: Option<String>,
    miss_recheck: Option<String>,
    hit_recheck: Option<String>,
    gc_lease_ttl: Option<String>,
    presign_ttl: Option<String>,
    replica_id: Option<String>,
}

impl FileConfig {
    /// The object-storage keys, taken out of the file's settings.
    fn take_object(&mut self) -> ObjectArgs {
        ObjectArgs {
            storage: self.storage.take(),
            storage_endpoint: self.storage_endpoint.take(),
            s3_endpoint: self.s3_endpoint.take(),
            s3_region: self.s3_region.take(),
            storage_part_size: self.storage_part_size.take(),
            s3_part_size: self.s3_part_size.take(),
            miss_recheck: self.miss_recheck.take(),
            hit_recheck: self.hit_recheck.take(),
            gc_lease_ttl: self.gc_lease_ttl.take(),
            presign_ttl: self.presign_ttl.take(),
            replica_id: self.replica_id.take(),
        }
    }
}

/// What one client may hold of the server (see `server::serve`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionLimits {
    /// From accepting a connection (or finishing a response on it) to a
    /// complete request head; also how long a connection may sit idle.
    pub header_read_timeout: Duration,
    /// The longest pause inside a request body, or in reading a response.
    pub body_read_timeout: Duration,
    /// `None`: derived from the open-file limit when the server starts.
    pub max_connections: Option<usize>,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            header_read_timeout: Duration::from_secs(30),
            body_read_timeout: Duration::from_secs(60),
            max_connections: None,
        }
    }
}

/// Everything the server needs, resolved.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data: PathBuf,
    pub store: StoreConfig,
    pub gc_interval: Duration,
    pub tokens: Option<PathBuf>,
    /// Server certificate chain and key.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// CA bundle client certificates must chain to (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    pub log_format: LogFormat,
    pub port_file: Option<PathBuf>,
    pub shutdown_timeout: Duration,
    pub limits: ConnectionLimits,
    /// `None`: the local store in `data` (the default).
    pub object: Option<ObjectStorageConfig>,
}

impl ServerArgs {
    /// Merges the config file (if any) under the flags/environment.
    pub fn resolve(self) -> Result<ServerConfig, ConfigError> {
        let mut file = match &self.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let file_object = file.take_object();
        // Paths in the config file are relative to the file's directory.
        let base = self
            .config
            .as_deref()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let rel = |p: Option<PathBuf>| p.map(|p| base.join(p));

        let config = self.config.as_deref();
        let size = |setting, flag, from_file| layered(config, setting, flag, from_file, parse_size);
        let duration =
            |setting, flag, from_file| layered(config, setting, flag, from_file, parse_duration);

        let data = self
            .data
            .or_else(|| rel(file.data))
            .ok_or(ConfigError::MissingData)?;
        let defaults = StoreConfig::default();
        let limits = ConnectionLimits::default();
        let store = StoreConfig {
            max_size: size("max-size", self.max_size, file.max_size)?,
            entry_ttl: duration("entry-ttl", self.entry_ttl, file.entry_ttl)?
                .filter(|d| !d.is_zero()),
            blob_grace: duration("blob-grace", self.blob_grace, file.blob_grace)?
                .unwrap_or(defaults.blob_grace),
            block_cache_bytes: size("block-cache", self.block_cache, file.block_cache)?
                .map_or(defaults.block_cache_bytes, |b| b as usize),
            access_granularity: duration(
                "access-granularity",
                self.access_granularity,
                file.access_granularity,
            )?
            .unwrap_or(defaults.access_granularity),
        };
        let object = self
            .object
            .resolve(config.map(|path| (&file_object, path)), &store)?;
        let tls = match (
            self.tls_cert.or_else(|| rel(file.tls_cert)),
            self.tls_key.or_else(|| rel(file.tls_key)),
        ) {
            (Some(cert), Some(key)) => Some((cert, key)),
            (None, None) => None,
            _ => return Err(ConfigError::HalfTls),
        };
        let tls_client_ca = self.tls_client_ca.or_else(|| rel(file.tls_client_ca));
        if tls_client_ca.is_some() && tls.is_none() {
            return Err(ConfigError::ClientCaWithoutTls);
        }
        Ok(ServerConfig {
            listen: self
                .listen
                .or(file.listen)
                .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], DEFAULT_PORT))),
            data,
            store,
            gc_interval: duration("gc-interval", self.gc_interval, file.gc_interval)?
                .unwrap_or(Duration::from_secs(600)),
            tokens: self.tokens.or_else(|| rel(file.tokens)),
            tls,
            tls_client_ca,
            log_format: self.log_format.or(file.log_format).unwrap_or_default(),
            port_file: self.port_file.or(file.port_file),
            shutdown_timeout: duration(
                "shutdown-timeout",
                self.shutdown_timeout,
                file.shutdown_timeout,
            )?
            .unwrap_or(Duration::from_secs(30)),
            limits: ConnectionLimits {
                header_read_timeout: positive(
                    "header-read-timeout",
                    duration(
                        "header-read-timeout",
                        self.header_read_timeout,
                        file.header_read_timeout,
                    )?,
                )?
                .unwrap_or(limits.header_read_timeout),
                body_read_timeout: positive(
                    "body-read-timeout",
                    duration(
                        "body-read-timeout",
                        self.body_read_timeout,
                        file.body_read_timeout,
                    )?,
                )?
                .unwrap_or(limits.body_read_timeout),
                max_connections: match self.max_connections.or(file.max_connections) {
                    Some(0) => {
                        return Err(ConfigError::Invalid {
                            setting: "max-connections",
                            message: "must be at least 1".into(),
                        });
                    }
                    n => n,
                },
            },
            object,
        })
    }
}

/// A timeout of 0 would close every connection at once: refused.
fn positive(
    setting: &'static str,
    value: Option<Duration>,
) -> Result<Option<Duration>, ConfigError> {
    match value {
        Some(d) if d.is_zero() => Err(ConfigError::Invalid {
            setting,
            message: "must be more than 0".into(),
        }),
        v => Ok(v),
    }
}

/// A flag's (or its variable's) value, else the config file's, parsed. An
/// invalid value is reported as the flag, or as the key in the file.
fn layered<T>(
    config: Option<&Path>,
    setting: &'static str,
    flag: Option<String>,
    from_file: Option<String>,
    parse: impl Fn(&str) -> Result<T, UnitError>,
) -> Result<Option<T>, ConfigError> {
    let (value, file) = match (flag, from_file) {
        (Some(value), _) => (value, None),
        (None, Some(value)) => (value, config),
        (None, None) => return Ok(None),
    };
    parse(&value).map(Some).map_err(|e| match file {
        Some(path) => ConfigError::InvalidInFile {
            path: path.display().to_string(),
            key: file_key(setting),
            message: e.to_string(),
        },
        None => ConfigError::Invalid {
            setting,
            message: e.to_string(),
        },
    })
}

/// The config-file key of a setting named as its flag.
fn file_key(setting: &'static str) -> &'static str {
    match setting {
        "max-size" => "max_size",
        "entry-ttl" => "entry_ttl",
        "blob-grace" => "blob_grace",
        "gc-interval" => "gc_interval",
        "shutdown-timeout" => "shutdown_timeout",
        "header-read-timeout" => "header_read_timeout",
        "body-read-timeout" => "body_read_timeout",
        "access-granularity" => "access_granularity",
        "block-cache" => "block_cache",
        other => other,
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let parse_error = |e: toml::de::Error| ConfigError::Parse {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    // Credentials first, on the bare table: refused with where they go,
    // never echoed, whatever else is wrong with the file.
    let table: toml::Table = toml::from_str(&text).map_err(parse_error)?;
    if let Some(key) = credential_key(&table, "") {
        return Err(ConfigError::Credentials {
            path: path.display().to_string(),
            key,
        });
    }
    toml::from_str(&text).map_err(parse_error)
}

/// The first key (dotted, at any depth) that names a credential. Such a key
/// is refused rather than reported as merely unknown: a secret in a config
/// file ends up in ConfigMaps, images and repositories.
fn credential_key(table: &toml::Table, parent: &str) -> Option<String> {
    const WORDS: [&str; 9] = [
        "secret",
        "password",
        "credential",
        "access_key",
        "session_token",
        "security_token",
        // Azure's shared key and SAS, Google's service account key.
        "account_key",
        "sas_",
        "service_account",
    ];
    for (key, value) in table {
        let path = if parent.is_empty() {
            key.clone()
        } else {
            format!("{parent}.{key}")
        };
        let normal = key.to_ascii_lowercase().replace('-', "_");
        if WORDS.iter().any(|w| normal.contains(w)) {
            return Some(path);
        }
        let nested: Vec<&toml::Table> = match value {
            toml::Value::Table(t) => vec![t],
            toml::Value::Array(items) => items.iter().filter_map(|v| v.as_table()).collect(),
            _ => Vec::new(),
        };
        if let Some(found) = nested.into_iter().find_map(|t| credential_key(t, &path)) {
            return Some(found);
        }
    }
    None
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
            "ftp://kiln-cache/p",
        ])
        .unwrap();
        let err = bad.resolve().unwrap_err().to_string();
        assert!(err.contains("ftp://kiln-cache/p"), "{err}");
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

    #[test]
    fn client_certificates_need_tls_and_the_default_port_is_7070() {
        let args = ServerArgs::try_parse_from([
            "kiln-cache-server",
            "--data",
            "/x",
            "--tls-client-ca",
            "ca.pem",
        ])
        .unwrap();
        assert!(matches!(
            args.resolve(),
            Err(ConfigError::ClientCaWithoutTls)
        ));
        let (_dir, file, args) = with_file(
            "data = \"x\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_client_ca = \"ca.pem\"\n",
            &[],
        );
        let cfg = args.resolve().unwrap();
        assert_eq!(
            cfg.tls_client_ca,
            Some(file.parent().unwrap().join("ca.pem"))
        );
        assert_eq!(cfg.listen.port(), 7070);
    }

    #[test]
    fn connection_limits_come_from_flags_or_the_file_and_refuse_zero() {
        let (_dir, _file, args) = with_file(
            "data = \"d\"\nheader_read_timeout = \"5s\"\nmax_connections = 100\n",
            &["--body-read-timeout", "2m"],
        );
        let limits = args.resolve().unwrap().limits;
        assert_eq!(limits.header_read_timeout, Duration::from_secs(5));
        assert_eq!(limits.body_read_timeout, Duration::from_secs(120));
        assert_eq!(limits.max_connections, Some(100));
        let defaults = ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x"])
            .unwrap()
            .resolve()
            .unwrap()
            .limits;
        assert_eq!(defaults, ConnectionLimits::default());
        for flags in [["--header-read-timeout", "0"], ["--max-connections", "0"]] {
            let args = ServerArgs::try_parse_from(
                ["kiln-cache-server", "--data", "/x"]
                    .into_iter()
                    .chain(flags),
            )
            .unwrap();
            let err = args.resolve().unwrap_err().to_string();
            assert!(err.contains(&flags[0][2..]), "{err}");
        }
    }

    /// A config file with `text` in a fresh directory, and the arguments
    /// that point at it followed by `flags`.
    fn with_file(text: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf, ServerArgs) {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cache.toml");
        std::fs::write(&file, text).unwrap();
        let mut argv = vec!["kiln-cache-server", "--config", file.to_str().unwrap()];
        argv.extend_from_slice(flags);
        let args = ServerArgs::try_parse_from(argv).unwrap();
        (dir, file, args)
    }

    const S3_FILE: &str = r#"
data = "index"
storage = "s3://kiln-cache/team-a"
s3_endpoint = "http://minio.minio.svc:9000"
s3_region = "eu-west-1"
s3_part_size = "32MiB"
miss_recheck = "0"
hit_recheck = "5m"
gc_lease_ttl = "90s"
presign_ttl = "2m"
replica_id = "cache-0"
"#;

    #[test]
    fn object_storage_settings_can_come_from_the_config_file_alone() {
        let (_dir, _, args) = with_file(S3_FILE, &[]);
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(object.url, "s3://kiln-cache/team-a");
        assert_eq!(
            object.endpoint.as_deref(),
            Some("http://minio.minio.svc:9000")
        );
        assert_eq!(object.region.as_deref(), Some("eu-west-1"));
        assert_eq!(object.part_size, 32 << 20);
        assert_eq!(object.replica.miss_recheck, Duration::ZERO);
        assert_eq!(object.replica.hit_recheck, Duration::from_secs(300));
        assert_eq!(object.replica.lease_ttl, Duration::from_secs(90));
        assert_eq!(object.replica.presign, Some(Duration::from_secs(120)));
        assert_eq!(object.replica.holder, "cache-0");

        // `storage = "local"` in the file is the local store.
        let (_dir, _, args) = with_file("data = \"x\"\nstorage = \"local\"\n", &[]);
        assert!(args.resolve().unwrap().object.is_none());
    }

    #[test]
    fn object_storage_flags_win_over_the_config_file() {
        let (_dir, _, args) = with_file(
            S3_FILE,
            &[
                "--storage",
                "s3://other-bucket",
                "--miss-recheck",
                "3s",
                "--replica-id",
                "from-flag",
            ],
        );
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(object.url, "s3://other-bucket");
        assert_eq!(object.replica.miss_recheck, Duration::from_secs(3));
        assert_eq!(object.replica.holder, "from-flag");
        // What no flag gave still comes from the file.
        assert_eq!(object.region.as_deref(), Some("eu-west-1"));
        assert_eq!(object.replica.lease_ttl, Duration::from_secs(90));

        // A flag may also switch a file's bucket back to local storage.
        let (_dir, _, args) = with_file(S3_FILE, &["--storage", "local"]);
        assert!(args.resolve().unwrap().object.is_none());
    }

    #[test]
    fn storage_endpoint_and_part_size_have_new_names_and_keep_the_s3_ones() {
        // The old keys (S3_FILE) and flags keep working.
        let (_dir, _, args) = with_file(S3_FILE, &["--s3-part-size", "8MiB"]);
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(object.part_size, 8 << 20);
        // New names, in the file and as flags; a flag of either name wins
        // over the file's key of either name.
        let file = "data = \"x\"\nstorage = \"az://kiln-cache/ci\"\n\
                    storage_endpoint = \"http://127.0.0.1:10000/devstoreaccount1\"\n\
                    storage_part_size = \"6MiB\"\n";
        let (_dir, _, args) = with_file(file, &[]);
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(
            object.endpoint.as_deref(),
            Some("http://127.0.0.1:10000/devstoreaccount1")
        );
        assert_eq!(object.part_size, 6 << 20);
        let (_dir, _, args) = with_file(
            file,
            &[
                "--s3-endpoint",
                "http://other:1",
                "--storage-part-size",
                "7MiB",
            ],
        );
        let object = args.resolve().unwrap().object.unwrap();
        assert_eq!(object.endpoint.as_deref(), Some("http://other:1"));
        assert_eq!(object.part_size, 7 << 20);
        // Both names in one layer must agree.
        let (_dir, _, args) = with_file(
            file,
            &[
                "--storage-endpoint",
                "http://a:1",
                "--s3-endpoint",
                "http://b:1",
            ],
        );
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--storage-endpoint") && err.contains("--s3-endpoint"),
            "{err}"
        );
        let (_dir, path, args) = with_file(&format!("{file}s3_part_size = \"9MiB\"\n"), &[]);
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("storage_part_size")
                && err.contains("s3_part_size")
                && err.contains(&path.display().to_string()),
            "{err}"
        );
        // A region is S3's alone.
        let (_dir, _, args) = with_file(file, &["--s3-region", "eu-west-1"]);
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--s3-region") && err.contains("az://"),
            "{err}"
        );
    }

    #[test]
    fn the_environment_wins_over_the_config_file() {
        // Only this test sets or reads this variable's value; std's env lock
        // keeps the other tests' (clap's) reads of the environment safe.
        const VAR: &str = "KILN_CACHE_GC_LEASE_TTL";
        // SAFETY: the variable is set and removed within this test, and
        // nothing outside Rust's std (which locks) reads it.
        unsafe { std::env::set_var(VAR, "7m") };
        let parsed = std::panic::catch_unwind(|| {
            let (_dir, _, args) = with_file(S3_FILE, &[]);
            let from_env = args.resolve().unwrap().object.unwrap();
            let (_dir, _, args) = with_file(S3_FILE, &["--gc-lease-ttl", "1m"]);
            let from_flag = args.resolve().unwrap().object.unwrap();
            (from_env.replica.lease_ttl, from_flag.replica.lease_ttl)
        });
        // SAFETY: as above.
        unsafe { std::env::remove_var(VAR) };
        let (from_env, from_flag) = parsed.unwrap();
        assert_eq!(from_env, Duration::from_secs(420), "env over file");
        assert_eq!(from_flag, Duration::from_secs(60), "flag over env");
    }

    #[test]
    fn invalid_file_values_name_the_key_and_the_file() {
        for (line, key, value) in [
            ("s3_part_size = \"1MiB\"", "s3_part_size", "5MiB"),
            ("s3_part_size = \"huge\"", "s3_part_size", "huge"),
            ("miss_recheck = \"soon\"", "miss_recheck", "soon"),
            ("hit_recheck = \"-1s\"", "hit_recheck", "-1s"),
            ("gc_lease_ttl = \"5 minutes\"", "gc_lease_ttl", "5 minutes"),
            ("presign_ttl = \"2x\"", "presign_ttl", "2x"),
            (
                "storage = \"ftp://kiln-cache/p\"",
                "storage",
                "ftp://kiln-cache/p",
            ),
            ("storage = \"s3://AB\"", "storage", "AB"),
            ("max_size = \"lots\"", "max_size", "lots"),
            ("gc_interval = \"often\"", "gc_interval", "often"),
        ] {
            let text = format!("data = \"x\"\nstorage = \"s3://kiln-cache\"\n{line}\n");
            // A repeated key is a TOML error; let the tested line set it.
            let text = if key == "storage" {
                format!("data = \"x\"\n{line}\n")
            } else {
                text
            };
            let (_dir, file, args) = with_file(&text, &[]);
            let err = args.resolve().unwrap_err().to_string();
            for part in [key, value, &file.display().to_string()] {
                assert!(err.contains(part), "{line}: {err:?} lacks {part:?}");
            }
            assert!(
                !err.contains(&format!("--{}", key.replace('_', "-"))),
                "{err}"
            );
        }
        // The same values as flags name the flag.
        let (_dir, _, args) = with_file(S3_FILE, &["--miss-recheck", "soon"]);
        let err = args.resolve().unwrap_err().to_string();
        assert!(
            err.contains("--miss-recheck") && err.contains("soon"),
            "{err}"
        );
        assert!(!err.contains("cache.toml"), "{err}");
    }

    #[test]
    fn unknown_keys_in_the_config_file_are_refused() {
        for text in [
            "data = \"x\"\ns3_bucket = \"kiln\"\n",
            "data = \"x\"\n[storage]\nurl = \"s3://kiln-cache\"\n",
        ] {
            let (_dir, file, args) = with_file(text, &[]);
            let err = args.resolve().unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
            let err = err.to_string();
            assert!(err.contains(&file.display().to_string()), "{err}");
        }
        let (_dir, _, args) = with_file("data = \"x\"\ns3_bucket = \"kiln\"\n", &[]);
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains("s3_bucket"), "{err}");
    }

    #[test]
    fn credentials_in_the_config_file_are_refused_saying_where_they_go() {
        for (text, key) in [
            ("aws_access_key_id = \"AKIAEXAMPLE\"", "aws_access_key_id"),
            (
                "aws_secret_access_key = \"s3cr3t-value\"",
                "aws_secret_access_key",
            ),
            ("aws_session_token = \"s3cr3t-value\"", "aws_session_token"),
            ("s3-secret-key = \"s3cr3t-value\"", "s3-secret-key"),
            (
                "[s3]\nsecret_access_key = \"s3cr3t-value\"",
                "s3.secret_access_key",
            ),
            (
                "[[backend]]\npassword = \"s3cr3t-value\"",
                "backend.password",
            ),
            (
                "azure_storage_account_key = \"s3cr3t-value\"",
                "azure_storage_account_key",
            ),
            (
                "azure_storage_sas_token = \"s3cr3t-value\"",
                "azure_storage_sas_token",
            ),
            (
                "google_service_account_key = \"s3cr3t-value\"",
                "google_service_account_key",
            ),
        ] {
            // Next to valid settings, and before anything else is checked.
            let text = format!("data = \"x\"\nstorage = \"s3://kiln-cache\"\n{text}\n");
            let (_dir, file, args) = with_file(&text, &[]);
            let err = args.resolve().unwrap_err();
            assert!(matches!(err, ConfigError::Credentials { .. }), "{err:?}");
            let err = err.to_string();
            for part in [
                key,
                "AWS_ACCESS_KEY_ID",
                "AWS_SECRET_ACCESS_KEY",
                "environment",
            ] {
                assert!(err.contains(part), "{err:?} lacks {part:?}");
            }
            assert!(err.contains(&file.display().to_string()), "{err}");
            assert!(
                !err.contains("s3cr3t") && !err.contains("AKIAEXAMPLE"),
                "{err}"
            );
        }
        // `tokens` (the tokens file) and `tls_key` (a path) are no credentials.
        let (_dir, _, args) = with_file(
            "data = \"x\"\ntokens = \"tokens.toml\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
            &[],
        );
        assert!(args.resolve().is_ok());
    }
}
