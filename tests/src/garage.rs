//! A real, distributed S3-compatible store for the replica tests: a
//! [Garage](https://garagehq.deuxfleurs.fr) cluster (the `garage` crate
//! from crates.io) of several nodes on 127.0.0.1, replication factor 3,
//! with one bucket and one access key. Each node has its own S3 endpoint;
//! the cluster keeps answering reads and writes while a quorum (2 of 3) of
//! nodes is up, which is what lets a test kill a storage node in the middle
//! of a build.
//!
//! Tests reach it through [`crate::s3::S3Server::start_garage`]. Garage is
//! found at `$KILN_GARAGE`, `/opt/kiln-tools/bin/garage` or on `PATH`
//! (`scripts/test-all.sh` installs it). Every node is killed on drop.

use std::fs;
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::s3::Implementation;
use crate::{run, service_port};

/// The install command named in skip and failure messages.
pub(crate) const INSTALL: &str = "cargo install --locked garage --version 2.5.0 \
     --no-default-features --features lmdb,bundled-libs --root /opt/kiln-tools";

/// Access key id of the test key (Garage wants `GK` + 24 hex digits).
const GARAGE_KEY_ID: &str = "GK6b696c6e2d746573742d6b6579";
/// Secret of the test key (64 hex digits).
const GARAGE_SECRET: &str = "6b696c6e2d746573742d7365637265742d6b696c6e2d746573742d7365637265";
/// The bucket every test uses.
const GARAGE_BUCKET: &str = "kiln-cache";
/// The region Garage's S3 API answers for.
const GARAGE_REGION: &str = "garage";

/// Where the garage binary is, if it is installed.
pub(crate) fn garage_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_GARAGE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let installed = PathBuf::from("/opt/kiln-tools/bin/garage");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    })
}

struct Node {
    child: Option<Child>,
    /// `<public key>@127.0.0.1:<rpc port>`, known once the node ran.
    id: String,
    config: PathBuf,
    log: PathBuf,
    s3_port: u16,
}

impl Node {
    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running Garage cluster; every node is killed on drop.
pub(crate) struct Garage {
    binary: PathBuf,
    nodes: Vec<Node>,
    endpoints: Vec<String>,
}

impl Garage {
    /// Starts `nodes` nodes (at least 3: replication factor 3) with their
    /// data under `root`, joins them into one layout, imports the test key
    /// and creates the bucket.
    pub(crate) fn start(binary: &Path, root: &Path, nodes: usize) -> Result<Garage> {
        if nodes < 3 {
            bail!("replication factor 3 needs at least 3 nodes, not {nodes}");
        }
        let rpc_secret = random_hex(32)?;
        let mut cluster = Garage {
            binary: binary.to_owned(),
            nodes: Vec::new(),
            endpoints: Vec::new(),
        };
        for index in 0..nodes {
            let node_dir = root.join(format!("node{index}"));
            fs::create_dir_all(&node_dir)?;
            let (rpc_port, s3_port) = (service_port(), service_port());
            let config = node_dir.join("garage.toml");
            fs::write(
                &config,
                format!(
                    "metadata_dir = \"{meta}\"\n\
                     data_dir = \"{data}\"\n\
                     db_engine = \"lmdb\"\n\
                     replication_factor = 3\n\
                     rpc_bind_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_public_addr = \"127.0.0.1:{rpc_port}\"\n\
                     rpc_secret = \"{rpc_secret}\"\n\
                     [s3_api]\n\
                     s3_region = \"{GARAGE_REGION}\"\n\
                     api_bind_addr = \"127.0.0.1:{s3_port}\"\n",
                    meta = node_dir.join("meta").display(),
                    data = node_dir.join("data").display(),
                ),
            )?;
            // Garage refuses a config file with secrets that others can read.
            fs::set_permissions(&config, fs::Permissions::from_mode(0o600))?;
            let log = node_dir.join("garage.log");
            cluster.nodes.push(Node {
                child: None,
                id: String::new(),
                config,
                log,
                s3_port,
            });
            cluster
                .endpoints
                .push(format!("http://127.0.0.1:{s3_port}"));
            cluster.spawn(index)?;
        }
        cluster.form_layout()?;
        Ok(cluster)
    }

    fn spawn(&mut self, index: usize) -> Result<()> {
        let node = &mut self.nodes[index];
        let child = Command::new(&self.binary)
            .arg("-c")
            .arg(&node.config)
            .arg("server")
            .env("RUST_LOG", "garage=info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&node.log)?,
            )
            .spawn()
            .with_context(|| format!("starting {}", self.binary.display()))?;
        node.child = Some(child);
        Ok(())
    }

    /// `garage -c <node 0's config> ARGS`, retried while the daemon starts.
    fn cli(&self, args: &[&str]) -> Result<String> {
        self.cli_on(0, args)
    }

    fn node_id(&self, index: usize) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(&self.binary);
            cmd.arg("-c")
                .arg(&self.nodes[index].config)
                .args(["node", "id", "-q"]);
            match run(&mut cmd) {
                Ok(out) if out.contains('@') => return Ok(out.trim().to_owned()),
                _ if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(200)),
                other => bail!("node {index} has no id: {other:?}\n{}", self.logs()),
            }
        }
    }

    fn form_layout(&mut self) -> Result<()> {
        let ids: Vec<String> = (0..self.nodes.len())
            .map(|i| self.node_id(i))
            .collect::<Result<_>>()?;
        for (node, id) in self.nodes.iter_mut().zip(&ids) {
            node.id = id.clone();
        }
        for id in &ids[1..] {
            self.cli(&["node", "connect", id])?;
        }
        for id in &ids {
            let short = id.split('@').next().unwrap_or(id);
            self.cli(&["layout", "assign", "-z", "dc1", "-c", "1G", short])?;
        }
        self.cli(&["layout", "apply", "--version", "1"])?;
        self.cli(&[
            "key",
            "import",
            "-n",
            "kiln",
            "--yes",
            GARAGE_KEY_ID,
            GARAGE_SECRET,
        ])?;
        self.cli(&["bucket", "create", GARAGE_BUCKET])?;
        self.cli(&[
            "bucket",
            "allow",
            "--read",
            "--write",
            "--owner",
            GARAGE_BUCKET,
            "--key",
            "kiln",
        ])?;
        for index in 0..self.nodes.len() {
            self.wait_for_s3(index)?;
        }
        Ok(())
    }

    /// `garage -c <node's config> ARGS` until it succeeds (the layout and
    /// the bucket take a moment to reach every node).
    fn cli_on(&self, index: usize, args: &[&str]) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let mut cmd = Command::new(&self.binary);
            cmd.arg("-c").arg(&self.nodes[index].config).args(args);
            match run(&mut cmd) {
                Ok(out) => return Ok(out),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(200))
                }
                Err(e) => return Err(e.context(self.logs())),
            }
        }
    }

    /// Waits until node `index` knows the bucket and its S3 endpoint
    /// answers HTTP.
    fn wait_for_s3(&self, index: usize) -> Result<()> {
        self.cli_on(index, &["bucket", "info", GARAGE_BUCKET])?;
        self.wait_for_http(index)
    }

    fn wait_for_http(&self, index: usize) -> Result<()> {
        let port = self.nodes[index].s3_port;
        let deadline = Instant::now() + Duration::from_secs(30);
        while crate::http_get(port, "/").is_err() {
            if Instant::now() > deadline {
                bail!(
                    "garage node {index}'s S3 API does not answer\n{}",
                    self.logs()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(())
    }

    /// Everything the nodes logged, for failure messages.
    fn logs(&self) -> String {
        self.nodes
            .iter()
            .enumerate()
            .map(|(i, n)| {
                format!(
                    "---- garage node {i} ----\n{}",
                    fs::read_to_string(&n.log).unwrap_or_default()
                )
            })
            .collect()
    }
}

impl Implementation for Garage {
    fn endpoint(&self) -> &str {
        &self.endpoints[0]
    }

    fn region(&self) -> &str {
        GARAGE_REGION
    }

    fn access_key(&self) -> &str {
        GARAGE_KEY_ID
    }

    fn secret_key(&self) -> &str {
        GARAGE_SECRET
    }

    fn bucket(&self) -> &str {
        GARAGE_BUCKET
    }

    fn log(&self) -> String {
        self.logs()
    }

    fn stop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
        }
    }

    fn node_endpoints(&self) -> Vec<String> {
        self.endpoints.clone()
    }

    fn kill_node(&mut self, node: usize) {
        self.nodes[node].kill();
    }

    /// Returns once the node's S3 port answers; it may need a moment more
    /// to rejoin the cluster (callers poll for what they need).
    fn restart_node(&mut self, node: usize) -> Result<()> {
        self.nodes[node].kill();
        self.spawn(node)?;
        self.wait_for_http(node)?;
        // Without this the others find it again at their next peering
        // round, tens of seconds later.
        let id = self.nodes[node].id.clone();
        let other = if node == 0 { 1 } else { 0 };
        self.cli_on(other, &["node", "connect", &id]).map(drop)
    }
}

impl Drop for Garage {
    fn drop(&mut self) {
        self.stop();
    }
}

fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    fs::File::open("/dev/urandom")?.read_exact(&mut buf)?;
    Ok(hex::encode(buf))
}
