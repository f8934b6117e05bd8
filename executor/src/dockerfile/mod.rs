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
    #[error("invalid UTF-8 (byte 0x{0:02x}): only comment lines may hold bytes that are not UTF-8")]
    InvalidUtf8(u8),
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

/// Parses a Dockerfile as read from disk: bytes, as BuildKit reads it.
///
/// A byte sequence that is not UTF-8 is harmless in a comment line (the
/// line is dropped; its text reaches nothing) and an error naming its line
/// and column anywhere else: instructions, arguments, heredoc bodies and
/// parser directives are text kiln has to interpret, and a silently
/// replaced byte would change what a step does.
pub fn parse_bytes(source: &[u8], file: &Path) -> Result<Dockerfile, Error> {
    let text = match std::str::from_utf8(source) {
        Ok(text) => return parse(text, file),
        Err(_) => decode_lossily(source),
    };
    let mut comments = Vec::new();
    let split = lines::logical_lines_noting_comments(&text.text, file, &mut |n| comments.push(n));
    let first_invalid = |only_outside_comments: bool| {
        text.invalid
            .iter()
            .find(|(line, _, _)| !only_outside_comments || !comments.contains(line))
            .map(|&(line, column, byte)| Error {
                file: file.to_path_buf(),
                line,
                column,
                kind: ErrorKind::InvalidUtf8(byte),
            })
    };
    let (directives, lines) = match split {
        Ok(split) => split,
        // The replaced bytes may be what broke the split: report them.
        Err(e) => return Err(first_invalid(false).unwrap_or(e)),
    };
    if let Some(e) = first_invalid(true) {
        return Err(e);
    }
    parse_lines(directives, lines, file)
}

/// Text with every invalid sequence replaced by U+FFFD, and where the first
/// one of each physical line was: (line, column, first byte), 1-based, the
/// column counted in characters as all columns are.
struct Lossy {
    text: String,
    invalid: Vec<(usize, usize, u8)>,
}

fn decode_lossily(source: &[u8]) -> Lossy {
    let mut text = String::with_capacity(source.len());
    let mut invalid = Vec::new();
    for (n, line) in source.split(|&b| b == b'\n').enumerate() {
        if n > 0 {
            text.push('\n');
        }
        let mut rest = line;
        let mut column = 1;
        let mut noted = false;
        loop {
            match std::str::from_utf8(rest) {
                Ok(valid) => {
                    text.push_str(valid);
                    break;
                }
                Err(e) => {
                    let (valid, after) = rest.split_at(e.valid_up_to());
                    // Checked by from_utf8 just now.
                    let valid = std::str::from_utf8(valid).unwrap_or_default();
                    text.push_str(valid);
                    column += valid.chars().count();
                    if !noted {
                        invalid.push((n + 1, column, after[0]));
                        noted = true;
                    }
                    text.push(char::REPLACEMENT_CHARACTER);
                    column += 1;
                    let skip = e.error_len().unwrap_or(after.len());
                    rest = &after[skip..];
                }
            }
        }
    }
    Lossy { text, invalid }
}

/// Parses Dockerfile text; `file` is only used in error messages.
pub fn parse(source: &str, file: &Path) -> Result<Dockerfile, Error> {
    let (directives, lines) = lines::logical_lines(source, file)?;
    parse_lines(directives, lines, file)
}

fn parse_lines(
    directives: Directives,
    lines: Vec<lines::LogicalLine>,
    file: &Path,
) -> Result<Dockerfile, Error> {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_of(bytes: &[u8]) -> Result<Dockerfile, Error> {
        parse_bytes(bytes, Path::new("Dockerfile"))
    }

    #[test]
    fn bytes_that_are_not_utf8_are_fine_in_comments() {
        let df = parse_of(
            b"# caf\xe9\nFROM scratch\n  # \xff\xfe\nRUN a \\\n# \xc3 in a continuation\n b\n",
        )
        .unwrap();
        assert_eq!(df.instructions.len(), 2);
        assert_eq!(df.instructions[1].original, "RUN a  b");
    }

    #[test]
    fn bytes_that_are_not_utf8_elsewhere_name_line_and_column() {
        let at = |bytes: &[u8]| {
            let e = parse_of(bytes).unwrap_err();
            assert_eq!(e.kind, ErrorKind::InvalidUtf8(e.kind_byte()));
            (e.line, e.column)
        };
        assert_eq!(at(b"FROM scratch\nRUN echo caf\xe9\n"), (2, 13));
        // Columns count characters, as everywhere else.
        assert_eq!(at(b"FROM scratch\nLABEL x=\xc3\xa9\xff\n"), (2, 10));
        // Heredoc bodies are content, even where a line starts with '#'.
        assert_eq!(at(b"FROM scratch\nRUN <<EOF\n# \xff\nEOF\n"), (3, 3));
        // A parser directive is interpreted: not a comment.
        assert_eq!(at(b"# syntax=x\xff\nFROM scratch\n"), (1, 11));
        // An incomplete sequence at the very end.
        assert_eq!(at(b"FROM scratch\xe2\x82"), (1, 13));
    }

    impl Error {
        fn kind_byte(&self) -> u8 {
            match self.kind {
                ErrorKind::InvalidUtf8(b) => b,
                _ => panic!("not an encoding error: {self}"),
            }
        }
    }

    #[test]
    fn valid_text_parses_as_before() {
        let text = "FROM scratch\n# caf\u{e9}\nRUN echo \u{fffd}\n";
        assert_eq!(
            parse_of(text.as_bytes()).unwrap(),
            parse(text, Path::new("Dockerfile")).unwrap()
        );
    }
}
