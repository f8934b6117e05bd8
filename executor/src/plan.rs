//! The build plan: a parsed Dockerfile with build arguments, ARG/ENV scoping
//! and variable expansion applied, stages resolved into a dependency graph,
//! and the stages a build of the target needs, in build order. It promises
//! Docker/BuildKit semantics (see docs/dockerfile.md for the decisions where
//! Docker is ambiguous) and reports every problem as an error naming the
//! Dockerfile, line and column. `--dry-run` prints a [`Plan`] as JSON; the
//! build engine walks the same [`Plan`].

use crate::dockerfile::{
    self, Command, Dockerfile, Error, ErrorKind, Heredoc, Instruction, Mount, PortSpec, Vars, shell,
};
use crate::oci::{Platform, PlatformError};
use serde::{Serialize, Serializer};
use serde_json::{Map, Value, json};
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// How many bytes a plan may build from variables: every expansion's
/// result, and every new copy of the variables in scope the plan keeps for
/// its instructions (a copy is shared until an ARG or ENV changes them).
/// Real Dockerfiles use a few KiB; chained ARG/ENV values reach it long
/// before memory runs out.
pub const EXPANSION_BUDGET: usize = 64 << 20;

/// Build arguments Docker passes to RUN without an ARG declaration, and
/// never warns about.
pub const PROXY_ARGS: [&str; 10] = [
    "HTTP_PROXY",
    "http_proxy",
    "HTTPS_PROXY",
    "https_proxy",
    "FTP_PROXY",
    "ftp_proxy",
    "NO_PROXY",
    "no_proxy",
    "ALL_PROXY",
    "all_proxy",
];

/// Why a plan could not be made.
#[derive(Debug, thiserror::Error)]
pub enum PlanError {
    #[error(transparent)]
    Dockerfile(#[from] Error),
    #[error("{}: target stage {name:?} could not be found", file.display())]
    TargetNotFound { file: PathBuf, name: String },
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Platform(#[from] PlatformError),
}

/// A platform in the dry-run JSON: the `os/arch[/variant]` text, not the
/// OCI object.
fn as_text<S: Serializer>(p: &Platform, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(p)
}

/// What the planner needs besides the Dockerfile.
#[derive(Debug, Clone, Default)]
pub struct PlanOptions {
    pub context: PathBuf,
    /// Defaults to `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
    /// `--build-arg` values in command-line order (a later one wins).
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    /// `--custom-platform`; the host platform otherwise.
    pub platform: Option<String>,
    /// The platform the build runs on; the host when absent (tests pin it).
    pub build_platform: Option<String>,
    /// The `Env` of base images' configs, by the expanded FROM reference.
    /// `--dry-run` pulls nothing and leaves this empty, so a base image's
    /// variables (PATH, ...) expand to nothing there; the build engine plans
    /// again with the configs it resolved.
    pub base_env: BTreeMap<String, Vars>,
}

impl PlanOptions {
    pub fn dockerfile_path(&self) -> PathBuf {
        self.dockerfile
            .clone()
            .unwrap_or_else(|| self.context.join("Dockerfile"))
    }
}

/// The whole plan. Serialised as the `--dry-run` JSON (docs/dockerfile.md).
#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    /// Index of the stage the build produces.
    pub target: usize,
    /// The stages the target needs, dependencies first.
    pub stages_to_build: Vec<usize>,
    pub stages: Vec<Stage>,
    /// Normalised (see [`Platform::normalized`]); printed `os/arch[/variant]`.
    #[serde(serialize_with = "as_text")]
    pub build_platform: Platform,
    #[serde(serialize_with = "as_text")]
    pub target_platform: Platform,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(skip)]
    pub dockerfile: PathBuf,
    #[serde(skip)]
    pub directives: dockerfile::Directives,
}

/// Where a stage starts from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StageSource {
    /// A registry image (or `scratch`).
    Image(String),
    /// An earlier stage of this Dockerfile.
    Stage(usize),
}

#[derive(Debug, Clone, Serialize)]
pub struct Stage {
    pub index: usize,
    pub name: Option<String>,
    /// The FROM argument after expansion.
    pub base: String,
    #[serde(skip)]
    pub source: StageSource,
    /// Set when `base` names an earlier stage.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub base_stage: Option<usize>,
    /// `FROM --platform` after expansion.
    pub platform: Option<String>,
    pub line: usize,
    /// Stages this one needs (FROM, COPY --from, RUN --mount from=).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<usize>,
    pub instructions: Vec<PlannedInstruction>,
    /// ENV values set by the Dockerfile at the end of the stage (the base
    /// image's own environment is not known at planning time).
    #[serde(skip)]
    pub env: Vars,
}

/// One instruction, typed and expanded, with the environment it sees.
#[derive(Debug, Clone, Serialize)]
pub struct PlannedInstruction {
    pub line: usize,
    #[serde(skip)]
    pub column: usize,
    pub kind: &'static str,
    pub original: String,
    /// Canonical text after expansion (flags in a fixed order).
    pub expanded: String,
    pub flags: Map<String, Value>,
    /// The typed arguments after expansion.
    pub value: Value,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heredocs: Vec<Heredoc>,
    /// Stages this instruction reads from (COPY --from, RUN --mount from=).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stage_refs: Vec<usize>,
    /// ENV values visible to the instruction (set by this Dockerfile);
    /// shared between instructions that see the same values.
    #[serde(skip_serializing_if = "no_vars", serialize_with = "serialize_vars")]
    pub env: Arc<Vars>,
    /// ARG values visible to the instruction; for RUN these become
    /// environment variables of the process (proxy args included).
    #[serde(skip_serializing_if = "no_vars", serialize_with = "serialize_vars")]
    pub args: Arc<Vars>,
    #[serde(skip)]
    pub instruction: Instruction,
}

fn no_vars(vars: &Arc<Vars>) -> bool {
    vars.is_empty()
}

fn serialize_vars<S: serde::Serializer>(vars: &Arc<Vars>, s: S) -> Result<S::Ok, S::Error> {
    vars.as_ref().serialize(s)
}

/// Bytes a map of variables holds.
fn vars_size(vars: &Vars) -> usize {
    vars.iter().map(|(k, v)| k.len() + v.len()).sum()
}

/// Reads the Dockerfile named by `opts` and plans the build.
pub fn plan(opts: &PlanOptions) -> Result<Plan, PlanError> {
    let path = opts.dockerfile_path();
    // Bytes, as BuildKit reads them (see `dockerfile::parse_bytes`), and
    // only from a regular file: a FIFO named Dockerfile must not block.
    let source = crate::context::read_regular_file(&path).map_err(|source| PlanError::Read {
        path: path.clone(),
        source,
    })?;
    let parsed = dockerfile::parse_bytes(&source, &path)?;
    Planner::new(&parsed, opts)?.run(opts)
}

/// Plans the build of Dockerfile text (`file` names it in errors).
pub fn plan_source(source: &str, file: &Path, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let parsed = dockerfile::parse(source, file)?;
    Planner::new(&parsed, opts)?.run(opts)
}

fn platform_args(prefix: &str, p: &Platform, into: &mut Vars) {
    into.insert(format!("{prefix}PLATFORM"), p.to_string());
    into.insert(format!("{prefix}OS"), p.os.clone());
    into.insert(format!("{prefix}ARCH"), p.architecture.clone());
    into.insert(
        format!("{prefix}VARIANT"),
        p.variant.clone().unwrap_or_default(),
    );
}

struct Planner<'a> {
    df: &'a Dockerfile,
    escape: char,
    build_args: BTreeMap<String, String>,
    build_platform: Platform,
    target_platform: Platform,
    /// Predefined platform args plus global ARG values: what a bare `ARG X`
    /// in a stage picks up.
    globals: Vars,
    consumed: BTreeSet<String>,
    base_env: BTreeMap<String, Vars>,
    /// Bytes of [`EXPANSION_BUDGET`] used so far.
    spent: Cell<usize>,
}

struct StageDraft {
    stage: Stage,
    args: Vars,
    /// What expansion sees: ARG and ENV values, the later one winning.
    vars: Vars,
    declared: BTreeSet<String>,
    /// The copies of `stage.env` and `args` the last instruction got,
    /// reused until an ARG or ENV changes them.
    snapshot: Option<(Arc<Vars>, Arc<Vars>)>,
}

impl<'a> Planner<'a> {
    fn new(df: &'a Dockerfile, opts: &PlanOptions) -> Result<Planner<'a>, PlanError> {
        // Normalised as BuildKit does, so `linux/arm64/v8` and
        // `linux/arm64` give the same TARGETPLATFORM/TARGETVARIANT.
        let build_platform = match &opts.build_platform {
            Some(p) => p.parse::<Platform>()?.normalized(),
            None => Platform::host(),
        };
        let target_platform = match &opts.platform {
            Some(p) => p.parse::<Platform>()?.normalized(),
            None => build_platform.clone(),
        };
        let mut globals = Vars::new();
        platform_args("BUILD", &build_platform, &mut globals);
        platform_args("TARGET", &target_platform, &mut globals);
        Ok(Planner {
            df,
            escape: df.directives.escape,
            build_args: opts.build_args.iter().cloned().collect(),
            build_platform,
            target_platform,
            globals,
            consumed: BTreeSet::new(),
            base_env: opts.base_env.clone(),
            spent: Cell::new(0),
        })
    }

    fn err(&self, line: usize, column: usize, kind: ErrorKind) -> Error {
        Error {
            file: self.df.file.clone(),
            line,
            column,
            kind,
        }
    }

    fn run(mut self, opts: &PlanOptions) -> Result<Plan, PlanError> {
        let instructions = &self.df.instructions;
        let first_from = instructions
            .iter()
            .position(|l| matches!(l.instruction, Instruction::From(_)));
        let Some(first_from) = first_from else {
            let (line, column) = instructions.first().map_or((1, 1), |l| (l.line, l.column));
            return Err(self.err(line, column, ErrorKind::NoFrom).into());
        };

        // Global scope: only ARG, visible to FROM lines.
        let mut meta = self.globals.clone();
        for located in &instructions[..first_from] {
            let Instruction::Arg(decls) = &located.instruction else {
                return Err(self
                    .err(
                        located.line,
                        located.column,
                        ErrorKind::BeforeFrom(located.instruction.keyword().into()),
                    )
                    .into());
            };
            for decl in decls {
                let name = self.expand(&decl.name, &meta, located.line, located.column)?;
                self.consumed.insert(name.clone());
                let value = match (self.build_args.get(&name), &decl.default) {
                    (Some(v), _) => Some(v.clone()),
                    (None, Some(d)) => Some(self.expand(d, &meta, located.line, located.column)?),
                    (None, None) => None,
                };
                // Without a value the name keeps what it had: a
                // predefined platform arg stays set (`ARG TARGETPLATFORM`
                // before FROM is the usual idiom).
                if let Some(v) = value {
                    meta.insert(name.clone(), v.clone());
                    self.globals.insert(name, v);
                }
            }
        }

        // Stage boundaries and names (names are known before any stage is
        // planned, so COPY --from may name a later stage).
        let mut bounds = Vec::new();
        let mut names: Vec<Option<String>> = Vec::new();
        for (i, located) in instructions.iter().enumerate().skip(first_from) {
            if let Instruction::From(from) = &located.instruction {
                if let Some(name) = &from.name
                    && names.iter().flatten().any(|n| n == name)
                {
                    return Err(self
                        .err(
                            located.line,
                            located.column,
                            ErrorKind::DuplicateStageName(name.clone()),
                        )
                        .into());
                }
                names.push(from.name.clone());
                bounds.push(i);
            }
        }
        bounds.push(instructions.len());

        let mut stages: Vec<StageDraft> = Vec::with_capacity(names.len());
        for index in 0..names.len() {
            let draft = self.plan_stage(
                index,
                &instructions[bounds[index]..bounds[index + 1]],
                &meta,
                &names,
                &stages,
            )?;
            stages.push(draft);
        }

        self.check_cycles(&stages)?;

        let target = match &opts.target {
            None => stages.len() - 1,
            Some(t) => {
                let lower = t.to_ascii_lowercase();
                names
                    .iter()
                    .position(|n| n.as_deref() == Some(lower.as_str()))
                    .ok_or_else(|| PlanError::TargetNotFound {
                        file: self.df.file.clone(),
                        name: t.clone(),
                    })?
            }
        };
        let stages_to_build = build_order(&stages, target);
        self.check_forward_refs(&stages, &stages_to_build)?;

        for &i in &stages_to_build {
            self.consumed.extend(stages[i].declared.iter().cloned());
        }
        let unused: Vec<&str> = self
            .build_args
            .keys()
            .filter(|k| {
                !self.consumed.contains(*k)
                    && !PROXY_ARGS.contains(&k.as_str())
                    && !k.starts_with("BUILDKIT_")
            })
            .map(String::as_str)
            .collect();
        let mut warnings = Vec::new();
        if !unused.is_empty() {
            warnings.push(format!(
                "one or more build args were not consumed: [{}]",
                unused.join(" ")
            ));
        }

        Ok(Plan {
            target,
            stages_to_build,
            stages: stages.into_iter().map(|d| d.stage).collect(),
            build_platform: self.build_platform.clone(),
            target_platform: self.target_platform.clone(),
            warnings,
            dockerfile: self.df.file.clone(),
            directives: self.df.directives.clone(),
        })
    }

    fn expand(&self, word: &str, vars: &Vars, line: usize, column: usize) -> Result<String, Error> {
        let value = shell::expand_word(word, vars, self.escape)
            .map_err(|e| self.err(line, column, ErrorKind::Expansion(e)))?;
        self.spend(value.len(), line, column)?;
        Ok(value)
    }

    /// Counts `bytes` against [`EXPANSION_BUDGET`].
    fn spend(&self, bytes: usize, line: usize, column: usize) -> Result<(), Error> {
        let spent = self.spent.get().saturating_add(bytes);
        if spent > EXPANSION_BUDGET {
            return Err(self.err(
                line,
                column,
                ErrorKind::Expansion(shell::ExpandError::BudgetExceeded(EXPANSION_BUDGET)),
            ));
        }
        self.spent.set(spent);
        Ok(())
    }

    /// Resolves a `--from` / `from=` value as written: a stage name, a
    /// stage index, or else an image reference (None). BuildKit resolves
    /// these before expansion and refuses variables in them.
    fn stage_ref(
        &self,
        value: &str,
        names: &[Option<String>],
        line: usize,
        column: usize,
    ) -> Result<Option<usize>, Error> {
        if shell::expand_word(value, &Vars::new(), self.escape).as_deref() != Ok(value) {
            return Err(self.err(line, column, ErrorKind::FromExpansion(value.to_string())));
        }
        let lower = value.to_ascii_lowercase();
        if let Some(i) = names
            .iter()
            .position(|n| n.as_deref() == Some(lower.as_str()))
        {
            return Ok(Some(i));
        }
        if !value.is_empty() && value.chars().all(|c| c.is_ascii_digit()) {
            return match value.parse::<usize>() {
                Ok(i) if i < names.len() => Ok(Some(i)),
                _ => Err(self.err(line, column, ErrorKind::UndefinedStage(value.to_string()))),
            };
        }
        Ok(None)
    }

    fn plan_stage(
        &mut self,
        index: usize,
        body: &[dockerfile::Located],
        meta: &Vars,
        names: &[Option<String>],
        earlier: &[StageDraft],
    ) -> Result<StageDraft, PlanError> {
        let from_line = &body[0];
        let Instruction::From(from) = &from_line.instruction else {
            return Err(self
                .err(from_line.line, from_line.column, ErrorKind::NoFrom)
                .into());
        };
        let (line, column) = (from_line.line, from_line.column);
        let base = self.expand(&from.image, meta, line, column)?;
        if base.is_empty() {
            return Err(self
                .err(line, column, ErrorKind::EmptyBase(from.image.clone()))
                .into());
        }
        let platform = from
            .platform
            .as_ref()
            .map(|p| self.expand(p, meta, line, column))
            .transpose()?;
        if let (Some(raw), Some(p)) = (&from.platform, &platform)
            && p.parse::<Platform>().is_err()
        {
            let msg =
                format!("invalid platform {p:?} from --platform={raw}: expected os/arch[/variant]");
            return Err(self.err(line, column, ErrorKind::Syntax(msg)).into());
        }
        let lower = base.to_ascii_lowercase();
        // FROM only refers to earlier stages, so `FROM node AS node` is the
        // image, as in Docker.
        let base_stage = names[..index]
            .iter()
            .position(|n| n.as_deref() == Some(lower.as_str()));
        let (env, args, vars) = match base_stage {
            Some(b) => (
                earlier[b].stage.env.clone(),
                earlier[b].args.clone(),
                earlier[b].vars.clone(),
            ),
            None => {
                let env = self.base_env.get(&base).cloned().unwrap_or_default();
                (env.clone(), Vars::new(), env)
            }
        };
        let mut draft = StageDraft {
            stage: Stage {
                index,
                name: from.name.clone(),
                base: base.clone(),
                source: match base_stage {
                    Some(b) => StageSource::Stage(b),
                    None => StageSource::Image(base.clone()),
                },
                base_stage,
                platform: platform.clone(),
                line,
                depends_on: base_stage.into_iter().collect(),
                instructions: Vec::with_capacity(body.len()),
                env,
            },
            args,
            vars,
            declared: BTreeSet::new(),
            snapshot: None,
        };
        let expanded_from = Instruction::From(dockerfile::From {
            platform,
            image: base,
            name: from.name.clone(),
        });
        let first = self.planned(from_line, expanded_from, Vec::new(), &mut draft, Vec::new())?;
        draft.stage.instructions.push(first);

        for located in &body[1..] {
            let planned = self.plan_instruction(located, &mut draft, names)?;
            for &r in &planned.stage_refs {
                if !draft.stage.depends_on.contains(&r) {
                    draft.stage.depends_on.push(r);
                }
            }
            draft.stage.instructions.push(planned);
        }
        draft.stage.depends_on.sort_unstable();
        Ok(draft)
    }

    fn planned(
        &self,
        located: &dockerfile::Located,
        instruction: Instruction,
        heredocs: Vec<Heredoc>,
        draft: &mut StageDraft,
        stage_refs: Vec<usize>,
    ) -> Result<PlannedInstruction, Error> {
        let (line, column) = (located.line, located.column);
        let (env, mut args) = match &draft.snapshot {
            Some(shared) => shared.clone(),
            None => {
                self.spend(
                    vars_size(&draft.stage.env) + vars_size(&draft.args),
                    line,
                    column,
                )?;
                let shared = (
                    Arc::new(draft.stage.env.clone()),
                    Arc::new(draft.args.clone()),
                );
                draft.snapshot = Some(shared.clone());
                shared
            }
        };
        if matches!(instruction, Instruction::Run(_)) {
            let proxies: Vec<(&str, &String)> = PROXY_ARGS
                .iter()
                .filter(|p| !args.contains_key(**p))
                .filter_map(|p| self.build_args.get(*p).map(|v| (*p, v)))
                .collect();
            if !proxies.is_empty() {
                self.spend(vars_size(&args), line, column)?;
                let with_proxies = Arc::make_mut(&mut args);
                for (p, v) in proxies {
                    with_proxies.insert(p.to_string(), v.clone());
                }
            }
        }
        let (flags, value, expanded) = describe(&instruction);
        Ok(PlannedInstruction {
            line: located.line,
            column: located.column,
            kind: instruction.keyword(),
            original: located.original.clone(),
            expanded,
            flags,
            value,
            heredocs,
            stage_refs,
            env,
            args,
            instruction,
        })
    }

    fn plan_instruction(
        &mut self,
        located: &dockerfile::Located,
        draft: &mut StageDraft,
        names: &[Option<String>],
    ) -> Result<PlannedInstruction, Error> {
        let (line, column) = (located.line, located.column);
        let vars: &Vars = &draft.vars;
        let ex = |s: &str| self.expand(s, vars, line, column);
        let ex_opt = |s: &Option<String>| s.as_deref().map(ex).transpose();
        let ex_all = |v: &[String]| v.iter().map(|s| ex(s)).collect::<Result<Vec<_>, _>>();
        let mut stage_refs = Vec::new();
        let mut heredocs = Vec::new();
        let expanded = match &located.instruction {
            // Stage bodies are split at FROM lines, so this cannot happen;
            // an error is still better than a panic.
            Instruction::From(_) => {
                return Err(self.err(
                    line,
                    column,
                    ErrorKind::Syntax("unexpected FROM inside a stage".into()),
                ));
            }
            Instruction::Env(pairs) | Instruction::Label(pairs) => {
                let mut out = Vec::with_capacity(pairs.len());
                for kv in pairs {
                    let key = ex(&kv.key)?;
                    if key.is_empty() {
                        return Err(self.err(
                            line,
                            column,
                            ErrorKind::Syntax(format!(
                                "{} names can not be blank",
                                located.instruction.keyword()
                            )),
                        ));
                    }
                    out.push(dockerfile::KeyValue {
                        key,
                        value: ex(&kv.value)?,
                    });
                }
                if let Instruction::Env(_) = &located.instruction {
                    for kv in &out {
                        draft.stage.env.insert(kv.key.clone(), kv.value.clone());
                        draft.vars.insert(kv.key.clone(), kv.value.clone());
                        draft.snapshot = None;
                    }
                    Instruction::Env(out)
                } else {
                    Instruction::Label(out)
                }
            }
            Instruction::Arg(decls) => {
                let mut out = Vec::with_capacity(decls.len());
                for decl in decls {
                    let name = self.expand(&decl.name, &draft.vars, line, column)?;
                    draft.declared.insert(name.clone());
                    let value = match (self.build_args.get(&name), &decl.default) {
                        (Some(v), _) => Some(v.clone()),
                        (None, Some(d)) => Some(self.expand(d, &draft.vars, line, column)?),
                        (None, None) => self.globals.get(&name).cloned(),
                    };
                    if let Some(v) = &value {
                        draft.args.insert(name.clone(), v.clone());
                        draft.vars.insert(name.clone(), v.clone());
                        draft.snapshot = None;
                    }
                    out.push(dockerfile::ArgDecl {
                        name,
                        default: value,
                    });
                }
                Instruction::Arg(out)
            }
            Instruction::Add(a) => {
                heredocs = self.expand_heredocs(&a.heredocs, vars, line, column)?;
                Instruction::Add(dockerfile::Add {
                    sources: ex_all(&a.sources)?,
                    dest: ex(&a.dest)?,
                    chown: ex_opt(&a.chown)?,
                    chmod: ex_opt(&a.chmod)?,
                    checksum: ex_opt(&a.checksum)?,
                    keep_git_dir: a.keep_git_dir,
                    link: a.link,
                    exclude: ex_all(&a.exclude)?,
                    heredocs: heredocs.clone(),
                })
            }
            Instruction::Copy(c) => {
                heredocs = self.expand_heredocs(&c.heredocs, vars, line, column)?;
                let from = c.from.clone();
                if let Some(f) = &from
                    && let Some(i) = self.stage_ref(f, names, line, column)?
                {
                    stage_refs.push(i);
                }
                Instruction::Copy(dockerfile::Copy {
                    sources: ex_all(&c.sources)?,
                    dest: ex(&c.dest)?,
                    from,
                    chown: ex_opt(&c.chown)?,
                    chmod: ex_opt(&c.chmod)?,
                    link: c.link,
                    parents: c.parents,
                    exclude: ex_all(&c.exclude)?,
                    heredocs: heredocs.clone(),
                })
            }
            Instruction::Run(r) => {
                let mut mounts = Vec::with_capacity(r.raw_mounts.len());
                for raw in &r.raw_mounts {
                    let mount = Mount::parse(raw, &mut |key, v| {
                        if key == "from" {
                            return Ok(v.to_string());
                        }
                        shell::expand_word(v, vars, self.escape).map_err(ErrorKind::Expansion)
                    })
                    .map_err(|kind| {
                        let (l, c) =
                            dockerfile::error_position(&located.original, &located.segments, &kind)
                                .unwrap_or((line, column));
                        self.err(l, c, kind)
                    })?;
                    if let Some(f) = &mount.from
                        && let Some(i) = self.stage_ref(f, names, line, column)?
                        && !stage_refs.contains(&i)
                    {
                        stage_refs.push(i);
                    }
                    mounts.push(mount);
                }
                heredocs = r.heredocs.clone();
                Instruction::Run(dockerfile::Run {
                    mounts,
                    raw_mounts: r.raw_mounts.clone(),
                    network: r.network,
                    security: r.security,
                    command: r.command.clone(),
                    heredocs: r.heredocs.clone(),
                })
            }
            Instruction::Expose(ports) => {
                let ports = ex_all(ports)?;
                for p in &ports {
                    PortSpec::parse(p).map_err(|k| self.err(line, column, k))?;
                }
                Instruction::Expose(ports)
            }
            Instruction::Volume(v) => Instruction::Volume(ex_all(v)?),
            Instruction::User(u) => Instruction::User(ex(u)?),
            Instruction::Workdir(w) => Instruction::Workdir(ex(w)?),
            Instruction::Stopsignal(s) => Instruction::Stopsignal(ex(s)?),
            other @ (Instruction::Cmd(_)
            | Instruction::Entrypoint(_)
            | Instruction::Maintainer(_)
            | Instruction::Onbuild { .. }
            | Instruction::Healthcheck(_)
            | Instruction::Shell(_)) => other.clone(),
        };
        self.planned(located, expanded, heredocs, draft, stage_refs)
    }

    fn expand_heredocs(
        &self,
        docs: &[Heredoc],
        vars: &Vars,
        line: usize,
        column: usize,
    ) -> Result<Vec<Heredoc>, Error> {
        docs.iter()
            .map(|d| {
                let mut d = d.clone();
                if d.expand {
                    d.content = shell::expand_heredoc(&d.content, vars, self.escape)
                        .map_err(|e| self.err(line, column, ErrorKind::Expansion(e)))?;
                    self.spend(d.content.len(), line, column)?;
                }
                Ok(d)
            })
            .collect()
    }

    /// BuildKit builds stages in file order and refuses to read from a
    /// stage that comes later (only in stages the build needs).
    fn check_forward_refs(&self, stages: &[StageDraft], needed: &[usize]) -> Result<(), Error> {
        let label = |i: usize| {
            stages[i]
                .stage
                .name
                .clone()
                .unwrap_or_else(|| format!("stage-{i}"))
        };
        for &i in needed {
            for ins in &stages[i].stage.instructions {
                if let Some(&later) = ins.stage_refs.iter().find(|&&r| r > i) {
                    return Err(self.err(
                        ins.line,
                        ins.column,
                        ErrorKind::StageDefinedLater {
                            stage: label(later),
                            current: label(i),
                        },
                    ));
                }
            }
        }
        Ok(())
    }

    fn check_cycles(&self, stages: &[StageDraft]) -> Result<(), Error> {
        // 0 = unvisited, 1 = on the current path, 2 = done.
        let mut state = vec![0u8; stages.len()];
        let mut path = Vec::new();
        for start in 0..stages.len() {
            if let Some(cycle) = visit(stages, start, &mut state, &mut path) {
                let label = |i: usize| {
                    stages[i]
                        .stage
                        .name
                        .clone()
                        .unwrap_or_else(|| i.to_string())
                };
                let first = stages[cycle[0]].stage.clone();
                return Err(self.err(
                    first.line,
                    1,
                    ErrorKind::Cycle(cycle.iter().map(|&i| label(i)).collect()),
                ));
            }
        }
        Ok(())
    }
}

fn visit(
    stages: &[StageDraft],
    node: usize,
    state: &mut [u8],
    path: &mut Vec<usize>,
) -> Option<Vec<usize>> {
    match state[node] {
        2 => return None,
        1 => {
            let start = path.iter().position(|&n| n == node).unwrap_or(0);
            let mut cycle = path[start..].to_vec();
            cycle.push(node);
            return Some(cycle);
        }
        _ => {}
    }
    state[node] = 1;
    path.push(node);
    for &dep in &stages[node].stage.depends_on {
        if let Some(c) = visit(stages, dep, state, path) {
            return Some(c);
        }
    }
    path.pop();
    state[node] = 2;
    None
}

/// The stages reachable from `target`, dependencies first, lower indexes
/// first among stages that are ready together. Cycles were rejected before.
fn build_order(stages: &[StageDraft], target: usize) -> Vec<usize> {
    let mut needed = BTreeSet::new();
    let mut todo = vec![target];
    while let Some(i) = todo.pop() {
        if needed.insert(i) {
            todo.extend(stages[i].stage.depends_on.iter().copied());
        }
    }
    let mut order = Vec::with_capacity(needed.len());
    let mut done = BTreeSet::new();
    while order.len() < needed.len() {
        let next = needed.iter().copied().find(|i| {
            !done.contains(i) && stages[*i].stage.depends_on.iter().all(|d| done.contains(d))
        });
        match next {
            Some(i) => {
                done.insert(i);
                order.push(i);
            }
            None => break,
        }
    }
    order
}

/// Quotes a value for the canonical text when it would not read back as
/// one word.
fn quote(s: &str) -> String {
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "\"'\\$`".contains(c)) {
        serde_json::to_string(s).unwrap_or_default()
    } else {
        s.to_string()
    }
}

fn command_text(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(v) => serde_json::to_string(v).unwrap_or_default(),
    }
}

fn mount_text(m: &Mount) -> String {
    let Ok(Value::Object(fields)) = serde_json::to_value(m) else {
        return String::new();
    };
    fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn heredoc_text(docs: &[Heredoc]) -> String {
    docs.iter()
        .map(|d| format!("\n{}{}", d.content, d.name))
        .collect()
}

/// The JSON flags, typed value and canonical text of an expanded instruction.
fn describe(instruction: &Instruction) -> (Map<String, Value>, Value, String) {
    let mut flags = Map::new();
    let mut put = |k: &str, v: Value| {
        flags.insert(k.to_string(), v);
    };
    let kw = instruction.keyword();
    let (value, text) = match instruction {
        Instruction::From(f) => {
            if let Some(p) = &f.platform {
                put("platform", json!(p));
            }
            let mut t = String::from("FROM ");
            if let Some(p) = &f.platform {
                t.push_str(&format!("--platform={p} "));
            }
            t.push_str(&f.image);
            if let Some(n) = &f.name {
                t.push_str(&format!(" AS {n}"));
            }
            (json!({"image": f.image, "name": f.name}), t)
        }
        Instruction::Run(r) => {
            let mut words = Vec::new();
            if !r.mounts.is_empty() {
                put("mount", json!(r.mounts));
                for m in &r.mounts {
                    words.push(format!("--mount={}", mount_text(m)));
                }
            }
            if let Some(n) = r.network {
                put("network", json!(n));
                words.push(format!("--network={}", json!(n).as_str().unwrap_or("")));
            }
            if let Some(s) = r.security {
                put("security", json!(s));
                words.push(format!("--security={}", json!(s).as_str().unwrap_or("")));
            }
            words.push(command_text(&r.command));
            (
                json!({"command": r.command}),
                format!("RUN {}{}", words.join(" "), heredoc_text(&r.heredocs)),
            )
        }
        Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
            (json!({"command": c}), format!("{kw} {}", command_text(c)))
        }
        Instruction::Env(kvs) | Instruction::Label(kvs) => {
            let pairs: Vec<String> = kvs
                .iter()
                .map(|kv| format!("{}={}", quote(&kv.key), quote(&kv.value)))
                .collect();
            (json!(kvs), format!("{kw} {}", pairs.join(" ")))
        }
        Instruction::Maintainer(s) | Instruction::Workdir(s) | Instruction::Stopsignal(s) => {
            (json!(s), format!("{kw} {s}"))
        }
        Instruction::User(s) => {
            let (user, group) = Instruction::user_group(s);
            (json!({"user": user, "group": group}), format!("USER {s}"))
        }
        Instruction::Expose(ports) => {
            let specs: Vec<Value> = ports
                .iter()
                .filter_map(|p| PortSpec::parse(p).ok())
                .map(|p| json!(p))
                .collect();
            (Value::Array(specs), format!("EXPOSE {}", ports.join(" ")))
        }
        Instruction::Volume(v) => (
            json!(v),
            format!("VOLUME {}", serde_json::to_string(v).unwrap_or_default()),
        ),
        Instruction::Arg(decls) => {
            let words: Vec<String> = decls
                .iter()
                .map(|d| match &d.default {
                    Some(v) => format!("{}={}", d.name, quote(v)),
                    None => d.name.clone(),
                })
                .collect();
            (
                Value::Array(
                    decls
                        .iter()
                        .map(|d| json!({"name": d.name, "value": d.default}))
                        .collect(),
                ),
                format!("ARG {}", words.join(" ")),
            )
        }
        Instruction::Add(a) => {
            let mut words = Vec::new();
            for (k, v) in [
                ("chown", &a.chown),
                ("chmod", &a.chmod),
                ("checksum", &a.checksum),
            ] {
                if let Some(v) = v {
                    put(k, json!(v));
                    words.push(format!("--{k}={v}"));
                }
            }
            if a.keep_git_dir {
                put("keep-git-dir", json!(true));
                words.push("--keep-git-dir".into());
            }
            if a.link {
                put("link", json!(true));
                words.push("--link".into());
            }
            if !a.exclude.is_empty() {
                put("exclude", json!(a.exclude));
                words.extend(a.exclude.iter().map(|e| format!("--exclude={e}")));
            }
            words.extend(a.sources.iter().cloned());
            words.push(a.dest.clone());
            (
                json!({"sources": a.sources, "dest": a.dest}),
                format!("ADD {}{}", words.join(" "), heredoc_text(&a.heredocs)),
            )
        }
        Instruction::Copy(c) => {
            let mut words = Vec::new();
            for (k, v) in [("from", &c.from), ("chown", &c.chown), ("chmod", &c.chmod)] {
                if let Some(v) = v {
                    put(k, json!(v));
                    words.push(format!("--{k}={v}"));
                }
            }
            if c.link {
                put("link", json!(true));
                words.push("--link".into());
            }
            if c.parents {
                put("parents", json!(true));
                words.push("--parents".into());
            }
            if !c.exclude.is_empty() {
                put("exclude", json!(c.exclude));
                words.extend(c.exclude.iter().map(|e| format!("--exclude={e}")));
            }
            words.extend(c.sources.iter().cloned());
            words.push(c.dest.clone());
            (
                json!({"sources": c.sources, "dest": c.dest}),
                format!("COPY {}{}", words.join(" "), heredoc_text(&c.heredocs)),
            )
        }
        Instruction::Onbuild { trigger, .. } => (json!(trigger), format!("ONBUILD {trigger}")),
        Instruction::Healthcheck(h) => match h {
            dockerfile::Healthcheck::None => (json!("NONE"), "HEALTHCHECK NONE".to_string()),
            dockerfile::Healthcheck::Cmd {
                test,
                interval_ns,
                timeout_ns,
                start_period_ns,
                start_interval_ns,
                retries,
            } => {
                let mut words = Vec::new();
                for (k, v) in [
                    ("interval", interval_ns),
                    ("timeout", timeout_ns),
                    ("start-period", start_period_ns),
                    ("start-interval", start_interval_ns),
                ] {
                    if let Some(v) = v {
                        put(&format!("{}_ns", k.replace('-', "_")), json!(v));
                        words.push(format!("--{k}={v}ns"));
                    }
                }
                if let Some(r) = retries {
                    put("retries", json!(r));
                    words.push(format!("--retries={r}"));
                }
                words.push(format!("CMD {}", command_text(test)));
                (
                    json!({"test": test}),
                    format!("HEALTHCHECK {}", words.join(" ")),
                )
            }
        },
        Instruction::Shell(v) => (
            json!(v),
            format!("SHELL {}", serde_json::to_string(v).unwrap_or_default()),
        ),
    };
    (flags, value, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(args: &[(&str, &str)], target: Option<&str>) -> PlanOptions {
        PlanOptions {
            context: PathBuf::from("/ctx"),
            dockerfile: None,
            build_args: args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            target: target.map(str::to_string),
            platform: None,
            build_platform: Some("linux/amd64".into()),
            base_env: BTreeMap::new(),
        }
    }

    fn plan_of(src: &str, args: &[(&str, &str)], target: Option<&str>) -> Result<Plan, PlanError> {
        plan_source(src, Path::new("Dockerfile"), &opts(args, target))
    }

    fn ok(src: &str) -> Plan {
        plan_of(src, &[], None).unwrap()
    }

    fn expanded(plan: &Plan, stage: usize, i: usize) -> &str {
        &plan.stages[stage].instructions[i].expanded
    }

    fn error_kind(src: &str) -> ErrorKind {
        match plan_of(src, &[], None) {
            Err(PlanError::Dockerfile(e)) => e.kind,
            other => panic!("expected a Dockerfile error, got {other:?}"),
        }
    }

    #[test]
    fn global_args_are_only_visible_in_from_unless_redeclared() {
        let p =
            ok("ARG V=1\nARG IMG=alpine:$V\nFROM $IMG\nRUN echo\nLABEL a=$V\nARG V\nLABEL b=$V\n");
        assert_eq!(p.stages[0].base, "alpine:1");
        assert_eq!(expanded(&p, 0, 2), "LABEL a=\"\"");
        assert_eq!(expanded(&p, 0, 4), "LABEL b=1");
    }

    #[test]
    fn build_args_override_defaults_everywhere() {
        let src = "ARG V=1\nFROM a:$V\nARG V\nARG W=x\nLABEL v=$V w=$W\n";
        let p = plan_of(src, &[("V", "9"), ("W", "y")], None).unwrap();
        assert_eq!(p.stages[0].base, "a:9");
        assert_eq!(expanded(&p, 0, 3), "LABEL v=9 w=y");
        assert!(p.warnings.is_empty());
    }

    #[test]
    fn env_overrides_an_earlier_arg_and_later_instructions_see_it() {
        let p = plan_of(
            "FROM a\nARG V=arg\nENV V=env\nENV W=$V X=${V}2\nWORKDIR /$W\n",
            &[("V", "cli")],
            None,
        )
        .unwrap();
        assert_eq!(expanded(&p, 0, 3), "ENV W=env X=env2");
        assert_eq!(expanded(&p, 0, 4), "WORKDIR /env");
        let run_env = &p.stages[0].instructions[4].env;
        assert_eq!(run_env.get("W").map(String::as_str), Some("env"));
    }

    #[test]
    fn env_pairs_on_one_line_see_the_environment_before_the_line() {
        let p = ok("FROM a\nENV A=1\nENV A=2 B=$A\nLABEL b=$B\n");
        assert_eq!(expanded(&p, 0, 3), "LABEL b=1");
    }

    #[test]
    fn run_cmd_entrypoint_are_not_expanded_but_see_args() {
        let p = plan_of(
            "FROM a\nARG T=x\nRUN echo $T\nCMD echo $T\n",
            &[("HTTP_PROXY", "http://p")],
            None,
        )
        .unwrap();
        assert_eq!(expanded(&p, 0, 2), "RUN echo $T");
        assert_eq!(expanded(&p, 0, 3), "CMD echo $T");
        let run = &p.stages[0].instructions[2];
        assert_eq!(run.args.get("T").map(String::as_str), Some("x"));
        assert_eq!(
            run.args.get("HTTP_PROXY").map(String::as_str),
            Some("http://p")
        );
        assert!(
            p.warnings.is_empty(),
            "proxy args are never reported unused"
        );
    }

    #[test]
    fn platform_args_are_predefined_for_from_and_declarable_in_stages() {
        let mut o = opts(&[], None);
        o.platform = Some("linux/arm/v7".into());
        let p = plan_source(
            "FROM --platform=$BUILDPLATFORM a:$TARGETARCH\nLABEL x=$TARGETOS\nARG TARGETPLATFORM TARGETVARIANT\nLABEL p=$TARGETPLATFORM v=$TARGETVARIANT\n",
            Path::new("Dockerfile"),
            &o,
        )
        .unwrap();
        assert_eq!(p.stages[0].base, "a:arm");
        assert_eq!(p.stages[0].platform.as_deref(), Some("linux/amd64"));
        assert_eq!(expanded(&p, 0, 1), "LABEL x=\"\"");
        assert_eq!(expanded(&p, 0, 3), "LABEL p=linux/arm/v7 v=v7");
        assert_eq!(p.target_platform.to_string(), "linux/arm/v7");
    }

    #[test]
    fn bare_global_platform_arg_keeps_its_predefined_value() {
        let p = ok(
            "ARG TARGETPLATFORM\nARG UNSET\nFROM --platform=$TARGETPLATFORM a$UNSET\nARG TARGETPLATFORM\nLABEL p=$TARGETPLATFORM\n",
        );
        assert_eq!(p.stages[0].platform.as_deref(), Some("linux/amd64"));
        assert_eq!(p.stages[0].base, "a");
        assert_eq!(expanded(&p, 0, 2), "LABEL p=linux/amd64");
    }

    #[test]
    fn unused_build_args_produce_a_warning() {
        let p = plan_of("ARG USED\nFROM a\n", &[("USED", "1"), ("NOPE", "2")], None).unwrap();
        assert_eq!(
            p.warnings,
            vec!["one or more build args were not consumed: [NOPE]"]
        );
    }

    #[test]
    fn args_declared_only_in_skipped_stages_are_unused() {
        let p = plan_of("FROM a AS x\nARG ONLYX\nFROM b\n", &[("ONLYX", "1")], None).unwrap();
        assert_eq!(p.stages_to_build, vec![1]);
        assert_eq!(p.warnings.len(), 1);
    }

    #[test]
    fn stages_resolve_by_name_and_index_and_unused_ones_are_skipped() {
        let src = "FROM a AS Base\nENV E=1\nFROM b AS unused\nFROM base AS mid\nFROM c\nCOPY --from=MID /x /x\nCOPY --from=0 /y /y\nCOPY --from=nginx:1 /z /z\n";
        let p = ok(src);
        assert_eq!(p.stages[2].base_stage, Some(0));
        assert_eq!(
            p.stages[2].instructions[0].env.get("E").map(String::as_str),
            Some("1")
        );
        assert_eq!(p.stages[3].depends_on, vec![0, 2]);
        assert_eq!(p.stages_to_build, vec![0, 2, 3]);
        assert_eq!(p.target, 3);
        assert_eq!(p.stages[3].instructions[3].stage_refs, Vec::<usize>::new());
    }

    #[test]
    fn a_stage_built_from_another_inherits_its_env() {
        let p = ok("FROM a AS one\nENV E=1\nFROM one\nLABEL e=$E\n");
        assert_eq!(expanded(&p, 1, 1), "LABEL e=1");
    }

    #[test]
    fn from_a_name_equal_to_its_own_stage_name_is_the_image() {
        let p = ok("FROM node AS node\nRUN x\n");
        assert_eq!(p.stages[0].base_stage, None);
    }

    #[test]
    fn target_selects_a_stage_case_insensitively() {
        let p = plan_of(
            "FROM a AS Build\nFROM b AS test\nCOPY --from=build / /\nFROM c\n",
            &[],
            Some("TEST"),
        )
        .unwrap();
        assert_eq!(p.target, 1);
        assert_eq!(p.stages_to_build, vec![0, 1]);
        let e = plan_of("FROM a AS x\n", &[], Some("nope")).unwrap_err();
        assert!(matches!(e, PlanError::TargetNotFound { .. }));
        assert!(e.to_string().contains("\"nope\""));
    }

    #[test]
    fn forward_references_and_cycles_are_rejected() {
        let later = plan_of(
            "FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nFROM c\nCOPY --from=one / /\n",
            &[],
            None,
        )
        .unwrap_err();
        assert_eq!(
            later.to_string(),
            "Dockerfile:2:1: cannot copy from stage \"two\", it needs to be defined before current stage \"one\""
        );
        // A stage the build does not need may refer forward.
        let p = ok("FROM a AS unused\nCOPY --from=two / /\nFROM b AS two\n");
        assert_eq!(p.stages_to_build, vec![1]);
        let cycle = error_kind(
            "FROM a AS one\nCOPY --from=two / /\nFROM b AS two\nRUN --mount=from=one,target=/m x\n",
        );
        assert_eq!(
            cycle,
            ErrorKind::Cycle(vec!["one".into(), "two".into(), "one".into()])
        );
        let own = error_kind("FROM a AS me\nCOPY --from=me / /\n");
        assert!(matches!(own, ErrorKind::Cycle(_)));
    }

    #[test]
    fn from_values_may_not_use_variables() {
        let e = error_kind("FROM a AS x\nFROM b\nARG S=x\nCOPY --from=$S / /\n");
        assert_eq!(e, ErrorKind::FromExpansion("$S".into()));
        let m = error_kind("FROM a AS x\nFROM b\nRUN --mount=from=${S:-x},target=/m true\n");
        assert!(matches!(m, ErrorKind::FromExpansion(_)));
    }

    #[test]
    fn from_platform_must_be_a_platform() {
        assert!(matches!(
            error_kind("ARG P\nFROM --platform=$P a\n"),
            ErrorKind::Syntax(_)
        ));
        assert!(matches!(
            error_kind("FROM --platform=linux a\n"),
            ErrorKind::Syntax(_)
        ));
    }

    #[test]
    fn mount_from_adds_a_dependency_and_mount_values_are_expanded() {
        let p =
            ok("FROM a AS src\nFROM b\nARG DIR=/m\nRUN --mount=type=bind,from=src,target=$DIR x\n");
        let run = &p.stages[1].instructions[2];
        assert_eq!(run.stage_refs, vec![0]);
        let Instruction::Run(r) = &run.instruction else {
            panic!()
        };
        assert_eq!(r.mounts[0].target.as_deref(), Some("/m"));
        assert_eq!(p.stages_to_build, vec![0, 1]);
    }

    #[test]
    fn stage_index_out_of_range_is_an_undefined_stage() {
        let e = plan_of("FROM a\nCOPY --from=3 / /\n", &[], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:1: stage \"3\" is not defined in this Dockerfile"
        );
    }

    #[test]
    fn required_variables_fail_with_their_message_and_location() {
        let e = plan_of("FROM a\n  WORKDIR ${DIR:?set DIR}\n", &[], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:3: variable substitution failed: DIR: set DIR"
        );
        let e = plan_of("ARG IMG\nFROM ${IMG:?}\n", &[], None).unwrap_err();
        assert!(e.to_string().contains("IMG: is not allowed to be unset"));
        assert!(plan_of("ARG IMG\nFROM ${IMG:?}\n", &[("IMG", "x")], None).is_ok());
    }

    #[test]
    fn structural_errors_are_reported() {
        assert_eq!(
            error_kind("RUN x\nFROM a\n"),
            ErrorKind::BeforeFrom("RUN".into())
        );
        assert_eq!(error_kind("ARG A\n"), ErrorKind::NoFrom);
        assert_eq!(error_kind(""), ErrorKind::NoFrom);
        assert_eq!(
            error_kind("FROM a AS x\nFROM b AS X\n"),
            ErrorKind::DuplicateStageName("x".into())
        );
        assert!(matches!(
            error_kind("ARG E\nFROM $E\n"),
            ErrorKind::EmptyBase(_)
        ));
        assert!(matches!(
            error_kind("FROM a\nEXPOSE $P\n"),
            ErrorKind::InvalidPort(_)
        ));
        assert!(matches!(
            error_kind("FROM a\nEXPOSE 80/xyz\n"),
            ErrorKind::InvalidPort(_)
        ));
    }

    #[test]
    fn flag_errors_on_continued_lines_point_at_the_physical_line() {
        let e = plan_of(
            "FROM a\nRUN --network=none \\\n  --mount=type=cache,target=/c,size=1 true\n",
            &[],
            None,
        )
        .unwrap_err();
        assert!(
            e.to_string().starts_with("Dockerfile:3:3: invalid value"),
            "{e}"
        );
    }

    #[test]
    fn flag_errors_point_at_the_flag_column() {
        let e = plan_of("FROM a\nCOPY --link --bogus=1 a b\n", &[], None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "Dockerfile:2:13: unknown flag --bogus for COPY"
        );
    }

    #[test]
    fn copy_heredocs_expand_unless_quoted_and_run_heredocs_never() {
        let p = ok(
            "FROM a\nARG N=kiln\nCOPY <<A <<'B' /d/\nhi $N\nA\nhi $N\nB\nRUN <<EOF\necho $N\nEOF\n",
        );
        let copy = &p.stages[0].instructions[2];
        assert_eq!(copy.heredocs[0].content, "hi kiln\n");
        assert_eq!(copy.heredocs[1].content, "hi $N\n");
        let run = &p.stages[0].instructions[3];
        assert_eq!(run.heredocs[0].content, "echo $N\n");
        assert_eq!(run.expanded, "RUN <<EOF\necho $N\nEOF");
    }

    #[test]
    fn onbuild_healthcheck_shell_maintainer_are_not_expanded() {
        let p = ok(
            "FROM a\nENV X=1\nONBUILD RUN echo $X\nHEALTHCHECK CMD test $X\nSHELL [\"/bin/$X\"]\nMAINTAINER $X\n",
        );
        assert_eq!(expanded(&p, 0, 2), "ONBUILD RUN echo $X");
        assert_eq!(expanded(&p, 0, 3), "HEALTHCHECK CMD test $X");
        assert_eq!(expanded(&p, 0, 4), "SHELL [\"/bin/$X\"]");
        assert_eq!(expanded(&p, 0, 5), "MAINTAINER $X");
    }

    #[test]
    fn expanded_instructions_cover_every_expanding_kind() {
        let p = ok(
            "FROM a\nENV U=app P=80 D=/data S=SIGINT Q=\"x y\"\nUSER $U:$U\nEXPOSE $P ${P}/udp\nVOLUME $D [\"/v\"]\nVOLUME [\"$D\"]\nSTOPSIGNAL $S\nLABEL \"k $U\"=$Q\nADD --chown=$U --chmod=0${P} --checksum=sha256:$P --exclude=$D src$P $D/\nCOPY --chown=$U:$U --exclude=*.$P [\"$D\", \"/x\"]\n",
        );
        assert_eq!(expanded(&p, 0, 2), "USER app:app");
        assert_eq!(expanded(&p, 0, 3), "EXPOSE 80 80/udp");
        // Shell-form words go through Docker's word processing: quotes removed.
        assert_eq!(expanded(&p, 0, 4), "VOLUME [\"/data\",\"[/v]\"]");
        assert_eq!(expanded(&p, 0, 5), "VOLUME [\"/data\"]");
        assert_eq!(expanded(&p, 0, 6), "STOPSIGNAL SIGINT");
        assert_eq!(expanded(&p, 0, 7), "LABEL \"k app\"=\"x y\"");
        assert_eq!(
            expanded(&p, 0, 8),
            "ADD --chown=app --chmod=080 --checksum=sha256:80 --exclude=/data src80 /data/"
        );
        assert_eq!(
            expanded(&p, 0, 9),
            "COPY --chown=app:app --exclude=*.80 /data /x"
        );
    }

    #[test]
    fn plan_reads_the_dockerfile_from_the_context() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
        let mut o = opts(&[], None);
        o.context = dir.path().to_path_buf();
        let p = plan(&o).unwrap();
        assert_eq!(p.stages[0].base, "scratch");
        o.dockerfile = Some(dir.path().join("missing"));
        assert!(matches!(plan(&o), Err(PlanError::Read { .. })));
    }

    #[test]
    fn base_image_env_is_used_when_the_engine_supplies_it() {
        let mut o = opts(&[], None);
        let mut env = Vars::new();
        env.insert("PATH".into(), "/usr/bin".into());
        o.base_env.insert("alpine:3".into(), env);
        let p = plan_source(
            "ARG T=3\nFROM alpine:$T\nENV PATH=/opt:$PATH\nFROM busybox\nENV PATH=/opt:$PATH\n",
            Path::new("Dockerfile"),
            &o,
        )
        .unwrap();
        assert_eq!(expanded(&p, 0, 1), "ENV PATH=/opt:/usr/bin");
        assert_eq!(
            p.stages[0].env.get("PATH").map(String::as_str),
            Some("/opt:/usr/bin")
        );
        assert_eq!(expanded(&p, 1, 1), "ENV PATH=/opt:");
    }

    #[test]
    fn platforms_parse_and_reject_garbage() {
        for bad in ["linux", "linux/", "a/b/c/d", ""] {
            let mut o = opts(&[], None);
            o.platform = Some(bad.into());
            let err = plan_source("FROM a\n", Path::new("Dockerfile"), &o).unwrap_err();
            assert!(matches!(err, PlanError::Platform(_)), "{bad}: {err}");
        }
    }

    /// Before kiln had one `Platform`, the planner kept `v8` here (so
    /// TARGETVARIANT was `v8` for `linux/arm64/v8` and empty for
    /// `linux/arm64`) while index selection treated both as one platform.
    #[test]
    fn arm64_with_and_without_v8_plans_the_same_platform_args() {
        let df = "FROM a\nARG TARGETPLATFORM TARGETVARIANT TARGETARCH\nLABEL p=$TARGETPLATFORM v=$TARGETVARIANT a=$TARGETARCH\n";
        for given in ["linux/arm64", "linux/arm64/v8", "Linux/AArch64"] {
            let mut o = opts(&[], None);
            o.platform = Some(given.into());
            let p = plan_source(df, Path::new("Dockerfile"), &o).unwrap();
            assert_eq!(
                expanded(&p, 0, 2),
                "LABEL p=linux/arm64 v=\"\" a=arm64",
                "{given}"
            );
            assert_eq!(p.target_platform.to_string(), "linux/arm64", "{given}");
        }
    }

    #[test]
    fn bare_arm_gets_its_default_variant_v7() {
        let mut o = opts(&[], None);
        o.platform = Some("linux/arm".into());
        let p = plan_source(
            "FROM a\nARG TARGETVARIANT\nLABEL v=$TARGETVARIANT\n",
            Path::new("Dockerfile"),
            &o,
        )
        .unwrap();
        assert_eq!(expanded(&p, 0, 2), "LABEL v=v7");
        assert_eq!(p.target_platform.to_string(), "linux/arm/v7");
    }

    #[test]
    fn dry_run_json_prints_platforms_as_text() {
        let mut o = opts(&[], None);
        o.platform = Some("linux/arm64/v8".into());
        let p = plan_source("FROM a\n", Path::new("Dockerfile"), &o).unwrap();
        let json = serde_json::to_value(&p).unwrap();
        assert_eq!(json["target_platform"], "linux/arm64");
        assert_eq!(json["build_platform"], "linux/amd64");
    }

    /// `ARG a=xxxxxxxxxx`, then each ARG ten times the one before: a
    /// "billion laughs" of 516 bytes or so.
    fn laughs(levels: usize) -> String {
        let names: Vec<char> = ('a'..='z').take(levels).collect();
        let mut src = String::from("FROM scratch\nARG a=xxxxxxxxxx\n");
        for pair in names.windows(2) {
            let prev = format!("${}", pair[0]);
            src.push_str(&format!("ARG {}={}\n", pair[1], prev.repeat(10)));
        }
        src.push_str(&format!("RUN echo ${}\n", names[levels - 1]));
        src
    }

    #[test]
    fn chained_expansions_stop_at_the_size_limit_and_name_the_line() {
        let src = laughs(9);
        assert!(src.len() < 600, "{}", src.len());
        let err = plan_of(&src, &[], None).unwrap_err();
        // a=10 bytes, ..., f=1,000,000 bytes still fits, g=10^7 does not.
        let Err(PlanError::Dockerfile(e)) = plan_of(&src, &[], None) else {
            panic!("expected a Dockerfile error");
        };
        assert_eq!(e.line, 8, "{err}");
        assert!(
            matches!(e.kind, ErrorKind::Expansion(shell::ExpandError::TooLong)),
            "{err}"
        );
        assert!(err.to_string().contains("larger than"), "{err}");
    }

    #[test]
    fn many_large_values_exhaust_the_expansion_budget() {
        // Each value stays under the per-word limit, but copies of them for
        // every later instruction would not fit in memory for long.
        let mut src = laughs(6);
        for i in 0..200 {
            src.push_str(&format!("ENV v{i}=$f\n"));
        }
        let Err(PlanError::Dockerfile(e)) = plan_of(&src, &[], None) else {
            panic!("expected a Dockerfile error");
        };
        assert!(
            matches!(
                e.kind,
                ErrorKind::Expansion(shell::ExpandError::BudgetExceeded(_))
            ),
            "{e}"
        );
        assert!(e.line > 8 && e.line < 200, "{e}");
    }

    #[test]
    fn instructions_share_unchanged_variable_copies() {
        let p = ok("FROM a\nARG X=1\nLABEL a=1\nLABEL b=2\nENV Y=2\nLABEL c=3\n");
        let ins = &p.stages[0].instructions;
        assert!(Arc::ptr_eq(&ins[2].args, &ins[3].args));
        assert!(Arc::ptr_eq(&ins[2].env, &ins[3].env));
        assert!(!Arc::ptr_eq(&ins[3].env, &ins[5].env));
        assert_eq!(ins[5].env.get("Y").map(String::as_str), Some("2"));
    }
}
