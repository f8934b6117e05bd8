//! The shared cache: a `kiln-cache-server` over HTTP.
//!
//! Several server URLs may be given; each call tries them in order and
//! sticks to the first that answers, so one replica going away mid-build
//! costs a retry, not the cache. Calls have short timeouts: a slow server
//! must not make a build slower than building without it. Blob bodies are
//! streamed both ways and verified against their digest before they enter
//! the local store.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::StreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest, LookupRequest, LookupResponse};
use reqwest::StatusCode;
use tokio::runtime::Handle;

use super::{Cache, CacheError};
use crate::store::LocalStore;

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
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .read_timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| CacheError::Unavailable {
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

async fn error_text(resp: reqwest::Response) -> String {
    let status = resp.status();
    let body = resp.text().await.unwrap_or_default();
    format!("{status}: {}", body.chars().take(300).collect::<String>())
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
                    let resp = self
                        .request(reqwest::Method::POST, base, "/v1/lookup")
                        .timeout(Duration::from_secs(10))
                        .json(&body)
                        .send()
                        .await
                        .map_err(|e| e.to_string())?;
                    if !resp.status().is_success() {
                        return Err(error_text(resp).await);
                    }
                    resp.json::<LookupResponse>()
                        .await
                        .map_err(|e| e.to_string())
                })
            })?;
            found.extend(answer.entries);
        }
        Ok(found)
    }

    fn fetch_blob(&self, digest: &Digest, local: &LocalStore) -> Result<PathBuf, CacheError> {
        if local.contains(digest) {
            return Ok(local.path(digest));
        }
        self.with_failover(|base| {
            self.block_on(async {
                let resp = self
                    .request(reqwest::Method::GET, base, &format!("/v1/blobs/{digest}"))
                    .send()
                    .await
                    .map_err(|e| e.to_string())?;
                if !resp.status().is_success() {
                    return Err(error_text(resp).await);
                }
                let mut writer = local.writer().map_err(|e| e.to_string())?;
                let mut stream = resp.bytes_stream();
                while let Some(chunk) = stream.next().await {
                    let chunk = chunk.map_err(|e| e.to_string())?;
                    std::io::Write::write_all(&mut writer, &chunk).map_err(|e| e.to_string())?;
                }
                // The store refuses to commit bytes that do not hash to the
                // digest: a corrupt cache blob never enters the build.
                writer.commit(digest, None).map_err(|e| e.to_string())
            })
        })
        .map_err(|e| CacheError::Blob {
            digest: digest.clone(),
            message: e.to_string(),
        })
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
