//! The walk snapshotter: no mounts at all. `prepare` records the metadata of
//! every path of a flattened rootfs (a parallel walk), the step modifies the
//! rootfs in place, and `diff` walks again and compares.
//!
//! Promises:
//! - a path is changed when its type, mode, owner, size, mtime, ctime, inode,
//!   device number or link target differ (directories: type, mode, owner,
//!   mtime only, as in the overlay snapshotter). The kernel updates ctime on
//!   every content or metadata change and user space cannot set it, so
//!   metadata always decides and no file content is ever hashed;
//! - a deleted path becomes a deletion, once: paths under a deleted
//!   directory are implied;
//! - a directory that replaces a non-directory is opaque (the same as
//!   overlayfs's rule), so both snapshotters give the same layer;
//! - ignored paths (`proc`, `sys`, `dev` and any configured ones, relative to
//!   the rootfs; optionally every mount point under it) are neither walked nor
//!   reported.

use super::{
    Change, ChangeEntry, ChangeKind, LowerLayout, Mounted, MountedState, SnapshotError, Snapshotter,
};
use rayon::prelude::*;
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Paths never snapshotted: virtual filesystems owned by the runtime.
pub const DEFAULT_IGNORED: [&str; 3] = ["proc", "sys", "dev"];

#[derive(Debug, Clone)]
pub struct WalkSnapshotter {
    ignored: Vec<PathBuf>,
    ignore_mounts: bool,
}

impl Default for WalkSnapshotter {
    fn default() -> Self {
        WalkSnapshotter::new(Vec::new())
    }
}

impl WalkSnapshotter {
    /// `extra_ignored` are paths inside the rootfs (`/var/run/secrets` or
    /// `var/run/secrets`), added to [`DEFAULT_IGNORED`].
    pub fn new(extra_ignored: Vec<PathBuf>) -> Self {
        let mut ignored: Vec<PathBuf> = DEFAULT_IGNORED.iter().map(PathBuf::from).collect();
        for p in extra_ignored {
            let rel: PathBuf = p
                .components()
                .filter(|c| matches!(c, std::path::Component::Normal(_)))
                .collect();
            if !rel.as_os_str().is_empty() {
                ignored.push(rel);
            }
        }
        WalkSnapshotter {
            ignored,
            ignore_mounts: false,
        }
    }

    /// Also skips every mount point below the rootfs (from
    /// `/proc/self/mountinfo`), as Kaniko does for secrets and volumes when
    /// the rootfs is the container's `/`.
    pub fn ignoring_mount_points(mut self) -> Self {
        self.ignore_mounts = true;
        self
    }

    fn ignore_set(&self, root: &Path) -> Result<Arc<HashSet<PathBuf>>, SnapshotError> {
        let mut set: HashSet<PathBuf> = self.ignored.iter().cloned().collect();
        if self.ignore_mounts {
            let info = std::fs::read_to_string("/proc/self/mountinfo")
                .map_err(|e| SnapshotError::io("reading", Path::new("/proc/self/mountinfo"), e))?;
            let root =
                std::fs::canonicalize(root).map_err(|e| SnapshotError::io("resolving", root, e))?;
            for line in info.lines() {
                let Some(mp) = line.split(' ').nth(4) else {
                    continue;
                };
                let mp = PathBuf::from(unescape_mountinfo(mp));
                if let Ok(rel) = mp.strip_prefix(&root)
                    && !rel.as_os_str().is_empty()
                {
                    set.insert(rel.to_path_buf());
                }
            }
        }
        Ok(Arc::new(set))
    }
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// What the walk remembers of one path.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Meta {
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    ino: u64,
    rdev: u64,
    link: Option<PathBuf>,
}

const S_IFMT: u32 = libc::S_IFMT;
const S_IFDIR: u32 = libc::S_IFDIR;

impl Meta {
    fn is_dir(&self) -> bool {
        self.mode & S_IFMT == S_IFDIR
    }

    fn same_for_layer(&self, other: &Meta) -> bool {
        if self.mode & S_IFMT != other.mode & S_IFMT {
            return false;
        }
        let dir_equal = self.mode == other.mode
            && self.uid == other.uid
            && self.gid == other.gid
            && self.mtime == other.mtime;
        if self.is_dir() {
            return dir_equal;
        }
        dir_equal
            && self.size == other.size
            && self.ctime == other.ctime
            && self.ino == other.ino
            && self.rdev == other.rdev
            && self.link == other.link
    }
}

type Tree = HashMap<PathBuf, Meta>;

#[derive(Debug)]
pub(crate) struct WalkState {
    before: Tree,
    ignored: Arc<HashSet<PathBuf>>,
}

fn walk(root: &Path, ignored: &HashSet<PathBuf>) -> Result<Tree, SnapshotError> {
    let entries = walk_dir(root, PathBuf::new(), ignored)?;
    Ok(entries.into_iter().collect())
}

fn walk_dir(
    root: &Path,
    rel: PathBuf,
    ignored: &HashSet<PathBuf>,
) -> Result<Vec<(PathBuf, Meta)>, SnapshotError> {
    let dir = root.join(&rel);
    let rd = std::fs::read_dir(&dir).map_err(|e| SnapshotError::io("reading", &dir, e))?;
    let mut out = Vec::new();
    let mut subdirs = Vec::new();
    for ent in rd {
        let ent = ent.map_err(|e| SnapshotError::io("reading", &dir, e))?;
        let path = rel.join(ent.file_name());
        if ignored.contains(&path) {
            continue;
        }
        // DirEntry::metadata is an fstatat relative to the open directory
        // (no path walk from the root) and does not follow symlinks.
        let m = match ent.metadata() {
            Ok(m) => m,
            // Deleted between readdir and lstat (a step's leftover process):
            // the path does not exist in this state.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(SnapshotError::io("inspecting", &ent.path(), e)),
        };
        let link = if m.file_type().is_symlink() {
            let host = ent.path();
            Some(
                std::fs::read_link(&host)
                    .map_err(|e| SnapshotError::io("reading link", &host, e))?,
            )
        } else {
            None
        };
        if m.is_dir() {
            subdirs.push(path.clone());
        }
        out.push((
            path,
            Meta {
                mode: m.mode(),
                uid: m.uid(),
                gid: m.gid(),
                size: m.size(),
                mtime: (m.mtime(), m.mtime_nsec()),
                ctime: (m.ctime(), m.ctime_nsec()),
                ino: m.ino(),
                rdev: m.rdev(),
                link,
            },
        ));
    }
    let nested: Vec<Vec<(PathBuf, Meta)>> = subdirs
        .into_par_iter()
        .map(|d| walk_dir(root, d, ignored))
        .collect::<Result<_, _>>()?;
    for n in nested {
        out.extend(n);
    }
    Ok(out)
}

impl Snapshotter for WalkSnapshotter {
    fn lower_layout(&self) -> LowerLayout {
        LowerLayout::Flattened
    }

    fn prepare(&self, lowers: &[PathBuf], _scratch: &Path) -> Result<Mounted, SnapshotError> {
        let [root] = lowers else {
            return Err(SnapshotError::Invalid(format!(
                "the walk snapshotter works on one flattened rootfs, got {} directories",
                lowers.len()
            )));
        };
        let ignored = self.ignore_set(root)?;
        let before = walk(root, &ignored)?;
        Ok(Mounted {
            rootfs: root.clone(),
            state: MountedState::Walk(WalkState { before, ignored }),
        })
    }

    fn diff(&self, mounted: &Mounted) -> Result<Change, SnapshotError> {
        let MountedState::Walk(state) = &mounted.state else {
            return Err(SnapshotError::WrongSnapshotter);
        };
        let root = &mounted.rootfs;
        let after = walk(root, &state.ignored)?;
        let mut entries = Vec::new();
        for (path, now) in &after {
            let (changed, opaque) = match state.before.get(path) {
                None => (true, false),
                Some(old) => (!old.same_for_layer(now), now.is_dir() && !old.is_dir()),
            };
            if changed {
                entries.push(ChangeEntry {
                    path: path.clone(),
                    kind: ChangeKind::Write {
                        source: root.join(path),
                        opaque,
                    },
                });
            }
        }
        for path in state.before.keys() {
            if after.contains_key(path) {
                continue;
            }
            let parent_gone = path
                .parent()
                .is_some_and(|p| state.before.contains_key(p) && !after.contains_key(p));
            if !parent_gone {
                entries.push(ChangeEntry {
                    path: path.clone(),
                    kind: ChangeKind::Delete,
                });
            }
        }
        Ok(Change::new(entries, root))
    }

    fn commit(&self, mounted: Mounted, _dest: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
        Ok(vec![mounted.rootfs.clone()])
    }

    fn release(&self, _mounted: Mounted) -> Result<(), SnapshotError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::layer::{MtimePolicy, write_tar};
    use crate::build::snapshot::overlay::OverlaySnapshotter;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn names(c: &Change) -> Vec<String> {
        c.entries()
            .iter()
            .map(|e| {
                let tag = match &e.kind {
                    ChangeKind::Delete => "-",
                    ChangeKind::Write { opaque: true, .. } => "O",
                    ChangeKind::Write { .. } => "+",
                };
                format!("{tag}{}", e.path.display())
            })
            .collect()
    }

    fn base(dir: &Path) {
        std::fs::create_dir_all(dir.join("etc/conf.d")).unwrap();
        std::fs::write(dir.join("etc/conf.d/a"), b"a").unwrap();
        std::fs::write(dir.join("etc/keep"), b"k").unwrap();
        std::fs::write(dir.join("etc/mode"), b"m").unwrap();
        std::fs::create_dir_all(dir.join("var/lib/x/deep")).unwrap();
        std::fs::write(dir.join("var/lib/x/deep/data"), b"d").unwrap();
        std::fs::write(dir.join("gone"), b"g").unwrap();
        std::fs::write(dir.join("becomes-dir"), b"g").unwrap();
        std::fs::create_dir_all(dir.join("proc/1")).unwrap();
        std::fs::create_dir_all(dir.join("usr/bin")).unwrap();
        std::os::unix::fs::symlink("/usr/bin", dir.join("bin")).unwrap();
    }

    #[test]
    fn walk_diff_finds_adds_changes_and_collapsed_deletions() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("root");
        base(&root);
        let snap = WalkSnapshotter::new(vec!["/etc/conf.d".into()]);
        let m = snap.prepare(std::slice::from_ref(&root), d.path()).unwrap();
        std::fs::write(root.join("etc/conf.d/ignored"), b"i").unwrap();
        std::fs::write(root.join("proc/1/status"), b"ignored too").unwrap();
        std::fs::set_permissions(
            root.join("etc/mode"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::remove_dir_all(root.join("var/lib/x")).unwrap();
        std::fs::remove_file(root.join("gone")).unwrap();
        std::fs::remove_file(root.join("becomes-dir")).unwrap();
        std::fs::create_dir(root.join("becomes-dir")).unwrap();
        std::fs::write(root.join("usr/bin/tool"), b"t").unwrap();
        let c = snap.diff(&m).unwrap();
        assert_eq!(
            names(&c),
            vec![
                "Obecomes-dir",
                "+etc",
                "+etc/mode",
                "-gone",
                "+usr",
                "+usr/bin",
                "+usr/bin/tool",
                "+var",
                "+var/lib",
                "-var/lib/x",
            ]
        );
        assert_eq!(snap.commit(m, Path::new("/unused")).unwrap(), vec![root]);
    }

    #[test]
    fn walk_needs_one_flattened_rootfs() {
        let snap = WalkSnapshotter::default();
        let err = snap
            .prepare(
                &[PathBuf::from("/a"), PathBuf::from("/b")],
                Path::new("/tmp"),
            )
            .unwrap_err();
        assert!(err.to_string().contains("got 2"), "{err}");
    }

    #[test]
    fn unchanged_tree_gives_empty_change() {
        let d = tempfile::tempdir().unwrap();
        base(d.path());
        let snap = WalkSnapshotter::default();
        let m = snap.prepare(&[d.path().to_path_buf()], d.path()).unwrap();
        let _ = std::fs::read(d.path().join("etc/keep")).unwrap();
        assert!(snap.diff(&m).unwrap().is_empty());
    }

    #[test]
    fn mountinfo_escapes_are_decoded() {
        assert_eq!(unescape_mountinfo("/a\\040b\\134c"), "/a b\\c");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }

    const SCRIPT: &str = "set -e
        echo new > etc/conf.d/new
        echo more >> etc/keep
        chmod 0600 etc/mode
        chown 1000:1000 etc/conf.d/a
        rm gone
        rm -r var/lib/x
        mkdir -p opt/app/sub
        echo app > opt/app/sub/f
        ln opt/app/sub/f opt/app/hard
        ln -s ../keep etc/conf.d/link
        rm becomes-dir
        mkdir becomes-dir
        touch becomes-dir/inner
        mkfifo opt/fifo
        ";

    /// Same base, same operations: the overlay and walk snapshotters must
    /// give byte-identical layers (with reproducible mtimes, since the two
    /// runs happen at different times).
    #[test]
    fn overlay_and_walk_give_identical_layers_for_the_same_change() {
        let d = tempfile::tempdir().unwrap();
        let lower = d.path().join("lower");
        base(&lower);
        std::fs::remove_dir_all(lower.join("proc")).unwrap();
        let flat = d.path().join("flat");
        let st = Command::new("cp")
            .arg("-a")
            .arg(&lower)
            .arg(&flat)
            .status()
            .unwrap();
        assert!(st.success());
        let run = |root: &Path| {
            let st = Command::new("sh")
                .arg("-c")
                .arg(SCRIPT)
                .current_dir(root)
                .status()
                .unwrap();
            assert!(st.success());
        };

        let overlay = OverlaySnapshotter::new();
        let m = overlay.prepare(&[lower], &d.path().join("ov")).unwrap();
        run(&m.rootfs);
        let oc = overlay.diff(&m).unwrap();
        let mut otar = Vec::new();
        write_tar(&oc, MtimePolicy::Set(1_700_000_000), &mut otar).unwrap();

        let walk = WalkSnapshotter::default();
        let w = walk.prepare(std::slice::from_ref(&flat), d.path()).unwrap();
        run(&flat);
        let wc = walk.diff(&w).unwrap();
        let mut wtar = Vec::new();
        write_tar(&wc, MtimePolicy::Set(1_700_000_000), &mut wtar).unwrap();

        assert_eq!(names(&oc), names(&wc));
        assert!(names(&oc).contains(&"-var/lib/x".to_string()));
        assert!(names(&oc).contains(&"Obecomes-dir".to_string()));
        assert_eq!(otar, wtar, "layer bytes differ");
        overlay.release(m).unwrap();
    }
}
