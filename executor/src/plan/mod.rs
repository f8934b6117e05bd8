//! The build plan: a parsed Dockerfile with build arguments, ARG/ENV scoping
//! and variable expansion applied, stages resolved into a dependency graph,
//! and the stages a build of the target needs, in build order. It promises
//! Docker/BuildKit semantics (see docs/dockerfile.md for the decisions where
//! Docker is ambiguous) and reports every problem as an error naming the
//! Dockerfile, line and column. `--dry-run` prints a [`Plan`] as JSON; the
//! build engine walks the same [`Plan`].
//!
//! Files: [`model`] (what a plan is: the types `--dry-run` serialises),
//! `planner` (ARG/ENV scoping and expansion, stage by stage), `graph` (stage
//! dependencies: cycles, forward references, build order) and `describe`
//! (the typed value and rendered text of an expanded instruction, which
//! `--dry-run` prints; cache keys never read it: see `crate::keys`).

mod describe;
mod graph;
pub mod model;
mod planner;
#[cfg(test)]
mod tests;

use crate::dockerfile::{self, Error};
use crate::oci::PlatformError;
use std::path::{Path, PathBuf};

/// Kept so that `crate::plan::Platform` still names the one platform type.
pub use crate::oci::Platform;
pub use model::{Plan, PlanOptions, PlannedInstruction, Stage, StageSource};

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

/// Reads the Dockerfile named by `opts` and plans the build.
pub fn plan(opts: &PlanOptions) -> Result<Plan, PlanError> {
    let path = opts.dockerfile_path();
    // Bytes, as BuildKit reads them (see `dockerfile::parse_bytes`), and
    // only from a regular file: a FIFO named Dockerfile must not block.
    let source =
        crate::sources::context::read_regular_file(&path).map_err(|source| PlanError::Read {
            path: path.clone(),
            source,
        })?;
    let parsed = dockerfile::parse_bytes(&source, &path)?;
    planner::Planner::new(&parsed, opts)?.run(opts)
}

/// Plans the build of Dockerfile text (`file` names it in errors).
pub fn plan_source(source: &str, file: &Path, opts: &PlanOptions) -> Result<Plan, PlanError> {
    let parsed = dockerfile::parse(source, file)?;
    planner::Planner::new(&parsed, opts)?.run(opts)
}
