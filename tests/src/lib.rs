//! Helpers shared by the end-to-end tests under `tests/tests/e2e/`.
//!
//! - [`Registry`]: a real Distribution 2.8 registry (Debian's
//!   `docker-registry`) on a free 127.0.0.1 port, with its storage and config
//!   in a temporary directory, without auth, with htpasswd (Basic) auth, or
//!   with token auth backed by [`TokenServer`]; killed on drop.
//! - [`TokenServer`]: a small token endpoint issuing real RS256 JWTs whose
//!   signing key's certificate is in the registry's `rootcertbundle`.
//! - [`make_busybox_layout`] / [`push_busybox`]: an offline base image from
//!   `busybox-static`, built with `umoci` and pushed with `skopeo`.
//! - [`cache_server`]: the one launcher of `kiln-cache-server` processes
//!   (also used by the cache server's own tests); [`CacheServer`]: one on
//!   local storage.
//! - [`hostile::HostileCache`]: a cache server that lies, stalls, truncates
//!   and corrupts, for the executor's "the cache never fails a build" tests.
//! - [`world`]: a registry holding the busybox base plus a work directory,
//!   and one way to run a build with a report (the build tests' setup).
//! - [`s3`]: an S3-compatible server with a bucket, and `kiln-cache-server`
//!   replicas on it (shared with the cache server's own S3 tests).
//!
//! Every helper cleans up after itself (processes killed, temp dirs removed)
//! even when a test fails, through `Drop`.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use base64::Engine;

pub mod azurite;
pub mod cache_repo;
pub mod cache_server;
pub mod contexts;
mod garage;
pub mod hostile;
pub mod kaniko_registry;
pub mod runtime;
pub mod s3;
pub mod world;

/// Path of one of the workspace's binaries next to the running test
/// (`target/<profile>/<name>`). `cargo test --workspace` builds them;
/// `scripts/test-all.sh` builds them first with the executor's embedded cache.
pub fn kiln_bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/<test>");
    let path = dir.join(name);
    assert!(
        path.is_file(),
        "{} is missing: build the binaries first (scripts/test-all.sh does)",
        path.display()
    );
    path
}

/// A running `kiln-cache-server` on a free loopback port with its data in
/// a temporary directory; killed on drop. Started by the one launcher,
/// [`cache_server::Launch`].
pub struct CacheServer {
    process: Option<cache_server::ServerProcess>,
    port: u16,
    dir: tempfile::TempDir,
}

impl CacheServer {
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut server = CacheServer {
            process: None,
            port: service_port(),
            dir,
        };
        server.restart()?;
        Ok(server)
    }

    /// (Re)starts the server on the same port and data directory.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        let process = cache_server::Launch::listen(self.dir.path(), self.port)
            .args([
                std::ffi::OsStr::new("--data"),
                self.dir.path().join("data").as_os_str(),
            ])
            .start();
        self.process = Some(process);
        Ok(())
    }

    /// Kills the server (SIGKILL) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut process) = self.process.take() {
            process.kill9();
        }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default()
    }

    /// The value of one Prometheus sample (`name{labels}` as printed), 0 if absent.
    pub fn metric(&self, sample: &str) -> f64 {
        let Ok((_, body)) = http_get(self.port, "/metrics") else {
            return 0.0;
        };
        metric_sum(&body, sample)
    }

    /// GET a path; returns status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        http_get(self.port, path)
    }
}

/// The sum of the samples named `sample` (`name{labels}` as printed) in a
/// Prometheus text exposition; 0 if absent.
fn metric_sum(body: &str, sample: &str) -> f64 {
    body.lines()
        .filter_map(|l| l.strip_prefix(sample))
        .filter_map(|rest| rest.trim().parse::<f64>().ok())
        .sum()
}

/// A minimal HTTP/1.1 GET on loopback (enough for health and metrics).
fn http_get(port: u16, path: &str) -> Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .context("malformed HTTP status line")?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The `auth` field of a `config.json` entry: base64 of `user:password`.
pub fn basic_auth_field(user: &str, password: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
}

/// Writes `dir/config.json` with `content` (a Docker config document).
pub fn write_docker_config(dir: &Path, content: &serde_json::Value) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("config.json");
    std::fs::write(&path, serde_json::to_vec_pretty(content)?)?;
    Ok(path)
}

/// A port for a server a test starts that needs its port before it runs
/// (in its config file): free now, and below the kernel's ephemeral range
/// (32768 and up), so that no outgoing connection of another process can
/// take it between this check and the server's bind (as happened, on a
/// busy machine, to ports the OS picked from that range).
pub fn service_port() -> u16 {
    use std::hash::{BuildHasher, Hasher};
    loop {
        let random = std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish();
        let port = 20_000 + (random % 12_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// Unmounts (lazily, deepest first) every mount point at or below `dir`.
/// A `kiln-executor` killed in the middle of a step leaves that step's
/// overlay mounted under its `--cache-dir`; a test that kills one calls this
/// before its temporary directory is removed, or the removal fails.
pub fn unmount_below(dir: &Path) {
    let Ok(dir) = dir.canonicalize() else {
        return;
    };
    let Ok(mountinfo) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return;
    };
    let mut points: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .filter(|p| p.starts_with(&dir))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    for point in points {
        let _ = Command::new("umount")
            .arg("-l")
            .arg(&point)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space, ...).
fn unescape_mountinfo(field: &str) -> String {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let octal = b
            .get(i + 1..i + 4)
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match (b[i], octal) {
            (b'\\', Some(v)) => {
                out.push(v);
                i += 4;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Runs a command, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// How the test registry authenticates clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RegistryAuth {
    None,
    /// htpasswd (bcrypt) file with one user.
    Basic {
        user: String,
        password: String,
    },
    /// Bearer tokens from a [`TokenServer`] that accepts this one user.
    Token {
        user: String,
        password: String,
    },
}

impl RegistryAuth {
    pub fn basic(user: &str, password: &str) -> Self {
        RegistryAuth::Basic {
            user: user.into(),
            password: password.into(),
        }
    }
    pub fn token(user: &str, password: &str) -> Self {
        RegistryAuth::Token {
            user: user.into(),
            password: password.into(),
        }
    }
}

/// A running registry; see the module documentation.
pub struct Registry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
    auth: RegistryAuth,
    token_server: Option<TokenServer>,
}

impl Registry {
    /// A registry speaking plain HTTP.
    pub fn start(auth: RegistryAuth) -> Result<Self> {
        Self::start_inner(auth, false, false)
    }

    /// A registry speaking HTTPS with a certificate for `127.0.0.1` issued
    /// by a fresh test CA ([`Registry::ca_certificate`]).
    pub fn start_tls(auth: RegistryAuth) -> Result<Self> {
        Self::start_inner(auth, true, false)
    }

    /// A registry speaking HTTPS that refuses clients without a certificate
    /// signed by its CA (`http.tls.clientcas`; [`Registry::client_identity`]
    /// is one), with `auth` on top.
    pub fn start_mtls(auth: RegistryAuth) -> Result<Self> {
        Self::start_inner(auth, true, true)
    }

    /// `(client.pem, client.key)`: a client certificate from the registry's
    /// CA (after [`Registry::start_mtls`]).
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.pem"),
            self.dir.path().join("client.key"),
        )
    }

    /// The PEM CA certificate that signed a TLS registry's certificate.
    pub fn ca_certificate(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    fn start_inner(auth: RegistryAuth, tls: bool, client_certs: bool) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = service_port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let mut token_server = None;
        let auth_yaml = match &auth {
            RegistryAuth::None => String::new(),
            RegistryAuth::Basic { user, password } => {
                let line = run(Command::new("htpasswd").args(["-Bbn", user, password]))?;
                let path = dir.path().join("htpasswd");
                std::fs::write(&path, line.trim())?;
                format!(
                    "auth:\n  htpasswd:\n    realm: kiln-test\n    path: {}\n",
                    path.display()
                )
            }
            RegistryAuth::Token { user, password } => {
                let ts = TokenServer::start(dir.path(), user, password)?;
                let yaml = format!(
                    "auth:\n  token:\n    realm: {}\n    service: {}\n    issuer: {}\n    rootcertbundle: {}\n",
                    ts.realm(),
                    TokenServer::SERVICE,
                    TokenServer::ISSUER,
                    ts.cert_path().display()
                );
                token_server = Some(ts);
                yaml
            }
        };
        let tls_yaml = if tls {
            make_test_certificates(dir.path())?;
            let mut yaml = format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                dir.path().join("server.pem").display(),
                dir.path().join("server.key").display()
            );
            if client_certs {
                make_client_certificate(dir.path())?;
                yaml += &format!(
                    "    clientcas:\n      - {}\n",
                    dir.path().join("ca.pem").display()
                );
            }
            yaml
        } else {
            String::new()
        };
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n{tls_yaml}{auth_yaml}",
            data.display()
        );
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config)?;
        let log = std::fs::File::create(dir.path().join("registry.log"))?;
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting docker-registry (Debian package docker-registry)")?;
        let reg = Registry {
            child,
            port,
            dir,
            auth,
            token_server,
        };
        reg.wait_ready()?;
        Ok(reg)
    }

    fn wait_ready(&self) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(15);
        while Instant::now() < deadline {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                let _ = s.write_all(b"GET /v2/ HTTP/1.0\r\n\r\n");
                let mut head = [0u8; 12];
                if s.read_exact(&mut head).is_ok() && head.starts_with(b"HTTP/1.") {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "registry on port {} did not answer /v2/: {}",
            self.port,
            self.log()
        );
    }

    /// Stops the registry process: its port refuses connections from now
    /// on (for builds that must not need it).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// `127.0.0.1:PORT/<repo_tag>`
    pub fn reference(&self, repo_tag: &str) -> String {
        format!("{}/{repo_tag}", self.host())
    }

    pub fn credentials(&self) -> Option<(String, String)> {
        match &self.auth {
            RegistryAuth::None => None,
            RegistryAuth::Basic { user, password } | RegistryAuth::Token { user, password } => {
                Some((user.clone(), password.clone()))
            }
        }
    }

    /// skopeo's credential flag for this registry (`--creds u:p`, or nothing).
    pub fn skopeo_creds(&self, flag: &str) -> Vec<String> {
        match self.credentials() {
            Some((u, p)) => vec![flag.to_string(), format!("{u}:{p}")],
            None => vec![],
        }
    }

    /// The registry's log (access log included) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// Scopes requested from the token server so far (token auth only).
    pub fn token_requests(&self) -> Vec<String> {
        self.token_server
            .as_ref()
            .map(|t| t.requests.lock().map(|r| r.clone()).unwrap_or_default())
            .unwrap_or_default()
    }

    /// Runs `skopeo inspect --raw` and returns the manifest bytes.
    pub fn skopeo_raw_manifest(&self, repo_tag: &str) -> Result<Vec<u8>> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--raw", "--tls-verify=false"])
            .args(self.skopeo_creds("--creds"))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        Ok(run(&mut cmd)?.into_bytes())
    }

    /// Runs `skopeo inspect` and returns its JSON.
    pub fn skopeo_inspect(&self, repo_tag: &str) -> Result<serde_json::Value> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["inspect", "--tls-verify=false"])
            .args(self.skopeo_creds("--creds"))
            .arg(format!("docker://{}", self.reference(repo_tag)));
        Ok(serde_json::from_str(&run(&mut cmd)?)?)
    }

    /// Copies an image into this registry with skopeo (`extra` are
    /// additional `skopeo copy` flags such as `--format v2s2`).
    pub fn skopeo_copy_in(&self, source: &str, repo_tag: &str, extra: &[&str]) -> Result<()> {
        let mut cmd = Command::new("skopeo");
        cmd.args(["copy", "--dest-tls-verify=false"])
            .args(self.skopeo_creds("--dest-creds"))
            .args(extra)
            .arg(source)
            .arg(format!("docker://{}", self.reference(repo_tag)));
        run(&mut cmd).map(|_| ())
    }
}

/// A CA (`ca.pem`) and a server certificate for IP 127.0.0.1 signed by it
/// (`server.pem`, `server.key`), made with the `openssl` CLI in `dir`.
pub fn make_test_certificates(dir: &Path) -> Result<()> {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    run(Command::new("openssl")
        .args(["req", "-x509", "-days", "2", "-subj", "/CN=kiln-test-ca"])
        .args(ec)
        .arg("-keyout")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("ca.pem")))?;
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=127.0.0.1"])
        .args(ec)
        .arg("-keyout")
        .arg(dir.join("server.key"))
        .arg("-out")
        .arg(dir.join("server.csr")))?;
    let ext = dir.join("server.ext");
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(dir.join("server.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("server.pem"))
        .arg("-extfile")
        .arg(&ext))?;
    Ok(())
}

/// A client certificate (`client.pem`, `client.key`, extended key usage
/// clientAuth) signed by the CA [`make_test_certificates`] made in `dir`.
pub fn make_client_certificate(dir: &Path) -> Result<()> {
    run(Command::new("openssl")
        .args(["req", "-subj", "/CN=kiln-test-client", "-newkey", "ec"])
        .args(["-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"])
        .arg("-keyout")
        .arg(dir.join("client.key"))
        .arg("-out")
        .arg(dir.join("client.csr")))?;
    let ext = dir.join("client.ext");
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )?;
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial", "-in"])
        .arg(dir.join("client.csr"))
        .arg("-CA")
        .arg(dir.join("ca.pem"))
        .arg("-CAkey")
        .arg(dir.join("ca.key"))
        .arg("-out")
        .arg(dir.join("client.pem"))
        .arg("-extfile")
        .arg(&ext))?;
    Ok(())
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A token endpoint for the registry's `auth: token` mode. It accepts one
/// user (HTTP Basic on the token request), grants every action asked for in
/// the `scope` parameters, and signs RS256 JWTs with a key generated by the
/// `openssl` CLI; the JWT header's `kid` is the libtrust key ID of that key,
/// which is how Distribution 2.8 finds the key in its `rootcertbundle`.
pub struct TokenServer {
    port: u16,
    cert: PathBuf,
    stop: Arc<AtomicBool>,
    requests: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

struct Signer {
    key: PathBuf,
    kid: String,
    user: String,
    password: String,
}

impl TokenServer {
    pub const SERVICE: &'static str = "kiln-test-registry";
    pub const ISSUER: &'static str = "kiln-test-issuer";

    pub fn start(dir: &Path, user: &str, password: &str) -> Result<Self> {
        let key = dir.join("token-key.pem");
        let cert = dir.join("token-cert.pem");
        run(Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=kiln-test-token-issuer",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert))?;
        let der = Command::new("openssl")
            .args(["pkey", "-pubout", "-outform", "DER", "-in"])
            .arg(&key)
            .output()?;
        if !der.status.success() {
            bail!(
                "openssl pkey failed: {}",
                String::from_utf8_lossy(&der.stderr)
            );
        }
        let kid = libtrust_key_id(&der.stdout);
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let stop = Arc::new(AtomicBool::new(false));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let signer = Signer {
            key,
            kid,
            user: user.to_string(),
            password: password.to_string(),
        };
        let thread = {
            let stop = stop.clone();
            let requests = requests.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    if let Ok(conn) = conn {
                        let _ = handle_token_request(conn, &signer, &requests);
                    }
                }
            })
        };
        Ok(TokenServer {
            port,
            cert,
            stop,
            requests,
            thread: Some(thread),
        })
    }

    pub fn realm(&self) -> String {
        format!("http://127.0.0.1:{}/token", self.port)
    }

    pub fn cert_path(&self) -> &Path {
        &self.cert
    }

    /// The OAuth2 refresh token (Docker's `identitytoken`) this server
    /// accepts for `user` on `POST /token` with `grant_type=refresh_token`.
    pub fn refresh_token(user: &str) -> String {
        format!("{user}-refresh-token")
    }
}

impl Drop for TokenServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// libtrust's key ID: sha256 of the DER public key, first 240 bits, base32,
/// in colon-separated groups of four.
pub fn libtrust_key_id(spki_der: &[u8]) -> String {
    let digest = kiln_common::Digest::of_bytes(spki_der);
    let raw = hex::decode(digest.hex()).unwrap_or_default();
    let b32 = base32(&raw[..30]);
    b32.as_bytes()
        .chunks(4)
        .map(|c| String::from_utf8_lossy(c).into_owned())
        .collect::<Vec<_>>()
        .join(":")
}

fn base32(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 32] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let mut out = String::new();
    let (mut buf, mut bits) = (0u64, 0u32);
    for b in bytes {
        buf = (buf << 8) | u64::from(*b);
        bits += 8;
        while bits >= 5 {
            bits -= 5;
            out.push(ALPHABET[((buf >> bits) & 31) as usize] as char);
        }
    }
    if bits > 0 {
        out.push(ALPHABET[((buf << (5 - bits)) & 31) as usize] as char);
    }
    out
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex_pair = b
            .get(i + 1..i + 3)
            .and_then(|h| std::str::from_utf8(h).ok())
            .and_then(|h| u8::from_str_radix(h, 16).ok());
        match (b[i], hex_pair) {
            (b'%', Some(v)) => {
                out.push(v);
                i += 3;
            }
            (b'+', _) => {
                out.push(b' ');
                i += 1;
            }
            (c, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn handle_token_request(
    conn: TcpStream,
    signer: &Signer,
    requests: &Mutex<Vec<String>>,
) -> Result<()> {
    conn.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut reader = BufReader::new(conn.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    let mut authorization = None;
    let mut content_length = 0usize;
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 || line.trim().is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':') {
            if k.trim().eq_ignore_ascii_case("authorization") {
                authorization = Some(v.trim().to_string());
            } else if k.trim().eq_ignore_ascii_case("content-length") {
                content_length = v.trim().parse().unwrap_or(0).min(1 << 16);
            }
        }
    }
    let target = request_line.split_whitespace().nth(1).unwrap_or("");
    let query = target.split_once('?').map(|(_, q)| q).unwrap_or("");
    let mut scopes = Vec::new();
    for pair in query.split('&') {
        if let Some(("scope", v)) = pair.split_once('=') {
            scopes.push(percent_decode(v));
        }
    }
    // Docker's OAuth2 exchange of an identity (refresh) token: a form POST
    // whose `scope` holds the scopes separated by spaces.
    let mut refresh_ok = false;
    if request_line.starts_with("POST ") {
        let mut body = vec![0u8; content_length];
        reader.read_exact(&mut body)?;
        let form = String::from_utf8_lossy(&body).into_owned();
        let mut grant = None;
        let mut refresh = None;
        for pair in form.split('&') {
            match pair.split_once('=') {
                Some(("scope", v)) => scopes.extend(
                    percent_decode(v)
                        .split(' ')
                        .filter(|s| !s.is_empty())
                        .map(str::to_string),
                ),
                Some(("grant_type", v)) => grant = Some(percent_decode(v)),
                Some(("refresh_token", v)) => refresh = Some(percent_decode(v)),
                _ => {}
            }
        }
        refresh_ok = grant.as_deref() == Some("refresh_token")
            && refresh == Some(TokenServer::refresh_token(&signer.user));
    }
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD
            .encode(format!("{}:{}", signer.user, signer.password))
    );
    let mut conn = conn;
    if !refresh_ok && authorization.as_deref() != Some(expected.as_str()) {
        let body = r#"{"errors":[{"code":"UNAUTHORIZED","message":"bad credentials"}]}"#;
        write!(
            conn,
            "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )?;
        return Ok(());
    }
    if let Ok(mut r) = requests.lock() {
        let grant = if refresh_ok {
            "oauth2 refresh_token: "
        } else {
            ""
        };
        r.push(format!("{grant}{}", scopes.join(" ")));
    }
    let access: Vec<serde_json::Value> = scopes
        .iter()
        .filter_map(|s| {
            // repository:<name>:<actions>; the name itself may hold ':'.
            let (kind, rest) = s.split_once(':')?;
            let (name, actions) = rest.rsplit_once(':')?;
            Some(serde_json::json!({"type": kind, "name": name, "actions": actions.split(',').collect::<Vec<_>>()}))
        })
        .collect();
    let now = SystemTime::now().duration_since(UNIX_EPOCH)?.as_secs();
    let header = serde_json::json!({"typ": "JWT", "alg": "RS256", "kid": signer.kid});
    let claims = serde_json::json!({
        "iss": TokenServer::ISSUER,
        "sub": signer.user,
        "aud": TokenServer::SERVICE,
        "exp": now + 300,
        "nbf": now - 10,
        "iat": now - 10,
        "jti": format!("{now}-{}", scopes.len()),
        "access": access,
    });
    let signing_input = format!(
        "{}.{}",
        b64url(serde_json::to_string(&header)?.as_bytes()),
        b64url(serde_json::to_string(&claims)?.as_bytes())
    );
    let mut child = Command::new("openssl")
        .args(["dgst", "-sha256", "-sign"])
        .arg(&signer.key)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(signing_input.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "openssl dgst -sign failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let jwt = format!("{signing_input}.{}", b64url(&out.stdout));
    let body =
        serde_json::json!({"token": jwt, "access_token": jwt, "expires_in": 300}).to_string();
    write!(
        conn,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    Ok(())
}

/// Busybox applets linked in the test base image's `/bin`.
pub const BUSYBOX_APPLETS: &[&str] = &[
    "sh", "ls", "cat", "echo", "true", "false", "mkdir", "rm", "cp", "mv", "env", "id", "pwd",
    "sleep", "test", "touch", "wc", "head", "tail", "printf", "chmod", "chown", "grep", "sed",
    "find", "sort", "ln", "readlink", "stat", "uname", "whoami", "tar", "gzip", "du", "which",
    "xargs", "expr", "seq", "basename", "dirname",
];

/// Fills `rootfs` with `/bin/busybox` (from busybox-static), applet
/// symlinks, `/etc/passwd`, `/etc/group` and a sticky `/tmp`.
pub fn fill_busybox_rootfs(rootfs: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let bin = rootfs.join("bin");
    std::fs::create_dir_all(&bin)?;
    std::fs::copy("/bin/busybox", bin.join("busybox"))
        .context("copying /bin/busybox (busybox-static)")?;
    std::fs::set_permissions(bin.join("busybox"), std::fs::Permissions::from_mode(0o755))?;
    for applet in BUSYBOX_APPLETS {
        std::os::unix::fs::symlink("busybox", bin.join(applet))?;
    }
    let etc = rootfs.join("etc");
    std::fs::create_dir_all(&etc)?;
    std::fs::write(
        etc.join("passwd"),
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    )?;
    std::fs::write(etc.join("group"), "root:x:0:\nnogroup:x:65534:\n")?;
    std::fs::create_dir_all(rootfs.join("tmp"))?;
    std::fs::set_permissions(rootfs.join("tmp"), std::fs::Permissions::from_mode(0o1777))?;
    std::fs::create_dir_all(rootfs.join("root"))?;
    Ok(())
}

/// Builds an OCI image layout at `layout` holding the busybox image as
/// `layout:tag`, with umoci (an independent implementation, so kiln is
/// tested against someone else's output). Returns nothing; the image is
/// `oci:<layout>:<tag>` for skopeo.
pub fn make_busybox_layout(layout: &Path, tag: &str) -> Result<()> {
    let work = tempfile::tempdir()?;
    let bundle = work.path().join("bundle");
    let image = format!("{}:{tag}", layout.display());
    if !layout.join("oci-layout").exists() {
        run(Command::new("umoci").args(["init", "--layout"]).arg(layout))?;
    }
    run(Command::new("umoci").args(["new", "--image", &image]))?;
    run(Command::new("umoci")
        .args(["unpack", "--image", &image])
        .arg(&bundle))?;
    fill_busybox_rootfs(&bundle.join("rootfs"))?;
    run(Command::new("umoci")
        .args(["repack", "--image", &image])
        .arg(&bundle))?;
    run(Command::new("umoci").args([
        "config",
        "--image",
        &image,
        "--config.cmd",
        "sh",
        "--config.env",
        "PATH=/bin",
        "--os",
        "linux",
        "--architecture",
        host_arch(),
    ]))?;
    Ok(())
}

/// Adds an uncompressed tar as the top layer of `layout:tag` (an OCI
/// layout, e.g. from [`make_busybox_layout`]): the layer blob, a new config
/// with its diff_id and history entry, a new manifest, and the index entry
/// for the tag pointing at it.
pub fn append_layer_to_layout(layout: &Path, tag: &str, layer_tar: &[u8]) -> Result<()> {
    use kiln_common::Digest;
    let write_blob = |bytes: &[u8]| -> Result<Digest> {
        let d = Digest::of_bytes(bytes);
        std::fs::write(layout.join("blobs/sha256").join(d.hex()), bytes)?;
        Ok(d)
    };
    let read_blob = |d: &str| -> Result<serde_json::Value> {
        let hex = d.trim_start_matches("sha256:");
        Ok(serde_json::from_slice(&std::fs::read(
            layout.join("blobs/sha256").join(hex),
        )?)?)
    };
    let mut index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json"))?)?;
    let entry = index["manifests"]
        .as_array_mut()
        .context("index without manifests")?
        .iter_mut()
        .find(|m| m["annotations"]["org.opencontainers.image.ref.name"] == tag)
        .context("no such tag in the layout")?;
    let mut manifest = read_blob(entry["digest"].as_str().context("digest")?)?;
    let mut config = read_blob(manifest["config"]["digest"].as_str().context("config")?)?;
    let layer = write_blob(layer_tar)?;
    config["rootfs"]["diff_ids"]
        .as_array_mut()
        .context("diff_ids")?
        .push(layer.to_string().into());
    if let Some(history) = config["history"].as_array_mut() {
        history.push(serde_json::json!({"created_by": "append_layer_to_layout"}));
    }
    let config_bytes = serde_json::to_vec(&config)?;
    let config_digest = write_blob(&config_bytes)?;
    manifest["config"]["digest"] = config_digest.to_string().into();
    manifest["config"]["size"] = config_bytes.len().into();
    manifest["layers"]
        .as_array_mut()
        .context("layers")?
        .push(serde_json::json!({
            "mediaType": "application/vnd.oci.image.layer.v1.tar",
            "digest": layer.to_string(),
            "size": layer_tar.len(),
        }));
    let manifest_bytes = serde_json::to_vec(&manifest)?;
    let manifest_digest = write_blob(&manifest_bytes)?;
    entry["digest"] = manifest_digest.to_string().into();
    entry["size"] = manifest_bytes.len().into();
    std::fs::write(layout.join("index.json"), serde_json::to_vec(&index)?)?;
    Ok(())
}

/// `umoci unpack`s `layout:latest` into `bundle` (as root, so owners are
/// kept); returns the bundle's rootfs.
pub fn umoci_unpack(layout: &Path, bundle: &Path) -> Result<PathBuf> {
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:latest", layout.display())])
        .arg(bundle))?;
    Ok(bundle.join("rootfs"))
}

/// The host architecture in OCI's names.
pub fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Makes the busybox image and pushes it to `registry` as `repo_tag`
/// (`extra` are additional `skopeo copy` flags). Returns the layout dir
/// (kept for other uses) inside `work`.
pub fn push_busybox(
    registry: &Registry,
    work: &Path,
    repo_tag: &str,
    extra: &[&str],
) -> Result<PathBuf> {
    let layout = work.join("busybox-layout");
    if !layout.join("index.json").exists() {
        make_busybox_layout(&layout, "latest")?;
    }
    registry.skopeo_copy_in(&format!("oci:{}:latest", layout.display()), repo_tag, extra)?;
    Ok(layout)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base32_matches_rfc4648_vectors() {
        assert_eq!(base32(b"foobar"), "MZXW6YTBOI");
        assert_eq!(base32(b"f"), "MY");
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/tmp/a\040b\011c"), "/tmp/a b\tc");
        assert_eq!(unescape_mountinfo(r"/plain\x"), r"/plain\x");
    }

    #[test]
    fn percent_decoding_of_scopes() {
        assert_eq!(
            percent_decode("repository%3Aa%2Fb%3Apull%2Cpush"),
            "repository:a/b:pull,push"
        );
        assert_eq!(percent_decode("x%zz"), "x%zz");
    }
}
