//! Building a stage: metadata instructions edit the config, filesystem steps
//! run in a snapshotter's writable rootfs and become layers; the lower
//! stack is materialised once per layer and reused.

use super::*;

impl Driver {
    pub(super) fn build_stage(&mut self, plan: &Plan, stage: &Stage) -> Result<(), BuildError> {
        let mut state = match &stage.source {
            StageSource::Image(name) => {
                let base =
                    self.resolved
                        .bases
                        .get(name)
                        .cloned()
                        .ok_or_else(|| BuildError::Base {
                            reference: name.clone(),
                            source: BaseError::NotResolved,
                        })?;
                StageState {
                    config: base.config,
                    layers: base.layers,
                    lowers: None,
                    registry_ref: base.registry_ref,
                }
            }
            StageSource::Stage(parent) => {
                let mut parent = self.stages.get(parent).cloned().ok_or_else(|| {
                    BuildError::Internal(format!(
                        "stage {parent} was not built before stage {}",
                        stage.index
                    ))
                })?;
                if self.services.snapshotter.lower_layout() == LowerLayout::Flattened {
                    // A flattened rootfs is modified in place: the child
                    // stage gets its own copy.
                    parent.lowers = None;
                }
                parent
            }
        };
        let mut builder = ConfigBuilder::new(state.config.clone());
        builder.set_timestamp(Some(self.timestamp()));
        if builder.config().env("PATH").is_none() {
            // BuildKit gives every Linux image a PATH, scratch included.
            builder.apply_env("PATH", crate::build::runner::DEFAULT_PATH);
        }
        // The triggers were spliced into the plan; the new image does not
        // inherit them (Docker's rule).
        builder.take_base_onbuild();
        // An earlier attempt (restarted after a lost cache hit) may have
        // left a --single-snapshot rootfs open.
        if let Some(open) = self.open_snapshot.take() {
            let _ = self.services.snapshotter.release(open.mounted);
        }
        // --single-snapshot: the stage's filesystem steps share one rootfs,
        // snapshotted after the last of them. Kaniko's
        // --force-build-metadata snapshots every instruction, so it wins.
        let last_filesystem_step = (self.opts.single_snapshot && !self.opts.force_build_metadata)
            .then(|| {
                stage
                    .instructions
                    .iter()
                    .rposition(keys::is_filesystem_step)
            })
            .flatten();
        // When the stage's one layer is known (a cache hit, or built before
        // a restart), the steps it covers need not run.
        let stage_layer_known = last_filesystem_step
            .and_then(|p| self.resolved.keys.steps.get(&(stage.index, p)))
            .is_some_and(|k| {
                self.resolved.hits.contains_key(&k.key) || self.ran.contains_key(&k.key)
            });
        for (position, ins) in stage.instructions.iter().enumerate() {
            if self.cancelled() {
                return Err(BuildError::Cancelled);
            }
            let started = Instant::now();
            let step_key = self
                .resolved
                .keys
                .steps
                .get(&(stage.index, position))
                .cloned();
            self.defer_snapshot = last_filesystem_step.is_some_and(|last| position < last)
                && keys::is_filesystem_step(ins);
            if self.defer_snapshot && stage_layer_known {
                super::lookup::apply_recorded(
                    ins,
                    None,
                    &history_text(ins),
                    &mut builder,
                    &mut state,
                );
                self.record.steps.push(StepRecord {
                    stage: stage.index,
                    line: ins.line,
                    instruction: ins.original.clone(),
                    key: None,
                    inputs: step_key.map(|k| k.inputs).unwrap_or_default(),
                    cache: StepOutcome::Hit,
                    layer: None,
                    layer_size: None,
                    duration_ms: 0,
                    run_ms: None,
                    snapshot_ms: None,
                });
                continue;
            }
            let filesystem_key = step_key.as_ref().filter(|k| k.filesystem).map(|k| k.key);
            if let Some(done) = filesystem_key.and_then(|k| self.ran.get(&k)).cloned() {
                self.replay(ins, &done, &mut builder, &mut state);
                self.record.steps.push(done.record);
                continue;
            }
            self.step_started(stage.index, ins, step_key.as_ref());
            let Applied {
                outcome: cache,
                layer,
                times,
            } = self
                .cached_or_run(
                    plan,
                    stage,
                    ins,
                    step_key.as_ref(),
                    &mut builder,
                    &mut state,
                )
                .inspect_err(|_| {
                    self.step_ended(stage.index, ins, "failed", started.elapsed(), None);
                })
                .map_err(|source| BuildError::Step {
                    file: self.resolved.dockerfile_name.clone(),
                    line: ins.line,
                    instruction: ins.original.clone(),
                    source: Box::new(source),
                })?;
            if cache != StepOutcome::None {
                self.step_ended(
                    stage.index,
                    ins,
                    cache.as_str(),
                    started.elapsed(),
                    layer.as_ref(),
                );
            }
            self.record.current_step = None;
            let ran_layer = layer.clone();
            self.record.steps.push(StepRecord {
                stage: stage.index,
                line: ins.line,
                instruction: ins.original.clone(),
                key: step_key.as_ref().filter(|k| k.filesystem).map(|k| k.key),
                inputs: step_key.map(|k| k.inputs).unwrap_or_default(),
                cache,
                layer_size: layer.as_ref().map(|l| l.desc.size),
                layer: layer.map(|l| l.desc.digest),
                duration_ms: started.elapsed().as_millis() as u64,
                run_ms: times.run_ms,
                snapshot_ms: times.snapshot_ms,
            });
            // A step whose changes wait for the stage's single snapshot has
            // no result of its own to replay.
            if let (Some(key), StepOutcome::Miss, false) =
                (filesystem_key, cache, self.defer_snapshot)
                && let Some(record) = self.record.steps.last().cloned()
            {
                self.ran.insert(
                    key,
                    RanStep {
                        layer: ran_layer,
                        record,
                    },
                );
            }
        }
        self.defer_snapshot = false;
        if stage.index == plan.target {
            for (k, v) in &self.opts.labels {
                builder.add_label(k, v);
            }
        }
        state.config = builder.build();
        self.stages.insert(stage.index, state);
        Ok(())
    }

    /// Applies one instruction; returns the report's cache column and the
    /// layer it added, if any. Errors are messages: the caller adds the line.
    pub(super) fn instruction(
        &mut self,
        plan: &Plan,
        stage: &Stage,
        ins: &PlannedInstruction,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) -> Result<Applied, StepError> {
        let created_by = history_text(ins);
        match &ins.instruction {
            Instruction::Env(pairs) => {
                for kv in pairs {
                    builder.apply_env(&kv.key, &kv.value);
                }
            }
            Instruction::Label(pairs) => {
                for kv in pairs {
                    builder.add_label(&kv.key, &kv.value);
                }
            }
            Instruction::Maintainer(name) => {
                builder.set_author(name);
            }
            Instruction::Expose(ports) => {
                for p in ports {
                    builder.expose(p)?;
                }
            }
            Instruction::User(user) => {
                builder.set_user(user);
            }
            Instruction::Cmd(c) => {
                let argv = command_argv(c, shell_of(builder.config()));
                builder.set_cmd(argv);
            }
            Instruction::Entrypoint(c) => {
                let argv = command_argv(c, shell_of(builder.config()));
                builder.set_entrypoint(argv);
            }
            Instruction::Volume(vols) => {
                for v in vols {
                    builder.add_volume(v);
                }
            }
            Instruction::Stopsignal(s) => {
                builder.set_stop_signal(s);
            }
            Instruction::Healthcheck(h) => {
                builder.set_healthcheck(healthcheck(h, shell_of(builder.config())));
            }
            Instruction::Shell(shell) => {
                builder.set_shell(shell.clone());
            }
            Instruction::Onbuild { trigger, .. } => {
                builder.add_onbuild(trigger);
            }
            Instruction::Arg(_) => return Ok(Applied::metadata()),
            // The stage's own FROM line: the base was applied before the loop.
            Instruction::From(_) => return Ok(Applied::metadata()),
            Instruction::Workdir(dir) => {
                builder.set_workdir(dir);
                let workdir = workdir_of(builder.config());
                let user = builder.config().config.user.clone();
                let (layer, times) =
                    self.filesystem_step(stage, ins, builder, state, &created_by, |_, rootfs| {
                        // As BuildKit: the directory and the parents it
                        // creates belong to the current USER (names from
                        // the image's passwd and group).
                        let owner = workdir_owner(rootfs, &user)?;
                        copy::ensure_dir(rootfs, &workdir, owner, 0o755)
                            .map(|_| ())
                            .map_err(|e| {
                                StepError::io(format!("creating {}", workdir.display()), e)
                            })
                    })?;
                return Ok(Applied {
                    outcome: StepOutcome::Run,
                    layer,
                    times,
                });
            }
            Instruction::Run(run) => {
                let argv = run_argv(run, shell_of(builder.config()), &ins.heredocs);
                let env = run_env(builder.config(), ins);
                let user = Some(builder.config().config.user.clone()).filter(|u| !u.is_empty());
                let workdir = workdir_of(builder.config());
                let network = match run.network {
                    Some(dockerfile::Network::None) => NetworkMode::None,
                    Some(dockerfile::Network::Host) => NetworkMode::Host,
                    _ => self.opts.network,
                };
                let (mounts, secret_env) = self.run_mounts(plan, &run.mounts, &workdir)?;
                let security = self.run_security(run)?;
                let mut env = env;
                env.extend(secret_env);
                let (prefix, log) = self.opts.log.run_output(stage.index, ins.line);
                let (layer, times) = self.filesystem_step(
                    stage,
                    ins,
                    builder,
                    state,
                    &created_by,
                    move |driver, rootfs| {
                        let mut spec = RunSpec::new(rootfs, argv);
                        spec.env = env;
                        spec.user = user;
                        spec.workdir = workdir;
                        spec.network = network;
                        spec.mounts = mounts;
                        spec.security = security;
                        spec.output = OutputSink {
                            prefix,
                            writer: Some(log),
                            ..OutputSink::default()
                        };
                        let outcome = driver.services.runner.run(&spec)?;
                        if outcome.success() {
                            Ok(())
                        } else {
                            Err(StepError::CommandFailed {
                                status: outcome.status,
                                tail: outcome.tail.join("\n"),
                            })
                        }
                    },
                )?;
                return Ok(Applied {
                    outcome: StepOutcome::Run,
                    layer,
                    times,
                });
            }
            Instruction::Copy(c) => {
                let from = c.from.clone();
                let excludes = c.exclude.clone();
                let parents = c.parents;
                let sources = c.sources.clone();
                let dest = c.dest.clone();
                let (chown, chmod) = (c.chown.clone(), c.chmod.clone());
                let heredocs = ins.heredocs.clone();
                let workdir = workdir_of(builder.config());
                let source_stage = ins.stage_refs.first().copied();
                let (layer, times) = self.filesystem_step(
                    stage,
                    ins,
                    builder,
                    state,
                    &created_by,
                    move |driver, rootfs| {
                        let mut copy_opts =
                            copy_options(rootfs, chown.as_deref(), chmod.as_deref())?;
                        copy_opts.keep_owner = from.is_some();
                        let roots = match (&from, source_stage) {
                            (Some(_), Some(index)) => driver.stage_sources(index, &sources)?,
                            (Some(image), None) => driver.image_sources(image, &sources)?,
                            (None, _) => {
                                driver.context_sources(&sources, &excludes, &heredocs, parents)?
                            }
                        };
                        Ok(copy_into(rootfs, &workdir, &dest, &roots, &copy_opts)?)
                    },
                )?;
                let _ = plan;
                return Ok(Applied {
                    outcome: StepOutcome::Run,
                    layer,
                    times,
                });
            }
            Instruction::Add(a) => {
                let (remote_sources, sources): (Vec<String>, Vec<String>) = a
                    .sources
                    .iter()
                    .cloned()
                    .partition(|s| remote::is_remote(s));
                let mut fetched = Vec::new();
                for source in &remote_sources {
                    fetched.push(self.fetch_remote(
                        source,
                        a.checksum.as_deref(),
                        a.keep_git_dir,
                    )?);
                }
                let excludes = a.exclude.clone();
                let dest = a.dest.clone();
                let (chown, chmod) = (a.chown.clone(), a.chmod.clone());
                let heredocs = ins.heredocs.clone();
                let workdir = workdir_of(builder.config());
                let (layer, times) = self.filesystem_step(
                    stage,
                    ins,
                    builder,
                    state,
                    &created_by,
                    move |driver, rootfs| {
                        let copy_opts = copy_options(rootfs, chown.as_deref(), chmod.as_deref())?;
                        let roots = if sources.is_empty() {
                            Vec::new()
                        } else {
                            driver.context_sources(&sources, &excludes, &heredocs, false)?
                        };
                        let mut as_is = Vec::new();
                        for r in &fetched {
                            as_is.push(walk_root(&r.path, &r.name).map_err(|e| {
                                StepError::io(format!("reading {}", r.path.display()), e)
                            })?);
                        }
                        let unpack = driver.unpack_options(UnpackMode::Apply);
                        add_into(rootfs, &workdir, &dest, roots, as_is, &copy_opts, &unpack)
                    },
                )?;
                return Ok(Applied {
                    outcome: StepOutcome::Run,
                    layer,
                    times,
                });
            }
        }
        if self.opts.force_build_metadata {
            let layer = self.empty_layer(builder, state, &created_by)?;
            return Ok(Applied {
                layer: Some(layer),
                ..Applied::metadata()
            });
        }
        builder.add_empty_history(&created_by);
        Ok(Applied::metadata())
    }

    /// `--force-build-metadata` on a metadata instruction: an empty layer,
    /// as Kaniko adds one. The rootfs is unchanged, so the lower stack stays.
    fn empty_layer(
        &mut self,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
        created_by: &str,
    ) -> Result<LayerRef, StepError> {
        let layer = crate::build::layer::write_empty_layer(&self.layer_options(), &self.work)?;
        let blob = self.store_layer(&layer)?;
        let layer_ref = LayerRef {
            desc: Descriptor::new(layer.media_type, layer.digest.clone(), layer.size),
            diff_id: layer.diff_id.clone(),
            blob,
            hit: None,
        };
        state.layers.push(layer_ref.clone());
        builder.add_layer(layer.diff_id, created_by);
        Ok(layer_ref)
    }

    fn layer_options(&self) -> LayerOptions {
        LayerOptions {
            compression: self.opts.compression,
            mtime: if self.opts.reproducible {
                MtimePolicy::Clamp(self.opts.source_date_epoch.unwrap_or(0))
            } else {
                MtimePolicy::Keep
            },
            threads: 0,
        }
    }

    /// Moves a layer written in scratch space into the local store.
    fn store_layer(&self, layer: &crate::build::layer::Layer) -> Result<PathBuf, StepError> {
        let blob = self.services.store.path(&layer.digest);
        if let Some(parent) = blob.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| StepError::io(format!("creating {}", parent.display()), e))?;
        }
        fs::rename(&layer.path, &blob)
            .map_err(|e| StepError::io(format!("storing layer {}", layer.digest), e))?;
        Ok(blob)
    }

    /// Materialises the stage's rootfs, runs `action` in a writable view of
    /// it, and records the change as a layer (none if nothing changed).
    /// A RUN step's security: the build's (`--cap-add`, `--cap-drop`,
    /// `--security-opt`), or BuildKit's insecure mode where the Dockerfile
    /// asks for it and `--allow security.insecure` allows it.
    pub(super) fn run_security(&self, run: &dockerfile::Run) -> Result<StepSecurity, StepError> {
        match run.security {
            Some(dockerfile::Security::Insecure) if self.opts.allow_insecure => Ok(StepSecurity {
                user_namespace: self.opts.run_security.user_namespace,
                ..StepSecurity::insecure()
            }),
            Some(dockerfile::Security::Insecure) => Err(StepError::invalid(
                "RUN --security=insecure is not allowed: give --allow security.insecure to run \
                 this step with every capability and no seccomp filter",
            )),
            _ => Ok(self.opts.run_security.clone()),
        }
    }

    pub(super) fn filesystem_step(
        &mut self,
        stage: &Stage,
        ins: &PlannedInstruction,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
        created_by: &str,
        action: impl FnOnce(&mut Driver, &Path) -> Result<(), StepError>,
    ) -> Result<(Option<LayerRef>, PhaseTimes), StepError> {
        let mut times = PhaseTimes::default();
        let (mounted, lowers, scratch) = match self.open_snapshot.take() {
            Some(open) => (open.mounted, open.lowers, open.scratch),
            None => {
                let lowers = self.ensure_lowers(state, stage.index)?;
                self.scratch_counter += 1;
                let scratch = self.work.join(format!(
                    "step-{}-{}-{}",
                    stage.index, ins.line, self.scratch_counter
                ));
                fs::create_dir_all(&scratch)
                    .map_err(|e| StepError::io(format!("creating {}", scratch.display()), e))?;
                let mounted = self.services.snapshotter.prepare(&lowers, &scratch)?;
                (mounted, lowers, scratch)
            }
        };
        let rootfs = mounted.rootfs.clone();
        let run_started = Instant::now();
        if let Err(e) = action(self, &rootfs) {
            let _ = self.services.snapshotter.release(mounted);
            return Err(e);
        }
        times.run_ms = Some(run_started.elapsed().as_millis() as u64);
        if self.defer_snapshot {
            // --single-snapshot: a later step of the stage takes the layer.
            self.open_snapshot = Some(OpenSnapshot {
                mounted,
                lowers,
                scratch,
            });
            builder.add_empty_history(created_by);
            return Ok((None, times));
        }
        let snapshot_started = Instant::now();
        let change = match self.services.snapshotter.diff(&mounted) {
            Ok(c) => c.without(&self.opts.ignore_paths),
            Err(e) => {
                let _ = self.services.snapshotter.release(mounted);
                return Err(e.into());
            }
        };
        let layer_opts = self.layer_options();
        // --force-build-metadata: a step that changed nothing still gets
        // a layer, an empty one.
        let written = if self.opts.force_build_metadata && change.is_empty() {
            crate::build::layer::write_empty_layer(&layer_opts, &self.work).map(Some)
        } else {
            write_layer(&change, &layer_opts, &self.work)
        };
        let written = match written {
            Ok(l) => l,
            Err(e) => {
                let _ = self.services.snapshotter.release(mounted);
                return Err(e.into());
            }
        };
        times.snapshot_ms = Some(snapshot_started.elapsed().as_millis() as u64);
        let Some(layer) = written else {
            self.services.snapshotter.release(mounted)?;
            state.lowers = Some(lowers);
            builder.add_empty_history(created_by);
            return Ok((None, times));
        };
        let blob = self.store_layer(&layer)?;
        let unpacked = self.services.layers_dir.join(layer.diff_id.hex());
        let new_lowers = if self.services.snapshotter.lower_layout() == LowerLayout::Stacked
            && unpacked.exists()
        {
            self.services.snapshotter.release(mounted)?;
            let mut l = lowers;
            l.push(unpacked);
            l
        } else {
            let dest = if self.services.snapshotter.lower_layout() == LowerLayout::Stacked {
                unpacked
            } else {
                scratch.join("committed")
            };
            self.services.snapshotter.commit(mounted, &dest)?
        };
        state.lowers = Some(new_lowers);
        let layer_ref = LayerRef {
            desc: Descriptor::new(layer.media_type, layer.digest.clone(), layer.size),
            diff_id: layer.diff_id.clone(),
            blob,
            hit: None,
        };
        state.layers.push(layer_ref.clone());
        builder.add_layer(layer.diff_id, created_by);
        self.opts.log.log(
            crate::log::Level::Debug,
            &format!(
                "[stage {} line {}] layer {} ({} bytes)",
                stage.index, ins.line, layer_ref.desc.digest, layer_ref.desc.size
            ),
            &[
                ("event", "layer".into()),
                ("stage", stage.index.into()),
                ("line", ins.line.into()),
                ("digest", layer_ref.desc.digest.to_string().into()),
                ("bytes", layer_ref.desc.size.into()),
            ],
        );
        Ok((Some(layer_ref), times))
    }

    /// The step's header, printed before it runs (so that its output and a
    /// slow step are attributed while they happen), and at debug level the
    /// key it is looked up under.
    fn step_started(&mut self, stage: usize, ins: &PlannedInstruction, key: Option<&StepKey>) {
        self.record.current_step = Some(FailedStep {
            stage,
            line: ins.line,
            instruction: ins.original.clone(),
        });
        if matches!(ins.instruction, Instruction::From(_)) {
            return;
        }
        let fields = |event: &'static str| -> Vec<crate::log::Field<'static>> {
            vec![
                ("event", event.into()),
                ("stage", stage.into()),
                ("line", ins.line.into()),
                ("instruction", ins.original.clone().into()),
            ]
        };
        self.opts.log.log(
            crate::log::Level::Info,
            &format!("[stage {stage} line {}] {}", ins.line, ins.original),
            &fields("step_start"),
        );
        if let Some(key) = key.filter(|k| k.filesystem) {
            let mut f = fields("step_key");
            f.push(("key", key.key.to_string().into()));
            self.opts.log.log(
                crate::log::Level::Debug,
                &format!("[stage {stage} line {}] cache key {}", ins.line, key.key),
                &f,
            );
        }
    }

    /// The step's end line: `hit`, `miss` or `failed`, and how long it took.
    fn step_ended(
        &self,
        stage: usize,
        ins: &PlannedInstruction,
        outcome: &str,
        took: std::time::Duration,
        layer: Option<&LayerRef>,
    ) {
        let what = match outcome {
            "hit" | "miss" => format!("cache {outcome}"),
            other => other.to_owned(),
        };
        self.opts.log.log(
            crate::log::Level::Info,
            &format!(
                "[stage {stage} line {}] {what}: {} ({})",
                ins.line,
                ins.original,
                crate::log::human_duration(took)
            ),
            &[
                ("event", "step_end".into()),
                ("stage", stage.into()),
                ("line", ins.line.into()),
                ("instruction", ins.original.clone().into()),
                ("outcome", outcome.into()),
                ("duration_ms", (took.as_millis() as u64).into()),
                (
                    "layer",
                    layer.map_or(serde_json::Value::Null, |l| {
                        l.desc.digest.to_string().into()
                    }),
                ),
            ],
        );
    }

    /// The snapshotter's lower stack for the stage's current layers.
    pub(super) fn ensure_lowers(
        &mut self,
        state: &mut StageState,
        stage: usize,
    ) -> Result<Vec<PathBuf>, StepError> {
        if let Some(l) = &state.lowers {
            return Ok(l.clone());
        }
        let lowers = match self.services.snapshotter.lower_layout() {
            LowerLayout::Stacked => {
                let mut dirs = Vec::with_capacity(state.layers.len());
                for layer in &state.layers {
                    dirs.push(self.unpacked_layer(layer)?);
                }
                dirs
            }
            LowerLayout::Flattened => {
                let root = if self.opts.isolation == Isolation::None {
                    PathBuf::from("/")
                } else {
                    let dir = self
                        .work
                        .join(format!("rootfs-{stage}-{}", self.scratch_counter));
                    fs::create_dir_all(&dir)
                        .map_err(|e| StepError::io(format!("creating {}", dir.display()), e))?;
                    dir
                };
                let opts = self.unpack_options(UnpackMode::Apply);
                for layer in state.layers.clone() {
                    self.ensure_blob(&layer)?;
                    let mut attempt = 0;
                    loop {
                        let file = fs::File::open(&layer.blob).map_err(|e| {
                            StepError::io(
                                format!(
                                    "opening layer {} at {}",
                                    layer.desc.digest,
                                    layer.blob.display()
                                ),
                                e,
                            )
                        })?;
                        // Applying a layer again over a partial first
                        // attempt gives the same tree: entries replace
                        // what is there.
                        match unpack_layer(file, &root, &opts, Some(&layer.diff_id)) {
                            Ok(_) => break,
                            Err(e) if self.refetch_to_retry(&layer, &e, attempt)? => attempt += 1,
                            Err(e) => return Err(self.unpack_failed(&layer, e)),
                        }
                    }
                }
                vec![root]
            }
        };
        state.lowers = Some(lowers.clone());
        Ok(lowers)
    }

    /// Unpacks a layer once into `layers/<diff_id>` (overlay form).
    pub(super) fn unpacked_layer(&mut self, layer: &LayerRef) -> Result<PathBuf, StepError> {
        let dir = self.services.layers_dir.join(layer.diff_id.hex());
        if dir.is_dir() {
            return Ok(dir);
        }
        if let Some(mounted) = self.mounted_layer(layer) {
            return Ok(mounted);
        }
        self.ensure_blob(layer)?;
        // Unique per build, not per process: builds in other PID
        // namespaces (containers sharing the directory) may have our PID.
        let build = self.work.file_name().unwrap_or_default().to_string_lossy();
        let tmp = self
            .services
            .layers_dir
            .join(format!(".tmp-{}-{build}", layer.diff_id.hex()));
        let opts = self.unpack_options(UnpackMode::OverlayLower);
        let mut attempt = 0;
        loop {
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp)
                .map_err(|e| StepError::io(format!("creating {}", tmp.display()), e))?;
            let file = fs::File::open(&layer.blob).map_err(|e| {
                StepError::io(
                    format!(
                        "opening layer {} at {}",
                        layer.desc.digest,
                        layer.blob.display()
                    ),
                    e,
                )
            })?;
            let read = Arc::new(std::sync::atomic::AtomicU64::new(0));
            let progress = self.opts.log.progress(
                &format!("unpacking layer {}", layer.desc.digest),
                Some(layer.desc.size),
                read.clone(),
            );
            let file = crate::log::CountingReader::new(file, read);
            let unpacked = unpack_layer(file, &tmp, &opts, Some(&layer.diff_id));
            drop(progress);
            match unpacked {
                Ok(_) => break,
                Err(e) => {
                    let _ = fs::remove_dir_all(&tmp);
                    if !self.refetch_to_retry(layer, &e, attempt)? {
                        return Err(self.unpack_failed(layer, e));
                    }
                    attempt += 1;
                }
            }
        }
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(dir),
            // Another build unpacked the same layer meanwhile.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(dir)
            }
            Err(e) => Err(StepError::io(
                format!("moving unpacked layer into {}", dir.display()),
                e,
            )),
        }
    }

    pub(super) fn unpack_options(&self, mode: UnpackMode) -> UnpackOptions {
        UnpackOptions {
            mode,
            max_expanded_size: self.services.unpack_limit,
            ..UnpackOptions::default()
        }
    }

    /// `--image-fs-extract-retry`: whether a base-image layer that failed to
    /// extract (attempt `attempt`, from 0) is tried again; if so its local
    /// copy is dropped and fetched again first (from the cache or its
    /// registry), since a damaged download is what a retry can mend.
    fn refetch_to_retry(
        &mut self,
        layer: &LayerRef,
        error: &crate::build::unpack::UnpackError,
        attempt: u32,
    ) -> Result<bool, StepError> {
        let retries = self.opts.image_fs_extract_retry;
        if attempt >= retries || !self.resolved.base_layers.contains_key(&layer.desc.digest) {
            return Ok(false);
        }
        self.warn(&format!(
            "extracting base layer {} failed ({error}); fetching it again (retry {} of {retries})",
            layer.desc.digest,
            attempt + 1
        ));
        let _ = fs::remove_file(&layer.blob);
        self.ensure_blob(layer)?;
        Ok(true)
    }

    /// The message for a layer that did not unpack. A cache hit's layer
    /// that does not unpack (its entry names a diff_id or content the blob
    /// does not have) is lost like one the cache could not send; the local
    /// copy of its blob goes so that the rebuilt step is not shadowed by it.
    fn unpack_failed(
        &mut self,
        layer: &LayerRef,
        e: crate::build::unpack::UnpackError,
    ) -> StepError {
        match layer.hit {
            Some(key) if !self.resolved.base_layers.contains_key(&layer.desc.digest) => {
                let _ = fs::remove_file(&layer.blob);
                self.lose_hit(key, &layer.desc.digest, format!("unpacking it: {e}"))
            }
            _ => StepError::Unpack {
                what: format!("unpacking layer {}", layer.desc.digest),
                source: e,
            },
        }
    }
}
