//! Why a configuration was refused: each names the flag, or the key and
//! the config file, it came from.

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
