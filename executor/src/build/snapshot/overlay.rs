//! The overlayfs snapshotter: one read-only lower directory per layer, a
//! fresh upper directory per step, and the change read from the upper only.
//!
//! Promises:
//! - `diff` costs O(size of the change): it walks the upper directory and
//!   looks paths up in the lowers, never the whole rootfs;
//! - overlay whiteouts (0:0 character devices) become deletions and opaque
//!   directories (`trusted.overlay.opaque=y`) become opaque entries; the
//!   `trusted.overlay.*` bookkeeping never reaches a layer;
//! - the mount uses `index=off,redirect_dir=off,metacopy=off` so the upper
//!   directory always holds complete files and directories (a renamed lower
//!   directory is copied, not recorded as a redirect), which makes it a valid
//!   layer and a valid lower for the next step (`commit` renames it);
//! - any number of lowers up to overlayfs's own limit of 500: paths go
//!   through short symlinks in the scratch directory and, when the option
//!   string would still exceed a page, the mount is done from a child
//!   process whose working directory is the scratch directory so relative
//!   names can be used (`l/1f3:` is 6 bytes a layer, 3000 for 500 layers);
//! - the same layer directory may appear any number of times in the stack
//!   (identical steps give byte-identical layers, which share one unpacked
//!   directory), and empty layers cost no lower: see `mount_stack`.

use super::{
    Change, ChangeEntry, ChangeKind, LowerLayout, Mounted, MountedState, SnapshotError,
    Snapshotter, dir_meta_equal,
};
use crate::build::fsutil::{self, cstring};
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};

/// The kernel copies mount data into one page; keep a margin for the NUL.
const MAX_MOUNT_DATA: usize = 4000;

#[derive(Debug, Default, Clone)]
pub struct OverlaySnapshotter;

impl OverlaySnapshotter {
    pub fn new() -> Self {
        OverlaySnapshotter
    }
}

#[derive(Debug)]
pub(crate) struct OverlayState {
    lowers: Vec<PathBuf>,
    upper: PathBuf,
    work: PathBuf,
    links: PathBuf,
    /// The empty lower made when `prepare` got none (not part of commits).
    empty: Option<PathBuf>,
    mounted: bool,
}

impl OverlayState {
    pub(crate) fn unmount_quietly(&mut self, target: &Path) {
        if self.mounted {
            let _ = umount(target, libc::MNT_DETACH);
            self.mounted = false;
        }
    }
}

fn umount(target: &Path, flags: libc::c_int) -> io::Result<()> {
    let c = cstring(target)?;
    // SAFETY: valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } == 0 {
        crate::erofs::mount::unregister(target);
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

fn check_option_safe(path: &Path) -> Result<(), SnapshotError> {
    let s = path.as_os_str().as_encoded_bytes();
    if s.iter().any(|b| matches!(b, b',' | b':' | b'\\')) {
        return Err(SnapshotError::Invalid(format!(
            "overlay scratch path {} contains ',', ':' or '\\'",
            path.display()
        )));
    }
    Ok(())
}

impl Snapshotter for OverlaySnapshotter {
    fn lower_layout(&self) -> LowerLayout {
        LowerLayout::Stacked
    }

    fn prepare(&self, lowers: &[PathBuf], scratch: &Path) -> Result<Mounted, SnapshotError> {
        check_option_safe(scratch)?;
        let mkdir =
            |p: &Path| std::fs::create_dir_all(p).map_err(|e| SnapshotError::io("creating", p, e));
        let upper = scratch.join("upper");
        let work = scratch.join("work");
        let merged = scratch.join("merged");
        let links = scratch.join("l");
        for d in [&upper, &work, &merged, &links] {
            mkdir(d)?;
        }
        let mut stack = mount_stack(lowers)?;
        let mut empty = None;
        if stack.is_empty() {
            // overlayfs needs at least one lower directory.
            let dir = scratch.join("empty");
            mkdir(&dir)?;
            stack.push(dir.clone());
            empty = Some(dir);
        }
        // Short names keep the option string small whatever the lower paths.
        let mut short = Vec::with_capacity(stack.len());
        for (i, lower) in stack.iter().enumerate() {
            let abs =
                std::path::absolute(lower).map_err(|e| SnapshotError::io("resolving", lower, e))?;
            let link = links.join(format!("{i:x}"));
            std::os::unix::fs::symlink(&abs, &link)
                .map_err(|e| SnapshotError::io("linking", &link, e))?;
            short.push(format!("l/{i:x}"));
        }
        let top_first: Vec<&String> = short.iter().rev().collect();
        let opts = |prefix: &str, lowers: &[&String]| {
            let lower = lowers
                .iter()
                .map(|l| format!("{prefix}{l}"))
                .collect::<Vec<_>>()
                .join(":");
            format!("lowerdir={lower},upperdir={prefix}upper,workdir={prefix}work")
        };
        let absolute = opts(&format!("{}/", scratch.display()), &top_first);
        let result = if absolute.len() + COMPLETE_UPPER.len() <= MAX_MOUNT_DATA {
            mount_complete(None, &merged, &absolute)
        } else {
            let relative = opts("", &top_first);
            if relative.len() + COMPLETE_UPPER.len() > MAX_MOUNT_DATA {
                return Err(SnapshotError::Invalid(format!(
                    "{} lower layers do not fit in one overlay mount",
                    stack.len()
                )));
            }
            mount_complete(Some(scratch), &merged, &relative)
        };
        result.map_err(|source| SnapshotError::Mount {
            target: merged.clone(),
            source,
        })?;
        // Undone by the SIGTERM/SIGINT handler too if the build is killed.
        crate::erofs::mount::register(&merged);
        // The state keeps the stack as given: `commit` hands it back with
        // the new layer on top, and `diff` looks paths up in it (the same
        // answers as in the mounted stack, see `mount_stack`).
        Ok(Mounted {
            rootfs: merged,
            state: MountedState::Overlay(OverlayState {
                lowers: lowers.to_vec(),
                upper,
                work,
                links,
                empty,
                mounted: true,
            }),
        })
    }

    fn diff(&self, mounted: &Mounted) -> Result<Change, SnapshotError> {
        let MountedState::Overlay(state) = &mounted.state else {
            return Err(SnapshotError::WrongSnapshotter);
        };
        let mut entries = Vec::new();
        let mut stack = vec![PathBuf::new()];
        while let Some(rel) = stack.pop() {
            let dir = state.upper.join(&rel);
            let rd = std::fs::read_dir(&dir).map_err(|e| SnapshotError::io("reading", &dir, e))?;
            for ent in rd {
                let ent = ent.map_err(|e| SnapshotError::io("reading", &dir, e))?;
                let rel_path = rel.join(ent.file_name());
                let host = ent.path();
                let meta = std::fs::symlink_metadata(&host)
                    .map_err(|e| SnapshotError::io("inspecting", &host, e))?;
                let ft = meta.file_type();
                if ft.is_char_device() && meta.rdev() == 0 {
                    entries.push(ChangeEntry {
                        path: rel_path,
                        kind: ChangeKind::Delete,
                    });
                    continue;
                }
                if ft.is_dir() {
                    let opaque = fsutil::get_xattr(&host, "trusted.overlay.opaque")
                        .map_err(|e| SnapshotError::io("reading xattrs of", &host, e))?
                        .is_some_and(|v| v == b"y");
                    let unchanged = !opaque
                        && lower_meta(&state.lowers, &rel_path)
                            .is_some_and(|lm| lm.is_dir() && dir_meta_equal(&lm, &meta));
                    if !unchanged {
                        entries.push(ChangeEntry {
                            path: rel_path.clone(),
                            kind: ChangeKind::Write {
                                source: host,
                                opaque,
                            },
                        });
                    }
                    stack.push(rel_path);
                    continue;
                }
                entries.push(ChangeEntry {
                    path: rel_path,
                    kind: ChangeKind::Write {
                        source: host,
                        opaque: false,
                    },
                });
            }
        }
        Ok(Change::new(entries, &state.upper))
    }

    fn commit(&self, mut mounted: Mounted, dest: &Path) -> Result<Vec<PathBuf>, SnapshotError> {
        let rootfs = mounted.rootfs.clone();
        let MountedState::Overlay(state) = &mut mounted.state else {
            return Err(SnapshotError::WrongSnapshotter);
        };
        umount(&rootfs, 0).map_err(|e| SnapshotError::io("unmounting", &rootfs, e))?;
        state.mounted = false;
        match std::fs::rename(&state.upper, dest) {
            Ok(()) => {}
            // rename(2) onto a non-empty directory: another build on this
            // state directory committed the same layer (the name is its
            // diff_id) since the caller looked. Theirs is as good as ours.
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOTEMPTY | libc::EEXIST))
                    && dest.is_dir() =>
            {
                std::fs::remove_dir_all(&state.upper)
                    .map_err(|e| SnapshotError::io("removing", &state.upper, e))?;
            }
            Err(e) => return Err(SnapshotError::io("moving upper directory to", dest, e)),
        }
        let mut lowers: Vec<PathBuf> = state
            .lowers
            .iter()
            .filter(|l| Some(*l) != state.empty.as_ref())
            .cloned()
            .collect();
        lowers.push(dest.to_path_buf());
        remove_state(state, &rootfs)?;
        Ok(lowers)
    }

    fn release(&self, mut mounted: Mounted) -> Result<(), SnapshotError> {
        let rootfs = mounted.rootfs.clone();
        let MountedState::Overlay(state) = &mut mounted.state else {
            return Err(SnapshotError::WrongSnapshotter);
        };
        umount(&rootfs, 0).map_err(|e| SnapshotError::io("unmounting", &rootfs, e))?;
        state.mounted = false;
        remove_state(state, &rootfs)?;
        if state.upper.exists() {
            std::fs::remove_dir_all(&state.upper)
                .map_err(|e| SnapshotError::io("removing", &state.upper, e))?;
        }
        Ok(())
    }
}

/// The lower stack as it is mounted: each directory at most once, and
/// empty directories left out. overlayfs refuses a directory that appears
/// twice in `lowerdir` (ELOOP, "conflicting lowerdir path"); a bind mount or
/// symlink per position does not help, since the kernel compares the
/// directories themselves. Both omissions keep the merged view identical:
///
/// - an empty layer directory contributes no name, whiteout or opaque
///   marker to any lookup;
/// - of a directory `L` that appears more than once, only the topmost
///   occurrence is kept. For any path, either the topmost `L` decides it (it
///   holds the path, a whiteout for it, a non-directory or an opaque
///   directory on the way to it), and then nothing below matters, or it does
///   not, and then no copy of `L` holds anything on the way either (they are
///   the same directory), so every lower copy is transparent for that path.
///   Keeping a lower copy instead would not be equivalent: the layers
///   between the two positions would then win over `L`.
fn mount_stack(lowers: &[PathBuf]) -> Result<Vec<PathBuf>, SnapshotError> {
    let mut seen = std::collections::HashSet::new();
    let mut top_first = Vec::with_capacity(lowers.len());
    for lower in lowers.iter().rev() {
        let meta =
            std::fs::metadata(lower).map_err(|e| SnapshotError::io("inspecting", lower, e))?;
        if !seen.insert((meta.dev(), meta.ino())) {
            continue;
        }
        let mut entries =
            std::fs::read_dir(lower).map_err(|e| SnapshotError::io("reading", lower, e))?;
        if entries.next().is_none() {
            continue;
        }
        top_first.push(lower.clone());
    }
    top_first.reverse();
    Ok(top_first)
}

/// Removes the work, link and mount-point directories (never the lowers).
fn remove_state(state: &OverlayState, merged: &Path) -> Result<(), SnapshotError> {
    for d in [&state.work, &state.links, &merged.to_path_buf()] {
        if d.exists() {
            std::fs::remove_dir_all(d).map_err(|e| SnapshotError::io("removing", d, e))?;
        }
    }
    if let Some(empty) = &state.empty
        && empty.exists()
    {
        std::fs::remove_dir(empty).map_err(|e| SnapshotError::io("removing", empty, e))?;
    }
    Ok(())
}

/// The metadata `rel` has in the lower stack (topmost layer that has it),
/// or `None` when no lower has it or the topmost one holds a whiteout.
fn lower_meta(lowers: &[PathBuf], rel: &Path) -> Option<std::fs::Metadata> {
    for lower in lowers.iter().rev() {
        if let Ok(m) = std::fs::symlink_metadata(lower.join(rel)) {
            if m.file_type().is_char_device() && m.rdev() == 0 {
                return None;
            }
            return Some(m);
        }
    }
    None
}

/// Options that keep the upper directory a complete layer (module doc).
const COMPLETE_UPPER: &str = ",index=off,redirect_dir=off,metacopy=off";

/// Mounts with [`COMPLETE_UPPER`]; kernels older than those features
/// (index 4.13, redirect_dir 4.10, metacopy 4.19) reject the unknown option
/// with EINVAL and never redirect or metacopy, so the plain mount is the
/// same thing there.
fn mount_complete(cwd: Option<&Path>, target: &Path, base: &str) -> io::Result<()> {
    match mount_overlay(cwd, target, &format!("{base}{COMPLETE_UPPER}")) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => mount_overlay(cwd, target, base),
        other => other,
    }
}

/// Mounts overlayfs on `target` with `data`. With `cwd`, the mount happens
/// in a forked child that first changes into `cwd` (relative lower names
/// resolve there); the working directory is process-wide, so the parent's
/// other threads must not see it change.
fn mount_overlay(cwd: Option<&Path>, target: &Path, data: &str) -> io::Result<()> {
    let src = cstring("overlay")?;
    let fstype = cstring("overlay")?;
    let tgt = cstring(std::path::absolute(target)?)?;
    let cdata = cstring(data)?;
    let Some(cwd) = cwd else {
        // SAFETY: valid C strings.
        let rc = unsafe {
            libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fstype.as_ptr(),
                0,
                cdata.as_ptr().cast(),
            )
        };
        return if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    };
    let ccwd = cstring(cwd)?;
    // SAFETY: the child only calls chdir, mount and _exit (async-signal-safe)
    // on strings prepared before the fork, so it never touches the
    // allocator or locks another thread may have held.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        unsafe {
            if libc::chdir(ccwd.as_ptr()) != 0 {
                libc::_exit(*libc::__errno_location());
            }
            let rc = libc::mount(
                src.as_ptr(),
                tgt.as_ptr(),
                fstype.as_ptr(),
                0,
                cdata.as_ptr().cast(),
            );
            libc::_exit(if rc == 0 {
                0
            } else {
                *libc::__errno_location()
            });
        }
    }
    let mut status = 0;
    loop {
        // SAFETY: waiting for our own child.
        let r = unsafe { libc::waitpid(pid, &mut status, 0) };
        if r == pid {
            break;
        }
        let err = io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return Err(err);
        }
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else if libc::WIFEXITED(status) {
        Err(io::Error::from_raw_os_error(libc::WEXITSTATUS(status)))
    } else {
        Err(io::Error::other("overlay mount helper was killed"))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::build::snapshot::ChangeKind;
    use std::os::unix::fs::PermissionsExt;

    /// Unmounts a Mounted if a test fails before releasing it (Mounted's own
    /// Drop does this; the guard also removes the temp dir afterwards).
    pub(crate) struct Scratch {
        pub dir: tempfile::TempDir,
    }

    impl Scratch {
        pub(crate) fn new() -> Self {
            Scratch {
                dir: tempfile::tempdir().unwrap(),
            }
        }
        pub(crate) fn path(&self) -> &Path {
            self.dir.path()
        }
    }

    fn kinds(c: &Change) -> Vec<(String, &'static str)> {
        c.entries()
            .iter()
            .map(|e| {
                let k = match &e.kind {
                    ChangeKind::Delete => "delete",
                    ChangeKind::Write { opaque: true, .. } => "opaque",
                    ChangeKind::Write { .. } => "write",
                };
                (e.path.display().to_string(), k)
            })
            .collect()
    }

    fn base(dir: &Path) {
        std::fs::create_dir_all(dir.join("etc/conf.d")).unwrap();
        std::fs::write(dir.join("etc/conf.d/a"), b"a").unwrap();
        std::fs::write(dir.join("etc/keep"), b"k").unwrap();
        std::fs::create_dir_all(dir.join("var/lib/x")).unwrap();
        std::fs::write(dir.join("var/lib/x/data"), b"d").unwrap();
        std::fs::write(dir.join("gone"), b"g").unwrap();
    }

    #[test]
    fn diff_reports_only_the_change_with_oci_semantics() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        let snap = OverlaySnapshotter::new();
        let m = snap
            .prepare(std::slice::from_ref(&lower), &s.path().join("s"))
            .unwrap();
        let r = &m.rootfs;
        assert_eq!(std::fs::read(r.join("etc/keep")).unwrap(), b"k");
        std::fs::write(r.join("etc/conf.d/new"), b"n").unwrap();
        std::fs::remove_file(r.join("gone")).unwrap();
        std::fs::remove_dir_all(r.join("var/lib/x")).unwrap();
        std::fs::create_dir(r.join("var/lib/x")).unwrap();
        std::fs::write(r.join("var/lib/x/fresh"), b"f").unwrap();
        let c = snap.diff(&m).unwrap();
        assert_eq!(
            kinds(&c),
            vec![
                ("etc".into(), "write"),
                ("etc/conf.d".into(), "write"),
                ("etc/conf.d/new".into(), "write"),
                ("gone".into(), "delete"),
                ("var".into(), "write"),
                ("var/lib".into(), "write"),
                ("var/lib/x".into(), "opaque"),
                ("var/lib/x/fresh".into(), "write"),
            ]
        );
        snap.release(m).unwrap();
        // Lower untouched, scratch state gone.
        assert!(lower.join("gone").exists());
        assert!(!s.path().join("s/merged").exists());
    }

    #[test]
    fn copied_up_but_unchanged_directories_are_not_changes() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        std::fs::set_permissions(
            lower.join("etc/keep"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        let snap = OverlaySnapshotter::new();
        let m = snap.prepare(&[lower], &s.path().join("s")).unwrap();
        // chmod copies the file (and its parents) up; only the file changed
        // (a dir that is only an ancestor is still listed, as the parent).
        std::fs::set_permissions(
            m.rootfs.join("etc/keep"),
            std::fs::Permissions::from_mode(0o644),
        )
        .unwrap();
        let c = snap.diff(&m).unwrap();
        assert_eq!(
            kinds(&c),
            vec![("etc".into(), "write"), ("etc/keep".into(), "write")]
        );
        snap.release(m).unwrap();
    }

    #[test]
    fn nothing_changed_gives_an_empty_change() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        let snap = OverlaySnapshotter::new();
        let m = snap.prepare(&[lower], &s.path().join("s")).unwrap();
        let _ = std::fs::read(m.rootfs.join("etc/keep")).unwrap();
        // A chmod to the same mode copies the directory up: still no change.
        let mode = std::fs::metadata(m.rootfs.join("etc"))
            .unwrap()
            .permissions();
        std::fs::set_permissions(m.rootfs.join("etc"), mode).unwrap();
        assert!(s.path().join("s/upper/etc").exists());
        assert!(snap.diff(&m).unwrap().is_empty());
        snap.release(m).unwrap();
    }

    #[test]
    fn commit_stacks_the_step_for_the_next_one() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        let snap = OverlaySnapshotter::new();
        let m = snap
            .prepare(std::slice::from_ref(&lower), &s.path().join("s1"))
            .unwrap();
        std::fs::write(m.rootfs.join("step1"), b"1").unwrap();
        std::fs::remove_file(m.rootfs.join("gone")).unwrap();
        let lowers = snap.commit(m, &s.path().join("layer1")).unwrap();
        assert_eq!(lowers, vec![lower.clone(), s.path().join("layer1")]);
        let m = snap.prepare(&lowers, &s.path().join("s2")).unwrap();
        assert_eq!(std::fs::read(m.rootfs.join("step1")).unwrap(), b"1");
        assert!(!m.rootfs.join("gone").exists());
        assert!(snap.diff(&m).unwrap().is_empty());
        snap.release(m).unwrap();
    }

    #[test]
    fn committing_onto_a_layer_another_build_committed_uses_theirs() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        let snap = OverlaySnapshotter::new();
        let dest = s.path().join("layers").join("same-diff-id");
        std::fs::create_dir_all(dest.parent().unwrap()).unwrap();
        let ours = snap
            .prepare(std::slice::from_ref(&lower), &s.path().join("a"))
            .unwrap();
        let theirs = snap
            .prepare(std::slice::from_ref(&lower), &s.path().join("b"))
            .unwrap();
        for m in [&ours, &theirs] {
            std::fs::write(m.rootfs.join("made"), b"same").unwrap();
        }
        snap.commit(theirs, &dest).unwrap();
        let lowers = snap.commit(ours, &dest).unwrap();
        assert_eq!(lowers, vec![lower.clone(), dest.clone()]);
        assert_eq!(std::fs::read(dest.join("made")).unwrap(), b"same");
        assert!(!s.path().join("a/upper").exists(), "our upper is discarded");
    }

    #[test]
    fn many_long_lower_paths_still_mount() {
        let s = Scratch::new();
        let long = "l".repeat(200);
        let mut lowers = Vec::new();
        for i in 0..200 {
            let d = s.path().join(format!("{long}-{i}"));
            std::fs::create_dir(&d).unwrap();
            std::fs::write(d.join(format!("f{i}")), b"x").unwrap();
            lowers.push(d);
        }
        let snap = OverlaySnapshotter::new();
        let m = snap.prepare(&lowers, &s.path().join("s")).unwrap();
        for i in 0..200 {
            assert!(m.rootfs.join(format!("f{i}")).exists());
        }
        snap.release(m).unwrap();
    }

    #[test]
    fn a_layer_directory_repeated_in_the_stack_mounts_as_its_topmost_copy() {
        let s = Scratch::new();
        let a = s.path().join("a");
        let l = s.path().join("l");
        let b = s.path().join("b");
        let empty = s.path().join("empty-layer");
        for d in [&a, &l, &b, &empty] {
            std::fs::create_dir(d).unwrap();
        }
        std::fs::write(a.join("only-a"), b"a").unwrap();
        std::fs::write(a.join("shared"), b"from a").unwrap();
        std::fs::write(l.join("shared"), b"from l").unwrap();
        std::fs::write(b.join("shared"), b"from b").unwrap();
        std::fs::write(b.join("only-b"), b"b").unwrap();
        let snap = OverlaySnapshotter::new();
        // Seven identical steps on top of an empty layer and a repeated one.
        let mut lowers = vec![a.clone(), empty.clone(), l.clone(), b.clone()];
        lowers.extend(std::iter::repeat_n(l.clone(), 7));
        lowers.push(empty.clone());
        let m = snap.prepare(&lowers, &s.path().join("s")).unwrap();
        // The topmost `l` wins over `b`, as in the stack as written.
        assert_eq!(std::fs::read(m.rootfs.join("shared")).unwrap(), b"from l");
        assert!(m.rootfs.join("only-a").exists() && m.rootfs.join("only-b").exists());
        std::fs::write(m.rootfs.join("new"), b"n").unwrap();
        let next = snap.commit(m, &s.path().join("layer")).unwrap();
        assert_eq!(
            next.len(),
            lowers.len() + 1,
            "commit keeps the stack as given"
        );
        let m = snap.prepare(&next, &s.path().join("s2")).unwrap();
        assert_eq!(std::fs::read(m.rootfs.join("new")).unwrap(), b"n");
        snap.release(m).unwrap();
        // Only empty layers: still a mount.
        let m = snap
            .prepare(&[empty.clone(), empty], &s.path().join("s3"))
            .unwrap();
        assert!(snap.diff(&m).unwrap().is_empty());
        snap.release(m).unwrap();
    }

    #[test]
    fn dropping_a_mounted_view_unmounts_it() {
        let s = Scratch::new();
        let lower = s.path().join("lower");
        base(&lower);
        let snap = OverlaySnapshotter::new();
        let m = snap.prepare(&[lower], &s.path().join("s")).unwrap();
        let merged = m.rootfs.display().to_string();
        assert!(
            std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&merged)
        );
        drop(m);
        assert!(
            !std::fs::read_to_string("/proc/self/mountinfo")
                .unwrap()
                .contains(&merged)
        );
    }
}
