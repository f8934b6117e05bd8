//! Typed Dockerfile instructions and the per-instruction argument and flag
//! parsing (BuildKit's `parseMaybeJSON`, `parseNameVal`, flag rules and
//! argument counts). Values are kept as written; expansion happens later.

use super::ErrorKind;
use super::lines::Heredoc;
use super::mount::Mount;
use super::words::{Json, extract_flags, parse_json_array, split_words};
use serde::Serialize;

/// An instruction with where it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Located {
    pub line: usize,
    pub column: usize,
    /// The logical line as written, continuations joined.
    pub original: String,
    /// Where the pieces of `original` come from (for error positions).
    pub segments: Vec<super::Segment>,
    pub instruction: Instruction,
}

/// A command in exec (JSON array) or shell form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Command {
    Exec(Vec<String>),
    Shell(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct KeyValue {
    pub key: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ArgDecl {
    pub name: String,
    pub default: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct From {
    pub platform: Option<String>,
    pub image: String,
    /// The stage name, lower-cased as Docker does.
    pub name: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    Default,
    None,
    Host,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Security {
    Sandbox,
    Insecure,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Run {
    pub mounts: Vec<Mount>,
    /// The `--mount` values as written; the planner re-parses them with
    /// variable expansion.
    #[serde(skip)]
    pub raw_mounts: Vec<String>,
    pub network: Option<Network>,
    pub security: Option<Security>,
    pub command: Command,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heredocs: Vec<Heredoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Add {
    pub sources: Vec<String>,
    pub dest: String,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub checksum: Option<String>,
    pub keep_git_dir: bool,
    pub link: bool,
    pub exclude: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heredocs: Vec<Heredoc>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copy {
    pub sources: Vec<String>,
    pub dest: String,
    pub from: Option<String>,
    pub chown: Option<String>,
    pub chmod: Option<String>,
    pub link: bool,
    pub parents: bool,
    pub exclude: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub heredocs: Vec<Heredoc>,
}

/// HEALTHCHECK; durations are nanoseconds (as in the image config), 0 or
/// absent meaning "inherit".
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Healthcheck {
    None,
    Cmd {
        test: Command,
        interval_ns: Option<u64>,
        timeout_ns: Option<u64>,
        start_period_ns: Option<u64>,
        start_interval_ns: Option<u64>,
        retries: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// One EXPOSE entry: a port or a port range with its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortSpec {
    pub start: u16,
    pub end: u16,
    pub protocol: Protocol,
}

impl PortSpec {
    /// Parses `80`, `80/tcp`, `53/UDP`, `8000-8010/tcp`.
    pub fn parse(spec: &str) -> Result<PortSpec, ErrorKind> {
        let invalid = || ErrorKind::InvalidPort(spec.to_string());
        let (ports, proto) = match spec.split_once('/') {
            Some((p, proto)) => (p, proto),
            None => (spec, "tcp"),
        };
        let protocol = match proto.to_ascii_lowercase().as_str() {
            "tcp" => Protocol::Tcp,
            "udp" => Protocol::Udp,
            "sctp" => Protocol::Sctp,
            _ => return Err(invalid()),
        };
        let number = |s: &str| s.parse::<u16>().map_err(|_| invalid());
        let (start, end) = match ports.split_once('-') {
            Some((a, b)) => (number(a)?, number(b)?),
            None => {
                let p = number(ports)?;
                (p, p)
            }
        };
        if end < start {
            return Err(invalid());
        }
        Ok(PortSpec {
            start,
            end,
            protocol,
        })
    }
}

/// Every Dockerfile instruction, with its arguments and flags typed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Instruction {
    From(From),
    Run(Run),
    Cmd(Command),
    Label(Vec<KeyValue>),
    Maintainer(String),
    Expose(Vec<String>),
    Env(Vec<KeyValue>),
    Add(Add),
    Copy(Copy),
    Entrypoint(Command),
    Volume(Vec<String>),
    /// `user[:group]`, split after expansion by [`Instruction::user_group`].
    User(String),
    Workdir(String),
    Arg(Vec<ArgDecl>),
    Onbuild {
        /// The trigger as written, stored in the image config as is.
        trigger: String,
        instruction: Box<Instruction>,
    },
    Stopsignal(String),
    Healthcheck(Healthcheck),
    Shell(Vec<String>),
}

impl Instruction {
    /// The instruction keyword in upper case.
    pub fn keyword(&self) -> &'static str {
        match self {
            Instruction::From(_) => "FROM",
            Instruction::Run(_) => "RUN",
            Instruction::Cmd(_) => "CMD",
            Instruction::Label(_) => "LABEL",
            Instruction::Maintainer(_) => "MAINTAINER",
            Instruction::Expose(_) => "EXPOSE",
            Instruction::Env(_) => "ENV",
            Instruction::Add(_) => "ADD",
            Instruction::Copy(_) => "COPY",
            Instruction::Entrypoint(_) => "ENTRYPOINT",
            Instruction::Volume(_) => "VOLUME",
            Instruction::User(_) => "USER",
            Instruction::Workdir(_) => "WORKDIR",
            Instruction::Arg(_) => "ARG",
            Instruction::Onbuild { .. } => "ONBUILD",
            Instruction::Stopsignal(_) => "STOPSIGNAL",
            Instruction::Healthcheck(_) => "HEALTHCHECK",
            Instruction::Shell(_) => "SHELL",
        }
    }

    /// For USER: the user and the optional group.
    pub fn user_group(spec: &str) -> (String, Option<String>) {
        match spec.split_once(':') {
            Some((u, g)) => (u.to_string(), Some(g.to_string())),
            None => (spec.to_string(), None),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum FlagKind {
    Bool,
    Str,
    List,
}

struct Flags {
    values: Vec<(&'static str, Option<String>)>,
}

impl Flags {
    fn parse(
        instruction: &str,
        words: &[String],
        spec: &[(&'static str, FlagKind)],
    ) -> Result<Flags, ErrorKind> {
        let mut values: Vec<(&'static str, Option<String>)> = Vec::new();
        for word in words {
            let (name, value) = match word.split_once('=') {
                Some((n, v)) => (n, Some(v.to_string())),
                None => (word.as_str(), None),
            };
            let Some(&(known, kind)) = spec.iter().find(|(n, _)| *n == name) else {
                return Err(ErrorKind::UnknownFlag {
                    instruction: instruction.to_string(),
                    flag: name.to_string(),
                });
            };
            if kind != FlagKind::List && values.iter().any(|(n, _)| *n == known) {
                return Err(ErrorKind::DuplicateFlag(known.to_string()));
            }
            if kind != FlagKind::Bool && value.is_none() {
                return Err(ErrorKind::MissingFlagValue(known.to_string()));
            }
            if kind == FlagKind::Bool
                && let Some(v) = &value
                && !matches!(v.to_ascii_lowercase().as_str(), "true" | "false")
            {
                return Err(ErrorKind::BadFlagValue {
                    flag: known.to_string(),
                    value: v.clone(),
                    reason: "expecting a boolean value (true or false)".into(),
                });
            }
            values.push((known, value));
        }
        Ok(Flags { values })
    }

    fn string(&self, name: &str) -> Option<String> {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.clone())
    }

    fn bool(&self, name: &str) -> bool {
        self.values
            .iter()
            .find(|(n, _)| *n == name)
            .is_some_and(|(_, v)| v.as_deref().is_none_or(|v| v.eq_ignore_ascii_case("true")))
    }

    fn list(&self, name: &str) -> Vec<String> {
        self.values
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.clone())
            .collect()
    }
}

fn syntax(msg: impl Into<String>) -> ErrorKind {
    ErrorKind::Syntax(msg.into())
}

/// Exec form if `rest` is a JSON array of strings, shell form otherwise.
fn maybe_json(rest: &str) -> Result<Command, ErrorKind> {
    match parse_json_array(rest) {
        Json::Array(a) => Ok(Command::Exec(a)),
        Json::Plain => Ok(Command::Shell(rest.to_string())),
        Json::NonStrings => Err(syntax(
            "when using JSON array syntax, arrays must be comprised of strings only",
        )),
    }
}

fn maybe_json_list(rest: &str) -> Result<Vec<String>, ErrorKind> {
    match parse_json_array(rest) {
        Json::Array(a) => Ok(a),
        Json::Plain => Ok(rest.split_whitespace().map(str::to_string).collect()),
        Json::NonStrings => Err(syntax(
            "when using JSON array syntax, arrays must be comprised of strings only",
        )),
    }
}

fn key_values(keyword: &str, rest: &str, escape: char) -> Result<Vec<KeyValue>, ErrorKind> {
    let words = split_words(rest, escape);
    let Some(first) = words.first() else {
        return Err(syntax(format!("{keyword} requires at least one argument")));
    };
    if !first.contains('=') {
        // The legacy `ENV key value` form: the value is the rest of the line.
        let trimmed = rest.trim();
        let Some((key, value)) = trimmed.split_once(char::is_whitespace) else {
            return Err(syntax(format!("{keyword} must have two arguments")));
        };
        return Ok(vec![KeyValue {
            key: key.to_string(),
            value: value.trim_start().to_string(),
        }]);
    }
    let mut out = Vec::with_capacity(words.len());
    for word in words {
        let Some((key, value)) = word.split_once('=') else {
            return Err(syntax(format!(
                "syntax error - can't find = in {word:?}. Must be of the form: name=value"
            )));
        };
        if key.is_empty() {
            return Err(syntax(format!("{keyword} names can not be blank")));
        }
        out.push(KeyValue {
            key: key.to_string(),
            value: value.to_string(),
        });
    }
    Ok(out)
}

/// Parses a Go duration (`1m30s`, `500ms`, `0`) into nanoseconds.
fn go_duration(flag: &str, s: &str) -> Result<u64, ErrorKind> {
    let bad = |reason: &str| ErrorKind::BadFlagValue {
        flag: flag.to_string(),
        value: s.to_string(),
        reason: reason.to_string(),
    };
    if s == "0" {
        return Ok(0);
    }
    if s.is_empty() {
        return Err(bad("not a duration"));
    }
    let mut total: f64 = 0.0;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let number: f64 = rest[..num_len]
            .parse()
            .map_err(|_| bad("not a duration (e.g. 30s, 1m30s)"))?;
        rest = &rest[num_len..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1.0,
            "us" | "µs" => 1e3,
            "ms" => 1e6,
            "s" => 1e9,
            "m" => 60e9,
            "h" => 3600e9,
            _ => return Err(bad("not a duration (e.g. 30s, 1m30s)")),
        };
        rest = &rest[unit_len..];
        total += number * scale;
    }
    if total > u64::MAX as f64 {
        return Err(bad("duration too large"));
    }
    let ns = total as u64;
    if ns != 0 && ns < 1_000_000 {
        return Err(bad("cannot be less than 1ms"));
    }
    Ok(ns)
}

fn sources_and_dest(keyword: &str, rest: &str) -> Result<(Vec<String>, String), ErrorKind> {
    let mut list = maybe_json_list(rest)?;
    if list.len() < 2 {
        return Err(syntax(format!(
            "{keyword} requires at least two arguments, but only {} provided. Destination could not be determined",
            if list.is_empty() {
                "none was"
            } else {
                "one was"
            }
        )));
    }
    let dest = list.pop().unwrap_or_default();
    Ok((list, dest))
}

/// Parses one logical line into an instruction.
pub(crate) fn parse_instruction(
    text: &str,
    heredocs: Vec<Heredoc>,
    escape: char,
) -> Result<Instruction, ErrorKind> {
    let text = text.trim();
    let (word, after) = match text.split_once(char::is_whitespace) {
        Some((w, r)) => (w, r),
        None => (text, ""),
    };
    let keyword = word.to_ascii_uppercase();
    let (flag_words, rest) = extract_flags(after, escape);
    let rest = rest.trim();
    use FlagKind::{Bool, List, Str};
    let no_flags = |kw: &str| Flags::parse(kw, &flag_words, &[]);
    let require = |kw: &str| {
        if rest.is_empty() {
            Err(syntax(format!("{kw} requires at least one argument")))
        } else {
            Ok(())
        }
    };
    let instruction = match keyword.as_str() {
        "FROM" => {
            let flags = Flags::parse("FROM", &flag_words, &[("platform", Str)])?;
            let words: Vec<&str> = rest.split_whitespace().collect();
            let name = match words.as_slice() {
                [_] => None,
                [_, as_kw, name] if as_kw.eq_ignore_ascii_case("as") => {
                    let lower = name.to_ascii_lowercase();
                    let valid = lower.chars().next().is_some_and(|c| c.is_ascii_lowercase())
                        && lower.chars().all(|c| {
                            c.is_ascii_lowercase() || c.is_ascii_digit() || "-_.".contains(c)
                        });
                    if !valid {
                        return Err(ErrorKind::InvalidStageName(name.to_string()));
                    }
                    Some(lower)
                }
                _ => {
                    return Err(syntax(
                        "FROM requires either one or three arguments (FROM image [AS name])",
                    ));
                }
            };
            Instruction::From(From {
                platform: flags.string("platform"),
                image: words[0].to_string(),
                name,
            })
        }
        "RUN" => {
            let flags = Flags::parse(
                "RUN",
                &flag_words,
                &[("mount", List), ("network", Str), ("security", Str)],
            )?;
            require("RUN")?;
            let raw_mounts = flags.list("mount");
            let mut mounts = Vec::with_capacity(raw_mounts.len());
            for m in &raw_mounts {
                mounts.push(Mount::parse(m, &mut |_, v| Ok(v.to_string()))?);
            }
            let network = match flags.string("network").as_deref() {
                None => None,
                Some("default") => Some(Network::Default),
                Some("none") => Some(Network::None),
                Some("host") => Some(Network::Host),
                Some(other) => {
                    return Err(ErrorKind::BadFlagValue {
                        flag: "network".into(),
                        value: other.into(),
                        reason: "expected default, none or host".into(),
                    });
                }
            };
            let security = match flags.string("security").as_deref() {
                None => None,
                Some("sandbox") => Some(Security::Sandbox),
                Some("insecure") => Some(Security::Insecure),
                Some(other) => {
                    return Err(ErrorKind::BadFlagValue {
                        flag: "security".into(),
                        value: other.into(),
                        reason: "expected sandbox or insecure".into(),
                    });
                }
            };
            let command = if heredocs.is_empty() {
                maybe_json(rest)?
            } else {
                Command::Shell(rest.to_string())
            };
            Instruction::Run(Run {
                mounts,
                raw_mounts,
                network,
                security,
                command,
                heredocs,
            })
        }
        "CMD" | "ENTRYPOINT" => {
            no_flags(&keyword)?;
            require(&keyword)?;
            let command = maybe_json(rest)?;
            if keyword == "CMD" {
                Instruction::Cmd(command)
            } else {
                Instruction::Entrypoint(command)
            }
        }
        "LABEL" | "ENV" => {
            no_flags(&keyword)?;
            let pairs = key_values(&keyword, rest, escape)?;
            if keyword == "LABEL" {
                Instruction::Label(pairs)
            } else {
                Instruction::Env(pairs)
            }
        }
        "MAINTAINER" | "USER" | "WORKDIR" | "STOPSIGNAL" => {
            no_flags(&keyword)?;
            require(&keyword)?;
            let value = rest.to_string();
            match keyword.as_str() {
                "MAINTAINER" => Instruction::Maintainer(value),
                "USER" => Instruction::User(value),
                "WORKDIR" => Instruction::Workdir(value),
                _ => Instruction::Stopsignal(value),
            }
        }
        "EXPOSE" => {
            no_flags("EXPOSE")?;
            require("EXPOSE")?;
            Instruction::Expose(rest.split_whitespace().map(str::to_string).collect())
        }
        "VOLUME" => {
            no_flags("VOLUME")?;
            require("VOLUME")?;
            let list = maybe_json_list(rest)?;
            if list.is_empty() || list.iter().any(|v| v.trim().is_empty()) {
                return Err(syntax("VOLUME specified can not be an empty string"));
            }
            Instruction::Volume(list)
        }
        "ARG" => {
            no_flags("ARG")?;
            let words = split_words(rest, escape);
            if words.is_empty() {
                return Err(syntax("ARG requires at least one argument"));
            }
            let mut decls = Vec::with_capacity(words.len());
            for w in words {
                let (name, default) = match w.split_once('=') {
                    Some((n, d)) => (n.to_string(), Some(d.to_string())),
                    None => (w, None),
                };
                if name.is_empty() {
                    return Err(syntax("ARG names can not be blank"));
                }
                decls.push(ArgDecl { name, default });
            }
            Instruction::Arg(decls)
        }
        "ADD" => {
            let flags = Flags::parse(
                "ADD",
                &flag_words,
                &[
                    ("chown", Str),
                    ("chmod", Str),
                    ("checksum", Str),
                    ("keep-git-dir", Bool),
                    ("link", Bool),
                    ("exclude", List),
                ],
            )?;
            let (sources, dest) = sources_and_dest("ADD", rest)?;
            Instruction::Add(Add {
                sources,
                dest,
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                checksum: flags.string("checksum"),
                keep_git_dir: flags.bool("keep-git-dir"),
                link: flags.bool("link"),
                exclude: flags.list("exclude"),
                heredocs,
            })
        }
        "COPY" => {
            let flags = Flags::parse(
                "COPY",
                &flag_words,
                &[
                    ("from", Str),
                    ("chown", Str),
                    ("chmod", Str),
                    ("link", Bool),
                    ("parents", Bool),
                    ("exclude", List),
                ],
            )?;
            let (sources, dest) = sources_and_dest("COPY", rest)?;
            Instruction::Copy(Copy {
                sources,
                dest,
                from: flags.string("from"),
                chown: flags.string("chown"),
                chmod: flags.string("chmod"),
                link: flags.bool("link"),
                parents: flags.bool("parents"),
                exclude: flags.list("exclude"),
                heredocs,
            })
        }
        "ONBUILD" => {
            no_flags("ONBUILD")?;
            let trigger = after.trim();
            if trigger.is_empty() {
                return Err(syntax("ONBUILD requires at least one argument"));
            }
            let sub = trigger
                .split_whitespace()
                .next()
                .unwrap_or("")
                .to_ascii_uppercase();
            if matches!(sub.as_str(), "ONBUILD" | "FROM" | "MAINTAINER") {
                return Err(syntax(format!("{sub} isn't allowed as an ONBUILD trigger")));
            }
            let inner = parse_instruction(trigger, Vec::new(), escape)?;
            Instruction::Onbuild {
                trigger: trigger.to_string(),
                instruction: Box::new(inner),
            }
        }
        "HEALTHCHECK" => {
            let flags = Flags::parse(
                "HEALTHCHECK",
                &flag_words,
                &[
                    ("interval", Str),
                    ("timeout", Str),
                    ("start-period", Str),
                    ("start-interval", Str),
                    ("retries", Str),
                ],
            )?;
            let (kind, cmd_rest) = match rest.split_once(char::is_whitespace) {
                Some((k, r)) => (k, r.trim()),
                None => (rest, ""),
            };
            match kind.to_ascii_uppercase().as_str() {
                "NONE" => {
                    if !cmd_rest.is_empty() {
                        return Err(syntax("HEALTHCHECK NONE takes no arguments"));
                    }
                    Instruction::Healthcheck(Healthcheck::None)
                }
                "CMD" => {
                    if cmd_rest.is_empty() {
                        return Err(syntax("HEALTHCHECK CMD requires a command"));
                    }
                    let duration = |name: &str| {
                        flags
                            .string(name)
                            .map(|v| go_duration(name, &v))
                            .transpose()
                    };
                    let retries = flags
                        .string("retries")
                        .map(|v| {
                            v.parse::<u32>().map_err(|_| ErrorKind::BadFlagValue {
                                flag: "retries".into(),
                                value: v.clone(),
                                reason: "expected a non-negative integer".into(),
                            })
                        })
                        .transpose()?;
                    Instruction::Healthcheck(Healthcheck::Cmd {
                        test: maybe_json(cmd_rest)?,
                        interval_ns: duration("interval")?,
                        timeout_ns: duration("timeout")?,
                        start_period_ns: duration("start-period")?,
                        start_interval_ns: duration("start-interval")?,
                        retries,
                    })
                }
                "" => return Err(syntax("HEALTHCHECK requires an argument (CMD or NONE)")),
                other => {
                    return Err(syntax(format!(
                        "unknown type {other:?} in HEALTHCHECK (try CMD)"
                    )));
                }
            }
        }
        "SHELL" => {
            no_flags("SHELL")?;
            match parse_json_array(rest) {
                Json::Array(a) if !a.is_empty() => Instruction::Shell(a),
                Json::Array(_) => return Err(syntax("SHELL requires at least one argument")),
                _ => return Err(syntax("SHELL requires the arguments to be in JSON form")),
            }
        }
        _ => return Err(ErrorKind::UnknownInstruction(word.to_string())),
    };
    Ok(instruction)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(text: &str) -> Instruction {
        parse_instruction(text, Vec::new(), '\\').unwrap()
    }

    fn e(text: &str) -> ErrorKind {
        parse_instruction(text, Vec::new(), '\\').unwrap_err()
    }

    #[test]
    fn instructions_are_case_insensitive() {
        assert_eq!(p("from alpine"), p("FROM alpine"));
        assert_eq!(p("wOrKdIr /x"), Instruction::Workdir("/x".into()));
    }

    #[test]
    fn from_takes_platform_and_stage_name() {
        assert_eq!(
            p("FROM --platform=$BUILDPLATFORM golang:1.22 AS Build-1"),
            Instruction::From(From {
                platform: Some("$BUILDPLATFORM".into()),
                image: "golang:1.22".into(),
                name: Some("build-1".into()),
            })
        );
        assert!(matches!(e("FROM a AS"), ErrorKind::Syntax(_)));
        assert!(matches!(e("FROM a b c"), ErrorKind::Syntax(_)));
        assert!(matches!(e("FROM a AS 1st"), ErrorKind::InvalidStageName(_)));
        assert!(matches!(e("FROM a AS x$y"), ErrorKind::InvalidStageName(_)));
        assert!(matches!(
            e("FROM --plat=x a"),
            ErrorKind::UnknownFlag { .. }
        ));
    }

    #[test]
    fn run_takes_mounts_network_and_security() {
        let Instruction::Run(r) = p(
            "RUN --mount=type=cache,target=/c --mount=type=secret,id=s --network=none --security=insecure make",
        ) else {
            panic!("not RUN")
        };
        assert_eq!(r.mounts.len(), 2);
        assert_eq!(r.network, Some(Network::None));
        assert_eq!(r.security, Some(Security::Insecure));
        assert_eq!(r.command, Command::Shell("make".into()));
        assert!(matches!(
            e("RUN --network=bridge x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(
            e("RUN --security=x x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(
            e("RUN --network=none --network=host x"),
            ErrorKind::DuplicateFlag(_)
        ));
        assert!(matches!(
            e("RUN --network x"),
            ErrorKind::MissingFlagValue(_)
        ));
        assert!(matches!(
            e("RUN --mount=type=bogus x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(e("RUN"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn exec_form_and_fallback_to_shell_form() {
        assert_eq!(
            p(r#"CMD ["nginx", "-g", "daemon off;"]"#),
            Instruction::Cmd(Command::Exec(vec![
                "nginx".into(),
                "-g".into(),
                "daemon off;".into()
            ]))
        );
        assert_eq!(
            p("ENTRYPOINT [not json]"),
            Instruction::Entrypoint(Command::Shell("[not json]".into()))
        );
        assert_eq!(
            p("RUN []"),
            Instruction::Run(Run {
                mounts: vec![],
                raw_mounts: vec![],
                network: None,
                security: None,
                command: Command::Exec(vec![]),
                heredocs: vec![],
            })
        );
        assert!(matches!(e("CMD [1, 2]"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn env_and_label_accept_both_forms() {
        assert_eq!(
            p("ENV PATH /usr/local/bin:$PATH  x"),
            Instruction::Env(vec![KeyValue {
                key: "PATH".into(),
                value: "/usr/local/bin:$PATH  x".into()
            }])
        );
        assert_eq!(
            p(r#"LABEL a=1 "b c"="d e" f='g h'"#),
            Instruction::Label(vec![
                KeyValue {
                    key: "a".into(),
                    value: "1".into()
                },
                KeyValue {
                    key: "\"b c\"".into(),
                    value: "\"d e\"".into()
                },
                KeyValue {
                    key: "f".into(),
                    value: "'g h'".into()
                },
            ])
        );
        assert!(matches!(e("ENV a=1 b"), ErrorKind::Syntax(_)));
        assert!(matches!(e("ENV onlykey"), ErrorKind::Syntax(_)));
        assert!(matches!(e("LABEL"), ErrorKind::Syntax(_)));
        assert!(matches!(e("ENV =x"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn copy_and_add_take_all_their_flags() {
        let Instruction::Copy(c) = p(
            "COPY --from=build --chown=app:app --chmod=0644 --link --parents --exclude=*.md --exclude=tmp a b /dst/",
        ) else {
            panic!()
        };
        assert_eq!(c.from.as_deref(), Some("build"));
        assert_eq!(c.chown.as_deref(), Some("app:app"));
        assert_eq!(c.chmod.as_deref(), Some("0644"));
        assert!(c.link && c.parents);
        assert_eq!(c.exclude, vec!["*.md", "tmp"]);
        assert_eq!(c.sources, vec!["a", "b"]);
        assert_eq!(c.dest, "/dst/");
        let Instruction::Add(a) = p(
            "ADD --checksum=sha256:abc --keep-git-dir=true --link=false --chown=1 --chmod=755 --exclude=x https://e/x.tgz /x",
        ) else {
            panic!()
        };
        assert_eq!(a.checksum.as_deref(), Some("sha256:abc"));
        assert!(a.keep_git_dir && !a.link);
        let Instruction::Copy(j) = p(r#"COPY ["a b", "/c d/"]"#) else {
            panic!()
        };
        assert_eq!(j.sources, vec!["a b"]);
        assert!(matches!(e("COPY onlyone"), ErrorKind::Syntax(_)));
        assert!(matches!(
            e("COPY --link=maybe a b"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(
            e("ADD --from=x a b"),
            ErrorKind::UnknownFlag { .. }
        ));
        assert!(matches!(
            e("COPY --parents=1 a b"),
            ErrorKind::BadFlagValue { .. }
        ));
    }

    #[test]
    fn volume_expose_user_workdir_stopsignal_maintainer() {
        assert_eq!(
            p(r#"VOLUME ["/a", "/b"]"#),
            Instruction::Volume(vec!["/a".into(), "/b".into()])
        );
        assert_eq!(
            p("VOLUME /a /b"),
            Instruction::Volume(vec!["/a".into(), "/b".into()])
        );
        assert!(matches!(e(r#"VOLUME [""]"#), ErrorKind::Syntax(_)));
        assert_eq!(
            p("EXPOSE 80 53/udp"),
            Instruction::Expose(vec!["80".into(), "53/udp".into()])
        );
        assert_eq!(p("USER app:staff"), Instruction::User("app:staff".into()));
        assert_eq!(
            Instruction::user_group("app:staff"),
            ("app".into(), Some("staff".into()))
        );
        assert_eq!(Instruction::user_group("1000"), ("1000".into(), None));
        assert_eq!(
            p("STOPSIGNAL SIGTERM"),
            Instruction::Stopsignal("SIGTERM".into())
        );
        assert_eq!(
            p("MAINTAINER Jo <jo@x>"),
            Instruction::Maintainer("Jo <jo@x>".into())
        );
        assert!(matches!(e("WORKDIR"), ErrorKind::Syntax(_)));
        assert!(matches!(e("USER --x=1 a"), ErrorKind::UnknownFlag { .. }));
    }

    #[test]
    fn port_specs_parse_protocols_and_ranges() {
        assert_eq!(
            PortSpec::parse("80").unwrap(),
            PortSpec {
                start: 80,
                end: 80,
                protocol: Protocol::Tcp
            }
        );
        assert_eq!(PortSpec::parse("53/UDP").unwrap().protocol, Protocol::Udp);
        assert_eq!(
            PortSpec::parse("8000-8010/sctp").unwrap(),
            PortSpec {
                start: 8000,
                end: 8010,
                protocol: Protocol::Sctp
            }
        );
        for bad in ["http", "80/icmp", "70000", "10-5", ""] {
            assert!(PortSpec::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn arg_declares_several_names_with_defaults() {
        assert_eq!(
            p("ARG A B=2 C=\"x y\""),
            Instruction::Arg(vec![
                ArgDecl {
                    name: "A".into(),
                    default: None
                },
                ArgDecl {
                    name: "B".into(),
                    default: Some("2".into())
                },
                ArgDecl {
                    name: "C".into(),
                    default: Some("\"x y\"".into())
                },
            ])
        );
        assert!(matches!(e("ARG"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn onbuild_wraps_a_trigger_and_refuses_some() {
        let Instruction::Onbuild {
            trigger,
            instruction,
        } = p("ONBUILD COPY . /app")
        else {
            panic!()
        };
        assert_eq!(trigger, "COPY . /app");
        assert!(matches!(*instruction, Instruction::Copy(_)));
        for bad in [
            "ONBUILD ONBUILD RUN x",
            "ONBUILD FROM a",
            "ONBUILD MAINTAINER m",
            "ONBUILD",
        ] {
            assert!(matches!(e(bad), ErrorKind::Syntax(_)), "{bad}");
        }
        assert!(matches!(
            e("ONBUILD FOO x"),
            ErrorKind::UnknownInstruction(_)
        ));
    }

    #[test]
    fn healthcheck_options_and_none() {
        assert_eq!(
            p(
                "HEALTHCHECK --interval=1m30s --timeout=5s --start-period=500ms --start-interval=2s --retries=3 CMD curl -f http://localhost/"
            ),
            Instruction::Healthcheck(Healthcheck::Cmd {
                test: Command::Shell("curl -f http://localhost/".into()),
                interval_ns: Some(90_000_000_000),
                timeout_ns: Some(5_000_000_000),
                start_period_ns: Some(500_000_000),
                start_interval_ns: Some(2_000_000_000),
                retries: Some(3),
            })
        );
        assert_eq!(
            p("healthcheck none"),
            Instruction::Healthcheck(Healthcheck::None)
        );
        assert!(matches!(e("HEALTHCHECK NONE x"), ErrorKind::Syntax(_)));
        assert!(matches!(e("HEALTHCHECK curl x"), ErrorKind::Syntax(_)));
        assert!(matches!(
            e("HEALTHCHECK --interval=10 CMD x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(
            e("HEALTHCHECK --interval=10us CMD x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(
            e("HEALTHCHECK --retries=-1 CMD x"),
            ErrorKind::BadFlagValue { .. }
        ));
        assert!(matches!(e("HEALTHCHECK CMD"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn shell_requires_json() {
        assert_eq!(
            p(r#"SHELL ["powershell", "-command"]"#),
            Instruction::Shell(vec!["powershell".into(), "-command".into()])
        );
        assert!(matches!(e("SHELL /bin/bash -c"), ErrorKind::Syntax(_)));
        assert!(matches!(e("SHELL []"), ErrorKind::Syntax(_)));
    }

    #[test]
    fn unknown_instructions_are_errors() {
        assert_eq!(
            e("FORM alpine"),
            ErrorKind::UnknownInstruction("FORM".into())
        );
    }
}
