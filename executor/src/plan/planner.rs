//! The planner proper: walks a parsed Dockerfile stage by stage, scoping
//! ARG and ENV as Docker does, expanding every word (within
//! [`EXPANSION_BUDGET`](super::EXPANSION_BUDGET)) and typing each
//! instruction. Promise: every error names the Dockerfile, line and column.

use super::describe::describe;
use super::graph::build_order;
use super::model::{Plan, PlanOptions, PlannedInstruction, Stage, StageSource};
use super::{EXPANSION_BUDGET, PROXY_ARGS, PlanError};
use crate::dockerfile::{
    self, Dockerfile, Error, ErrorKind, Heredoc, Instruction, Mount, PortSpec, Vars, shell,
};
use crate::oci::Platform;
use std::cell::Cell;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// Bytes a map of variables holds.
fn vars_size(vars: &Vars) -> usize {
    vars.iter().map(|(k, v)| k.len() + v.len()).sum()
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

pub(super) struct Planner<'a> {
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

pub(super) struct StageDraft {
    pub(super) stage: Stage,
    args: Vars,
    /// What expansion sees: ARG and ENV values, the later one winning.
    vars: Vars,
    declared: BTreeSet<String>,
    /// The copies of `stage.env` and `args` the last instruction got,
    /// reused until an ARG or ENV changes them.
    snapshot: Option<(Arc<Vars>, Arc<Vars>)>,
}

impl<'a> Planner<'a> {
    pub(super) fn new(df: &'a Dockerfile, opts: &PlanOptions) -> Result<Planner<'a>, PlanError> {
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

    pub(super) fn err(&self, line: usize, column: usize, kind: ErrorKind) -> Error {
        Error {
            file: self.df.file.clone(),
            line,
            column,
            kind,
        }
    }

    pub(super) fn run(mut self, opts: &PlanOptions) -> Result<Plan, PlanError> {
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
}
