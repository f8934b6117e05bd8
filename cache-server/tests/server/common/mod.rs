//! Shared helpers for the integration tests: a real `kiln-cache-server`
//! process on 127.0.0.1 with a port it picked, killed when the guard drops.
//! It is started by the workspace's one launcher,
//! `kiln_e2e::cache_server::Launch`, as the end-to-end tests' servers are.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::ops::{Deref, DerefMut};
use std::path::{Path, PathBuf};
use std::time::Duration;

use kiln_common::{CacheEntry, CacheKey, Digest, LayerDescriptor};
use kiln_e2e::cache_server::{Launch, ServerProcess};
use sha2::Digest as _;

pub const SERVER: &str = env!("CARGO_BIN_EXE_kiln-cache-server");
pub const CLI: &str = env!("CARGO_BIN_EXE_kiln-cache");

/// A running server on `data` (a [`ServerProcess`]: `url`, `port`, `log`,
/// `log_text()`, `pid()`, `kill9()`, `terminate()`); killed (SIGKILL) and
/// reaped on drop, its log printed when the test panics.
pub struct Server {
    process: ServerProcess,
    pub data: PathBuf,
    work: tempfile::TempDir,
}

impl Server {
    /// Starts a server on `data` with `--listen 127.0.0.1:0`, GC only on
    /// demand, plus `extra` flags; waits until it listens.
    pub fn start(data: &Path, extra: &[&str]) -> Server {
        Self::start_with_env(data, extra, &[])
    }

    /// [`Server::start`] with extra environment variables.
    pub fn start_with_env(data: &Path, extra: &[&str], env: &[(&str, &str)]) -> Server {
        let work = tempfile::tempdir().unwrap();
        let mut launch = Launch::binary(work.path(), Path::new(SERVER), 0)
            .args(["--gc-interval", "0", "--data"])
            .args([data])
            .args(extra);
        launch.command().envs(env.iter().copied());
        Server {
            process: launch.start(),
            data: data.to_owned(),
            work,
        }
    }
}

impl Deref for Server {
    type Target = ServerProcess;

    fn deref(&self) -> &ServerProcess {
        &self.process
    }
}

impl DerefMut for Server {
    fn deref_mut(&mut self) -> &mut ServerProcess {
        &mut self.process
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(60))
        .build()
        .unwrap()
}

pub fn key(n: u64) -> CacheKey {
    let mut raw = [0u8; 32];
    raw[..8].copy_from_slice(&n.to_be_bytes());
    raw[31] = 0x5a;
    CacheKey::from_bytes(raw)
}

pub fn entry(layer: Option<(&Digest, u64)>, created_by: &str) -> CacheEntry {
    CacheEntry {
        layer: layer.map(|(d, size)| LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d.clone(),
            size,
            diff_id: Digest::of_bytes(created_by.as_bytes()),
        }),
        created_by: created_by.into(),
        created: "2026-11-24T12:00:00Z".into(),
        extra: BTreeMap::new(),
    }
}

/// Deterministic pseudo-random bytes (xorshift), so content differs per seed.
pub fn bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    out
}

pub async fn put_blob(
    c: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    data: &[u8],
) -> (reqwest::StatusCode, Digest) {
    let digest = Digest::of_bytes(data);
    let mut r = c
        .put(format!("{url}/v1/blobs/{digest}"))
        .body(data.to_vec());
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    (r.send().await.unwrap().status(), digest)
}

pub async fn put_entry(
    c: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    key: &CacheKey,
    e: &CacheEntry,
) -> reqwest::Response {
    let mut r = c.put(format!("{url}/v1/entries/{key}")).json(e);
    if let Some(t) = token {
        r = r.bearer_auth(t);
    }
    r.send().await.unwrap()
}

/// GET a blob: status and body.
pub async fn get_blob(
    c: &reqwest::Client,
    url: &str,
    digest: &Digest,
) -> (reqwest::StatusCode, Vec<u8>) {
    let r = c
        .get(format!("{url}/v1/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    let status = r.status();
    (status, r.bytes().await.unwrap().to_vec())
}

pub async fn error_code(response: reqwest::Response) -> String {
    let body: serde_json::Value = response.json().await.unwrap();
    body["error"]["code"].as_str().unwrap().to_owned()
}

/// Uploads bytes under a digest they do not have, `lens` bytes each (a
/// large one goes up in parts, a small one in one request): each upload
/// must be refused with `digest_mismatch`, and the blob must stay absent.
pub async fn uploads_under_a_wrong_digest_are_refused(
    c: &reqwest::Client,
    url: &str,
    lens: &[usize],
) {
    let wrong = Digest::of_bytes(b"what the client claims");
    for &len in lens {
        let r = c
            .put(format!("{url}/v1/blobs/{wrong}"))
            .body(bytes(7, len))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), reqwest::StatusCode::BAD_REQUEST);
        assert_eq!(error_code(r).await, "digest_mismatch");
    }
    let head = c
        .head(format!("{url}/v1/blobs/{wrong}"))
        .send()
        .await
        .unwrap();
    assert_eq!(head.status(), reqwest::StatusCode::NOT_FOUND);
}

/// Every regular file below `dir`.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let ft = e.file_type().unwrap();
            if ft.is_dir() {
                out.extend(files_below(&e.path()));
            } else {
                out.push(e.path());
            }
        }
    }
    out
}

pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Asserts that every blob file's content hashes to its name.
pub fn assert_blob_files_match_names(data: &Path) {
    for path in files_below(&data.join("blobs")) {
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let content = fs::read(&path).unwrap();
        assert_eq!(sha256_hex(&content), name, "{} is corrupt", path.display());
    }
}
