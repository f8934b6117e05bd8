//! S3-compatible object storage for tests: an [`S3Server`] on 127.0.0.1
//! with one empty bucket, and [`Replica`]s of `kiln-cache-server` pointed at
//! it (`--storage s3://...`). The cache server's own tests
//! (`cache-server/tests/server/s3_*.rs`) and the workspace's end-to-end tests
//! (`tests/tests/e2e/replicas.rs`) share this one copy.
//!
//! Callers see only what any S3-compatible server has: an endpoint, a
//! region, credentials, a bucket name, a scratch root and a log, and
//! [`S3Server::stop`] / drop. Which product serves them is private to this
//! module; today that is s3s-fs (an S3 server on a directory, installed from
//! crates.io, see docs/object-storage.md), and a multi-node one can be added
//! beside it as another [`Implementation`] without changing a caller.
//!
//! When no S3-compatible server is installed, [`S3Server::start`] says so
//! loudly and returns `None` (the test then passes as skipped), unless
//! `KILN_REQUIRE_S3` is set (CI sets it after installing), in which case it
//! panics. Every process is killed and every directory removed when its
//! guard drops, also when the test fails.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::cache_server::{Launch, ServerProcess};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

// What s3s-fs is started with; callers should ask the [`S3Server`]
// instead, since another implementation may have its own.
/// The access key s3s-fs accepts.
pub const ACCESS_KEY: &str = "kiln-test-access";
/// The secret key s3s-fs accepts.
pub const SECRET_KEY: &str = "kiln-test-secret-key";
/// The bucket s3s-fs starts with (empty).
pub const BUCKET: &str = "kiln-cache";
/// The region the test servers claim (s3s-fs accepts any).
pub const REGION: &str = "us-east-1";

/// How long a server or replica may take to come up on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The install command named in skip and failure messages.
const INSTALL: &str =
    "cargo install --locked s3s-fs --version 0.14.1 --features binary --root /opt/kiln-tools";

/// Where s3s-fs is: `$KILN_S3S_FS`, `/opt/kiln-tools/bin/s3s-fs`, or PATH.
pub fn s3s_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_S3S_FS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let installed = PathBuf::from("/opt/kiln-tools/bin/s3s-fs");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// One running S3-compatible server product. The [`S3Server`] owns it and
/// stops it on drop; each product keeps its own start-up details (binary,
/// port discovery, how the bucket and the credentials are made) inside its
/// implementation.
pub(crate) trait Implementation: Send {
    /// `http://127.0.0.1:PORT` of the S3 API.
    fn endpoint(&self) -> &str;
    fn region(&self) -> &str;
    fn access_key(&self) -> &str;
    fn secret_key(&self) -> &str;
    /// The one bucket, empty when the server started.
    fn bucket(&self) -> &str;
    /// What the server printed so far.
    fn log(&self) -> String;
    /// Kills the server and waits for it; idempotent.
    fn stop(&mut self);
    /// The S3 endpoints of its nodes (one for a single-process server).
    fn node_endpoints(&self) -> Vec<String> {
        vec![self.endpoint().to_owned()]
    }
    /// `kill -9` of one node; the whole server when it has one.
    fn kill_node(&mut self, _node: usize) {
        self.stop();
    }
    /// Starts a killed node again on its ports and data.
    fn restart_node(&mut self, node: usize) -> Result<()> {
        bail!("this S3 server cannot restart node {node}")
    }
}

/// A running S3-compatible server with one empty bucket and one access
/// key; stopped on drop.
pub struct S3Server {
    server: Box<dyn Implementation>,
    root: tempfile::TempDir,
}

impl S3Server {
    /// Starts a server, or returns `None` (after saying so loudly, naming
    /// `test`) when none is installed and `KILN_REQUIRE_S3` is unset.
    /// Panics when one is installed but does not start.
    pub fn start(test: &str) -> Option<S3Server> {
        let Some(binary) = s3s_binary() else {
            skip_or_fail(test, "s3s-fs", INSTALL);
            return None;
        };
        let root = tempfile::tempdir().expect("a temporary directory for the S3 server");
        let server = S3sFs::start(&binary, root.path()).unwrap_or_else(|e| panic!("{e:#}"));
        Some(S3Server {
            server: Box::new(server),
            root,
        })
    }

    /// Starts a three-node Garage cluster (a distributed store: every object
    /// on all three nodes, reads and writes need two), or `None` like
    /// [`S3Server::start`].
    pub fn start_garage(test: &str) -> Option<S3Server> {
        let Some(binary) = crate::garage::garage_binary() else {
            skip_or_fail(test, "garage", crate::garage::INSTALL);
            return None;
        };
        let root = tempfile::tempdir().expect("a temporary directory for the S3 server");
        // Three processes with two ports each: on a busy machine one of
        // them may lose its port before it binds; a fresh cluster on fresh
        // ports then starts.
        let mut attempt = 0;
        let server = loop {
            attempt += 1;
            let dir = root.path().join(format!("attempt-{attempt}"));
            match crate::garage::Garage::start(&binary, &dir, 3) {
                Ok(server) => break server,
                Err(e) if attempt < 3 => eprintln!("garage did not start, trying again: {e:#}"),
                Err(e) => panic!("{e:#}"),
            }
        };
        Some(S3Server {
            server: Box::new(server),
            root,
        })
    }

    /// How many nodes serve the S3 API (each has its own endpoint).
    pub fn nodes(&self) -> usize {
        self.server.node_endpoints().len()
    }

    /// The S3 endpoint of node `node`.
    pub fn node_endpoint(&self, node: usize) -> String {
        self.server.node_endpoints()[node].clone()
    }

    /// `kill -9` of one storage node (of the whole server when it has one).
    pub fn kill_node(&mut self, node: usize) {
        self.server.kill_node(node);
    }

    /// Starts a killed storage node again.
    pub fn restart_node(&mut self, node: usize) -> Result<()> {
        self.server.restart_node(node)
    }

    /// `http://127.0.0.1:PORT` of the S3 API.
    pub fn endpoint(&self) -> &str {
        self.server.endpoint()
    }

    pub fn region(&self) -> &str {
        self.server.region()
    }

    pub fn access_key(&self) -> &str {
        self.server.access_key()
    }

    pub fn secret_key(&self) -> &str {
        self.server.secret_key()
    }

    /// The name of the (one) bucket.
    pub fn bucket_name(&self) -> &str {
        self.server.bucket()
    }

    /// The server's scratch directory (its data and log), removed on drop.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What the server printed so far.
    pub fn log(&self) -> String {
        self.server.log()
    }

    /// Kills the server (the bucket becomes unreachable; its data stays
    /// until drop).
    pub fn stop(&mut self) {
        self.server.stop();
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        // Before `root` goes: the process first, then its files.
        self.server.stop();
        if std::thread::panicking() {
            // Its errors only: a 500 a replica logged says no more than that.
            let log = self.log();
            let errors: Vec<&str> = log
                .lines()
                .filter(|l| l.to_ascii_lowercase().contains("error"))
                .collect();
            let shown = &errors[errors.len().saturating_sub(20)..];
            if !shown.is_empty() {
                eprintln!(
                    "---- S3 server {} errors (last {} of {}) ----\n{}",
                    self.endpoint(),
                    shown.len(),
                    errors.len(),
                    shown.join("\n")
                );
            }
        }
    }
}

/// Without a server: a loud skip message on stderr, or a panic when
/// `KILN_REQUIRE_S3` is set.
fn skip_or_fail(test: &str, product: &str, install: &str) {
    if std::env::var_os("KILN_REQUIRE_S3").is_some() {
        panic!("KILN_REQUIRE_S3 is set but {product} is not installed; run: {install}");
    }
    // Straight to the stderr handle, past the test harness's output
    // capture: a skip must be seen in a normal `cargo test` run.
    let _ = std::io::Write::write_all(
        &mut std::io::stderr(),
        format!(
            "\n!!!!! SKIPPED {test}: no S3-compatible server ({product}) installed.\n\
             !!!!! Install it with: {install}\n\
             !!!!! (set KILN_REQUIRE_S3=1 to make this a failure)\n"
        )
        .as_bytes(),
    );
}

/// s3s-fs: one process serving the directories under `ROOT/data` as
/// buckets. It picks its port itself (`--port 0`) and prints the address.
struct S3sFs {
    child: Option<Child>,
    endpoint: String,
    log: PathBuf,
}

impl S3sFs {
    fn start(binary: &Path, root: &Path) -> Result<S3sFs> {
        let data = root.join("data");
        // s3s-fs maps a bucket to a directory under its root.
        fs::create_dir_all(data.join(BUCKET))?;
        let log = root.join("s3s-fs.log");
        let child = Command::new(binary)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut server = S3sFs {
            child: Some(child),
            endpoint: String::new(),
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            let text = server.log();
            if let Some(port) = text
                .split("http://127.0.0.1:")
                .nth(1)
                .map(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .filter(|p| !p.is_empty())
            {
                server.endpoint = format!("http://127.0.0.1:{port}");
                return Ok(server);
            }
            if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!("s3s-fs exited early ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                bail!("s3s-fs did not start within {START_TIMEOUT:?}:\n{text}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Implementation for S3sFs {
    fn endpoint(&self) -> &str {
        &self.endpoint
    }

    fn region(&self) -> &str {
        REGION
    }

    fn access_key(&self) -> &str {
        ACCESS_KEY
    }

    fn secret_key(&self) -> &str {
        SECRET_KEY
    }

    fn bucket(&self) -> &str {
        BUCKET
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for S3sFs {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A `kiln-cache-server` replica on the test bucket (`--storage
/// s3://BUCKET/prefix`) with its local index in a temporary directory, on a
/// port it picks itself, started by [`crate::cache_server::Launch`];
/// SIGKILLed on drop, its log printed when the test panics.
pub struct Replica {
    process: ServerProcess,
    /// `http://127.0.0.1:PORT`
    pub url: String,
    /// Its `--data` (local index cache), port file and log.
    pub data: tempfile::TempDir,
}

impl Replica {
    /// Starts the workspace's `kiln-cache-server` (found with
    /// [`crate::kiln_bin`]) as a replica on `s3`'s bucket under `prefix`,
    /// with GC off (`--gc-interval 0`) plus `extra` flags.
    pub fn start(s3: &S3Server, prefix: &str, extra: &[&str]) -> Replica {
        Self::start_with(&crate::kiln_bin("kiln-cache-server"), s3, prefix, extra)
    }

    /// [`Replica::start`] with the server binary at `binary`.
    pub fn start_with(binary: &Path, s3: &S3Server, prefix: &str, extra: &[&str]) -> Replica {
        Self::spawn(binary, s3, &s3.node_endpoint(0), prefix, extra)
    }

    /// [`Replica::start`] talking to storage node `node` of a multi-node
    /// server (each node serves the whole bucket).
    pub fn start_on(s3: &S3Server, node: usize, prefix: &str, extra: &[&str]) -> Replica {
        let binary = crate::kiln_bin("kiln-cache-server");
        Self::spawn(&binary, s3, &s3.node_endpoint(node), prefix, extra)
    }

    fn spawn(
        binary: &Path,
        s3: &S3Server,
        endpoint: &str,
        prefix: &str,
        extra: &[&str],
    ) -> Replica {
        let storage = format!("s3://{}/{prefix}", s3.bucket_name());
        Self::launch(binary, &storage, extra, |command| {
            command
                .args(["--s3-endpoint", endpoint, "--s3-region", s3.region()])
                .env("AWS_ACCESS_KEY_ID", s3.access_key())
                .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
                .env_remove("AWS_SESSION_TOKEN")
                .env_remove("AWS_PROFILE")
                .env_remove("AWS_ENDPOINT_URL");
        })
    }

    /// Starts `binary` with `--storage storage` and GC off, its local index,
    /// port file and log in a new temporary directory, after `connect` added
    /// the store's own flags and environment, then `extra`; waits until it
    /// listens. Shared by the replicas of every store the tests run.
    pub(crate) fn launch(
        binary: &Path,
        storage: &str,
        extra: &[&str],
        connect: impl FnOnce(&mut Command),
    ) -> Replica {
        let data = tempfile::tempdir().expect("a temporary directory for the replica");
        let mut launch = Launch::binary(data.path(), binary, 0)
            .args(["--gc-interval", "0", "--data"])
            .args([data.path().join("data")])
            .args(["--storage", storage]);
        connect(launch.command());
        let process = launch.args(extra).start();
        Replica {
            url: process.url.clone(),
            process,
            data,
        }
    }

    /// What the replica logged so far.
    pub fn log_text(&self) -> String {
        self.process.log_text()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// GET a path; returns status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        self.process.get(path)
    }

    /// The sum of the Prometheus samples named `sample` (`name{labels}` as
    /// printed) on `/metrics`; 0 when absent or when the replica does not
    /// answer.
    pub fn metric(&self, sample: &str) -> f64 {
        self.process.metric(sample)
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        self.process.kill9();
    }
}
