//! The build driver: a plan in, an image out.
//!
//! [`build`] plans the Dockerfile, resolves every base image (a registry
//! image, an `oci-layout://` directory, `scratch` or an earlier stage),
//! plans again with the bases' environments, then builds the needed stages
//! in order. Metadata instructions only edit the image config; RUN, COPY,
//! ADD and WORKDIR are filesystem steps: the stage's layers are materialised
//! for the [`Snapshotter`] (once per layer, reused by every later build),
//! the step runs in the writable rootfs it prepares, and the change becomes
//! a layer written straight into the local content store. The target stage's
//! config and layers are then written where the user asked: registries, an
//! OCI layout, a `docker load` tarball.
//!
//! The driver never knows which snapshotter or runner it holds; it owns the
//! order of things, the error messages (each names the Dockerfile line), and
//! the cleanup of its scratch space.

pub mod copy;
pub mod from_cli;
pub mod keys;
pub mod remote;

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use kiln_common::cache_key::KeyInput;
use kiln_common::{CacheEntry, CacheKey, Digest, LayerDescriptor};

use crate::cache::{Cache, CacheMode};
use keys::{SourceIdentity, StepKey};

use crate::build::config::{self as image_config, ConfigBuilder};
use crate::build::layer::{Compression, LayerOptions, MtimePolicy, write_layer};
use crate::build::runner::chroot::ChrootRunner;
use crate::build::runner::none::{NoneRunner, detect_container};
use crate::build::runner::{MountSpec, NetworkMode, OutputSink, RunSpec, Runner};
use crate::build::snapshot::overlay::OverlaySnapshotter;
use crate::build::snapshot::walk::WalkSnapshotter;
use crate::build::snapshot::{LowerLayout, Snapshotter};
use crate::build::user::resolve_user;
use crate::context::{BuildContext, Visibility};
use crate::dockerfile::{self, Command, Instruction};
use crate::dockerignore::DockerIgnore;
use crate::oci::layout::{OciLayout, parse_layout_reference};
use crate::oci::{BlobSource, Descriptor, ImageDocuments, Platform};
use crate::plan::{Plan, PlanOptions, PlannedInstruction, Stage, StageSource};
use crate::registry::{ImageRef, RegistryClient, RegistryOptions};
use crate::store::LocalStore;
use crate::unpack::{UnpackMode, UnpackOptions, apply_layers, unpack_layer};

use copy::{CopyItem, CopyOptions, CopyRoot, copy_into, walk_root};

/// How RUN steps are isolated (`--isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isolation {
    Chroot,
    /// In place on `/` (Kaniko's model); only inside a container.
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotterKind {
    Overlay,
    Walk,
}

/// Everything a build needs besides the Dockerfile's own content.
#[derive(Clone)]
pub struct BuildOptions {
    pub plan: PlanOptions,
    pub destinations: Vec<String>,
    pub no_push: bool,
    pub oci_layout_path: Option<PathBuf>,
    pub tar_path: Option<PathBuf>,
    pub digest_file: Option<PathBuf>,
    pub image_name_with_digest_file: Option<PathBuf>,
    /// Timestamps pinned (to `source_date_epoch`, else 0) so the same inputs
    /// give the same digest anywhere.
    pub reproducible: bool,
    pub source_date_epoch: Option<u64>,
    pub compression: Compression,
    pub labels: Vec<(String, String)>,
    pub isolation: Isolation,
    /// `None`: overlay where it can mount, walk otherwise.
    pub snapshotter: Option<SnapshotterKind>,
    /// Blobs, unpacked layers and scratch space live here.
    pub state_dir: PathBuf,
    pub registry: RegistryOptions,
    pub force: bool,
    pub network: NetworkMode,
    pub ignore_paths: Vec<PathBuf>,
    /// Step output and progress lines go here (stderr in the binary).
    pub log: Arc<Mutex<dyn Write + Send>>,
    pub cache: CacheOptions,
    /// `--report FILE`: the JSON build report.
    pub report: Option<PathBuf>,
    /// `--secret id=..,src=..|env=..`: what `RUN --mount=type=secret` reads.
    pub secrets: Vec<Secret>,
}

#[derive(Debug, Clone)]
pub struct Secret {
    pub id: String,
    pub source: SecretSource,
}

#[derive(Debug, Clone)]
pub enum SecretSource {
    File(PathBuf),
    Env(String),
}

/// How the build uses the layer cache.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// `--cache=false` turns every lookup and upload off.
    pub enabled: bool,
    pub mode: CacheMode,
    /// `--cache-server` URLs (tried in order); empty: the embedded cache in
    /// `<state_dir>/cache`.
    pub servers: Vec<String>,
    pub token: Option<String>,
    /// Entries older than this are not reused (embedded cache).
    pub ttl: Option<std::time::Duration>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: CacheMode::ReadWrite,
            servers: Vec::new(),
            token: None,
            ttl: None,
        }
    }
}

/// What a build produced.
#[derive(Debug)]
pub struct BuildOutcome {
    pub manifest_digest: Digest,
    pub image: ImageDocuments,
    pub steps: Vec<StepRecord>,
}

/// One instruction as it was executed, for the report.
#[derive(Debug, Clone, serde::Serialize)]
pub struct StepRecord {
    pub stage: usize,
    pub line: usize,
    pub instruction: String,
    /// Lowercase hex of the step's cache key (null for metadata steps).
    pub key: Option<CacheKey>,
    /// The named inputs of the key, so a miss can be explained.
    pub inputs: Vec<KeyInput>,
    /// `"hit"`, `"miss"` (it ran), or `"none"` (metadata, no entry).
    pub cache: &'static str,
    pub layer: Option<Digest>,
    pub layer_size: Option<u64>,
    pub duration_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    #[error("{file}:{line}: {instruction}: {message}")]
    Step {
        file: String,
        line: usize,
        instruction: String,
        message: String,
    },
    #[error("base image {reference}: {message}")]
    Base { reference: String, message: String },
    #[error("{0}")]
    Setup(String),
    #[error("writing the image: {0}")]
    Output(String),
}

/// A layer of an image being built: its descriptor, its diff_id and where
/// its compressed bytes are.
#[derive(Debug, Clone)]
struct LayerRef {
    desc: Descriptor,
    diff_id: Digest,
    blob: PathBuf,
}

/// A resolved base image.
#[derive(Debug, Clone)]
struct BaseImage {
    /// What the stage's first key chains on: manifest digest and platform.
    identity: String,
    config: image_config::ImageConfig,
    layers: Vec<LayerRef>,
    /// For cross-repository blob mounts when pushing.
    registry_ref: Option<ImageRef>,
}

/// A stage while (and after) it is built.
#[derive(Debug, Clone)]
struct StageState {
    config: image_config::ImageConfig,
    layers: Vec<LayerRef>,
    /// The snapshotter's lower stack for `layers`, when materialised.
    lowers: Option<Vec<PathBuf>>,
    registry_ref: Option<ImageRef>,
}

/// Builds the image the options describe.
pub fn build(opts: BuildOptions) -> Result<BuildOutcome, BuildError> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| BuildError::Setup(format!("starting the async runtime: {e}")))?;
    let mut driver = Driver::new(opts, runtime)?;
    let result = driver.run();
    driver.cleanup();
    result
}

struct Driver {
    opts: BuildOptions,
    runtime: tokio::runtime::Runtime,
    client: RegistryClient,
    store: LocalStore,
    snapshotter: Box<dyn Snapshotter>,
    runner: Box<dyn Runner>,
    /// Unpacked layers by diff_id (overlay lowers), shared across builds.
    layers_dir: PathBuf,
    /// This build's scratch space, removed at the end.
    work: PathBuf,
    context: Option<BuildContext>,
    bases: HashMap<String, BaseImage>,
    stages: BTreeMap<usize, StageState>,
    steps: Vec<StepRecord>,
    scratch_counter: usize,
    platform: Platform,
    dockerfile_name: String,
    /// Blobs that belong to the image but live outside the store (layouts).
    extra_blobs: Arc<Mutex<HashMap<Digest, PathBuf>>>,
    cache: Option<Arc<dyn Cache>>,
    /// Keys by (stage, instruction index).
    keys: HashMap<(usize, usize), StepKey>,
    stage_last_key: HashMap<usize, CacheKey>,
    hits: BTreeMap<CacheKey, CacheEntry>,
    uploads: Vec<std::thread::JoinHandle<Result<u64, String>>>,
    /// Base-image layers by digest, with the image they come from, so they
    /// can be fetched lazily from the cache or the registry.
    base_layers: HashMap<Digest, (crate::registry::client::PulledImage, LayerRef)>,
    /// Remote ADD sources, fetched once per build.
    remote: HashMap<String, remote::RemoteSource>,
    bytes_downloaded: u64,
    started: Instant,
}

impl Driver {
    fn new(opts: BuildOptions, runtime: tokio::runtime::Runtime) -> Result<Self, BuildError> {
        let setup =
            |what: &str, e: &dyn std::fmt::Display| BuildError::Setup(format!("{what}: {e}"));
        if opts.isolation == Isolation::None
            && !opts.force
            && let Some(reason) = refuse_in_place()
        {
            return Err(BuildError::Setup(reason));
        }
        let store = LocalStore::new(opts.state_dir.join("store"))
            .map_err(|e| setup("opening the local store", &e))?;
        let layers_dir = opts.state_dir.join("layers");
        fs::create_dir_all(&layers_dir).map_err(|e| setup("creating the layer directory", &e))?;
        let work = opts.state_dir.join("work").join(format!(
            "build-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&work).map_err(|e| setup("creating scratch space", &e))?;
        let client = RegistryClient::new(opts.registry.clone())
            .map_err(|e| setup("setting up the registry client", &e))?;
        let kind = opts.snapshotter.unwrap_or(match opts.isolation {
            Isolation::None => SnapshotterKind::Walk,
            Isolation::Chroot => SnapshotterKind::Overlay,
        });
        let snapshotter: Box<dyn Snapshotter> = match kind {
            SnapshotterKind::Overlay => Box::new(OverlaySnapshotter::new()),
            SnapshotterKind::Walk => {
                let mut ignored = opts.ignore_paths.clone();
                if opts.isolation == Isolation::None {
                    ignored.push(opts.state_dir.clone());
                    ignored.push(opts.plan.context.clone());
                    if let Ok(exe) = std::env::current_exe() {
                        // Like Kaniko's /kaniko: when the executor lives in
                        // its own /kiln directory, none of it is the image's.
                        if let Some(dir) = exe
                            .parent()
                            .filter(|d| d.file_name().is_some_and(|n| n == "kiln"))
                        {
                            ignored.push(dir.to_path_buf());
                        }
                        ignored.push(exe);
                    }
                }
                Box::new(WalkSnapshotter::new(ignored).ignoring_mount_points())
            }
        };
        let runner: Box<dyn Runner> = match opts.isolation {
            Isolation::Chroot => Box::new(ChrootRunner::new()),
            Isolation::None => Box::new(NoneRunner::new(opts.force)),
        };
        let dockerfile_name = opts.plan.dockerfile_path().display().to_string();
        let cache = open_cache(&opts, runtime.handle().clone(), &opts.log);
        Ok(Driver {
            cache,
            keys: HashMap::new(),
            stage_last_key: HashMap::new(),
            hits: BTreeMap::new(),
            uploads: Vec::new(),
            remote: HashMap::new(),
            base_layers: HashMap::new(),
            bytes_downloaded: 0,
            started: Instant::now(),
            platform: Platform::host(),
            opts,
            runtime,
            client,
            store,
            snapshotter,
            runner,
            layers_dir,
            work,
            context: None,
            bases: HashMap::new(),
            stages: BTreeMap::new(),
            steps: Vec::new(),
            scratch_counter: 0,
            dockerfile_name,
            extra_blobs: Arc::new(Mutex::new(HashMap::new())),
        })
    }

    fn cleanup(&mut self) {
        // Unpacked layers and blobs stay (they are the local cache); the
        // scratch space of this build goes.
        let _ = fs::remove_dir_all(&self.work);
    }

    fn log(&self, line: &str) {
        if let Ok(mut w) = self.opts.log.lock() {
            let _ = writeln!(w, "{line}");
        }
    }

    fn run(&mut self) -> Result<BuildOutcome, BuildError> {
        let first = crate::plan::plan(&self.opts.plan)?;
        self.platform = first
            .target_platform
            .parse()
            .map_err(|e| BuildError::Setup(format!("target platform: {e}")))?;
        for &index in &first.stages_to_build {
            if let StageSource::Image(name) = &first.stages[index].source {
                self.resolve_base(name)?;
            }
        }
        // Plan again, now that the bases' environments are known: they take
        // part in variable expansion (e.g. `ENV PATH=$PATH:/x`).
        let mut plan_opts = self.opts.plan.clone();
        for (name, base) in &self.bases {
            plan_opts
                .base_env
                .insert(name.clone(), env_map(&base.config));
        }
        let plan = crate::plan::plan(&plan_opts)?;
        for warning in &plan.warnings {
            self.log(&format!("warning: {warning}"));
        }
        self.compute_keys(&plan)?;
        self.lookup_keys();
        for &index in &plan.stages_to_build {
            let started = Instant::now();
            self.build_stage(&plan, &plan.stages[index])?;
            self.log(&format!(
                "stage {index} built in {:.2}s",
                started.elapsed().as_secs_f64()
            ));
        }
        let target = self
            .stages
            .get(&plan.target)
            .cloned()
            .ok_or_else(|| BuildError::Setup("the target stage was not built".into()))?;
        let outcome = self.finish(&plan, target)?;
        let uploaded = self.wait_uploads();
        self.report(&outcome, uploaded)?;
        Ok(outcome)
    }

    /// The summary on the log and, with `--report`, the JSON report.
    fn report(&self, outcome: &BuildOutcome, uploaded: u64) -> Result<(), BuildError> {
        let count = |c: &str| outcome.steps.iter().filter(|s| s.cache == c).count();
        let (hits, misses) = (count("hit"), count("miss"));
        let elapsed = self.started.elapsed();
        self.log(&format!(
            "built {} in {:.2}s: {} steps, {hits} cached, {misses} run; {uploaded} bytes uploaded, {} bytes downloaded from the cache",
            outcome.manifest_digest,
            elapsed.as_secs_f64(),
            outcome.steps.len(),
            self.bytes_downloaded
        ));
        let Some(path) = &self.opts.report else {
            return Ok(());
        };
        let report = serde_json::json!({
            "steps": outcome.steps.iter().map(|s| serde_json::json!({
                "stage": s.stage,
                "line": s.line,
                "instruction": s.instruction,
                "key": s.key,
                "inputs": s.inputs,
                "cache": s.cache,
                "layer": s.layer,
                "durations_ms": {"total": s.duration_ms},
                "bytes": {"layer": s.layer_size},
            })).collect::<Vec<_>>(),
            "image": {"digest": outcome.manifest_digest},
            "summary": {
                "steps": outcome.steps.len(),
                "hits": hits,
                "misses": misses,
                "duration_ms": elapsed.as_millis() as u64,
                "bytes_uploaded": uploaded,
                "bytes_downloaded": self.bytes_downloaded,
                "cache": self.cache.as_ref().map(|c| c.location()),
            },
        });
        let text =
            serde_json::to_vec_pretty(&report).map_err(|e| BuildError::Output(e.to_string()))?;
        fs::write(path, text).map_err(|e| BuildError::Output(format!("{}: {e}", path.display())))
    }

    // ------------------------------------------------------------ bases

    fn resolve_base(&mut self, name: &str) -> Result<(), BuildError> {
        if self.bases.contains_key(name) {
            return Ok(());
        }
        let base_err = |message: String| BuildError::Base {
            reference: name.to_owned(),
            message,
        };
        let base = if name.eq_ignore_ascii_case("scratch") {
            BaseImage {
                identity: format!("scratch {}", self.platform),
                config: image_config::ImageConfig::scratch(
                    &self.platform.os,
                    &self.platform.architecture,
                ),
                layers: Vec::new(),
                registry_ref: None,
            }
        } else if let Some(rest) = name.strip_prefix("oci-layout://") {
            let (path, reference) = parse_layout_reference(rest);
            let layout = OciLayout::open(&path).map_err(|e| base_err(e.to_string()))?;
            let docs = layout
                .resolve(reference.as_deref(), &self.platform)
                .map_err(|e| base_err(e.to_string()))?;
            let layers = self.layers_of(&docs, |d| layout.path(d))?;
            let mut extra = self
                .extra_blobs
                .lock()
                .map_err(|_| base_err("lock poisoned".into()))?;
            for l in &layers {
                extra.insert(l.desc.digest.clone(), l.blob.clone());
            }
            drop(extra);
            BaseImage {
                identity: format!("{} {}", docs.manifest_digest, self.platform),
                config: config_from_bytes(&docs.config_bytes).map_err(base_err)?,
                layers,
                registry_ref: None,
            }
        } else {
            let reference = ImageRef::parse(name).map_err(|e| base_err(e.to_string()))?;
            self.log(&format!("resolving {reference}"));
            // Only the manifest and config now: layers are fetched when a
            // step needs the filesystem or an output needs their bytes, from
            // the cache when it has them, from the registry otherwise.
            let pulled = self
                .runtime
                .block_on(self.client.resolve(&reference, &self.platform))
                .map_err(|e| base_err(e.to_string()))?;
            let store = self.store.clone();
            let layers = self.layers_of(&pulled.image, |d| store.path(d))?;
            for layer in &layers {
                self.base_layers
                    .insert(layer.desc.digest.clone(), (pulled.clone(), layer.clone()));
            }
            BaseImage {
                identity: format!("{} {}", pulled.image.manifest_digest, self.platform),
                config: config_from_bytes(&pulled.image.config_bytes).map_err(base_err)?,
                layers,
                registry_ref: Some(pulled.reference.clone()),
            }
        };
        self.bases.insert(name.to_owned(), base);
        Ok(())
    }

    fn layers_of(
        &self,
        docs: &ImageDocuments,
        path_of: impl Fn(&Digest) -> PathBuf,
    ) -> Result<Vec<LayerRef>, BuildError> {
        let diff_ids = &docs.config.rootfs.diff_ids;
        if diff_ids.len() != docs.manifest.layers.len() {
            return Err(BuildError::Base {
                reference: docs.manifest_digest.to_string(),
                message: format!(
                    "manifest has {} layers but the config lists {} diff_ids",
                    docs.manifest.layers.len(),
                    diff_ids.len()
                ),
            });
        }
        Ok(docs
            .manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(desc, diff_id)| LayerRef {
                desc: desc.clone(),
                diff_id: diff_id.clone(),
                blob: path_of(&desc.digest),
            })
            .collect())
    }

    // ----------------------------------------------------------- stages

    fn build_stage(&mut self, plan: &Plan, stage: &Stage) -> Result<(), BuildError> {
        let mut state = match &stage.source {
            StageSource::Image(name) => {
                let base = self
                    .bases
                    .get(name)
                    .cloned()
                    .ok_or_else(|| BuildError::Base {
                        reference: name.clone(),
                        message: "was not resolved".into(),
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
                    BuildError::Setup(format!(
                        "stage {parent} was not built before stage {}",
                        stage.index
                    ))
                })?;
                if self.snapshotter.lower_layout() == LowerLayout::Flattened {
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
        let triggers = builder.take_base_onbuild();
        if !triggers.is_empty() {
            self.log(&format!(
                "warning: stage {}: the base image's ONBUILD triggers are not run ({})",
                stage.index,
                triggers.join("; ")
            ));
        }
        for (position, ins) in stage.instructions.iter().enumerate() {
            let started = Instant::now();
            let step_key = self.keys.get(&(stage.index, position)).cloned();
            let (cache, layer) = self
                .cached_or_run(
                    plan,
                    stage,
                    ins,
                    step_key.as_ref(),
                    &mut builder,
                    &mut state,
                )
                .map_err(|message| BuildError::Step {
                    file: self.dockerfile_name.clone(),
                    line: ins.line,
                    instruction: ins.original.clone(),
                    message,
                })?;
            if cache != "none" {
                self.log(&format!(
                    "[stage {} line {}] cache {cache}: {}",
                    stage.index, ins.line, ins.original
                ));
            }
            self.steps.push(StepRecord {
                stage: stage.index,
                line: ins.line,
                instruction: ins.original.clone(),
                key: step_key.as_ref().filter(|k| k.filesystem).map(|k| k.key),
                inputs: step_key.map(|k| k.inputs).unwrap_or_default(),
                cache,
                layer_size: layer.as_ref().map(|l| l.desc.size),
                layer: layer.map(|l| l.desc.digest),
                duration_ms: started.elapsed().as_millis() as u64,
            });
        }
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
    fn instruction(
        &mut self,
        plan: &Plan,
        stage: &Stage,
        ins: &PlannedInstruction,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) -> Result<(&'static str, Option<LayerRef>), String> {
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
                    builder.expose(p).map_err(|e| e.to_string())?;
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
            Instruction::Arg(_) => return Ok(("none", None)),
            // The stage's own FROM line: the base was applied before the loop.
            Instruction::From(_) => return Ok(("none", None)),
            Instruction::Workdir(dir) => {
                builder.set_workdir(dir);
                let workdir = workdir_of(builder.config());
                let layer =
                    self.filesystem_step(stage, ins, builder, state, &created_by, |_, rootfs| {
                        copy::ensure_dir(rootfs, &workdir, (0, 0), 0o755)
                            .map(|_| ())
                            .map_err(|e| format!("creating {}: {e}", workdir.display()))
                    })?;
                return Ok(("run", layer));
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
                let mut env = env;
                env.extend(secret_env);
                let log = self.opts.log.clone();
                let prefix = format!("[stage {} line {}] ", stage.index, ins.line);
                let layer = self.filesystem_step(
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
                        spec.output = OutputSink {
                            prefix,
                            writer: Some(log),
                            ..OutputSink::default()
                        };
                        let outcome = driver.runner.run(&spec).map_err(|e| e.to_string())?;
                        if outcome.success() {
                            Ok(())
                        } else {
                            Err(format!(
                                "the command exited with {:?}; last output:\n{}",
                                outcome.status,
                                outcome.tail.join("\n")
                            ))
                        }
                    },
                )?;
                return Ok(("run", layer));
            }
            Instruction::Copy(c) => {
                let from = c.from.clone();
                let excludes = c.exclude.clone();
                let sources = c.sources.clone();
                let dest = c.dest.clone();
                let (chown, chmod) = (c.chown.clone(), c.chmod.clone());
                let heredocs = ins.heredocs.clone();
                let workdir = workdir_of(builder.config());
                let source_stage = ins.stage_refs.first().copied();
                let layer = self.filesystem_step(
                    stage,
                    ins,
                    builder,
                    state,
                    &created_by,
                    move |driver, rootfs| {
                        let copy_opts = copy_options(rootfs, chown.as_deref(), chmod.as_deref())?;
                        let roots = match (&from, source_stage) {
                            (Some(_), Some(index)) => driver.stage_sources(index, &sources)?,
                            (Some(image), None) => driver.image_sources(image, &sources)?,
                            (None, _) => driver.context_sources(&sources, &excludes, &heredocs)?,
                        };
                        copy_into(rootfs, &workdir, &dest, &roots, &copy_opts)
                            .map_err(|e| e.to_string())
                    },
                )?;
                let _ = plan;
                return Ok(("run", layer));
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
                let layer = self.filesystem_step(
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
                            driver.context_sources(&sources, &excludes, &heredocs)?
                        };
                        let mut as_is = Vec::new();
                        for r in &fetched {
                            as_is.push(walk_root(&r.path, &r.name).map_err(|e| e.to_string())?);
                        }
                        add_into(rootfs, &workdir, &dest, roots, as_is, &copy_opts)
                    },
                )?;
                return Ok(("run", layer));
            }
        }
        builder.add_empty_history(&created_by);
        Ok(("none", None))
    }

    /// Materialises the stage's rootfs, runs `action` in a writable view of
    /// it, and records the change as a layer (none if nothing changed).
    fn filesystem_step(
        &mut self,
        stage: &Stage,
        ins: &PlannedInstruction,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
        created_by: &str,
        action: impl FnOnce(&mut Driver, &Path) -> Result<(), String>,
    ) -> Result<Option<LayerRef>, String> {
        let lowers = self.ensure_lowers(state, stage.index)?;
        self.scratch_counter += 1;
        let scratch = self.work.join(format!(
            "step-{}-{}-{}",
            stage.index, ins.line, self.scratch_counter
        ));
        fs::create_dir_all(&scratch).map_err(|e| format!("creating {}: {e}", scratch.display()))?;
        let mounted = self
            .snapshotter
            .prepare(&lowers, &scratch)
            .map_err(|e| e.to_string())?;
        let rootfs = mounted.rootfs.clone();
        if let Err(e) = action(self, &rootfs) {
            let _ = self.snapshotter.release(mounted);
            return Err(e);
        }
        let change = match self.snapshotter.diff(&mounted) {
            Ok(c) => c,
            Err(e) => {
                let _ = self.snapshotter.release(mounted);
                return Err(e.to_string());
            }
        };
        let layer_opts = LayerOptions {
            compression: self.opts.compression,
            mtime: if self.opts.reproducible {
                MtimePolicy::Clamp(self.opts.source_date_epoch.unwrap_or(0))
            } else {
                MtimePolicy::Keep
            },
        };
        let written = match write_layer(&change, &layer_opts, &self.work) {
            Ok(l) => l,
            Err(e) => {
                let _ = self.snapshotter.release(mounted);
                return Err(e.to_string());
            }
        };
        let Some(layer) = written else {
            self.snapshotter
                .release(mounted)
                .map_err(|e| e.to_string())?;
            state.lowers = Some(lowers);
            builder.add_empty_history(created_by);
            return Ok(None);
        };
        let blob = self.store.path(&layer.digest);
        if let Some(parent) = blob.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        fs::rename(&layer.path, &blob)
            .map_err(|e| format!("storing layer {}: {e}", layer.digest))?;
        let unpacked = self.layers_dir.join(layer.diff_id.hex());
        let new_lowers =
            if self.snapshotter.lower_layout() == LowerLayout::Stacked && unpacked.exists() {
                self.snapshotter
                    .release(mounted)
                    .map_err(|e| e.to_string())?;
                let mut l = lowers;
                l.push(unpacked);
                l
            } else {
                let dest = if self.snapshotter.lower_layout() == LowerLayout::Stacked {
                    unpacked
                } else {
                    scratch.join("committed")
                };
                self.snapshotter
                    .commit(mounted, &dest)
                    .map_err(|e| e.to_string())?
            };
        state.lowers = Some(new_lowers);
        let layer_ref = LayerRef {
            desc: Descriptor::new(layer.media_type, layer.digest.clone(), layer.size),
            diff_id: layer.diff_id.clone(),
            blob,
        };
        state.layers.push(layer_ref.clone());
        builder.add_layer(layer.diff_id, created_by);
        self.log(&format!(
            "[stage {} line {}] layer {} ({} bytes)",
            stage.index, ins.line, layer_ref.desc.digest, layer_ref.desc.size
        ));
        Ok(Some(layer_ref))
    }

    /// The snapshotter's lower stack for the stage's current layers.
    fn ensure_lowers(
        &mut self,
        state: &mut StageState,
        stage: usize,
    ) -> Result<Vec<PathBuf>, String> {
        if let Some(l) = &state.lowers {
            return Ok(l.clone());
        }
        let lowers = match self.snapshotter.lower_layout() {
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
                        .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                    dir
                };
                for layer in &state.layers {
                    self.ensure_blob(layer)?;
                }
                let files: Vec<(PathBuf, Digest)> = state
                    .layers
                    .iter()
                    .map(|l| (l.blob.clone(), l.diff_id.clone()))
                    .collect();
                apply_layers(
                    files.iter().map(|(p, d)| (p.as_path(), Some(d))),
                    &root,
                    &UnpackOptions::default(),
                )
                .map_err(|e| e.to_string())?;
                vec![root]
            }
        };
        state.lowers = Some(lowers.clone());
        Ok(lowers)
    }

    /// Unpacks a layer once into `layers/<diff_id>` (overlay form).
    fn unpacked_layer(&mut self, layer: &LayerRef) -> Result<PathBuf, String> {
        let dir = self.layers_dir.join(layer.diff_id.hex());
        if dir.is_dir() {
            return Ok(dir);
        }
        self.ensure_blob(layer)?;
        let tmp = self.layers_dir.join(format!(
            ".tmp-{}-{}",
            layer.diff_id.hex(),
            std::process::id()
        ));
        let _ = fs::remove_dir_all(&tmp);
        fs::create_dir_all(&tmp).map_err(|e| format!("creating {}: {e}", tmp.display()))?;
        let file = fs::File::open(&layer.blob).map_err(|e| {
            format!(
                "opening layer {} at {}: {e}",
                layer.desc.digest,
                layer.blob.display()
            )
        })?;
        let opts = UnpackOptions {
            mode: UnpackMode::OverlayLower,
            ..UnpackOptions::default()
        };
        unpack_layer(file, &tmp, &opts, Some(&layer.diff_id))
            .map_err(|e| format!("unpacking layer {}: {e}", layer.desc.digest))?;
        match fs::rename(&tmp, &dir) {
            Ok(()) => Ok(dir),
            // Another build unpacked the same layer meanwhile.
            Err(_) if dir.is_dir() => {
                let _ = fs::remove_dir_all(&tmp);
                Ok(dir)
            }
            Err(e) => Err(format!("moving unpacked layer into {}: {e}", dir.display())),
        }
    }

    // ------------------------------------------------------------ cache

    fn compute_keys(&mut self, plan: &Plan) -> Result<(), BuildError> {
        let options = format!(
            "{:?} reproducible={} epoch={:?}",
            self.opts.compression, self.opts.reproducible, self.opts.source_date_epoch
        );
        for &index in &plan.stages_to_build {
            let stage = &plan.stages[index];
            let mut parent = match &stage.source {
                StageSource::Image(name) => {
                    let base = self.bases.get(name).ok_or_else(|| BuildError::Base {
                        reference: name.clone(),
                        message: "was not resolved".into(),
                    })?;
                    keys::base_key(&base.identity)
                }
                StageSource::Stage(i) => *self
                    .stage_last_key
                    .get(i)
                    .ok_or_else(|| BuildError::Setup(format!("stage {i} has no key")))?,
            };
            for (position, ins) in stage.instructions.iter().enumerate() {
                let file = self.dockerfile_name.clone();
                let step_err = |message: String| BuildError::Step {
                    file: file.clone(),
                    line: ins.line,
                    instruction: ins.original.clone(),
                    message,
                };
                let sources = match &ins.instruction {
                    Instruction::Copy(c) => Some(match (&c.from, ins.stage_refs.first()) {
                        (Some(_), Some(i)) => {
                            SourceIdentity::Stage(*self.stage_last_key.get(i).ok_or_else(|| {
                                step_err(format!("stage {i} is not built before it is used"))
                            })?)
                        }
                        (Some(image), None) => {
                            self.resolve_base(image)?;
                            let identity = self
                                .bases
                                .get(image)
                                .map(|b| b.identity.clone())
                                .unwrap_or_default();
                            SourceIdentity::Image(identity)
                        }
                        (None, _) => SourceIdentity::Context(
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
                        let mut hasher = blake3::Hasher::new();
                        hasher.update(&self.context_digest(&local, &a.exclude).map_err(step_err)?);
                        for source in &remote_sources {
                            let fetched = self
                                .fetch_remote(source, a.checksum.as_deref(), a.keep_git_dir)
                                .map_err(step_err)?;
                            hasher.update(fetched.identity.as_bytes());
                        }
                        Some(SourceIdentity::Context(*hasher.finalize().as_bytes()))
                    }
                    Instruction::Run(run)
                        if run
                            .mounts
                            .iter()
                            .any(|m| m.kind == dockerfile::MountType::Bind) =>
                    {
                        let mut hasher = blake3::Hasher::new();
                        for m in run
                            .mounts
                            .iter()
                            .filter(|m| m.kind == dockerfile::MountType::Bind)
                        {
                            let source = m.source.clone().unwrap_or_else(|| ".".into());
                            hasher.update(source.as_bytes());
                            match &m.from {
                                None => {
                                    hasher.update(
                                        &self.context_digest(&[source], &[]).map_err(step_err)?,
                                    );
                                }
                                Some(from) => {
                                    match stage_index(plan, from) {
                                        Some(i) => {
                                            let key = self.stage_last_key.get(&i).ok_or_else(|| {
                                            step_err(format!("stage {from} is not built before it is mounted"))
                                        })?;
                                            hasher.update(key.as_bytes());
                                        }
                                        None => {
                                            self.resolve_base(from)?;
                                            let identity = self
                                                .bases
                                                .get(from)
                                                .map(|b| b.identity.clone())
                                                .unwrap_or_default();
                                            hasher.update(identity.as_bytes());
                                        }
                                    }
                                }
                            }
                        }
                        Some(SourceIdentity::Context(*hasher.finalize().as_bytes()))
                    }
                    _ => None,
                };
                let key = keys::step_key(&parent, ins, sources.as_ref(), &options);
                parent = key.key;
                self.keys.insert((index, position), key);
            }
            self.stage_last_key.insert(index, parent);
        }
        Ok(())
    }

    /// One batch lookup for every filesystem step of the build.
    fn lookup_keys(&mut self) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.reads() {
            return;
        }
        let mut wanted: Vec<CacheKey> = self
            .keys
            .values()
            .filter(|k| k.filesystem)
            .map(|k| k.key)
            .collect();
        wanted.sort();
        wanted.dedup();
        let started = Instant::now();
        match cache.lookup(&wanted) {
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
                self.log(&format!(
                    "warning: the cache is unavailable, building without it: {e}"
                ));
                self.cache = None;
            }
        }
    }

    /// A filesystem step whose key hit takes the cached layer (descriptor
    /// only: nothing is downloaded until a later step needs the files);
    /// otherwise the step runs and its result is uploaded in the background.
    fn cached_or_run(
        &mut self,
        plan: &Plan,
        stage: &Stage,
        ins: &PlannedInstruction,
        step_key: Option<&StepKey>,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) -> Result<(&'static str, Option<LayerRef>), String> {
        let Some(step_key) = step_key.filter(|k| k.filesystem) else {
            return self.instruction(plan, stage, ins, builder, state);
        };
        let created_by = history_text(ins);
        if let Some(entry) = self.hits.get(&step_key.key).cloned() {
            if let Instruction::Workdir(dir) = &ins.instruction {
                builder.set_workdir(dir);
            }
            let Some(layer) = entry.layer else {
                builder.add_empty_history(&created_by);
                return Ok(("hit", None));
            };
            let layer_ref = LayerRef {
                desc: Descriptor::new(&layer.media_type, layer.digest.clone(), layer.size),
                diff_id: layer.diff_id.clone(),
                blob: self.store.path(&layer.digest),
            };
            state.layers.push(layer_ref.clone());
            // The stack is rebuilt from the layers when a later step needs
            // it (unpacked layers are reused by diff_id).
            state.lowers = None;
            builder.add_layer(layer.diff_id, &created_by);
            return Ok(("hit", Some(layer_ref)));
        }
        let (cache, layer) = self.instruction(plan, stage, ins, builder, state)?;
        let entry = CacheEntry {
            layer: layer.as_ref().map(|l| LayerDescriptor {
                media_type: l.desc.media_type.clone(),
                digest: l.desc.digest.clone(),
                size: l.desc.size,
                diff_id: l.diff_id.clone(),
            }),
            created_by,
            created: rfc3339(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            extra: BTreeMap::new(),
        };
        let blob = layer
            .as_ref()
            .map(|l| (l.desc.digest.clone(), l.blob.clone()));
        self.upload(step_key.key, entry, blob);
        Ok((if cache == "none" { "none" } else { "miss" }, layer))
    }

    fn upload(&mut self, key: CacheKey, entry: CacheEntry, blob: Option<(Digest, PathBuf)>) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.writes() {
            return;
        }
        self.uploads.push(std::thread::spawn(move || {
            let mut bytes = 0;
            if let Some((digest, path)) = &blob {
                cache.put_blob(digest, path).map_err(|e| e.to_string())?;
                bytes = fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            }
            cache.put_entry(&key, &entry).map_err(|e| e.to_string())?;
            Ok(bytes)
        }));
    }

    /// Waits for the background uploads; a failed upload is a warning.
    fn wait_uploads(&mut self) -> u64 {
        let mut total = 0;
        for handle in std::mem::take(&mut self.uploads) {
            match handle.join() {
                Ok(Ok(bytes)) => total += bytes,
                Ok(Err(e)) => self.log(&format!("warning: uploading to the cache failed: {e}")),
                Err(_) => self.log("warning: a cache upload panicked"),
            }
        }
        total
    }

    /// Makes sure a layer's blob is in the local store, from the cache.
    /// A base-image layer is tried in the cache first and otherwise pulled
    /// from its registry, then shared through the cache so the cluster pulls
    /// each base layer from outside once.
    fn ensure_blob(&mut self, layer: &LayerRef) -> Result<(), String> {
        if layer.blob.is_file() {
            return Ok(());
        }
        let digest = layer.desc.digest.clone();
        let mut cache_error = None;
        if let Some(cache) = self.cache.clone().filter(|_| self.opts.cache.mode.reads()) {
            match cache.fetch_blob(&digest, &self.store) {
                Ok(_) => {
                    self.bytes_downloaded += layer.desc.size;
                    return Ok(());
                }
                Err(e) => cache_error = Some(e.to_string()),
            }
        }
        let Some((pulled, base_layer)) = self.base_layers.get(&digest).cloned() else {
            return Err(match cache_error {
                Some(e) => format!("fetching layer {digest} from the cache: {e}"),
                None => format!("layer {digest} is not available locally and there is no cache"),
            });
        };
        self.log(&format!(
            "pulling layer {digest} ({} bytes)",
            layer.desc.size
        ));
        self.runtime
            .block_on(
                self.client
                    .fetch_blob(&pulled, &base_layer.desc, &self.store),
            )
            .map_err(|e| format!("pulling base layer {digest}: {e}"))?;
        let entry = CacheEntry {
            layer: Some(LayerDescriptor {
                media_type: base_layer.desc.media_type.clone(),
                digest: digest.clone(),
                size: base_layer.desc.size,
                diff_id: base_layer.diff_id.clone(),
            }),
            created_by: format!("base layer of {}", pulled.reference),
            created: rfc3339(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            ),
            extra: BTreeMap::new(),
        };
        let blob = Some((digest.clone(), self.store.path(&digest)));
        self.upload(keys::base_layer_key(&digest), entry, blob);
        Ok(())
    }

    fn context_digest(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<[u8; 32], String> {
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
        ctx.digest(&selections).map_err(|e| e.to_string())
    }

    /// COPY/ADD sources in the context, minus `--exclude` patterns (matched
    /// against paths relative to each source, with .dockerignore rules).
    fn select_context(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<Vec<crate::context::Selection>, String> {
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(
                DockerIgnore::parse(&excludes.join("\n"), Path::new("--exclude"))
                    .map_err(|e| e.to_string())?,
            )
        };
        let ctx = self.context()?;
        let mut selections = ctx.select(sources).map_err(|e| e.to_string())?;
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
    fn run_mounts(
        &mut self,
        plan: &Plan,
        mounts: &[dockerfile::Mount],
        workdir: &Path,
    ) -> Result<RunMounts, String> {
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
                    let target = target.ok_or("--mount=type=bind needs a target")?;
                    let source = m.source.clone().unwrap_or_else(|| ".".into());
                    let host = match &m.from {
                        None => {
                            let rel = crate::context::clean_relative(&source).ok_or_else(|| {
                                format!("--mount source {source:?} is outside the build context")
                            })?;
                            let host = self.opts.plan.context.join(rel);
                            if fs::symlink_metadata(&host).is_err() {
                                return Err(format!(
                                    "--mount source {source:?}: not found in the build context"
                                ));
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
                                    format!("--mount source {source:?} not found in {from}")
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
                    let target = target.ok_or("--mount=type=cache needs a target")?;
                    let id = m.id.clone().unwrap_or_else(|| target.display().to_string());
                    let dir = self
                        .opts
                        .state_dir
                        .join("run-cache")
                        .join(blake3::hash(id.as_bytes()).to_hex().as_str());
                    if !dir.is_dir() {
                        fs::create_dir_all(&dir)
                            .map_err(|e| format!("creating cache mount {id}: {e}"))?;
                        use std::os::unix::fs::PermissionsExt;
                        fs::set_permissions(
                            &dir,
                            fs::Permissions::from_mode(m.mode.unwrap_or(0o755)),
                        )
                        .map_err(|e| format!("cache mount {id}: {e}"))?;
                        std::os::unix::fs::chown(
                            &dir,
                            Some(m.uid.unwrap_or(0)),
                            Some(m.gid.unwrap_or(0)),
                        )
                        .map_err(|e| format!("cache mount {id}: {e}"))?;
                    }
                    specs.push(MountSpec::Bind {
                        source: dir,
                        target,
                        readonly: m.readonly,
                    });
                }
                MountType::Tmpfs => {
                    let target = target.ok_or("--mount=type=tmpfs needs a target")?;
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
                            .ok_or("--mount=type=secret needs an id or a target")?;
                    let Some(path) = self.secret_file(&id)? else {
                        if m.required {
                            return Err(format!(
                                "secret {id} is required but no --secret id={id} was given"
                            ));
                        }
                        continue;
                    };
                    if let Some(var) = &m.env {
                        let value = fs::read_to_string(&path)
                            .map_err(|e| format!("reading secret {id}: {e}"))?;
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
                    return Err(
                        "RUN --mount=type=ssh is not supported: kiln has no SSH agent forwarding"
                            .into(),
                    );
                }
            }
        }
        Ok((specs, env))
    }

    /// Downloads or clones a remote ADD source once per build.
    fn fetch_remote(
        &mut self,
        source: &str,
        checksum: Option<&str>,
        keep_git_dir: bool,
    ) -> Result<remote::RemoteSource, String> {
        if let Some(r) = self.remote.get(source) {
            return Ok(r.clone());
        }
        self.scratch_counter += 1;
        let dir = self.work.join(format!("remote-{}", self.scratch_counter));
        let fetched = if remote::is_git(source) {
            if checksum.is_some() {
                return Err("ADD --checksum applies to URLs, not git repositories".into());
            }
            self.log(&format!("cloning {source}"));
            remote::clone(source, keep_git_dir, &dir)?
        } else {
            self.log(&format!("downloading {source}"));
            let client = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(|e| e.to_string())?;
            self.runtime
                .block_on(remote::download(&client, source, checksum, &dir))?
        };
        self.remote.insert(source.to_owned(), fetched.clone());
        Ok(fetched)
    }

    /// The file holding secret `id` (`--secret id=..,src=..` or `env=..`).
    fn secret_file(&mut self, id: &str) -> Result<Option<PathBuf>, String> {
        let Some(secret) = self.opts.secrets.iter().find(|s| s.id == id).cloned() else {
            return Ok(None);
        };
        match secret.source {
            SecretSource::File(path) => Ok(Some(path)),
            SecretSource::Env(var) => {
                let value =
                    std::env::var(&var).map_err(|_| format!("secret {id}: ${var} is not set"))?;
                let dir = self.work.join("secrets");
                fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                use std::os::unix::fs::PermissionsExt;
                fs::set_permissions(&dir, fs::Permissions::from_mode(0o700))
                    .map_err(|e| e.to_string())?;
                let path = dir.join(blake3::hash(id.as_bytes()).to_hex().as_str());
                fs::write(&path, value).map_err(|e| e.to_string())?;
                Ok(Some(path))
            }
        }
    }

    // ---------------------------------------------------------- sources

    fn context(&mut self) -> Result<&BuildContext, String> {
        if self.context.is_none() {
            let dockerfile = self.opts.plan.dockerfile_path();
            let ignore = DockerIgnore::load(&self.opts.plan.context, &dockerfile)
                .map_err(|e| e.to_string())?;
            let visibility = |path: &str, is_dir: bool| {
                if !ignore.is_excluded(path) {
                    Visibility::Included
                } else if is_dir && ignore.may_contain_included(path) {
                    Visibility::ExcludedButDescend
                } else {
                    Visibility::Excluded
                }
            };
            let ctx = BuildContext::scan(&self.opts.plan.context, &visibility)
                .map_err(|e| e.to_string())?;
            self.context = Some(ctx);
        }
        self.context
            .as_ref()
            .ok_or_else(|| "no build context".to_string())
    }

    fn context_sources(
        &mut self,
        sources: &[String],
        excludes: &[String],
        heredocs: &[dockerfile::Heredoc],
    ) -> Result<Vec<CopyRoot>, String> {
        let mut roots = Vec::new();
        let mut from_context = Vec::new();
        for s in sources {
            let name = s
                .trim_start_matches("<<")
                .trim_start_matches('-')
                .trim_matches(['"', '\'']);
            match heredocs
                .iter()
                .find(|h| s.starts_with("<<") && h.name == name)
            {
                Some(h) => {
                    self.scratch_counter += 1;
                    let dir = self.work.join(format!("heredoc-{}", self.scratch_counter));
                    fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
                    let file = dir.join(&h.name);
                    fs::write(&file, &h.content).map_err(|e| e.to_string())?;
                    let mut root = walk_root(&file, &h.name).map_err(|e| e.to_string())?;
                    root.name = h.name.clone();
                    roots.push(root);
                }
                None => from_context.push(s.clone()),
            }
        }
        if from_context.is_empty() {
            return Ok(roots);
        }
        let selections = self.select_context(&from_context, excludes)?;
        let ctx = self.context()?;
        for sel in selections {
            let name = sel.root.rsplit('/').next().unwrap_or("").to_owned();
            let entries = sel
                .entries
                .iter()
                .map(|&i| {
                    let e = ctx.entry(i);
                    let relative = e
                        .path
                        .strip_prefix(&sel.root)
                        .unwrap_or("")
                        .trim_start_matches('/');
                    CopyItem {
                        relative: PathBuf::from(relative),
                        host: ctx.absolute(e),
                    }
                })
                .collect();
            roots.push(CopyRoot {
                name,
                is_dir: sel.is_dir,
                entries,
            });
        }
        Ok(roots)
    }

    /// Sources of `COPY --from=<stage>`: read from a view of that stage.
    fn stage_sources(&mut self, index: usize, sources: &[String]) -> Result<Vec<CopyRoot>, String> {
        let mut state = self
            .stages
            .get(&index)
            .cloned()
            .ok_or_else(|| format!("stage {index} has not been built"))?;
        if self.snapshotter.lower_layout() == LowerLayout::Flattened
            && self.opts.isolation == Isolation::None
        {
            return Err(
                "COPY --from another stage is not supported with --isolation none yet".into(),
            );
        }
        let lowers = self.ensure_lowers(&mut state, index)?;
        let roots = self.sources_from_lowers(&lowers, sources);
        if let Some(s) = self.stages.get_mut(&index) {
            s.lowers = Some(lowers);
        }
        roots
    }

    /// Sources of `COPY --from=<image>`.
    fn image_sources(&mut self, image: &str, sources: &[String]) -> Result<Vec<CopyRoot>, String> {
        self.resolve_base(image).map_err(|e| e.to_string())?;
        let base = self.bases.get(image).cloned().ok_or("image not resolved")?;
        let mut state = StageState {
            config: base.config,
            layers: base.layers,
            lowers: None,
            registry_ref: None,
        };
        self.scratch_counter += 1;
        let lowers = self.ensure_lowers(&mut state, 10_000 + self.scratch_counter)?;
        self.sources_from_lowers(&lowers, sources)
    }

    fn sources_from_lowers(
        &mut self,
        lowers: &[PathBuf],
        sources: &[String],
    ) -> Result<Vec<CopyRoot>, String> {
        self.scratch_counter += 1;
        let scratch = self.work.join(format!("from-{}", self.scratch_counter));
        fs::create_dir_all(&scratch).map_err(|e| e.to_string())?;
        let mounted = self
            .snapshotter
            .prepare(lowers, &scratch)
            .map_err(|e| e.to_string())?;
        // The view is copied out of before it is released: sources are
        // copied into scratch space so the mount can go now.
        let result = (|| {
            let copy_dir = scratch.join("sources");
            let mut roots = Vec::new();
            for (n, source) in sources.iter().enumerate() {
                let matches = glob_in_root(&mounted.rootfs, source)?;
                if matches.is_empty() {
                    return Err(format!(
                        "{source}: no such file or directory in the source stage"
                    ));
                }
                for host in matches {
                    let name = host
                        .file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default();
                    let staged = copy_dir.join(n.to_string()).join(&name);
                    fs::create_dir_all(staged.parent().unwrap_or(&copy_dir))
                        .map_err(|e| e.to_string())?;
                    let status = std::process::Command::new("cp")
                        .arg("-a")
                        .arg("--")
                        .arg(&host)
                        .arg(&staged)
                        .status()
                        .map_err(|e| format!("running cp: {e}"))?;
                    if !status.success() {
                        return Err(format!(
                            "copying {} out of the source stage failed",
                            host.display()
                        ));
                    }
                    roots.push(walk_root(&staged, &name).map_err(|e| e.to_string())?);
                }
            }
            Ok(roots)
        })();
        self.snapshotter
            .release(mounted)
            .map_err(|e| e.to_string())?;
        result
    }

    // ----------------------------------------------------------- output

    fn timestamp(&self) -> String {
        let secs = if self.opts.reproducible {
            self.opts.source_date_epoch.unwrap_or(0)
        } else {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0)
        };
        rfc3339(secs)
    }

    /// Layers that came from the cache are downloaded only if an output
    /// needs their bytes: a layout or tarball always does, a push only when
    /// some destination registry does not have the blob yet.
    fn fetch_missing_blobs(&mut self, target: &StageState) -> Result<(), BuildError> {
        let extra = self
            .extra_blobs
            .lock()
            .map_err(|_| BuildError::Output("lock poisoned".into()))?
            .clone();
        let missing: Vec<LayerRef> = target
            .layers
            .iter()
            .filter(|l| !l.blob.is_file() && !extra.contains_key(&l.desc.digest))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let local_output = self.opts.oci_layout_path.is_some() || self.opts.tar_path.is_some();
        let destinations: Vec<ImageRef> = if self.opts.no_push {
            Vec::new()
        } else {
            self.opts
                .destinations
                .iter()
                .filter_map(|d| ImageRef::parse(d).ok())
                .collect()
        };
        for layer in missing {
            let mut needed = local_output;
            if !needed {
                for dest in &destinations {
                    let present = self
                        .runtime
                        .block_on(self.client.blob_exists(dest, &layer.desc.digest))
                        .ok()
                        .flatten()
                        .is_some();
                    if !present {
                        needed = true;
                        break;
                    }
                }
            }
            if needed {
                self.ensure_blob(&layer).map_err(BuildError::Output)?;
            }
        }
        Ok(())
    }

    fn finish(&mut self, plan: &Plan, target: StageState) -> Result<BuildOutcome, BuildError> {
        let out_err = |e: &dyn std::fmt::Display| BuildError::Output(e.to_string());
        let config: crate::oci::ImageConfig =
            serde_json::from_slice(&target.config.to_json()).map_err(|e| out_err(&e))?;
        let layers: Vec<Descriptor> = target.layers.iter().map(|l| l.desc.clone()).collect();
        let docs = ImageDocuments::build(&config, layers, false);
        self.fetch_missing_blobs(&target)?;
        let mut blobs: HashMap<Digest, PathBuf> = self
            .extra_blobs
            .lock()
            .map_err(|_| BuildError::Output("lock poisoned".into()))?
            .clone();
        for l in &target.layers {
            blobs.insert(l.desc.digest.clone(), l.blob.clone());
        }
        let source = Blobs {
            store: self.store.clone(),
            extra: blobs,
        };
        let destinations: Vec<ImageRef> = self
            .opts
            .destinations
            .iter()
            .map(|d| {
                ImageRef::parse(d).map_err(|e| BuildError::Output(format!("destination {d}: {e}")))
            })
            .collect::<Result<_, _>>()?;
        if let Some(path) = &self.opts.oci_layout_path {
            let layout = if path.join("oci-layout").exists() {
                OciLayout::open(path)
            } else {
                OciLayout::create(path)
            }
            .map_err(|e| out_err(&e))?;
            let ref_name = destinations
                .first()
                .and_then(|d| d.tag().map(str::to_owned))
                .unwrap_or_else(|| "latest".into());
            layout
                .add_image(&docs, &source, Some(&ref_name))
                .map_err(|e| out_err(&e))?;
            self.log(&format!("wrote OCI layout {} ({ref_name})", path.display()));
        }
        if let Some(path) = &self.opts.tar_path {
            crate::oci::archive::write_docker_archive_file(path, &docs, &source, &destinations)
                .map_err(|e| out_err(&e))?;
            self.log(&format!("wrote docker archive {}", path.display()));
        }
        if !self.opts.no_push && !destinations.is_empty() {
            let hints: Vec<ImageRef> = target.registry_ref.iter().cloned().collect();
            let digest = self
                .runtime
                .block_on(
                    self.client
                        .push_image(&docs, &destinations, &source, &hints),
                )
                .map_err(|e| out_err(&e))?;
            for d in &destinations {
                self.log(&format!("pushed {d}@{digest}"));
            }
        }
        if let Some(path) = &self.opts.digest_file {
            fs::write(path, docs.manifest_digest.to_string())
                .map_err(|e| out_err(&format!("{}: {e}", path.display())))?;
        }
        if let Some(path) = &self.opts.image_name_with_digest_file {
            let lines: String = destinations
                .iter()
                .map(|d| format!("{}@{}\n", d.name(), docs.manifest_digest))
                .collect();
            fs::write(path, lines).map_err(|e| out_err(&format!("{}: {e}", path.display())))?;
        }
        let _ = plan;
        Ok(BuildOutcome {
            manifest_digest: docs.manifest_digest.clone(),
            image: docs,
            steps: std::mem::take(&mut self.steps),
        })
    }
}

/// The store plus blobs that live elsewhere (base images from layouts).
struct Blobs {
    store: LocalStore,
    extra: HashMap<Digest, PathBuf>,
}

impl BlobSource for Blobs {
    fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        if let Some(p) = self.extra.get(digest) {
            return Some(p.clone());
        }
        self.store.blob_path(digest)
    }
}

/// Why `--isolation none` must not run here, if it must not.
fn refuse_in_place() -> Option<String> {
    let container_env = std::env::var("container").ok();
    match detect_container(Path::new("/"), container_env.as_deref()) {
        Some(_) => None,
        None => Some(
            "--isolation none unpacks images over this machine's own root filesystem; \
             it only runs inside a container (or pass --force)"
                .into(),
        ),
    }
}

fn config_from_bytes(bytes: &[u8]) -> Result<image_config::ImageConfig, String> {
    image_config::ImageConfig::from_json(bytes).map_err(|e| format!("image config: {e}"))
}

fn env_map(config: &image_config::ImageConfig) -> BTreeMap<String, String> {
    config
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect()
}

fn workdir_of(config: &image_config::ImageConfig) -> PathBuf {
    match config.config.working_dir.as_str() {
        "" => PathBuf::from("/"),
        d => PathBuf::from(d),
    }
}

fn shell_of(config: &image_config::ImageConfig) -> &[String] {
    config.config.shell.as_deref().unwrap_or(&[])
}

fn default_shell(shell: &[String]) -> Vec<String> {
    if shell.is_empty() {
        vec!["/bin/sh".into(), "-c".into()]
    } else {
        shell.to_vec()
    }
}

fn command_argv(c: &Command, shell: &[String]) -> Vec<String> {
    match c {
        Command::Exec(argv) => argv.clone(),
        Command::Shell(s) => {
            let mut argv = default_shell(shell);
            argv.push(s.clone());
            argv
        }
    }
}

/// RUN's argv. A heredoc that is the whole command is the script itself;
/// otherwise the shell gets the command line followed by the heredoc bodies,
/// which it reads as the here-documents they are.
fn run_argv(
    run: &dockerfile::Run,
    shell: &[String],
    heredocs: &[dockerfile::Heredoc],
) -> Vec<String> {
    let Command::Shell(line) = &run.command else {
        return command_argv(&run.command, shell);
    };
    if heredocs.is_empty() {
        return command_argv(&run.command, shell);
    }
    let mut argv = default_shell(shell);
    let trimmed = line.trim();
    let only_heredoc = heredocs.len() == 1
        && trimmed.starts_with("<<")
        && trimmed
            .trim_start_matches("<<")
            .trim_start_matches('-')
            .trim_matches(['"', '\''])
            == heredocs[0].name;
    if only_heredoc {
        argv.push(heredocs[0].content.clone());
        return argv;
    }
    let mut script = line.clone();
    script.push('\n');
    for h in heredocs {
        script.push_str(&h.content);
        script.push_str(&h.name);
        script.push('\n');
    }
    argv.push(script);
    argv
}

/// A RUN step's environment: the image's (with ENV applied), plus the
/// build args in scope that no ENV overrides.
fn run_env(config: &image_config::ImageConfig, ins: &PlannedInstruction) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = config
        .config
        .env
        .iter()
        .filter_map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
        })
        .collect();
    for (k, v) in &ins.args {
        if !env.iter().any(|(ek, _)| ek == k) {
            env.push((k.clone(), v.clone()));
        }
    }
    env
}

fn healthcheck(h: &dockerfile::Healthcheck, shell: &[String]) -> image_config::Healthcheck {
    match h {
        dockerfile::Healthcheck::None => image_config::Healthcheck {
            test: vec!["NONE".into()],
            ..Default::default()
        },
        dockerfile::Healthcheck::Cmd {
            test,
            interval_ns,
            timeout_ns,
            start_period_ns,
            start_interval_ns,
            retries,
        } => {
            let test = match test {
                Command::Exec(argv) => {
                    let mut t = vec!["CMD".to_string()];
                    t.extend(argv.iter().cloned());
                    t
                }
                Command::Shell(s) => vec!["CMD-SHELL".into(), s.clone()],
            };
            let _ = shell;
            image_config::Healthcheck {
                test,
                interval: interval_ns.unwrap_or(0) as i64,
                timeout: timeout_ns.unwrap_or(0) as i64,
                start_period: start_period_ns.unwrap_or(0) as i64,
                start_interval: start_interval_ns.unwrap_or(0) as i64,
                retries: retries.unwrap_or(0) as i64,
            }
        }
    }
}

/// `created_by` in the image history, as Docker writes it.
fn history_text(ins: &PlannedInstruction) -> String {
    match &ins.instruction {
        Instruction::Run(_) => format!("RUN {}", ins.expanded.trim_start_matches("RUN ")),
        _ => ins.expanded.clone(),
    }
}

fn copy_options(
    rootfs: &Path,
    chown: Option<&str>,
    chmod: Option<&str>,
) -> Result<CopyOptions, String> {
    let owner = match chown {
        None => None,
        Some(spec) => Some(resolve_owner(rootfs, spec)?),
    };
    let chmod = match chmod {
        None => None,
        Some(m) => Some(
            u32::from_str_radix(m, 8)
                .ok()
                .filter(|m| *m <= 0o7777)
                .ok_or_else(|| format!("--chmod={m}: expected an octal mode such as 0755"))?,
        ),
    };
    Ok(CopyOptions { owner, chmod })
}

/// `--chown=user[:group]`: names from the image's passwd/group; a user
/// without a group uses the same number as its gid, as Docker does.
fn resolve_owner(rootfs: &Path, spec: &str) -> Result<(u32, u32), String> {
    let resolved = resolve_user(rootfs, spec).map_err(|e| format!("--chown={spec}: {e}"))?;
    if spec.contains(':') {
        Ok((resolved.uid, resolved.gid))
    } else {
        Ok((resolved.uid, resolved.uid))
    }
}

/// ADD: local tar archives (plain, gzip, zstd) are extracted into the
/// destination directory; anything else, and everything in `as_is`
/// (downloads, git checkouts), is copied as COPY would.
fn add_into(
    rootfs: &Path,
    workdir: &Path,
    dest: &str,
    roots: Vec<CopyRoot>,
    as_is: Vec<CopyRoot>,
    opts: &CopyOptions,
) -> Result<(), String> {
    let mut plain = as_is;
    for root in roots {
        let host = &root.entries[0].host;
        if !root.is_dir && is_tar_archive(host) {
            let dir = copy::absolute_in_image(workdir, dest);
            let host_dir = copy::ensure_dir(rootfs, &dir, opts.owner.unwrap_or((0, 0)), 0o755)
                .map_err(|e| format!("creating {}: {e}", dir.display()))?;
            let file = fs::File::open(host).map_err(|e| format!("{}: {e}", host.display()))?;
            unpack_layer(file, &host_dir, &UnpackOptions::default(), None)
                .map_err(|e| format!("extracting {}: {e}", root.name))?;
        } else {
            plain.push(root);
        }
    }
    if plain.is_empty() {
        return Ok(());
    }
    copy_into(rootfs, workdir, dest, &plain, opts).map_err(|e| e.to_string())
}

fn is_tar_archive(path: &Path) -> bool {
    use std::io::Read;
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let Ok(mut reader) = crate::unpack::decompress(std::io::BufReader::new(file)) else {
        return false;
    };
    let mut header = [0u8; 512];
    if reader.read_exact(&mut header).is_err() {
        return false;
    }
    &header[257..262] == b"ustar"
}

/// Paths in a rootfs matching `pattern` (Go `filepath.Match` per component,
/// symlinks resolved inside the rootfs).
fn glob_in_root(rootfs: &Path, pattern: &str) -> Result<Vec<PathBuf>, String> {
    use crate::build::fsutil::resolve_in_root;
    let clean = copy::absolute_in_image(Path::new("/"), pattern);
    let has_glob = pattern.contains(['*', '?', '[']);
    if !has_glob {
        let host = resolve_in_root(rootfs, &clean).map_err(|e| e.to_string())?;
        return Ok(if fs::symlink_metadata(&host).is_ok() {
            vec![host]
        } else {
            vec![]
        });
    }
    let mut current = vec![rootfs.to_path_buf()];
    for component in clean.components().skip(1) {
        let part = component.as_os_str().to_string_lossy().into_owned();
        let mut next = Vec::new();
        for dir in &current {
            if part.contains(['*', '?', '[']) {
                let Ok(read) = fs::read_dir(dir) else {
                    continue;
                };
                let mut names: Vec<String> = read
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                for name in names {
                    if crate::context::source_matches(&part, &name)
                        .map_err(|e| format!("bad pattern {pattern}: {e}"))?
                    {
                        next.push(dir.join(name));
                    }
                }
            } else {
                let rel = dir
                    .strip_prefix(rootfs)
                    .unwrap_or(Path::new(""))
                    .join(&part);
                let host = resolve_in_root(rootfs, &Path::new("/").join(rel))
                    .map_err(|e| e.to_string())?;
                if fs::symlink_metadata(&host).is_ok() {
                    next.push(host);
                }
            }
        }
        current = next;
    }
    Ok(current)
}

/// The mounts of a RUN step and the environment its secrets add.
type RunMounts = (Vec<MountSpec>, Vec<(String, String)>);

/// A stage named by `from=`: its name (case-insensitive) or index.
fn stage_index(plan: &Plan, from: &str) -> Option<usize> {
    if let Ok(i) = from.parse::<usize>() {
        return (i < plan.stages.len()).then_some(i);
    }
    plan.stages
        .iter()
        .find(|s| {
            s.name
                .as_deref()
                .is_some_and(|n| n.eq_ignore_ascii_case(from))
        })
        .map(|s| s.index)
}

/// The cache the options ask for, or none (with a warning) when it cannot
/// be opened: the build goes on without it.
fn open_cache(
    opts: &BuildOptions,
    runtime: tokio::runtime::Handle,
    log: &Arc<Mutex<dyn Write + Send>>,
) -> Option<Arc<dyn Cache>> {
    if !opts.cache.enabled {
        return None;
    }
    let opened: Result<Arc<dyn Cache>, crate::cache::CacheError> = if opts.cache.servers.is_empty()
    {
        open_embedded(opts)
    } else {
        crate::cache::http::HttpCache::new(
            opts.cache.servers.clone(),
            opts.cache.token.clone(),
            runtime,
        )
        .map(|c| Arc::new(c) as Arc<dyn Cache>)
    };
    match opened {
        Ok(c) => Some(c),
        Err(e) => {
            if let Ok(mut w) = log.lock() {
                let _ = writeln!(w, "warning: building without a cache: {e}");
            }
            None
        }
    }
}

#[cfg(feature = "embedded-cache")]
fn open_embedded(opts: &BuildOptions) -> Result<Arc<dyn Cache>, crate::cache::CacheError> {
    crate::cache::embedded::EmbeddedCache::open(&opts.state_dir.join("cache"), opts.cache.ttl)
        .map(|c| Arc::new(c) as Arc<dyn Cache>)
}

#[cfg(not(feature = "embedded-cache"))]
fn open_embedded(opts: &BuildOptions) -> Result<Arc<dyn Cache>, crate::cache::CacheError> {
    Err(crate::cache::CacheError::Unavailable {
        location: opts.state_dir.join("cache").display().to_string(),
        message: "this executor was built without the embedded cache".into(),
    })
}

/// RFC 3339 in UTC for a Unix time (the image config's `created`).
pub fn rfc3339(secs: u64) -> String {
    let days = secs / 86_400;
    let rem = secs % 86_400;
    let (h, m, s) = (rem / 3600, (rem % 3600) / 60, rem % 60);
    // Civil-from-days (Howard Hinnant's algorithm), valid for all u64 days
    // this program will see.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if mo <= 2 { y + 1 } else { y };
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}Z")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_737_600), "2026-11-27T00:00:00Z");
    }

    #[test]
    fn run_argv_uses_the_shell_and_heredocs() {
        let run = dockerfile::Run {
            mounts: vec![],
            raw_mounts: vec![],
            network: None,
            security: None,
            command: Command::Shell("<<EOF".into()),
            heredocs: vec![],
        };
        let h = dockerfile::Heredoc {
            name: "EOF".into(),
            content: "echo hi\n".into(),
            expand: true,
            chomp: false,
            fd: None,
        };
        assert_eq!(
            run_argv(&run, &[], std::slice::from_ref(&h)),
            ["/bin/sh", "-c", "echo hi\n"]
        );
        let run2 = dockerfile::Run {
            command: Command::Shell("cat <<EOF > /x".into()),
            ..run.clone()
        };
        assert_eq!(
            run_argv(&run2, &[], &[h])[2],
            "cat <<EOF > /x\necho hi\nEOF\n"
        );
        let exec = dockerfile::Run {
            command: Command::Exec(vec!["/bin/true".into()]),
            ..run
        };
        assert_eq!(run_argv(&exec, &[], &[]), ["/bin/true"]);
    }
}
