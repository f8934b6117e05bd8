//! Helpers for the Kaniko-compatibility tests of the registry client
//! (`tests/tests/e2e/kaniko_registry.rs`): a Distribution registry that requires
//! client certificates ([`MtlsRegistry`]), Docker `config.json` files and
//! credential helpers written as Docker writes them, and a way to run a
//! command with a directory mounted at the real `/kaniko` path in a
//! private mount namespace ([`KanikoMount`]), so the executor reads
//! `/kaniko/.docker/config.json` itself rather than a test-only path.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, Result};

use crate::{Registry, RegistryAuth};

/// A Distribution registry over TLS that refuses clients without a
/// certificate signed by its CA (`http.tls.clientcas`); no other auth. The
/// harness's one registry launcher ([`Registry::start_mtls`]) under the
/// names these tests use.
pub struct MtlsRegistry {
    registry: Registry,
}

impl MtlsRegistry {
    pub fn start() -> Result<Self> {
        Ok(MtlsRegistry {
            registry: Registry::start_mtls(RegistryAuth::None)?,
        })
    }

    pub fn host(&self) -> String {
        self.registry.host()
    }

    /// The CA that signed both the server's and the client's certificate.
    pub fn ca(&self) -> PathBuf {
        self.registry.ca_certificate()
    }

    /// `(client.pem, client.key)`
    pub fn client_identity(&self) -> (PathBuf, PathBuf) {
        self.registry.client_identity()
    }

    pub fn log(&self) -> String {
        self.registry.log()
    }
}

// Docker `config.json` files are written by the harness's one writer.
pub use crate::{basic_auth_field, write_docker_config};

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
