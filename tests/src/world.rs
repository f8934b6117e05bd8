//! The setup most end-to-end build tests share: a real registry holding the
//! offline busybox base as `library/busybox:latest`, a work directory for
//! contexts and executor state, and one way to run a `kiln-executor` build
//! that writes a report (`tests/tests/e2e/cache.rs`, `cache_repo.rs`,
//! `hostile_cache.rs`).
//!
//! Promises: [`BuildWorld`] cleans up through `Drop` (the registry is killed,
//! the work directory removed); [`executor_build`] never panics on a failed
//! build: it returns the process output and the parsed report, `Null` when
//! the executor wrote none.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Result;

use crate::{Registry, RegistryAuth, kiln_bin, push_busybox};

/// The base image every context's `BASE` stands for.
pub const BUSYBOX: &str = "library/busybox:latest";

/// A registry with busybox pushed as [`BUSYBOX`], and a work directory.
pub struct BuildWorld {
    pub registry: Registry,
    pub work: tempfile::TempDir,
}

impl BuildWorld {
    /// Starts a registry with `auth` and pushes the busybox base to it.
    pub fn start(auth: RegistryAuth) -> Result<BuildWorld> {
        let registry = Registry::start(auth)?;
        let work = tempfile::tempdir()?;
        push_busybox(&registry, work.path(), BUSYBOX, &[])?;
        Ok(BuildWorld { registry, work })
    }

    /// The base image's reference in this registry.
    pub fn base(&self) -> String {
        self.registry.reference(BUSYBOX)
    }

    /// A context `work/name` whose Dockerfile is `dockerfile` with `BASE`
    /// replaced by [`BuildWorld::base`], plus `files` (relative path,
    /// content).
    pub fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).expect("creating the context");
        fs::write(
            dir.join("Dockerfile"),
            dockerfile.replace("BASE", &self.base()),
        )
        .expect("writing the Dockerfile");
        for (rel, content) in files {
            let path = dir.join(rel);
            fs::create_dir_all(path.parent().expect("a file in the context"))
                .expect("creating a context directory");
            fs::write(path, content).expect("writing a context file");
        }
        dir
    }

    /// A state directory (`--cache-dir`) `work/state-name`, fresh until a
    /// build uses it.
    pub fn state(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("state-{name}"))
    }
}

/// One `kiln-executor --context ctx --insecure-registry HOST --reproducible
/// --cache-dir state --report state.report.json` build against `registry`,
/// with `args` after those and `cmd` (environment, say) as `setup` leaves
/// it; returns the output and the parsed report (`Null` when none was
/// written).
pub fn executor_build(
    registry: &Registry,
    ctx: &Path,
    state: &Path,
    args: &[&str],
    setup: impl FnOnce(&mut Command),
) -> (Output, serde_json::Value) {
    let report = state.with_extension("report.json");
    let mut cmd = Command::new(kiln_bin("kiln-executor"));
    cmd.arg("--context")
        .arg(ctx)
        .args(["--insecure-registry", &registry.host()])
        .arg("--reproducible")
        .arg("--cache-dir")
        .arg(state)
        .arg("--report")
        .arg(&report)
        .args(args);
    setup(&mut cmd);
    let out = cmd.output().expect("running kiln-executor");
    let parsed = fs::read(&report)
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or(serde_json::Value::Null);
    (out, parsed)
}
