//! The Dockerfile front end: reads Dockerfile text into typed instructions
//! ([`Instruction`]), without expanding variables (the planner in
//! [`crate::plan`] does that, since it needs the build arguments and stage
//! environments). It follows Docker/BuildKit's parser: parser directives,
//! comments, continuations, heredocs, exec and shell forms and every
//! instruction's flags. Every failure is an [`Error`] naming the file, line
//! and column; no input makes it panic.

mod ast;
mod lines;
mod mount;
pub mod shell;
mod words;

pub use ast::{
    Add, ArgDecl, Command, Copy, From, Healthcheck, Instruction, KeyValue, Located, Network,
    PortSpec, Protocol, Run, Security,
};
pub use lines::{Directives, Heredoc, Segment};
pub use mount::{Mount, MountType, Sharing};
pub use shell::{ExpandError, Vars};

use std::fmt;
use std::path::{Path, PathBuf};

/// What is wrong, without the location.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ErrorKind {
    #[error("unknown instruction: {0}")]
    UnknownInstruction(String),
    #[error("unknown flag --{flag} for {instruction}")]
    UnknownFlag { instruction: String, flag: String },
    #[error("duplicate flag specified: --{0}")]
    DuplicateFlag(String),
    #[error("missing a value on flag --{0}")]
    MissingFlagValue(String),
    #[error("invalid value {value:?} for flag --{flag}: {reason}")]
    BadFlagValue {
        flag: String,
        value: String,
        reason: String,
    },
    #[error("unterminated heredoc <<{0}: no line with the delimiter {0}")]
    UnterminatedHeredoc(String),
    #[error("invalid escape token {0:?}: it must be \\ or `")]
    InvalidEscape(String),
    #[error("only one {0} parser directive can be used")]
    DuplicateDirective(String),
    #[error("{0}")]
    Syntax(String),
    #[error("variable substitution failed: {0}")]
    Expansion(#[from] ExpandError),
    #[error(
        "invalid name for build stage: {0:?}, name can't start with a number or contain symbols"
    )]
    InvalidStageName(String),
    #[error("duplicate name for build stage: {0:?}")]
    DuplicateStageName(String),
    #[error("stage {0:?} is not defined in this Dockerfile")]
    UndefinedStage(String),
    #[error(
        "variable expansion is not supported for --from ({0:?}); define a stage with FROM using a global ARG instead"
    )]
    FromExpansion(String),
    #[error(
        "cannot copy from stage {stage:?}, it needs to be defined before current stage {current:?}"
    )]
    StageDefinedLater { stage: String, current: String },
    #[error("circular dependency between stages: {}", .0.join(" -> "))]
    Cycle(Vec<String>),
    #[error("{0} is not allowed before the first FROM (only ARG is)")]
    BeforeFrom(String),
    #[error("the Dockerfile has no FROM instruction")]
    NoFrom,
    #[error("invalid port specification {0:?}")]
    InvalidPort(String),
    #[error("base image name {0:?} is empty after variable expansion")]
    EmptyBase(String),
}

/// A Dockerfile error with its location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub file: PathBuf,
    pub line: usize,
    pub column: usize,
    pub kind: ErrorKind,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}:{}:{}: {}",
            self.file.display(),
            self.line,
            self.column,
            self.kind
        )
    }
}

impl std::error::Error for Error {}

/// A parsed Dockerfile: its directives and instructions in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dockerfile {
    pub file: PathBuf,
    pub directives: Directives,
    pub instructions: Vec<Located>,
}

/// Parses Dockerfile text; `file` is only used in error messages.
pub fn parse(source: &str, file: &Path) -> Result<Dockerfile, Error> {
    let (directives, lines) = lines::logical_lines(source, file)?;
    let mut instructions = Vec::with_capacity(lines.len());
    for line in lines {
        let parsed = ast::parse_instruction(&line.text, line.heredocs.clone(), directives.escape)
            .map_err(|kind| {
            let (line_no, column) = error_position(&line.text, &line.segments, &kind)
                .unwrap_or((line.line, line.column));
            Error {
                file: file.to_path_buf(),
                line: line_no,
                column,
                kind,
            }
        })?;
        instructions.push(Located {
            line: line.line,
            column: line.column,
            original: line.text,
            segments: line.segments,
            instruction: parsed,
        });
    }
    Ok(Dockerfile {
        file: file.to_path_buf(),
        directives,
        instructions,
    })
}

/// For flag errors, the physical line and column of the flag, so the error
/// points at the flag rather than at the instruction (also on continued
/// lines).
pub(crate) fn error_position(
    text: &str,
    segments: &[Segment],
    kind: &ErrorKind,
) -> Option<(usize, usize)> {
    let flag = match kind {
        ErrorKind::UnknownFlag { flag, .. }
        | ErrorKind::DuplicateFlag(flag)
        | ErrorKind::MissingFlagValue(flag)
        | ErrorKind::BadFlagValue { flag, .. } => flag,
        _ => return None,
    };
    let needle = format!("--{flag}");
    // A duplicate is reported at its second occurrence.
    let byte = if matches!(kind, ErrorKind::DuplicateFlag(_)) {
        text.match_indices(&needle).nth(1).map(|(i, _)| i)
    } else {
        text.find(&needle)
    }?;
    lines::locate(segments, text, byte)
}
