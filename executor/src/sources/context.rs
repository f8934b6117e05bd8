//! The build context: the files a build may read, and what their content is.
//!
//! [`BuildContext::scan`] walks the context directory once, without following
//! symlinks, and keeps the metadata of every entry that `.dockerignore` lets
//! through. COPY and ADD then [`select`](BuildContext::select) their sources
//! from that list (wildcards with Go `filepath.Match` semantics, a directory
//! meaning its contents), and [`digest`](BuildContext::digest) hashes exactly
//! what was selected — path, type, mode, owner, content or link target; never
//! the mtime or where the context lives — with blake3, in parallel, each file
//! at most once. That digest is what a COPY step's cache key depends on.
//!
//! A source can never leave the context: `..` past the root and symlinks
//! whose target lies outside are errors that name the source.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use rayon::prelude::*;

/// What the ignore rules say about one path of the context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Visibility {
    Included,
    /// Excluded, and so is everything below it: the walk skips the directory.
    Excluded,
    /// Excluded itself, but an exception (`!pattern`) may re-include
    /// something below it, so the walk must descend.
    ExcludedButDescend,
}

#[derive(Debug, thiserror::Error)]
pub enum ContextError {
    #[error("cannot read build context {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    #[error("COPY/ADD source {source_path:?} is outside the build context")]
    Escapes { source_path: String },
    #[error("COPY/ADD source {source_path:?} is a symlink pointing outside the build context")]
    SymlinkEscapes { source_path: String },
    #[error("COPY/ADD source {source_path:?}: no such file or directory in the build context")]
    NotFound { source_path: String },
    #[error("COPY/ADD source {source_path:?}: bad pattern")]
    BadPattern { source_path: String },
    #[error("COPY/ADD source {source_path:?}: too many levels of symbolic links")]
    SymlinkLoop { source_path: String },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    File,
    Dir,
    Symlink {
        target: String,
    },
    /// FIFOs, sockets and device nodes: never opened (a FIFO would block
    /// the build); part of the selection's digest by name, mode and owner,
    /// and skipped by COPY as BuildKit skips them.
    Special,
}

/// One entry of the context, as the ignore rules let it through.
#[derive(Debug)]
pub struct ContextEntry {
    /// Relative to the context root, `/`-separated, no leading `./`.
    pub path: String,
    pub kind: EntryKind,
    /// Permission and special bits (`0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    content_hash: OnceLock<Result<[u8; 32], String>>,
}

/// One COPY/ADD source after selection.
#[derive(Debug, Clone)]
pub struct Selection {
    /// The context path the source resolved to (`""` for the root).
    pub root: String,
    /// The name a file source is copied under: the source's last component
    /// as written or as a wildcard matched it, never a symlink's target.
    pub name: String,
    /// True when `root` is a directory: its contents are copied, not itself.
    pub is_dir: bool,
    /// Indexes into [`BuildContext::entries`]: the root itself first, then
    /// everything below it in path order.
    pub entries: Vec<usize>,
}

pub struct BuildContext {
    dir: PathBuf,
    entries: Vec<ContextEntry>,
    by_path: BTreeMap<String, usize>,
}

const MAX_SYMLINK_HOPS: usize = 40;

impl BuildContext {
    /// Walks `dir`. `visibility` is asked about every path (relative,
    /// `/`-separated) with whether it is a directory.
    pub fn scan(
        dir: &Path,
        visibility: &dyn Fn(&str, bool) -> Visibility,
    ) -> Result<Self, ContextError> {
        let io_err = |path: &Path, source| ContextError::Io {
            path: path.to_path_buf(),
            source,
        };
        let dir = fs::canonicalize(dir).map_err(|e| io_err(dir, e))?;
        let meta = fs::metadata(&dir).map_err(|e| io_err(&dir, e))?;
        let mut entries = vec![entry_from(String::new(), &meta, EntryKind::Dir)];
        let mut stack = vec![(dir.clone(), String::new())];
        while let Some((abs, rel)) = stack.pop() {
            let mut children: Vec<_> = fs::read_dir(&abs)
                .map_err(|e| io_err(&abs, e))?
                .collect::<Result<_, _>>()
                .map_err(|e| io_err(&abs, e))?;
            children.sort_by_key(|c| c.file_name());
            for child in children {
                let name = child.file_name();
                let Some(name) = name.to_str() else {
                    return Err(io_err(
                        &child.path(),
                        io::Error::new(io::ErrorKind::InvalidData, "file name is not UTF-8"),
                    ));
                };
                let child_rel = if rel.is_empty() {
                    name.to_owned()
                } else {
                    format!("{rel}/{name}")
                };
                let child_abs = child.path();
                let meta = fs::symlink_metadata(&child_abs).map_err(|e| io_err(&child_abs, e))?;
                let ft = meta.file_type();
                match visibility(&child_rel, ft.is_dir()) {
                    Visibility::Included => {}
                    Visibility::Excluded => continue,
                    Visibility::ExcludedButDescend => {
                        if ft.is_dir() {
                            stack.push((child_abs, child_rel));
                        }
                        continue;
                    }
                }
                let kind = if ft.is_dir() {
                    stack.push((child_abs.clone(), child_rel.clone()));
                    EntryKind::Dir
                } else if ft.is_file() {
                    EntryKind::File
                } else if ft.is_symlink() {
                    let target = fs::read_link(&child_abs).map_err(|e| io_err(&child_abs, e))?;
                    EntryKind::Symlink {
                        target: target.to_string_lossy().into_owned(),
                    }
                } else if ft.is_fifo()
                    || ft.is_socket()
                    || ft.is_block_device()
                    || ft.is_char_device()
                {
                    EntryKind::Special
                } else {
                    continue;
                };
                entries.push(entry_from(child_rel, &meta, kind));
            }
        }
        entries.sort_by(|a, b| a.path.cmp(&b.path));
        let by_path = entries
            .iter()
            .enumerate()
            .map(|(i, e)| (e.path.clone(), i))
            .collect();
        Ok(Self {
            dir,
            entries,
            by_path,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn entries(&self) -> &[ContextEntry] {
        &self.entries
    }

    pub fn entry(&self, index: usize) -> &ContextEntry {
        &self.entries[index]
    }

    /// Absolute path of an entry on disk.
    pub fn absolute(&self, entry: &ContextEntry) -> PathBuf {
        self.dir.join(&entry.path)
    }

    /// Resolves COPY/ADD sources as written (after variable expansion), as
    /// BuildKit does: a plain path must exist; a wildcard that matches
    /// nothing is skipped, and only when no source matches anything is it
    /// an error (naming the first source).
    pub fn select(&self, sources: &[String]) -> Result<Vec<Selection>, ContextError> {
        let mut out = Vec::new();
        for source in sources {
            let cleaned = clean_relative(source).ok_or_else(|| ContextError::Escapes {
                source_path: source.clone(),
            })?;
            let roots: Vec<usize> = if has_wildcards(&cleaned) {
                let matched: Vec<usize> = self
                    .entries
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.path.is_empty())
                    .filter_map(|(i, e)| match source_matches(&cleaned, &e.path) {
                        Ok(true) => Some(Ok(i)),
                        Ok(false) => None,
                        Err(_) => Some(Err(ContextError::BadPattern {
                            source_path: source.clone(),
                        })),
                    })
                    .collect::<Result<_, _>>()?;
                matched
            } else {
                vec![self.resolve(source, &cleaned)?]
            };
            for root in roots {
                let name = match self.entries[root].path.rsplit_once('/') {
                    Some((_, name)) => name.to_owned(),
                    None => self.entries[root].path.clone(),
                };
                let root = self.follow_symlinks(source, root)?;
                let mut selection = self.selection_at(root);
                selection.name = name;
                out.push(selection);
            }
        }
        if out.is_empty()
            && let Some(first) = sources.first()
        {
            return Err(ContextError::NotFound {
                source_path: first.clone(),
            });
        }
        Ok(out)
    }

    fn resolve(&self, source: &str, cleaned: &str) -> Result<usize, ContextError> {
        if let Some(&i) = self.by_path.get(cleaned) {
            return Ok(i);
        }
        // A parent directory may be a symlink inside the context.
        let mut resolved = String::new();
        for (n, component) in cleaned.split('/').enumerate() {
            let candidate = join_rel(&resolved, component);
            let i = *self
                .by_path
                .get(&candidate)
                .ok_or_else(|| ContextError::NotFound {
                    source_path: source.to_owned(),
                })?;
            let i = if n + 1 < cleaned.split('/').count() {
                self.follow_symlinks(source, i)?
            } else {
                i
            };
            resolved = self.entries[i].path.clone();
        }
        self.by_path
            .get(&resolved)
            .copied()
            .ok_or_else(|| ContextError::NotFound {
                source_path: source.to_owned(),
            })
    }

    /// Follows a chain of symlinks inside the context.
    fn follow_symlinks(&self, source: &str, mut index: usize) -> Result<usize, ContextError> {
        for _ in 0..MAX_SYMLINK_HOPS {
            let entry = &self.entries[index];
            let EntryKind::Symlink { target } = &entry.kind else {
                return Ok(index);
            };
            let base = match entry.path.rsplit_once('/') {
                Some((parent, _)) => parent.to_owned(),
                None => String::new(),
            };
            let joined = if target.starts_with('/') {
                return Err(ContextError::SymlinkEscapes {
                    source_path: source.to_owned(),
                });
            } else {
                join_rel(&base, target)
            };
            let cleaned = clean_relative(&joined).ok_or_else(|| ContextError::SymlinkEscapes {
                source_path: source.to_owned(),
            })?;
            index = self.resolve(source, &cleaned)?;
        }
        Err(ContextError::SymlinkLoop {
            source_path: source.to_owned(),
        })
    }

    fn selection_at(&self, root: usize) -> Selection {
        let root_entry = &self.entries[root];
        let is_dir = root_entry.kind == EntryKind::Dir;
        let mut entries = vec![root];
        if is_dir {
            let prefix = if root_entry.path.is_empty() {
                String::new()
            } else {
                format!("{}/", root_entry.path)
            };
            entries.extend(
                self.by_path
                    .range(prefix.clone()..)
                    .take_while(|(p, _)| p.starts_with(&prefix))
                    .filter(|(p, _)| !p.is_empty())
                    .map(|(_, &i)| i),
            );
        }
        Selection {
            root: root_entry.path.clone(),
            name: root_entry
                .path
                .rsplit('/')
                .next()
                .unwrap_or_default()
                .to_owned(),
            is_dir,
            entries,
        }
    }

    /// blake3 of everything the selections cover, as COPY would copy it:
    /// paths relative to each selection's root, type, mode, owner, content
    /// or link target. File contents are hashed in parallel, once each.
    pub fn digest(&self, selections: &[Selection]) -> Result<[u8; 32], ContextError> {
        let files: Vec<usize> = selections
            .iter()
            .flat_map(|s| s.entries.iter().copied())
            .filter(|&i| self.entries[i].kind == EntryKind::File)
            .collect();
        files
            .par_iter()
            .try_for_each(|&i| self.content_hash(i).map(|_| ()))?;

        let mut hasher = blake3::Hasher::new_derive_key("kiln build context selection v1");
        hasher.update(&(selections.len() as u64).to_le_bytes());
        for selection in selections {
            frame(&mut hasher, selection.root.as_bytes());
            frame(&mut hasher, selection.name.as_bytes());
            hasher.update(&[selection.is_dir as u8]);
            hasher.update(&(selection.entries.len() as u64).to_le_bytes());
            for &i in &selection.entries {
                let e = &self.entries[i];
                let relative = e
                    .path
                    .strip_prefix(&selection.root)
                    .unwrap_or(&e.path)
                    .trim_start_matches('/');
                frame(&mut hasher, relative.as_bytes());
                hasher.update(&e.mode.to_le_bytes());
                hasher.update(&e.uid.to_le_bytes());
                hasher.update(&e.gid.to_le_bytes());
                match &e.kind {
                    EntryKind::File => {
                        hasher.update(b"f");
                        hasher.update(&self.content_hash(i)?);
                    }
                    EntryKind::Dir => {
                        hasher.update(b"d");
                    }
                    EntryKind::Symlink { target } => {
                        hasher.update(b"l");
                        frame(&mut hasher, target.as_bytes());
                    }
                    EntryKind::Special => {
                        hasher.update(b"s");
                    }
                }
            }
        }
        Ok(*hasher.finalize().as_bytes())
    }

    fn content_hash(&self, index: usize) -> Result<[u8; 32], ContextError> {
        let entry = &self.entries[index];
        let path = self.absolute(entry);
        entry
            .content_hash
            .get_or_init(|| {
                // Scanned as a regular file, but it may have been replaced
                // since; a FIFO here must not block the build.
                let mut file = open_regular_file(&path).map_err(|e| e.to_string())?;
                let mut hasher = blake3::Hasher::new();
                io::copy(&mut file, &mut hasher).map_err(|e| e.to_string())?;
                Ok(*hasher.finalize().as_bytes())
            })
            .clone()
            .map_err(|message| ContextError::Io {
                path,
                source: io::Error::other(message),
            })
    }
}

/// Opens `path` (following symlinks) only if it is a regular file.
///
/// The open is non-blocking, so a FIFO (or a device) under the name does
/// not wait for a writer; the type is then checked on the opened file, so
/// nothing can be swapped in between the check and the read.
pub fn open_regular_file(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let ft = file.metadata()?.file_type();
    if ft.is_file() {
        // O_NONBLOCK means nothing for a regular file's reads.
        return Ok(file);
    }
    let what = if ft.is_fifo() {
        "a FIFO"
    } else if ft.is_dir() {
        "a directory"
    } else if ft.is_socket() {
        "a socket"
    } else if ft.is_block_device() || ft.is_char_device() {
        "a device"
    } else {
        "a special file"
    };
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("{what}, not a regular file"),
    ))
}

/// Reads the whole of `path` if it is a regular file (see
/// [`open_regular_file`]): how the Dockerfile and `.dockerignore` are read.
pub fn read_regular_file(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    let mut file = open_regular_file(path)?;
    let mut bytes = Vec::new();
    file.read_to_end(&mut bytes)?;
    Ok(bytes)
}

fn entry_from(path: String, meta: &fs::Metadata, kind: EntryKind) -> ContextEntry {
    ContextEntry {
        path,
        kind,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
        size: meta.len(),
        content_hash: OnceLock::new(),
    }
}

fn frame(hasher: &mut blake3::Hasher, bytes: &[u8]) {
    hasher.update(&(bytes.len() as u64).to_le_bytes());
    hasher.update(bytes);
}

fn join_rel(base: &str, name: &str) -> String {
    if base.is_empty() {
        name.to_owned()
    } else {
        format!("{base}/{name}")
    }
}

/// Cleans a context-relative path lexically: a leading `/` means the context
/// root, `.` and empty components vanish, `..` pops; `None` when `..` would
/// leave the root. `""` is the root itself.
pub fn clean_relative(path: &str) -> Option<String> {
    let mut parts: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                parts.pop()?;
            }
            other => parts.push(other),
        }
    }
    Some(parts.join("/"))
}

fn has_wildcards(pattern: &str) -> bool {
    pattern.contains(['*', '?', '['])
}

/// Whether a context path matches a COPY/ADD source pattern (the
/// `.dockerignore` rules: Go's `filepath.Match` plus `**`).
pub fn source_matches(pattern: &str, path: &str) -> Result<bool, &'static str> {
    crate::sources::dockerignore::pattern_matches(pattern, path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{PermissionsExt, symlink};

    fn include_all(_: &str, _: bool) -> Visibility {
        Visibility::Included
    }

    fn write(dir: &Path, rel: &str, content: &str) {
        let p = dir.join(rel);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, content).unwrap();
    }

    fn context_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        for (rel, content) in files {
            write(d.path(), rel, content);
        }
        d
    }

    fn digest_of(dir: &Path, sources: &[&str]) -> [u8; 32] {
        let ctx = BuildContext::scan(dir, &include_all).unwrap();
        let sources: Vec<String> = sources.iter().map(|s| s.to_string()).collect();
        let sel = ctx.select(&sources).unwrap();
        ctx.digest(&sel).unwrap()
    }

    #[test]
    fn source_patterns_follow_filepath_match() {
        let cases = [
            ("*.txt", "a.txt", true),
            ("*.txt", "dir/a.txt", false),
            ("*/a.txt", "dir/a.txt", true),
            ("a?c", "abc", true),
            ("a?c", "a/c", false),
            ("[a-c]x", "bx", true),
            ("[^a-c]x", "bx", false),
            ("a\\*", "a*", true),
            ("a\\*", "ab", false),
            ("a*b*c", "axxbyyc", true),
        ];
        for (pattern, name, expected) in cases {
            assert_eq!(
                source_matches(pattern, name),
                Ok(expected),
                "{pattern} ~ {name}"
            );
        }
        assert!(source_matches("[", "a").is_err());
    }

    #[test]
    fn a_wildcard_matching_nothing_is_skipped_unless_nothing_matches() {
        let d = context_with(&[("context/foo", "foo"), ("context/arr[0].txt", "a")]);
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        let select = |sources: &[&str]| {
            ctx.select(&sources.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .map(|sel| sel.into_iter().map(|s| s.root).collect::<Vec<_>>())
        };
        assert_eq!(
            select(&["context/bar/doesnotexist*", "context/foo"]).unwrap(),
            ["context/foo"]
        );
        assert!(matches!(
            select(&["context/bar/doesnotexist*", "context/nothing*"]),
            Err(ContextError::NotFound { source_path }) if source_path == "context/bar/doesnotexist*"
        ));
        // A plain path must exist even beside a wildcard that matches.
        assert!(select(&["context/f*", "context/missing"]).is_err());
        // `[[]` is a class holding `[`, as in Go's filepath.Match.
        assert_eq!(
            select(&["context/arr[[]0].txt"]).unwrap(),
            ["context/arr[0].txt"]
        );
    }

    #[test]
    fn a_symlink_source_is_named_as_written_and_read_from_its_target() {
        let d = context_with(&[("temp/target", "content")]);
        fs::create_dir_all(d.path().join("workdir")).unwrap();
        symlink("../temp/target", d.path().join("workdir/relative_link")).unwrap();
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        for source in ["workdir/relative_link", "workdir/relative_*"] {
            let sel = ctx.select(&[source.to_string()]).unwrap();
            assert_eq!(sel.len(), 1);
            assert_eq!(
                (sel[0].root.as_str(), sel[0].name.as_str()),
                ("temp/target", "relative_link")
            );
        }
    }

    #[test]
    fn clean_relative_never_leaves_the_root() {
        assert_eq!(clean_relative("/a/./b//c/").as_deref(), Some("a/b/c"));
        assert_eq!(clean_relative("a/../b").as_deref(), Some("b"));
        assert_eq!(clean_relative(".").as_deref(), Some(""));
        assert_eq!(clean_relative("../x"), None);
        assert_eq!(clean_relative("a/../../x"), None);
    }

    #[test]
    fn selecting_a_directory_selects_its_contents() {
        let d = context_with(&[("src/a.rs", "a"), ("src/sub/b.rs", "b"), ("other", "o")]);
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        let sel = ctx.select(&["src".into()]).unwrap();
        let paths: Vec<&str> = sel[0]
            .entries
            .iter()
            .map(|&i| ctx.entry(i).path.as_str())
            .collect();
        assert_eq!(paths, ["src", "src/a.rs", "src/sub", "src/sub/b.rs"]);
        assert!(sel[0].is_dir);
    }

    #[test]
    fn wildcards_select_each_match() {
        let d = context_with(&[("a.txt", ""), ("b.txt", ""), ("c.md", ""), ("d/e.txt", "")]);
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        let sel = ctx.select(&["*.txt".into()]).unwrap();
        let roots: Vec<&str> = sel.iter().map(|s| s.root.as_str()).collect();
        assert_eq!(roots, ["a.txt", "b.txt"]);
        assert!(matches!(
            ctx.select(&["*.none".into()]),
            Err(ContextError::NotFound { .. })
        ));
    }

    #[test]
    fn sources_outside_the_context_are_refused() {
        let outside = tempfile::tempdir().unwrap();
        write(outside.path(), "secret", "s");
        let d = context_with(&[("in", "i")]);
        symlink(outside.path().join("secret"), d.path().join("abs-link")).unwrap();
        symlink("../../../../etc/passwd", d.path().join("rel-link")).unwrap();
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        assert!(matches!(
            ctx.select(&["../x".into()]),
            Err(ContextError::Escapes { .. })
        ));
        assert!(matches!(
            ctx.select(&["abs-link".into()]),
            Err(ContextError::SymlinkEscapes { .. })
        ));
        assert!(matches!(
            ctx.select(&["rel-link".into()]),
            Err(ContextError::SymlinkEscapes { .. })
        ));
    }

    #[test]
    fn symlinks_inside_the_context_are_followed_for_sources() {
        let d = context_with(&[("real/f", "x")]);
        symlink("real", d.path().join("alias")).unwrap();
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        let sel = ctx.select(&["alias/f".into(), "alias".into()]).unwrap();
        assert_eq!(sel[0].root, "real/f");
        assert_eq!(sel[1].root, "real");
    }

    #[test]
    fn symlink_loops_are_an_error() {
        let d = context_with(&[]);
        symlink("b", d.path().join("a")).unwrap();
        symlink("a", d.path().join("b")).unwrap();
        let ctx = BuildContext::scan(d.path(), &include_all).unwrap();
        assert!(matches!(
            ctx.select(&["a".into()]),
            Err(ContextError::SymlinkLoop { .. })
        ));
    }

    #[test]
    fn digest_depends_on_content_mode_and_names_but_not_mtime_or_location() {
        let files = [("app/main.c", "int main;"), ("app/README", "hi")];
        let a = context_with(&files);
        let b = context_with(&files);
        let base = digest_of(a.path(), &["app"]);
        assert_eq!(
            base,
            digest_of(b.path(), &["app"]),
            "location must not matter"
        );

        let f = b.path().join("app/README");
        let file = fs::File::options().write(true).open(&f).unwrap();
        file.set_modified(std::time::SystemTime::UNIX_EPOCH)
            .unwrap();
        assert_eq!(base, digest_of(b.path(), &["app"]), "mtime must not matter");

        fs::set_permissions(&f, fs::Permissions::from_mode(0o755)).unwrap();
        let mode_changed = digest_of(b.path(), &["app"]);
        assert_ne!(base, mode_changed);

        fs::write(&f, "ho").unwrap();
        assert_ne!(mode_changed, digest_of(b.path(), &["app"]));

        let c = context_with(&[("app/main.c", "int main;"), ("app/README2", "hi")]);
        assert_ne!(base, digest_of(c.path(), &["app"]));

        std::os::unix::fs::chown(a.path().join("app/README"), Some(1234), Some(1234)).unwrap();
        assert_ne!(base, digest_of(a.path(), &["app"]), "owner must matter");
    }

    #[test]
    fn ignored_paths_are_invisible() {
        let d = context_with(&[("keep", "k"), ("skip/x", "x"), ("skip/keep-me", "y")]);
        let rules = |p: &str, _: bool| match p {
            "skip" => Visibility::ExcludedButDescend,
            "skip/x" => Visibility::Excluded,
            _ => Visibility::Included,
        };
        let ctx = BuildContext::scan(d.path(), &rules).unwrap();
        let paths: Vec<&str> = ctx.entries().iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["", "keep", "skip/keep-me"]);
        assert!(matches!(
            ctx.select(&["skip/x".into()]),
            Err(ContextError::NotFound { .. })
        ));
    }
}
