//! Helpers for the executor's runtime behaviour tests (`kaniko_runtime.rs`):
//! a throwaway root to run the real executor in, so that in-place isolation
//! never touches the machine's own `/`.
//!
//! [`ThrowawayRoot`] is a scratch directory with the executor binary (and
//! the shared libraries `ldd` names) copied in at `/kiln/kiln-executor`;
//! [`ThrowawayRoot::command`] runs it there through `unshare -m -p -f
//! --mount-proc` and `chroot`, with an empty environment besides what the
//! test sets, optionally with `CAP_SYS_ADMIN` dropped from the bounding
//! set (`setpriv`), which is what denies a Kubernetes pod without that
//! capability its namespaces and mounts.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{kiln_bin, run};

/// Copies `binary` and the shared libraries `ldd` names into `root`, the
/// binary at `dest`.
pub fn install_with_libraries(binary: &Path, root: &Path, dest: &str) {
    let target = root.join(dest.trim_start_matches('/'));
    fs::create_dir_all(target.parent().expect("a destination directory")).expect("mkdir");
    fs::copy(binary, &target).expect("copying the binary");
    let ldd = run(Command::new("ldd").arg(binary)).unwrap_or_default();
    for line in ldd.lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        if let Some(lib) = path {
            let to = root.join(lib.trim_start_matches('/'));
            fs::create_dir_all(to.parent().expect("a library directory")).expect("mkdir");
            fs::copy(&lib, &to).expect("copying a library");
        }
    }
}

/// See the module documentation. The directory goes on drop.
pub struct ThrowawayRoot {
    dir: tempfile::TempDir,
}

impl ThrowawayRoot {
    /// A root holding `/kiln/kiln-executor` and an empty `/proc`.
    pub fn new() -> Self {
        let dir = tempfile::tempdir().expect("a temporary directory");
        let root = dir.path().join("root");
        install_with_libraries(&kiln_bin("kiln-executor"), &root, "/kiln/kiln-executor");
        fs::create_dir_all(root.join("proc")).expect("mkdir /proc");
        ThrowawayRoot { dir }
    }

    /// The root's path on the host.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("root")
    }

    /// The executor with `args`, run as PID 1's child of a new PID and mount
    /// namespace chrooted into the root; without `CAP_SYS_ADMIN` when
    /// `deny_namespaces`. `env` is the whole environment (plus `PATH=/bin`).
    pub fn command(&self, deny_namespaces: bool, env: &[(&str, &str)], args: &[&str]) -> Command {
        let root = self.path();
        let mut cmd = Command::new("unshare");
        cmd.args(["-m", "-p", "-f", "--kill-child"])
            .arg(format!("--mount-proc={}", root.join("proc").display()));
        if deny_namespaces {
            // Dropped from the bounding set, the capability is gone from
            // every process exec'd below, root's included.
            cmd.args(["setpriv", "--bounding-set", "-sys_admin", "--"]);
        }
        cmd.arg("/usr/sbin/chroot")
            .arg(&root)
            .arg("/kiln/kiln-executor")
            .args(args)
            .env_clear()
            .env("PATH", "/bin");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd
    }
}

impl Default for ThrowawayRoot {
    fn default() -> Self {
        Self::new()
    }
}
