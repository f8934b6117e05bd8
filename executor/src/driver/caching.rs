//! The cache around the steps: keys for every step, one batch lookup,
//! descriptor-only hits, background uploads, and fetching layer blobs from
//! the cache (or, for base layers, the registry) only when needed.

use super::*;
use crate::cache::CacheError;

impl Driver {
    /// One batch lookup for every filesystem step of the build.
    pub(super) fn lookup_keys(&mut self) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.reads() {
            return;
        }
        let chains = self.keys.chains();
        let mut wanted: Vec<CacheKey> = chains.iter().flatten().copied().collect();
        wanted.sort();
        wanted.dedup();
        let started = Instant::now();
        let answer = cache.lookup_chains(&chains);
        self.lookup_ms = started.elapsed().as_millis() as u64;
        match answer {
            Ok(hits) => {
                self.log(&format!(
                    "cache: {} of {} steps found in {} ({} ms)",
                    hits.len(),
                    wanted.len(),
                    cache.location(),
                    started.elapsed().as_millis()
                ));
                self.hits = hits;
            }
            Err(e) => {
                self.warn(&format!(
                    "the cache is unavailable, building without it: {e}"
                ));
                self.cache = None;
            }
        }
    }

    /// Lets the cache make the writes it held back (the registry cache's
    /// tags), once every upload is done; hits whose layer could not be had
    /// are left out, so no new entry repeats them. A failure is a warning.
    pub(super) fn finish_cache(&mut self) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.writes() {
            return;
        }
        let mut chains = self.keys.chains();
        for chain in &mut chains {
            chain.retain(|k| !self.lost_hits.contains(k));
        }
        if let Err(e) = cache.finish(&chains) {
            self.opts
                .log
                .warn(&format!("writing the cache failed: {e}"));
        }
    }

    /// A filesystem step whose key hit takes the cached layer (descriptor
    /// only: nothing is downloaded until a later step needs the files);
    /// otherwise the step runs and its result is uploaded in the background.
    pub(super) fn cached_or_run(
        &mut self,
        plan: &Plan,
        stage: &Stage,
        ins: &PlannedInstruction,
        step_key: Option<&StepKey>,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) -> Result<Applied, StepError> {
        let Some(step_key) = step_key.filter(|k| k.filesystem) else {
            return self.instruction(plan, stage, ins, builder, state);
        };
        if self.defer_snapshot {
            // Its changes go into the stage's single snapshot: there is no
            // result of its own to look up or to upload.
            let applied = self.instruction(plan, stage, ins, builder, state)?;
            return Ok(Applied {
                outcome: ran(applied.outcome),
                ..applied
            });
        }
        let created_by = history_text(ins);
        if let Some(entry) = self.hits.get(&step_key.key).cloned() {
            let layer = entry.layer.map(|layer| LayerRef {
                desc: Descriptor::new(&layer.media_type, layer.digest.clone(), layer.size),
                diff_id: layer.diff_id.clone(),
                blob: self.store.path(&layer.digest),
                hit: Some(step_key.key),
            });
            apply_recorded(ins, layer.clone(), &created_by, builder, state);
            return Ok(Applied {
                outcome: StepOutcome::Hit,
                layer,
                times: PhaseTimes::default(),
            });
        }
        let applied = self.instruction(plan, stage, ins, builder, state)?;
        let layer = &applied.layer;
        // A hit the cache could not deliver was built here; the cache keeps
        // its entry (another executor's result, as good as this one).
        if self.lost_hits.contains(&step_key.key) {
            return Ok(Applied {
                outcome: StepOutcome::Miss,
                ..applied
            });
        }
        let entry = CacheEntry {
            layer: layer.as_ref().map(|l| LayerDescriptor {
                media_type: l.desc.media_type.clone(),
                digest: l.desc.digest.clone(),
                size: l.desc.size,
                diff_id: l.diff_id.clone(),
            }),
            created_by,
            created: rfc3339(unix_now()),
            extra: BTreeMap::new(),
        };
        let blob = layer
            .as_ref()
            .map(|l| (l.desc.digest.clone(), l.blob.clone()));
        self.upload(step_key.key, entry, blob);
        Ok(Applied {
            outcome: ran(applied.outcome),
            ..applied
        })
    }

    /// A step that already ran in this build, before a restart: its layer
    /// (or none) is taken as it was, like a hit whose bytes are local.
    pub(super) fn replay(
        &mut self,
        ins: &PlannedInstruction,
        done: &RanStep,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) {
        apply_recorded(ins, done.layer.clone(), &history_text(ins), builder, state);
    }

    pub(super) fn upload(
        &mut self,
        key: CacheKey,
        entry: CacheEntry,
        blob: Option<(Digest, PathBuf)>,
    ) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.writes() {
            return;
        }
        self.uploads.push(std::thread::spawn(move || {
            let started = Instant::now();
            let mut bytes = 0;
            if let Some((digest, path)) = &blob {
                cache.put_blob(digest, path)?;
                bytes = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            }
            cache.put_entry(&key, &entry)?;
            Ok(UploadDone {
                key,
                bytes,
                millis: started.elapsed().as_millis() as u64,
            })
        }));
    }

    /// Waits for the background uploads; a failed upload is a warning.
    pub(super) fn wait_uploads(&mut self) -> u64 {
        let mut total = 0;
        for handle in std::mem::take(&mut self.uploads) {
            match handle.join() {
                Ok(Ok(done)) => {
                    total += done.bytes;
                    self.uploaded.push(done);
                }
                Ok(Err(e)) => self.warn(&format!("uploading to the cache failed: {e}")),
                Err(_) => self.warn("a cache upload panicked"),
            }
        }
        total
    }

    /// Makes sure a layer's blob is in the local store, from the cache.
    /// A base-image layer is tried in the cache first and otherwise pulled
    /// from its registry, then shared through the cache so the cluster pulls
    /// each base layer from outside once. A cache hit's layer that the cache
    /// cannot deliver intact is recorded as lost (see [`Driver::lose_hit`]).
    pub(super) fn ensure_blob(&mut self, layer: &LayerRef) -> Result<(), StepError> {
        if layer.blob.is_file() {
            return Ok(());
        }
        let digest = layer.desc.digest.clone();
        let mut cache_error = None;
        if let Some(cache) = self.cache.clone().filter(|_| self.opts.cache.mode.reads()) {
            let _progress = self.opts.log.progress(
                &format!("fetching layer {digest} from the cache"),
                Some(layer.desc.size),
                crate::log::bytes_received(),
            );
            match cache.fetch_blob(&digest, layer.desc.size, &self.store) {
                Ok(_) => {
                    self.bytes_downloaded += layer.desc.size;
                    return Ok(());
                }
                Err(e) => cache_error = Some(e),
            }
        }
        let is_base = self.base_layers.contains_key(&digest);
        if let (Some(key), Some(e), false) = (layer.hit, &cache_error, is_base) {
            return Err(self.lose_hit(key, &digest, kiln_common::errors::chain(e)));
        }
        if let Some(e) = cache_error
            .as_ref()
            .filter(|e| !matches!(e, CacheError::NotFound(_)))
            && is_base
        {
            self.warn(&format!(
                "the cache could not deliver base layer {digest} ({e}); pulling it from the registry"
            ));
        }
        let Some((pulled, base_layer)) = self.base_layers.get(&digest).cloned() else {
            return Err(match cache_error {
                Some(source) => StepError::Cache {
                    what: format!("fetching layer {digest} from the cache"),
                    source,
                },
                None => StepError::invalid(format!(
                    "layer {digest} is not available locally and there is no cache"
                )),
            });
        };
        self.log(&format!(
            "pulling layer {digest} ({} bytes)",
            layer.desc.size
        ));
        let _progress = self.opts.log.progress(
            &format!("pulling layer {digest}"),
            Some(layer.desc.size),
            crate::log::bytes_received(),
        );
        self.runtime
            .block_on(
                self.client
                    .fetch_blob(&pulled, &base_layer.desc, &self.store),
            )
            .map_err(|source| StepError::Registry {
                what: format!("pulling base layer {digest}"),
                source,
            })?;
        self.share_base_layer(&pulled, &base_layer);
        Ok(())
    }

    /// Records that the layer of hit `key` cannot be had; the build loop
    /// turns the hit into a miss and starts over. Returns the message for
    /// the error that unwinds to it.
    pub(super) fn lose_hit(&mut self, key: CacheKey, digest: &Digest, reason: String) -> StepError {
        self.lost_pending = Some(LostHit {
            key,
            digest: digest.clone(),
            reason: reason.clone(),
        });
        StepError::LostHit {
            digest: digest.clone(),
            reason,
        }
    }

    pub(super) fn context_digest(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<[u8; 32], StepError> {
        let from_context: Vec<String> = sources
            .iter()
            .filter(|s| !s.starts_with("<<"))
            .cloned()
            .collect();
        if from_context.is_empty() {
            return Ok([0; 32]);
        }
        let selections = self.select_context(&from_context, excludes)?;
        let ctx = self.context()?;
        Ok(ctx.digest(&selections)?)
    }

    /// COPY/ADD sources in the context, minus `--exclude` patterns (matched
    /// against paths relative to each source, with .dockerignore rules).
    pub(super) fn select_context(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<Vec<crate::context::Selection>, StepError> {
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(DockerIgnore::parse(
                &excludes.join("\n"),
                Path::new("--exclude"),
            )?)
        };
        let ctx = self.context()?;
        let mut selections = ctx.select(sources)?;
        if let Some(exclude) = exclude {
            for sel in &mut selections {
                let root = sel.root.clone();
                sel.entries.retain(|&i| {
                    let path = &ctx.entry(i).path;
                    let relative = path
                        .strip_prefix(&root)
                        .unwrap_or(path)
                        .trim_start_matches('/');
                    let relative = if relative.is_empty() {
                        root.rsplit('/').next().unwrap_or("")
                    } else {
                        relative
                    };
                    relative.is_empty() || !exclude.is_excluded(relative)
                });
            }
            selections.retain(|s| !s.entries.is_empty());
        }
        Ok(selections)
    }

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
                            let rel = crate::context::clean_relative(&source).ok_or_else(|| {
                                StepError::invalid(format!(
                                    "--mount source {source:?} is outside the build context"
                                ))
                            })?;
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

    /// Downloads or clones a remote ADD source once per build.
    pub(super) fn fetch_remote(
        &mut self,
        source: &str,
        checksum: Option<&str>,
        keep_git_dir: bool,
    ) -> Result<remote::RemoteSource, StepError> {
        if let Some(r) = self.remote.get(source) {
            return Ok(r.clone());
        }
        self.scratch_counter += 1;
        let dir = self.work.join(format!("remote-{}", self.scratch_counter));
        let fetched = if remote::is_git(source) {
            if checksum.is_some() {
                return Err(remote::RemoteError::ChecksumOnGit.into());
            }
            self.log(&format!("cloning {source}"));
            remote::clone(source, keep_git_dir, &dir)?
        } else {
            self.log(&format!("downloading {source}"));
            let client = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(remote::RemoteError::Client)?;
            self.runtime
                .block_on(remote::download(&client, source, checksum, &dir))?
        };
        self.remote.insert(source.to_owned(), fetched.clone());
        Ok(fetched)
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

/// What a step that ran reports: `miss` for a filesystem step, `none` for
/// a metadata step.
fn ran(outcome: StepOutcome) -> StepOutcome {
    match outcome {
        StepOutcome::None => StepOutcome::None,
        _ => StepOutcome::Miss,
    }
}

/// Applies a step's recorded result (a hit's or an earlier run's) to the
/// stage without running it: the layer is added by descriptor, and the
/// stack is rebuilt from the layers when a later step needs it (unpacked
/// layers are reused by diff_id).
pub(super) fn apply_recorded(
    ins: &PlannedInstruction,
    layer: Option<LayerRef>,
    created_by: &str,
    builder: &mut ConfigBuilder,
    state: &mut StageState,
) {
    if let Instruction::Workdir(dir) = &ins.instruction {
        builder.set_workdir(dir);
    }
    let Some(layer) = layer else {
        builder.add_empty_history(created_by);
        return;
    };
    state.layers.push(layer.clone());
    state.lowers = None;
    builder.add_layer(layer.diff_id, created_by);
}
