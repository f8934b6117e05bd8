//! `RUN --mount=...` options parsed into a typed [`Mount`], with BuildKit's
//! defaults (bind mounts read-only, cache mounts shared with the target as
//! id, secrets under `/run/secrets/<id>`) and errors for unknown keys,
//! options that do not belong to the mount type and malformed values.

use super::ErrorKind;
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MountType {
    Bind,
    Cache,
    Tmpfs,
    Secret,
    Ssh,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Sharing {
    Shared,
    Private,
    Locked,
}

/// One `--mount` of a RUN instruction, with BuildKit's defaults applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Mount {
    #[serde(rename = "type")]
    pub kind: MountType,
    pub target: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    pub readonly: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sharing: Option<Sharing>,
    /// File mode; serialised in octal (`"0755"`) as it is written.
    #[serde(skip_serializing_if = "Option::is_none", serialize_with = "octal")]
    pub mode: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub uid: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gid: Option<u32>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub required: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub env: Option<String>,
}

fn octal<S: serde::Serializer>(mode: &Option<u32>, s: S) -> Result<S::Ok, S::Error> {
    match mode {
        Some(m) => s.serialize_str(&format!("{m:04o}")),
        None => s.serialize_none(),
    }
}

fn bad(value: &str, reason: impl Into<String>) -> ErrorKind {
    ErrorKind::BadFlagValue {
        flag: "mount".into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Splits `a=b,"c=d,e"` on commas outside double quotes, dropping the quotes.
fn csv_fields(value: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut quoted = false;
    for ch in value.chars() {
        match ch {
            '"' => quoted = !quoted,
            ',' if !quoted => fields.push(String::new()),
            c => fields.last_mut().map_or((), |f| f.push(c)),
        }
    }
    fields
}

fn parse_bool(raw: &str, key: &str, value: Option<&str>) -> Result<bool, ErrorKind> {
    match value.map(str::to_ascii_lowercase).as_deref() {
        None | Some("true") | Some("1") => Ok(true),
        Some("false") | Some("0") => Ok(false),
        Some(other) => Err(bad(raw, format!("invalid value for {key}: {other}"))),
    }
}

/// Parses a size such as `64m`, `1G` or `1024` (bytes) as Docker's
/// `RAMInBytes` does (binary units).
fn parse_size(raw: &str, s: &str) -> Result<u64, ErrorKind> {
    let lower = s.trim().to_ascii_lowercase();
    let digits_end = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let number: f64 = lower[..digits_end]
        .parse()
        .map_err(|_| bad(raw, format!("invalid size: {s}")))?;
    let unit = lower[digits_end..]
        .trim_end_matches("ib")
        .trim_end_matches('b');
    let mult: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad(raw, format!("invalid size: {s}"))),
    };
    Ok((number * mult as f64) as u64)
}

fn parse_u32(raw: &str, key: &str, value: &str, radix: u32) -> Result<u32, ErrorKind> {
    u32::from_str_radix(value, radix)
        .map_err(|_| bad(raw, format!("invalid value for {key}: {value}")))
}

impl Mount {
    /// Parses one `--mount` value; `expand(key, value)` is applied to every
    /// option's value (BuildKit expands ARG/ENV in mount options).
    pub fn parse(
        raw: &str,
        expand: &mut dyn FnMut(&str, &str) -> Result<String, ErrorKind>,
    ) -> Result<Mount, ErrorKind> {
        let mut pairs = Vec::new();
        for field in csv_fields(raw) {
            let field = field.trim();
            if field.is_empty() {
                continue;
            }
            let (key, value) = match field.split_once('=') {
                Some((k, v)) => {
                    let key = k.trim().to_ascii_lowercase();
                    let value = expand(&key, v)?;
                    (key, Some(value))
                }
                None => (field.to_ascii_lowercase(), None),
            };
            pairs.push((key, value));
        }
        let kind = match pairs
            .iter()
            .find(|(k, _)| k == "type")
            .and_then(|(_, v)| v.as_deref())
        {
            None => MountType::Bind,
            Some(t) => match t.to_ascii_lowercase().as_str() {
                "bind" => MountType::Bind,
                "cache" => MountType::Cache,
                "tmpfs" => MountType::Tmpfs,
                "secret" => MountType::Secret,
                "ssh" => MountType::Ssh,
                other => return Err(bad(raw, format!("unsupported mount type {other:?}"))),
            },
        };
        let mut m = Mount {
            kind,
            target: None,
            source: None,
            from: None,
            readonly: kind == MountType::Bind,
            id: None,
            sharing: None,
            mode: None,
            uid: None,
            gid: None,
            required: false,
            size: None,
            env: None,
        };
        let type_name = serde_json::to_value(kind)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        for (key, value) in &pairs {
            let allowed: &[&str] = match kind {
                MountType::Bind => &["source", "from", "readonly", "readwrite"],
                MountType::Cache => &[
                    "source",
                    "from",
                    "readonly",
                    "readwrite",
                    "id",
                    "sharing",
                    "mode",
                    "uid",
                    "gid",
                ],
                MountType::Tmpfs => &["size"],
                MountType::Secret => &["id", "required", "mode", "uid", "gid", "env"],
                MountType::Ssh => &["id", "required", "mode", "uid", "gid"],
            };
            let canonical = match key.as_str() {
                "type" => continue,
                "target" | "dst" | "destination" => "target",
                "source" | "src" => "source",
                "readonly" | "ro" => "readonly",
                "readwrite" | "rw" => "readwrite",
                "from" | "id" | "sharing" | "mode" | "uid" | "gid" | "required" | "size"
                | "env" => key.as_str(),
                other => return Err(bad(raw, format!("unexpected key '{other}'"))),
            };
            if canonical != "target" && !allowed.contains(&canonical) {
                return Err(bad(
                    raw,
                    format!("option '{key}' is not allowed for type={type_name} mounts"),
                ));
            }
            let needs_value = |v: &Option<String>| {
                v.clone()
                    .ok_or_else(|| bad(raw, format!("option '{key}' needs a value")))
            };
            match canonical {
                "target" => m.target = Some(needs_value(value)?),
                "source" => m.source = Some(needs_value(value)?),
                "from" => m.from = Some(needs_value(value)?),
                "id" => m.id = Some(needs_value(value)?),
                "env" => m.env = Some(needs_value(value)?),
                "readonly" => m.readonly = parse_bool(raw, key, value.as_deref())?,
                "readwrite" => m.readonly = !parse_bool(raw, key, value.as_deref())?,
                "required" => m.required = parse_bool(raw, key, value.as_deref())?,
                "sharing" => {
                    m.sharing = Some(match needs_value(value)?.to_ascii_lowercase().as_str() {
                        "shared" => Sharing::Shared,
                        "private" => Sharing::Private,
                        "locked" => Sharing::Locked,
                        other => {
                            return Err(bad(raw, format!("unsupported sharing value {other:?}")));
                        }
                    })
                }
                "mode" => m.mode = Some(parse_u32(raw, key, &needs_value(value)?, 8)?),
                "uid" => m.uid = Some(parse_u32(raw, key, &needs_value(value)?, 10)?),
                "gid" => m.gid = Some(parse_u32(raw, key, &needs_value(value)?, 10)?),
                _ => m.size = Some(parse_size(raw, &needs_value(value)?)?),
            }
        }
        match kind {
            MountType::Bind | MountType::Cache | MountType::Tmpfs => {
                if m.target.as_deref().is_none_or(str::is_empty) {
                    return Err(bad(raw, format!("type={type_name} mounts need a target")));
                }
                if kind == MountType::Cache {
                    m.sharing.get_or_insert(Sharing::Shared);
                    if m.id.is_none() {
                        m.id.clone_from(&m.target);
                    }
                }
            }
            MountType::Secret => {
                if m.id.is_none() && m.target.is_none() && m.env.is_none() {
                    return Err(bad(raw, "secret mounts need an id or a target"));
                }
                if m.id.is_none() {
                    let from_target = m
                        .target
                        .as_deref()
                        .and_then(|t| t.trim_end_matches('/').rsplit('/').next())
                        .map(str::to_string);
                    m.id = from_target.or_else(|| m.env.clone());
                }
                if m.target.is_none() && m.env.is_none() {
                    m.target = m.id.as_ref().map(|id| format!("/run/secrets/{id}"));
                }
            }
            MountType::Ssh => {
                m.id.get_or_insert_with(|| "default".to_string());
            }
        }
        Ok(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Mount, ErrorKind> {
        Mount::parse(raw, &mut |_, v| Ok(v.to_string()))
    }

    #[test]
    fn bind_is_the_default_type_and_read_only() {
        let m = parse("target=/src,source=app,from=builder").unwrap();
        assert_eq!(m.kind, MountType::Bind);
        assert!(m.readonly);
        assert_eq!(m.source.as_deref(), Some("app"));
        assert_eq!(m.from.as_deref(), Some("builder"));
        assert!(!parse("type=bind,dst=/x,rw").unwrap().readonly);
        assert!(
            !parse("type=bind,destination=/x,readwrite=true")
                .unwrap()
                .readonly
        );
        assert!(parse("type=bind,target=/x,ro=true").unwrap().readonly);
    }

    #[test]
    fn cache_mount_takes_all_its_options() {
        let m = parse("type=cache,target=/root/.cache,id=pip,sharing=locked,mode=0755,uid=1000,gid=1001,from=base,source=/c,ro").unwrap();
        assert_eq!(m.kind, MountType::Cache);
        assert_eq!(m.id.as_deref(), Some("pip"));
        assert_eq!(m.sharing, Some(Sharing::Locked));
        assert_eq!(m.mode, Some(0o755));
        assert_eq!((m.uid, m.gid), (Some(1000), Some(1001)));
        assert!(m.readonly);
        let d = parse("type=cache,target=/c").unwrap();
        assert_eq!(d.id.as_deref(), Some("/c"));
        assert_eq!(d.sharing, Some(Sharing::Shared));
        assert!(!d.readonly);
    }

    #[test]
    fn tmpfs_size_uses_binary_units() {
        assert_eq!(
            parse("type=tmpfs,target=/t,size=64m").unwrap().size,
            Some(64 << 20)
        );
        assert_eq!(
            parse("type=tmpfs,target=/t,size=1024").unwrap().size,
            Some(1024)
        );
        assert!(parse("type=tmpfs,target=/t,size=lots").is_err());
    }

    #[test]
    fn secret_defaults_id_and_target() {
        let s = parse("type=secret,id=aws").unwrap();
        assert_eq!(s.target.as_deref(), Some("/run/secrets/aws"));
        assert!(!s.required);
        let t = parse("type=secret,target=/etc/token,required").unwrap();
        assert_eq!(t.id.as_deref(), Some("token"));
        assert!(t.required);
        let e = parse("type=secret,id=k,env=API_KEY").unwrap();
        assert_eq!(e.env.as_deref(), Some("API_KEY"));
        assert_eq!(e.target, None);
        assert!(parse("type=secret").is_err());
    }

    #[test]
    fn ssh_defaults_its_id() {
        let s = parse("type=ssh,required=true,mode=0600").unwrap();
        assert_eq!(s.id.as_deref(), Some("default"));
        assert_eq!(s.mode, Some(0o600));
    }

    #[test]
    fn values_are_expanded_and_quoted_fields_kept_whole() {
        let m = Mount::parse("type=cache,\"target=/a,b\",id=$X", &mut |_, v| {
            Ok(v.replace("$X", "y"))
        })
        .unwrap();
        assert_eq!(m.target.as_deref(), Some("/a,b"));
        assert_eq!(m.id.as_deref(), Some("y"));
    }

    #[test]
    fn bad_mounts_are_rejected_with_a_reason() {
        for bad in [
            "type=nfs,target=/x",
            "type=bind",
            "type=bind,target=/x,bogus=1",
            "type=bind,target=/x,size=1m",
            "type=tmpfs,target=/x,from=a",
            "type=cache,target=/x,sharing=weird",
            "type=cache,target=/x,mode=999",
            "type=cache,target=/x,uid=-1",
            "type=bind,target=/x,ro=maybe",
            "type=bind,target",
        ] {
            assert!(
                matches!(parse(bad), Err(ErrorKind::BadFlagValue { .. })),
                "{bad} should be rejected"
            );
        }
    }
}
