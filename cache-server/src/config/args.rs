//! The command line: every setting optional, so that the config file can
//! fill in what neither the flags nor the environment gave.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::objstore::serve::ObjectArgs;
use crate::telemetry::LogFormat;

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
