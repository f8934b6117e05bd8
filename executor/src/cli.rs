//! The executor's command line (clap derive). Flag names follow Kaniko's
//! where Kaniko has the same option so CI jobs can switch by renaming the
//! binary; Kaniko-style booleans accept `--flag`, `--flag=true` and
//! `--flag=false`. This module only defines and converts flags; the work is
//! done by the library modules they are handed to.

use crate::plan::PlanOptions;
use clap::{ArgAction, CommandFactory, FromArgMatches, Parser, ValueEnum};
use std::path::{Path, PathBuf};

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
pub enum UsernsMode {
    Host,
    Auto,
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
    about = "Builds OCI images from Dockerfiles without a Docker daemon",
    // pflag's rule: a single-value flag given twice keeps the last value
    // (repeatable flags such as --destination still accumulate).
    args_override_self = true
)]
pub struct ExecutorArgs {
    /// Build context: a directory, dir://PATH, tar://PATH (.tar, .tar.gz),
    /// tar://stdin, git://HOST/REPO.git#REF#COMMIT, https://.../REPO.git,
    /// s3://, gs://, az:// BUCKET/KEY.tar.gz or an Azure blob https URL
    /// (docs/user-guide.md, "Build contexts").
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
    /// Build without pushing (also `KANIKO_NO_PUSH=true`).
    #[arg(long, env = "KANIKO_NO_PUSH", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub no_push: bool,
    /// Write the image as an OCI image layout directory.
    #[arg(long)]
    pub oci_layout_path: Option<PathBuf>,
    /// Write the image as a `docker load` tarball.
    #[arg(long, visible_alias = "tarPath")]
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
    /// Bearer token of the cache server; prefer --cache-token-file.
    #[arg(long, env = "KILN_CACHE_TOKEN", hide_env_values = true)]
    pub cache_token: Option<String>,
    // The cache server's token file and TLS: one group, kept together.
    /// Read the cache token from this file (e.g. a mounted Secret); wins
    /// over --cache-token and KILN_CACHE_TOKEN.
    #[arg(long, env = "KILN_CACHE_TOKEN_FILE", value_name = "FILE")]
    pub cache_token_file: Option<PathBuf>,
    /// PEM CA certificate(s) of the cache server (a private CA), trusted
    /// besides the default ones.
    #[arg(long, env = "KILN_CACHE_CA_CERT", value_name = "FILE")]
    pub cache_ca_cert: Option<PathBuf>,
    /// Client certificate and key for a cache server that requires one
    /// (mutual TLS), as `CERT,KEY` (PEM files).
    #[arg(long, env = "KILN_CACHE_CLIENT_CERT", value_name = "CERT,KEY")]
    pub cache_client_cert: Option<String>,
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// How long cache entries stay valid (Go duration, e.g. 336h).
    #[arg(long, default_value = "336h")]
    pub cache_ttl: String,
    #[arg(long, value_enum, default_value = "read-write")]
    pub cache_mode: CacheMode,
    /// Largest size one layer may expand to when unpacked (file contents,
    /// holes of sparse files included, plus 512 bytes per entry), e.g. 32GiB.
    #[arg(long, default_value = "32GiB")]
    pub max_layer_size: String,
    #[arg(long, value_enum, default_value = "chroot")]
    pub isolation: Isolation,
    #[arg(long, value_enum, default_value = "overlay")]
    pub snapshotter: SnapshotterKind,
    /// Mount base and cached layers as EROFS images (chroot isolation,
    /// overlay snapshotter) instead of unpacking them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = kaniko_bool!())]
    pub mountable_layers: bool,
    /// Build up to N independent stages at once (default: the number of
    /// CPUs; 1: one after another, in plan order).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u16).range(1..))]
    pub jobs: Option<u16>,

    /// Hash every stored layer image in full before each mount, instead of
    /// trusting the stamp of its last full hash in this boot (docs/security.md).
    #[arg(long)]
    pub rehash_layer_images: bool,
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
    /// `REGISTRY=/path/to/ca.pem`: a CA trusted for that registry, besides
    /// the default ones (repeatable; a bare path is trusted for every
    /// registry).
    #[arg(long)]
    pub registry_certificate: Vec<String>,
    /// Mirror for Docker Hub pulls, `host[:port][/path]` (repeatable; also
    /// KANIKO_REGISTRY_MIRROR).
    #[arg(long)]
    pub registry_mirror: Vec<String>,
    /// Target platform `os/arch[/variant]` (default: the host's).
    #[arg(long, visible_alias = "customPlatform")]
    pub custom_platform: Option<String>,
    /// One layer per stage: the stage's filesystem steps share one writable
    /// rootfs and are snapshotted once, after the last of them.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub single_snapshot: bool,
    /// Path left out of snapshots (repeatable).
    #[arg(long)]
    pub ignore_path: Vec<PathBuf>,
    /// At the end, remove the unpacked layers of the state directory
    /// (docs/kaniko-migration.md).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub cleanup: bool,
    /// Build secret `id=NAME,src=PATH` for `RUN --mount=type=secret`.
    #[arg(long)]
    pub secret: Vec<String>,
    /// Network for RUN steps without --network.
    #[arg(long, value_enum, default_value = "default")]
    pub network: NetworkMode,
    /// Add a capability to every RUN step (chroot isolation), on top of
    /// Docker's default 14: a name such as NET_ADMIN or CAP_NET_ADMIN, or
    /// ALL (repeatable; docs/security.md).
    #[arg(long = "cap-add", value_name = "CAP")]
    pub cap_add: Vec<String>,
    /// Remove a capability from every RUN step (repeatable; ALL for none).
    #[arg(long = "cap-drop", value_name = "CAP")]
    pub cap_drop: Vec<String>,
    /// Security options of RUN steps: only `seccomp=unconfined` (no
    /// system-call filter) is recognised.
    #[arg(long = "security-opt", value_name = "OPT")]
    pub security_opt: Vec<String>,
    /// Entitlements, as BuildKit's `--allow`: `security.insecure` lets
    /// `RUN --security=insecure` run privileged (every capability, no
    /// seccomp filter, writable /proc/sys and /sys).
    #[arg(long = "allow", value_name = "ENTITLEMENT")]
    pub allow: Vec<String>,
    /// `auto`: RUN steps run in a user namespace whose root is an
    /// unprivileged host uid (root's range in /etc/subuid, else 100000);
    /// `host` (default): the step's root is the host's root, held in by
    /// capabilities and seccomp. Chroot isolation only (docs/security.md).
    #[arg(long, value_enum, default_value = "host")]
    pub userns: UsernsMode,
    /// Allow --isolation=none outside a container.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub force: bool,
    #[arg(long, default_value_t = 0)]
    pub image_download_retry: u32,
    #[arg(long, default_value_t = 0)]
    pub push_retry: u32,
    #[arg(short = 'v', long, value_enum, default_value = "info")]
    pub verbosity: Verbosity,
    // --- runtime flags (issue 15) ---
    /// Log format: `color` (Kaniko's default: coloured on a terminal
    /// without NO_COLOR, plain otherwise), `text` (never coloured) or
    /// `json` (one object per event).
    #[arg(long, value_enum, default_value = "color")]
    pub log_format: LogFormat,
    /// Start every text log line with its time (RFC 3339, UTC).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub log_timestamp: bool,
    /// Whether `--isolation` was on the command line (an explicit `chroot`
    /// never falls back to in-place isolation); set by [`ExecutorArgs::parse_args`].
    #[arg(skip)]
    pub isolation_explicit: bool,
    // --- cacherepo flags (issue 15) ---
    /// Registry repository that holds the layer cache (`registry/path`, no
    /// tag), for builds without a cache server; --cache-server wins when
    /// both are given (docs/cache-repo.md).
    #[arg(long, value_name = "REPO")]
    pub cache_repo: Option<String>,
    /// Look the cache up but push nothing to it (no layers, no entries).
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub no_push_cache: bool,
    /// Kaniko flags that only tune Kaniko's own machinery, given with a
    /// value kiln does not follow: one warning each
    /// ([`crate::kaniko_flags::machinery_warnings`]); set by [`ExecutorArgs::parse_args`].
    #[arg(skip)]
    pub machinery_warnings: Vec<String>,
    // --- flags flags (issue 15) ---
    // Every Kaniko v1.24.0 flag kiln did not have; `crate::kaniko_flags`
    // says for each what kiln does with it.
    /// Write `<destination with tag>@<digest>` lines to this file.
    #[arg(long, value_name = "FILE")]
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// Kaniko's snapshot strategy (full, redo, time); kiln's snapshots never
    /// depend on it (accepted, with a warning when not `full`).
    #[arg(long, visible_alias = "snapshotMode", value_parser = ["full", "redo", "time"])]
    pub snapshot_mode: Option<String>,
    /// Kaniko's experimental RUN change detection; kiln's snapshotters
    /// always diff (accepted, with a warning).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub use_new_run: bool,
    /// Kaniko caches COPY layers only with this; kiln caches every
    /// filesystem step (accepted, with a warning when false).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub cache_copy_layers: bool,
    /// Kaniko's switch for caching RUN layers; kiln always caches them
    /// (accepted, with a warning when false).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = kaniko_bool!())]
    pub cache_run_layers: bool,
    /// Kaniko's in-memory compression of cached layers; kiln streams every
    /// layer to disk compressed (accepted, with a warning when false).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = kaniko_bool!())]
    pub compressed_caching: bool,
    /// kiln always builds only the stages the target needs (accepted, with
    /// a warning when false).
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub skip_unused_stages: bool,
    /// How many more times a base-image layer whose extraction failed is
    /// fetched again and extracted again.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub image_fs_extract_retry: u32,
    /// Leave /var/run out of every layer, as Kaniko does (`=false` keeps
    /// it). `--whitelist-var-run` is Kaniko's deprecated name.
    #[arg(long, visible_alias = "whitelist-var-run", value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "true", action = kaniko_bool!())]
    pub ignore_var_run: bool,
    /// kiln's state directory (blobs, unpacked layers, the embedded cache,
    /// scratch space) when --cache-dir is not given; also KANIKO_DIR.
    #[arg(long, env = "KANIKO_DIR", value_name = "DIR")]
    pub kaniko_dir: Option<PathBuf>,
    /// Give every instruction a layer, empty ones included, as Kaniko's
    /// --force-build-metadata does.
    #[arg(long, value_parser = go_bool, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub force_build_metadata: bool,
    // --- registry flags (issue 15) ---
    /// Registry (`host[:port]`) whose TLS certificate is not verified
    /// (repeatable).
    #[arg(long, value_name = "REGISTRY")]
    pub skip_tls_verify_registry: Vec<String>,
    /// Client certificate for a registry that requires one (mutual TLS), as
    /// `REGISTRY=CERT,KEY` (PEM files; repeatable).
    #[arg(long, value_name = "REGISTRY=CERT,KEY")]
    pub registry_client_cert: Vec<String>,
    /// Mirrors of a registry, as `ORIGINAL=MIRROR[;MIRROR...]` (a mirror is
    /// `host[/path]`; repeatable; also KANIKO_REGISTRY_MAP).
    #[arg(long, value_name = "ORIGINAL=MIRROR")]
    pub registry_map: Vec<String>,
    /// Fail when every mirror fails instead of pulling from the registry
    /// itself.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub skip_default_registry_fallback: bool,
    /// A registry refusing to overwrite an immutable tag is not an error.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub push_ignore_immutable_tag_errors: bool,
    /// Do not check, before the build, that every destination accepts a
    /// push with the credentials found.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", default_value = "false", action = kaniko_bool!())]
    pub skip_push_permission_check: bool,
    // --- contexts flags (issue 15) ---
    /// Build from this subdirectory of the (fetched) context.
    #[arg(long, value_name = "PATH")]
    pub context_sub_path: Option<String>,
    /// Git context option `branch=NAME`, `single-branch=true|false`,
    /// `recurse-submodules=true|false` or `insecure-skip-tls=true|false`
    /// (repeatable; several may be given comma-separated).
    #[arg(long, value_name = "KEY=VALUE")]
    pub git: Vec<String>,
    /// Bucket holding the context archive: a GCS bucket name, or
    /// SCHEME://BUCKET[/KEY]; replaces a SCHEME:// or default --context, and
    /// a plain --context that is no local path names the object in it.
    #[arg(short = 'b', long)]
    pub bucket: Option<String>,
}

/// A boolean as Go's `strconv.ParseBool` (pflag) reads it: `1`, `t`, `T`,
/// `TRUE`, `true`, `True` and their false forms.
pub fn go_bool(text: &str) -> Result<bool, String> {
    match text {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Ok(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Ok(false),
        _ => Err(format!("{text:?} is not a boolean (true or false)")),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Text,
    Color,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("--build-arg {0:?}: expected K=V, or K with K set in the environment")]
    BuildArg(String),
    #[error("--cache-client-cert {0:?}: expected CERT,KEY (two PEM files)")]
    ClientCert(String),
    #[error("--cache-token-file {path}: {message}")]
    TokenFile { path: String, message: String },
    #[error(transparent)]
    Tls(#[from] crate::cache::http::TlsFileError),
    #[error(transparent)]
    Context(#[from] crate::sources::context_source::SourceError),
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
    /// default. For a context that is fetched, the driver resolves it
    /// against the fetched directory instead.
    pub fn dockerfile_path(&self) -> PathBuf {
        crate::sources::context_source::resolve_dockerfile(
            self.dockerfile.as_deref(),
            &self.context,
        )
    }

    /// `--context` with `--bucket`, `--context-sub-path` and `--git`.
    pub fn context_spec(&self) -> Result<crate::sources::context_source::ContextSpec, CliError> {
        let context = self.context.to_string_lossy();
        Ok(crate::sources::context_source::ContextSpec::parse(
            &context,
            context != ".",
            self.bucket.as_deref(),
            self.context_sub_path.as_deref(),
            crate::sources::context_source::GitOptions::parse(&self.git)?,
            &|name| std::env::var(name).ok(),
        )?)
    }

    /// Replaces the cache token with the content of `--cache-token-file`
    /// (without surrounding whitespace), when given.
    pub fn read_cache_token_file(&mut self) -> Result<(), CliError> {
        let Some(path) = &self.cache_token_file else {
            return Ok(());
        };
        let error = |message: String| CliError::TokenFile {
            path: path.display().to_string(),
            message,
        };
        let text = std::fs::read_to_string(path).map_err(|e| error(e.to_string()))?;
        let token = text.trim();
        if token.is_empty() {
            return Err(error("the file is empty".into()));
        }
        self.cache_token = Some(token.to_owned());
        Ok(())
    }

    /// The cache client's TLS material from `--cache-ca-cert` and
    /// `--cache-client-cert CERT,KEY`, read and checked.
    pub fn cache_tls(&self) -> Result<crate::cache::http::ClientTls, CliError> {
        let identity = match &self.cache_client_cert {
            None => None,
            Some(v) => match v.split_once(',') {
                Some((cert, key)) if !cert.is_empty() && !key.is_empty() => {
                    Some((PathBuf::from(cert), PathBuf::from(key)))
                }
                _ => return Err(CliError::ClientCert(v.clone())),
            },
        };
        Ok(crate::cache::http::ClientTls::load(
            self.cache_ca_cert.as_deref(),
            identity.as_ref().map(|(c, k)| (c.as_path(), k.as_path())),
        )?)
    }

    /// The planner's options before the context is prepared: `context` is
    /// the local directory (or, for one that must be fetched, the flag's
    /// text) and `dockerfile` the flag as given, until
    /// [`crate::sources::context_source::ContextSpec::prepare`] (the driver, or
    /// `--dry-run`) points both at the materialized context.
    pub fn plan_options(&self) -> Result<PlanOptions, CliError> {
        let spec = self.context_spec()?;
        let context = spec
            .local_dir()
            .map_or_else(|| self.context.clone(), Path::to_path_buf);
        let dockerfile = self.dockerfile.clone();
        Ok(PlanOptions {
            context,
            dockerfile,
            build_args: self.build_args()?,
            target: self.target.clone(),
            platform: self.custom_platform.clone(),
            build_platform: None,
            base_env: Default::default(),
        })
    }
}

impl ExecutorArgs {
    /// Parses the process's arguments (exiting with clap's message on bad
    /// ones), noting which flags were given rather than defaulted.
    pub fn parse_args() -> Self {
        Self::from_matches(Self::usage_named().get_matches())
    }

    /// The command, its usage naming `kiln-executor` also when it is
    /// started as Kaniko's `/kaniko/executor` (clap would take argv\[0\]).
    fn usage_named() -> clap::Command {
        Self::command().bin_name("kiln-executor")
    }

    /// [`ExecutorArgs::parse_args`] on given arguments (for tests).
    pub fn try_parse_args<I, T>(args: I) -> Result<Self, clap::Error>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Ok(Self::from_matches(
            Self::command().try_get_matches_from(args)?,
        ))
    }

    fn from_matches(matches: clap::ArgMatches) -> Self {
        let mut args = Self::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
        args.isolation_explicit =
            matches.value_source("isolation") == Some(clap::parser::ValueSource::CommandLine);
        args.machinery_warnings = crate::kaniko_flags::machinery_warnings(&matches);
        args
    }

    /// The log configuration `--log-format`, `--log-timestamp` and
    /// `--verbosity` ask for. `panic` and `fatal` print only the error that
    /// ends the run (which every level shows).
    pub fn log_config(&self) -> crate::log::LogConfig {
        use crate::log::{Format, Level};
        crate::log::LogConfig {
            format: match self.log_format {
                LogFormat::Text => Format::Text,
                LogFormat::Color => Format::Color,
                LogFormat::Json => Format::Json,
            },
            max_level: match self.verbosity {
                Verbosity::Panic | Verbosity::Fatal => Level::Fatal,
                Verbosity::Error => Level::Error,
                Verbosity::Warn => Level::Warn,
                Verbosity::Info => Level::Info,
                Verbosity::Debug => Level::Debug,
                Verbosity::Trace => Level::Trace,
            },
            timestamps: self.log_timestamp,
            ansi: self.log_format == LogFormat::Color && crate::log::colour_allowed(),
        }
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
    fn cache_token_file_wins_over_the_flag_and_is_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("token");
        std::fs::write(&file, "kiln_secret\n").unwrap();
        let mut a = parse(&[
            "--cache-token",
            "on-the-command-line",
            "--cache-token-file",
            file.to_str().unwrap(),
        ])
        .unwrap();
        a.read_cache_token_file().unwrap();
        assert_eq!(a.cache_token.as_deref(), Some("kiln_secret"));

        std::fs::write(&file, " \n").unwrap();
        let err = a.read_cache_token_file().unwrap_err().to_string();
        assert!(err.contains("empty") && err.contains("token"), "{err}");
        let mut b = parse(&["--cache-token-file", "/nonexistent/kiln-token"]).unwrap();
        let err = b.read_cache_token_file().unwrap_err().to_string();
        assert!(err.contains("/nonexistent/kiln-token"), "{err}");
    }

    #[test]
    fn cache_client_cert_needs_a_certificate_and_a_key() {
        for bad in ["only-cert.pem", "cert.pem,", ",key.pem"] {
            let a = parse(&["--cache-client-cert", bad]).unwrap();
            assert!(
                matches!(a.cache_tls(), Err(CliError::ClientCert(_))),
                "{bad}"
            );
        }
        let a = parse(&["--cache-ca-cert", "/nonexistent/ca.pem"]).unwrap();
        let err = a.cache_tls().err().unwrap().to_string();
        assert!(
            err.contains("--cache-ca-cert") && err.contains("/nonexistent/ca.pem"),
            "{err}"
        );
    }

    #[test]
    fn log_flags_choose_format_timestamps_and_level() {
        use crate::log::{Format, Level};
        let default = parse(&[]).unwrap().log_config();
        assert_eq!(default.format, Format::Color);
        assert_eq!(default.max_level, Level::Info);
        assert!(!default.timestamps);
        let a = parse(&["--log-format=json", "--log-timestamp", "-v", "warn"]).unwrap();
        let c = a.log_config();
        assert_eq!(
            (c.format, c.max_level, c.timestamps),
            (Format::Json, Level::Warn, true)
        );
        assert!(!c.ansi, "only the color format colours");
        let b = parse(&[
            "--log-format",
            "text",
            "--log-timestamp=false",
            "--verbosity=panic",
        ])
        .unwrap()
        .log_config();
        assert_eq!(
            (b.format, b.max_level, b.timestamps),
            (Format::Text, Level::Fatal, false)
        );
        assert!(parse(&["--log-format", "xml"]).is_err());
    }

    #[test]
    fn an_explicit_isolation_is_told_from_the_default() {
        let args = |extra: &[&str]| {
            ExecutorArgs::try_parse_args(
                std::iter::once("kiln-executor").chain(extra.iter().copied()),
            )
            .unwrap()
        };
        assert!(!args(&[]).isolation_explicit);
        assert!(args(&["--isolation", "chroot"]).isolation_explicit);
        assert!(args(&["--isolation=none"]).isolation_explicit);
    }

    #[test]
    fn single_value_flags_keep_the_last_value_and_repeatable_ones_accumulate() {
        let a = parse(&[
            "--target",
            "a",
            "--target=b",
            "--cache=false",
            "--cache",
            "--push-retry",
            "1",
            "--push-retry=3",
            "-d",
            "r/a:1",
            "--destination=r/a:2",
            "--tarPath",
            "/t1",
            "--tar-path",
            "/t2",
            "--customPlatform=linux/arm64",
            "--snapshot-mode=redo",
            "--snapshotMode",
            "time",
            "--ignore-var-run=false",
            "--whitelist-var-run",
            "--no-push=1",
            "--no-push=F",
        ])
        .unwrap();
        assert_eq!(a.target.as_deref(), Some("b"));
        assert!(a.cache);
        assert_eq!(a.push_retry, 3);
        assert_eq!(a.destination, ["r/a:1", "r/a:2"]);
        assert_eq!(a.tar_path, Some(PathBuf::from("/t2")));
        assert_eq!(a.custom_platform.as_deref(), Some("linux/arm64"));
        assert_eq!(a.snapshot_mode.as_deref(), Some("time"));
        assert!(a.ignore_var_run && !a.no_push);
        assert!(parse(&["--no-push=yes"]).is_err());
        assert!(parse(&["--snapshot-mode=fast"]).is_err());
        assert!(parse(&["--log-format=xml"]).is_err());
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
