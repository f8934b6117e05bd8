//! The build driver's errors and step outcomes, as types.
//!
//! A step fails with a [`StepError`]: what went wrong inside the step,
//! with the library error that caused it kept as its `source` (so
//! `kiln_common::error_report` prints the whole chain). The driver wraps
//! it in [`BuildError::Step`], which adds the Dockerfile file, line and
//! instruction. Everything outside a step (resolving a base, setting up,
//! writing the image) has its own [`BuildError`] variant. [`StepOutcome`]
//! is what a step did, as the report and the log name it.

use std::io;

use kiln_common::Digest;

use crate::build::runner::ExitStatus;

/// What a step did: the report's `cache` column and the log's outcome.
/// The serialised names are the report format (`"hit"`, `"miss"`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum StepOutcome {
    /// The cache had the step's result; it did not run.
    Hit,
    /// A filesystem step that ran (its key was not in the cache).
    Miss,
    /// A filesystem step that ran without a key of its own (never in the
    /// report: the cache wrapper turns it into [`StepOutcome::Miss`]).
    Run,
    /// A metadata step: no cache entry, nothing ran.
    None,
}

impl StepOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            StepOutcome::Hit => "hit",
            StepOutcome::Miss => "miss",
            StepOutcome::Run => "run",
            StepOutcome::None => "none",
        }
    }
}

impl std::fmt::Display for StepOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a step failed (the caller adds the Dockerfile line).
#[derive(Debug, thiserror::Error)]
pub enum StepError {
    /// A file operation in scratch space, the store or a rootfs; `what`
    /// names the operation and the path.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Snapshot(#[from] crate::build::snapshot::SnapshotError),
    #[error(transparent)]
    Runner(#[from] crate::build::runner::RunError),
    /// The RUN command ran and exited non-zero: the executor exits with
    /// its status (see [`BuildError::exit_code`]).
    #[error("the command failed with {status}; last output:\n{tail}")]
    CommandFailed { status: ExitStatus, tail: String },
    #[error(transparent)]
    Copy(#[from] crate::build::copy::CopyError),
    #[error(transparent)]
    Layer(#[from] crate::build::layer::LayerError),
    #[error(transparent)]
    Context(#[from] crate::sources::context::ContextError),
    #[error(transparent)]
    Ignore(#[from] crate::sources::dockerignore::IgnoreError),
    #[error(transparent)]
    Config(#[from] crate::build::config::ConfigError),
    #[error(transparent)]
    Remote(#[from] crate::sources::remote::RemoteError),
    /// `--chown`, `USER`: `what` is the flag or instruction.
    #[error("{what}: {source}")]
    User {
        what: String,
        #[source]
        source: crate::build::user::UserError,
    },
    #[error("{what}: {source}")]
    Unpack {
        what: String,
        #[source]
        source: crate::build::unpack::UnpackError,
    },
    #[error("{what}: {source}")]
    Cache {
        what: String,
        #[source]
        source: crate::cache::CacheError,
    },
    #[error("{what}: {source}")]
    Registry {
        what: String,
        #[source]
        source: crate::registry::RegistryError,
    },
    /// `COPY --from=<image>` or `RUN --mount=from=<image>` whose image
    /// could not be had.
    #[error("base image {reference}: {source}")]
    Base {
        reference: String,
        #[source]
        source: BaseError,
    },
    /// A cache hit whose layer cannot be had: the build turns the hit into
    /// a miss and builds the step instead.
    #[error("cached layer {digest} is not usable: {reason}")]
    LostHit { digest: Digest, reason: String },
    /// Mounting a layer image (its own messages, `driver/mountable.rs`).
    #[error("{0}")]
    Mount(String),
    /// What the Dockerfile or the flags ask for cannot be done (a bad
    /// `--chmod`, a missing source, a forbidden mount); the message says
    /// what and why.
    #[error("{0}")]
    Invalid(String),
}

impl StepError {
    pub(super) fn io(what: impl Into<String>, source: io::Error) -> Self {
        StepError::Io {
            what: what.into(),
            source,
        }
    }

    pub(super) fn invalid(message: impl Into<String>) -> Self {
        StepError::Invalid(message.into())
    }
}

// The layer-image path (`driver/mountable.rs`, owned elsewhere) speaks in
// messages; its calls into the driver give it theirs.
impl From<StepError> for String {
    fn from(e: StepError) -> String {
        kiln_common::errors::chain(&e)
    }
}

/// Why a base image (`FROM`, `COPY --from=<image>`) could not be had.
#[derive(Debug, thiserror::Error)]
pub enum BaseError {
    #[error(transparent)]
    Reference(#[from] crate::registry::reference::ReferenceError),
    #[error(transparent)]
    Registry(#[from] crate::registry::RegistryError),
    /// The registry did not answer for a base the cache could not supply;
    /// `hint` says what would build without it (cached_bases).
    /// (Boxed: keeps every driver `Result` small.)
    #[error("{source} ({hint})")]
    RegistryUnavailable {
        #[source]
        source: Box<crate::registry::RegistryError>,
        hint: String,
    },
    #[error(transparent)]
    Layout(#[from] crate::oci::layout::LayoutError),
    #[error(transparent)]
    Archive(#[from] crate::oci::archive::ArchiveError),
    #[error("image config: {0}")]
    Config(#[source] serde_json::Error),
    #[error("manifest has {manifest} layers but the config lists {diff_ids} diff_ids")]
    LayerCount { manifest: usize, diff_ids: usize },
    #[error("was not resolved")]
    NotResolved,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Plan(#[from] crate::plan::PlanError),
    /// (Boxed: a step's error is large, and every `Result` of the driver
    /// carries this type.)
    #[error("{file}:{line}: {instruction}: {source}")]
    Step {
        file: String,
        line: usize,
        instruction: String,
        #[source]
        source: Box<StepError>,
    },
    /// ONBUILD triggers of a base that do not plan.
    #[error("{file}:{line}: {instruction}: {source}")]
    Trigger {
        file: String,
        line: usize,
        instruction: String,
        #[source]
        source: Box<crate::plan::PlanError>,
    },
    #[error("base image {reference}: {source}")]
    Base {
        reference: String,
        #[source]
        source: BaseError,
    },
    /// Setting the build up failed: `what` names the step (directory,
    /// store, runtime, registry client, ...).
    #[error("{what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The build may not run here, or its flags contradict each other.
    #[error("{0}")]
    Refused(String),
    /// The push permission check before the build.
    #[error(
        "push permission check for destination {destination} (before the build; \
         --skip-push-permission-check skips it): {source}"
    )]
    PushPermission {
        destination: String,
        #[source]
        source: crate::registry::RegistryError,
    },
    /// The driver broke one of its own invariants (a stage used before it
    /// was built).
    #[error("internal error: {0}")]
    Internal(String),
    /// Writing an output: `what` names it (a destination, a path).
    #[error("writing the image: {what}: {source}")]
    Output {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A build that was cancelled because another stage failed.
    #[error("cancelled: another stage failed")]
    Cancelled,
}

impl BuildError {
    pub(super) fn setup(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BuildError::Setup {
            what: what.into(),
            source: source.into(),
        }
    }

    pub(super) fn output(
        what: impl Into<String>,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        BuildError::Output {
            what: what.into(),
            source: source.into(),
        }
    }

    /// The executor's exit status for this error: a failed RUN step's own
    /// exit code (128 + the signal when a signal killed it, as shells
    /// report it), as Kaniko and Buildah do, so CI jobs can branch on it;
    /// 1 for every other build error.
    pub fn exit_code(&self) -> u8 {
        match self.run_status() {
            Some(ExitStatus::Code(code)) => {
                u8::try_from(code).ok().filter(|c| *c != 0).unwrap_or(1)
            }
            Some(ExitStatus::Signal(signal)) => u8::try_from(128 + signal).unwrap_or(1),
            None => 1,
        }
    }

    /// The status of the RUN command that failed the build, if one did.
    pub fn run_status(&self) -> Option<ExitStatus> {
        match self {
            BuildError::Step { source, .. } => match source.as_ref() {
                StepError::CommandFailed { status, .. } => Some(*status),
                _ => None,
            },
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::error::Error as _;

    #[test]
    fn outcomes_serialise_as_the_reports_cache_column() {
        for (outcome, text) in [
            (StepOutcome::Hit, "hit"),
            (StepOutcome::Miss, "miss"),
            (StepOutcome::Run, "run"),
            (StepOutcome::None, "none"),
        ] {
            assert_eq!(serde_json::to_value(outcome).unwrap(), text);
            assert_eq!(outcome.to_string(), text);
        }
    }

    #[test]
    fn a_step_error_names_the_line_and_keeps_its_cause() {
        let e = BuildError::Step {
            file: "Dockerfile".into(),
            line: 3,
            instruction: "COPY a /b".into(),
            source: Box::new(StepError::io("creating /b", io::Error::other("disk full"))),
        };
        assert_eq!(
            e.to_string(),
            "Dockerfile:3: COPY a /b: creating /b: disk full"
        );
        let step = e.source().expect("the step error");
        assert_eq!(
            step.source().expect("the io error").to_string(),
            "disk full"
        );
        // The report prints each cause once.
        assert_eq!(kiln_common::errors::chain(&e), e.to_string());
        assert_eq!(e.exit_code(), 1);
        assert_eq!(e.run_status(), None);
    }
}
