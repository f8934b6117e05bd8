//! The resolve and keys phases.
//!
//! [`Driver::resolve_inputs`] does every piece of I/O a key depends on, once
//! per build and before any key is computed: it resolves the images named by
//! `COPY --from=<image>` and `RUN --mount=from=<image>` (manifest and
//! config), downloads and clones remote ADD sources, and digests the context
//! files each step reads. [`compute_keys`] then turns the plan and those
//! resolved inputs into every step's key without touching the network or
//! the disk, so the same inputs always give the same keys.

use super::*;

/// What one step reads besides its parent's filesystem, as resolved before
/// the keys are computed.
#[derive(Debug, Clone)]
pub(super) enum SourceInput {
    /// `COPY --from=<stage>`: the stage's last key.
    Stage(usize),
    /// `COPY --from=<image>`: the image's identity.
    Image(String),
    /// COPY from the context: the digest of what it selects.
    Context([u8; 32]),
    /// ADD: the digest of its context sources and the identity of each
    /// remote source (URL and content digest, git commit), in order.
    Add {
        local: [u8; 32],
        remote: Vec<String>,
    },
    /// RUN with bind mounts: per mount, its source as written and what it
    /// reads.
    Mounts(Vec<(String, MountInput)>),
}

/// What a bind mount of a RUN step reads.
#[derive(Debug, Clone)]
pub(super) enum MountInput {
    Context([u8; 32]),
    Stage(usize),
    Image(String),
}

/// Everything a step's key depends on besides the plan.
#[derive(Debug, Clone, Default)]
pub(super) struct StepInputs {
    pub(super) source: Option<SourceInput>,
    /// The privileges a RUN step runs with (only a non-default one enters
    /// its key, see `keys::run_security_text`).
    pub(super) run_security: Option<StepSecurity>,
}

/// The build's keys: per step (by stage and instruction index) and the
/// last key of every stage, which children and `COPY --from` chain on.
#[derive(Debug, Clone, Default)]
pub(super) struct BuildKeys {
    pub(super) steps: HashMap<(usize, usize), StepKey>,
    pub(super) stage_last: HashMap<usize, CacheKey>,
}

impl BuildKeys {
    /// The filesystem keys as chains: per stage, in build order (each key
    /// derives from the one before it).
    pub(super) fn chains(&self) -> Vec<Vec<CacheKey>> {
        let mut positions: Vec<(&(usize, usize), &StepKey)> =
            self.steps.iter().filter(|(_, k)| k.filesystem).collect();
        positions.sort_by_key(|(p, _)| **p);
        let mut chains: Vec<Vec<CacheKey>> = Vec::new();
        let mut stage = None;
        for ((index, _), key) in positions {
            if stage != Some(*index) {
                stage = Some(*index);
                chains.push(Vec::new());
            }
            if let Some(chain) = chains.last_mut() {
                chain.push(key.key);
            }
        }
        chains
    }
}

impl Driver {
    /// The resolve phase for step inputs: resolves every image, remote
    /// source and context selection the plan's steps read (bases were
    /// resolved before the plan was made final).
    pub(super) fn resolve_inputs(
        &mut self,
        plan: &Plan,
    ) -> Result<HashMap<(usize, usize), StepInputs>, BuildError> {
        let mut inputs = HashMap::new();
        for &index in &plan.stages_to_build {
            let stage = &plan.stages[index];
            for (position, ins) in stage.instructions.iter().enumerate() {
                let file = self.resolved.dockerfile_name.clone();
                let step_err = |source: StepError| BuildError::Step {
                    file: file.clone(),
                    line: ins.line,
                    instruction: ins.original.clone(),
                    source: Box::new(source),
                };
                let source = match &ins.instruction {
                    Instruction::Copy(c) => Some(match (&c.from, ins.stage_refs.first()) {
                        (Some(_), Some(i)) => SourceInput::Stage(*i),
                        (Some(image), None) => {
                            self.resolve_base(image)?;
                            SourceInput::Image(self.identity_of(image))
                        }
                        (None, _) => SourceInput::Context(
                            self.context_digest(&c.sources, &c.exclude)
                                .map_err(step_err)?,
                        ),
                    }),
                    Instruction::Add(a) => {
                        let (remote_sources, local): (Vec<String>, Vec<String>) = a
                            .sources
                            .iter()
                            .cloned()
                            .partition(|s| remote::is_remote(s));
                        let local = self.context_digest(&local, &a.exclude).map_err(step_err)?;
                        let mut remote = Vec::new();
                        for source in &remote_sources {
                            let fetched = self
                                .fetch_remote(source, a.checksum.as_deref(), a.keep_git_dir)
                                .map_err(step_err)?;
                            remote.push(fetched.identity);
                        }
                        Some(SourceInput::Add { local, remote })
                    }
                    Instruction::Run(run)
                        if run
                            .mounts
                            .iter()
                            .any(|m| m.kind == dockerfile::MountType::Bind) =>
                    {
                        let mut mounts = Vec::new();
                        for m in run
                            .mounts
                            .iter()
                            .filter(|m| m.kind == dockerfile::MountType::Bind)
                        {
                            let source = m.source.clone().unwrap_or_else(|| ".".into());
                            let input = match &m.from {
                                None => MountInput::Context(
                                    self.context_digest(std::slice::from_ref(&source), &[])
                                        .map_err(step_err)?,
                                ),
                                Some(from) => match stage_index(plan, from) {
                                    Some(i) => MountInput::Stage(i),
                                    None => {
                                        self.resolve_base(from)?;
                                        MountInput::Image(self.identity_of(from))
                                    }
                                },
                            };
                            mounts.push((source, input));
                        }
                        Some(SourceInput::Mounts(mounts))
                    }
                    _ => None,
                };
                let run_security = match &ins.instruction {
                    Instruction::Run(run) => Some(self.run_security(run).map_err(step_err)?),
                    _ => None,
                };
                inputs.insert(
                    (index, position),
                    StepInputs {
                        source,
                        run_security,
                    },
                );
            }
        }
        Ok(inputs)
    }

    fn identity_of(&self, image: &str) -> String {
        self.resolved
            .bases
            .get(image)
            .map(|b| b.identity.clone())
            .unwrap_or_default()
    }

    /// The layer options every filesystem key depends on.
    pub(super) fn key_options(&self) -> keys::LayerKeyOptions {
        keys::LayerKeyOptions {
            compression: self.opts.compression,
            reproducible: self.opts.reproducible,
            source_date_epoch: self.opts.source_date_epoch,
            single_snapshot: self.opts.single_snapshot,
            force_build_metadata: self.opts.force_build_metadata,
        }
    }
}

/// The keys phase: every step's key from the plan, the bases' identities
/// and the resolved inputs. Pure: no I/O.
pub(super) fn compute_keys(
    plan: &Plan,
    dockerfile_name: &str,
    bases: &HashMap<String, BaseImage>,
    inputs: &HashMap<(usize, usize), StepInputs>,
    layer: &keys::LayerKeyOptions,
) -> Result<BuildKeys, BuildError> {
    let mut keys = BuildKeys::default();
    for &index in &plan.stages_to_build {
        let stage = &plan.stages[index];
        let mut parent = match &stage.source {
            StageSource::Image(name) => {
                let base = bases.get(name).ok_or_else(|| BuildError::Base {
                    reference: name.clone(),
                    source: BaseError::NotResolved,
                })?;
                keys::base_key(&base.identity)
            }
            StageSource::Stage(i) => *keys
                .stage_last
                .get(i)
                .ok_or_else(|| BuildError::Internal(format!("stage {i} has no key")))?,
        };
        for (position, ins) in stage.instructions.iter().enumerate() {
            let step_err = |message: String| BuildError::Step {
                file: dockerfile_name.to_owned(),
                line: ins.line,
                instruction: ins.original.clone(),
                source: Box::new(StepError::Invalid(message)),
            };
            let stage_key = |i: usize, message: &dyn Fn() -> String| {
                keys.stage_last
                    .get(&i)
                    .copied()
                    .ok_or_else(|| step_err(message()))
            };
            let step_inputs = inputs.get(&(index, position)).cloned().unwrap_or_default();
            let sources = match &step_inputs.source {
                None => None,
                Some(SourceInput::Stage(i)) => Some(SourceIdentity::Stage(stage_key(*i, &|| {
                    format!("stage {i} is not built before it is used")
                })?)),
                Some(SourceInput::Image(identity)) => Some(SourceIdentity::Image(identity.clone())),
                Some(SourceInput::Context(digest)) => Some(SourceIdentity::Context(*digest)),
                Some(SourceInput::Add { local, remote }) => Some(keys::add_sources(*local, remote)),
                Some(SourceInput::Mounts(mounts)) => {
                    let mut resolved = Vec::with_capacity(mounts.len());
                    for (source, input) in mounts {
                        let from = match input {
                            MountInput::Context(digest) => keys::BindSource::Context(*digest),
                            MountInput::Stage(i) => {
                                let from = mount_from(ins, source);
                                keys::BindSource::Stage(stage_key(*i, &|| {
                                    format!("stage {from} is not built before it is mounted")
                                })?)
                            }
                            MountInput::Image(identity) => {
                                keys::BindSource::Image(identity.clone())
                            }
                        };
                        resolved.push((source.as_str(), from));
                    }
                    Some(keys::bind_mounts(&resolved))
                }
            };
            let key = keys::step_key(
                &parent,
                keys::StepInputs::of(ins),
                sources.as_ref(),
                layer,
                step_inputs.run_security.as_ref(),
            );
            parent = key.key;
            keys.steps.insert((index, position), key);
        }
        keys.stage_last.insert(index, parent);
    }
    Ok(keys)
}

/// The `from=` of the bind mount of `ins` reading `source`, for messages.
fn mount_from(ins: &PlannedInstruction, source: &str) -> String {
    let Instruction::Run(run) = &ins.instruction else {
        return String::new();
    };
    run.mounts
        .iter()
        .filter(|m| m.kind == dockerfile::MountType::Bind)
        .find(|m| m.source.as_deref().unwrap_or(".") == source)
        .and_then(|m| m.from.clone())
        .unwrap_or_default()
}
