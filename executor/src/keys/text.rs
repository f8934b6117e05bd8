//! The `instruction` key input: an instruction after expansion, written out
//! field by field from its typed form.
//!
//! Promises: the text depends only on the typed [`Instruction`], through
//! the literals and field reads below; never on `--dry-run` rendering
//! (`plan.rs`), `Debug`, serde field order or a library's formatting. It
//! is the text the first key scheme hashed (the dry-run renderer's
//! canonical form at the time), frozen: where that form came from serde
//! (mount options in the alphabetical order of a `serde_json` map, enum
//! names as serde renamed them, exec arrays as `serde_json` escaped them)
//! the same bytes are now written here by hand.

use crate::dockerfile::{Command, Healthcheck, Heredoc, Instruction, Mount, MountType, Network};
use crate::dockerfile::{Security, Sharing};

/// The canonical text of an expanded instruction. `ARG` is not written
/// from its fields: its key input is the line as written (see
/// [`super::StepInputs`]).
pub(super) fn instruction_text(instruction: &Instruction) -> String {
    match instruction {
        Instruction::From(f) => {
            let mut t = String::from("FROM ");
            if let Some(p) = &f.platform {
                t.push_str("--platform=");
                t.push_str(p);
                t.push(' ');
            }
            t.push_str(&f.image);
            if let Some(n) = &f.name {
                t.push_str(" AS ");
                t.push_str(n);
            }
            t
        }
        Instruction::Run(r) => {
            let mut words: Vec<String> = r
                .mounts
                .iter()
                .map(|m| format!("--mount={}", mount_text(m)))
                .collect();
            if let Some(n) = r.network {
                words.push(format!("--network={}", network_name(n)));
            }
            if let Some(s) = r.security {
                words.push(format!("--security={}", security_name(s)));
            }
            words.push(command_text(&r.command));
            format!("RUN {}{}", words.join(" "), heredoc_text(&r.heredocs))
        }
        Instruction::Cmd(c) => format!("CMD {}", command_text(c)),
        Instruction::Entrypoint(c) => format!("ENTRYPOINT {}", command_text(c)),
        Instruction::Env(pairs) | Instruction::Label(pairs) => {
            let keyword = if matches!(instruction, Instruction::Env(_)) {
                "ENV"
            } else {
                "LABEL"
            };
            let pairs: Vec<String> = pairs
                .iter()
                .map(|kv| format!("{}={}", quote(&kv.key), quote(&kv.value)))
                .collect();
            format!("{keyword} {}", pairs.join(" "))
        }
        Instruction::Maintainer(s) => format!("MAINTAINER {s}"),
        Instruction::Workdir(s) => format!("WORKDIR {s}"),
        Instruction::Stopsignal(s) => format!("STOPSIGNAL {s}"),
        Instruction::User(s) => format!("USER {s}"),
        Instruction::Expose(ports) => format!("EXPOSE {}", ports.join(" ")),
        Instruction::Volume(paths) => format!("VOLUME {}", json_array(paths)),
        Instruction::Arg(decls) => {
            let words: Vec<String> = decls
                .iter()
                .map(|d| match &d.default {
                    Some(v) => format!("{}={}", d.name, quote(v)),
                    None => d.name.clone(),
                })
                .collect();
            format!("ARG {}", words.join(" "))
        }
        Instruction::Add(a) => {
            let mut words = Vec::new();
            for (flag, value) in [
                ("chown", &a.chown),
                ("chmod", &a.chmod),
                ("checksum", &a.checksum),
            ] {
                if let Some(v) = value {
                    words.push(format!("--{flag}={v}"));
                }
            }
            if a.keep_git_dir {
                words.push("--keep-git-dir".into());
            }
            if a.link {
                words.push("--link".into());
            }
            words.extend(a.exclude.iter().map(|e| format!("--exclude={e}")));
            words.extend(a.sources.iter().cloned());
            words.push(a.dest.clone());
            format!("ADD {}{}", words.join(" "), heredoc_text(&a.heredocs))
        }
        Instruction::Copy(c) => {
            let mut words = Vec::new();
            for (flag, value) in [("from", &c.from), ("chown", &c.chown), ("chmod", &c.chmod)] {
                if let Some(v) = value {
                    words.push(format!("--{flag}={v}"));
                }
            }
            if c.link {
                words.push("--link".into());
            }
            if c.parents {
                words.push("--parents".into());
            }
            words.extend(c.exclude.iter().map(|e| format!("--exclude={e}")));
            words.extend(c.sources.iter().cloned());
            words.push(c.dest.clone());
            format!("COPY {}{}", words.join(" "), heredoc_text(&c.heredocs))
        }
        Instruction::Onbuild { trigger, .. } => format!("ONBUILD {trigger}"),
        Instruction::Healthcheck(Healthcheck::None) => "HEALTHCHECK NONE".to_string(),
        Instruction::Healthcheck(Healthcheck::Cmd {
            test,
            interval_ns,
            timeout_ns,
            start_period_ns,
            start_interval_ns,
            retries,
        }) => {
            let mut words = Vec::new();
            for (flag, value) in [
                ("interval", interval_ns),
                ("timeout", timeout_ns),
                ("start-period", start_period_ns),
                ("start-interval", start_interval_ns),
            ] {
                if let Some(ns) = value {
                    words.push(format!("--{flag}={ns}ns"));
                }
            }
            if let Some(r) = retries {
                words.push(format!("--retries={r}"));
            }
            words.push(format!("CMD {}", command_text(test)));
            format!("HEALTHCHECK {}", words.join(" "))
        }
        Instruction::Shell(argv) => format!("SHELL {}", json_array(argv)),
    }
}

/// One `--mount` as `name=value` pairs joined by `,`, in alphabetical
/// order of the names (the order scheme v1 got from a sorted JSON map).
/// `readonly` and `type` are always written, `required` only when true,
/// the other options when set.
fn mount_text(m: &Mount) -> String {
    let text = |name: &str, value: Option<&str>| value.map(|v| format!("{name}={v}"));
    let number = |name: &str, value: Option<u32>| value.map(|v| format!("{name}={v}"));
    let fields = [
        text("env", m.env.as_deref()),
        text("from", m.from.as_deref()),
        number("gid", m.gid),
        text("id", m.id.as_deref()),
        m.mode.map(|mode| format!("mode={mode:04o}")),
        Some(format!("readonly={}", m.readonly)),
        m.required.then(|| "required=true".to_string()),
        m.sharing.map(|s| format!("sharing={}", sharing_name(s))),
        m.size.map(|size| format!("size={size}")),
        text("source", m.source.as_deref()),
        text("target", m.target.as_deref()),
        Some(format!("type={}", mount_type_name(m.kind))),
        number("uid", m.uid),
    ];
    fields.into_iter().flatten().collect::<Vec<_>>().join(",")
}

fn mount_type_name(kind: MountType) -> &'static str {
    match kind {
        MountType::Bind => "bind",
        MountType::Cache => "cache",
        MountType::Tmpfs => "tmpfs",
        MountType::Secret => "secret",
        MountType::Ssh => "ssh",
    }
}

fn sharing_name(sharing: Sharing) -> &'static str {
    match sharing {
        Sharing::Shared => "shared",
        Sharing::Private => "private",
        Sharing::Locked => "locked",
    }
}

fn network_name(network: Network) -> &'static str {
    match network {
        Network::Default => "default",
        Network::None => "none",
        Network::Host => "host",
    }
}

fn security_name(security: Security) -> &'static str {
    match security {
        Security::Sandbox => "sandbox",
        Security::Insecure => "insecure",
    }
}

fn command_text(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(argv) => json_array(argv),
    }
}

/// Each heredoc as a newline, its body and its delimiter.
fn heredoc_text(docs: &[Heredoc]) -> String {
    docs.iter()
        .map(|d| format!("\n{}{}", d.content, d.name))
        .collect()
}

/// A value as one word: as it is, unless it is empty or holds whitespace,
/// a quote, a backslash, `$` or a backtick; then as a JSON string.
fn quote(s: &str) -> String {
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "\"'\\$`".contains(c)) {
        json_string(s)
    } else {
        s.to_string()
    }
}

/// `["a","b"]`: compact, each element a [`json_string`].
fn json_array(items: &[String]) -> String {
    let items: Vec<String> = items.iter().map(|s| json_string(s)).collect();
    format!("[{}]", items.join(","))
}

/// A JSON string literal: `"` and `\` escaped, the control characters
/// `\b \t \n \f \r` by name and the others below U+0020 as `\u00xx`
/// (lower-case hex); everything else, DEL and non-ASCII included, as is.
pub(super) fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\u{08}' => out.push_str("\\b"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\u{0c}' => out.push_str("\\f"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
