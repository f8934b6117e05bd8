//! Talking to container registries (OCI distribution spec v1.1 and the
//! Docker registry v2 API).
//!
//! - [`reference`]: `ImageRef`, Docker's reference normalisation.
//! - [`auth`]: credentials (`config.json`, credential helpers) and
//!   `WWW-Authenticate` challenges.
//! - [`client`]: `RegistryClient`: pull (manifests, indexes, platform
//!   selection, blobs streamed into the local store with digest checks, in
//!   parallel, with retries) and push (existence checks, monolithic and
//!   chunked uploads, cross-repository mounts, manifests, several
//!   destinations).
//! - [`RegistryOptions`]: transport settings (plain HTTP registries, TLS
//!   verification, extra CA certificates and client certificates per
//!   registry, mirrors and registry maps, retries), with Kaniko's meaning
//!   for each of its flags (docs/user-guide.md, "Credentials and
//!   registries").

pub mod auth;
pub mod client;
/// Image references live in [`crate::oci::reference`] (below both `oci`
/// and `registry`); this keeps `crate::registry::reference` working.
pub use crate::oci::reference;

use std::collections::HashMap;
use std::path::PathBuf;

pub use auth::{Credentials, DockerConfig};
pub use client::RegistryClient;
pub use reference::{ImageRef, ReferenceError};

use kiln_common::Digest;

/// Transport and retry settings; the defaults are TLS-verified HTTPS
/// everywhere, credentials from Docker's `config.json`, 3 retries.
#[derive(Debug, Clone)]
pub struct RegistryOptions {
    /// Use plain HTTP for every registry (`--insecure`).
    pub insecure: bool,
    /// Use plain HTTP for every registry when pulling (`--insecure-pull`).
    pub insecure_pull: bool,
    /// Hosts (`host[:port]`) reached over plain HTTP (`--insecure-registry`).
    pub insecure_registries: Vec<String>,
    /// Do not verify TLS certificates (`--skip-tls-verify`).
    pub skip_tls_verify: bool,
    /// Do not verify TLS certificates when pulling (`--skip-tls-verify-pull`).
    pub skip_tls_verify_pull: bool,
    /// Hosts whose TLS certificates are not verified (`--skip-tls-verify-registry`).
    pub skip_tls_verify_registries: Vec<String>,
    /// Extra PEM CA certificates trusted for every registry
    /// (`--registry-certificate PATH` without a registry).
    pub ca_certificates: Vec<PathBuf>,
    /// Extra PEM CA certificates trusted for one registry host
    /// (`--registry-certificate REG=PATH`), on top of the default ones.
    pub registry_ca_certificates: HashMap<String, Vec<PathBuf>>,
    /// Client certificate and key (PEM) presented to one registry host
    /// (`--registry-client-cert REG=CERT,KEY`, mutual TLS).
    pub client_certificates: HashMap<String, (PathBuf, PathBuf)>,
    /// Mirrors tried, in order, before Docker Hub (`--registry-mirror`),
    /// as `host[:port][/path]` (optionally with `http(s)://`): an image
    /// `library/busybox` is asked for at `/v2/path/library/busybox/...`.
    pub mirrors: Vec<String>,
    /// Mirrors of any registry, tried in order before it
    /// (`--registry-map ORIG=MIRROR`), same form as `mirrors`.
    pub registry_maps: Vec<(String, Vec<String>)>,
    /// When every mirror fails, fail instead of pulling from the registry
    /// itself (`--skip-default-registry-fallback`).
    pub skip_default_registry_fallback: bool,
    /// A registry refusing to overwrite an immutable tag is no failure
    /// (`--push-ignore-immutable-tag-errors`).
    pub push_ignore_immutable_tag_errors: bool,
    /// Retries of a failed download (`--image-download-retry`).
    pub pull_retries: u32,
    /// Retries of a failed upload (`--push-retry`).
    pub push_retries: u32,
    /// Blob downloads or uploads in flight at once.
    pub max_concurrent_transfers: usize,
    /// Blobs larger than this are uploaded in chunks of this size (PATCH);
    /// `0` uploads every blob in one PUT.
    pub chunk_size: u64,
    /// Credentials by registry host, tried before `config.json`.
    pub credentials: HashMap<String, Credentials>,
    /// Read Docker's `config.json` (from `$DOCKER_CONFIG` or `~/.docker`).
    pub use_docker_config: bool,
    /// Read this `config.json` instead of the default one.
    pub docker_config_path: Option<PathBuf>,
    /// First retry delay; doubled on every further retry.
    pub retry_backoff: std::time::Duration,
}

impl Default for RegistryOptions {
    fn default() -> Self {
        RegistryOptions {
            insecure: false,
            insecure_pull: false,
            insecure_registries: Vec::new(),
            skip_tls_verify: false,
            skip_tls_verify_pull: false,
            skip_tls_verify_registries: Vec::new(),
            ca_certificates: Vec::new(),
            registry_ca_certificates: HashMap::new(),
            client_certificates: HashMap::new(),
            mirrors: Vec::new(),
            registry_maps: Vec::new(),
            skip_default_registry_fallback: false,
            push_ignore_immutable_tag_errors: false,
            pull_retries: 3,
            push_retries: 3,
            max_concurrent_transfers: 4,
            chunk_size: 0,
            credentials: HashMap::new(),
            use_docker_config: true,
            docker_config_path: None,
            retry_backoff: std::time::Duration::from_millis(500),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// No HTTP answer: `detail` says why in the user's terms (certificate,
    /// plain HTTP, refused, DNS) and the flag that may fix it.
    #[error("{method} {url}: {detail}")]
    Http {
        method: &'static str,
        url: String,
        detail: String,
        #[source]
        source: reqwest::Error,
    },
    /// An answer that shows the wrong protocol (HTTP to an HTTPS port).
    #[error("{url}: {reason}")]
    Protocol { url: String, reason: String },
    #[error("{method} {url}: HTTP {status}: {body}")]
    Status {
        method: &'static str,
        url: String,
        status: u16,
        body: String,
    },
    /// 401/403: `reason` names the registry, who we were and where the
    /// credentials came from (the Docker config file, or that none was found).
    #[error("{url}: authentication failed: {reason}")]
    Auth { url: String, reason: String },
    #[error("image {reference}: {reason}")]
    Manifest { reference: String, reason: String },
    #[error("image {reference}: no manifest for platform {platform} (available: {available})")]
    NoPlatform {
        reference: String,
        platform: String,
        available: String,
    },
    #[error("blob {digest} from {url}: {reason}")]
    Blob {
        digest: Digest,
        url: String,
        reason: String,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("credential helper {helper}: {reason}")]
    CredentialHelper { helper: String, reason: String },
    #[error("registry configuration: {0}")]
    Config(String),
}

impl RegistryError {
    /// Whether trying again may help (network trouble, 5xx, 429, a
    /// download that did not match its digest).
    pub fn is_transient(&self) -> bool {
        match self {
            RegistryError::Http { source, .. } => !source.is_builder() && !source.is_redirect(),
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 429 || *status == 408
            }
            RegistryError::Blob { .. } => true,
            RegistryError::Store(crate::store::StoreError::DigestMismatch { .. })
            | RegistryError::Store(crate::store::StoreError::SizeMismatch { .. }) => true,
            _ => false,
        }
    }

    /// Whether the registry refused a manifest because it does not know
    /// one of its blobs (`MANIFEST_BLOB_UNKNOWN`, or `BLOB_UNKNOWN` from
    /// registries that answer a manifest PUT with the blob's code).
    pub fn is_manifest_blob_unknown(&self) -> bool {
        match self {
            RegistryError::Status {
                method: "PUT",
                url,
                status: 400 | 404,
                body,
            } => url.contains("/manifests/") && body.contains("BLOB_UNKNOWN"),
            _ => false,
        }
    }

    /// Whether the registry refused to overwrite a tag because the
    /// repository's tags are immutable: Harbor, ECR, Artifact Registry and
    /// others answer 400/403/409/412 with `TAG_INVALID`, `MANIFEST_TAGGED`
    /// or "immutable" in the body.
    pub fn is_immutable_tag(&self) -> bool {
        let text = match self {
            RegistryError::Status {
                status: 400 | 403 | 409 | 412,
                body,
                ..
            } => body,
            RegistryError::Auth { reason, .. } => reason,
            _ => return false,
        };
        let lower = text.to_ascii_lowercase();
        text.contains("TAG_INVALID")
            || text.contains("MANIFEST_TAGGED")
            || lower.contains("immutable")
    }
}
