//! The executor's command line (clap derive). Flag names follow Kaniko's
//! where Kaniko has the same option so CI jobs can switch by renaming the
//! binary; Kaniko-style booleans accept `--flag`, `--flag=true` and
//! `--flag=false`. This module only defines and converts flags; the work is
//! done by the library modules they are handed to.

use crate::plan::PlanOptions;
use clap::{ArgAction, Parser, ValueEnum};
use std::path::PathBuf;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Compression {
    Gzip,
    Zstd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Isolation {
    /// New namespaces and pivot_root into the rootfs.
    Chroot,
    /// Run in place in the executor's own container, as Kaniko does.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SnapshotterKind {
    Overlay,
    Walk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CacheMode {
    /// Look up and upload.
    ReadWrite,
    /// Look up only (e.g. untrusted branches).
    ReadOnly,
    /// Upload only, never reuse.
    WriteOnly,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum NetworkMode {
    Default,
    None,
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Verbosity {
    Panic,
    Fatal,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

/// A `--flag` / `--flag=true|false` boolean, as Go's pflag parses it.
macro_rules! kaniko_bool {
    () => {
        ArgAction::Set
    };
}

#[derive(Debug, Clone, Parser)]
#[command(
    name = "kiln-executor",
    version,
    about = "Builds OCI images from Dockerfiles without a Docker daemon"
)]
pub struct ExecutorArgs {
    /// Build context directory.
    #[arg(short = 'c', long, default_value = ".")]
    pub context: PathBuf,
    /// Dockerfile path (default: <context>/Dockerfile; a relative path not
    /// found from the working directory is looked up in the context).
    #[arg(short = 'f', long)]
    pub dockerfile: Option<PathBuf>,
    /// Image reference to push to (repeatable).
    #[arg(short = 'd', long)]
    pub destination: Vec<String>,
    /// Build argument `K=V`, or `K` to take the value from the environment.
    #[arg(long = "build-arg", value_name = "K=V")]
    pub build_arg: Vec<String>,
    /// Stage to build (default: the last one).
    #[arg(long)]
    pub target: Option<String>,
    /// Image label `K=V` (repeatable).
    #[arg(long, value_name = "K=V")]
    pub label: Vec<String>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub no_push: bool,
    /// Write the image as an OCI image layout directory.
    #[arg(long)]
    pub oci_layout_path: Option<PathBuf>,
    /// Write the image as a `docker load` tarball.
    #[arg(long)]
    pub tar_path: Option<PathBuf>,
    /// Write the manifest digest to this file.
    #[arg(long)]
    pub digest_file: Option<PathBuf>,
    /// Write `<destination>@<digest>` lines to this file.
    #[arg(long)]
    pub image_name_with_digest_file: Option<PathBuf>,
    /// Strip timestamps so identical inputs give identical digests.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub reproducible: bool,
    #[arg(long, value_enum, default_value = "gzip")]
    pub compression: Compression,
    #[arg(long)]
    pub compression_level: Option<i32>,
    /// Use the layer cache.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = kaniko_bool!())]
    pub cache: bool,
    /// kiln-cache-server URL (without it the cache is embedded in --cache-dir).
    #[arg(long)]
    pub cache_server: Option<String>,
    #[arg(long, env = "KILN_CACHE_TOKEN", hide_env_values = true)]
    pub cache_token: Option<String>,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How long cache entries stay valid (Go duration, e.g. 336h).
    #[arg(long, default_value = "336h")]
    pub cache_ttl: String,
    #[arg(long, value_enum, default_value = "read-write")]
    pub cache_mode: CacheMode,
    #[arg(long, value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    #[arg(long, value_enum, default_value = "overlay")]
    pub snapshotter: SnapshotterKind,
    /// Write a JSON build report to this file.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// Parse and plan only: print the build plan as JSON.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub dry_run: bool,
    /// Use plain HTTP for all registries.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub insecure: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub insecure_pull: bool,
    /// Registry to reach over plain HTTP (repeatable).
    #[arg(long)]
    pub insecure_registry: Vec<String>,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub skip_tls_verify: bool,
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub skip_tls_verify_pull: bool,
    /// `registry=/path/to/ca.pem` (repeatable).
    #[arg(long)]
    pub registry_certificate: Vec<String>,
    /// Mirror for Docker Hub pulls (repeatable).
    #[arg(long)]
    pub registry_mirror: Vec<String>,
    /// Target platform `os/arch[/variant]` (default: the host's).
    #[arg(long)]
    pub custom_platform: Option<String>,
    /// Take one snapshot at the end of the build instead of one per step.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub single_snapshot: bool,
    /// Path left out of snapshots (repeatable).
    #[arg(long)]
    pub ignore_path: Vec<PathBuf>,
    /// Clean the filesystem at the end of the build.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub cleanup: bool,
    /// Build secret `id=NAME,src=PATH` for `RUN --mount=type=secret`.
    #[arg(long)]
    pub secret: Vec<String>,
    /// Network for RUN steps without --network.
    #[arg(long, value_enum, default_value = "default")]
    pub network: NetworkMode,
    /// Allow --isolation=none outside a container.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub force: bool,
    #[arg(long, default_value_t = 0)]
    pub image_download_retry: u32,
    #[arg(long, default_value_t = 0)]
    pub push_retry: u32,
    #[arg(short = 'v', long, value_enum, default_value = "info")]
    pub verbosity: Verbosity,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--build-arg {0:?}: expected K=V, or K with K set in the environment")]
    BuildArg(String),
}

impl ExecutorArgs {
    /// `--build-arg` values as pairs; `K` alone takes `K` from the
    /// environment (as Docker and Kaniko do) and is an error when unset.
    pub fn build_args(&self) -> Result<Vec<(String, String)>, CliError> {
        self.build_arg
            .iter()
            .map(|a| match a.split_once('=') {
                Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
                Some(_) => Err(CliError::BuildArg(a.clone())),
                None => std::env::var(a)
                    .map(|v| (a.clone(), v))
                    .map_err(|_| CliError::BuildArg(a.clone())),
            })
            .collect()
    }

    /// The Dockerfile to read: `--dockerfile` as given if it exists, else
    /// relative to the context (Kaniko's rule); `<context>/Dockerfile` by
    /// default.
    pub fn dockerfile_path(&self) -> PathBuf {
        match &self.dockerfile {
            None => self.context.join("Dockerfile"),
            Some(p) if p.is_absolute() || p.exists() => p.clone(),
            Some(p) => self.context.join(p),
        }
    }

    pub fn plan_options(&self) -> Result<PlanOptions, CliError> {
        Ok(PlanOptions {
            context: self.context.clone(),
            dockerfile: Some(self.dockerfile_path()),
            build_args: self.build_args()?,
            target: self.target.clone(),
            platform: self.custom_platform.clone(),
            build_platform: None,
            base_env: Default::default(),
        })
    }
}

pub use kiln_common::error_report;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<ExecutorArgs, clap::Error> {
        ExecutorArgs::try_parse_from(std::iter::once("kiln-executor").chain(args.iter().copied()))
    }

    #[test]
    fn kaniko_style_booleans_accept_explicit_values() {
        let a = parse(&["--cache=true", "--no-push", "--reproducible=false"]).unwrap();
        assert!(a.cache && a.no_push && !a.reproducible);
        let b = parse(&["--cache=false"]).unwrap();
        assert!(!b.cache);
    }

    #[test]
    fn repeated_flags_accumulate_and_enums_are_checked() {
        let a = parse(&[
            "--destination",
            "r/a:1",
            "-d",
            "r/a:2",
            "--build-arg",
            "A=1",
            "--build-arg=B=x=y",
            "--compression",
            "zstd",
            "--isolation=none",
            "--snapshotter",
            "walk",
            "-v",
            "debug",
        ])
        .unwrap();
        assert_eq!(a.destination, vec!["r/a:1", "r/a:2"]);
        assert_eq!(
            a.build_args().unwrap(),
            vec![("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        assert_eq!(a.compression, Compression::Zstd);
        assert_eq!(a.isolation, Isolation::None);
        assert_eq!(a.snapshotter, SnapshotterKind::Walk);
        assert!(parse(&["--compression", "lz4"]).is_err());
        assert!(parse(&["--isolation", "vm"]).is_err());
    }

    #[test]
    fn unknown_flags_are_errors() {
        assert!(parse(&["--no-such-flag"]).is_err());
    }

    #[test]
    fn dockerfile_defaults_to_the_context() {
        let a = parse(&["--context", "/ctx"]).unwrap();
        assert_eq!(a.dockerfile_path(), PathBuf::from("/ctx/Dockerfile"));
        let b = parse(&["--context", "/ctx", "--dockerfile", "sub/Other.Dockerfile"]).unwrap();
        assert_eq!(
            b.dockerfile_path(),
            PathBuf::from("/ctx/sub/Other.Dockerfile")
        );
    }

    #[test]
    fn bare_build_arg_without_environment_value_is_an_error() {
        let a = parse(&["--build-arg", "KILN_SURELY_UNSET_VARIABLE_123"]).unwrap();
        assert!(a.build_args().is_err());
        let b = parse(&["--build-arg", "=x"]).unwrap();
        assert!(b.build_args().is_err());
    }
}
