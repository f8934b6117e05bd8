//! Snapshotters: a writable rootfs over read-only layers, and the list of
//! what a step changed in it.
//!
//! The [`Snapshotter`] trait has the shape of containerd's snapshotters: the
//! build driver calls `prepare` with the lower stack, runs the step in
//! [`Mounted::rootfs`], asks for the [`Change`] with `diff`, writes it as a
//! layer, then either `commit`s the result (it becomes the next step's lower
//! stack) or `release`s it. The driver never needs to know which
//! implementation it holds:
//!
//! - [`overlay::OverlaySnapshotter`]: overlayfs; the change is read from the
//!   upper directory, so its cost grows with the change, not the rootfs.
//! - [`walk::WalkSnapshotter`]: no mounts; records the tree's metadata and
//!   compares after the step (for `--isolation none`).
//!
//! Both produce the same [`Change`] for the same filesystem operations (the
//! rules are in docs/build-engine.md), so the layer bytes do not depend on
//! the snapshotter.

pub mod overlay;
pub mod walk;

use std::collections::BTreeMap;
use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a snapshotter's lower stack looks like on disk, so the driver knows
/// how to materialise a base image for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LowerLayout {
    /// One directory per layer, bottom first; whiteouts in overlayfs form
    /// (0:0 character devices, `trusted.overlay.opaque=y`).
    Stacked,
    /// Exactly one directory with every layer already applied; the step
    /// modifies it in place.
    Flattened,
}

/// A prepared, writable rootfs. Dropping it without `commit`/`release`
/// still undoes its mounts (best effort), so an error path leaks nothing.
#[derive(Debug)]
pub struct Mounted {
    /// Where the step runs: the writable view of the lower stack.
    pub rootfs: PathBuf,
    state: MountedState,
}

#[derive(Debug)]
enum MountedState {
    Overlay(overlay::OverlayState),
    Walk(walk::WalkState),
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let MountedState::Overlay(state) = &mut self.state {
            state.unmount_quietly(&self.rootfs);
        }
    }
}

/// One path a step changed, relative to the rootfs (no leading `/`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChangeEntry {
    pub path: PathBuf,
    pub kind: ChangeKind,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChangeKind {
    /// Added or modified: the layer writer reads metadata and content from
    /// `source` (a host path). `opaque` directories hide everything the
    /// lower layers had below them (OCI `.wh..wh..opq`).
    Write { source: PathBuf, opaque: bool },
    /// Deleted: becomes an OCI whiteout `.wh.<name>`.
    Delete,
}

/// The change a step made, sorted by path (parents before children), with
/// every ancestor directory of a changed path present so the layer is
/// self-contained. An empty change produces no layer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Change {
    entries: Vec<ChangeEntry>,
}

impl Change {
    /// Canonicalises `entries`: drops the root itself, adds missing ancestor
    /// directories (read from `ancestors_root`), sorts component-wise.
    pub fn new(entries: Vec<ChangeEntry>, ancestors_root: &Path) -> Self {
        let mut map: BTreeMap<PathBuf, ChangeKind> = BTreeMap::new();
        for e in entries {
            if e.path.as_os_str().is_empty() {
                continue;
            }
            map.insert(e.path, e.kind);
        }
        let mut missing = Vec::new();
        for path in map.keys() {
            let mut anc = path.parent();
            while let Some(a) = anc {
                if a.as_os_str().is_empty() {
                    break;
                }
                if !map.contains_key(a) {
                    missing.push(a.to_path_buf());
                }
                anc = a.parent();
            }
        }
        for a in missing {
            let source = ancestors_root.join(&a);
            map.entry(a).or_insert(ChangeKind::Write {
                source,
                opaque: false,
            });
        }
        Change {
            entries: map
                .into_iter()
                .map(|(path, kind)| ChangeEntry { path, kind })
                .collect(),
        }
    }

    /// The change without the paths at or below `ignored` (relative to the
    /// rootfs or absolute in the image: `/var/run` and `var/run` are the
    /// same), so ignored paths never reach a layer whichever snapshotter
    /// found them. Ancestors of what remains are kept.
    pub fn without(self, ignored: &[PathBuf]) -> Change {
        let ignored: Vec<PathBuf> = ignored
            .iter()
            .map(|p| {
                p.components()
                    .filter(|c| matches!(c, std::path::Component::Normal(_)))
                    .collect::<PathBuf>()
            })
            .filter(|p| !p.as_os_str().is_empty())
            .collect();
        if ignored.is_empty() {
            return self;
        }
        Change {
            entries: self
                .entries
                .into_iter()
                .filter(|e| !ignored.iter().any(|i| e.path.starts_with(i)))
                .collect(),
        }
    }

    pub fn entries(&self) -> &[ChangeEntry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mounting overlay on {target}: {source}")]
    Mount {
        target: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
    #[error("this Mounted was prepared by a different snapshotter")]
    WrongSnapshotter,
}

impl SnapshotError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Self {
        SnapshotError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// Gives a writable rootfs over a lower stack and reports what changed.
pub trait Snapshotter: Send + Sync {
    /// How `prepare` wants its lower stack materialised.
    fn lower_layout(&self) -> LowerLayout;

    /// Makes a writable rootfs over `lowers` (bottom first). `scratch` is an
    /// empty directory the snapshotter may use for its own state.
    fn prepare(&self, lowers: &[PathBuf], scratch: &Path) -> Result<Mounted, SnapshotError>;

    /// What changed in `mounted.rootfs` since `prepare`. Sources in the
    /// change stay readable until `commit` or `release`.
    fn diff(&self, mounted: &Mounted) -> Result<Change, SnapshotError>;

    /// Keeps the step's result: returns the lower stack the next step should
    /// be prepared on. `dest` is a path the snapshotter may move the step's
    /// files to. It is named after the layer's content (shared by builds on
    /// one state directory): when it exists already, another build made the
    /// same layer first, and its directory is used and ours discarded.
    fn commit(&self, mounted: Mounted, dest: &Path) -> Result<Vec<PathBuf>, SnapshotError>;

    /// Drops the writable view (unmounts, removes snapshotter state).
    fn release(&self, mounted: Mounted) -> Result<(), SnapshotError>;
}

/// Whether two directory states are the same for a layer: the properties a
/// tar directory entry carries. A directory whose only difference is its
/// ctime (a copy-up, a chmod to the same mode) did not change.
pub(crate) fn dir_meta_equal(a: &Metadata, b: &Metadata) -> bool {
    a.mode() == b.mode()
        && a.uid() == b.uid()
        && a.gid() == b.gid()
        && a.mtime() == b.mtime()
        && a.mtime_nsec() == b.mtime_nsec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn change_adds_ancestors_and_sorts_parents_first() {
        let root = Path::new("/r");
        let c = Change::new(
            vec![
                ChangeEntry {
                    path: "a/b/c".into(),
                    kind: ChangeKind::Delete,
                },
                ChangeEntry {
                    path: "a.txt".into(),
                    kind: ChangeKind::Write {
                        source: "/r/a.txt".into(),
                        opaque: false,
                    },
                },
                ChangeEntry {
                    path: "".into(),
                    kind: ChangeKind::Delete,
                },
            ],
            root,
        );
        let paths: Vec<_> = c.entries().iter().map(|e| e.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("a"),
                "a/b".into(),
                "a/b/c".into(),
                "a.txt".into()
            ]
        );
        assert_eq!(
            c.entries()[1].kind,
            ChangeKind::Write {
                source: "/r/a/b".into(),
                opaque: false
            }
        );
    }

    #[test]
    fn ignored_paths_and_everything_below_them_leave_the_change() {
        let w = |p: &str| ChangeEntry {
            path: p.into(),
            kind: ChangeKind::Write {
                source: Path::new("/r").join(p),
                opaque: false,
            },
        };
        let c = Change::new(
            vec![w("var/run/secrets/token"), w("var/runner"), w("etc/x")],
            Path::new("/r"),
        )
        .without(&[PathBuf::from("/var/run"), PathBuf::from("/")]);
        let paths: Vec<_> = c.entries().iter().map(|e| e.path.clone()).collect();
        assert_eq!(
            paths,
            vec![
                PathBuf::from("etc"),
                "etc/x".into(),
                "var".into(),
                "var/runner".into()
            ]
        );
    }
}
