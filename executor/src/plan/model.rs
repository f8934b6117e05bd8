//! What a plan is: the options it is made from and the types `--dry-run`
//! serialises as JSON (docs/dockerfile.md). Promise: the JSON field names
//! and shapes stay as they are; platforms print as `os/arch[/variant]`.

use crate::dockerfile::{self, Heredoc, Instruction, Vars};
use crate::oci::Platform;
use serde::{Serialize, Serializer};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

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
