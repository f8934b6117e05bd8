//! The TOML config file: the flags' keys, nothing unknown, no credentials.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;
use crate::objstore::serve::ObjectArgs;
use crate::telemetry::LogFormat;

/// The config file: same names as the flags, snake_case. The object-storage
/// keys are flat like the others (serde's `flatten` would not work with
/// `deny_unknown_fields`), and become an [`ObjectArgs`] for its resolution.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FileConfig {
    pub(super) listen: Option<SocketAddr>,
    pub(super) data: Option<PathBuf>,
    pub(super) max_size: Option<String>,
    pub(super) entry_ttl: Option<String>,
    pub(super) blob_grace: Option<String>,
    pub(super) gc_interval: Option<String>,
    pub(super) tokens: Option<PathBuf>,
    pub(super) tls_cert: Option<PathBuf>,
    pub(super) tls_key: Option<PathBuf>,
    pub(super) tls_client_ca: Option<PathBuf>,
    pub(super) log_format: Option<LogFormat>,
    pub(super) port_file: Option<PathBuf>,
    pub(super) shutdown_timeout: Option<String>,
    pub(super) header_read_timeout: Option<String>,
    pub(super) body_read_timeout: Option<String>,
    pub(super) max_connections: Option<usize>,
    pub(super) block_cache: Option<String>,
    pub(super) access_granularity: Option<String>,
    pub(super) storage: Option<String>,
    pub(super) storage_endpoint: Option<String>,
    pub(super) s3_endpoint: Option<String>,
    pub(super) s3_region: Option<String>,
    pub(super) storage_part_size: Option<String>,
    pub(super) s3_part_size: Option<String>,
    pub(super) miss_recheck: Option<String>,
    pub(super) hit_recheck: Option<String>,
    pub(super) gc_lease_ttl: Option<String>,
    pub(super) presign_ttl: Option<String>,
    pub(super) replica_id: Option<String>,
}

impl FileConfig {
    /// The object-storage keys, taken out of the file's settings.
    pub(super) fn take_object(&mut self) -> ObjectArgs {
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

pub(super) fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
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
