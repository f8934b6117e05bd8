//! Turns the parsed command line into [`BuildOptions`]: defaults that depend
//! on the environment (state directory, `SOURCE_DATE_EPOCH`) are decided
//! here, once, so the driver itself reads no environment.

use std::path::PathBuf;

use crate::build::layer::Compression;
use crate::build::runner::NetworkMode;
use crate::build::runner::probe::{self, IsolationDenied};
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
    #[error(
        "--cache-ttl {0:?}: expected a Go duration such as 336h, 1h30m, 1.5h, 90s or 500ms (a number and a unit: ns, us, ms, s, m, h; kiln also takes d)"
    )]
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
    #[error("--cache-repo {repo:?}: {reason}")]
    CacheRepo { repo: String, reason: String },
    #[error("--no-push-cache and --cache-mode write-only contradict each other")]
    NoPushCacheWriteOnly,
    #[error("--registry-client-cert {0:?}: expected REGISTRY=CERT,KEY (two PEM files)")]
    RegistryClientCert(String),
    #[error("{0} {1:?}: expected ORIGINAL=MIRROR[;MIRROR...][;ORIGINAL2=MIRROR2...]")]
    RegistryMap(&'static str, String),
    #[error("--registry-certificate {0:?}: expected REGISTRY=/path/to/ca.pem")]
    RegistryCertificate(String),
    #[error(
        "no output: give --destination, --oci-layout-path or --tar-path (or --no-push to build only)"
    )]
    NoOutput,
    /// Chroot isolation is impossible here and kiln may not fall back.
    #[error("{0}")]
    Isolation(String),
}

/// How RUN steps will be isolated, decided at startup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IsolationChoice {
    pub isolation: Isolation,
    /// The one line that says kiln fell back to in-place isolation, and why.
    pub notice: Option<String>,
}

/// The isolation for `--isolation` (`explicit`: given on the command line,
/// not defaulted). `none` is taken as asked. For `chroot`, `probe` asks the
/// kernel whether a step can be isolated; if not, a defaulted `chroot`
/// inside a container (`container` says why it looks like one) becomes
/// in-place isolation with a notice, and anything else is an error naming
/// both fixes. `needs_namespaces` (`--userns auto`) forbids the fallback
/// like an explicit `chroot`. Nothing is decided late: the first cache
/// miss never finds out.
pub fn choose_isolation(
    requested: cli::Isolation,
    explicit: bool,
    needs_namespaces: bool,
    probe: impl FnOnce() -> Result<(), IsolationDenied>,
    container: impl FnOnce() -> Option<String>,
) -> Result<IsolationChoice, OptionsError> {
    if requested == cli::Isolation::None {
        return Ok(IsolationChoice {
            isolation: Isolation::None,
            notice: None,
        });
    }
    let chroot = IsolationChoice {
        isolation: Isolation::Chroot,
        notice: None,
    };
    let Err(denied) = probe() else {
        return Ok(chroot);
    };
    let grant = "grant the executor CAP_SYS_ADMIN and let it create namespaces \
                 (e.g. a privileged pod, or securityContext.capabilities.add [SYS_ADMIN] \
                 with seccomp and AppArmor unconfined)";
    match container() {
        Some(hint) if !explicit && !needs_namespaces => Ok(IsolationChoice {
            isolation: Isolation::None,
            notice: Some(format!(
                "isolation: this container may not create namespaces ({denied}); RUN steps \
                 run in place in the executor's own container (--isolation none), as Kaniko's \
                 do ({hint}); give --isolation none to skip this check"
            )),
        }),
        Some(hint) => Err(OptionsError::Isolation(format!(
            "{} needs namespaces, which this container may not create ({denied}); \
             use --isolation none (RUN steps in place in this container; {hint}), or {grant}",
            if needs_namespaces {
                "--userns auto"
            } else {
                "--isolation chroot"
            }
        ))),
        None => Err(OptionsError::Isolation(format!(
            "RUN steps cannot be isolated: creating namespaces is not permitted ({denied}), \
             and this does not look like a container, so kiln will not build in place over \
             this machine's own root filesystem. Either {grant}, or run kiln inside a \
             container with --isolation none"
        ))),
    }
}

/// Where blobs and unpacked layers are kept when `--cache-dir` is not given.
/// Kaniko's environment variables that add mirrors and registry maps to
/// the flags' (read here rather than as clap defaults: they are lists in
/// their own syntax, and they add to the flags instead of standing in for
/// them).
pub const REGISTRY_MIRROR_ENV: &str = "KANIKO_REGISTRY_MIRROR";
pub const REGISTRY_MAP_ENV: &str = "KANIKO_REGISTRY_MAP";

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
    /// `--jobs`, or the number of CPUs this process may use.
    fn jobs(&self) -> usize {
        match self.jobs {
            Some(n) => usize::from(n),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

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
        // -1 is Kaniko's (and zlib's) "the default level".
        let level = self.compression_level.filter(|l| *l != -1);
        let compression = match (self.compression, level) {
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
        let registry = self.registry_options(
            std::env::var(REGISTRY_MIRROR_ENV).ok(),
            std::env::var(REGISTRY_MAP_ENV).ok(),
        )?;
        let isolation = choose_isolation(
            self.isolation,
            self.isolation_explicit,
            self.userns == cli::UsernsMode::Auto,
            probe::probe_chroot,
            probe::in_container,
        )?;
        let in_place = isolation.isolation == Isolation::None;
        Ok(BuildOptions {
            jobs: if in_place { 1 } else { self.jobs() },
            plan: self.plan_options()?,
            context_source: Some(self.context_spec()?),
            destinations: self.destination.clone(),
            no_push: self.no_push,
            check_push_permission: !self.skip_push_permission_check && !self.no_push,
            oci_layout_path: self.oci_layout_path.clone(),
            tar_path: self.tar_path.clone(),
            digest_file: self.digest_file.clone(),
            image_name_with_digest_file: self.image_name_with_digest_file.clone(),
            image_name_tag_with_digest_file: self.image_name_tag_with_digest_file.clone(),
            single_snapshot: self.single_snapshot,
            force_build_metadata: self.force_build_metadata,
            cleanup: self.cleanup,
            image_fs_extract_retry: self.image_fs_extract_retry,
            reproducible: self.reproducible || source_date_epoch.is_some(),
            source_date_epoch,
            compression,
            labels,
            isolation: isolation.isolation,
            isolation_notice: isolation.notice,
            // In place there is nothing to mount an overlay on: `/` is the
            // rootfs, so --isolation none always walks.
            // Overlayfs refuses to be an idmapped mount itself, which
            // --userns auto needs of the rootfs (docs/security.md).
            snapshotter: Some(match (in_place, self.snapshotter) {
                (true, _) | (_, cli::SnapshotterKind::Walk) => SnapshotterKind::Walk,
                _ if self.userns == cli::UsernsMode::Auto => SnapshotterKind::Walk,
                (false, cli::SnapshotterKind::Overlay) => SnapshotterKind::Overlay,
            }),
            state_dir: self.state_dir(),
            mountable_layers: self.mountable_layers,
            rehash_layer_images: self.rehash_layer_images,
            registry,
            force: self.force,
            network: match self.network {
                cli::NetworkMode::None => NetworkMode::None,
                cli::NetworkMode::Default | cli::NetworkMode::Host => NetworkMode::Host,
            },
            run_security: self.run_security()?,
            allow_insecure: self.allow_insecure()?,
            ignore_paths: self.ignore_paths(),
            log: crate::log::Logger::stderr(self.log_config()),
            cache: CacheOptions {
                enabled: self.cache,
                // --no-push-cache: look up, write nothing (Kaniko's meaning).
                mode: match (self.cache_mode, self.no_push_cache) {
                    (cli::CacheMode::ReadWrite, false) => CacheMode::ReadWrite,
                    (cli::CacheMode::ReadWrite | cli::CacheMode::ReadOnly, _) => {
                        CacheMode::ReadOnly
                    }
                    (cli::CacheMode::WriteOnly, false) => CacheMode::WriteOnly,
                    (cli::CacheMode::WriteOnly, true) => {
                        return Err(OptionsError::NoPushCacheWriteOnly);
                    }
                },
                repo: self
                    .cache_repo
                    .as_deref()
                    .map(parse_cache_repo)
                    .transpose()?,
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
    /// `--cache-dir`, else Kaniko's `--kaniko-dir` (or `KANIKO_DIR`, which
    /// clap has already folded into it), else [`default_state_dir`].
    pub fn state_dir(&self) -> PathBuf {
        self.cache_dir
            .clone()
            .or_else(|| self.kaniko_dir.clone())
            .unwrap_or_else(default_state_dir)
    }

    /// `--ignore-path`s, plus `/var/run` unless `--ignore-var-run=false`
    /// (Kaniko's default: what a pod mounts there, such as service account
    /// secrets or a docker socket, never belongs in the image).
    pub fn ignore_paths(&self) -> Vec<PathBuf> {
        let mut paths = self.ignore_path.clone();
        if self.ignore_var_run {
            paths.push(PathBuf::from("/var/run"));
        }
        paths
    }

    /// The registry client's settings from the registry flags and Kaniko's
    /// environment variables (`KANIKO_REGISTRY_MIRROR`: mirrors separated
    /// by `,` or `;`; `KANIKO_REGISTRY_MAP`: as `--registry-map`), which
    /// add to the flags as they do in Kaniko.
    pub fn registry_options(
        &self,
        env_mirrors: Option<String>,
        env_map: Option<String>,
    ) -> Result<RegistryOptions, OptionsError> {
        let mut opts = RegistryOptions {
            insecure: self.insecure,
            insecure_pull: self.insecure_pull,
            insecure_registries: self.insecure_registry.clone(),
            skip_tls_verify: self.skip_tls_verify,
            skip_tls_verify_pull: self.skip_tls_verify_pull,
            skip_tls_verify_registries: self.skip_tls_verify_registry.clone(),
            pull_retries: self.image_download_retry,
            push_retries: self.push_retry,
            skip_default_registry_fallback: self.skip_default_registry_fallback,
            push_ignore_immutable_tag_errors: self.push_ignore_immutable_tag_errors,
            ..RegistryOptions::default()
        };
        for c in &self.registry_certificate {
            match c.split_once('=') {
                Some((reg, path)) if !reg.is_empty() && !path.is_empty() => opts
                    .registry_ca_certificates
                    .entry(reg.to_string())
                    .or_default()
                    .push(PathBuf::from(path)),
                Some(_) => return Err(OptionsError::RegistryCertificate(c.clone())),
                // A bare path (kiln before Kaniko's form): every registry.
                None => opts.ca_certificates.push(PathBuf::from(c)),
            }
        }
        for c in &self.registry_client_cert {
            let parsed = c
                .split_once('=')
                .and_then(|(reg, files)| Some((reg, files.split_once(',')?)))
                .filter(|(reg, (cert, key))| {
                    !reg.is_empty() && !cert.is_empty() && !key.is_empty()
                });
            let Some((reg, (cert, key))) = parsed else {
                return Err(OptionsError::RegistryClientCert(c.clone()));
            };
            opts.client_certificates
                .insert(reg.to_string(), (PathBuf::from(cert), PathBuf::from(key)));
        }
        opts.mirrors = self
            .registry_mirror
            .iter()
            .cloned()
            .chain(env_mirrors.iter().flat_map(|v| {
                v.split([',', ';'])
                    .map(str::trim)
                    .filter(|m| !m.is_empty())
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            }))
            .collect();
        for m in &self.registry_map {
            opts.registry_maps.extend(
                parse_registry_map(m)
                    .ok_or_else(|| OptionsError::RegistryMap("--registry-map", m.clone()))?,
            );
        }
        if let Some(m) = env_map.filter(|m| !m.trim().is_empty()) {
            opts.registry_maps.extend(
                parse_registry_map(&m)
                    .ok_or_else(|| OptionsError::RegistryMap("KANIKO_REGISTRY_MAP", m.clone()))?,
            );
        }
        Ok(opts)
    }

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

/// `--cache-repo registry/path`: a repository, as Kaniko takes it; a tag
/// or digest is refused (kiln names the tags itself).
pub fn parse_cache_repo(repo: &str) -> Result<crate::registry::ImageRef, OptionsError> {
    let invalid = |reason: String| OptionsError::CacheRepo {
        repo: repo.to_owned(),
        reason,
    };
    if repo.starts_with("oci:") {
        return Err(invalid(
            "a local OCI layout as the cache is not supported: the embedded cache in \
             --cache-dir is the local one"
                .into(),
        ));
    }
    let parsed = crate::registry::ImageRef::parse(repo).map_err(|e| invalid(e.to_string()))?;
    let last = repo.rsplit('/').next().unwrap_or(repo);
    if parsed.digest().is_some() || last.contains(':') {
        return Err(invalid(
            "give a repository without a tag or digest (kiln tags its entries kiln-<key>)".into(),
        ));
    }
    Ok(parsed)
}

/// `--registry-map` values: `orig=m1;m2` (mirrors of one registry,
/// separated by `;` or `,`), several registries as `a=m1;b=m2`; `None` when
/// a mirror comes before any `ORIGINAL=` or a part is empty.
pub fn parse_registry_map(value: &str) -> Option<Vec<(String, Vec<String>)>> {
    let mut out: Vec<(String, Vec<String>)> = Vec::new();
    for part in value
        .split([';', ','])
        .map(str::trim)
        .filter(|p| !p.is_empty())
    {
        match part.split_once('=') {
            Some((orig, mirror)) => {
                let (orig, mirror) = (orig.trim(), mirror.trim());
                if orig.is_empty() || mirror.is_empty() {
                    return None;
                }
                out.push((orig.to_string(), vec![mirror.to_string()]));
            }
            None => out.last_mut()?.1.push(part.to_string()),
        }
    }
    (!out.is_empty()).then_some(out)
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

/// A duration as Go's `time.ParseDuration` reads it, as Kaniko takes
/// `--cache-ttl`: one or more decimal numbers, each with an optional
/// fraction and a unit (`ns`, `us`/`µs`, `ms`, `s`, `m`, `h`), such as
/// `336h0m0s`, `1h30m`, `1.5h`, `90s`, `500ms`; `0` alone is zero. kiln also
/// takes days (`7d`). Negative durations, a number without a unit and
/// anything else are `None`.
pub fn parse_duration(text: &str) -> Option<std::time::Duration> {
    let mut rest = text.trim().strip_prefix('+').unwrap_or(text.trim());
    if rest == "0" {
        return Some(std::time::Duration::ZERO);
    }
    if rest.is_empty() {
        return None;
    }
    let mut total_nanos: u128 = 0;
    while !rest.is_empty() {
        let number_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(number_len);
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty() && fraction.is_empty() || fraction.contains('.') {
            return None;
        }
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => 1_000_000_000,
            "m" => 60_000_000_000,
            "h" => 3_600_000_000_000,
            "d" => 86_400_000_000_000,
            _ => return None,
        };
        let whole: u128 = if whole.is_empty() {
            0
        } else {
            whole.parse().ok()?
        };
        let mut part = whole.checked_mul(unit_nanos)?;
        // The fraction's digits, scaled exactly (Go keeps nanoseconds).
        let mut scale = unit_nanos;
        for digit in fraction.bytes() {
            scale /= 10;
            part = part.checked_add(u128::from(digit - b'0') * scale)?;
        }
        total_nanos = total_nanos.checked_add(part)?;
        rest = next;
    }
    let secs = u64::try_from(total_nanos / 1_000_000_000).ok()?;
    Some(std::time::Duration::new(
        secs,
        (total_nanos % 1_000_000_000) as u32,
    ))
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

    fn denied() -> Result<(), IsolationDenied> {
        Err(IsolationDenied {
            call: "unshare(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS)",
            errno: libc::EPERM,
        })
    }

    fn docker() -> Option<String> {
        Some("/.dockerenv exists".into())
    }

    #[test]
    fn a_default_chroot_falls_back_in_place_only_in_a_container() {
        let chosen =
            choose_isolation(cli::Isolation::Chroot, false, false, denied, docker).unwrap();
        assert_eq!(chosen.isolation, Isolation::None);
        let notice = chosen.notice.unwrap();
        assert!(
            notice.contains("--isolation none")
                && notice.contains("Operation not permitted")
                && notice.contains("/.dockerenv")
                && !notice.contains('\n'),
            "{notice}"
        );

        let outside = choose_isolation(cli::Isolation::Chroot, false, false, denied, || None)
            .unwrap_err()
            .to_string();
        assert!(
            outside.contains("--isolation none") && outside.contains("CAP_SYS_ADMIN"),
            "{outside}"
        );
    }

    #[test]
    fn an_explicit_chroot_or_userns_auto_never_falls_back() {
        for (explicit, userns) in [(true, false), (false, true)] {
            let err = choose_isolation(cli::Isolation::Chroot, explicit, userns, denied, docker)
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("--isolation none") && err.contains("CAP_SYS_ADMIN"),
                "{err}"
            );
        }
    }

    #[test]
    fn isolation_stays_as_asked_when_the_kernel_allows_it() {
        let ok = || Ok(());
        let chosen = choose_isolation(cli::Isolation::Chroot, false, false, ok, docker).unwrap();
        assert_eq!(
            chosen,
            IsolationChoice {
                isolation: Isolation::Chroot,
                notice: None
            }
        );
        // `none` is not probed at all.
        let none = choose_isolation(
            cli::Isolation::None,
            true,
            false,
            || panic!("probed"),
            || None,
        )
        .unwrap();
        assert_eq!(none.isolation, Isolation::None);
    }

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

    fn args(a: &[&str]) -> ExecutorArgs {
        use clap::Parser;
        ExecutorArgs::try_parse_from(std::iter::once("kiln-executor").chain(a.iter().copied()))
            .unwrap()
    }

    #[test]
    fn registry_maps_take_several_mirrors_and_several_registries() {
        assert_eq!(
            parse_registry_map("index.docker.io=mirror.gcr.io;m2.example/cache"),
            Some(vec![(
                "index.docker.io".into(),
                vec!["mirror.gcr.io".into(), "m2.example/cache".into()]
            )])
        );
        assert_eq!(
            parse_registry_map("a.example=m1.example;b.example=m2.example,m3.example"),
            Some(vec![
                ("a.example".into(), vec!["m1.example".into()]),
                (
                    "b.example".into(),
                    vec!["m2.example".into(), "m3.example".into()]
                ),
            ])
        );
        assert_eq!(parse_registry_map("m1.example"), None);
        assert_eq!(parse_registry_map("=m1.example"), None);
        assert_eq!(parse_registry_map("a.example="), None);
        assert_eq!(parse_registry_map(""), None);
    }

    #[test]
    fn registry_flags_and_kaniko_environment_become_client_options() {
        let a = args(&[
            "--registry-certificate",
            "reg.example=/ca/reg.pem",
            "--registry-certificate=/ca/all.pem",
            "--registry-client-cert",
            "reg.example:5000=/c.pem,/k.pem",
            "--registry-mirror",
            "mirror.example/cache",
            "--registry-map",
            "quay.io=q.example",
            "--skip-tls-verify-registry",
            "self.example",
            "--skip-tls-verify-registry=other.example",
            "--skip-default-registry-fallback",
            "--push-ignore-immutable-tag-errors=true",
            "--push-retry",
            "2",
        ]);
        let o = a
            .registry_options(
                Some("m2.example, m3.example;m4.example".into()),
                Some("ghcr.io=g.example".into()),
            )
            .unwrap();
        assert_eq!(
            o.registry_ca_certificates.get("reg.example"),
            Some(&vec![PathBuf::from("/ca/reg.pem")])
        );
        assert_eq!(o.ca_certificates, vec![PathBuf::from("/ca/all.pem")]);
        assert_eq!(
            o.client_certificates.get("reg.example:5000"),
            Some(&(PathBuf::from("/c.pem"), PathBuf::from("/k.pem")))
        );
        assert_eq!(
            o.mirrors,
            [
                "mirror.example/cache",
                "m2.example",
                "m3.example",
                "m4.example"
            ]
        );
        assert_eq!(
            o.registry_maps,
            vec![
                ("quay.io".to_string(), vec!["q.example".to_string()]),
                ("ghcr.io".to_string(), vec!["g.example".to_string()]),
            ]
        );
        assert_eq!(
            o.skip_tls_verify_registries,
            ["self.example", "other.example"]
        );
        assert!(o.skip_default_registry_fallback && o.push_ignore_immutable_tag_errors);
        assert_eq!(o.push_retries, 2);
        for bad in ["reg.example=/c.pem", "/c.pem,/k.pem", "reg.example=,/k.pem"] {
            let a = args(&["--registry-client-cert", bad]);
            assert!(
                matches!(
                    a.registry_options(None, None),
                    Err(OptionsError::RegistryClientCert(_))
                ),
                "{bad}"
            );
        }
        let a = args(&["--registry-map", "just-a-mirror.example"]);
        assert!(a.registry_options(None, None).is_err());
        assert!(args(&[]).registry_options(None, Some("x".into())).is_err());
    }

    #[test]
    fn push_permission_is_checked_unless_skipped_or_not_pushing() {
        let check = |a: &[&str]| args(a).build_options().unwrap().check_push_permission;
        assert!(check(&["-d", "r.example/a:1"]));
        assert!(!check(&[
            "-d",
            "r.example/a:1",
            "--skip-push-permission-check"
        ]));
        assert!(!check(&["-d", "r.example/a:1", "--no-push"]));
    }

    #[test]
    fn cache_repos_are_repositories_without_tag_or_digest() {
        let r = parse_cache_repo("registry.example.com:5000/team/cache").unwrap();
        assert_eq!(r.registry(), "registry.example.com:5000");
        assert_eq!(r.repository(), "team/cache");
        assert!(parse_cache_repo("localhost:5000/cache").is_ok());
        assert!(parse_cache_repo("example.com/cache:v1").is_err());
        assert!(
            parse_cache_repo(&format!(
                "example.com/cache@{}",
                kiln_common::Digest::of_bytes(b"x")
            ))
            .is_err()
        );
        assert!(parse_cache_repo("Example.com/Cache").is_err());
        let err = parse_cache_repo("oci:/var/cache/layout").unwrap_err();
        assert!(err.to_string().contains("--cache-dir"), "{err}");
    }

    #[test]
    fn no_push_cache_reads_but_never_writes() {
        use clap::Parser;
        let args = |extra: &[&str]| {
            let mut v = vec!["kiln-executor", "--no-push"];
            v.extend_from_slice(extra);
            ExecutorArgs::try_parse_from(v).unwrap().build_options()
        };
        let mode = args(&["--cache-repo", "example.com/cache", "--no-push-cache"])
            .unwrap()
            .cache
            .mode;
        assert!(mode.reads() && !mode.writes());
        let mode = args(&["--no-push-cache=false"]).unwrap().cache.mode;
        assert!(mode.reads() && mode.writes());
        assert!(matches!(
            args(&["--no-push-cache", "--cache-mode", "write-only"]),
            Err(OptionsError::NoPushCacheWriteOnly)
        ));
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

    #[test]
    fn cache_ttl_takes_go_durations_and_rejects_the_rest() {
        use std::time::Duration;
        let h = |n: u64| Duration::from_secs(n * 3600);
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("336h0m0s"), Some(h(336)));
        assert_eq!(parse_duration("1.5h"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration(".5m"), Some(Duration::from_secs(30)));
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(
            parse_duration("1m1.5s"),
            Some(Duration::from_millis(61_500))
        );
        assert_eq!(parse_duration("2us"), Some(Duration::from_nanos(2000)));
        assert_eq!(parse_duration("3ns"), Some(Duration::from_nanos(3)));
        assert_eq!(parse_duration("0"), Some(Duration::ZERO));
        for bad in [
            "", "-1h", "1.2.3h", "1hh", "h1", "1 h", "1h 30m", ".h", "2weeks",
        ] {
            assert_eq!(parse_duration(bad), None, "{bad:?}");
        }
        let mut args = <ExecutorArgs as clap::Parser>::try_parse_from([
            "kiln-executor",
            "--no-push",
            "--cache-ttl=1.5d2x",
        ])
        .unwrap();
        let err = args.build_options().err().unwrap().to_string();
        assert!(
            err.contains("--cache-ttl \"1.5d2x\"") && err.contains("1h30m"),
            "{err}"
        );
        args.cache_ttl = "1h30m".into();
        let ttl = args.build_options().unwrap().cache.ttl;
        assert_eq!(ttl, Some(Duration::from_secs(5400)));
    }

    #[test]
    fn kaniko_dir_is_the_state_directory_unless_cache_dir_is_given() {
        let parse = |args: &[&str]| {
            <ExecutorArgs as clap::Parser>::try_parse_from(
                std::iter::once("kiln-executor").chain(args.iter().copied()),
            )
            .unwrap()
        };
        assert_eq!(parse(&["--kaniko-dir=/k"]).state_dir(), PathBuf::from("/k"));
        assert_eq!(
            parse(&["--kaniko-dir=/k", "--cache-dir", "/c"]).state_dir(),
            PathBuf::from("/c")
        );
    }

    #[test]
    fn var_run_is_ignored_unless_asked_to_keep_it() {
        let parse = |args: &[&str]| {
            <ExecutorArgs as clap::Parser>::try_parse_from(
                std::iter::once("kiln-executor").chain(args.iter().copied()),
            )
            .unwrap()
        };
        let var_run = PathBuf::from("/var/run");
        assert!(parse(&[]).ignore_paths().contains(&var_run));
        assert!(
            !parse(&["--ignore-var-run=false"])
                .ignore_paths()
                .contains(&var_run)
        );
        assert!(
            !parse(&["--whitelist-var-run=false"])
                .ignore_paths()
                .contains(&var_run)
        );
        assert_eq!(
            parse(&[
                "--ignore-path",
                "/a",
                "--ignore-var-run=false",
                "--ignore-path=/b"
            ])
            .ignore_paths(),
            [PathBuf::from("/a"), PathBuf::from("/b")]
        );
    }
}
