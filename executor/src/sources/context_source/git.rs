//! Git contexts without a git binary: the repository is fetched with gix
//! into a bare repository in the context's scratch directory, the commit to
//! build is chosen as Kaniko chooses it, and its tree is streamed as a tar
//! through [`crate::build::unpack::unpack_tar`] into the context directory, so a
//! hostile tree (`..`, duplicate names, a symlink then a path through it)
//! meets the rules layers meet.
//!
//! The context holds the tree only, without `.git`: the same commit gives
//! the same context (and cache keys) on every clone (docs/user-guide.md).

use std::path::Path;
use std::sync::atomic::AtomicBool;

use gix::bstr::ByteSlice;
use gix::remote::Direction;

use super::{GitOptions, GitSource};
use crate::build::unpack::UnpackOptions;

/// Where the wanted ref is kept in the scratch repository.
const WANTED: &str = "refs/kiln/wanted";
/// Submodule nesting deeper than this is refused (a loop of submodules).
const MAX_SUBMODULE_DEPTH: usize = 8;

/// Fetches `source` into a bare repository under `scratch` and unpacks the
/// chosen commit's tree into `root`.
pub(super) fn fetch_into(
    source: &GitSource,
    opts: &GitOptions,
    scratch: &Path,
    root: &Path,
    unpack: &UnpackOptions,
) -> Result<(), String> {
    let repo_dir = scratch.join("repository.git");
    let (repo, commit) = fetch(source, opts, &repo_dir)?;
    let mut fetched = Vec::new();
    let (reader, mut writer) = std::io::pipe().map_err(|e| format!("creating a pipe: {e}"))?;
    // gix's repository handle stays on this thread (it is not `Sync`); the
    // unpacker reads the tar stream on another.
    std::thread::scope(|scope| {
        let unpacker = scope.spawn(move || unpack_tar(reader, root, unpack));
        let produced = {
            let mut tar = tar::Builder::new(&mut writer);
            let result = write_commit(
                &repo,
                commit,
                "",
                &source.url,
                opts,
                scratch,
                0,
                &mut tar,
                &mut fetched,
            )
            .and_then(|()| tar.finish().map_err(|e| format!("writing the tree: {e}")));
            drop(tar);
            drop(writer);
            result
        };
        let unpacked = unpacker.join().unwrap_or_else(|_| {
            Err(crate::build::unpack::UnpackError::Read(
                std::io::Error::other("the unpacker panicked"),
            ))
        });
        // The unpacker's refusal says more than the broken pipe it causes.
        unpacked.map_err(|e| e.to_string().replacen("layer entry", "tree entry", 1))?;
        produced
    })
}

use crate::build::unpack::unpack_tar;

/// Fetches what the context needs and returns the commit to build.
fn fetch(
    source: &GitSource,
    opts: &GitOptions,
    repo_dir: &Path,
) -> Result<(gix::Repository, gix::ObjectId), String> {
    let url = source.url.as_str();
    // gix's HTTP client (reqwest 0.13, built without a crypto provider of
    // its own) uses the process-wide one: rustls on ring.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let repo =
        gix::init_bare(repo_dir).map_err(|e| format!("creating {}: {e}", repo_dir.display()))?;
    let interrupt = AtomicBool::new(false);

    // Kaniko: a commit id after the first `#` is checked out from a clone
    // of the default branch.
    let (mut reference, mut commit) = (source.reference.clone(), source.commit.clone());
    if let Some(r) = &reference
        && is_hex_id(r)
        && commit.is_none()
    {
        commit = reference.take();
    }

    // First the remote's refs, to resolve names (`--git branch=`, short
    // names) before deciding what to fetch.
    let listing = {
        let remote = repo
            .remote_at(url)
            .map_err(|e| e.to_string())?
            .with_refspecs(["+refs/*:refs/kiln/listing/*"], Direction::Fetch)
            .map_err(|e| e.to_string())?;
        let connection = configure(
            remote.connect(Direction::Fetch).map_err(connect_error)?,
            opts,
            url,
        );
        let (map, _handshake) = connection
            .ref_map(
                gix::progress::Discard,
                gix::remote::ref_map::Options {
                    prefix_from_spec_as_filter_on_remote: false,
                    ..Default::default()
                },
            )
            .map_err(connect_error)?;
        map.remote_refs
    };
    let names: Vec<(String, Option<gix::ObjectId>)> = listing
        .iter()
        .map(|r| {
            let (name, target, peeled) = r.unpack();
            (
                name.to_str_lossy().into_owned(),
                peeled.or(target).map(|o| o.to_owned()),
            )
        })
        .collect();
    let exists = |name: &str| names.iter().any(|(n, _)| n == name);
    if let Some(branch) = &opts.branch {
        let head = format!("refs/heads/{branch}");
        let tag = format!("refs/tags/{branch}");
        reference = Some(if exists(&head) {
            head
        } else if exists(&tag) {
            tag
        } else {
            return Err(format!(
                "--git branch={branch}: no branch or tag {branch:?} in {url}"
            ));
        });
    }
    if let Some(r) = &reference
        && !r.starts_with("refs/")
        && r != "HEAD"
    {
        let head = format!("refs/heads/{r}");
        let tag = format!("refs/tags/{r}");
        reference = if exists(&head) {
            Some(head)
        } else if exists(&tag) {
            Some(tag)
        } else {
            return Err(format!("no ref {r:?} in {url}"));
        };
    }
    let wanted = reference.clone().unwrap_or_else(|| "HEAD".to_owned());
    let Some((_, Some(wanted_id))) = names.iter().find(|(n, _)| *n == wanted) else {
        return Err(if wanted == "HEAD" {
            format!("{url} has no HEAD (an empty repository?)")
        } else {
            format!("no ref {wanted} in {url}")
        });
    };
    let wanted_id = *wanted_id;

    let mut specs = vec![format!("+{wanted}:{WANTED}")];
    if !opts.single_branch {
        specs.push("+refs/heads/*:refs/remotes/origin/*".into());
        specs.push("+refs/tags/*:refs/tags/*".into());
    }
    let remote = repo
        .remote_at(url)
        .map_err(|e| e.to_string())?
        .with_fetch_tags(gix::remote::fetch::Tags::None)
        .with_refspecs(specs.iter().map(String::as_str), Direction::Fetch)
        .map_err(|e| e.to_string())?;
    let connection = configure(
        remote.connect(Direction::Fetch).map_err(connect_error)?,
        opts,
        url,
    );
    connection
        .prepare_fetch(gix::progress::Discard, Default::default())
        .map_err(connect_error)?
        .receive(gix::progress::Discard, &interrupt)
        .map_err(|e| format!("fetching from {url}: {}", kiln_common::errors::chain(&e)))?;

    let id = match &commit {
        None => wanted_id,
        Some(c) => {
            let missing = || {
                format!(
                    "commit {c} is not in the history fetched from {url} ({})",
                    if opts.single_branch {
                        format!("only {wanted}, --git single-branch=true")
                    } else {
                        "its branches and tags".to_owned()
                    }
                )
            };
            let prefix = gix::hash::Prefix::from_hex(c)
                .map_err(|_| format!("commit {c:?}: not a commit id (hexadecimal)"))?;
            match repo.objects.lookup_prefix(prefix, None) {
                Ok(Some(Ok(id))) => id,
                Ok(Some(Err(()))) => return Err(format!("commit {c} is ambiguous in {url}")),
                Ok(None) => return Err(missing()),
                Err(e) => return Err(format!("looking up commit {c}: {e}")),
            }
        }
    };
    let commit_id = repo
        .find_object(id)
        .map_err(|e| format!("{id} from {url}: {e}"))?
        .peel_to_commit()
        .map_err(|e| format!("{id} from {url} is not a commit: {e}"))?
        .id;
    Ok((repo, commit_id))
}

/// Credentials (Kaniko's `GIT_USERNAME`/`GIT_PASSWORD`, or `GIT_TOKEN`
/// as the user name) and `--git insecure-skip-tls=true`.
fn configure<'a, 'repo, T: gix::protocol::transport::client::blocking_io::Transport>(
    connection: gix::remote::Connection<'a, 'static, 'repo, T>,
    opts: &GitOptions,
    url: &str,
) -> gix::remote::Connection<'a, 'static, 'repo, T> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let (user, password) = match env("GIT_TOKEN") {
        Some(token) => (Some(token), None),
        None => (env("GIT_USERNAME"), env("GIT_PASSWORD")),
    };
    let mut connection = if user.is_some() || password.is_some() {
        let username = user.unwrap_or_default();
        let password = password.unwrap_or_default();
        connection.with_credentials(move |action| match action {
            gix::credentials::helper::Action::Get(ctx) => {
                Ok(Some(gix::credentials::protocol::Outcome {
                    credentials: gix::sec::identity::Credentials::UsernamePassword {
                        username: username.clone(),
                        password: password.clone(),
                        oauth_refresh_token: None,
                    },
                    next: ctx.into(),
                }))
            }
            _ => Ok(None),
        })
    } else {
        connection
    };
    if opts.insecure_skip_tls && url.starts_with("https://") {
        use gix::protocol::transport::client::blocking_io::http;
        let backend = http::reqwest::Options {
            configure_client: Some(Box::new(|builder| {
                Ok(builder.danger_accept_invalid_certs(true))
            })),
            configure_request: None,
        };
        let options = http::Options {
            ssl_verify: false,
            backend: Some(std::sync::Arc::new(std::sync::Mutex::new(backend))),
            ..Default::default()
        };
        connection = connection.with_transport_options(Box::new(options));
    }
    connection
}

fn connect_error(e: impl std::error::Error + 'static) -> String {
    kiln_common::errors::chain(&e)
}

fn is_hex_id(s: &str) -> bool {
    matches!(s.len(), 40 | 64) && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Writes `commit`'s tree as tar entries under `prefix` (a submodule's
/// path, or empty), submodules included when asked.
#[allow(clippy::too_many_arguments)]
fn write_commit<W: std::io::Write>(
    repo: &gix::Repository,
    commit: gix::ObjectId,
    prefix: &str,
    url: &str,
    opts: &GitOptions,
    scratch: &Path,
    depth: usize,
    tar: &mut tar::Builder<W>,
    fetched: &mut Vec<String>,
) -> Result<(), String> {
    let commit_obj = repo
        .find_commit(commit)
        .map_err(|e| format!("commit {commit} from {url}: {e}"))?;
    let mtime = commit_obj
        .time()
        .map(|t| t.seconds.max(0) as u64)
        .unwrap_or(0);
    let tree = commit_obj
        .tree_id()
        .map_err(|e| format!("commit {commit} from {url}: {e}"))?
        .detach();
    let modules = if opts.recurse_submodules {
        submodules(repo, tree)?
    } else {
        Vec::new()
    };
    let mut walk = TreeWriter {
        repo,
        url,
        mtime,
        tar,
        modules: &modules,
        opts,
        scratch,
        depth,
        fetched,
    };
    walk.tree(tree, prefix)
}

/// `(path, url)` of the submodules `.gitmodules` names at the top of `tree`.
fn submodules(
    repo: &gix::Repository,
    tree: gix::ObjectId,
) -> Result<Vec<(String, String)>, String> {
    let tree = repo.find_tree(tree).map_err(|e| e.to_string())?;
    let Some(entry) = tree.find_entry(".gitmodules") else {
        return Ok(Vec::new());
    };
    let blob = repo.find_blob(entry.oid()).map_err(|e| e.to_string())?;
    let file = gix::submodule::File::from_bytes(&blob.data, None, &Default::default())
        .map_err(|e| format!(".gitmodules: {e}"))?;
    let mut out = Vec::new();
    for name in file.names() {
        let path = file.path(name).map_err(|e| format!(".gitmodules: {e}"))?;
        let url = file.url(name).map_err(|e| format!(".gitmodules: {e}"))?;
        out.push((
            path.to_str_lossy().into_owned(),
            url.to_bstring().to_str_lossy().into_owned(),
        ));
    }
    Ok(out)
}

struct TreeWriter<'a, W: std::io::Write> {
    repo: &'a gix::Repository,
    url: &'a str,
    mtime: u64,
    tar: &'a mut tar::Builder<W>,
    modules: &'a [(String, String)],
    opts: &'a GitOptions,
    scratch: &'a Path,
    depth: usize,
    fetched: &'a mut Vec<String>,
}

impl<W: std::io::Write> TreeWriter<'_, W> {
    fn header(&self, kind: tar::EntryType, mode: u32, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_size(size);
        h.set_mtime(self.mtime);
        h.set_uid(0);
        h.set_gid(0);
        h
    }

    fn tree(&mut self, tree: gix::ObjectId, prefix: &str) -> Result<(), String> {
        use gix::object::tree::EntryKind;
        let io = |e: std::io::Error| format!("writing the tree: {e}");
        let tree = self
            .repo
            .find_tree(tree)
            .map_err(|e| format!("tree {tree} from {}: {e}", self.url))?;
        for entry in tree.iter() {
            let entry = entry.map_err(|e| format!("tree from {}: {e}", self.url))?;
            let name = entry.filename().to_str_lossy().into_owned();
            let path = format!("{prefix}{name}");
            let id = entry.oid().to_owned();
            match entry.mode().kind() {
                EntryKind::Tree => {
                    let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
                    self.tar
                        .append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(io)?;
                    self.tree(id, &format!("{path}/"))?;
                }
                kind @ (EntryKind::Blob | EntryKind::BlobExecutable) => {
                    let blob = self
                        .repo
                        .find_blob(id)
                        .map_err(|e| format!("{path} from {}: {e}", self.url))?;
                    let mode = if kind == EntryKind::BlobExecutable {
                        0o755
                    } else {
                        0o644
                    };
                    let mut h = self.header(tar::EntryType::Regular, mode, blob.data.len() as u64);
                    self.tar
                        .append_data(&mut h, &path, blob.data.as_slice())
                        .map_err(io)?;
                }
                EntryKind::Link => {
                    let blob = self
                        .repo
                        .find_blob(id)
                        .map_err(|e| format!("{path} from {}: {e}", self.url))?;
                    let target = blob.data.to_str_lossy().into_owned();
                    let mut h = self.header(tar::EntryType::Symlink, 0o777, 0);
                    self.tar.append_link(&mut h, &path, &target).map_err(io)?;
                }
                EntryKind::Commit => {
                    // A submodule: its tree when asked for, else the empty
                    // directory `git clone` leaves.
                    let mut h = self.header(tar::EntryType::Directory, 0o755, 0);
                    self.tar
                        .append_data(&mut h, format!("{path}/"), std::io::empty())
                        .map_err(io)?;
                    if self.opts.recurse_submodules {
                        self.submodule(&path, id)?;
                    }
                }
            }
        }
        Ok(())
    }

    fn submodule(&mut self, path: &str, commit: gix::ObjectId) -> Result<(), String> {
        let Some((_, url)) = self.modules.iter().find(|(p, _)| p == path) else {
            return Err(format!(
                "submodule {path} from {}: not named in .gitmodules",
                self.url
            ));
        };
        if self.depth >= MAX_SUBMODULE_DEPTH {
            return Err(format!(
                "submodule {path} from {}: submodules nested more than {MAX_SUBMODULE_DEPTH} deep",
                self.url
            ));
        }
        let url = resolve_relative_url(self.url, url);
        let dir = self
            .scratch
            .join(format!("submodule-{}.git", self.fetched.len()));
        self.fetched.push(url.clone());
        let source = GitSource {
            url: url.clone(),
            reference: None,
            commit: Some(commit.to_string()),
        };
        let opts = GitOptions {
            branch: None,
            single_branch: false,
            ..self.opts.clone()
        };
        let (repo, commit) =
            fetch(&source, &opts, &dir).map_err(|e| format!("submodule {path}: {e}"))?;
        write_commit(
            &repo,
            commit,
            &format!("{path}/"),
            &url,
            &opts,
            self.scratch,
            self.depth + 1,
            self.tar,
            self.fetched,
        )
    }
}

/// A submodule URL relative to its superproject's (`../other.git`), as
/// git resolves it; absolute ones unchanged.
fn resolve_relative_url(base: &str, url: &str) -> String {
    if !(url.starts_with("./") || url.starts_with("../")) {
        return url.to_owned();
    }
    let mut base: Vec<&str> = base.trim_end_matches('/').split('/').collect();
    for part in url.split('/') {
        match part {
            "." => {}
            ".." => {
                base.pop();
            }
            other => base.push(other),
        }
    }
    base.join("/")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_submodule_urls_resolve_against_the_superproject() {
        assert_eq!(
            resolve_relative_url("git://h:1/group/app.git", "../lib.git"),
            "git://h:1/group/lib.git"
        );
        assert_eq!(
            resolve_relative_url("https://h/a.git", "https://other/b.git"),
            "https://other/b.git"
        );
    }

    #[test]
    fn only_full_hex_ids_count_as_commits_in_the_ref_position() {
        assert!(is_hex_id(&"a".repeat(40)));
        assert!(!is_hex_id("abc123"));
        assert!(!is_hex_id("refs/heads/main"));
    }
}
