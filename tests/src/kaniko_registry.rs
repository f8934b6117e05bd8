//! Helpers for the Kaniko-compatibility tests of the registry client
//! (`tests/tests/kaniko_registry.rs`): a Distribution registry that requires
//! client certificates ([`MtlsRegistry`]), Docker `config.json` files and
//! credential helpers written as Docker writes them, and a way to run a
//! command with a directory mounted at the real `/kaniko` path in a
//! private mount namespace ([`KanikoMount`]), so the executor reads
//! `/kaniko/.docker/config.json` itself rather than a test-only path.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::{make_client_certificate, make_test_certificates, service_port};

/// A Distribution registry over TLS that refuses clients without a
/// certificate signed by its CA (`http.tls.clientcas`); no other auth.
pub struct MtlsRegistry {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl MtlsRegistry {
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        make_test_certificates(dir.path())?;
        make_client_certificate(dir.path())?;
        let port = service_port();
        let data = dir.path().join("data");
        std::fs::create_dir(&data)?;
        let config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n  tls:\n    certificate: {}\n    key: {}\n    clientcas:\n      - {}\n",
            data.display(),
            dir.path().join("server.pem").display(),
            dir.path().join("server.key").display(),
            dir.path().join("ca.pem").display(),
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
        let reg = MtlsRegistry { child, port, dir };
        let deadline = Instant::now() + Duration::from_secs(15);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            if Instant::now() > deadline {
                bail!("mTLS registry did not listen: {}", reg.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(reg)
    }

    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The CA that signed both the server's and the client's certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// `(client.pem, client.key)`
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        (
            self.dir.path().join("client.pem"),
            self.dir.path().join("client.key"),
        )
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }
}

impl Drop for MtlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
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

/// Writes an executable `dir/docker-credential-<name>` that, for `get`,
/// appends the server read from stdin to `dir/<name>.log` and answers with
/// `user`/`secret` as Docker's helpers do.
pub fn write_credential_helper(
    dir: &Path,
    name: &str,
    user: &str,
    secret: &str,
) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let log = dir.join(format!("{name}.log"));
    let path = dir.join(format!("docker-credential-{name}"));
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\n[ \"$1\" = get ] || exit 1\nread server\necho \"$server\" >> '{}'\nprintf '{{\"ServerURL\":\"%s\",\"Username\":\"{user}\",\"Secret\":\"{secret}\"}}\\n' \"$server\"\n",
            log.display()
        ),
    )?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755))?;
    Ok(path)
}

/// Mounts a directory at `/kaniko` for commands run through
/// [`KanikoMount::command`], in their own private mount namespace
/// (`unshare -m`), so nothing is mounted on the host. The empty `/kaniko`
/// mount point is made if the host has none, and removed again on drop.
pub struct KanikoMount {
    source: PathBuf,
    made_mount_point: bool,
}

impl KanikoMount {
    pub fn new(source: &Path) -> Result<Self> {
        let mount_point = Path::new("/kaniko");
        let made_mount_point = !mount_point.exists();
        if made_mount_point {
            std::fs::create_dir(mount_point).context("creating the /kaniko mount point")?;
        }
        Ok(KanikoMount {
            source: source.to_path_buf(),
            made_mount_point,
        })
    }

    /// `program args...` run with the source directory at `/kaniko`.
    pub fn command(&self, program: &Path) -> Command {
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "--propagation", "private", "sh", "-c"])
            .arg("mount --bind \"$0\" /kaniko && exec \"$@\"")
            .arg(&self.source)
            .arg(program);
        cmd
    }
}

impl Drop for KanikoMount {
    fn drop(&mut self) {
        if self.made_mount_point {
            // Only the empty directory made above; never anything in it.
            let _ = std::fs::remove_dir("/kaniko");
        }
    }
}
