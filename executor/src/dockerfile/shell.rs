//! Dockerfile variable substitution: the word processing Docker applies to
//! the arguments of ADD, COPY, ENV, EXPOSE, FROM, LABEL, STOPSIGNAL, USER,
//! VOLUME, WORKDIR and ARG defaults. It promises the same results as
//! BuildKit's shell lexer for `$v ${v} ${v:-w} ${v-w} ${v:+w} ${v+w}
//! ${v:?msg} ${v?msg}`, single and double quotes and escapes (`\` or the
//! `escape` directive's character), and it never panics on any input.
//! One expansion's result is at most [`MAX_EXPANDED_LEN`] bytes (or the
//! word's own length, if longer), so chained variables ("billion laughs")
//! are an error, not an allocation the process cannot survive.

use std::collections::BTreeMap;

/// Why a word could not be expanded; the caller adds file and line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ExpandError {
    #[error("{name}: {message}")]
    Unset { name: String, message: String },
    #[error("syntax error: missing '}}' in variable substitution")]
    MissingBrace,
    #[error("syntax error: bad substitution")]
    BadSubstitution,
    #[error("unsupported modifier ({0}) in substitution")]
    UnsupportedModifier(char),
    #[error("unexpected end of statement while looking for matching {0}")]
    Unterminated(&'static str),
    #[error("variable substitutions nested more than {MAX_DEPTH} deep")]
    TooDeep,
    #[error("the expanded value is larger than {MAX_EXPANDED_LEN} bytes")]
    TooLong,
    #[error(
        "the variables and expansions of this Dockerfile take more than {0} bytes (chained ARG/ENV values?)"
    )]
    BudgetExceeded(usize),
}

/// Largest result of one expansion (a word, a heredoc body). Real values
/// (paths, versions, a PATH) are far below it.
pub const MAX_EXPANDED_LEN: usize = 1 << 20;

/// Nesting limit for `${a:-${b:-...}}`, so hostile input cannot exhaust
/// the stack.
const MAX_DEPTH: usize = 64;

/// The variables visible to an expansion, by name (case-sensitive, as Linux).
pub type Vars = BTreeMap<String, String>;

/// Expands one word as Docker's `ProcessWord`: quotes are removed, escapes
/// resolved and variables substituted; whitespace is kept.
pub fn expand_word(word: &str, vars: &Vars, escape: char) -> Result<String, ExpandError> {
    let mut lexer = Lexer {
        chars: word.chars().collect(),
        pos: 0,
        vars,
        escape,
        depth: 0,
        limit: MAX_EXPANDED_LEN.max(word.len()),
    };
    lexer.process_until(None)
}

/// Expands variables in a COPY/ADD heredoc body the way a POSIX shell
/// expands an unquoted here-document: `$v` and `${v...}` forms are
/// substituted and the escape character protects `$` and itself, but quotes
/// are ordinary characters and whitespace and newlines are kept.
pub fn expand_heredoc(body: &str, vars: &Vars, escape: char) -> Result<String, ExpandError> {
    let mut lexer = Lexer {
        chars: body.chars().collect(),
        pos: 0,
        vars,
        escape,
        depth: 0,
        limit: MAX_EXPANDED_LEN.max(body.len()),
    };
    let mut out = String::new();
    while let Some(ch) = lexer.peek() {
        if ch == '$' {
            let value = lexer.dollar()?;
            lexer.append(&mut out, &value)?;
        } else if ch == escape {
            lexer.pos += 1;
            match lexer.peek() {
                Some(n) if n == '$' || n == escape => {
                    lexer.pos += 1;
                    out.push(n);
                }
                _ => out.push(ch),
            }
        } else {
            lexer.pos += 1;
            out.push(ch);
        }
    }
    Ok(out)
}

/// Names of the variables a word refers to (used to decide which build
/// arguments a Dockerfile consumes). Errors are ignored: a bad word simply
/// refers to the names found before the error.
pub fn referenced_names(word: &str) -> Vec<String> {
    let mut names = Vec::new();
    let chars: Vec<char> = word.chars().collect();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let mut j = i + 1;
            if j < chars.len() && chars[j] == '{' {
                j += 1;
            }
            let start = j;
            while j < chars.len() && (chars[j].is_alphanumeric() || chars[j] == '_') {
                j += 1;
            }
            if j > start {
                names.push(chars[start..j].iter().collect());
            }
            i = j.max(i + 1);
        } else {
            i += 1;
        }
    }
    names
}

struct Lexer<'a> {
    chars: Vec<char>,
    pos: usize,
    vars: &'a Vars,
    escape: char,
    depth: usize,
    /// Longest string any part of this expansion may build.
    limit: usize,
}

impl Lexer<'_> {
    /// `out += value`, unless that makes it longer than the limit.
    fn append(&self, out: &mut String, value: &str) -> Result<(), ExpandError> {
        if out.len() + value.len() > self.limit {
            return Err(ExpandError::TooLong);
        }
        out.push_str(value);
        Ok(())
    }

    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn next(&mut self) -> Option<char> {
        let c = self.peek();
        if c.is_some() {
            self.pos += 1;
        }
        c
    }

    /// Processes characters until `stop` (consumed) or the end of the word.
    /// Returns an error when `stop` is given but never found.
    fn process_until(&mut self, stop: Option<char>) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            let Some(ch) = self.peek() else {
                return match stop {
                    Some(_) => Err(ExpandError::MissingBrace),
                    None => Ok(out),
                };
            };
            if Some(ch) == stop {
                self.pos += 1;
                return Ok(out);
            }
            match ch {
                '\'' => {
                    self.pos += 1;
                    let value = self.single_quoted()?;
                    self.append(&mut out, &value)?;
                }
                '"' => {
                    self.pos += 1;
                    let value = self.double_quoted()?;
                    self.append(&mut out, &value)?;
                }
                '$' => {
                    let value = self.dollar()?;
                    self.append(&mut out, &value)?;
                }
                c if c == self.escape => {
                    self.pos += 1;
                    // An escape character escapes whatever follows, and is
                    // dropped at the end of the word.
                    if let Some(next) = self.next() {
                        out.push(next);
                    }
                }
                c => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn single_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.next() {
                None => return Err(ExpandError::Unterminated("single-quote")),
                Some('\'') => return Ok(out),
                Some(c) => out.push(c),
            }
        }
    }

    fn double_quoted(&mut self) -> Result<String, ExpandError> {
        let mut out = String::new();
        loop {
            match self.peek() {
                None => return Err(ExpandError::Unterminated("double-quote")),
                Some('"') => {
                    self.pos += 1;
                    return Ok(out);
                }
                Some('$') => {
                    let value = self.dollar()?;
                    self.append(&mut out, &value)?;
                }
                Some(c) if c == self.escape => {
                    self.pos += 1;
                    // Inside double quotes only `"`, `$` and the escape
                    // character itself can be escaped; other escapes stay.
                    match self.peek() {
                        None => {}
                        Some(n) if n == '"' || n == '$' || n == self.escape => {
                            self.pos += 1;
                            out.push(n);
                        }
                        Some(_) => out.push(c),
                    }
                }
                Some(c) => {
                    self.pos += 1;
                    out.push(c);
                }
            }
        }
    }

    fn name(&mut self) -> String {
        let mut name = String::new();
        if let Some(c) = self.peek() {
            if c.is_ascii_digit() {
                while let Some(d) = self.peek().filter(char::is_ascii_digit) {
                    self.pos += 1;
                    name.push(d);
                }
                return name;
            }
            if matches!(c, '#' | '*' | '@' | '?' | '!' | '$' | '-') {
                self.pos += 1;
                name.push(c);
                return name;
            }
        }
        while let Some(c) = self.peek() {
            if !(c.is_alphanumeric() || c == '_') {
                break;
            }
            self.pos += 1;
            name.push(c);
        }
        name
    }

    fn lookup(&self, name: &str) -> Option<&str> {
        self.vars.get(name).map(String::as_str)
    }

    fn dollar(&mut self) -> Result<String, ExpandError> {
        self.pos += 1; // the `$`
        if self.peek() != Some('{') {
            let name = self.name();
            if name.is_empty() {
                return Ok("$".to_string());
            }
            if !(name
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_'))
            {
                // Special parameters are not Dockerfile variables: empty.
                return Ok(String::new());
            }
            return Ok(self.lookup(&name).unwrap_or("").to_string());
        }
        self.pos += 1; // the `{`
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(ExpandError::TooDeep);
        }
        let result = self.braced();
        self.depth -= 1;
        result
    }

    fn braced(&mut self) -> Result<String, ExpandError> {
        match self.peek() {
            None => return Err(ExpandError::MissingBrace),
            Some('{' | '}' | ':') => return Err(ExpandError::BadSubstitution),
            Some(_) => {}
        }
        let name = self.name();
        if name.is_empty() {
            return Err(ExpandError::BadSubstitution);
        }
        let Some(op) = self.next() else {
            return Err(ExpandError::MissingBrace);
        };
        match op {
            '}' => Ok(self.lookup(&name).unwrap_or("").to_string()),
            '?' => {
                let word = self.process_until(Some('}'))?;
                match self.lookup(&name) {
                    Some(v) => Ok(v.to_string()),
                    None => Err(unset(name, word)),
                }
            }
            ':' => {
                let Some(modifier) = self.next() else {
                    return Err(ExpandError::MissingBrace);
                };
                if !matches!(modifier, '-' | '+' | '?') {
                    return Err(ExpandError::UnsupportedModifier(modifier));
                }
                let word = self.process_until(Some('}'))?;
                let value = self.lookup(&name).unwrap_or("").to_string();
                match modifier {
                    '+' => Ok(if value.is_empty() { value } else { word }),
                    '-' => Ok(if value.is_empty() { word } else { value }),
                    _ => {
                        if value.is_empty() {
                            Err(unset(name, word))
                        } else {
                            Ok(value)
                        }
                    }
                }
            }
            '+' | '-' => {
                let word = self.process_until(Some('}'))?;
                let value = self.lookup(&name).map(str::to_string);
                Ok(match (op, value) {
                    ('+', Some(_)) => word,
                    ('+', None) => String::new(),
                    (_, Some(v)) => v,
                    (_, None) => word,
                })
            }
            other => Err(ExpandError::UnsupportedModifier(other)),
        }
    }
}

fn unset(name: String, word: String) -> ExpandError {
    let message = if word.is_empty() {
        "is not allowed to be unset".to_string()
    } else {
        word
    };
    ExpandError::Unset { name, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars() -> Vars {
        let mut v = Vars::new();
        v.insert("A".into(), "alpha".into());
        v.insert("EMPTY".into(), String::new());
        v.insert("SP".into(), "a b".into());
        v
    }

    fn ex(word: &str) -> Result<String, ExpandError> {
        expand_word(word, &vars(), '\\')
    }

    #[test]
    fn plain_and_braced_variables_are_substituted() {
        assert_eq!(ex("$A/${A}x$Ay").unwrap(), "alpha/alphax");
        assert_eq!(ex("${UNSET}|$UNSET").unwrap(), "|");
        assert_eq!(ex("$SP").unwrap(), "a b");
    }

    #[test]
    fn colon_dash_uses_default_when_unset_or_empty() {
        assert_eq!(ex("${UNSET:-d}").unwrap(), "d");
        assert_eq!(ex("${EMPTY:-d}").unwrap(), "d");
        assert_eq!(ex("${A:-d}").unwrap(), "alpha");
    }

    #[test]
    fn dash_uses_default_only_when_unset() {
        assert_eq!(ex("${UNSET-d}").unwrap(), "d");
        assert_eq!(ex("${EMPTY-d}").unwrap(), "");
        assert_eq!(ex("${A-d}").unwrap(), "alpha");
    }

    #[test]
    fn colon_plus_replaces_only_non_empty() {
        assert_eq!(ex("${A:+r}").unwrap(), "r");
        assert_eq!(ex("${EMPTY:+r}").unwrap(), "");
        assert_eq!(ex("${UNSET:+r}").unwrap(), "");
    }

    #[test]
    fn plus_replaces_when_set_even_if_empty() {
        assert_eq!(ex("${A+r}").unwrap(), "r");
        assert_eq!(ex("${EMPTY+r}").unwrap(), "r");
        assert_eq!(ex("${UNSET+r}").unwrap(), "");
    }

    #[test]
    fn question_forms_fail_with_the_message() {
        assert_eq!(ex("${A:?boom}").unwrap(), "alpha");
        assert_eq!(
            ex("${EMPTY:?must be set}").unwrap_err().to_string(),
            "EMPTY: must be set"
        );
        assert_eq!(ex("${EMPTY?x}").unwrap(), "");
        assert_eq!(
            ex("${UNSET?}").unwrap_err().to_string(),
            "UNSET: is not allowed to be unset"
        );
        assert!(matches!(ex("${UNSET:?}"), Err(ExpandError::Unset { .. })));
    }

    #[test]
    fn default_words_are_themselves_expanded() {
        assert_eq!(ex("${UNSET:-$A-x}").unwrap(), "alpha-x");
        assert_eq!(ex("${UNSET:-${A:+nested}}").unwrap(), "nested");
    }

    #[test]
    fn single_quotes_are_literal_and_double_quotes_expand() {
        assert_eq!(ex("'$A'").unwrap(), "$A");
        assert_eq!(ex("\"$A b\"").unwrap(), "alpha b");
        assert_eq!(ex("\"a\\$A\\\"\\n\"").unwrap(), "a$A\"\\n");
    }

    #[test]
    fn escapes_protect_dollar_and_are_removed() {
        assert_eq!(ex("\\$A").unwrap(), "$A");
        assert_eq!(ex("a\\ b\\").unwrap(), "a b");
        assert_eq!(expand_word("`$A", &vars(), '`').unwrap(), "$A");
        assert_eq!(expand_word("c:\\x", &vars(), '`').unwrap(), "c:\\x");
    }

    #[test]
    fn lone_dollar_and_special_parameters() {
        assert_eq!(ex("$").unwrap(), "$");
        assert_eq!(ex("a$ b").unwrap(), "a$ b");
        assert_eq!(ex("$1x").unwrap(), "x");
    }

    #[test]
    fn malformed_substitutions_are_errors() {
        assert_eq!(ex("${A"), Err(ExpandError::MissingBrace));
        assert_eq!(ex("${"), Err(ExpandError::MissingBrace));
        assert_eq!(ex("${}"), Err(ExpandError::BadSubstitution));
        assert_eq!(ex("${:-x}"), Err(ExpandError::BadSubstitution));
        assert_eq!(ex("${A%x}"), Err(ExpandError::UnsupportedModifier('%')));
        assert_eq!(ex("${A:=x}"), Err(ExpandError::UnsupportedModifier('=')));
        assert_eq!(ex("'abc"), Err(ExpandError::Unterminated("single-quote")));
        assert_eq!(ex("\"abc"), Err(ExpandError::Unterminated("double-quote")));
    }

    #[test]
    fn heredoc_bodies_keep_quotes_and_newlines() {
        assert_eq!(
            expand_heredoc("say \"$A\" '${B:-b}'\n\\$A \\x\n", &vars(), '\\').unwrap(),
            "say \"alpha\" 'b'\n$A \\x\n"
        );
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = "${a:-".repeat(100_000);
        assert_eq!(ex(&deep), Err(ExpandError::TooDeep));
        let ok = format!("{}x{}", "${a:-".repeat(10), "}".repeat(10));
        assert_eq!(ex(&ok).unwrap(), "x");
    }

    #[test]
    fn referenced_names_finds_plain_and_braced_names() {
        assert_eq!(referenced_names("$A ${B:-$C} $ x"), vec!["A", "B", "C"]);
    }

    #[test]
    fn expansion_results_are_bounded() {
        let mut v = Vars::new();
        v.insert("big".into(), "x".repeat(MAX_EXPANDED_LEN / 2 + 1));
        assert_eq!(expand_word("$big$big", &v, '\\'), Err(ExpandError::TooLong));
        assert_eq!(
            expand_word("\"${big}\"${big:-}", &v, '\\'),
            Err(ExpandError::TooLong)
        );
        assert_eq!(
            expand_heredoc("$big\n$big\n", &v, '\\'),
            Err(ExpandError::TooLong)
        );
        assert_eq!(
            expand_word("$big", &v, '\\').unwrap().len(),
            MAX_EXPANDED_LEN / 2 + 1
        );
        // A long literal word is not an expansion that grew.
        let literal = "y".repeat(MAX_EXPANDED_LEN + 10);
        assert_eq!(expand_word(&literal, &v, '\\').unwrap(), literal);
    }
}
