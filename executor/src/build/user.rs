//! `USER` resolution: turns `user[:group]` (names or numeric ids) into the
//! uid, gid, supplementary groups and home directory a step runs with,
//! reading the rootfs's own `/etc/passwd` and `/etc/group` (never the
//! host's), with Docker's rules:
//!
//! - a numeric user that passwd does not know runs with gid 0 and home `/`
//!   (`/root` for uid 0);
//! - a user name that passwd does not know is an error;
//! - with an explicit group, that group is the only group; without one, the
//!   primary group comes from passwd and the supplementary groups are every
//!   group in `/etc/group` that lists the user's name.

use crate::build::fsutil::resolve_in_root;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups, sorted, without duplicates (may include `gid`).
    pub groups: Vec<u32>,
    pub home: PathBuf,
    /// The passwd name, when the user has one.
    pub name: Option<String>,
}

impl ResolvedUser {
    pub fn root() -> Self {
        ResolvedUser {
            uid: 0,
            gid: 0,
            groups: Vec::new(),
            home: PathBuf::from("/root"),
            name: Some("root".into()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UserError {
    #[error("unable to find user {user}: no matching entries in {passwd}")]
    UnknownUser { user: String, passwd: PathBuf },
    #[error("unable to find group {group}: no matching entries in {file}")]
    UnknownGroup { group: String, file: PathBuf },
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("invalid user specification {0:?}")]
    Invalid(String),
}

struct PasswdEntry {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupEntry {
    name: String,
    gid: u32,
    members: Vec<String>,
}

/// Reads a colon-separated database from the rootfs; a missing file is an
/// empty database (scratch images have none).
fn read_db(rootfs: &Path, rel: &str) -> Result<(PathBuf, String), UserError> {
    let path = resolve_in_root(rootfs, Path::new(rel)).map_err(|source| UserError::Read {
        path: rootfs.join(rel.trim_start_matches('/')),
        source,
    })?;
    match std::fs::read(&path) {
        Ok(b) => Ok((path, String::from_utf8_lossy(&b).into_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok((path, String::new())),
        Err(source) => Err(UserError::Read { path, source }),
    }
}

fn parse_passwd(text: &str) -> Vec<PasswdEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 7 {
                return None;
            }
            Some(PasswdEntry {
                name: f[0].to_string(),
                uid: f[2].parse().ok()?,
                gid: f[3].parse().ok()?,
                home: f[5].to_string(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupEntry> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            if f.len() < 4 {
                return None;
            }
            Some(GroupEntry {
                name: f[0].to_string(),
                gid: f[2].parse().ok()?,
                members: f[3]
                    .split(',')
                    .filter(|m| !m.is_empty())
                    .map(str::to_string)
                    .collect(),
            })
        })
        .collect()
}

/// Resolves `spec` (`user`, `uid`, `user:group`, `uid:gid`, ...) against the
/// databases in `rootfs`. An empty spec means root.
pub fn resolve_user(rootfs: &Path, spec: &str) -> Result<ResolvedUser, UserError> {
    let (user, group) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    if group.is_some_and(str::is_empty) {
        return Err(UserError::Invalid(spec.to_string()));
    }
    let user = if user.is_empty() { "0" } else { user };
    let (passwd_path, passwd) = read_db(rootfs, "/etc/passwd")?;
    let users = parse_passwd(&passwd);
    let numeric = user.parse::<u32>().ok();
    let entry = users.iter().find(|e| match numeric {
        Some(uid) => e.uid == uid,
        None => e.name == user,
    });
    let (uid, mut gid, home, name) = match (entry, numeric) {
        (Some(e), _) => (e.uid, e.gid, PathBuf::from(&e.home), Some(e.name.clone())),
        (None, Some(uid)) => (uid, 0, PathBuf::new(), None),
        (None, None) => {
            return Err(UserError::UnknownUser {
                user: user.to_string(),
                passwd: passwd_path,
            });
        }
    };
    let home = match (uid, home.as_os_str().is_empty()) {
        (0, true) => PathBuf::from("/root"),
        (_, true) => PathBuf::from("/"),
        _ => home,
    };
    let mut groups = Vec::new();
    if let Some(g) = group {
        let (group_path, text) = read_db(rootfs, "/etc/group")?;
        gid = match g.parse::<u32>() {
            Ok(n) => n,
            Err(_) => parse_group(&text)
                .iter()
                .find(|e| e.name == g)
                .map(|e| e.gid)
                .ok_or_else(|| UserError::UnknownGroup {
                    group: g.to_string(),
                    file: group_path,
                })?,
        };
    } else if let Some(n) = &name {
        let (_, text) = read_db(rootfs, "/etc/group")?;
        groups = parse_group(&text)
            .into_iter()
            .filter(|e| e.members.iter().any(|m| m == n))
            .map(|e| e.gid)
            .collect();
        groups.sort_unstable();
        groups.dedup();
    }
    Ok(ResolvedUser {
        uid,
        gid,
        groups,
        home,
        name,
    })
}

/// Resolves a group (name or numeric gid) against the rootfs's
/// `/etc/group` (for `COPY --chown=user:group`).
pub fn resolve_group(rootfs: &Path, group: &str) -> Result<u32, UserError> {
    if let Ok(n) = group.parse::<u32>() {
        return Ok(n);
    }
    let (path, text) = read_db(rootfs, "/etc/group")?;
    parse_group(&text)
        .iter()
        .find(|e| e.name == group)
        .map(|e| e.gid)
        .ok_or_else(|| UserError::UnknownGroup {
            group: group.to_string(),
            file: path,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rootfs() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        std::fs::write(
            d.path().join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n# comment\nbroken\n",
        )
        .unwrap();
        std::fs::write(
            d.path().join("etc/group"),
            "root:x:0:\nbuilder:x:1000:\nwheel:x:10:builder,other\naudio:x:29:builder\n",
        )
        .unwrap();
        d
    }

    #[test]
    fn user_name_gets_passwd_ids_home_and_member_groups() {
        let r = rootfs();
        let u = resolve_user(r.path(), "builder").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 1000));
        assert_eq!(u.groups, vec![10, 29]);
        assert_eq!(u.home, PathBuf::from("/home/builder"));
        assert_eq!(resolve_user(r.path(), "1000").unwrap(), u);
    }

    #[test]
    fn explicit_group_replaces_supplementary_groups() {
        let r = rootfs();
        let u = resolve_user(r.path(), "builder:wheel").unwrap();
        assert_eq!((u.uid, u.gid), (1000, 10));
        assert!(u.groups.is_empty());
        let u = resolve_user(r.path(), "1000:4242").unwrap();
        assert_eq!(u.gid, 4242);
    }

    #[test]
    fn groups_resolve_by_name_or_number() {
        let r = rootfs();
        assert_eq!(resolve_group(r.path(), "wheel").unwrap(), 10);
        assert_eq!(resolve_group(r.path(), "77").unwrap(), 77);
        assert!(resolve_group(r.path(), "nope").is_err());
    }

    #[test]
    fn unknown_numeric_user_runs_with_gid_zero_and_home_slash() {
        let r = rootfs();
        let u = resolve_user(r.path(), "4321").unwrap();
        assert_eq!((u.uid, u.gid, u.home), (4321, 0, PathBuf::from("/")));
        assert_eq!(u.name, None);
    }

    #[test]
    fn unknown_names_are_errors_naming_the_file() {
        let r = rootfs();
        let err = resolve_user(r.path(), "nobody-here").unwrap_err();
        assert!(err.to_string().contains("etc/passwd"), "{err}");
        let err = resolve_user(r.path(), "builder:nogroup").unwrap_err();
        assert!(err.to_string().contains("nogroup"), "{err}");
        assert!(resolve_user(r.path(), "builder:").is_err());
    }

    #[test]
    fn empty_spec_and_scratch_image_mean_root() {
        let r = rootfs();
        assert_eq!(resolve_user(r.path(), "").unwrap(), ResolvedUser::root());
        let empty = tempfile::tempdir().unwrap();
        let u = resolve_user(empty.path(), "0").unwrap();
        assert_eq!((u.uid, u.gid, u.home), (0, 0, PathBuf::from("/root")));
    }

    #[test]
    fn passwd_behind_an_absolute_symlink_is_read_from_the_rootfs() {
        let r = rootfs();
        std::fs::rename(r.path().join("etc"), r.path().join("real-etc")).unwrap();
        std::os::unix::fs::symlink("/real-etc", r.path().join("etc")).unwrap();
        assert_eq!(resolve_user(r.path(), "builder").unwrap().uid, 1000);
    }
}
