//! RUN --mount: cache, bind, tmpfs and secret mounts of a RUN step, and
//! the files secrets are read from.

use super::*;

impl Driver {
    /// RUN --mount: what to mount where, and environment variables for
    /// secrets exposed with `env=`. Secret values never reach a layer (the
    /// runner removes the mount points it created) nor a cache key (only the
    /// mount's options are part of the instruction text).
    pub(super) fn run_mounts(
        &mut self,
        plan: &Plan,
        mounts: &[dockerfile::Mount],
        workdir: &Path,
    ) -> Result<RunMounts, StepError> {
        use dockerfile::MountType;
        let mut specs = Vec::new();
        let mut env = Vec::new();
        for m in mounts {
            let target = m
                .target
                .as_deref()
                .map(|t| copy::absolute_in_image(workdir, t));
            match m.kind {
                MountType::Bind => {
                    let target = target
                        .ok_or_else(|| StepError::invalid("--mount=type=bind needs a target"))?;
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    let host = match &m.from {
                        None => {
                            let rel = crate::sources::context::clean_relative(&source).ok_or_else(
                                || {
                                    StepError::invalid(format!(
                                        "--mount source {source:?} is outside the build context"
                                    ))
                                },
                            )?;
                            let host = self.opts.plan.context.join(rel);
                            if fs::symlink_metadata(&host).is_err() {
                                return Err(StepError::invalid(format!(
                                    "--mount source {source:?}: not found in the build context"
                                )));
                            }
                            host
                        }
                        Some(from) => {
                            let roots = match stage_index(plan, from) {
                                Some(index) => {
                                    self.stage_sources(index, std::slice::from_ref(&source))?
                                }
                                None => self.image_sources(from, std::slice::from_ref(&source))?,
                            };
                            roots
                                .first()
                                .map(|r| r.entries[0].host.clone())
                                .ok_or_else(|| {
                                    StepError::invalid(format!(
                                        "--mount source {source:?} not found in {from}"
                                    ))
                                })?
                        }
                    };
                    specs.push(MountSpec::Bind {
                        source: host,
                        target,
                        readonly: m.readonly,
                    });
                }
                MountType::Cache => {
                    let target = target
                        .ok_or_else(|| StepError::invalid("--mount=type=cache needs a target"))?;
                    let id = m.id.clone().unwrap_or_else(|| target.display().to_string());
                    let dir = self
                        .opts
                        .state_dir
                        .join("run-cache")
                        .join(blake3::hash(id.as_bytes()).to_hex().as_str());
                    if !dir.is_dir() {
                        fs::create_dir_all(&dir)
                            .map_err(|e| StepError::io(format!("creating cache mount {id}"), e))?;
                        use std::os::unix::fs::PermissionsExt;
                        fs::set_permissions(
                            &dir,
                            fs::Permissions::from_mode(m.mode.unwrap_or(0o755)),
                        )
                        .map_err(|e| StepError::io(format!("cache mount {id}"), e))?;
                        std::os::unix::fs::chown(
                            &dir,
                            Some(m.uid.unwrap_or(0)),
                            Some(m.gid.unwrap_or(0)),
                        )
                        .map_err(|e| StepError::io(format!("cache mount {id}"), e))?;
                    }
                    specs.push(MountSpec::Bind {
                        source: dir,
                        target,
                        readonly: m.readonly,
                    });
                }
                MountType::Tmpfs => {
                    let target = target
                        .ok_or_else(|| StepError::invalid("--mount=type=tmpfs needs a target"))?;
                    specs.push(MountSpec::Tmpfs {
                        target,
                        size_bytes: m.size,
                    });
                }
                MountType::Secret => {
                    let id =
                        m.id.clone()
                            .or_else(|| {
                                target
                                    .as_ref()
                                    .and_then(|t| t.file_name())
                                    .map(|n| n.to_string_lossy().into_owned())
                            })
                            .ok_or_else(|| {
                                StepError::invalid("--mount=type=secret needs an id or a target")
                            })?;
                    let Some(path) = self.secret_file(&id)? else {
                        if m.required {
                            return Err(StepError::invalid(format!(
                                "secret {id} is required but no --secret id={id} was given"
                            )));
                        }
                        continue;
                    };
                    if let Some(var) = &m.env {
                        let value = fs::read_to_string(&path)
                            .map_err(|e| StepError::io(format!("reading secret {id}"), e))?;
                        env.push((var.clone(), value));
                        if m.target.is_none() {
                            continue;
                        }
                    }
                    specs.push(MountSpec::Bind {
                        source: path,
                        target: target.unwrap_or_else(|| PathBuf::from("/run/secrets").join(&id)),
                        readonly: true,
                    });
                }
                MountType::Ssh => {
                    return Err(StepError::invalid(
                        "RUN --mount=type=ssh is not supported: kiln has no SSH agent forwarding",
                    ));
                }
            }
        }
        Ok((specs, env))
    }

    /// The file holding secret `id` (`--secret id=..,src=..` or `env=..`).
    pub(super) fn secret_file(&mut self, id: &str) -> Result<Option<PathBuf>, StepError> {
        let Some(secret) = self.opts.secrets.iter().find(|s| s.id == id).cloned() else {
            return Ok(None);
        };
        match secret.source {
            SecretSource::File(path) => Ok(Some(path)),
            SecretSource::Env(var) => {
                let value = std::env::var(&var)
                    .map_err(|_| StepError::invalid(format!("secret {id}: ${var} is not set")))?;
                let dir = self.work.join("secrets");
                private_dir(&dir)?;
                let path = dir.join(blake3::hash(id.as_bytes()).to_hex().as_str());
                fs::write(&path, value)
                    .map_err(|e| StepError::io(format!("writing secret {id}"), e))?;
                Ok(Some(path))
            }
        }
    }
}
