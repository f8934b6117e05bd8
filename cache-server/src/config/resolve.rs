//! Flags and environment over the config file, then defaults: the one
//! [`ServerConfig`] the server runs with.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::file::{FileConfig, read_file};
use super::{ConfigError, ConnectionLimits, DEFAULT_PORT, ServerArgs, ServerConfig};
use crate::units::{UnitError, parse_duration, parse_size};
use kiln_storage::StoreConfig;

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
