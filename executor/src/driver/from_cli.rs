//! Turns the parsed command line into [`BuildOptions`]: defaults that depend
//! on the environment (state directory, `SOURCE_DATE_EPOCH`) are decided
//! here, once, so the driver itself reads no environment.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::build::layer::Compression;
use crate::build::runner::NetworkMode;
use crate::build::runner::security::{Seccomp, StepSecurity};
use crate::build::runner::userns::IdMapping;
use crate::cli::{self, ExecutorArgs};
use crate::registry::RegistryOptions;

use super::{BuildOptions, CacheOptions, Isolation, Secret, SecretSource, SnapshotterKind};
use crate::cache::CacheMode;

#[derive(Debug, thiserror::Error)]
pub enum OptionsError {
    #[error(transparent)]
    Cli(#[from] cli::CliError),
    #[error("--label {0:?}: expected K=V")]
    Label(String),
    #[error("SOURCE_DATE_EPOCH={0:?} is not a whole number of seconds")]
    SourceDateEpoch(String),
    #[error("--compression-level {level} is out of range for {compression}")]
    CompressionLevel {
        level: i32,
        compression: &'static str,
    },
    #[error("--secret {0:?}: expected id=ID,src=FILE or id=ID,env=VARIABLE")]
    Secret(String),
    #[error("--cache-ttl {0:?}: expected a duration such as 336h, 30m or 7d")]
    CacheTtl(String),
    #[error("--cap-add/--cap-drop: {0}")]
    Capability(#[from] crate::build::runner::security::UnknownCapability),
    #[error("--security-opt {0:?}: only seccomp=unconfined is supported")]
    SecurityOpt(String),
    #[error("--allow {0:?}: the only entitlement is security.insecure")]
    Entitlement(String),
    #[error("--userns auto needs --isolation chroot (in place, the pod's runtime decides)")]
    UsernsInPlace,
    #[error("--max-layer-size {0:?}: expected a size such as 32GiB, 500MiB or 1000000 (bytes)")]
    MaxLayerSize(String),
    #[error(
        "no output: give --destination, --oci-layout-path or --tar-path (or --no-push to build only)"
    )]
    NoOutput,
}

/// Where blobs and unpacked layers are kept when `--cache-dir` is not given.
pub fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("KILN_STATE_DIR") {
        return PathBuf::from(dir);
    }
    match std::env::var_os("HOME") {
        Some(home) if !home.is_empty() && home != "/" => PathBuf::from(home).join(".cache/kiln"),
        _ => PathBuf::from("/kiln/cache"),
    }
}

impl ExecutorArgs {
    pub fn build_options(&self) -> Result<BuildOptions, OptionsError> {
        let labels = self
            .label
            .iter()
            .map(|l| {
                l.split_once('=')
                    .filter(|(k, _)| !k.is_empty())
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .ok_or_else(|| OptionsError::Label(l.clone()))
            })
            .collect::<Result<_, _>>()?;
        let source_date_epoch = match std::env::var("SOURCE_DATE_EPOCH") {
            Ok(v) if !v.is_empty() => Some(
                v.parse::<u64>()
                    .map_err(|_| OptionsError::SourceDateEpoch(v.clone()))?,
            ),
            _ => None,
        };
        let compression = match (self.compression, self.compression_level) {
            (cli::Compression::Gzip, None) => Compression::Gzip { level: 6 },
            (cli::Compression::Gzip, Some(l)) if (0..=9).contains(&l) => {
                Compression::Gzip { level: l as u32 }
            }
            (cli::Compression::Zstd, None) => Compression::Zstd { level: 3 },
            (cli::Compression::Zstd, Some(l)) if (1..=22).contains(&l) => {
                Compression::Zstd { level: l }
            }
            (c, Some(level)) => {
                return Err(OptionsError::CompressionLevel {
                    level,
                    compression: match c {
                        cli::Compression::Gzip => "gzip (0-9)",
                        cli::Compression::Zstd => "zstd (1-22)",
                    },
                });
            }
        };
        if self.destination.is_empty()
            && !self.no_push
            && self.oci_layout_path.is_none()
            && self.tar_path.is_none()
        {
            return Err(OptionsError::NoOutput);
        }
        let registry = RegistryOptions {
            insecure: self.insecure,
            insecure_pull: self.insecure_pull,
            insecure_registries: self.insecure_registry.clone(),
            skip_tls_verify: self.skip_tls_verify,
            skip_tls_verify_pull: self.skip_tls_verify_pull,
            ca_certificates: self
                .registry_certificate
                .iter()
                .map(|c| PathBuf::from(c.rsplit_once('=').map(|(_, p)| p).unwrap_or(c)))
                .collect(),
            mirrors: self.registry_mirror.clone(),
            pull_retries: self.image_download_retry,
            push_retries: self.push_retry,
            ..RegistryOptions::default()
        };
        Ok(BuildOptions {
            plan: self.plan_options()?,
            context_source: Some(self.context_spec()?),
            destinations: self.destination.clone(),
            no_push: self.no_push,
            oci_layout_path: self.oci_layout_path.clone(),
            tar_path: self.tar_path.clone(),
            digest_file: self.digest_file.clone(),
            image_name_with_digest_file: self.image_name_with_digest_file.clone(),
            reproducible: self.reproducible || source_date_epoch.is_some(),
            source_date_epoch,
            compression,
            labels,
            isolation: match self.isolation {
                cli::Isolation::Chroot => Isolation::Chroot,
                cli::Isolation::None => Isolation::None,
            },
            // In place there is nothing to mount an overlay on: `/` is the
            // rootfs, so --isolation none always walks.
            // Overlayfs refuses to be an idmapped mount itself, which
            // --userns auto needs of the rootfs (docs/security.md).
            snapshotter: Some(match (self.isolation, self.snapshotter) {
                (cli::Isolation::None, _) | (_, cli::SnapshotterKind::Walk) => {
                    SnapshotterKind::Walk
                }
                _ if self.userns == cli::UsernsMode::Auto => SnapshotterKind::Walk,
                (cli::Isolation::Chroot, cli::SnapshotterKind::Overlay) => SnapshotterKind::Overlay,
            }),
            state_dir: self.cache_dir.clone().unwrap_or_else(default_state_dir),
            registry,
            force: self.force,
            network: match self.network {
                cli::NetworkMode::None => NetworkMode::None,
                cli::NetworkMode::Default | cli::NetworkMode::Host => NetworkMode::Host,
            },
            run_security: self.run_security()?,
            allow_insecure: self.allow_insecure()?,
            ignore_paths: self.ignore_path.clone(),
            log: Arc::new(Mutex::new(std::io::stderr())),
            cache: CacheOptions {
                enabled: self.cache,
                mode: match self.cache_mode {
                    cli::CacheMode::ReadWrite => CacheMode::ReadWrite,
                    cli::CacheMode::ReadOnly => CacheMode::ReadOnly,
                    cli::CacheMode::WriteOnly => CacheMode::WriteOnly,
                },
                servers: self
                    .cache_server
                    .iter()
                    .flat_map(|s| s.split(','))
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_owned)
                    .collect(),
                token: self.cache_token.clone(),
                ttl: parse_duration(&self.cache_ttl)
                    .map(Some)
                    .ok_or_else(|| OptionsError::CacheTtl(self.cache_ttl.clone()))?,
            },
            report: self.report.clone(),
            max_layer_size: parse_size(&self.max_layer_size)
                .filter(|n| *n > 0)
                .ok_or_else(|| OptionsError::MaxLayerSize(self.max_layer_size.clone()))?,
            secrets: self
                .secret
                .iter()
                .map(|s| parse_secret(s))
                .collect::<Result<_, _>>()?,
        })
    }
}

impl ExecutorArgs {
    /// Docker's defaults, changed by `--cap-add`, `--cap-drop` (drops
    /// applied after adds, as Docker) and `--security-opt`.
    fn run_security(&self) -> Result<StepSecurity, OptionsError> {
        let mut security = StepSecurity::default();
        for cap in self.cap_add.iter().flat_map(|c| c.split(',')) {
            security.capabilities.add(cap.trim())?;
        }
        for cap in self.cap_drop.iter().flat_map(|c| c.split(',')) {
            security.capabilities.drop_cap(cap.trim())?;
        }
        if self.userns == cli::UsernsMode::Auto {
            if self.isolation == cli::Isolation::None {
                return Err(OptionsError::UsernsInPlace);
            }
            security.user_namespace = Some(IdMapping::for_root());
        }
        for opt in &self.security_opt {
            match opt.split_once(['=', ':']) {
                Some(("seccomp", "unconfined")) => security.seccomp = Seccomp::Unconfined,
                _ => return Err(OptionsError::SecurityOpt(opt.clone())),
            }
        }
        Ok(security)
    }

    fn allow_insecure(&self) -> Result<bool, OptionsError> {
        let mut allowed = false;
        for entitlement in self.allow.iter().flat_map(|a| a.split(',')) {
            match entitlement.trim() {
                "security.insecure" => allowed = true,
                other => return Err(OptionsError::Entitlement(other.to_string())),
            }
        }
        Ok(allowed)
    }
}

/// `--secret id=npmrc,src=/home/me/.npmrc` or `id=token,env=API_TOKEN`
/// (`source=` is accepted for `src=`, as Docker does).
pub fn parse_secret(spec: &str) -> Result<Secret, OptionsError> {
    let mut id = None;
    let mut source = None;
    for field in spec.split(',') {
        match field.split_once('=') {
            Some(("id", v)) if !v.is_empty() => id = Some(v.to_owned()),
            Some(("src" | "source", v)) if !v.is_empty() => {
                source = Some(SecretSource::File(PathBuf::from(v)))
            }
            Some(("env", v)) if !v.is_empty() => source = Some(SecretSource::Env(v.to_owned())),
            Some(("type", "file" | "env")) => {}
            _ => return Err(OptionsError::Secret(spec.to_owned())),
        }
    }
    match (id, source) {
        (Some(id), Some(source)) => Ok(Secret { id, source }),
        (Some(id), None) => Ok(Secret {
            source: SecretSource::Env(id.clone()),
            id,
        }),
        _ => Err(OptionsError::Secret(spec.to_owned())),
    }
}

/// `336h`, `30m`, `45s`, `7d`: Go-style durations as Kaniko takes them.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let text = text.trim();
    let split = text.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let seconds = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        "d" => n.checked_mul(86_400)?,
        _ => return None,
    };
    Some(std::time::Duration::from_secs(seconds))
}

/// `32GiB`, `500MiB`, `10G`, `4096`: a byte count with an optional binary
/// (`KiB`..`TiB`, also `K`..`T`) or decimal (`KB`..`TB`) unit.
pub fn parse_size(text: &str) -> Option<u64> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let n: u64 = number.parse().ok()?;
    let multiplier: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return None,
    };
    n.checked_mul(multiplier)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_and_decimal_units() {
        assert_eq!(parse_size("32GiB"), Some(32 << 30));
        assert_eq!(parse_size("500MiB"), Some(500 << 20));
        assert_eq!(parse_size("10G"), Some(10 << 30));
        assert_eq!(parse_size("2GB"), Some(2_000_000_000));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("1.5G"), None);
        assert_eq!(parse_size("G"), None);
        assert_eq!(parse_size("99999999999TiB"), None);
    }

    #[test]
    fn secrets_parse_from_files_and_environment() {
        let s = parse_secret("id=npm,src=/tmp/npmrc").unwrap();
        assert_eq!(s.id, "npm");
        assert!(
            matches!(s.source, SecretSource::File(p) if p == std::path::Path::new("/tmp/npmrc"))
        );
        let e = parse_secret("id=tok,env=API_TOKEN").unwrap();
        assert!(matches!(e.source, SecretSource::Env(v) if v == "API_TOKEN"));
        assert!(parse_secret("src=/x").is_err());
        assert!(parse_secret("id=a,bogus=1").is_err());
    }

    #[test]
    fn durations_parse_like_kaniko_flags() {
        assert_eq!(
            parse_duration("336h"),
            Some(std::time::Duration::from_secs(336 * 3600))
        );
        assert_eq!(
            parse_duration("7d"),
            Some(std::time::Duration::from_secs(7 * 86_400))
        );
        assert_eq!(parse_duration("10"), None);
        assert_eq!(parse_duration("h"), None);
        assert_eq!(parse_duration("5w"), None);
    }
}
