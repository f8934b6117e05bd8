//! Key text of what the driver resolves or is told before keys are made:
//! layer options, a RUN step's security, base images, downloads and git
//! checkouts, and how several sources combine into one input.
//!
//! Promises: each text is written here from typed fields, with literals for
//! names. Where the first key scheme printed a value with `Debug` (the
//! compression and `SOURCE_DATE_EPOCH`) or `Display` (platforms, digests),
//! the same characters are now spelled out, so renaming a variant or
//! changing a `Display` impl cannot move a key.

use kiln_common::{CacheKey, Digest};

use super::SourceIdentity;
use crate::build::layer::Compression;
use crate::build::runner::security::{Seccomp, StepSecurity};
use crate::oci::Platform;

/// The executor options that change a filesystem step's layer bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LayerKeyOptions {
    pub compression: Compression,
    pub reproducible: bool,
    pub source_date_epoch: Option<u64>,
    /// `--single-snapshot`: a stage's one layer holds the whole stage.
    pub single_snapshot: bool,
    /// `--force-build-metadata`: a layer even where a step changed nothing.
    pub force_build_metadata: bool,
}

impl LayerKeyOptions {
    /// `Gzip { level: 6 } reproducible=false epoch=None`, then
    /// ` single-snapshot` or ` force-build-metadata` only when on (so that
    /// every other build kept its keys when they were added). The first
    /// part is spelled as `Debug` printed these values in scheme v1.
    pub fn text(&self) -> String {
        let compression = match self.compression {
            Compression::Gzip { level } => format!("Gzip {{ level: {level} }}"),
            Compression::Zstd { level } => format!("Zstd {{ level: {level} }}"),
            Compression::None => "None".to_string(),
        };
        let epoch = match self.source_date_epoch {
            Some(seconds) => format!("Some({seconds})"),
            None => "None".to_string(),
        };
        let mut text = format!(
            "{compression} reproducible={} epoch={epoch}",
            self.reproducible
        );
        // A forced layer may exist where a step records none; a single
        // snapshot holds a whole stage. Forcing wins when both are given.
        if self.force_build_metadata {
            text.push_str(" force-build-metadata");
        } else if self.single_snapshot {
            text.push_str(" single-snapshot");
        }
        text
    }
}

/// A RUN step's non-default security as key text, `None` for the default
/// (so default builds keep their keys): a step that may do more can
/// produce a different filesystem and must never share an entry with one
/// that may not. Capabilities are their kernel bit mask in hex.
pub fn run_security_text(security: &StepSecurity) -> Option<String> {
    if *security == StepSecurity::default() {
        return None;
    }
    let seccomp = match security.seccomp {
        Seccomp::Default => "default",
        Seccomp::Unconfined => "unconfined",
    };
    let mut text = format!(
        "caps={:x};seccomp={seccomp};privileged={}",
        security.capabilities.bits(),
        security.privileged
    );
    if let Some(map) = security.user_namespace {
        text.push_str(&format!(";userns={}", map.size));
    }
    Some(text)
}

/// A base image as the key chain starts from it: its manifest digest
/// (`None` for `scratch`) and the platform the build targets,
/// `os/arch[/variant]` as given (no variant is implied).
pub fn base_identity(manifest: Option<&Digest>, platform: &Platform) -> String {
    let manifest = match manifest {
        Some(digest) => digest_text(digest),
        None => "scratch".to_string(),
    };
    let mut text = format!("{manifest} {}/{}", platform.os, platform.architecture);
    if let Some(variant) = &platform.variant {
        text.push('/');
        text.push_str(variant);
    }
    text
}

/// A downloaded `ADD` source: its URL and the sha256 of its bytes.
pub fn remote_file_identity(url: &str, digest: &Digest) -> String {
    format!("{url} {}", digest_text(digest))
}

/// A git `ADD` source: the URL, the commit it resolved to, the
/// subdirectory (empty for the root) and whether `.git` is kept.
pub fn git_identity(url: &str, commit: &str, subdir: Option<&str>, keep_git_dir: bool) -> String {
    format!(
        "git {url} {commit} {} keep-git-dir={keep_git_dir}",
        subdir.unwrap_or("")
    )
}

fn digest_text(digest: &Digest) -> String {
    format!("sha256:{}", digest.hex())
}

/// An ADD's sources: the digest of its context files (zeros when it has
/// none), then each remote source's identity, in the order written.
pub fn add_sources<S: AsRef<str>>(context_files: [u8; 32], remote: &[S]) -> SourceIdentity {
    let mut hasher = blake3::Hasher::new();
    hasher.update(&context_files);
    for identity in remote {
        hasher.update(identity.as_ref().as_bytes());
    }
    SourceIdentity::Context(*hasher.finalize().as_bytes())
}

/// Where one `RUN --mount=type=bind` reads from.
pub enum BindSource {
    /// The digest of the mounted context files.
    Context([u8; 32]),
    /// The last key of the stage named by `from=`.
    Stage(CacheKey),
    /// The [`base_identity`] of the image named by `from=`.
    Image(String),
}

/// A RUN's bind mounts, in the order written: each mount's `source`
/// (`.` when not given), then what it reads.
pub fn bind_mounts<S: AsRef<str>>(mounts: &[(S, BindSource)]) -> SourceIdentity {
    let mut hasher = blake3::Hasher::new();
    for (source, from) in mounts {
        hasher.update(source.as_ref().as_bytes());
        match from {
            BindSource::Context(digest) => hasher.update(digest),
            BindSource::Stage(key) => hasher.update(key.as_bytes()),
            BindSource::Image(identity) => hasher.update(identity.as_bytes()),
        };
    }
    SourceIdentity::Context(*hasher.finalize().as_bytes())
}
