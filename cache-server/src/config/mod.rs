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

//!
//! [`args`] is the command line, [`file`] the config file, [`resolve`] the
//! layering of the two into a [`ServerConfig`], [`error`] what can go
//! wrong on the way.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::objstore::ObjectStorageConfig;
use crate::telemetry::LogFormat;
use kiln_storage::StoreConfig;

mod args;
mod error;
mod file;
mod resolve;
#[cfg(test)]
mod tests;

pub use args::ServerArgs;
pub use error::ConfigError;

/// kiln's cache port (docs/decisions.md, "The cache server listens on port
/// 7070"): the server's default, `kiln-cache`'s and the manifests'.
pub const DEFAULT_PORT: u16 = 7070;

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
