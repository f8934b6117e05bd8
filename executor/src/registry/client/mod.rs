//! `RegistryClient`: the HTTP side of pulling and pushing images.
//!
//! Promises: blobs are streamed (to the local store when pulling, from files
//! when pushing), never held in memory whole; every blob and manifest pulled
//! is checked against its digest before anyone can use it; authentication
//! follows the registry's 401 challenge (Basic, or Bearer tokens fetched
//! from the challenge's realm for exactly the scopes needed and cached per
//! scope); transient failures are retried with exponential backoff.
//!
//! Transport follows Kaniko's flags: per-registry CA certificates and
//! client certificates (mutual TLS), TLS verification skipped per registry,
//! plain HTTP where asked, mirrors (`host/path` asks for
//! `/v2/path/<repo>/...`) with or without falling back to the registry
//! itself. A request that got no answer says why in the user's terms: an
//! untrusted certificate (and which CA files were trusted), a plain-HTTP
//! registry reached over HTTPS or the other way round (naming
//! `--insecure-registry`), a refused connection, a failed DNS lookup.
//!
//! Nothing a registry sends is trusted to be small: a blob is read up to
//! its descriptor's size and not one byte further (fewer is an error too),
//! manifests and indexes up to [`MAX_MANIFEST_SIZE`] (Distribution's own
//! limit), configs up to their descriptor's size (at most
//! [`MAX_CONFIG_SIZE`]), token answers up to [`MAX_TOKEN_SIZE`] and error
//! bodies up to [`MAX_ERROR_BODY`].
//!
//! Files: `endpoint` (registry or mirror, and which to try), `transport`
//! (TLS clients and explaining requests that got no answer), `session`
//! (credentials, the 401 challenge, tokens, sending and retrying),
//! `response` (status errors and capped reads), `pull`, `push`, and the
//! artifact calls of the registry-backed cache (`artifacts`).

use std::collections::HashMap;
use std::io::{Seek, SeekFrom, Write};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::{StreamExt, TryStreamExt};
use kiln_common::Digest;
use reqwest::header::{
    ACCEPT, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE,
};
use reqwest::{Method, RequestBuilder, Response, StatusCode, Url};
use serde::Deserialize;
use tokio::io::AsyncReadExt;

use super::auth::{Challenge, Credentials, DockerConfig, parse_challenge};
use super::reference::DOCKER_HUB;
use super::{ImageRef, RegistryError, RegistryOptions};
use crate::oci::layout::select_platform;
use crate::oci::{
    BlobSource, Descriptor, ImageConfig, ImageDocuments, Index, Manifest, Platform, media,
};
use crate::store::LocalStore;

mod endpoint;
mod pull;
mod push;
mod response;
mod session;
#[cfg(test)]
mod tests;
mod transport;

use endpoint::normalize_host;
use response::{body_error, error_body, fail, method_name, read_limited, status_error};
use session::{pull_scope, push_scope};
use transport::build_transport;

/// Manifests and indexes larger than this are refused rather than read
/// into memory (real ones are a few KiB; Distribution refuses to store
/// larger ones).
pub const MAX_MANIFEST_SIZE: u64 = 4 << 20;
/// Largest image config read (real ones are a few KiB, long histories
/// some hundred).
pub const MAX_CONFIG_SIZE: u64 = 8 << 20;
/// Largest token endpoint answer read.
pub const MAX_TOKEN_SIZE: u64 = 1 << 20;
/// Largest error body read; only its start is shown.
pub const MAX_ERROR_BODY: usize = 64 << 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Direction {
    Pull,
    Push,
}

/// Where a registry's API is reached.
#[derive(Debug, Clone)]
struct Endpoint {
    /// `scheme://host[:port]`
    base: String,
    /// `host[:port]`, the key for credentials, TLS settings and cached
    /// challenges.
    host: String,
    verify_tls: bool,
    /// Repository prefix on a mirror (`mirror.example/cache` holds
    /// `library/busybox` as `cache/library/busybox`); empty elsewhere.
    prefix: String,
}

impl Endpoint {
    /// The repository's name at this endpoint.
    fn repo(&self, r: &ImageRef) -> String {
        if self.prefix.is_empty() {
            r.repository().to_string()
        } else {
            format!("{}/{}", self.prefix, r.repository())
        }
    }
}

/// HTTP clients for one TLS configuration, and how to describe it.
struct Transport {
    verified: reqwest::Client,
    unverified: reqwest::Client,
    /// The CA certificates trusted, for messages.
    trust: String,
    /// Whether a client certificate is presented.
    identity: bool,
}

/// An image resolved in a registry: its documents, pinned by digest, and
/// the endpoint (registry or mirror) that served it, for its blobs.
#[derive(Debug, Clone)]
pub struct PulledImage {
    /// The reference pinned to the manifest digest.
    pub reference: ImageRef,
    pub image: ImageDocuments,
    endpoint: Endpoint,
}

/// A manifest (or index) as served: the bytes whose sha256 is the digest.
#[derive(Debug, Clone)]
pub struct RawManifest {
    pub bytes: Vec<u8>,
    pub media_type: String,
    pub digest: Digest,
}

#[derive(Default)]
struct AuthState {
    challenges: HashMap<String, Challenge>,
    tokens: HashMap<(String, String), (String, Instant)>,
    /// Credentials by host, looked up once: a credential helper is a
    /// process to run, not something to ask on every request.
    credentials: HashMap<String, Option<Credentials>>,
}

pub struct RegistryClient {
    opts: RegistryOptions,
    default_transport: Transport,
    /// Registries with their own CA or client certificates, by host.
    transports: HashMap<String, Transport>,
    docker_config: DockerConfig,
    auth: Mutex<AuthState>,
}

enum Body<'a> {
    File(PathBuf),
    Bytes(&'a [u8]),
}

impl RegistryClient {
    pub fn new(opts: RegistryOptions) -> Result<Self, RegistryError> {
        let default_transport = build_transport(&opts.ca_certificates, None)?;
        let mut transports = HashMap::new();
        let mut hosts: Vec<String> = opts
            .registry_ca_certificates
            .keys()
            .chain(opts.client_certificates.keys())
            .map(|h| normalize_host(h))
            .collect();
        hosts.sort();
        hosts.dedup();
        for host in hosts {
            let mut cas = opts.ca_certificates.clone();
            let mut identity = None;
            for (h, files) in &opts.registry_ca_certificates {
                if normalize_host(h) == host {
                    cas.extend(files.iter().cloned());
                }
            }
            for (h, pair) in &opts.client_certificates {
                if normalize_host(h) == host {
                    identity = Some(pair);
                }
            }
            transports.insert(host, build_transport(&cas, identity)?);
        }
        let docker_config = match (&opts.docker_config_path, opts.use_docker_config) {
            (_, false) => DockerConfig::default(),
            (Some(path), true) => DockerConfig::load(path)?,
            (None, true) => DockerConfig::load_default()?,
        };
        Ok(RegistryClient {
            default_transport,
            transports,
            docker_config,
            auth: Mutex::new(AuthState::default()),
            opts,
        })
    }

    pub fn options(&self) -> &RegistryOptions {
        &self.opts
    }
}

// Artifact calls (the registry-backed cache) live in their own file.
#[path = "../artifacts.rs"]
pub mod artifacts;
