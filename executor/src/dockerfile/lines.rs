//! Turns Dockerfile text into logical lines: parser directives at the top,
//! comments and blank lines dropped, line continuations joined (also across
//! comment and blank lines, as BuildKit does) and heredoc bodies attached to
//! the RUN, COPY and ADD lines that open them. Line numbers are 1-based and
//! name the physical line where the instruction starts.

use super::words::split_words;
use super::{Error, ErrorKind};
use serde::Serialize;
use std::path::Path;

/// The parser directives found at the top of a Dockerfile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Directives {
    pub syntax: Option<String>,
    pub escape: char,
    pub check: Option<String>,
}

impl Default for Directives {
    fn default() -> Self {
        Directives {
            syntax: None,
            escape: '\\',
            check: None,
        }
    }
}

/// A here-document attached to an instruction (`<<EOF`, `<<-EOF`,
/// `<<"EOF"`, `<<'EOF'`, optionally with a file descriptor `3<<EOF`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Heredoc {
    pub name: String,
    /// The body, each line ending in `\n`; leading tabs already removed
    /// for `<<-`.
    pub content: String,
    /// False when the delimiter was quoted: the body is used verbatim.
    pub expand: bool,
    /// True for `<<-`.
    pub chomp: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fd: Option<u32>,
}

/// One instruction's text with continuations joined.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogicalLine {
    pub line: usize,
    pub column: usize,
    pub text: String,
    pub heredocs: Vec<Heredoc>,
    /// Where each joined piece of `text` came from.
    pub segments: Vec<Segment>,
}

/// A piece of a logical line: its byte offset in the joined text and the
/// physical line and 1-based column it starts at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    pub offset: usize,
    pub line: usize,
    pub column: usize,
}

/// Maps a byte offset in a joined logical line back to the physical line
/// and column, so errors can point inside continued instructions.
pub fn locate(segments: &[Segment], text: &str, byte: usize) -> Option<(usize, usize)> {
    let seg = segments.iter().rev().find(|s| s.offset <= byte)?;
    let chars = text.get(seg.offset..byte)?.chars().count();
    Some((seg.line, seg.column + chars))
}

/// Splits `source` into directives and logical lines.
pub fn logical_lines(source: &str, file: &Path) -> Result<(Directives, Vec<LogicalLine>), Error> {
    logical_lines_noting_comments(source, file, &mut |_| {})
}

/// [`logical_lines`], calling `comment` with the 1-based number of every
/// physical line dropped as a comment (the only lines whose bytes reach
/// nothing: not an instruction, a heredoc body or a parser directive).
pub fn logical_lines_noting_comments(
    source: &str,
    file: &Path,
    comment: &mut dyn FnMut(usize),
) -> Result<(Directives, Vec<LogicalLine>), Error> {
    let source = source.strip_prefix('\u{feff}').unwrap_or(source);
    let physical: Vec<&str> = source
        .split('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .collect();
    let err = |line: usize, column: usize, kind: ErrorKind| Error {
        file: file.to_path_buf(),
        line,
        column,
        kind,
    };

    let mut directives = Directives::default();
    let mut seen: Vec<String> = Vec::new();
    let mut idx = 0;
    while idx < physical.len() {
        let Some((key, value)) = directive(physical[idx]) else {
            break;
        };
        if !matches!(key.as_str(), "syntax" | "escape" | "check") {
            // Unknown directives are comments, and end the directive block.
            break;
        }
        if seen.contains(&key) {
            return Err(err(idx + 1, 1, ErrorKind::DuplicateDirective(key)));
        }
        match key.as_str() {
            "escape" => {
                directives.escape = match value.as_str() {
                    "\\" => '\\',
                    "`" => '`',
                    _ => return Err(err(idx + 1, 1, ErrorKind::InvalidEscape(value))),
                }
            }
            "syntax" => directives.syntax = Some(value),
            _ => directives.check = Some(value),
        }
        seen.push(key);
        idx += 1;
    }

    let escape = directives.escape;
    let mut lines = Vec::new();
    while idx < physical.len() {
        let raw = physical[idx];
        let trimmed = raw.trim_start();
        idx += 1;
        if trimmed.starts_with('#') {
            comment(idx);
            continue;
        }
        if trimmed.is_empty() {
            continue;
        }
        let line = idx;
        let column = raw.chars().count() - trimmed.chars().count() + 1;
        let (mut text, mut continues) = strip_continuation(trimmed, escape);
        let mut segments = vec![Segment {
            offset: 0,
            line,
            column,
        }];
        while continues && idx < physical.len() {
            let next = physical[idx];
            idx += 1;
            let next_trimmed = next.trim_start();
            if next_trimmed.starts_with('#') {
                comment(idx);
                continue;
            }
            if next_trimmed.is_empty() {
                continue;
            }
            let (part, more) = strip_continuation(next, escape);
            segments.push(Segment {
                offset: text.len(),
                line: idx,
                column: 1,
            });
            text.push_str(&part);
            continues = more;
        }
        let keyword = text
            .split_whitespace()
            .next()
            .unwrap_or("")
            .to_ascii_lowercase();
        let mut heredocs = Vec::new();
        // Most lines have no `<<`; skip the word split for them.
        if text.contains("<<") && matches!(keyword.as_str(), "run" | "copy" | "add") {
            for mut doc in heredoc_markers(&text, escape) {
                let mut terminated = false;
                while idx < physical.len() {
                    let body_line = physical[idx];
                    idx += 1;
                    let candidate = if doc.chomp {
                        body_line.trim_start_matches('\t')
                    } else {
                        body_line
                    };
                    if candidate == doc.name {
                        terminated = true;
                        break;
                    }
                    doc.content.push_str(candidate);
                    doc.content.push('\n');
                }
                if !terminated {
                    return Err(err(line, column, ErrorKind::UnterminatedHeredoc(doc.name)));
                }
                heredocs.push(doc);
            }
        }
        lines.push(LogicalLine {
            line,
            column,
            text: text.trim_end().to_string(),
            heredocs,
            segments,
        });
    }
    Ok((directives, lines))
}

/// Recognises `# key=value` (BuildKit's `^#\s*([a-zA-Z][a-zA-Z0-9]*)\s*=\s*(.+?)\s*$`).
fn directive(line: &str) -> Option<(String, String)> {
    let rest = line.trim_start().strip_prefix('#')?.trim_start();
    let key_len = rest
        .char_indices()
        .find(|(i, c)| !(c.is_ascii_alphabetic() || (*i > 0 && c.is_ascii_digit())))
        .map_or(rest.len(), |(i, _)| i);
    if key_len == 0 {
        return None;
    }
    let key = &rest[..key_len];
    let value = rest[key_len..].trim_start().strip_prefix('=')?.trim();
    if value.is_empty() {
        return None;
    }
    Some((key.to_ascii_lowercase(), value.to_string()))
}

/// Removes a trailing escape character (optionally followed by spaces or
/// tabs) and says whether the line continues.
fn strip_continuation(line: &str, escape: char) -> (String, bool) {
    let without_ws = line.trim_end_matches([' ', '\t']);
    match without_ws.strip_suffix(escape) {
        Some(rest) => (rest.to_string(), true),
        None => (line.to_string(), false),
    }
}

/// The heredoc markers of a line, in order, with empty bodies.
pub(crate) fn heredoc_markers(text: &str, escape: char) -> Vec<Heredoc> {
    split_words(text, escape)
        .iter()
        .filter_map(|w| parse_marker(w))
        .collect()
}

fn parse_marker(word: &str) -> Option<Heredoc> {
    let digits = word.chars().take_while(char::is_ascii_digit).count();
    let rest = word[digits..].strip_prefix("<<")?;
    let (chomp, rest) = match rest.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, rest),
    };
    if rest.is_empty() || rest.contains('<') {
        return None;
    }
    let quoted = rest.contains(['\'', '"']);
    let name: String = rest.chars().filter(|c| *c != '\'' && *c != '"').collect();
    if name.is_empty() || name.contains(char::is_whitespace) {
        return None;
    }
    let fd = if digits > 0 {
        word[..digits].parse().ok()
    } else {
        None
    };
    Some(Heredoc {
        name,
        content: String::new(),
        expand: !quoted,
        chomp,
        fd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(src: &str) -> (Directives, Vec<LogicalLine>) {
        logical_lines(src, Path::new("Dockerfile")).unwrap()
    }

    fn fail(src: &str) -> Error {
        logical_lines(src, Path::new("Dockerfile")).unwrap_err()
    }

    #[test]
    fn directives_are_read_only_at_the_top() {
        let (d, l) =
            lines("# syntax=docker/dockerfile:1\n# ESCAPE = `\n# check=skip=all\nFROM a\n");
        assert_eq!(d.syntax.as_deref(), Some("docker/dockerfile:1"));
        assert_eq!(d.escape, '`');
        assert_eq!(d.check.as_deref(), Some("skip=all"));
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].line, 4);

        let (d, _) = lines("# a comment\n# escape=`\nFROM a\n");
        assert_eq!(d.escape, '\\', "a comment ends the directive block");
        let (d, _) = lines("\n# escape=`\nFROM a\n");
        assert_eq!(d.escape, '\\', "a blank line ends the directive block");
        let (d, _) = lines("# unknown=x\n# escape=`\nFROM a\n");
        assert_eq!(d.escape, '\\', "an unknown directive ends the block");
        let (d, _) = lines("FROM a\n# escape=`\n");
        assert_eq!(d.escape, '\\');
    }

    #[test]
    fn bad_or_duplicate_directives_are_errors() {
        assert!(matches!(
            fail("# escape=x\nFROM a").kind,
            ErrorKind::InvalidEscape(_)
        ));
        let e = fail("# escape=\\\n# escape=`\nFROM a");
        assert!(matches!(e.kind, ErrorKind::DuplicateDirective(_)));
        assert_eq!(e.line, 2);
    }

    #[test]
    fn continuations_join_across_comments_and_blank_lines() {
        let (_, l) = lines("  run echo a \\\n# comment\n\n     b \\  \n c\nFROM x\n");
        assert_eq!(l[0].text, "run echo a      b  c");
        assert_eq!((l[0].line, l[0].column), (1, 3));
        assert_eq!(l[1].line, 6);
    }

    #[test]
    fn offsets_in_joined_lines_map_back_to_physical_positions() {
        let (_, l) = lines("FROM a\n  COPY --link \\\n    --bogus=1 a b\n");
        let copy = &l[1];
        let byte = copy.text.find("--bogus").unwrap();
        assert_eq!(locate(&copy.segments, &copy.text, byte), Some((3, 5)));
        assert_eq!(locate(&copy.segments, &copy.text, 0), Some((2, 3)));
    }

    #[test]
    fn backtick_escape_continues_lines_and_backslash_does_not() {
        let (_, l) = lines("# escape=`\nRUN dir c:\\ `\n  /w\nFROM x\\\n");
        assert_eq!(l[0].text, "RUN dir c:\\   /w");
        assert_eq!(l[1].text, "FROM x\\");
    }

    #[test]
    fn crlf_and_bom_are_accepted() {
        let (_, l) = lines("\u{feff}FROM a\r\nRUN b \\\r\n c\r\n");
        assert_eq!(l[0].text, "FROM a");
        assert_eq!(l[1].text, "RUN b  c");
    }

    #[test]
    fn heredocs_collect_bodies_in_order() {
        let src = "RUN <<A cat - 3<<-'B'\nline $x\nA\n\tindented\n\tB\nCOPY <<\"C\" /c\nhi\nC\n";
        let (_, l) = lines(src);
        assert_eq!(l.len(), 2);
        let docs = &l[0].heredocs;
        assert_eq!(docs[0].name, "A");
        assert_eq!(docs[0].content, "line $x\n");
        assert!(docs[0].expand && !docs[0].chomp);
        assert_eq!(docs[1].name, "B");
        assert_eq!(docs[1].content, "indented\n");
        assert!(!docs[1].expand && docs[1].chomp);
        assert_eq!(docs[1].fd, Some(3));
        assert_eq!(l[1].heredocs[0].name, "C");
        assert!(!l[1].heredocs[0].expand);
        assert_eq!(l[1].line, 6);
    }

    #[test]
    fn heredoc_markers_are_only_read_for_run_copy_add() {
        let (_, l) = lines("LABEL a=<<EOF\nFROM b\n");
        assert_eq!(l.len(), 2);
        let (_, l) = lines("RUN echo '<<EOF'\nFROM b\n");
        assert!(l[0].heredocs.is_empty());
    }

    #[test]
    fn unterminated_heredoc_is_an_error_naming_the_line() {
        let e = fail("FROM a\nRUN <<EOF\necho\n");
        assert_eq!(e.kind, ErrorKind::UnterminatedHeredoc("EOF".into()));
        assert_eq!(e.line, 2);
    }
}
