//! COPY and ADD into a step's rootfs.
//!
//! Sources arrive as [`CopyRoot`]s: a file or a directory on the host (from
//! the build context after `.dockerignore`, another stage's rootfs, or a
//! heredoc written to scratch space) with the exact list of entries to copy.
//! [`copy_into`] applies Docker's destination rules — a trailing `/`, several
//! sources or an existing directory make the destination a directory; a
//! directory source copies its contents, not itself; a relative destination
//! is relative to WORKDIR — and creates every entry inside the rootfs with
//! the owner (`--chown`; otherwise the source's for another stage or an
//! image, root for the build context) and mode (`--chmod`, the source's
//! otherwise) Docker would give it. Directories the copy creates (missing
//! parents, and the destination of a directory source) are 0755 and owned
//! by the `--chown` owner or root, as in BuildKit.
//!
//! Nothing is ever written outside the rootfs: every destination parent is
//! resolved in-root (symlinks in the image are followed as if the rootfs
//! were `/`), and the final component is replaced, never followed.

use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};
use std::path::{Component, Path, PathBuf};

use crate::build::fsutil::{resolve_in_root, set_times_nofollow};

#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("copying {source_path} to {dest}: {source}")]
    Io {
        source_path: PathBuf,
        dest: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("when copying several sources the destination {0:?} must be a directory ending in /")]
    DestinationNotDirectory(String),
    #[error("cannot replace directory {0} with a non-directory")]
    WouldReplaceDirectory(PathBuf),
}

/// One source as selected: `entries` holds the root itself first (relative
/// path `""`), then everything below it.
#[derive(Debug, Clone)]
pub struct CopyRoot {
    /// Base name used when a file is copied into a directory destination.
    pub name: String,
    pub is_dir: bool,
    pub entries: Vec<CopyItem>,
}

#[derive(Debug, Clone)]
pub struct CopyItem {
    /// Relative to the root (`""` for the root itself).
    pub relative: PathBuf,
    /// Where the bytes and metadata are read from.
    pub host: PathBuf,
}

#[derive(Debug, Clone, Default)]
pub struct CopyOptions {
    /// Owner of everything created (`--chown`); when `None`, copied entries
    /// keep their source's owner if `keep_owner`, else belong to root, and
    /// created parent directories belong to root.
    pub owner: Option<(u32, u32)>,
    /// Sources from another stage or image keep their uid/gid (without
    /// `--chown`); build context files become 0:0.
    pub keep_owner: bool,
    /// Mode for files and directories created from sources.
    pub chmod: Option<u32>,
}

/// Builds a [`CopyRoot`] by walking a host directory or file (not following
/// symlinks), e.g. a stage's rootfs for `COPY --from`.
pub fn walk_root(host: &Path, name: &str) -> io::Result<CopyRoot> {
    let meta = fs::symlink_metadata(host)?;
    let mut entries = vec![CopyItem {
        relative: PathBuf::new(),
        host: host.to_path_buf(),
    }];
    if meta.is_dir() {
        for entry in walkdir::WalkDir::new(host)
            .follow_links(false)
            .sort_by_file_name()
            .min_depth(1)
        {
            let entry = entry.map_err(io::Error::other)?;
            let relative = entry
                .path()
                .strip_prefix(host)
                .map_err(io::Error::other)?
                .to_path_buf();
            entries.push(CopyItem {
                relative,
                host: entry.path().to_path_buf(),
            });
        }
    }
    Ok(CopyRoot {
        name: name.to_owned(),
        is_dir: meta.is_dir(),
        entries,
    })
}

/// Copies `roots` to `dest` (as written, after expansion) inside `rootfs`.
pub fn copy_into(
    rootfs: &Path,
    workdir: &Path,
    dest: &str,
    roots: &[CopyRoot],
    opts: &CopyOptions,
) -> Result<(), CopyError> {
    let dest_path = absolute_in_image(workdir, dest);
    let trailing_slash = dest.ends_with('/') || dest.ends_with("/.") || dest == ".";
    let io_err = |source_path: &Path, dest: &Path, source| CopyError::Io {
        source_path: source_path.to_path_buf(),
        dest: dest.to_path_buf(),
        source,
    };
    let existing_dir = resolve_in_root(rootfs, &dest_path)
        .map(|p| p.is_dir())
        .unwrap_or(false);
    let several = roots.len() > 1;
    if several && !trailing_slash && !existing_dir {
        return Err(CopyError::DestinationNotDirectory(dest.to_owned()));
    }
    let dest_is_dir = trailing_slash || several || existing_dir;
    for root in roots {
        let base = if root.is_dir {
            dest_path.clone()
        } else if dest_is_dir {
            dest_path.join(&root.name)
        } else {
            dest_path.clone()
        };
        for item in &root.entries {
            let is_root = item.relative.as_os_str().is_empty();
            let target = if is_root {
                base.clone()
            } else {
                base.join(&item.relative)
            };
            if is_root && root.is_dir {
                // A directory source copies its contents: the destination
                // is made as any missing parent is (0755, `--chown` or
                // root), not from the source directory's metadata (BuildKit).
                ensure_dir(rootfs, &target, opts.owner.unwrap_or((0, 0)), 0o755)
                    .map_err(|e| io_err(&item.host, &target, e))?;
                continue;
            }
            copy_item(rootfs, &item.host, &target, opts).map_err(|e| match e {
                ItemError::Io(source) => io_err(&item.host, &target, source),
                ItemError::Directory(p) => CopyError::WouldReplaceDirectory(p),
            })?;
        }
    }
    Ok(())
}

/// `dest` as an absolute, lexically clean path inside the image.
pub fn absolute_in_image(workdir: &Path, dest: &str) -> PathBuf {
    let joined = if dest.starts_with('/') {
        PathBuf::from(dest)
    } else {
        workdir.join(dest)
    };
    let mut clean = PathBuf::from("/");
    for c in joined.components() {
        match c {
            Component::Normal(n) => clean.push(n),
            Component::ParentDir => {
                clean.pop();
            }
            _ => {}
        }
    }
    clean
}

enum ItemError {
    Io(io::Error),
    Directory(PathBuf),
}

impl From<io::Error> for ItemError {
    fn from(e: io::Error) -> Self {
        ItemError::Io(e)
    }
}

/// Creates (missing) parent directories of `target` inside `rootfs` and
/// returns the host path of `target`'s parent.
pub fn ensure_parent(rootfs: &Path, target: &Path, owner: (u32, u32)) -> io::Result<PathBuf> {
    let parent = target.parent().unwrap_or(Path::new("/"));
    ensure_dir(rootfs, parent, owner, 0o755)
}

/// Makes sure the image directory `dir` exists (creating missing components
/// with `mode` and `owner`), returning its host path.
pub fn ensure_dir(rootfs: &Path, dir: &Path, owner: (u32, u32), mode: u32) -> io::Result<PathBuf> {
    let mut current = PathBuf::from("/");
    for c in dir.components() {
        let Component::Normal(name) = c else { continue };
        current.push(name);
        let host = resolve_in_root(rootfs, &current)?;
        match fs::symlink_metadata(&host) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => {
                return Err(io::Error::new(
                    io::ErrorKind::AlreadyExists,
                    format!("{} exists and is not a directory", current.display()),
                ));
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                // In-root symlinks may point at a deeper missing path.
                fs::create_dir_all(&host)?;
                fs::set_permissions(&host, fs::Permissions::from_mode(mode))?;
                std::os::unix::fs::lchown(&host, Some(owner.0), Some(owner.1))?;
            }
            Err(e) => return Err(e),
        }
    }
    resolve_in_root(rootfs, &current)
}

fn copy_item(
    rootfs: &Path,
    source: &Path,
    target: &Path,
    opts: &CopyOptions,
) -> Result<(), ItemError> {
    let meta = fs::symlink_metadata(source)?;
    let host_parent = ensure_parent(rootfs, target, opts.owner.unwrap_or((0, 0)))?;
    let owner = match opts.owner {
        Some(o) => o,
        None if opts.keep_owner => (meta.uid(), meta.gid()),
        None => (0, 0),
    };
    let name = target.file_name();
    let host = match name {
        Some(n) => host_parent.join(n),
        // The destination is `/` itself.
        None => resolve_in_root(rootfs, Path::new("/"))?,
    };
    let existing = fs::symlink_metadata(&host).ok();
    let ft = meta.file_type();
    if ft.is_dir() {
        match existing {
            Some(m) if m.is_dir() => return Ok(()),
            Some(_) => fs::remove_file(&host)?,
            None => {}
        }
        fs::create_dir(&host)?;
        let mode = opts.chmod.unwrap_or(meta.mode() & 0o7777);
        std::os::unix::fs::lchown(&host, Some(owner.0), Some(owner.1))?;
        fs::set_permissions(&host, fs::Permissions::from_mode(mode))?;
        set_times_nofollow(
            &host,
            (meta.atime(), meta.atime_nsec()),
            (meta.mtime(), meta.mtime_nsec()),
        )?;
        return Ok(());
    }
    if let Some(m) = &existing {
        if m.is_dir() {
            return Err(ItemError::Directory(target.to_path_buf()));
        }
        fs::remove_file(&host)?;
    }
    if ft.is_symlink() {
        let link = fs::read_link(source)?;
        symlink(&link, &host)?;
        std::os::unix::fs::lchown(&host, Some(owner.0), Some(owner.1))?;
        set_times_nofollow(
            &host,
            (meta.atime(), meta.atime_nsec()),
            (meta.mtime(), meta.mtime_nsec()),
        )?;
    } else if ft.is_file() {
        let mut input = fs::File::open(source)?;
        let mut output = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&host)?;
        io::copy(&mut input, &mut output)?;
        drop(output);
        std::os::unix::fs::lchown(&host, Some(owner.0), Some(owner.1))?;
        let mode = opts.chmod.unwrap_or(meta.mode() & 0o7777);
        fs::set_permissions(&host, fs::Permissions::from_mode(mode))?;
        set_times_nofollow(
            &host,
            (meta.atime(), meta.atime_nsec()),
            (meta.mtime(), meta.mtime_nsec()),
        )?;
    }
    // FIFOs, sockets and devices from a context are not copied (BuildKit
    // skips them too).
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn file_root(dir: &Path, name: &str, content: &str) -> CopyRoot {
        let p = dir.join(name);
        fs::write(&p, content).unwrap();
        walk_root(&p, name).unwrap()
    }

    #[test]
    fn file_to_trailing_slash_lands_inside_the_directory() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root = file_root(src.path(), "a.txt", "A");
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/opt/app/",
            &[root],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(rootfs.path().join("opt/app/a.txt")).unwrap(),
            "A"
        );
    }

    #[test]
    fn file_to_plain_name_is_renamed() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root = file_root(src.path(), "a.txt", "A");
        copy_into(
            rootfs.path(),
            Path::new("/work"),
            "b.txt",
            &[root],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(rootfs.path().join("work/b.txt")).unwrap(),
            "A"
        );
    }

    #[test]
    fn directory_contents_are_copied_not_the_directory() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("d/sub")).unwrap();
        fs::write(src.path().join("d/sub/x"), "x").unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root = walk_root(&src.path().join("d"), "d").unwrap();
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/dst",
            &[root],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(rootfs.path().join("dst/sub/x")).unwrap(),
            "x"
        );
        assert!(!rootfs.path().join("dst/d").exists());
    }

    #[test]
    fn several_sources_need_a_directory_destination() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let a = file_root(src.path(), "a", "A");
        let b = file_root(src.path(), "b", "B");
        let err = copy_into(
            rootfs.path(),
            Path::new("/"),
            "/x",
            &[a.clone(), b.clone()],
            &Default::default(),
        );
        assert!(matches!(err, Err(CopyError::DestinationNotDirectory(_))));
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/x/",
            &[a, b],
            &Default::default(),
        )
        .unwrap();
        assert!(rootfs.path().join("x/a").is_file() && rootfs.path().join("x/b").is_file());
    }

    #[test]
    fn owner_and_mode_follow_chown_and_chmod() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root = file_root(src.path(), "f", "F");
        let opts = CopyOptions {
            owner: Some((1000, 1001)),
            chmod: Some(0o640),
            ..Default::default()
        };
        copy_into(rootfs.path(), Path::new("/"), "/new/dir/f", &[root], &opts).unwrap();
        let m = fs::metadata(rootfs.path().join("new/dir/f")).unwrap();
        assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (1000, 1001, 0o640));
        let d = fs::metadata(rootfs.path().join("new/dir")).unwrap();
        assert_eq!((d.uid(), d.gid(), d.mode() & 0o7777), (1000, 1001, 0o755));
    }

    #[test]
    fn stage_sources_keep_their_owner_context_sources_become_root() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("myapp/somedir")).unwrap();
        fs::write(src.path().join("myapp/somedir/f"), "f").unwrap();
        std::os::unix::fs::lchown(src.path().join("myapp/somedir"), Some(123), Some(123)).unwrap();
        std::os::unix::fs::lchown(src.path().join("myapp/somedir/f"), Some(321), Some(321))
            .unwrap();
        let root = walk_root(&src.path().join("myapp"), "myapp").unwrap();
        let owner = |p: &Path| {
            let m = fs::symlink_metadata(p).unwrap();
            (m.uid(), m.gid())
        };
        let from_stage = tempfile::tempdir().unwrap();
        let keep = CopyOptions {
            keep_owner: true,
            ..Default::default()
        };
        copy_into(
            from_stage.path(),
            Path::new("/"),
            "/myapp",
            std::slice::from_ref(&root),
            &keep,
        )
        .unwrap();
        assert_eq!(owner(&from_stage.path().join("myapp/somedir")), (123, 123));
        assert_eq!(
            owner(&from_stage.path().join("myapp/somedir/f")),
            (321, 321)
        );
        // The destination made for the directory source is not the source's.
        assert_eq!(owner(&from_stage.path().join("myapp")), (0, 0));
        let from_context = tempfile::tempdir().unwrap();
        copy_into(
            from_context.path(),
            Path::new("/"),
            "/myapp",
            std::slice::from_ref(&root),
            &Default::default(),
        )
        .unwrap();
        assert_eq!(owner(&from_context.path().join("myapp/somedir")), (0, 0));
        assert_eq!(owner(&from_context.path().join("myapp/somedir/f")), (0, 0));
        // --chown wins over the source's owner.
        let chowned = tempfile::tempdir().unwrap();
        let opts = CopyOptions {
            owner: Some((7, 8)),
            keep_owner: true,
            ..Default::default()
        };
        copy_into(chowned.path(), Path::new("/"), "/myapp", &[root], &opts).unwrap();
        assert_eq!(owner(&chowned.path().join("myapp/somedir/f")), (7, 8));
    }

    #[test]
    fn the_destination_of_a_directory_source_is_created_0755() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir_all(src.path().join("tars/sub")).unwrap();
        fs::set_permissions(src.path().join("tars"), fs::Permissions::from_mode(0o775)).unwrap();
        fs::set_permissions(
            src.path().join("tars/sub"),
            fs::Permissions::from_mode(0o775),
        )
        .unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let root = walk_root(&src.path().join("tars"), "tars").unwrap();
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/tmp/tars",
            &[root],
            &Default::default(),
        )
        .unwrap();
        let mode = |p: &str| fs::metadata(rootfs.path().join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("tmp/tars"), 0o755);
        // What is inside keeps its own mode.
        assert_eq!(mode("tmp/tars/sub"), 0o775);
    }

    #[test]
    fn destination_symlinks_escaping_the_rootfs_stay_inside() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        // The image has /evil -> <host dir outside the rootfs>.
        symlink(outside.path(), rootfs.path().join("evil")).unwrap();
        symlink("../../../../..", rootfs.path().join("up")).unwrap();
        let root = file_root(src.path(), "payload", "P");
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/evil/",
            std::slice::from_ref(&root),
            &Default::default(),
        )
        .unwrap();
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/up/tmp/",
            &[root],
            &Default::default(),
        )
        .unwrap();
        assert!(
            fs::read_dir(outside.path()).unwrap().next().is_none(),
            "wrote outside the rootfs"
        );
        let inside = rootfs
            .path()
            .join(outside.path().strip_prefix("/").unwrap())
            .join("payload");
        assert!(
            inside.is_file(),
            "absolute symlink must resolve inside the rootfs"
        );
        assert!(rootfs.path().join("tmp/payload").is_file());
    }

    #[test]
    fn a_file_replaces_a_symlink_instead_of_writing_through_it() {
        let src = tempfile::tempdir().unwrap();
        let rootfs = tempfile::tempdir().unwrap();
        fs::write(rootfs.path().join("target"), "keep").unwrap();
        symlink("/target", rootfs.path().join("link")).unwrap();
        let root = file_root(src.path(), "link", "new");
        copy_into(
            rootfs.path(),
            Path::new("/"),
            "/link",
            &[root],
            &Default::default(),
        )
        .unwrap();
        assert_eq!(
            fs::read_to_string(rootfs.path().join("target")).unwrap(),
            "keep"
        );
        assert!(
            fs::symlink_metadata(rootfs.path().join("link"))
                .unwrap()
                .is_file()
        );
    }

    #[test]
    fn relative_destinations_cannot_climb_above_root() {
        assert_eq!(
            absolute_in_image(Path::new("/app"), "../../../etc/x"),
            PathBuf::from("/etc/x")
        );
        assert_eq!(
            absolute_in_image(Path::new("/app"), "."),
            PathBuf::from("/app")
        );
    }
}
