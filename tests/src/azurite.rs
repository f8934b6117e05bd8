//! Azure Blob Storage for tests: [`Azurite`], Microsoft's storage emulator
//! (installed from npm, see docs/object-storage.md), on a free 127.0.0.1
//! port with one empty container, and [`AzureReplica`]s of
//! `kiln-cache-server` on it (`--storage az://container/prefix`).
//!
//! Azurite serves the well-known development account `devstoreaccount1`
//! (name and key are public, [`ACCOUNT`] and [`ACCOUNT_KEY`]) path-style:
//! `http://127.0.0.1:PORT/devstoreaccount1/<container>/<blob>`. Neither
//! Azurite nor object_store creates containers on their own, so
//! [`Azurite::start`] creates the container with one Shared Key-signed
//! `Create Container` request, made by `node` (which runs Azurite anyway)
//! with its built-in HMAC.
//!
//! Without Azurite, [`Azurite::start`] says so loudly and returns `None`
//! (the test then passes as skipped), unless `KILN_REQUIRE_S3` is set (CI
//! sets it after installing), in which case it panics. The process is
//! killed and its directory removed when the guard drops, also when the
//! test fails.

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::s3::Replica;

/// Azurite's development account.
pub const ACCOUNT: &str = "devstoreaccount1";
/// The development account's key, published in Azurite's documentation.
pub const ACCOUNT_KEY: &str =
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==";
/// The container [`Azurite::start`] creates (empty).
pub const CONTAINER: &str = "kiln-cache";

/// How long Azurite or a replica may take to come up on a loaded machine.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The install command named in skip and failure messages.
const INSTALL: &str = "npm install -g --prefix /opt/kiln-tools/azurite azurite@3.37.0";

/// `Create Container`, signed with Shared Key
/// (<https://learn.microsoft.com/en-us/rest/api/storageservices/authorize-with-shared-key>).
/// Arguments: port, account, key, container. Exit 0 when created.
const CREATE_CONTAINER_JS: &str = r#"
const http = require("http"), crypto = require("crypto");
const [port, account, key, container] = process.argv.slice(1);
const date = new Date().toUTCString(), version = "2021-08-06";
const path = `/${account}/${container}`;
const toSign = ["PUT", "", "", "", "", "", "", "", "", "", "", "",
  `x-ms-date:${date}`, `x-ms-version:${version}`,
  `/${account}${path}\nrestype:container`].join("\n");
const sig = crypto.createHmac("sha256", Buffer.from(key, "base64"))
  .update(toSign, "utf8").digest("base64");
const req = http.request({ host: "127.0.0.1", port, method: "PUT",
  path: `${path}?restype=container`,
  headers: { "x-ms-date": date, "x-ms-version": version, "Content-Length": 0,
    Authorization: `SharedKey ${account}:${sig}` } }, (res) => {
  let body = "";
  res.on("data", (d) => body += d);
  res.on("end", () => {
    if (res.statusCode === 201) process.exit(0);
    console.error(`${res.statusCode} ${body}`);
    process.exit(1);
  });
});
req.on("error", (e) => { console.error(e.message); process.exit(1); });
req.end();
"#;

/// Where Azurite's blob service is: `$KILN_AZURITE`,
/// `/opt/kiln-tools/azurite/bin/azurite-blob`, or `azurite-blob` on PATH.
pub fn azurite_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_AZURITE") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let installed = PathBuf::from("/opt/kiln-tools/azurite/bin/azurite-blob");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("azurite-blob"))
            .find(|p| p.is_file())
    })
}

/// A running Azurite blob service with one empty container; stopped on
/// drop.
pub struct Azurite {
    child: Option<Child>,
    port: u16,
    /// Azurite's workspace (`--location`) and log.
    root: tempfile::TempDir,
}

impl Azurite {
    /// Starts Azurite and creates [`CONTAINER`], or returns `None` (after
    /// saying so loudly, naming `test`) when it is not installed and
    /// `KILN_REQUIRE_S3` is unset. Panics when it is installed but does
    /// not start.
    pub fn start(test: &str) -> Option<Azurite> {
        let Some(binary) = azurite_binary() else {
            if std::env::var_os("KILN_REQUIRE_S3").is_some() {
                panic!("KILN_REQUIRE_S3 is set but Azurite is not installed; run: {INSTALL}");
            }
            // Straight to the stderr handle, past the test harness's
            // output capture: a skip must be seen in a normal run.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "\n!!!!! SKIPPED {test}: no Azure Storage emulator (Azurite) installed.\n\
                     !!!!! Install it with: {INSTALL}\n\
                     !!!!! (set KILN_REQUIRE_S3=1 to make this a failure)\n"
                )
                .as_bytes(),
            );
            return None;
        };
        Some(Self::start_with(&binary).unwrap_or_else(|e| panic!("{e:#}")))
    }

    fn start_with(binary: &Path) -> Result<Azurite> {
        let root = tempfile::tempdir().context("a temporary directory for Azurite")?;
        let port = crate::service_port();
        let log = root.path().join("azurite.log");
        let child = Command::new(binary)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(root.path().join("data"))
            // Recent object_store API versions, headers Azurite does not
            // know, and no telemetry (there is no network to send it to).
            .args(["--skipApiVersionCheck", "--loose", "--disableTelemetry"])
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log)?)
            .stderr(fs::File::create(root.path().join("azurite.err"))?)
            .spawn()
            .with_context(|| format!("starting {}", binary.display()))?;
        let mut azurite = Azurite {
            child: Some(child),
            port,
            root,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            if let Some(status) = azurite.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                bail!("Azurite exited early ({status}):\n{}", azurite.log());
            }
            if Instant::now() > deadline {
                bail!(
                    "Azurite did not listen within {START_TIMEOUT:?}:\n{}",
                    azurite.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let created = Command::new("node")
            .args(["-e", CREATE_CONTAINER_JS])
            .args([&port.to_string(), ACCOUNT, ACCOUNT_KEY, CONTAINER])
            .stdin(Stdio::null())
            .output()
            .context("running node to create the container")?;
        if !created.status.success() {
            bail!(
                "creating container {CONTAINER} on Azurite failed: {}\n{}",
                String::from_utf8_lossy(&created.stderr),
                azurite.log()
            );
        }
        Ok(azurite)
    }

    /// `http://127.0.0.1:PORT`: what `AZURITE_BLOB_STORAGE_URL` takes.
    pub fn blob_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `http://127.0.0.1:PORT/devstoreaccount1`: the account's URL, what
    /// `--storage-endpoint` (or `AZURE_STORAGE_ENDPOINT`) takes.
    pub fn account_url(&self) -> String {
        format!("{}/{ACCOUNT}", self.blob_url())
    }

    /// The name of the (one) container.
    pub fn container(&self) -> &str {
        CONTAINER
    }

    /// Azurite's workspace, removed on drop.
    pub fn root(&self) -> &Path {
        self.root.path()
    }

    /// What Azurite printed so far (stdout, then stderr).
    pub fn log(&self) -> String {
        let read = |name| fs::read_to_string(self.root.path().join(name)).unwrap_or_default();
        format!("{}{}", read("azurite.log"), read("azurite.err"))
    }

    /// Kills Azurite and waits for it; idempotent.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!("---- Azurite {} log ----\n{}", self.blob_url(), self.log());
        }
    }
}

/// How a replica finds Azurite: both are what object_store offers, and a
/// deployment uses the second form (an account URL) for any Azure-compatible
/// endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connect {
    /// `AZURE_STORAGE_USE_EMULATOR=true` and `AZURITE_BLOB_STORAGE_URL`
    /// (object_store then uses the development account and key itself).
    Emulator,
    /// `--storage-endpoint <account URL>` with `AZURE_STORAGE_ACCOUNT_NAME`
    /// and `AZURE_STORAGE_ACCOUNT_KEY`, as for any Azure account.
    AccountUrl,
}

/// A `kiln-cache-server` replica on Azurite's container (`--storage
/// az://CONTAINER/prefix`): the same [`Replica`] as on S3 servers, started
/// with Azure's settings.
pub type AzureReplica = Replica;

impl Replica {
    /// Starts the workspace's `kiln-cache-server` (found with
    /// [`crate::kiln_bin`]) as a replica on `azurite`'s container under
    /// `prefix`, connected as `how` says, with GC off (`--gc-interval 0`)
    /// plus `extra` flags.
    pub fn start_azure(azurite: &Azurite, how: Connect, prefix: &str, extra: &[&str]) -> Replica {
        let binary = crate::kiln_bin("kiln-cache-server");
        let storage = format!("az://{}/{prefix}", azurite.container());
        Replica::launch(&binary, &storage, extra, |command| {
            // Only what this replica is given: nothing from the test's own
            // environment.
            for (name, _) in std::env::vars_os() {
                if name.to_string_lossy().starts_with("AZURE") {
                    command.env_remove(name);
                }
            }
            match how {
                Connect::Emulator => command
                    .env("AZURE_STORAGE_USE_EMULATOR", "true")
                    .env("AZURITE_BLOB_STORAGE_URL", azurite.blob_url()),
                Connect::AccountUrl => command
                    .args(["--storage-endpoint", &azurite.account_url()])
                    .env("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT)
                    .env("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY),
            };
            command.env("NO_COLOR", "1");
        })
    }
}
