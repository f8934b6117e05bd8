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

/// A registry host as the TLS and mirror settings name it: without a
/// scheme or path; Docker Hub's names are its API host.
fn normalize_host(host: &str) -> String {
    let h = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(host);
    let h = h.split('/').next().unwrap_or(h);
    if super::auth::is_hub(h) {
        super::reference::DOCKER_HUB_API.to_string()
    } else {
        h.to_string()
    }
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

fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

fn status_error(
    method: &'static str,
    url: &str,
    status: StatusCode,
    body: String,
) -> RegistryError {
    let mut body = body;
    body.truncate(500);
    RegistryError::Status {
        method,
        url: url.to_string(),
        status: status.as_u16(),
        body: body.trim().to_string(),
    }
}

async fn fail(method: &'static str, url: &str, resp: Response) -> RegistryError {
    let status = resp.status();
    let body = error_body(resp).await;
    status_error(method, url, status, body)
}

/// The start of an error response's body: read no further than
/// [`MAX_ERROR_BODY`], whatever the registry keeps sending.
async fn error_body(resp: Response) -> String {
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            body.truncate(MAX_ERROR_BODY);
            break;
        }
    }
    String::from_utf8_lossy(&body).into_owned()
}

fn method_name(m: &Method) -> &'static str {
    match *m {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        _ => "REQUEST",
    }
}

/// Reads a small response body (a JSON document), refusing more than `cap`
/// bytes.
async fn read_limited(resp: Response, url: &str, cap: u64) -> Result<Vec<u8>, RegistryError> {
    let too_big = || RegistryError::Manifest {
        reference: url.to_string(),
        reason: format!("document larger than {cap} bytes"),
    };
    if resp.content_length().is_some_and(|n| n > cap) {
        return Err(too_big());
    }
    let mut out = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|source| RegistryError::Http {
            method: "GET",
            url: url.to_string(),
            detail: kiln_common::errors::chain(&source),
            source,
        })?;
        if (out.len() + chunk.len()) as u64 > cap {
            return Err(too_big());
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

/// HTTP clients trusting the default CA certificates plus `cas`, and
/// presenting `identity` (certificate, key) when given.
fn build_transport(
    cas: &[PathBuf],
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<Transport, RegistryError> {
    let mut verified = reqwest::Client::builder();
    let mut unverified = reqwest::Client::builder().danger_accept_invalid_certs(true);
    for path in cas {
        let pem = std::fs::read(path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!("CA certificate {}: {e}", path.display()))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "CA certificate {}: no PEM certificate in it",
                path.display()
            )));
        }
        for cert in certs {
            verified = verified.add_root_certificate(cert.clone());
            unverified = unverified.add_root_certificate(cert);
        }
    }
    // SSL_CERT_FILE / SSL_CERT_DIR, as Go programs read them: GitLab's
    // Kaniko recipe appends a private CA to /kaniko/ssl/certs/ca-certificates.crt.
    let env_roots =
        crate::tls_roots::from_env().map_err(|e| RegistryError::Config(e.to_string()))?;
    for cert in env_roots.certificates {
        verified = verified.add_root_certificate(cert.clone());
        unverified = unverified.add_root_certificate(cert);
    }
    if let Some((cert, key)) = identity {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| RegistryError::Io {
                path: p.clone(),
                source,
            })
        };
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "client certificate {} with key {}: {}",
                cert.display(),
                key.display(),
                kiln_common::errors::chain(&e)
            ))
        })?;
        verified = verified.identity(id.clone());
        unverified = unverified.identity(id);
    }
    let build = |b: reqwest::ClientBuilder| {
        b.user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // No total timeout (a layer may take minutes), but a
            // connection that stalls this long is retried.
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| RegistryError::Config(format!("HTTP client: {e}")))
    };
    let mut trust = "the default ones".to_string();
    for p in cas.iter().chain(&env_roots.sources) {
        trust.push_str(&format!(", {}", p.display()));
    }
    Ok(Transport {
        verified: build(verified)?,
        unverified: build(unverified)?,
        trust,
        identity: identity.is_some(),
    })
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

    fn endpoint(&self, host: &str, dir: Direction) -> Endpoint {
        let o = &self.opts;
        let named = |list: &[String]| {
            list.iter()
                .any(|h| normalize_host(h) == normalize_host(host))
        };
        let plain = o.insecure
            || (dir == Direction::Pull && o.insecure_pull)
            || named(&o.insecure_registries);
        let skip_verify = o.skip_tls_verify
            || (dir == Direction::Pull && o.skip_tls_verify_pull)
            || named(&o.skip_tls_verify_registries);
        let host = if host == DOCKER_HUB {
            super::reference::DOCKER_HUB_API
        } else {
            host
        };
        Endpoint {
            base: format!("{}://{host}", if plain { "http" } else { "https" }),
            host: host.to_string(),
            verify_tls: !skip_verify,
            prefix: String::new(),
        }
    }

    /// A mirror given as `[scheme://]host[:port][/path]`.
    fn mirror_endpoint(&self, mirror: &str) -> Endpoint {
        let m = mirror.trim().trim_end_matches('/');
        let (scheme, rest) = match m.split_once("://") {
            Some((s, h)) => (Some(s), h),
            None => (None, m),
        };
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut ep = self.endpoint(host, Direction::Pull);
        if let Some(s) = scheme {
            ep.base = format!("{s}://{host}");
        }
        ep.prefix = prefix.trim_matches('/').to_string();
        ep
    }

    /// Where to pull `r` from, in order: its mirrors (`--registry-mirror`
    /// for Docker Hub, `--registry-map` for any registry), then the
    /// registry itself unless `--skip-default-registry-fallback` (and
    /// there is a mirror to fall back from).
    fn pull_endpoints(&self, r: &ImageRef) -> Vec<(Endpoint, bool)> {
        let mut out = Vec::new();
        let registry = normalize_host(r.registry());
        if r.registry() == DOCKER_HUB {
            out.extend(
                self.opts
                    .mirrors
                    .iter()
                    .map(|m| (self.mirror_endpoint(m), true)),
            );
        }
        for (orig, mirrors) in &self.opts.registry_maps {
            if normalize_host(orig) == registry {
                out.extend(mirrors.iter().map(|m| (self.mirror_endpoint(m), true)));
            }
        }
        if out.is_empty() || !self.opts.skip_default_registry_fallback {
            out.push((self.endpoint(r.registry(), Direction::Pull), false));
        }
        out
    }

    fn transport(&self, ep: &Endpoint) -> &Transport {
        self.transports
            .get(&ep.host)
            .unwrap_or(&self.default_transport)
    }

    fn http(&self, ep: &Endpoint) -> &reqwest::Client {
        let t = self.transport(ep);
        if ep.verify_tls {
            &t.verified
        } else {
            &t.unverified
        }
    }

    /// A request to `url` that got no answer, explained: see the module
    /// documentation.
    fn transport_error(
        &self,
        ep: &Endpoint,
        method: &'static str,
        url: &str,
        source: reqwest::Error,
    ) -> RegistryError {
        use kiln_common::errors::{chain, is_certificate_problem, is_connection_closed};
        let text = chain(&source);
        let lower = text.to_ascii_lowercase();
        let https = url.starts_with("https://");
        let t = self.transport(ep);
        let host = &ep.host;
        let refused = {
            let mut e: Option<&(dyn std::error::Error + 'static)> = Some(&source);
            let mut found = false;
            while let Some(err) = e {
                if let Some(io) = err.downcast_ref::<std::io::Error>()
                    && io.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    found = true;
                }
                e = err.source();
            }
            found || lower.contains("connection refused")
        };
        let detail = if https
            && (lower.contains("invalidcontenttype")
                || lower.contains("corrupt message")
                || lower.contains("wrong version number"))
        {
            format!(
                "the registry does not speak TLS here: it looks like a plain-HTTP registry                  reached over HTTPS (give --insecure-registry {host} if it is meant to be                  plain HTTP): {text}"
            )
        } else if https
            && is_certificate_problem(&source)
            && (lower.contains("certificaterequired")
                || lower.contains("badcertificate")
                || lower.contains("fatal alert"))
        {
            format!(
                "TLS certificate problem: the registry refused {}: {text} (give \
                 --registry-client-cert {host}=CERT,KEY with a certificate it accepts)",
                if t.identity {
                    "the client certificate given"
                } else {
                    "a connection without a client certificate"
                }
            )
        } else if https && is_certificate_problem(&source) {
            format!(
                "TLS certificate problem: {text} (trusted CA certificates: {}; give                  --registry-certificate {host}=CA.pem to trust its CA, or                  --skip-tls-verify-registry {host})",
                t.trust
            )
        } else if https && !t.identity && is_connection_closed(&source) {
            format!(
                "TLS certificate problem, probably: the registry closed the connection, as                  one that requires a client certificate does for a client without one (give                  --registry-client-cert {host}=CERT,KEY): {text} (trusted CA certificates: {})",
                t.trust
            )
        } else if refused {
            format!("connection refused: nothing accepts connections at {host}: {text}")
        } else if lower.contains("dns error")
            || lower.contains("failed to lookup address")
            || lower.contains("name or service not known")
        {
            let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            format!("DNS lookup of {name} failed: {text}")
        } else if source.is_timeout() {
            format!("timed out: {text}")
        } else {
            text
        };
        RegistryError::Http {
            method,
            url: url.to_string(),
            detail,
            source,
        }
    }

    fn credentials(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        let lookup = if host == super::reference::DOCKER_HUB_API {
            DOCKER_HUB
        } else {
            host
        };
        if let Some(c) = self.opts.credentials.get(lookup) {
            return Ok(Some(c.clone()));
        }
        if let Some(c) = self.lock().credentials.get(lookup) {
            return Ok(c.clone());
        }
        let found = self.docker_config.credentials_for(lookup)?;
        self.lock()
            .credentials
            .insert(lookup.to_string(), found.clone());
        Ok(found)
    }

    /// Who we are at `host` and where that came from, for auth errors:
    /// `as alice (Docker config /kaniko/.docker/config.json)`.
    fn identity_description(&self, host: &str) -> String {
        let lookup = if host == super::reference::DOCKER_HUB_API {
            DOCKER_HUB
        } else {
            host
        };
        if let Some(c) = self.opts.credentials.get(lookup) {
            return format!("as {} (given to the client)", c.describe());
        }
        match self.credentials(host) {
            Ok(Some(c)) => format!(
                "as {} ({})",
                c.describe(),
                self.docker_config.source_description()
            ),
            Ok(None) => match self.docker_config.path() {
                Some(p) => format!(
                    "anonymously ({} has no credentials for {lookup})",
                    p.display()
                ),
                None => format!("anonymously ({})", self.docker_config.source_description()),
            },
            Err(e) => format!("anonymously ({e})"),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A poisoned lock only means another task panicked mid-update of a
        // cache; the maps are still usable.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `Authorization` header for `scopes` on `ep`, if a challenge from
    /// that host is known (the first request to a host goes anonymous); a
    /// registry token is sent as it is, from the first request on.
    async fn authorization(
        &self,
        ep: &Endpoint,
        scopes: &[String],
    ) -> Result<Option<String>, RegistryError> {
        let creds = self.credentials(&ep.host)?;
        if let Some(t) = creds.as_ref().and_then(|c| c.registry_token.as_ref()) {
            return Ok(Some(format!("Bearer {t}")));
        }
        let challenge = self.lock().challenges.get(&ep.host).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(creds
                .filter(|c| c.identity_token.is_none())
                .map(|c| c.basic_header())),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (ep.host.clone(), scopes.join(" "));
                if let Some((tok, until)) = self.lock().tokens.get(&key)
                    && Instant::now() < *until
                {
                    return Ok(Some(format!("Bearer {tok}")));
                }
                let (tok, ttl) = self
                    .fetch_token(ep, &realm, service.as_deref(), scopes, creds.as_ref())
                    .await?;
                self.lock()
                    .tokens
                    .insert(key, (tok.clone(), Instant::now() + ttl));
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// A token for `scopes` from the challenge's realm: with an identity
    /// token, Docker's OAuth2 exchange (`POST` of
    /// `grant_type=refresh_token`); otherwise the distribution spec's `GET`
    /// with Basic credentials (or none). A token server that does not
    /// implement OAuth2 (404 to the `POST`) is asked with `GET`, as Docker
    /// and go-containerregistry do.
    async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        creds: Option<&Credentials>,
    ) -> Result<(String, Duration), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| RegistryError::Auth {
            url: realm.to_string(),
            reason: format!("invalid token realm: {e}"),
        })?;
        let refresh = creds.and_then(|c| c.identity_token.as_deref());
        let mut resp = None;
        if let Some(refresh) = refresh {
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh.to_string()),
                ("client_id", "kiln".to_string()),
                ("scope", scopes.join(" ")),
            ];
            if let Some(s) = service {
                form.push(("service", s.to_string()));
            }
            let r = self
                .http(ep)
                .post(url.clone())
                .form(&form)
                .send()
                .await
                .map_err(|source| self.transport_error(ep, "POST", url.as_str(), source))?;
            if r.status() != StatusCode::NOT_FOUND && r.status() != StatusCode::METHOD_NOT_ALLOWED {
                resp = Some(("POST", r));
            }
        }
        let (method, resp) = match resp {
            Some(r) => r,
            None => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scopes {
                        q.append_pair("scope", s);
                    }
                }
                let mut req = self.http(ep).get(url.clone());
                if let Some(c) = creds.filter(|c| c.identity_token.is_none()) {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let r = req
                    .send()
                    .await
                    .map_err(|source| self.transport_error(ep, "GET", url.as_str(), source))?;
                ("GET", r)
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let mut body = error_body(resp).await;
            body.truncate(500);
            return Err(RegistryError::Auth {
                url: url.to_string(),
                reason: format!(
                    "registry {}: the token endpoint answered {status} ({method}), {}: {}",
                    ep.host,
                    self.identity_description(&ep.host),
                    body.trim()
                ),
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = read_limited(resp, url.as_str(), MAX_TOKEN_SIZE).await?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| RegistryError::Auth {
            url: url.to_string(),
            reason: format!("token response is not JSON: {e}"),
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Auth {
                url: url.to_string(),
                reason: "token response has no token".into(),
            })?;
        // The spec's default lifetime is 60 s; renew a little early.
        let ttl = Duration::from_secs(t.expires_in.unwrap_or(60).saturating_sub(10).max(1));
        Ok((token, ttl))
    }

    /// Sends a request built by `make`, authenticating as the registry's
    /// 401 challenge asks and retrying once with credentials. A 401 that
    /// remains, or a 403, is an [`RegistryError::Auth`] naming the
    /// registry and where the credentials came from.
    async fn send(
        &self,
        ep: &Endpoint,
        scopes: &[String],
        method: Method,
        url: &str,
        make: impl Fn(RequestBuilder) -> Result<RequestBuilder, RegistryError>,
    ) -> Result<Response, RegistryError> {
        let name = method_name(&method);
        for attempt in 0..2 {
            let mut req = make(self.http(ep).request(method.clone(), url))?;
            if let Some(h) = self.authorization(ep, scopes).await? {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req
                .send()
                .await
                .map_err(|source| self.transport_error(ep, name, url, source))?;
            let status = resp.status();
            if status == StatusCode::BAD_REQUEST && url.starts_with("http://") {
                // Go's TLS servers (Distribution, Harbor, ...) answer a
                // plain-HTTP request with 400 and this sentence.
                let body = error_body(resp).await;
                if body.contains("HTTP request to an HTTPS server") {
                    return Err(RegistryError::Protocol {
                        url: url.to_string(),
                        reason: format!(
                            "{} serves HTTPS, but was asked in plain HTTP (it is named in \
                             --insecure-registry, or --insecure/--insecure-pull is given): \
                             drop it there to use HTTPS",
                            ep.host
                        ),
                    });
                }
                return Err(status_error(name, url, status, body));
            }
            if status == StatusCode::FORBIDDEN {
                let mut body = error_body(resp).await;
                body.truncate(500);
                return Err(RegistryError::Auth {
                    url: url.to_string(),
                    reason: format!(
                        "registry {}: {name} denied (403) {}: {}",
                        ep.host,
                        self.identity_description(&ep.host),
                        body.trim()
                    ),
                });
            }
            if status != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let header = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let challenge = header.as_deref().and_then(parse_challenge);
            let known = self.lock().challenges.get(&ep.host).cloned();
            match challenge {
                Some(c) if attempt == 0 => {
                    let mut st = self.lock();
                    // A 401 with a cached token means the token is stale.
                    st.tokens.remove(&(ep.host.clone(), scopes.join(" ")));
                    st.challenges.insert(ep.host.clone(), c);
                }
                _ => {
                    let mut body = error_body(resp).await;
                    body.truncate(500);
                    return Err(RegistryError::Auth {
                        url: url.to_string(),
                        reason: format!(
                            "registry {}: {name} unauthorized (401) {}{}: {}",
                            ep.host,
                            self.identity_description(&ep.host),
                            if known.is_some() {
                                " after authenticating"
                            } else {
                                ""
                            },
                            body.trim()
                        ),
                    });
                }
            }
        }
        Err(RegistryError::Auth {
            url: url.to_string(),
            reason: format!(
                "registry {}: unauthorized {}",
                ep.host,
                self.identity_description(&ep.host)
            ),
        })
    }

    async fn retry<T, F, Fut>(&self, retries: u32, mut f: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = self.opts.retry_backoff;
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < retries && e.is_transient() => {
                    attempt += 1;
                    tracing::warn!("{e}; retrying ({attempt}/{retries}) in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
    }

    // ---------------------------------------------------------------- pull

    async fn get_manifest_at(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        reference: &str,
    ) -> Result<RawManifest, RegistryError> {
        let repo = ep.repo(r);
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base);
        let scopes = [pull_scope(&repo)];
        let accept = media::ACCEPT_MANIFESTS.join(", ");
        let resp = self
            .send(ep, &scopes, Method::GET, &url, |b| {
                Ok(b.header(ACCEPT, accept.as_str()))
            })
            .await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let bytes = read_limited(resp, &url, MAX_MANIFEST_SIZE).await?;
        let digest = Digest::of_bytes(&bytes);
        if let Ok(want) = reference.parse::<Digest>()
            && want != digest
        {
            return Err(RegistryError::Manifest {
                reference: url,
                reason: format!("served manifest has digest {digest}, not the requested {want}"),
            });
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Manifest {
            reference: url.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        let media_type = match (probe.media_type, content_type) {
            (Some(m), _) => m,
            (None, Some(c)) if media::is_index(&c) || media::is_manifest(&c) => c,
            (None, _) if probe.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, _) => media::OCI_MANIFEST.to_string(),
        };
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Fetches a manifest or index by the reference's tag or digest.
    pub async fn get_manifest(&self, r: &ImageRef) -> Result<RawManifest, RegistryError> {
        let ep = self.endpoint(r.registry(), Direction::Pull);
        let reference = r.manifest_reference();
        self.retry(self.opts.pull_retries, || {
            self.get_manifest_at(&ep, r, &reference)
        })
        .await
    }

    async fn get_small_blob(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        let repo = ep.repo(r);
        let url = format!("{}/v2/{repo}/blobs/{}", ep.base, desc.digest);
        let scopes = [pull_scope(&repo)];
        if desc.size > MAX_CONFIG_SIZE {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!(
                    "its descriptor says {} bytes, more than the {MAX_CONFIG_SIZE} a config may have",
                    desc.size
                ),
            });
        }
        let resp = self.send(ep, &scopes, Method::GET, &url, Ok).await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        let bytes = read_limited(resp, &url, desc.size)
            .await
            .map_err(|_| RegistryError::Blob {
                digest: desc.digest.clone(),
                url: url.clone(),
                reason: format!("more than the {} bytes its descriptor says", desc.size),
            })?;
        if bytes.len() as u64 != desc.size {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!("{} bytes, its descriptor says {}", bytes.len(), desc.size),
            });
        }
        let got = Digest::of_bytes(&bytes);
        if got != desc.digest {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!("content has digest {got}"),
            });
        }
        Ok(bytes)
    }

    async fn resolve_at(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<PulledImage, RegistryError> {
        let mut raw = self.get_manifest_at(ep, r, &r.manifest_reference()).await?;
        if media::is_index(&raw.media_type) {
            let index: Index =
                serde_json::from_slice(&raw.bytes).map_err(|e| RegistryError::Manifest {
                    reference: r.to_string(),
                    reason: format!("invalid index: {e}"),
                })?;
            let Some(entry) = select_platform(&index.manifests, platform) else {
                let available: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                return Err(RegistryError::NoPlatform {
                    reference: r.to_string(),
                    platform: platform.to_string(),
                    available: available.join(", "),
                });
            };
            raw = self
                .get_manifest_at(ep, r, &entry.digest.to_string())
                .await?;
        }
        if !media::is_manifest(&raw.media_type) {
            return Err(RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("unsupported manifest media type {}", raw.media_type),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&raw.bytes).map_err(|e| RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("invalid manifest: {e}"),
            })?;
        let config_bytes = self.get_small_blob(ep, r, &manifest.config).await?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("invalid image config {}: {e}", manifest.config.digest),
            })?;
        Ok(PulledImage {
            reference: r.with_digest(raw.digest.clone()),
            image: ImageDocuments {
                manifest_digest: raw.digest,
                manifest_media_type: raw.media_type,
                manifest_bytes: raw.bytes,
                manifest,
                config_bytes,
                config,
            },
            endpoint: ep.clone(),
        })
    }

    /// An image whose documents were had elsewhere (the cache, by digest:
    /// docs/executor-cache.md, "Base images pinned by digest"), as if
    /// resolved here: its blobs, when needed, come from `r`'s registry.
    pub fn pulled_from_documents(&self, r: &ImageRef, image: ImageDocuments) -> PulledImage {
        PulledImage {
            reference: r.with_digest(image.manifest_digest.clone()),
            endpoint: self.endpoint(r.registry(), Direction::Pull),
            image,
        }
    }

    /// Resolves `r` to one image manifest (choosing `platform` from an
    /// index) and fetches its config; layers are not downloaded. Images are
    /// tried on their mirrors first (see `pull_endpoints`); the layers are
    /// then fetched from whichever endpoint answered.
    pub async fn resolve(
        &self,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<PulledImage, RegistryError> {
        let endpoints = self.pull_endpoints(r);
        let mirrors = endpoints.iter().filter(|(_, m)| *m).count();
        let mut failures = Vec::new();
        for (ep, is_mirror) in &endpoints {
            match self
                .retry(self.opts.pull_retries, || self.resolve_at(ep, r, platform))
                .await
            {
                Ok(p) => {
                    if *is_mirror {
                        tracing::info!("pulled {r} from mirror {}/v2/{}", ep.base, ep.repo(r));
                    }
                    return Ok(p);
                }
                Err(e) if *is_mirror => {
                    let e = kiln_common::errors::chain(&e);
                    tracing::warn!(
                        "mirror {}/v2/{} failed for {r}: {e}; trying the next mirror or the registry itself",
                        ep.base,
                        ep.repo(r),
                    );
                    failures.push(e);
                }
                Err(e) if mirrors == 0 => return Err(e),
                Err(e) => {
                    failures.push(kiln_common::errors::chain(&e));
                    break;
                }
            }
        }
        Err(RegistryError::Manifest {
            reference: r.to_string(),
            reason: format!(
                "no mirror had it{}: {}",
                if endpoints.iter().all(|(_, m)| *m) {
                    " (--skip-default-registry-fallback: the registry itself was not asked)"
                } else {
                    ", nor the registry itself"
                },
                failures.join("; ")
            ),
        })
    }

    async fn fetch_blob_once(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
        tee: Option<std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>>,
    ) -> Result<PathBuf, RegistryError> {
        let ep = &pulled.endpoint;
        let repo = ep.repo(&pulled.reference);
        let url = format!("{}/v2/{repo}/blobs/{}", ep.base, desc.digest);
        let scopes = [pull_scope(&repo)];
        let resp = self.send(ep, &scopes, Method::GET, &url, Ok).await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        if let Some(announced) = resp.content_length().filter(|n| *n != desc.size) {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!(
                    "the response announces {announced} bytes, its descriptor says {}",
                    desc.size
                ),
            });
        }
        // Disk writes happen on a blocking thread fed through a bounded
        // channel, so the async side never blocks and memory stays at a few
        // chunks whatever the blob size.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let writer_store = store.clone();
        let digest = desc.digest.clone();
        let size = desc.size;
        let writer = tokio::task::spawn_blocking(move || -> Result<PathBuf, RegistryError> {
            let mut tee = tee;
            let mut w = writer_store.writer()?;
            while let Some(chunk) = rx.blocking_recv() {
                w.write_all(&chunk).map_err(|source| RegistryError::Io {
                    path: writer_store.root().to_path_buf(),
                    source,
                })?;
                // A consumer that stopped (it failed) leaves the blob to be
                // stored all the same.
                if let Some(t) = &tee
                    && t.send(Ok(chunk.to_vec())).is_err()
                {
                    tee = None;
                }
            }
            Ok(w.commit(&digest, Some(size))?)
        });
        let mut stream = resp.bytes_stream();
        let mut received = 0u64;
        let mut failure = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    if received > desc.size {
                        failure = Some(RegistryError::Blob {
                            digest: desc.digest.clone(),
                            url: url.clone(),
                            reason: format!(
                                "more than the {} bytes its descriptor says",
                                desc.size
                            ),
                        });
                        break;
                    }
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(source) => {
                    failure = Some(self.transport_error(ep, "GET", &url, source));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| RegistryError::Io {
            path: store.root().to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        match (failure, written) {
            (Some(e), _) => Err(e),
            (None, Ok(p)) => Ok(p),
            (None, Err(RegistryError::Store(e))) => Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: e.to_string(),
            }),
            (None, Err(e)) => Err(e),
        }
    }

    /// Downloads one blob of a resolved image into `store` (unless it is
    /// already there), verified against its digest and size.
    pub async fn fetch_blob(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
    ) -> Result<PathBuf, RegistryError> {
        if store.contains(&desc.digest) {
            return Ok(store.path(&desc.digest));
        }
        self.retry(self.opts.pull_retries, || {
            self.fetch_blob_once(pulled, desc, store, None)
        })
        .await
    }

    /// Downloads one blob into `store` like [`Self::fetch_blob`], but once
    /// (no retries: bytes handed on cannot be taken back), handing every
    /// chunk to `tee` as well, as it is written: the consumer (a layer
    /// conversion) works while the blob downloads. The store commits the
    /// blob only if its sha256 and size match, so the consumer's result
    /// counts only when this returns `Ok`. `tee` is closed at the end (or
    /// on failure, when the consumer then sees a stream cut short).
    pub async fn fetch_blob_teed(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
        tee: std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
    ) -> Result<PathBuf, RegistryError> {
        self.fetch_blob_once(pulled, desc, store, Some(tee)).await
    }

    /// Downloads every layer of a resolved image into `store`, several at a
    /// time; layers already in the store are not downloaded again.
    pub async fn fetch_layers(
        &self,
        pulled: &PulledImage,
        store: &LocalStore,
    ) -> Result<(), RegistryError> {
        let mut seen = std::collections::HashSet::new();
        let layers: Vec<&Descriptor> = pulled
            .image
            .manifest
            .layers
            .iter()
            .filter(|d| seen.insert(d.digest.clone()))
            .collect();
        futures::stream::iter(layers)
            .map(|d| self.fetch_blob(pulled, d, store))
            .buffer_unordered(self.opts.max_concurrent_transfers.max(1))
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Resolves and downloads an image: `(manifest digest, config, layers)`
    /// are in the returned documents, the layer bytes in `store` (config and
    /// manifest too, so later builds can find them offline).
    pub async fn pull(
        &self,
        r: &ImageRef,
        platform: &Platform,
        store: &LocalStore,
    ) -> Result<PulledImage, RegistryError> {
        let pulled = self.resolve(r, platform).await?;
        store.put_bytes(&pulled.image.config_bytes)?;
        store.put_bytes(&pulled.image.manifest_bytes)?;
        self.fetch_layers(&pulled, store).await?;
        Ok(pulled)
    }

    // ---------------------------------------------------------------- push

    /// `Some(size)` if the repository has the blob.
    pub async fn blob_exists(
        &self,
        dest: &ImageRef,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        self.blob_exists_at(&ep, dest, digest, &[push_scope(dest.repository())])
            .await
    }

    async fn blob_exists_at(
        &self,
        ep: &Endpoint,
        dest: &ImageRef,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<Option<u64>, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{digest}", ep.base, dest.repository());
        let resp = self.send(ep, scopes, Method::HEAD, &url, Ok).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(
                resp.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("HEAD", &url, s, String::new())),
        }
    }

    fn resolve_location(base: &str, resp: &Response, url: &str) -> Result<String, RegistryError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                status_error(
                    "POST",
                    url,
                    resp.status(),
                    "no Location header in upload response".into(),
                )
            })?;
        let base =
            Url::parse(&format!("{base}/")).map_err(|e| RegistryError::Config(e.to_string()))?;
        base.join(loc).map(|u| u.to_string()).map_err(|e| {
            status_error(
                "POST",
                url,
                resp.status(),
                format!("bad Location {loc}: {e}"),
            )
        })
    }

    fn file_body(path: &PathBuf, offset: u64, len: u64) -> Result<reqwest::Body, RegistryError> {
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        let f = tokio::fs::File::from_std(f).take(len);
        // Counted as sent for the push's progress lines (crate::log).
        let sent = crate::log::bytes_sent();
        Ok(reqwest::Body::wrap_stream(
            tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).inspect_ok(move |chunk| {
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }),
        ))
    }

    /// Uploads one blob to `dest` unless the repository has it: mounted from
    /// `mount_from` (a repository of the same registry) when possible, else
    /// in one PUT, or in chunks when larger than `chunk_size`.
    async fn push_blob_once(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        body: &Body<'_>,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let repo = dest.repository();
        let mut scopes = vec![push_scope(repo)];
        if let Some(from) = mount_from {
            scopes.push(pull_scope(from));
        }
        if self
            .blob_exists_at(&ep, dest, &desc.digest, &scopes)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut url = format!("{}/v2/{repo}/blobs/uploads/", ep.base);
        if let Some(from) = mount_from {
            url = format!("{url}?mount={}&from={from}", desc.digest);
        }
        let resp = self
            .send(&ep, &scopes, Method::POST, &url, |b| {
                Ok(b.header(CONTENT_LENGTH, "0"))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => {
                tracing::debug!("mounted {} into {dest} from {mount_from:?}", desc.digest);
                return Ok(());
            }
            StatusCode::ACCEPTED => {}
            _ => return Err(fail("POST", &url, resp).await),
        }
        let mut location = Self::resolve_location(&ep.base, &resp, &url)?;
        let size = desc.size;
        let chunked = self.opts.chunk_size > 0 && size > self.opts.chunk_size;
        if chunked {
            let Body::File(path) = body else {
                return Err(RegistryError::Config("chunked upload needs a file".into()));
            };
            let mut offset = 0;
            while offset < size {
                let n = self.opts.chunk_size.min(size - offset);
                let range = format!("{}-{}", offset, offset + n - 1);
                let resp = self
                    .send(&ep, &scopes, Method::PATCH, &location, |b| {
                        Ok(b.header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, n.to_string())
                            .header("Content-Range", range.as_str())
                            .body(Self::file_body(path, offset, n)?))
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(fail("PATCH", &location, resp).await);
                }
                location = Self::resolve_location(&ep.base, &resp, &location)?;
                offset += n;
            }
        }
        let mut put_url = Url::parse(&location)
            .map_err(|e| RegistryError::Config(format!("upload URL {location}: {e}")))?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", &desc.digest.to_string());
        let put_url = put_url.to_string();
        let resp = self
            .send(&ep, &scopes, Method::PUT, &put_url, |b| {
                let b = b.header(CONTENT_TYPE, "application/octet-stream");
                Ok(match (chunked, body) {
                    (true, _) => b.header(CONTENT_LENGTH, "0"),
                    (false, Body::Bytes(bytes)) => b.body(bytes.to_vec()),
                    (false, Body::File(path)) => b
                        .header(CONTENT_LENGTH, size.to_string())
                        .body(Self::file_body(path, 0, size)?),
                })
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(fail("PUT", &put_url, resp).await);
        }
        Ok(())
    }

    async fn push_blob(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        body: Body<'_>,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.retry(self.opts.push_retries, || {
            self.push_blob_once(dest, desc, &body, mount_from)
        })
        .await
    }

    /// Uploads a blob file (see `push_blob_once` for the strategy).
    pub async fn push_blob_file(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        path: PathBuf,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.push_blob(dest, desc, Body::File(path), mount_from)
            .await
    }

    /// Uploads a manifest under the reference's tag (or digest) and returns
    /// its digest.
    pub async fn put_manifest(
        &self,
        dest: &ImageRef,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let digest = Digest::of_bytes(bytes);
        let reference = dest
            .tag()
            .map(str::to_string)
            .unwrap_or_else(|| digest.to_string());
        let url = format!("{}/v2/{}/manifests/{reference}", ep.base, dest.repository());
        let scopes = [push_scope(dest.repository())];
        let pushed = self
            .retry(self.opts.push_retries, || async {
                let resp = self
                    .send(&ep, &scopes, Method::PUT, &url, |b| {
                        Ok(b.header(CONTENT_TYPE, media_type).body(bytes.to_vec()))
                    })
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    return Err(fail("PUT", &url, resp).await);
                }
                let served = resp
                    .headers()
                    .get("Docker-Content-Digest")
                    .and_then(|v| v.to_str().ok());
                if let Some(served) = served
                    && served != digest.to_string()
                {
                    return Err(RegistryError::Manifest {
                        reference: dest.to_string(),
                        reason: format!(
                            "registry stored the manifest as {served}, expected {digest}"
                        ),
                    });
                }
                Ok(())
            })
            .await;
        match pushed {
            Err(e) if self.opts.push_ignore_immutable_tag_errors && e.is_immutable_tag() => {
                tracing::warn!(
                    "{dest}: the registry keeps this tag immutable; not overwritten \
                     (--push-ignore-immutable-tag-errors): {}",
                    kiln_common::errors::chain(&e)
                );
                Ok(digest)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(digest),
        }
    }

    /// Kaniko's push permission check, done before the build: authenticate
    /// for the push scope of `dest`'s repository, start a blob upload
    /// (`POST /v2/<repo>/blobs/uploads/`) and cancel it (`DELETE` of the
    /// upload's location), so bad credentials or a missing permission fail
    /// in seconds rather than after the build. Nothing is written.
    pub async fn check_push_permission(&self, dest: &ImageRef) -> Result<(), RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let repo = dest.repository();
        let scopes = [push_scope(repo)];
        let url = format!("{}/v2/{repo}/blobs/uploads/", ep.base);
        self.retry(self.opts.push_retries, || async {
            let resp = self
                .send(&ep, &scopes, Method::POST, &url, |b| {
                    Ok(b.header(CONTENT_LENGTH, "0"))
                })
                .await?;
            if !resp.status().is_success() {
                return Err(fail("POST", &url, resp).await);
            }
            // Cancelling is a courtesy (abandoned uploads expire anyway):
            // its failure does not fail the check.
            if let Ok(location) = Self::resolve_location(&ep.base, &resp, &url) {
                match self.send(&ep, &scopes, Method::DELETE, &location, Ok).await {
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                    Ok(r) => tracing::debug!("cancelling upload {location}: HTTP {}", r.status()),
                    Err(e) => tracing::debug!("cancelling upload {location}: {e}"),
                }
            }
            Ok(())
        })
        .await
    }

    /// Pushes an image to every destination and returns its manifest
    /// digest. Per registry, each blob is uploaded once (to the first
    /// destination there) and mounted into the others; `mount_hints` name
    /// repositories (e.g. the base image's) that may already hold layers.
    pub async fn push_image(
        &self,
        image: &ImageDocuments,
        destinations: &[ImageRef],
        layers: &dyn BlobSource,
        mount_hints: &[ImageRef],
    ) -> Result<Digest, RegistryError> {
        let mut by_registry: Vec<(String, Vec<&ImageRef>)> = Vec::new();
        for d in destinations {
            match by_registry.iter_mut().find(|(r, _)| r == d.registry()) {
                Some((_, v)) => v.push(d),
                None => by_registry.push((d.registry().to_string(), vec![d])),
            }
        }
        let mut seen = std::collections::HashSet::new();
        let blobs: Vec<&Descriptor> = image
            .manifest
            .layers
            .iter()
            .filter(|d| seen.insert(d.digest.clone()))
            .collect();
        let n = self.opts.max_concurrent_transfers.max(1);
        for (registry, dests) in &by_registry {
            let first = dests[0];
            let hint = mount_hints
                .iter()
                .find(|h| h.registry() == registry && h.repository() != first.repository())
                .map(|h| h.repository().to_string());
            futures::stream::iter(blobs.iter().copied())
                .map(|desc| {
                    let hint = hint.clone();
                    async move {
                        let path =
                            layers
                                .blob_path(&desc.digest)
                                .ok_or_else(|| RegistryError::Blob {
                                    digest: desc.digest.clone(),
                                    url: first.to_string(),
                                    reason: "not available locally to push".into(),
                                })?;
                        self.push_blob(first, desc, Body::File(path), hint.as_deref())
                            .await
                    }
                })
                .buffer_unordered(n)
                .try_collect::<Vec<_>>()
                .await?;
            self.push_blob(
                first,
                &image.manifest.config,
                Body::Bytes(&image.config_bytes),
                None,
            )
            .await?;
            for other in &dests[1..] {
                let from = (other.repository() != first.repository())
                    .then(|| first.repository().to_string());
                futures::stream::iter(blobs.iter().copied().chain([&image.manifest.config]))
                    .map(|desc| {
                        let from = from.clone();
                        async move {
                            let body = if desc.digest == image.manifest.config.digest {
                                Body::Bytes(&image.config_bytes)
                            } else {
                                match layers.blob_path(&desc.digest) {
                                    Some(p) => Body::File(p),
                                    None => {
                                        return Err(RegistryError::Blob {
                                            digest: desc.digest.clone(),
                                            url: other.to_string(),
                                            reason: "not available locally to push".into(),
                                        });
                                    }
                                }
                            };
                            self.push_blob(other, desc, body, from.as_deref()).await
                        }
                    })
                    .buffer_unordered(n)
                    .try_collect::<Vec<_>>()
                    .await?;
            }
            for d in dests {
                self.put_manifest(d, &image.manifest_bytes, &image.manifest_media_type)
                    .await?;
            }
        }
        Ok(image.manifest_digest.clone())
    }
}

// Artifact calls (the registry-backed cache) live in their own file.
#[path = "artifacts.rs"]
pub mod artifacts;

#[cfg(test)]
mod tests {
    use super::*;

    fn client(opts: RegistryOptions) -> RegistryClient {
        RegistryClient::new(RegistryOptions {
            use_docker_config: false,
            ..opts
        })
        .unwrap()
    }

    #[test]
    fn insecure_registries_use_plain_http_and_others_https() {
        let c = client(RegistryOptions {
            insecure_registries: vec!["127.0.0.1:5000".into()],
            ..Default::default()
        });
        assert_eq!(
            c.endpoint("127.0.0.1:5000", Direction::Push).base,
            "http://127.0.0.1:5000"
        );
        assert_eq!(
            c.endpoint("quay.io", Direction::Push).base,
            "https://quay.io"
        );
        assert_eq!(
            c.endpoint("docker.io", Direction::Pull).base,
            "https://registry-1.docker.io"
        );
    }

    #[test]
    fn pull_only_options_do_not_affect_push() {
        let c = client(RegistryOptions {
            insecure_pull: true,
            skip_tls_verify_pull: true,
            ..Default::default()
        });
        let pull = c.endpoint("r.example", Direction::Pull);
        let push = c.endpoint("r.example", Direction::Push);
        assert_eq!(
            (pull.base.as_str(), pull.verify_tls),
            ("http://r.example", false)
        );
        assert_eq!(
            (push.base.as_str(), push.verify_tls),
            ("https://r.example", true)
        );
    }

    #[test]
    fn mirrors_are_tried_before_docker_hub_only() {
        let c = client(RegistryOptions {
            mirrors: vec!["mirror.example".into(), "http://127.0.0.1:5001/".into()],
            ..Default::default()
        });
        let hub = c.pull_endpoints(&ImageRef::parse("busybox").unwrap());
        let bases: Vec<&str> = hub.iter().map(|(e, _)| e.base.as_str()).collect();
        assert_eq!(
            bases,
            [
                "https://mirror.example",
                "http://127.0.0.1:5001",
                "https://registry-1.docker.io"
            ]
        );
        let other = c.pull_endpoints(&ImageRef::parse("quay.io/a/b").unwrap());
        assert_eq!(other.len(), 1);
    }

    #[test]
    fn a_mirror_path_prefixes_the_repository_as_kaniko_does() {
        let c = client(RegistryOptions {
            mirrors: vec!["mirror.example/cache/hub".into()],
            registry_maps: vec![(
                "quay.io".into(),
                vec!["q1.example/quay".into(), "http://127.0.0.1:5001".into()],
            )],
            ..Default::default()
        });
        let busybox = ImageRef::parse("busybox").unwrap();
        let eps = c.pull_endpoints(&busybox);
        let (mirror, is_mirror) = &eps[0];
        assert!(*is_mirror);
        assert_eq!(mirror.base, "https://mirror.example");
        assert_eq!(mirror.repo(&busybox), "cache/hub/library/busybox");
        assert_eq!(eps[1].0.repo(&busybox), "library/busybox");
        assert!(!eps[1].1);
        let quay = ImageRef::parse("quay.io/a/b").unwrap();
        let eps: Vec<(String, String)> = c
            .pull_endpoints(&quay)
            .iter()
            .map(|(e, _)| (e.base.clone(), e.repo(&quay)))
            .collect();
        assert_eq!(
            eps,
            [
                ("https://q1.example".to_string(), "quay/a/b".to_string()),
                ("http://127.0.0.1:5001".to_string(), "a/b".to_string()),
                ("https://quay.io".to_string(), "a/b".to_string()),
            ]
        );
    }

    #[test]
    fn registry_map_keys_name_docker_hub_by_any_of_its_names() {
        let c = client(RegistryOptions {
            registry_maps: vec![("index.docker.io".into(), vec!["m.example".into()])],
            skip_default_registry_fallback: true,
            ..Default::default()
        });
        let eps = c.pull_endpoints(&ImageRef::parse("docker.io/library/alpine").unwrap());
        assert_eq!(eps.len(), 1, "no fallback to Docker Hub itself");
        assert_eq!(eps[0].0.base, "https://m.example");
        // Without a mirror there is nothing to skip.
        assert_eq!(
            c.pull_endpoints(&ImageRef::parse("quay.io/a/b").unwrap())
                .len(),
            1
        );
    }

    #[tokio::test]
    async fn an_immutable_tag_is_no_failure_only_when_asked() {
        let taken = r#"{"errors":[{"code":"MANIFEST_TAGGED","message":"tag v1 is immutable"}]}"#;
        for ignore in [false, true] {
            let (host, seen) = scripted_server(vec![(409, taken.into())]);
            let c = client(RegistryOptions {
                insecure_registries: vec![host.clone()],
                push_ignore_immutable_tag_errors: ignore,
                ..Default::default()
            });
            let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
            let body = manifest_json();
            let pushed = c
                .put_manifest(&dest, body.as_bytes(), media::OCI_MANIFEST)
                .await;
            assert_eq!(seen.lock().unwrap()[0], "PUT /v2/x/manifests/v1 HTTP/1.1");
            match pushed {
                Ok(d) => {
                    assert!(ignore);
                    assert_eq!(d, Digest::of_bytes(body.as_bytes()));
                }
                Err(e) => {
                    assert!(!ignore, "{e}");
                    assert!(e.to_string().contains("MANIFEST_TAGGED"), "{e}");
                }
            }
        }
        let plain = RegistryError::Status {
            method: "PUT",
            url: "u".into(),
            status: 400,
            body: "MANIFEST_INVALID".into(),
        };
        assert!(!plain.is_immutable_tag());
    }

    #[tokio::test]
    async fn push_retry_retries_a_manifest_push_that_failed_transiently() {
        let (host, seen) = scripted_server(vec![(503, "busy".into()), (201, String::new())]);
        let c = client(RegistryOptions {
            insecure_registries: vec![host.clone()],
            push_retries: 1,
            retry_backoff: Duration::from_millis(1),
            ..Default::default()
        });
        let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
        c.put_manifest(&dest, manifest_json().as_bytes(), media::OCI_MANIFEST)
            .await
            .unwrap();
        assert_eq!(seen.lock().unwrap().len(), 2);
        let (host, _) = scripted_server(vec![(503, "busy".into()), (201, String::new())]);
        let c = client(RegistryOptions {
            insecure_registries: vec![host.clone()],
            push_retries: 0,
            ..Default::default()
        });
        let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
        let err = c
            .put_manifest(&dest, manifest_json().as_bytes(), media::OCI_MANIFEST)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("503"), "{err}");
    }

    #[tokio::test]
    async fn the_push_permission_check_starts_an_upload_and_cancels_it() {
        let (host, seen) = scripted_server_with_headers(vec![
            (
                202,
                String::new(),
                "Location: /v2/team/app/blobs/uploads/abc\r\n".into(),
            ),
            (204, String::new(), String::new()),
        ]);
        let c = test_client(&host, 0);
        c.check_push_permission(&ImageRef::parse(&format!("{host}/team/app:1")).unwrap())
            .await
            .unwrap();
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "POST /v2/team/app/blobs/uploads/ HTTP/1.1",
                "DELETE /v2/team/app/blobs/uploads/abc HTTP/1.1"
            ]
        );
        let (host, _) = scripted_server(vec![(
            403,
            r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#
                .into(),
        )]);
        let c = test_client(&host, 0);
        let err = c
            .check_push_permission(&ImageRef::parse(&format!("{host}/team/app:1")).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("authentication failed") && err.contains("403"),
            "{err}"
        );
        assert!(err.contains(&format!("registry {host}")), "{err}");
        assert!(err.contains("anonymously (no Docker config"), "{err}");
    }

    #[tokio::test]
    async fn a_refused_connection_says_so_with_the_url() {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let host = format!("127.0.0.1:{port}");
        let c = test_client(&host, 0);
        let err = c
            .get_manifest(&ImageRef::parse(&format!("{host}/x:1")).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("connection refused"), "{err}");
        assert!(
            err.contains(&format!("http://{host}/v2/x/manifests/1")),
            "{err}"
        );
    }

    #[tokio::test]
    async fn a_plain_http_registry_reached_over_https_is_named_as_such() {
        use std::io::Read;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                let mut buf = [0u8; 4096];
                let _ = conn.read(&mut buf);
                let _ = conn.write_all(
                    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                );
            }
        });
        let c = client(RegistryOptions::default());
        let err = c
            .get_manifest(&ImageRef::parse(&format!("{host}/x:1")).unwrap())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("plain-HTTP registry"), "{err}");
        assert!(
            err.contains(&format!("--insecure-registry {host}")),
            "{err}"
        );
        assert!(
            err.contains(&format!("https://{host}/v2/x/manifests/1")),
            "{err}"
        );
    }

    #[test]
    fn per_registry_tls_material_is_checked_when_the_client_is_made() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "not a certificate\n").unwrap();
        let err = RegistryClient::new(RegistryOptions {
            registry_ca_certificates: [("r.example".to_string(), vec![empty.clone()])].into(),
            use_docker_config: false,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("empty.pem"), "{err}");
        let err = RegistryClient::new(RegistryOptions {
            client_certificates: [(
                "r.example".to_string(),
                (dir.path().join("absent.pem"), empty),
            )]
            .into(),
            use_docker_config: false,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("absent.pem"), "{err}");
    }

    /// A scripted HTTP server on 127.0.0.1: answers each connection with
    /// the next (status, body) and records the request lines.
    fn scripted_server(script: Vec<(u16, String)>) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        scripted_server_with_headers(
            script
                .into_iter()
                .map(|(s, b)| (s, b, String::new()))
                .collect(),
        )
    }

    /// [`scripted_server`] with extra header lines (`Name: value\r\n`) per answer.
    fn scripted_server_with_headers(
        script: Vec<(u16, String, String)>,
    ) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for (status, body, headers) in script {
                let Ok((mut conn, _)) = listener.accept() else {
                    return;
                };
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                let mut first = String::new();
                reader.read_line(&mut first).unwrap();
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap() == 0 || l.trim().is_empty() {
                        break;
                    }
                }
                log.lock().unwrap().push(first.trim().to_string());
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
                    media::OCI_MANIFEST,
                    body.len()
                );
            }
        });
        (host, seen)
    }

    fn manifest_json() -> String {
        let d = Digest::of_bytes(b"{}");
        format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{d}","size":2}},"layers":[]}}"#,
            media::OCI_CONFIG
        )
    }

    fn test_client(host: &str, retries: u32) -> RegistryClient {
        client(RegistryOptions {
            insecure_registries: vec![host.to_string()],
            pull_retries: retries,
            retry_backoff: Duration::from_millis(1),
            ..Default::default()
        })
    }

    #[tokio::test]
    async fn transient_server_errors_are_retried_until_success() {
        let body = manifest_json();
        let (host, seen) = scripted_server(vec![
            (503, "busy".into()),
            (502, "".into()),
            (200, body.clone()),
        ]);
        let c = test_client(&host, 2);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        let m = c.get_manifest(&r).await.unwrap();
        assert_eq!(m.digest, Digest::of_bytes(body.as_bytes()));
        assert_eq!(m.media_type, media::OCI_MANIFEST);
        assert_eq!(seen.lock().unwrap().len(), 3);
        assert_eq!(
            seen.lock().unwrap()[0],
            "GET /v2/x/manifests/latest HTTP/1.1"
        );
    }

    #[tokio::test]
    async fn retries_are_bounded_and_the_last_error_names_the_url() {
        let (host, seen) = scripted_server(vec![
            (503, "a".into()),
            (503, "b".into()),
            (503, "c".into()),
        ]);
        let c = test_client(&host, 1);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        let err = c.get_manifest(&r).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("http://{host}/v2/x/manifests/latest")),
            "{err}"
        );
        assert!(err.to_string().contains("503"), "{err}");
        assert_eq!(seen.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn not_found_is_not_retried() {
        let (host, seen) = scripted_server(vec![(404, "{}".into()), (200, manifest_json())]);
        let c = test_client(&host, 3);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        assert!(c.get_manifest(&r).await.is_err());
        assert_eq!(seen.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn manifest_not_matching_the_requested_digest_is_refused() {
        let (host, _) = scripted_server(vec![(200, manifest_json())]);
        let c = test_client(&host, 0);
        let wanted = Digest::of_bytes(b"something else");
        let r = ImageRef::parse(&format!("{host}/x@{wanted}")).unwrap();
        let err = c.get_manifest(&r).await.unwrap_err();
        assert!(err.to_string().contains("not the requested"), "{err}");
    }

    /// A server answering every request with `status` and a chunked body
    /// that never ends.
    fn endless_server(status: u16) -> String {
        use std::io::{BufRead, BufReader};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host = listener.local_addr().unwrap().to_string();
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    loop {
                        let mut l = String::new();
                        if reader.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                            break;
                        }
                    }
                    let chunk = format!("10000\r\n{}\r\n", "{".repeat(0x10000));
                    let _ = write!(
                        conn,
                        "HTTP/1.1 {status} X\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
                        media::OCI_MANIFEST
                    )
                    .and_then(|_| -> std::io::Result<()> {
                        loop {
                            conn.write_all(chunk.as_bytes())?;
                        }
                    });
                });
            }
        });
        host
    }

    #[tokio::test]
    async fn an_endless_manifest_is_refused_at_the_cap_naming_the_url() {
        let host = endless_server(200);
        let c = test_client(&host, 0);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        let err = c.get_manifest(&r).await.unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("larger than {MAX_MANIFEST_SIZE} bytes")),
            "{err}"
        );
        assert!(err.to_string().contains("/v2/x/manifests/latest"), "{err}");
    }

    #[tokio::test]
    async fn an_endless_error_body_is_read_only_in_part() {
        let host = endless_server(404);
        let c = test_client(&host, 0);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        let err = c.get_manifest(&r).await.unwrap_err();
        assert!(err.to_string().contains("404"), "{err}");
        assert!(err.to_string().len() < 2000, "the body is shown in part");
    }

    #[tokio::test]
    async fn a_config_must_be_exactly_its_descriptors_size() {
        let config = b"{}".to_vec();
        let (host, _) = scripted_server(vec![(200, "{} ".into()), (200, "{".into())]);
        let c = test_client(&host, 0);
        let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
        let ep = c.endpoint(r.registry(), Direction::Pull);
        let desc = Descriptor::new(media::OCI_CONFIG, Digest::of_bytes(&config), 2);
        let longer = c.get_small_blob(&ep, &r, &desc).await.unwrap_err();
        assert!(
            longer.to_string().contains("more than the 2 bytes"),
            "{longer}"
        );
        let shorter = c.get_small_blob(&ep, &r, &desc).await.unwrap_err();
        assert!(shorter.to_string().contains("1 bytes"), "{shorter}");
    }

    #[test]
    fn unreadable_ca_certificate_is_an_error_naming_the_file() {
        let err = RegistryClient::new(RegistryOptions {
            ca_certificates: vec!["/nonexistent/ca.pem".into()],
            use_docker_config: false,
            ..Default::default()
        })
        .err()
        .unwrap();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
