//! The shared cache: a `kiln-cache-server` over HTTP.
//!
//! Several server URLs may be given; each call tries them in order and
//! sticks to the first that answers, so one replica going away mid-build
//! costs a retry, not the cache. Calls have short timeouts: a slow server
//! must not make a build slower than building without it. Blob bodies are
//! streamed both ways and verified against their digest before they enter
//! the local store.
//!
//! Nothing the server sends is trusted to be small: a blob is read up to
//! the size its entry names and not one byte further (fewer is an error
//! too), a lookup answer up to [`MAX_LOOKUP_ANSWER`], an error body up to
//! [`MAX_ERROR_BODY`]. A blob download has no total timeout (layers may be
//! large) but fails when no byte arrives for [`IDLE_TIMEOUT`].
//!
//! TLS: besides the default CA certificates the client trusts a private CA
//! (`--cache-ca-cert`) and presents a client certificate for mutual TLS
//! (`--cache-client-cert`). That material is process configuration, like
//! the root store itself: the binary installs it once with
//! [`install_client_tls`] before a build opens the cache, and every
//! [`HttpCache`] built afterwards uses it. A refused certificate is reported
//! as such, naming the CA file trusted, not as a server that cannot be
//! reached.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest, LookupRequest, LookupResponse};
use reqwest::StatusCode;
use tokio::runtime::Handle;

use super::{Cache, CacheError};
use crate::store::LocalStore;

/// Largest lookup answer read. A full answer of `MAX_LOOKUP_KEYS` entries
/// is a few hundred KiB; an answer this large is not a cache answer.
pub const MAX_LOOKUP_ANSWER: usize = 16 << 20;
/// Largest error body read (only its start is shown).
pub const MAX_ERROR_BODY: usize = 64 << 10;
/// A response that sends nothing for this long has failed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(20);

/// A TLS file the cache client cannot use.
#[derive(Debug, thiserror::Error)]
#[error("{flag} {path}: {message}")]
pub struct TlsFileError {
    pub flag: &'static str,
    pub path: String,
    pub message: String,
}

/// The cache client's TLS material, read and parsed.
#[derive(Clone)]
pub struct ClientTls {
    roots: Vec<reqwest::Certificate>,
    /// Client certificate chain and key, PEM (checked by [`ClientTls::load`]).
    identity: Option<Vec<u8>>,
    /// The trusted CAs, for messages.
    trust: String,
}

impl Default for ClientTls {
    fn default() -> Self {
        Self {
            roots: Vec::new(),
            identity: None,
            trust: "the default CA certificates only; give a private CA with --cache-ca-cert FILE"
                .into(),
        }
    }
}

impl ClientTls {
    /// Reads the CA bundle and the client certificate and key (PEM).
    pub fn load(
        ca_cert: Option<&Path>,
        identity: Option<(&Path, &Path)>,
    ) -> Result<Self, TlsFileError> {
        let read = |flag, p: &Path| {
            std::fs::read(p).map_err(|e| TlsFileError {
                flag,
                path: p.display().to_string(),
                message: e.to_string(),
            })
        };
        let invalid = |flag, p: &Path, message: String| TlsFileError {
            flag,
            path: p.display().to_string(),
            message,
        };
        let mut tls = ClientTls::default();
        if let Some(ca) = ca_cert {
            tls.roots = reqwest::Certificate::from_pem_bundle(&read("--cache-ca-cert", ca)?)
                .map_err(|e| invalid("--cache-ca-cert", ca, kiln_common::errors::chain(&e)))?;
            if tls.roots.is_empty() {
                return Err(invalid(
                    "--cache-ca-cert",
                    ca,
                    "contains no PEM certificate".into(),
                ));
            }
            tls.trust = format!("{} and the default CA certificates", ca.display());
        }
        if let Some((cert, key)) = identity {
            let mut pem = read("--cache-client-cert", cert)?;
            pem.push(b'\n');
            pem.extend(read("--cache-client-cert", key)?);
            reqwest::Identity::from_pem(&pem).map_err(|e| {
                invalid(
                    "--cache-client-cert",
                    cert,
                    format!(
                        "with key {}: {}",
                        key.display(),
                        kiln_common::errors::chain(&e)
                    ),
                )
            })?;
            tls.identity = Some(pem);
        }
        Ok(tls)
    }
}

static CLIENT_TLS: OnceLock<ClientTls> = OnceLock::new();

/// Sets the TLS material of every [`HttpCache`] made from now on; only the
/// first call counts (the binary makes it once, at start).
pub fn install_client_tls(tls: ClientTls) {
    let _ = CLIENT_TLS.set(tls);
}

/// A request that got no answer, as text: the whole error chain, and for a
/// refused certificate, which CAs were trusted. An `https` connection the
/// server closed although no client certificate was given is most likely a
/// server requiring one (see [`kiln_common::errors::is_connection_closed`]).
fn send_error(e: &reqwest::Error) -> String {
    use kiln_common::errors::{chain, is_certificate_problem, is_connection_closed};
    let tls = CLIENT_TLS.get().cloned().unwrap_or_default();
    let https = e.url().is_some_and(|u| u.scheme() == "https");
    if is_certificate_problem(e) {
        format!(
            "TLS certificate problem: {} (trusted CAs: {})",
            chain(e),
            tls.trust
        )
    } else if https && tls.identity.is_none() && is_connection_closed(e) {
        format!(
            "TLS certificate problem, probably: the server closed the connection, as one that \
             requires client certificates does for a client without one (give \
             --cache-client-cert CERT,KEY): {} (trusted CAs: {})",
            chain(e),
            tls.trust
        )
    } else {
        chain(e)
    }
}

pub struct HttpCache {
    servers: Vec<String>,
    preferred: AtomicUsize,
    token: Option<String>,
    client: reqwest::Client,
    runtime: Handle,
}

impl HttpCache {
    pub fn new(
        servers: Vec<String>,
        token: Option<String>,
        runtime: Handle,
    ) -> Result<Self, CacheError> {
        let tls = CLIENT_TLS.get().cloned().unwrap_or_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(IDLE_TIMEOUT)
            // The server closes a quiet keep-alive connection after its
            // header read timeout (30 s by default); reusing one it is about
            // to close would fail a request for nothing.
            .pool_idle_timeout(Duration::from_secs(20));
        let env_roots = crate::tls_roots::from_env().map_err(|e| CacheError::Unavailable {
            location: servers.join(","),
            message: e.to_string(),
        })?;
        for root in tls.roots.into_iter().chain(env_roots.certificates) {
            builder = builder.add_root_certificate(root);
        }
        if let Some(pem) = tls.identity {
            let identity =
                reqwest::Identity::from_pem(&pem).map_err(|e| CacheError::Unavailable {
                    location: servers.join(","),
                    message: format!("client certificate: {e}"),
                })?;
            builder = builder.identity(identity);
        }
        let client = builder.build().map_err(|e| CacheError::Unavailable {
            location: servers.join(","),
            message: e.to_string(),
        })?;
        let servers = servers
            .into_iter()
            .map(|s| s.trim_end_matches('/').to_owned())
            .collect();
        Ok(Self {
            servers,
            preferred: AtomicUsize::new(0),
            token,
            client,
            runtime,
        })
    }

    fn request(&self, method: reqwest::Method, base: &str, path: &str) -> reqwest::RequestBuilder {
        let mut r = self.client.request(method, format!("{base}{path}"));
        if let Some(t) = &self.token {
            r = r.bearer_auth(t);
        }
        r
    }

    /// Runs `call` against the preferred server, then the others.
    fn with_failover<T>(&self, call: impl Fn(&str) -> Result<T, String>) -> Result<T, CacheError> {
        let n = self.servers.len();
        let start = self.preferred.load(Ordering::Relaxed);
        let mut errors = Vec::new();
        for i in 0..n {
            let index = (start + i) % n;
            let base = &self.servers[index];
            match call(base) {
                Ok(v) => {
                    self.preferred.store(index, Ordering::Relaxed);
                    return Ok(v);
                }
                Err(e) => errors.push(format!("{base}: {e}")),
            }
        }
        Err(CacheError::Unavailable {
            location: self.servers.join(","),
            message: errors.join("; "),
        })
    }

    fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.runtime.block_on(f)
    }
}

/// The status and the start of the body of a failed call; the body is
/// read no further than [`MAX_ERROR_BODY`].
async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(Ok(chunk)) = stream.next().await {
        body.extend_from_slice(&chunk);
        if body.len() >= MAX_ERROR_BODY {
            break;
        }
    }
    let text = String::from_utf8_lossy(&body);
    format!("{status}: {}", text.chars().take(300).collect::<String>())
}

/// Reads a JSON document of at most `cap` bytes.
async fn read_capped(resp: reqwest::Response, cap: usize, url: &str) -> Result<Vec<u8>, String> {
    let too_big = || format!("{url}: the answer is larger than {cap} bytes");
    if resp.content_length().is_some_and(|n| n > cap as u64) {
        return Err(too_big());
    }
    let mut body = Vec::new();
    let mut stream = resp.bytes_stream();
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| format!("{url}: {e}"))?;
        if body.len() + chunk.len() > cap {
            return Err(too_big());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

impl Cache for HttpCache {
    fn location(&self) -> String {
        self.servers.join(",")
    }

    fn lookup(&self, keys: &[CacheKey]) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
        let mut found = BTreeMap::new();
        for chunk in keys.chunks(kiln_common::wire::MAX_LOOKUP_KEYS) {
            let body = LookupRequest {
                keys: chunk.to_vec(),
            };
            let answer: LookupResponse = self.with_failover(|base| {
                self.block_on(async {
                    let url = format!("{base}/v1/lookup");
                    let resp = self
                        .request(reqwest::Method::POST, base, "/v1/lookup")
                        .timeout(Duration::from_secs(10))
                        .json(&body)
                        .send()
                        .await
                        .map_err(|e| send_error(&e))?;
                    if !resp.status().is_success() {
                        return Err(error_text(resp).await);
                    }
                    let body = read_capped(resp, MAX_LOOKUP_ANSWER, &url).await?;
                    serde_json::from_slice::<LookupResponse>(&body)
                        .map_err(|e| format!("{url}: not a lookup answer: {e}"))
                })
            })?;
            found.extend(answer.entries);
        }
        Ok(found)
    }

    fn fetch_blob(
        &self,
        digest: &Digest,
        size: u64,
        local: &LocalStore,
    ) -> Result<PathBuf, CacheError> {
        if local.contains(digest) {
            return Ok(local.path(digest));
        }
        self.with_failover(|base| {
            self.block_on(async {
                let url = format!("{base}/v1/blobs/{digest}");
                let resp = self
                    .request(reqwest::Method::GET, base, &format!("/v1/blobs/{digest}"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status() == StatusCode::NOT_FOUND {
                    return Ok(None);
                }
                if !resp.status().is_success() {
                    return Err(error_text(resp).await);
                }
                if let Some(announced) = resp.content_length().filter(|n| *n != size) {
                    return Err(format!(
                        "{url}: announces {announced} bytes, the entry names {size}"
                    ));
                }
                let mut writer = local.writer().map_err(|e| e.to_string())?;
                let mut received = 0u64;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| format!("{url}: {e}"))?;
                    received += chunk.len() as u64;
                    // Cut off at the size: an endless body must not fill
                    // the disk before the digest could say it is wrong.
                    if received > size {
                        return Err(format!(
                            "{url}: sent more than the {size} bytes the entry names"
                        ));
                    }
                    std::io::Write::write_all(&mut writer, &chunk).map_err(|e| e.to_string())?;
                }
                // The store refuses to commit bytes that do not hash to the
                // digest or are short: a corrupt cache blob never enters the
                // build.
                writer
                    .commit(digest, Some(size))
                    .map(Some)
                    .map_err(|e| e.to_string())
            })
        })
        .map_err(|e| CacheError::Blob {
            digest: digest.clone(),
            message: e.to_string(),
        })?
        .ok_or_else(|| CacheError::NotFound(digest.clone()))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, CacheError> {
        self.with_failover(|base| {
            self.block_on(async {
                let resp = self
                    .request(reqwest::Method::HEAD, base, &format!("/v1/blobs/{digest}"))
                    .timeout(Duration::from_secs(10))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                match resp.status() {
                    StatusCode::OK => Ok(true),
                    StatusCode::NOT_FOUND => Ok(false),
                    _ => Err(error_text(resp).await),
                }
            })
        })
    }

    fn put_blob(&self, digest: &Digest, path: &Path) -> Result<(), CacheError> {
        if self.has_blob(digest)? {
            return Ok(());
        }
        self.with_failover(|base| {
            self.block_on(async {
                let file = tokio::fs::File::open(path)
                    .await
                    .map_err(|e| e.to_string())?;
                let len = file.metadata().await.map_err(|e| e.to_string())?.len();
                let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
                let resp = self
                    .request(reqwest::Method::PUT, base, &format!("/v1/blobs/{digest}"))
                    .header(reqwest::header::CONTENT_LENGTH, len)
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if resp.status().is_success() {
                    Ok(())
                } else {
                    Err(error_text(resp).await)
                }
            })
        })
    }

    fn put_entry(&self, key: &CacheKey, entry: &CacheEntry) -> Result<(), CacheError> {
        self.with_failover(|base| {
            self.block_on(async {
                let resp = self
                    .request(reqwest::Method::PUT, base, &format!("/v1/entries/{key}"))
                    .timeout(Duration::from_secs(10))
                    .json(entry)
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                // 409: another executor stored a different result first; the
                // cache keeps it and this build's image is still correct.
                if resp.status().is_success() || resp.status() == StatusCode::CONFLICT {
                    Ok(())
                } else {
                    Err(error_text(resp).await)
                }
            })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};

    /// How the scripted server answers every request.
    #[derive(Clone, Copy)]
    enum Answer {
        /// 200 with these bytes and a matching Content-Length.
        Exact(&'static [u8]),
        /// 200, chunked, the same byte forever.
        Endless,
        /// 200 announcing `n` bytes, sending `body`, then closing.
        Truncated(u64, &'static [u8]),
    }

    /// A loopback HTTP server answering every connection with `answer`.
    fn server(answer: Answer) -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut conn) = conn else { return };
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(conn.try_clone().unwrap());
                    let mut length = 0usize;
                    loop {
                        let mut l = String::new();
                        if reader.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                            break;
                        }
                        if let Some(v) = l.to_ascii_lowercase().strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    let _ = reader.read_exact(&mut body);
                    let _ = match answer {
                        Answer::Exact(b) => write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            b.len()
                        )
                        .and_then(|_| conn.write_all(b)),
                        Answer::Truncated(n, b) => write!(
                            conn,
                            "HTTP/1.1 200 OK\r\nContent-Length: {n}\r\nConnection: close\r\n\r\n"
                        )
                        .and_then(|_| conn.write_all(b)),
                        Answer::Endless => {
                            let chunk = format!("10000\r\n{}\r\n", "a".repeat(0x10000));
                            write!(
                                conn,
                                "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
                            )
                            .and_then(|_| {
                                loop {
                                    conn.write_all(chunk.as_bytes())?;
                                }
                            })
                        }
                    };
                });
            }
        });
        url
    }

    fn cache(url: String, runtime: &tokio::runtime::Runtime) -> HttpCache {
        HttpCache::new(vec![url], None, runtime.handle().clone()).unwrap()
    }

    fn runtime() -> tokio::runtime::Runtime {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap()
    }

    fn store_files(store: &LocalStore) -> u64 {
        let mut total = 0;
        let mut stack = vec![store.root().to_path_buf()];
        while let Some(d) = stack.pop() {
            for e in std::fs::read_dir(&d).unwrap().flatten() {
                let m = e.metadata().unwrap();
                if m.is_dir() {
                    stack.push(e.path());
                } else {
                    total += m.len();
                }
            }
        }
        total
    }

    #[test]
    fn an_endless_blob_is_cut_off_at_the_size_the_entry_names() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let c = cache(server(Answer::Endless), &rt);
        let digest = Digest::of_bytes(b"the real blob");
        let err = c.fetch_blob(&digest, 100, &store).unwrap_err();
        assert!(err.to_string().contains("more than the 100 bytes"), "{err}");
        assert!(!store.contains(&digest));
        assert_eq!(store_files(&store), 0, "nothing is left in the store");
    }

    #[test]
    fn a_short_or_corrupt_blob_is_an_error_and_stays_out_of_the_store() {
        let rt = runtime();
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let digest = Digest::of_bytes(b"0123456789");
        let short = cache(server(Answer::Truncated(10, b"01234")), &rt);
        assert!(short.fetch_blob(&digest, 10, &store).is_err());
        let corrupt = cache(server(Answer::Exact(b"0123456780")), &rt);
        let err = corrupt.fetch_blob(&digest, 10, &store).unwrap_err();
        assert!(err.to_string().contains("digest"), "{err}");
        let liar = cache(server(Answer::Exact(b"0123456789")), &rt);
        let err = liar.fetch_blob(&digest, 9, &store).unwrap_err();
        assert!(err.to_string().contains("announces 10 bytes"), "{err}");
        assert!(!store.contains(&digest));
        let good = cache(server(Answer::Exact(b"0123456789")), &rt);
        good.fetch_blob(&digest, 10, &store).unwrap();
        assert!(store.contains(&digest));
    }

    #[test]
    fn an_endless_lookup_answer_is_refused_at_the_cap() {
        let rt = runtime();
        let c = cache(server(Answer::Endless), &rt);
        let key = CacheKey::from_bytes([7; 32]);
        let err = c.lookup(&[key]).unwrap_err();
        assert!(
            err.to_string()
                .contains(&format!("larger than {MAX_LOOKUP_ANSWER} bytes")),
            "{err}"
        );
        assert!(err.to_string().contains("/v1/lookup"), "{err}");
    }
}
