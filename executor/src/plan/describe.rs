//! The JSON flags, typed value and rendered text of an expanded
//! instruction (`expanded` in the `--dry-run` JSON). Presentation only:
//! cache keys never read it (their text is written in `crate::keys`, and a
//! test there changes every rendered field without moving a key).

use crate::dockerfile::{self, Command, Heredoc, Instruction, Mount, PortSpec};
use serde_json::{Map, Value, json};

/// Quotes a value for the rendered text when it would not read back as
/// one word.
fn quote(s: &str) -> String {
    if s.is_empty() || s.contains(|c: char| c.is_whitespace() || "\"'\\$`".contains(c)) {
        serde_json::to_string(s).unwrap_or_default()
    } else {
        s.to_string()
    }
}

fn command_text(c: &Command) -> String {
    match c {
        Command::Shell(s) => s.clone(),
        Command::Exec(v) => serde_json::to_string(v).unwrap_or_default(),
    }
}

fn mount_text(m: &Mount) -> String {
    let Ok(Value::Object(fields)) = serde_json::to_value(m) else {
        return String::new();
    };
    fields
        .iter()
        .filter(|(_, v)| !v.is_null())
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(",")
}

fn heredoc_text(docs: &[Heredoc]) -> String {
    docs.iter()
        .map(|d| format!("\n{}{}", d.content, d.name))
        .collect()
}

/// The JSON flags, typed value and rendered text of an expanded instruction.
pub(super) fn describe(instruction: &Instruction) -> (Map<String, Value>, Value, String) {
    let mut flags = Map::new();
    let mut put = |k: &str, v: Value| {
        flags.insert(k.to_string(), v);
    };
    let kw = instruction.keyword();
    let (value, text) = match instruction {
        Instruction::From(f) => {
            if let Some(p) = &f.platform {
                put("platform", json!(p));
            }
            let mut t = String::from("FROM ");
            if let Some(p) = &f.platform {
                t.push_str(&format!("--platform={p} "));
            }
            t.push_str(&f.image);
            if let Some(n) = &f.name {
                t.push_str(&format!(" AS {n}"));
            }
            (json!({"image": f.image, "name": f.name}), t)
        }
        Instruction::Run(r) => {
            let mut words = Vec::new();
            if !r.mounts.is_empty() {
                put("mount", json!(r.mounts));
                for m in &r.mounts {
                    words.push(format!("--mount={}", mount_text(m)));
                }
            }
            if let Some(n) = r.network {
                put("network", json!(n));
                words.push(format!("--network={}", json!(n).as_str().unwrap_or("")));
            }
            if let Some(s) = r.security {
                put("security", json!(s));
                words.push(format!("--security={}", json!(s).as_str().unwrap_or("")));
            }
            words.push(command_text(&r.command));
            (
                json!({"command": r.command}),
                format!("RUN {}{}", words.join(" "), heredoc_text(&r.heredocs)),
            )
        }
        Instruction::Cmd(c) | Instruction::Entrypoint(c) => {
            (json!({"command": c}), format!("{kw} {}", command_text(c)))
        }
        Instruction::Env(kvs) | Instruction::Label(kvs) => {
            let pairs: Vec<String> = kvs
                .iter()
                .map(|kv| format!("{}={}", quote(&kv.key), quote(&kv.value)))
                .collect();
            (json!(kvs), format!("{kw} {}", pairs.join(" ")))
        }
        Instruction::Maintainer(s) | Instruction::Workdir(s) | Instruction::Stopsignal(s) => {
            (json!(s), format!("{kw} {s}"))
        }
        Instruction::User(s) => {
            let (user, group) = Instruction::user_group(s);
            (json!({"user": user, "group": group}), format!("USER {s}"))
        }
        Instruction::Expose(ports) => {
            let specs: Vec<Value> = ports
                .iter()
                .filter_map(|p| PortSpec::parse(p).ok())
                .map(|p| json!(p))
                .collect();
            (Value::Array(specs), format!("EXPOSE {}", ports.join(" ")))
        }
        Instruction::Volume(v) => (
            json!(v),
            format!("VOLUME {}", serde_json::to_string(v).unwrap_or_default()),
        ),
        Instruction::Arg(decls) => {
            let words: Vec<String> = decls
                .iter()
                .map(|d| match &d.default {
                    Some(v) => format!("{}={}", d.name, quote(v)),
                    None => d.name.clone(),
                })
                .collect();
            (
                Value::Array(
                    decls
                        .iter()
                        .map(|d| json!({"name": d.name, "value": d.default}))
                        .collect(),
                ),
                format!("ARG {}", words.join(" ")),
            )
        }
        Instruction::Add(a) => {
            let mut words = Vec::new();
            for (k, v) in [
                ("chown", &a.chown),
                ("chmod", &a.chmod),
                ("checksum", &a.checksum),
            ] {
                if let Some(v) = v {
                    put(k, json!(v));
                    words.push(format!("--{k}={v}"));
                }
            }
            if a.keep_git_dir {
                put("keep-git-dir", json!(true));
                words.push("--keep-git-dir".into());
            }
            if a.link {
                put("link", json!(true));
                words.push("--link".into());
            }
            if !a.exclude.is_empty() {
                put("exclude", json!(a.exclude));
                words.extend(a.exclude.iter().map(|e| format!("--exclude={e}")));
            }
            words.extend(a.sources.iter().cloned());
            words.push(a.dest.clone());
            (
                json!({"sources": a.sources, "dest": a.dest}),
                format!("ADD {}{}", words.join(" "), heredoc_text(&a.heredocs)),
            )
        }
        Instruction::Copy(c) => {
            let mut words = Vec::new();
            for (k, v) in [("from", &c.from), ("chown", &c.chown), ("chmod", &c.chmod)] {
                if let Some(v) = v {
                    put(k, json!(v));
                    words.push(format!("--{k}={v}"));
                }
            }
            if c.link {
                put("link", json!(true));
                words.push("--link".into());
            }
            if c.parents {
                put("parents", json!(true));
                words.push("--parents".into());
            }
            if !c.exclude.is_empty() {
                put("exclude", json!(c.exclude));
                words.extend(c.exclude.iter().map(|e| format!("--exclude={e}")));
            }
            words.extend(c.sources.iter().cloned());
            words.push(c.dest.clone());
            (
                json!({"sources": c.sources, "dest": c.dest}),
                format!("COPY {}{}", words.join(" "), heredoc_text(&c.heredocs)),
            )
        }
        Instruction::Onbuild { trigger, .. } => (json!(trigger), format!("ONBUILD {trigger}")),
        Instruction::Healthcheck(h) => match h {
            dockerfile::Healthcheck::None => (json!("NONE"), "HEALTHCHECK NONE".to_string()),
            dockerfile::Healthcheck::Cmd {
                test,
                interval_ns,
                timeout_ns,
                start_period_ns,
                start_interval_ns,
                retries,
            } => {
                let mut words = Vec::new();
                for (k, v) in [
                    ("interval", interval_ns),
                    ("timeout", timeout_ns),
                    ("start-period", start_period_ns),
                    ("start-interval", start_interval_ns),
                ] {
                    if let Some(v) = v {
                        put(&format!("{}_ns", k.replace('-', "_")), json!(v));
                        words.push(format!("--{k}={v}ns"));
                    }
                }
                if let Some(r) = retries {
                    put("retries", json!(r));
                    words.push(format!("--retries={r}"));
                }
                words.push(format!("CMD {}", command_text(test)));
                (
                    json!({"test": test}),
                    format!("HEALTHCHECK {}", words.join(" ")),
                )
            }
        },
        Instruction::Shell(v) => (
            json!(v),
            format!("SHELL {}", serde_json::to_string(v).unwrap_or_default()),
        ),
    };
    (flags, value, text)
}
