//! Remote ADD sources: files behind HTTP(S) URLs and git repositories.
//!
//! Both are fetched once per build, before keys are computed, because what
//! they contain is part of the step's key: a URL's key input is the sha256 of
//! the downloaded bytes (checked against `--checksum` when given), a git
//! source's is the commit it resolved to. Downloads stream to disk; a URL
//! file gets the `Last-Modified` time as its mtime and mode 0600, as Docker
//! does, and is never extracted.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, SystemTime};

use futures::StreamExt;
use kiln_common::{Digest, Sha256Writer};

/// Why a remote source could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("--checksum={checksum}: {source}")]
    Checksum {
        checksum: String,
        #[source]
        source: kiln_common::digest::DigestError,
    },
    #[error("downloading {url}: {source}")]
    Download {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("downloading {url}: {status}")]
    Status {
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{url}: checksum mismatch: --checksum says {expected}, the download is {digest}")]
    Mismatch {
        url: String,
        expected: Digest,
        digest: Digest,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("running git: {0}")]
    GitSpawn(#[source] std::io::Error),
    #[error("git {args} failed: {stderr}")]
    Git { args: String, stderr: String },
    #[error("removing .git: {0}")]
    RemoveGitDir(#[source] std::io::Error),
    #[error("{source_url}: subdirectory {subdir:?} leaves the repository")]
    Subdir { source_url: String, subdir: String },
    #[error("ADD --checksum applies to URLs, not git repositories")]
    ChecksumOnGit,
    #[error("setting up the download client: {0}")]
    Client(#[source] reqwest::Error),
}

fn io_at(path: &Path) -> impl FnOnce(std::io::Error) -> RemoteError + '_ {
    move |source| RemoteError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A fetched remote source, ready to be copied like a context file.
#[derive(Debug, Clone)]
pub struct RemoteSource {
    /// A file (URL) or a directory (git checkout).
    pub path: PathBuf,
    /// The name a file gets inside a directory destination.
    pub name: String,
    /// What the cache key depends on.
    pub identity: String,
    /// URL downloads are copied as they are; git checkouts are directories.
    pub is_git: bool,
}

pub fn is_git(source: &str) -> bool {
    let without_fragment = source.split('#').next().unwrap_or(source);
    source.starts_with("git@")
        || source.starts_with("git://")
        || source.starts_with("ssh://")
        || ((source.starts_with("https://") || source.starts_with("http://"))
            && without_fragment.ends_with(".git"))
}

pub fn is_remote(source: &str) -> bool {
    is_git(source) || source.starts_with("http://") || source.starts_with("https://")
}

/// Downloads `url` into `dir`, verifying `checksum` (`sha256:<hex>`) when
/// given.
pub async fn download(
    client: &reqwest::Client,
    url: &str,
    checksum: Option<&str>,
    dir: &Path,
) -> Result<RemoteSource, RemoteError> {
    let expected = checksum
        .map(|c| {
            c.parse::<Digest>().map_err(|source| RemoteError::Checksum {
                checksum: c.to_owned(),
                source,
            })
        })
        .transpose()?;
    let download = |source| RemoteError::Download {
        url: url.to_owned(),
        source,
    };
    let resp = client.get(url).send().await.map_err(download)?;
    if !resp.status().is_success() {
        return Err(RemoteError::Status {
            url: url.to_owned(),
            status: resp.status(),
        });
    }
    let last_modified = resp
        .headers()
        .get(reqwest::header::LAST_MODIFIED)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| httpdate::parse_http_date(v).ok());
    let name = file_name_of(url);
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let path = dir.join(&name);
    let file = fs::File::create(&path).map_err(io_at(&path))?;
    let mut writer = Sha256Writer::new(std::io::BufWriter::new(file));
    let mut body = resp.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk = chunk.map_err(download)?;
        writer.write_all(&chunk).map_err(io_at(&path))?;
    }
    let (mut inner, digest, _) = writer.finish();
    inner.flush().map_err(io_at(&path))?;
    drop(inner);
    if let Some(expected) = expected
        && expected != digest
    {
        let _ = fs::remove_file(&path);
        return Err(RemoteError::Mismatch {
            url: url.to_owned(),
            expected,
            digest,
        });
    }
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&path, fs::Permissions::from_mode(0o600)).map_err(io_at(&path))?;
    let mtime = last_modified.unwrap_or(SystemTime::UNIX_EPOCH + Duration::from_secs(0));
    if let Ok(f) = fs::File::options().write(true).open(&path) {
        let _ = f.set_modified(mtime);
    }
    Ok(RemoteSource {
        path,
        name,
        identity: crate::keys::remote_file_identity(url, &digest),
        is_git: false,
    })
}

/// Clones `source` (`URL[#ref[:subdir]]`) into `dir`; without
/// `keep_git_dir` the `.git` directory is removed, as BuildKit does.
pub fn clone(source: &str, keep_git_dir: bool, dir: &Path) -> Result<RemoteSource, RemoteError> {
    let (url, fragment) = match source.split_once('#') {
        Some((u, f)) => (u, Some(f)),
        None => (source, None),
    };
    let (reference, subdir) = match fragment {
        Some(f) => match f.split_once(':') {
            Some((r, s)) => (Some(r), Some(s)),
            None => (Some(f), None),
        },
        None => (None, None),
    };
    let checkout = dir.join("checkout");
    let git = |args: &[&str], cwd: Option<&Path>| -> Result<String, RemoteError> {
        let mut cmd = Command::new("git");
        cmd.args(args).env("GIT_TERMINAL_PROMPT", "0");
        if let Some(cwd) = cwd {
            cmd.current_dir(cwd);
        }
        let out = cmd.output().map_err(RemoteError::GitSpawn)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
        } else {
            Err(RemoteError::Git {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            })
        }
    };
    fs::create_dir_all(dir).map_err(io_at(dir))?;
    let target = checkout.to_string_lossy().into_owned();
    git(&["clone", "--quiet", "--no-checkout", url, &target], None)?;
    let wanted = reference.unwrap_or("HEAD");
    git(
        &["checkout", "--quiet", "--detach", wanted],
        Some(&checkout),
    )?;
    git(
        &["submodule", "update", "--init", "--recursive", "--quiet"],
        Some(&checkout),
    )?;
    let commit = git(&["rev-parse", "HEAD"], Some(&checkout))?;
    if !keep_git_dir {
        fs::remove_dir_all(checkout.join(".git")).map_err(RemoteError::RemoveGitDir)?;
    }
    let path = match subdir {
        Some(s) => {
            let clean =
                crate::sources::context::clean_relative(s).ok_or_else(|| RemoteError::Subdir {
                    source_url: source.to_owned(),
                    subdir: s.to_owned(),
                })?;
            checkout.join(clean)
        }
        None => checkout,
    };
    Ok(RemoteSource {
        path,
        name: String::new(),
        identity: crate::keys::git_identity(url, &commit, subdir, keep_git_dir),
        is_git: true,
    })
}

/// The last path segment of a URL, or `download` when it has none.
fn file_name_of(url: &str) -> String {
    let path = url
        .split(['?', '#'])
        .next()
        .unwrap_or(url)
        .splitn(4, '/')
        .nth(3)
        .unwrap_or("");
    path.rsplit('/')
        .find(|s| !s.is_empty() && *s != "." && *s != "..")
        .unwrap_or("download")
        .to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_sources_are_recognised_like_buildkit() {
        assert!(is_git("https://example.com/repo.git"));
        assert!(is_git("https://example.com/repo.git#v1.0:sub"));
        assert!(is_git("git@example.com:org/repo"));
        assert!(!is_git("https://example.com/file.tar.gz"));
        assert!(is_remote("https://example.com/file.tar.gz"));
        assert!(!is_remote("src/file"));
    }

    #[test]
    fn file_names_come_from_the_url_path() {
        assert_eq!(file_name_of("https://h/a/b/tool.tgz?x=1"), "tool.tgz");
        assert_eq!(file_name_of("https://h/"), "download");
        assert_eq!(file_name_of("https://h/a/../"), "a");
    }

    #[test]
    fn clone_checks_out_a_ref_and_drops_the_git_dir() {
        let repo = tempfile::tempdir().unwrap();
        let run = |args: &[&str]| {
            let ok = Command::new("git")
                .args(args)
                .current_dir(repo.path())
                .env("GIT_AUTHOR_NAME", "t")
                .env("GIT_AUTHOR_EMAIL", "t@t")
                .env("GIT_COMMITTER_NAME", "t")
                .env("GIT_COMMITTER_EMAIL", "t@t")
                .status()
                .unwrap()
                .success();
            assert!(ok, "git {args:?}");
        };
        run(&["init", "--quiet"]);
        fs::write(repo.path().join("a.txt"), "v1").unwrap();
        run(&["add", "."]);
        run(&["commit", "--quiet", "-m", "one"]);
        run(&["tag", "v1"]);
        fs::write(repo.path().join("a.txt"), "v2").unwrap();
        run(&["commit", "--quiet", "-am", "two"]);
        let url = format!("file://{}", repo.path().display());
        let out = tempfile::tempdir().unwrap();
        let src = clone(&format!("{url}#v1"), false, out.path()).unwrap();
        assert_eq!(fs::read_to_string(src.path.join("a.txt")).unwrap(), "v1");
        assert!(!src.path.join(".git").exists());
        let out2 = tempfile::tempdir().unwrap();
        let head = clone(&url, true, out2.path()).unwrap();
        assert_eq!(fs::read_to_string(head.path.join("a.txt")).unwrap(), "v2");
        assert!(head.path.join(".git").exists());
        assert_ne!(src.identity, head.identity);
    }

    #[tokio::test]
    async fn download_verifies_the_checksum() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            for _ in 0..2 {
                let (mut sock, _) = listener.accept().await.unwrap();
                let mut buf = [0u8; 1024];
                let _ = sock.read(&mut buf).await.unwrap();
                let body = "payload";
                let resp = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nLast-Modified: Wed, 21 Oct 2015 07:28:00 GMT\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
                sock.write_all(resp.as_bytes()).await.unwrap();
            }
        });
        let client = reqwest::Client::new();
        let dir = tempfile::tempdir().unwrap();
        let url = format!("http://{addr}/files/tool.bin");
        let good = Digest::of_bytes(b"payload").to_string();
        let src = download(&client, &url, Some(&good), dir.path())
            .await
            .unwrap();
        assert_eq!(fs::read_to_string(&src.path).unwrap(), "payload");
        assert_eq!(src.name, "tool.bin");
        let mtime = fs::metadata(&src.path).unwrap().modified().unwrap();
        assert_eq!(
            mtime,
            SystemTime::UNIX_EPOCH + Duration::from_secs(1_445_412_480)
        );
        let bad = Digest::of_bytes(b"other").to_string();
        let err = download(&client, &url, Some(&bad), dir.path())
            .await
            .unwrap_err();
        assert!(matches!(err, RemoteError::Mismatch { .. }), "{err}");
        assert!(err.to_string().contains("checksum mismatch"), "{err}");
        server.await.unwrap();
    }
}
