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

mod bases;
mod cached_bases;
mod error;
mod fetch;
pub mod from_cli;
mod inputs;
pub mod keys;
mod lookup;
mod mountable;
mod output;
mod parallel;
mod run_mounts;
mod sources;
mod stages;
mod uploads;

use std::collections::{BTreeMap, HashMap};
use std::fs;
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
use crate::build::runner::none::NoneRunner;
use crate::build::runner::security::StepSecurity;
use crate::build::runner::{MountSpec, NetworkMode, OutputSink, RunSpec, Runner};
use crate::build::snapshot::overlay::OverlaySnapshotter;
use crate::build::snapshot::walk::WalkSnapshotter;
use crate::build::snapshot::{LowerLayout, Snapshotter};
use crate::build::unpack::{UnpackMode, UnpackOptions, unpack_layer};
use crate::build::user::resolve_user;
use crate::dockerfile::{self, Command, Instruction};
use crate::oci::layout::{OciLayout, parse_layout_reference};
use crate::oci::{BlobSource, Descriptor, ImageDocuments, Platform};
use crate::plan::{Plan, PlanOptions, PlannedInstruction, Stage, StageSource};
use crate::registry::{ImageRef, RegistryClient, RegistryOptions};
use crate::sources::context::{BuildContext, Visibility};
use crate::sources::dockerignore::DockerIgnore;
use crate::store::LocalStore;

use crate::build::copy::{self, CopyItem, CopyOptions, CopyRoot, copy_into, walk_root};
use crate::sources::remote;
pub use error::{BaseError, BuildError, StepError, StepOutcome};
use uploads::{UploadDone, Uploader};

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
    /// Where the context comes from (`--context` and friends). When set,
    /// the build materializes it in its scratch space first and points
    /// `plan` at it; `None`: `plan.context` is a directory used as is.
    pub context_source: Option<crate::sources::context_source::ContextSpec>,
    pub destinations: Vec<String>,
    pub no_push: bool,
    /// Check, before anything is built, that every destination accepts a
    /// push (Kaniko's check; off with `--skip-push-permission-check`).
    pub check_push_permission: bool,
    pub oci_layout_path: Option<PathBuf>,
    pub tar_path: Option<PathBuf>,
    pub digest_file: Option<PathBuf>,
    pub image_name_with_digest_file: Option<PathBuf>,
    /// `--image-name-tag-with-digest-file`: `<repo>:<tag>@<digest>` lines.
    pub image_name_tag_with_digest_file: Option<PathBuf>,
    /// `--single-snapshot`: one layer per stage, after its last filesystem
    /// step.
    pub single_snapshot: bool,
    /// `--force-build-metadata`: every instruction gets a layer (an empty
    /// one where nothing changed).
    pub force_build_metadata: bool,
    /// `--cleanup`: remove unpacked layers and scratch space at the end
    /// (and, in place, what the build put on `/`).
    pub cleanup: bool,
    /// `--image-fs-extract-retry`: how many more times a base layer that
    /// fails to extract is fetched and extracted again.
    pub image_fs_extract_retry: u32,
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
    /// What every RUN step may do under chroot isolation (`--cap-add`,
    /// `--cap-drop`, `--security-opt seccomp=unconfined`).
    pub run_security: StepSecurity,
    /// `--allow security.insecure`: `RUN --security=insecure` may run
    /// privileged.
    pub allow_insecure: bool,
    /// Left out of every layer, whichever the snapshotter (`--ignore-path`,
    /// `/var/run` unless `--ignore-var-run=false`).
    pub ignore_paths: Vec<PathBuf>,
    /// Every line the build prints: step headers and results, RUN output,
    /// progress, warnings (stderr in the binary).
    pub log: crate::log::Logger,
    /// Said once before anything is built: why RUN steps run in place
    /// although chroot isolation was the default (see
    /// [`from_cli::choose_isolation`]).
    pub isolation_notice: Option<String>,
    pub cache: CacheOptions,
    /// `--report FILE`: the JSON build report.
    pub report: Option<PathBuf>,
    /// `--secret id=..,src=..|env=..`: what `RUN --mount=type=secret` reads.
    pub secrets: Vec<Secret>,
    /// `--max-layer-size`: how large one layer may expand when unpacked
    /// (see [`crate::build::unpack::UnpackOptions::max_expanded_size`]).
    pub max_layer_size: u64,
    /// `--jobs`: how many independent stages may build at once; 1 builds
    /// them one after another in plan order (in-place builds always do).
    pub jobs: usize,
    /// `--mountable-layers`: under chroot isolation with the overlay
    /// snapshotter, mount base and cached layers as EROFS images instead of
    /// unpacking them (docs/architecture.md, "Mountable layers").
    pub mountable_layers: bool,
    /// `--rehash-layer-images`: hash a stored layer image before every
    /// mount instead of trusting its stamp (`erofs::ImageCache`).
    pub rehash_layer_images: bool,
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
    /// `--cache-repo`: the registry-backed cache, used when no server is
    /// given.
    pub repo: Option<ImageRef>,
}

impl Default for CacheOptions {
    fn default() -> Self {
        Self {
            enabled: true,
            mode: CacheMode::ReadWrite,
            servers: Vec::new(),
            token: None,
            ttl: None,
            repo: None,
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
    pub cache: StepOutcome,
    pub layer: Option<Digest>,
    pub layer_size: Option<u64>,
    pub duration_ms: u64,
    /// Time in the runner (RUN) or copying (COPY/ADD), for steps that ran.
    pub run_ms: Option<u64>,
    /// Time to diff the rootfs and write the compressed layer.
    pub snapshot_ms: Option<u64>,
}

/// Phase timings of a filesystem step, measured where they happen.
#[derive(Debug, Clone, Copy, Default)]
struct PhaseTimes {
    run_ms: Option<u64>,
    snapshot_ms: Option<u64>,
}

/// What applying one instruction gave: the report's outcome, the layer it
/// added (if any) and how long its phases took.
#[derive(Debug, Clone)]
struct Applied {
    outcome: StepOutcome,
    layer: Option<LayerRef>,
    times: PhaseTimes,
}

impl Applied {
    fn metadata() -> Self {
        Applied {
            outcome: StepOutcome::None,
            layer: None,
            times: PhaseTimes::default(),
        }
    }
}

/// A layer of an image being built: its descriptor, its diff_id and where
/// its compressed bytes are.
#[derive(Debug, Clone)]
struct LayerRef {
    desc: Descriptor,
    diff_id: Digest,
    blob: PathBuf,
    /// The key of the cache hit that supplied this layer (its bytes are
    /// fetched lazily, and may turn out not to be deliverable).
    hit: Option<CacheKey>,
}

/// A filesystem step that ran in this build, replayed as it was when the
/// build restarts after a lost cache hit.
#[derive(Debug, Clone)]
struct RanStep {
    layer: Option<LayerRef>,
    record: StepRecord,
}

/// A cache hit whose layer could not be fetched intact or unpacked.
#[derive(Debug, Clone)]
struct LostHit {
    key: CacheKey,
    digest: Digest,
    reason: String,
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
        .map_err(|e| BuildError::setup("starting the async runtime", e))?;
    let mut driver = Driver::new(opts, runtime)?;
    let result = driver.run();
    if let Err(e) = &result {
        // The report of a failed build names the failing step and the
        // error; it is written after the uploads of the steps that did
        // succeed, so their numbers are in it.
        driver.uploader.wait();
        if let Err(report_error) = driver.failure_report(e) {
            driver.warn(&format!("writing the report: {report_error}"));
        }
    }
    // A failed build may leave uploads running (a base layer pulled just
    // before the next one turned out truncated). They hold the cache — for
    // the embedded one a RocksDB handle — and a process that exits under
    // them tears down RocksDB's statics while they still use them (`pthread
    // lock: Invalid argument`, SIGABRT). So they finish first (they record
    // steps that did succeed), and the cache is closed before we return.
    driver.uploader.wait();
    driver.finish_cache();
    driver.cleanup();
    drop(driver);
    result
}

struct Driver {
    opts: BuildOptions,
    /// What every stage uses and none owns: shared with stage workers.
    services: Services,
    /// What the resolve, keys and lookup phases found.
    resolved: Resolved,
    /// What this driver did, for the report (a worker's is merged back).
    record: Record,
    /// This driver's uploads to the cache, in the background.
    uploader: Uploader,
    /// This build's scratch space, removed at the end.
    work: PathBuf,
    context: Option<Arc<BuildContext>>,
    /// The materialized `--context` (removed when the driver drops).
    #[allow(dead_code)]
    context_dir: Option<crate::sources::context_source::Materialized>,
    stages: BTreeMap<usize, StageState>,
    scratch_counter: usize,
    /// Set where a hit's layer failed; the build loop restarts on it.
    lost_pending: Option<LostHit>,
    /// Filesystem steps that ran, by key, for a restart to replay.
    ran: HashMap<CacheKey, RanStep>,
    /// `--single-snapshot`: the writable rootfs the stage's filesystem
    /// steps share until the last of them is snapshotted.
    open_snapshot: Option<OpenSnapshot>,
    /// Set by the stage loop: the current filesystem step is not the
    /// stage's last, so under `--single-snapshot` it leaves the rootfs open.
    defer_snapshot: bool,
    /// Layer images mounted by this build (see `mountable`).
    mounts: mountable::LayerMounts,
}

/// The build's services: cheap to clone (handles and paths), the same for
/// every stage worker. None of them holds state of one stage.
#[derive(Clone)]
struct Services {
    runtime: Arc<tokio::runtime::Runtime>,
    client: Arc<RegistryClient>,
    store: LocalStore,
    snapshotter: Arc<dyn Snapshotter>,
    runner: Arc<dyn Runner>,
    cache: Option<Arc<dyn Cache>>,
    /// Unpacked layers by diff_id (overlay lowers), shared across builds.
    layers_dir: PathBuf,
    /// Blobs that belong to the image but live outside the store (layouts).
    extra_blobs: Arc<Mutex<HashMap<Digest, PathBuf>>>,
    platform: Platform,
    /// `--max-layer-size` as the unpacker applies it.
    unpack_limit: u64,
    /// Set when a stage fails while others build: they stop before their
    /// next step.
    cancel: Arc<std::sync::atomic::AtomicBool>,
}

/// What the phases before execute produced: bases, remote sources, keys
/// and the lookup's hits. Stage workers get a copy; executing only ever
/// narrows it (a hit whose layer the cache could not deliver is lost).
#[derive(Clone, Default)]
struct Resolved {
    dockerfile_name: String,
    bases: HashMap<String, BaseImage>,
    /// Base-image layers by digest, with the image they come from, so they
    /// can be fetched lazily from the cache or the registry.
    base_layers: HashMap<Digest, (crate::registry::client::PulledImage, LayerRef)>,
    /// Remote ADD sources, fetched once per build.
    remote: HashMap<String, remote::RemoteSource>,
    /// Keys by (stage, instruction index), and each stage's last.
    keys: inputs::BuildKeys,
    hits: BTreeMap<CacheKey, CacheEntry>,
    /// Hits whose layer the cache could not deliver: built instead, and
    /// never uploaded (the cache keeps its own entry for the key).
    lost_hits: std::collections::BTreeSet<CacheKey>,
}

/// What a driver did, as the report tells it: steps, uploads, downloads,
/// where it is and where it failed.
struct Record {
    steps: Vec<StepRecord>,
    lookup_ms: u64,
    bytes_downloaded: u64,
    started: Instant,
    /// The step being applied, for the report of a build that fails in it.
    current_step: Option<FailedStep>,
    /// What the build is doing (`"building"`, `"pushing"`, ...), for the
    /// report of a build that fails outside a step.
    phase: &'static str,
}

impl Record {
    fn new(started: Instant, phase: &'static str) -> Self {
        Record {
            steps: Vec::new(),
            lookup_ms: 0,
            bytes_downloaded: 0,
            started,
            current_step: None,
            phase,
        }
    }
}

/// A prepared rootfs kept open across steps (`--single-snapshot`).
struct OpenSnapshot {
    mounted: crate::build::snapshot::Mounted,
    lowers: Vec<PathBuf>,
    scratch: PathBuf,
}

/// Where a failed build stopped, as the report names it.
#[derive(Debug, Clone, serde::Serialize)]
struct FailedStep {
    stage: usize,
    line: usize,
    instruction: String,
}

impl Driver {
    fn new(mut opts: BuildOptions, runtime: tokio::runtime::Runtime) -> Result<Self, BuildError> {
        if opts.isolation == Isolation::None
            && !opts.force
            && let Some(reason) = refuse_in_place()
        {
            return Err(BuildError::Refused(reason));
        }
        // Everything below these holds image content: unpacked layers keep
        // their setuid-root binaries and device nodes, scratch space holds
        // a step's rootfs. Owner-only at the top, so no other local user
        // can reach into them (also when an older kiln made them 0755).
        for (sub, what) in [
            ("store", "the local store"),
            ("layers", "the layer directory"),
            ("work", "scratch space"),
            ("run-cache", "the RUN cache-mount directory"),
            ("cache", "the embedded cache"),
            ("images", "the layer image cache"),
        ] {
            private_dir(&opts.state_dir.join(sub))
                .map_err(|e| BuildError::setup(format!("creating {what}"), e))?;
        }
        let store = LocalStore::new(opts.state_dir.join("store"))
            .map_err(|e| BuildError::setup("opening the local store", e))?
            .with_progress(crate::log::bytes_received());
        let layers_dir = opts.state_dir.join("layers");
        let work = opts.state_dir.join("work").join(format!(
            "build-{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        fs::create_dir_all(&work).map_err(|e| {
            BuildError::setup(format!("creating scratch space {}", work.display()), e)
        })?;
        // A fetched context lives in the scratch space, so it goes with it
        // at the end of the build, failed or not.
        let context_dir = match opts.context_source.clone() {
            Some(spec) => Some(
                spec.prepare(&mut opts.plan, &work, opts.max_layer_size)
                    .map_err(|e| {
                        let _ = fs::remove_dir_all(&work);
                        BuildError::setup("preparing the build context", e)
                    })?,
            ),
            None => None,
        };
        let client = RegistryClient::new(opts.registry.clone())
            .map_err(|e| BuildError::setup("setting up the registry client", e))?;
        let kind = opts.snapshotter.unwrap_or(match opts.isolation {
            Isolation::None => SnapshotterKind::Walk,
            Isolation::Chroot => SnapshotterKind::Overlay,
        });
        let snapshotter: Arc<dyn Snapshotter> = match kind {
            SnapshotterKind::Overlay => Arc::new(OverlaySnapshotter::new()),
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
                    // kiln's image links Kaniko's /kaniko to /kiln; a
                    // Kaniko-style job may also mount things there.
                    let kaniko = Path::new("/kaniko");
                    if kaniko.symlink_metadata().is_ok() {
                        ignored.push(kaniko.to_path_buf());
                    }
                }
                Arc::new(WalkSnapshotter::new(ignored).ignoring_mount_points())
            }
        };
        let runner: Arc<dyn Runner> = match opts.isolation {
            Isolation::Chroot => Arc::new(ChrootRunner::new()),
            Isolation::None => Arc::new(NoneRunner::new(opts.force)),
        };
        let dockerfile_name = opts.plan.dockerfile_path().display().to_string();
        if let Some(notice) = &opts.isolation_notice {
            opts.log.log(
                crate::log::Level::Warn,
                notice,
                &[
                    ("event", "isolation_fallback".into()),
                    ("isolation", "none".into()),
                ],
            );
        }
        let mut mounts = mountable::LayerMounts::default();
        if opts.mountable_layers
            && opts.isolation == Isolation::Chroot
            && kind == SnapshotterKind::Overlay
        {
            match crate::erofs::ImageCache::new(&opts.state_dir) {
                Ok(images) if opts.rehash_layer_images => {
                    mounts.images = Some(images.hash_every_mount())
                }
                Ok(images) => mounts.images = Some(images),
                Err(e) => tracing::warn!("layer images off: {e}"),
            }
        }
        let cache = open_cache(&opts, runtime.handle().clone(), &opts.log);
        let cache_for_uploads = cache.clone();
        Ok(Driver {
            services: Services {
                runtime: Arc::new(runtime),
                client: Arc::new(client),
                store,
                snapshotter,
                runner,
                cache,
                layers_dir,
                extra_blobs: Arc::new(Mutex::new(HashMap::new())),
                platform: Platform::host(),
                unpack_limit: opts.max_layer_size,
                cancel: Default::default(),
            },
            resolved: Resolved {
                dockerfile_name,
                ..Resolved::default()
            },
            record: Record::new(Instant::now(), "planning"),
            uploader: Uploader::new(
                cache_for_uploads,
                opts.cache.mode.writes(),
                opts.log.clone(),
            ),
            opts,
            work,
            context: None,
            context_dir,
            stages: BTreeMap::new(),
            scratch_counter: 0,
            lost_pending: None,
            ran: HashMap::new(),
            open_snapshot: None,
            defer_snapshot: false,
            mounts,
        })
    }

    fn cleanup(&mut self) {
        if let Some(open) = self.open_snapshot.take() {
            let _ = self.services.snapshotter.release(open.mounted);
        }
        // Unpacked layers and blobs stay (they are the local cache); the
        // scratch space of this build goes, after the layer images mounted
        // in it.
        for dir in self.mounts.extra.drain(..) {
            if let Err(e) = crate::erofs::mount::unmount(&dir) {
                tracing::warn!("unmounting layer image at {}: {e}", dir.display());
            }
        }
        self.unmount_layers();
        let _ = fs::remove_dir_all(&self.work);
        if self.opts.cleanup {
            self.clean_up_everything();
        }
    }

    /// `--cleanup`, Kaniko's "clean the filesystem at the end", so the next
    /// build in the same container starts from nothing: the unpacked
    /// layers go. Blobs and the embedded cache stay: they are
    /// content-addressed and cannot make a later build differ. In place
    /// (`--isolation none`) the files the build put on `/` stay (not done
    /// yet; docs/kaniko-migration.md).
    fn clean_up_everything(&mut self) {
        match fs::remove_dir_all(&self.services.layers_dir) {
            Ok(()) => self.log(&format!(
                "cleanup: removed the unpacked layers in {}",
                self.services.layers_dir.display()
            )),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => self.warn(&format!(
                "--cleanup: removing {}: {e}",
                self.services.layers_dir.display()
            )),
        }
    }

    fn log(&self, line: &str) {
        self.opts.log.info(line);
    }

    fn warn(&self, line: &str) {
        self.opts.log.warn(line);
    }

    /// Kaniko's `CheckPushPermissions`: one check per destination
    /// repository, before the build, so bad credentials fail in seconds.
    fn check_push_permissions(&self) -> Result<(), BuildError> {
        if !self.opts.check_push_permission {
            return Ok(());
        }
        let mut checked = std::collections::HashSet::new();
        for d in &self.opts.destinations {
            let r = ImageRef::parse(d)
                .map_err(|e| BuildError::output(format!("destination {d}"), e))?;
            if !checked.insert((r.registry().to_string(), r.repository().to_string())) {
                continue;
            }
            self.services
                .runtime
                .block_on(self.services.client.check_push_permission(&r))
                .map_err(|source| BuildError::PushPermission {
                    destination: d.clone(),
                    source,
                })?;
        }
        Ok(())
    }

    fn run(&mut self) -> Result<BuildOutcome, BuildError> {
        self.check_push_permissions()?;
        let first = crate::plan::plan(&self.opts.plan)?;
        self.services.platform = first.target_platform.clone();
        self.record.phase = "resolving base images";
        for &index in &first.stages_to_build {
            if let StageSource::Image(name) = &first.stages[index].source {
                self.resolve_base(name)?;
            }
        }
        // Plan again, now that the bases' environments are known: they take
        // part in variable expansion (e.g. `ENV PATH=$PATH:/x`).
        let mut plan_opts = self.opts.plan.clone();
        for (name, base) in &self.resolved.bases {
            plan_opts
                .base_env
                .insert(name.clone(), env_map(&base.config));
        }
        let mut plan = crate::plan::plan(&plan_opts)?;
        self.splice_onbuild_triggers(&mut plan, &plan_opts)?;
        for warning in &plan.warnings {
            self.warn(warning);
        }
        self.record.phase = "resolving step inputs";
        let inputs = self.resolve_inputs(&plan)?;
        self.resolved.keys = inputs::compute_keys(
            &plan,
            &self.resolved.dockerfile_name,
            &self.resolved.bases,
            &inputs,
            &self.key_options(),
        )?;
        self.record.phase = "looking up the cache";
        self.lookup_keys();
        self.record.phase = "building";
        // A hit's layer is fetched only when something needs it, so a cache
        // that cannot deliver it is found out late, possibly after later
        // steps used the hit's descriptor. Then the build starts over with
        // that hit turned into a miss; steps that already ran are replayed
        // from their results, so only what depended on the lost layer runs.
        let mut outcome = loop {
            match self.build_stages_and_finish(&plan) {
                Ok(outcome) => break outcome,
                Err(e) => {
                    let Some(lost) = self.lost_pending.take() else {
                        return Err(e);
                    };
                    if self.resolved.hits.remove(&lost.key).is_none() {
                        return Err(e);
                    }
                    self.resolved.lost_hits.insert(lost.key);
                    let step = plan_step_of(&plan, &self.resolved.keys.steps, &lost.key);
                    self.warn(&format!(
                        "the cache could not deliver layer {} of {step}: {}; building the step instead",
                        lost.digest, lost.reason
                    ));
                    self.stages.clear();
                    self.record.steps.clear();
                    self.record.phase = "building";
                }
            }
        };
        // Uploads ran in the background; the report has their numbers.
        self.record.steps = std::mem::take(&mut outcome.steps);
        let uploaded = self.uploader.wait();
        outcome.steps = std::mem::take(&mut self.record.steps);
        self.report(&outcome, uploaded)?;
        Ok(outcome)
    }

    fn build_stages_and_finish(&mut self, plan: &Plan) -> Result<BuildOutcome, BuildError> {
        self.build_stages(plan)?;
        let target = self
            .stages
            .get(&plan.target)
            .cloned()
            .ok_or_else(|| BuildError::Internal("the target stage was not built".into()))?;
        self.finish(plan, target)
    }

    /// The summary on the log and, with `--report`, the JSON report.
    fn report(&self, outcome: &BuildOutcome, uploaded: u64) -> Result<(), BuildError> {
        let count = |c| outcome.steps.iter().filter(|s| s.cache == c).count();
        let (hits, misses) = (count(StepOutcome::Hit), count(StepOutcome::Miss));
        let elapsed = self.record.started.elapsed();
        self.opts.log.log(
            crate::log::Level::Info,
            &format!(
                "built {} in {:.2}s: {} steps, {hits} cached, {misses} run; {uploaded} bytes uploaded, {} bytes downloaded from the cache",
                outcome.manifest_digest,
                elapsed.as_secs_f64(),
                outcome.steps.len(),
                self.record.bytes_downloaded
            ),
            &[
                ("event", "build_end".into()),
                ("digest", outcome.manifest_digest.to_string().into()),
                ("duration_ms", (elapsed.as_millis() as u64).into()),
                ("steps", outcome.steps.len().into()),
                ("hits", hits.into()),
                ("misses", misses.into()),
                ("bytes_uploaded", uploaded.into()),
                ("bytes_downloaded", self.record.bytes_downloaded.into()),
            ],
        );
        self.write_report(
            &outcome.steps,
            serde_json::json!({"digest": outcome.manifest_digest}),
            uploaded,
            None,
        )
    }

    /// The report of a build that failed: the steps done so far, the step
    /// it failed in (or what it was doing: pushing, writing the image, ...)
    /// and the error with its causes.
    fn failure_report(&self, error: &BuildError) -> Result<(), BuildError> {
        let uploaded = self
            .step_uploads(&self.record.steps)
            .iter()
            .flatten()
            .map(|u| u.bytes)
            .sum();
        let step = match error {
            // Output errors happen after the last step finished.
            BuildError::Output { .. } => None,
            _ => self.record.current_step.clone(),
        };
        let failure = serde_json::json!({
            "phase": if step.is_some() { "building" } else { self.record.phase },
            "step": step,
            "message": kiln_common::error_report(error),
            "exit_code": error.exit_code(),
        });
        self.write_report(
            &self.record.steps,
            serde_json::Value::Null,
            uploaded,
            Some(failure),
        )
    }

    /// The finished upload of each step, if it had one: the first step
    /// with an upload's key gets it.
    fn step_uploads(&self, steps: &[StepRecord]) -> Vec<Option<UploadDone>> {
        let mut unclaimed: Vec<&UploadDone> = self.uploader.done().iter().collect();
        steps
            .iter()
            .map(|s| {
                let key = s.key?;
                let at = unclaimed.iter().position(|u| u.key == key)?;
                Some(*unclaimed.remove(at))
            })
            .collect()
    }

    fn write_report(
        &self,
        steps: &[StepRecord],
        image: serde_json::Value,
        uploaded: u64,
        error: Option<serde_json::Value>,
    ) -> Result<(), BuildError> {
        let Some(path) = &self.opts.report else {
            return Ok(());
        };
        let count = |c| steps.iter().filter(|s| s.cache == c).count();
        let uploads = self.step_uploads(steps);
        let mut report = serde_json::json!({
            "steps": steps.iter().zip(&uploads).map(|(s, u)| serde_json::json!({
                "stage": s.stage,
                "line": s.line,
                "instruction": s.instruction,
                "key": s.key,
                "inputs": s.inputs,
                "cache": s.cache,
                "layer": s.layer,
                "durations_ms": {
                    "total": s.duration_ms,
                    "run": s.run_ms,
                    "snapshot": s.snapshot_ms,
                    "upload": u.map(|u| u.millis),
                },
                "bytes": {"layer": s.layer_size, "uploaded": u.map(|u| u.bytes)},
            })).collect::<Vec<_>>(),
            "image": image,
            "summary": {
                "steps": steps.len(),
                "hits": count(StepOutcome::Hit),
                "misses": count(StepOutcome::Miss),
                "duration_ms": self.record.started.elapsed().as_millis() as u64,
                "lookup_ms": self.record.lookup_ms,
                "bytes_uploaded": uploaded,
                "bytes_downloaded": self.record.bytes_downloaded,
                "cache": self.services.cache.as_ref().map(|c| c.location()),
                "success": error.is_none(),
            },
        });
        if let Some(error) = error {
            report["error"] = error;
        }
        let text = serde_json::to_vec_pretty(&report)
            .map_err(|e| BuildError::output(format!("report {}", path.display()), e))?;
        fs::write(path, text)
            .map_err(|e| BuildError::output(format!("report {}", path.display()), e))
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
    match crate::build::runner::probe::in_container() {
        Some(_) => None,
        None => Some(
            "--isolation none unpacks images over this machine's own root filesystem; \
             it only runs inside a container (or pass --force)"
                .into(),
        ),
    }
}

fn config_from_bytes(bytes: &[u8]) -> Result<image_config::ImageConfig, BaseError> {
    image_config::ImageConfig::from_json(bytes).map_err(BaseError::Config)
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
    for (k, v) in ins.args.iter() {
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
) -> Result<CopyOptions, StepError> {
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
                .ok_or_else(|| {
                    StepError::invalid(format!("--chmod={m}: expected an octal mode such as 0755"))
                })?,
        ),
    };
    Ok(CopyOptions {
        owner,
        keep_owner: false,
        chmod,
    })
}

/// `--chown=user[:group]`: names from the image's passwd/group; a user
/// without a group uses the same number as its gid, as Docker does.
fn resolve_owner(rootfs: &Path, spec: &str) -> Result<(u32, u32), StepError> {
    let resolved = resolve_user(rootfs, spec).map_err(|source| StepError::User {
        what: format!("--chown={spec}"),
        source,
    })?;
    if spec.contains(':') {
        Ok((resolved.uid, resolved.gid))
    } else {
        Ok((resolved.uid, resolved.uid))
    }
}

/// The owner of the directories WORKDIR creates: the current USER, with
/// BuildKit's rules. A name takes uid and gid from the image's passwd; a
/// bare number is used as both (passwd is not consulted, so `USER 9999`
/// gives 9999:9999); a `:group` (name or number) replaces the gid.
fn workdir_owner(rootfs: &Path, user: &str) -> Result<(u32, u32), StepError> {
    if user.is_empty() {
        return Ok((0, 0));
    }
    let resolved = resolve_user(rootfs, user).map_err(|source| StepError::User {
        what: format!("USER {user}"),
        source,
    })?;
    let name = user.split_once(':').map_or(user, |(u, _)| u);
    if user.contains(':') || name.parse::<u32>().is_err() {
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
    unpack: &UnpackOptions,
) -> Result<(), StepError> {
    let mut plain = as_is;
    for root in roots {
        let host = &root.entries[0].host;
        if !root.is_dir && is_tar_archive(host) {
            let dir = copy::absolute_in_image(workdir, dest);
            let host_dir = copy::ensure_dir(rootfs, &dir, opts.owner.unwrap_or((0, 0)), 0o755)
                .map_err(|e| StepError::io(format!("creating {}", dir.display()), e))?;
            let file =
                fs::File::open(host).map_err(|e| StepError::io(host.display().to_string(), e))?;
            unpack_layer(file, &host_dir, unpack, None).map_err(|source| StepError::Unpack {
                what: format!("extracting {}", root.name),
                source,
            })?;
        } else {
            plain.push(root);
        }
    }
    if plain.is_empty() {
        return Ok(());
    }
    Ok(copy_into(rootfs, workdir, dest, &plain, opts)?)
}

fn is_tar_archive(path: &Path) -> bool {
    use std::io::Read;
    let Ok(file) = fs::File::open(path) else {
        return false;
    };
    let Ok(mut reader) = crate::build::unpack::decompress(std::io::BufReader::new(file)) else {
        return false;
    };
    let mut header = [0u8; 512];
    if reader.read_exact(&mut header).is_err() {
        return false;
    }
    &header[257..262] == b"ustar"
}

/// A `COPY --from` source found in a rootfs: the host path to read (the
/// source dereferenced inside the rootfs, as BuildKit follows a source
/// symlink) and the name it is copied under (the last component as written
/// or matched, never the symlink target's).
#[derive(Debug, Clone, PartialEq, Eq)]
struct RootMatch {
    host: PathBuf,
    name: String,
}

/// Paths in a rootfs matching `pattern` (Go `filepath.Match` per component),
/// every component resolved inside the rootfs, so a symlink in the image
/// (absolute or climbing with `..`) never reaches a host path.
fn glob_in_root(rootfs: &Path, pattern: &str) -> Result<Vec<RootMatch>, StepError> {
    use crate::build::fsutil::resolve_in_root;
    let clean = copy::absolute_in_image(Path::new("/"), pattern);
    let resolve = |image_path: &Path| {
        resolve_in_root(rootfs, image_path)
            .map_err(|e| StepError::io(format!("resolving {}", image_path.display()), e))
    };
    // Image paths (as named, not resolved) matched so far.
    let mut current = vec![PathBuf::from("/")];
    for component in clean.components().skip(1) {
        let part = component.as_os_str().to_string_lossy().into_owned();
        let mut next = Vec::new();
        for dir in &current {
            if part.contains(['*', '?', '[']) {
                let Ok(read) = fs::read_dir(resolve(dir)?) else {
                    continue;
                };
                let mut names: Vec<String> = read
                    .filter_map(|e| e.ok())
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect();
                names.sort();
                for name in names {
                    if crate::sources::context::source_matches(&part, &name)
                        .map_err(|e| StepError::invalid(format!("bad pattern {pattern}: {e}")))?
                    {
                        next.push(dir.join(name));
                    }
                }
            } else {
                let path = dir.join(&part);
                if fs::symlink_metadata(resolve(&path)?).is_ok() {
                    next.push(path);
                }
            }
        }
        current = next;
    }
    let mut matches = Vec::with_capacity(current.len());
    for path in current {
        let host = resolve(&path)?;
        // A dangling symlink resolves to a path that does not exist.
        if fs::symlink_metadata(&host).is_err() {
            continue;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        matches.push(RootMatch { host, name });
    }
    Ok(matches)
}

/// `<file> line N (INSTRUCTION)` of the step whose key is `key`, for messages.
fn plan_step_of(plan: &Plan, keys: &HashMap<(usize, usize), StepKey>, key: &CacheKey) -> String {
    keys.iter()
        .find(|(_, k)| k.key == *key)
        .and_then(|((stage, position), _)| plan.stages.get(*stage)?.instructions.get(*position))
        .map(|ins| format!("line {} ({})", ins.line, ins.original))
        .unwrap_or_else(|| format!("cached step {key}"))
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
    log: &crate::log::Logger,
) -> Option<Arc<dyn Cache>> {
    if !opts.cache.enabled {
        return None;
    }
    let opened: Result<Arc<dyn Cache>, crate::cache::CacheError> =
        if let (true, Some(repo)) = (opts.cache.servers.is_empty(), &opts.cache.repo) {
            crate::cache::registry::RegistryCache::new(repo, opts.registry.clone(), runtime)
                .map(|c| Arc::new(c) as Arc<dyn Cache>)
        } else if opts.cache.servers.is_empty() {
            open_embedded(opts)
        } else {
            if let Some(repo) = &opts.cache.repo {
                log.warn(&format!(
                    "--cache-repo {} is not used: --cache-server is given and wins",
                    repo.name()
                ));
            }
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
            log.warn(&format!("building without a cache: {e}"));
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

/// Creates `dir` (and its parents) if needed and makes it mode 0700.
fn private_dir(dir: &Path) -> Result<(), StepError> {
    use std::os::unix::fs::PermissionsExt;
    fs::create_dir_all(dir).map_err(|e| StepError::io(dir.display().to_string(), e))?;
    fs::set_permissions(dir, fs::Permissions::from_mode(0o700))
        .map_err(|e| StepError::io(format!("making {} owner-only", dir.display()), e))
}

/// Seconds since the Unix epoch now (0 if the clock is before it).
fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// RFC 3339 in UTC for a Unix time (the image config's `created`), to the
/// second. A time past chrono's range (year 262143) is clamped to its end.
pub fn rfc3339(secs: u64) -> String {
    i64::try_from(secs)
        .ok()
        .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
        .unwrap_or(chrono::DateTime::<chrono::Utc>::MAX_UTC)
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_formats_known_instants() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_737_600), "2026-11-27T00:00:00Z");
        assert_eq!(rfc3339(253_402_300_799), "9999-12-31T23:59:59Z");
        // A SOURCE_DATE_EPOCH past any calendar still gives a timestamp.
        assert!(rfc3339(u64::MAX).ends_with('Z'));
    }

    #[test]
    fn stage_sources_are_dereferenced_in_the_rootfs_and_keep_their_names() {
        use std::os::unix::fs::symlink;
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let r = root.path();
        fs::create_dir_all(r.join("workdir")).unwrap();
        fs::create_dir_all(r.join("temp/sub")).unwrap();
        fs::write(r.join("temp/target"), "t").unwrap();
        fs::write(r.join("temp/sub/inner"), "i").unwrap();
        symlink("../temp/target", r.join("workdir/relative_link")).unwrap();
        // An absolute link means the rootfs's /temp, never the host's.
        symlink("/temp", r.join("workdir/abs")).unwrap();
        fs::write(outside.path().join("secret"), "host").unwrap();
        symlink(outside.path(), r.join("workdir/host")).unwrap();
        let names = |pattern: &str| {
            glob_in_root(r, pattern)
                .unwrap()
                .into_iter()
                .map(|m| (m.name, m.host))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names("/workdir/relative_link"),
            [("relative_link".to_string(), r.join("temp/target"))]
        );
        assert_eq!(
            names("/workdir/rel*"),
            [("relative_link".to_string(), r.join("temp/target"))]
        );
        assert_eq!(
            names("/workdir/abs/s*/inner"),
            [("inner".to_string(), r.join("temp/sub/inner"))]
        );
        // The host directory the link names does not exist in the rootfs.
        assert!(names("/workdir/host/*").is_empty());
        assert!(names("/workdir/host/secret").is_empty());
        assert!(names("/workdir/nothing*").is_empty());
    }

    #[test]
    fn a_failed_run_is_the_executor_exit_status() {
        use crate::build::runner::ExitStatus;
        let failed = |status| BuildError::Step {
            file: "Dockerfile".into(),
            line: 2,
            instruction: "RUN exit 42".into(),
            source: Box::new(StepError::CommandFailed {
                status,
                tail: String::new(),
            }),
        };
        assert_eq!(failed(ExitStatus::Code(42)).exit_code(), 42);
        assert_eq!(failed(ExitStatus::Signal(9)).exit_code(), 137);
        assert_eq!(failed(ExitStatus::Code(300)).exit_code(), 1);
        assert_eq!(BuildError::Refused("x".into()).exit_code(), 1);
    }

    #[test]
    fn workdir_owner_follows_buildkit_for_ids_names_and_groups() {
        let root = tempfile::tempdir().unwrap();
        fs::create_dir_all(root.path().join("etc")).unwrap();
        fs::write(
            root.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nalice:x:1001:1002::/home/alice:/bin/sh\n",
        )
        .unwrap();
        fs::write(
            root.path().join("etc/group"),
            "root:x:0:\nalice:x:1002:\nstaff:x:1003:alice\n",
        )
        .unwrap();
        let owner = |u: &str| workdir_owner(root.path(), u).ok();
        assert_eq!(owner(""), Some((0, 0)));
        assert_eq!(owner("9999"), Some((9999, 9999)));
        assert_eq!(owner("1001"), Some((1001, 1001)));
        assert_eq!(owner("9999:9998"), Some((9999, 9998)));
        assert_eq!(owner("alice"), Some((1001, 1002)));
        assert_eq!(owner("alice:staff"), Some((1001, 1003)));
        assert_eq!(owner("1001:staff"), Some((1001, 1003)));
        assert!(owner("bob").is_none());
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
