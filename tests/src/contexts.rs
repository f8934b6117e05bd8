//! Build-context sources for the context tests (`tests/tests/e2e/kaniko_contexts.rs`):
//! context archives made in memory, a local git repository made with the
//! `git` CLI and served by `git daemon` on a probed 127.0.0.1 port, and the
//! files of an image kiln wrote as an OCI layout. The daemon is killed
//! when its guard drops.

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// A `.tar.gz` (or plain `.tar`) of `(path, content)` files.
pub fn context_archive(files: &[(&str, &str)], gzip: bool) -> Vec<u8> {
    let mut builder = tar::Builder::new(Vec::new());
    for (path, content) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(content.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mtime(1_700_000_000);
        header.set_uid(0);
        header.set_gid(0);
        builder
            .append_data(&mut header, path, content.as_bytes())
            .expect("appending to an in-memory tar");
    }
    let tar = builder.into_inner().expect("finishing an in-memory tar");
    if !gzip {
        return tar;
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &tar).expect("compressing in memory");
    gz.finish().expect("compressing in memory")
}

/// Runs `git` with a fixed identity and no user or system configuration.
pub fn git(dir: &Path, args: &[&str]) -> Result<String> {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("GIT_AUTHOR_NAME", "kiln")
        .env("GIT_AUTHOR_EMAIL", "kiln@example.invalid")
        .env("GIT_COMMITTER_NAME", "kiln")
        .env("GIT_COMMITTER_EMAIL", "kiln@example.invalid")
        .output()
        .with_context(|| format!("running git {args:?}"))?;
    if !out.status.success() {
        bail!(
            "git {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// `git daemon` exporting every repository below its base path on a
/// probed 127.0.0.1 port; killed on drop.
pub struct GitDaemon {
    child: Option<Child>,
    port: u16,
}

impl GitDaemon {
    pub fn start(base: &Path) -> Result<GitDaemon> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let port = crate::service_port();
            let child = Command::new("git")
                .arg("daemon")
                .arg(format!("--base-path={}", base.display()))
                .args(["--export-all", "--reuseaddr", "--listen=127.0.0.1"])
                .arg(format!("--port={port}"))
                .arg(base)
                .env("GIT_CONFIG_NOSYSTEM", "1")
                .env("GIT_CONFIG_GLOBAL", "/dev/null")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting git daemon")?;
            let mut daemon = GitDaemon {
                child: Some(child),
                port,
            };
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Ok(daemon);
                }
                let exited = daemon
                    .child
                    .as_mut()
                    .and_then(|c| c.try_wait().ok().flatten());
                if exited.is_some() || Instant::now() > deadline {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            if attempt == 3 {
                bail!("git daemon did not listen on 127.0.0.1:{port}");
            }
        }
    }

    /// `127.0.0.1:PORT`
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for GitDaemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The regular files of the image in an OCI layout (its only manifest),
/// all layers applied in order: path (without a leading `/`) to content.
pub fn layout_files(layout: &Path) -> Result<BTreeMap<String, String>> {
    let blob = |digest: &str| -> PathBuf {
        layout
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value = serde_json::from_slice(&fs::read(layout.join("index.json"))?)?;
    let manifest_digest = index["manifests"][0]["digest"]
        .as_str()
        .context("index.json has no manifest")?;
    let manifest: serde_json::Value = serde_json::from_slice(&fs::read(blob(manifest_digest))?)?;
    let mut files = BTreeMap::new();
    for layer in manifest["layers"]
        .as_array()
        .context("manifest without layers")?
    {
        let digest = layer["digest"].as_str().context("layer without digest")?;
        let file = fs::File::open(blob(digest))?;
        let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(file));
        for entry in archive.entries()? {
            let mut entry = entry?;
            if entry.header().entry_type() != tar::EntryType::Regular {
                continue;
            }
            let path = entry
                .path()?
                .to_string_lossy()
                .trim_start_matches("./")
                .to_owned();
            let mut content = String::new();
            entry.read_to_string(&mut content)?;
            files.insert(path, content);
        }
    }
    Ok(files)
}
