//! `.dockerignore` handling with Docker's semantics (moby's patternmatcher):
//! comments and blank lines skipped, patterns trimmed and path-cleaned, a
//! leading `/` ignored, Go `filepath.Match` wildcards (`*`, `?`, `[...]`,
//! `\` escapes) plus `**` for any number of directories, `!` exceptions, the
//! last matching pattern wins, and a pattern that matches a directory
//! excludes everything under it. `<Dockerfile>.dockerignore` beside the
//! Dockerfile takes precedence over `<context>/.dockerignore`. Walkers use
//! [`DockerIgnore::may_contain_included`] to know when a whole excluded
//! directory can be skipped.

use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum IgnoreError {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}:{line}: invalid pattern {pattern:?}: {reason}", path.display())]
    BadPattern {
        path: PathBuf,
        line: usize,
        pattern: String,
        reason: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Char(char),
    /// `*`: any run of characters other than `/`.
    Star,
    /// `?`: one character other than `/`.
    Question,
    /// `[...]`: ranges, possibly negated with `^`.
    Class {
        negated: bool,
        ranges: Vec<(char, char)>,
    },
    /// `**/` (or `**` inside a segment): zero or more whole directories.
    AnyDirs,
    /// `**` at the end: anything.
    AnyRest,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Pattern {
    text: String,
    exception: bool,
    tokens: Vec<Token>,
}

/// The parsed ignore rules of one build context.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DockerIgnore {
    patterns: Vec<Pattern>,
    /// The file the rules came from, if any.
    pub source: Option<PathBuf>,
}

/// Lexically cleans a slash path as Go's `path.Clean` (no filesystem access).
fn clean(path: &str) -> String {
    let rooted = path.starts_with('/');
    let mut parts: Vec<&str> = Vec::new();
    for seg in path.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                if parts.last().is_some_and(|p| *p != "..") {
                    parts.pop();
                } else if !rooted {
                    parts.push("..");
                }
            }
            s => parts.push(s),
        }
    }
    let joined = parts.join("/");
    match (rooted, joined.is_empty()) {
        (true, _) => format!("/{joined}"),
        (false, true) => ".".into(),
        (false, false) => joined,
    }
}

fn compile(pattern: &str) -> Result<Vec<Token>, &'static str> {
    let chars: Vec<char> = pattern.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        match chars[i] {
            '*' if chars.get(i + 1) == Some(&'*') => {
                i += 2;
                if chars.get(i) == Some(&'/') {
                    i += 1;
                }
                tokens.push(if i >= chars.len() {
                    Token::AnyRest
                } else {
                    Token::AnyDirs
                });
                continue;
            }
            '*' => tokens.push(Token::Star),
            '?' => tokens.push(Token::Question),
            '\\' => {
                i += 1;
                tokens.push(Token::Char(chars.get(i).copied().unwrap_or('\\')));
            }
            '[' => {
                i += 1;
                let negated = chars.get(i) == Some(&'^');
                if negated {
                    i += 1;
                }
                let mut ranges = Vec::new();
                let mut closed = false;
                while i < chars.len() {
                    let mut c = chars[i];
                    if c == ']' && !ranges.is_empty() {
                        closed = true;
                        break;
                    }
                    if c == '\\' {
                        i += 1;
                        c = *chars
                            .get(i)
                            .ok_or("unterminated escape in character class")?;
                    }
                    if chars.get(i + 1) == Some(&'-') && chars.get(i + 2).is_some_and(|n| *n != ']')
                    {
                        let mut hi = chars[i + 2];
                        i += 2;
                        if hi == '\\' {
                            i += 1;
                            hi = *chars
                                .get(i)
                                .ok_or("unterminated escape in character class")?;
                        }
                        if hi < c {
                            return Err("invalid character range");
                        }
                        ranges.push((c, hi));
                    } else {
                        ranges.push((c, c));
                    }
                    i += 1;
                }
                if !closed {
                    return Err("unterminated character class");
                }
                tokens.push(Token::Class { negated, ranges });
            }
            c => tokens.push(Token::Char(c)),
        }
        i += 1;
    }
    Ok(tokens)
}

/// Whether one `/`-separated path matches one pattern, with the rules of a
/// `.dockerignore` line (Go's `filepath.Match` plus `**`). COPY and ADD
/// source wildcards use it too, so both agree on what a pattern means.
pub fn pattern_matches(pattern: &str, path: &str) -> Result<bool, &'static str> {
    let tokens = compile(pattern)?;
    let path: Vec<char> = path.chars().collect();
    Ok(matches(&tokens, &path))
}

/// Whether `tokens` match the whole of `path`. Memoised on (token, char)
/// positions so hostile patterns such as `*a*a*a*a*b` stay polynomial.
fn matches(tokens: &[Token], path: &[char]) -> bool {
    let mut failed = vec![false; (tokens.len() + 1) * (path.len() + 1)];
    matches_at(tokens, path, 0, 0, &mut failed)
}

fn matches_at(tokens: &[Token], path: &[char], ti: usize, pi: usize, failed: &mut [bool]) -> bool {
    let slot = ti * (path.len() + 1) + pi;
    if failed[slot] {
        return false;
    }
    let rest = &path[pi..];
    let ok = match tokens.get(ti) {
        None => rest.is_empty(),
        Some(Token::Char(c)) => {
            rest.first() == Some(c) && matches_at(tokens, path, ti + 1, pi + 1, failed)
        }
        Some(Token::Question) => {
            rest.first().is_some_and(|c| *c != '/')
                && matches_at(tokens, path, ti + 1, pi + 1, failed)
        }
        Some(Token::Class { negated, ranges }) => {
            rest.first().is_some_and(|c| {
                *c != '/' && ranges.iter().any(|(lo, hi)| lo <= c && c <= hi) != *negated
            }) && matches_at(tokens, path, ti + 1, pi + 1, failed)
        }
        Some(Token::Star) => {
            let run = rest.iter().take_while(|c| **c != '/').count();
            (0..=run).any(|n| matches_at(tokens, path, ti + 1, pi + n, failed))
        }
        Some(Token::AnyRest) => true,
        Some(Token::AnyDirs) => {
            // Zero directories, or any prefix ending just after a `/`.
            matches_at(tokens, path, ti + 1, pi, failed)
                || (pi..path.len())
                    .filter(|&i| path[i] == '/')
                    .any(|i| matches_at(tokens, path, ti + 1, i + 1, failed))
        }
    };
    if !ok {
        failed[slot] = true;
    }
    ok
}

impl Pattern {
    /// True if the pattern matches `path` or one of its parent directories.
    fn matches_or_parent(&self, path: &str) -> bool {
        let chars: Vec<char> = path.chars().collect();
        if matches(&self.tokens, &chars) {
            return true;
        }
        chars
            .iter()
            .enumerate()
            .filter(|(_, c)| **c == '/')
            .any(|(i, _)| matches(&self.tokens, &chars[..i]))
    }
}

/// The ignore file's text; an invalid UTF-8 sequence is an error naming
/// its line (no pattern could match a context path with it: those are
/// UTF-8).
fn utf8(bytes: Vec<u8>) -> std::io::Result<String> {
    String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let line = e.as_bytes()[..at].iter().filter(|&&b| b == b'\n').count() + 1;
        std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("invalid UTF-8 on line {line}"),
        )
    })
}

impl DockerIgnore {
    /// Reads `<dockerfile>.dockerignore` if it exists beside the Dockerfile,
    /// else `<context>/.dockerignore`, else no rules.
    pub fn load(context: &Path, dockerfile: &Path) -> Result<DockerIgnore, IgnoreError> {
        let mut candidates = Vec::new();
        if let Some(name) = dockerfile.file_name() {
            let mut specific = name.to_os_string();
            specific.push(".dockerignore");
            candidates.push(dockerfile.with_file_name(specific));
        }
        candidates.push(context.join(".dockerignore"));
        for path in candidates {
            // Only a regular file: a FIFO under this name would block.
            match crate::sources::context::read_regular_file(&path).and_then(utf8) {
                Ok(text) => {
                    let mut rules = DockerIgnore::parse(&text, &path)?;
                    rules.source = Some(path);
                    return Ok(rules);
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(source) => return Err(IgnoreError::Read { path, source }),
            }
        }
        Ok(DockerIgnore::default())
    }

    /// Parses ignore-file text; `path` is only used in error messages.
    pub fn parse(text: &str, path: &Path) -> Result<DockerIgnore, IgnoreError> {
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut patterns = Vec::new();
        for (n, raw) in text.lines().enumerate() {
            if raw.starts_with('#') {
                continue;
            }
            let mut pattern = raw.trim();
            if pattern.is_empty() {
                continue;
            }
            let exception = pattern.starts_with('!');
            if exception {
                pattern = pattern[1..].trim();
            }
            let mut cleaned = if pattern.is_empty() {
                String::new()
            } else {
                clean(pattern)
            };
            if cleaned.len() > 1 && cleaned.starts_with('/') {
                cleaned.remove(0);
            }
            let tokens = compile(&cleaned).map_err(|reason| IgnoreError::BadPattern {
                path: path.to_path_buf(),
                line: n + 1,
                pattern: raw.to_string(),
                reason,
            })?;
            patterns.push(Pattern {
                text: cleaned,
                exception,
                tokens,
            });
        }
        Ok(DockerIgnore {
            patterns,
            source: None,
        })
    }

    /// The cleaned patterns, `!` kept on exceptions.
    pub fn patterns(&self) -> Vec<String> {
        self.patterns
            .iter()
            .map(|p| {
                if p.exception {
                    format!("!{}", p.text)
                } else {
                    p.text.clone()
                }
            })
            .collect()
    }

    /// Whether `rel_path` (relative to the context, `/`-separated) is
    /// excluded from the build context.
    pub fn is_excluded(&self, rel_path: &str) -> bool {
        let path = clean(rel_path.trim_start_matches('/'));
        if path == "." {
            return false;
        }
        let mut excluded = false;
        for p in &self.patterns {
            // Only patterns that can change the answer need evaluating.
            if p.exception != excluded {
                continue;
            }
            if p.matches_or_parent(&path) {
                excluded = !p.exception;
            }
        }
        excluded
    }

    /// Whether some path under the directory `rel_dir` may be included even
    /// though the directory itself is excluded (an exception could apply
    /// below it). When false, a walker can skip the whole directory.
    pub fn may_contain_included(&self, rel_dir: &str) -> bool {
        let dir = clean(rel_dir.trim_start_matches('/'));
        let dir_segments: Vec<&str> = if dir == "." {
            Vec::new()
        } else {
            dir.split('/').collect()
        };
        self.patterns.iter().filter(|p| p.exception).any(|p| {
            if p.tokens
                .iter()
                .any(|t| matches!(t, Token::AnyDirs | Token::AnyRest))
            {
                return true;
            }
            let pattern_segments: Vec<&str> = p.text.split('/').collect();
            dir_segments
                .iter()
                .zip(&pattern_segments)
                .all(|(d, pat)| match compile(pat) {
                    Ok(tokens) => matches(&tokens, &d.chars().collect::<Vec<_>>()),
                    Err(_) => true,
                })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> DockerIgnore {
        DockerIgnore::parse(text, Path::new(".dockerignore")).unwrap()
    }

    #[test]
    fn plain_names_exclude_the_path_and_everything_below() {
        let r = rules("node_modules\n/build/\n./tmp/../cache\n");
        assert!(r.is_excluded("node_modules"));
        assert!(r.is_excluded("node_modules/a/b.js"));
        assert!(
            !r.is_excluded("src/node_modules"),
            "patterns are anchored at the context root"
        );
        assert!(r.is_excluded("build/out.o"));
        assert!(r.is_excluded("cache/x"));
        assert!(!r.is_excluded("tmp/x"));
        assert!(!r.is_excluded("."));
        assert_eq!(r.patterns(), vec!["node_modules", "build", "cache"]);
    }

    #[test]
    fn star_and_question_do_not_cross_slashes() {
        let r = rules("*.md\n?.txt\ndocs/*/draft\n");
        assert!(r.is_excluded("README.md"));
        assert!(!r.is_excluded("docs/README.md"));
        assert!(r.is_excluded("a.txt"));
        assert!(!r.is_excluded("ab.txt"));
        assert!(r.is_excluded("docs/v1/draft/x"));
        assert!(!r.is_excluded("docs/v1/v2/draft"));
    }

    #[test]
    fn double_star_matches_any_number_of_directories() {
        let r = rules("**/*.log\nsecret/**\n**\n!keep/**\n");
        assert!(r.is_excluded("a.log"));
        assert!(r.is_excluded("x/y/z.log"));
        assert!(r.is_excluded("secret/a/b"));
        assert!(!r.is_excluded("keep/a"));
        let s = rules("a/**/b\n");
        assert!(s.is_excluded("a/b"));
        assert!(s.is_excluded("a/x/y/b"));
        assert!(!s.is_excluded("a/xb"));
    }

    #[test]
    fn exceptions_reinclude_and_the_last_match_wins() {
        let r = rules("*.md\n!README.md\nREADME*.md\n");
        assert!(r.is_excluded("CHANGES.md"));
        assert!(r.is_excluded("README.md"), "the later README*.md wins");
        let r = rules("docs\n!docs/keep.md\n");
        assert!(r.is_excluded("docs/other.md"));
        assert!(!r.is_excluded("docs/keep.md"));
    }

    #[test]
    fn classes_escapes_comments_and_whitespace() {
        let r = rules("# comment\n  \n  [a-c]x.bin  \n[^0-9]y\n\\*literal\n #not a comment\n");
        assert!(r.is_excluded("bx.bin"));
        assert!(!r.is_excluded("dx.bin"));
        assert!(r.is_excluded("ay"));
        assert!(!r.is_excluded("1y"));
        assert!(r.is_excluded("*literal"));
        assert!(!r.is_excluded("xliteral"));
        assert!(r.is_excluded("#not a comment"));
    }

    #[test]
    fn hostile_patterns_finish_quickly() {
        let r = rules(&format!("{}b\n", "*a".repeat(30)));
        let path = "a".repeat(200);
        let start = std::time::Instant::now();
        assert!(!r.is_excluded(&path));
        assert!(start.elapsed() < std::time::Duration::from_secs(2));
    }

    #[test]
    fn bad_patterns_are_errors_with_the_line() {
        let e = DockerIgnore::parse("ok\n[abc\n", Path::new("/ctx/.dockerignore")).unwrap_err();
        assert!(e.to_string().contains("/ctx/.dockerignore:2"), "{e}");
    }

    #[test]
    fn may_contain_included_tells_walkers_when_to_descend() {
        let r = rules("vendor\n!vendor/keep\n");
        assert!(r.may_contain_included("vendor"));
        assert!(!r.may_contain_included("other"));
        let none = rules("vendor\n");
        assert!(!none.may_contain_included("vendor"));
        let deep = rules("*\n!**/*.go\n");
        assert!(deep.may_contain_included("anything/at/all"));
        let wild = rules("*\n!src/*/main.rs\n");
        assert!(wild.may_contain_included("src"));
        assert!(wild.may_contain_included("src/app"));
        assert!(!wild.may_contain_included("lib"));
    }

    #[test]
    fn load_prefers_the_dockerfile_specific_ignore_file() {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path();
        std::fs::create_dir(ctx.join("sub")).unwrap();
        std::fs::write(ctx.join(".dockerignore"), "a\n").unwrap();
        std::fs::write(ctx.join("sub/app.Dockerfile"), "FROM x\n").unwrap();
        std::fs::write(ctx.join("sub/app.Dockerfile.dockerignore"), "b\n").unwrap();
        let specific = DockerIgnore::load(ctx, &ctx.join("sub/app.Dockerfile")).unwrap();
        assert!(specific.is_excluded("b") && !specific.is_excluded("a"));
        assert_eq!(
            specific.source,
            Some(ctx.join("sub/app.Dockerfile.dockerignore"))
        );
        let general = DockerIgnore::load(ctx, &ctx.join("Dockerfile")).unwrap();
        assert!(general.is_excluded("a") && !general.is_excluded("b"));
        let empty = tempfile::tempdir().unwrap();
        let none = DockerIgnore::load(empty.path(), &empty.path().join("Dockerfile")).unwrap();
        assert!(!none.is_excluded("anything"));
    }
}
