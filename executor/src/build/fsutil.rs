//! Small filesystem helpers shared by the runners, snapshotters and the layer
//! writer: resolving a path inside a rootfs without escaping it, and reading
//! extended attributes without following symlinks.
//!
//! Promise: [`resolve_in_root`] and [`walk_in_root`] (kiln's one in-root
//! resolver) never return a path outside `root`, whatever symlinks
//! (absolute or with `..`) the rootfs contains.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Linux's own limit on symlinks followed in one lookup (`ELOOP` past it);
/// every in-root lookup in kiln (this one, the unpacker's, the EROFS
/// writer's tree) uses it.
pub const MAX_SYMLINKS: usize = 40;

/// Why [`walk_in_root`] stopped.
#[derive(Debug)]
pub enum WalkError<E> {
    /// More than [`MAX_SYMLINKS`] symlinks were followed.
    TooManyLinks,
    /// A symlink on the way could not be read.
    ReadLink { path: PathBuf, source: io::Error },
    /// The caller's `visit` refused a component.
    Visit(E),
}

/// Resolves `path` (absolute or relative, read as if `root` were `/`) to a
/// host path under `root`, following symlinks as the kernel would after a
/// chroot into `root`. Components that do not exist are kept literally, so
/// the result can name a file that is about to be created.
pub fn resolve_in_root(root: &Path, path: &Path) -> io::Result<PathBuf> {
    walk_in_root(root, path, |_, _| Ok::<(), std::convert::Infallible>(())).map_err(|e| match e {
        WalkError::TooManyLinks => io::Error::other(format!(
            "too many levels of symbolic links resolving {} in {}",
            path.display(),
            root.display()
        )),
        WalkError::ReadLink { source, .. } => source,
        WalkError::Visit(never) => match never {},
    })
}

/// The one in-root lookup behind [`resolve_in_root`] and the unpacker's
/// parent-directory resolution: walks `path` component by component under
/// `root`, `..` never climbing above it and every symlink met (the last
/// component's too) followed as if `root` were `/`, at most
/// [`MAX_SYMLINKS`] of them. Each component that is not a symlink is shown
/// to `visit` with its host path and `lstat` result before it is taken;
/// `visit` may create it (a missing directory) or refuse it.
///
/// Why not `openat2(RESOLVE_IN_ROOT)` through a crate: see
/// docs/decisions.md ("One in-root resolver").
pub fn walk_in_root<E>(
    root: &Path,
    path: &Path,
    mut visit: impl FnMut(&Path, io::Result<std::fs::Metadata>) -> Result<(), E>,
) -> Result<PathBuf, WalkError<E>> {
    // `resolved` is relative to root and never contains `..` or symlinks.
    let mut resolved = PathBuf::new();
    let mut pending: Vec<PathBuf> = Vec::new();
    push_components(&mut pending, path);
    let mut hops = 0;
    while let Some(part) = pending.pop() {
        if part.as_os_str() == ".." {
            // `..` at the root stays at the root, as in a chroot.
            resolved.pop();
            continue;
        }
        let candidate = resolved.join(&part);
        let host = root.join(&candidate);
        match std::fs::symlink_metadata(&host) {
            Ok(meta) if meta.file_type().is_symlink() => {
                hops += 1;
                if hops > MAX_SYMLINKS {
                    return Err(WalkError::TooManyLinks);
                }
                let target = std::fs::read_link(&host)
                    .map_err(|source| WalkError::ReadLink { path: host, source })?;
                if target.is_absolute() {
                    resolved = PathBuf::new();
                }
                push_components(&mut pending, &target);
            }
            meta => {
                visit(&host, meta).map_err(WalkError::Visit)?;
                resolved = candidate;
            }
        }
    }
    Ok(root.join(resolved))
}

/// Pushes the normal and `..` components of `path` onto `stack` so that
/// popping yields them in order.
fn push_components(stack: &mut Vec<PathBuf>, path: &Path) {
    let parts: Vec<PathBuf> = path
        .components()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(PathBuf::from(n)),
            Component::ParentDir => Some(PathBuf::from("..")),
            _ => None,
        })
        .collect();
    stack.extend(parts.into_iter().rev());
}

/// A path as a NUL-terminated C string (paths never contain NUL on Unix, but
/// the error is reported rather than assumed).
pub fn cstring(path: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(path.as_ref().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("path contains a NUL byte: {:?}", path.as_ref()),
        )
    })
}

/// Extended attributes that must never enter a layer: overlayfs keeps its
/// own bookkeeping in `trusted.overlay.*`, and SELinux labels belong to the
/// host, not to the image.
pub fn xattr_is_private(name: &str) -> bool {
    name.starts_with("trusted.overlay.") || name == "security.selinux"
}

/// The extended attributes of `path` (not following symlinks), sorted by
/// name, without the private ones. Filesystems without xattr support yield
/// an empty list.
pub fn list_xattrs(path: &Path) -> io::Result<Vec<(String, Vec<u8>)>> {
    let c = cstring(path)?;
    let mut names = vec![0u8; 1024];
    let len = loop {
        // SAFETY: the buffer pointer and length describe `names`.
        let n = unsafe { libc::llistxattr(c.as_ptr(), names.as_mut_ptr().cast(), names.len()) };
        if n >= 0 {
            break n as usize;
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => names.resize(names.len() * 4, 0),
            Some(libc::ENOTSUP) => return Ok(Vec::new()),
            _ => return Err(err),
        }
    };
    let mut out = Vec::new();
    for raw in names[..len].split(|b| *b == 0).filter(|n| !n.is_empty()) {
        let name = String::from_utf8_lossy(raw).into_owned();
        if xattr_is_private(&name) {
            continue;
        }
        if let Some(value) = get_xattr(path, &name)? {
            out.push((name, value));
        }
    }
    out.sort();
    Ok(out)
}

/// One extended attribute of `path` (not following symlinks), or `None`
/// when it is not set.
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Option<Vec<u8>>> {
    let c = cstring(path)?;
    let cname = cstring(name)?;
    let mut buf = vec![0u8; 256];
    loop {
        // SAFETY: the buffer pointer and length describe `buf`.
        let n = unsafe {
            libc::lgetxattr(
                c.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n >= 0 {
            buf.truncate(n as usize);
            return Ok(Some(buf));
        }
        let err = io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::ERANGE) => buf.resize(buf.len() * 4, 0),
            Some(libc::ENODATA) | Some(libc::ENOTSUP) => return Ok(None),
            _ => return Err(err),
        }
    }
}

/// Sets the access and modification times of `path` without following a
/// final symlink (used to undo the mtime change of a parent directory).
pub fn set_times_nofollow(path: &Path, atime: (i64, i64), mtime: (i64, i64)) -> io::Result<()> {
    let c = cstring(path)?;
    let times = [
        libc::timespec {
            tv_sec: atime.0,
            tv_nsec: atime.1,
        },
        libc::timespec {
            tv_sec: mtime.0,
            tv_nsec: mtime.1,
        },
    ];
    // SAFETY: valid C string and a two-element timespec array.
    let rc = unsafe {
        libc::utimensat(
            libc::AT_FDCWD,
            c.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn absolute_symlinks_resolve_inside_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("real")).unwrap();
        symlink("/real", root.path().join("abs")).unwrap();
        symlink("/var/tmp", root.path().join("tmp")).unwrap();
        let got = resolve_in_root(root.path(), Path::new("/abs/file")).unwrap();
        assert_eq!(got, root.path().join("real/file"));
        let got = resolve_in_root(root.path(), Path::new("/tmp/escape")).unwrap();
        assert_eq!(got, root.path().join("var/tmp/escape"));
    }

    #[test]
    fn dot_dot_cannot_climb_above_the_root() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("d")).unwrap();
        symlink("../../../../etc", root.path().join("d/up")).unwrap();
        let got = resolve_in_root(root.path(), Path::new("/../../x")).unwrap();
        assert_eq!(got, root.path().join("x"));
        let got = resolve_in_root(root.path(), Path::new("d/up/passwd")).unwrap();
        assert_eq!(got, root.path().join("etc/passwd"));
    }

    #[test]
    fn symlink_loops_are_an_error() {
        let root = tempfile::tempdir().unwrap();
        symlink("/b", root.path().join("a")).unwrap();
        symlink("/a", root.path().join("b")).unwrap();
        assert!(resolve_in_root(root.path(), Path::new("/a/x")).is_err());
    }

    #[test]
    fn private_xattrs_are_not_listed() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("f");
        std::fs::write(&f, b"x").unwrap();
        let c = cstring(&f).unwrap();
        for (name, value) in [("user.keep", "1"), ("trusted.overlay.origin", "2")] {
            let n = cstring(name).unwrap();
            // SAFETY: valid pointers and lengths.
            let rc =
                unsafe { libc::lsetxattr(c.as_ptr(), n.as_ptr(), value.as_ptr().cast(), 1, 0) };
            assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        }
        let got = list_xattrs(&f).unwrap();
        assert_eq!(got, vec![("user.keep".to_string(), b"1".to_vec())]);
    }
}
