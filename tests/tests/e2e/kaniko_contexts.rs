//! `--context` as Kaniko takes it, with real sources: a `dir://` path,
//! local `.tar` and `.tar.gz` archives, a tar.gz piped into the real binary
//! (`tar://stdin`), a hostile archive (refused, nothing written outside), a
//! git repository made with the `git` CLI and served by `git daemon`
//! (branch, commit, `--git branch=`, `--context-sub-path`), an `s3://`
//! object on s3s-fs and an `az://` blob on Azurite. Each build writes an
//! OCI layout whose files are checked.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use kiln_e2e::contexts::{GitDaemon, context_archive, git, layout_files};
use kiln_e2e::kiln_bin;

const DOCKERFILE: &str = "FROM scratch\nCOPY . /ctx/\n";

/// Runs kiln-executor (FROM scratch, no push, an OCI layout in `out`)
/// with `args`, `env` and optional standard input.
fn executor(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>, out: &Path) -> Output {
    let mut command = Command::new(kiln_bin("kiln-executor"));
    command
        .args(args)
        .args(["--no-push", "--cache=false", "--oci-layout-path"])
        .arg(out.join("layout"))
        .arg("--cache-dir")
        .arg(out.join("state"))
        .env_remove("GIT_PULL_METHOD")
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    });
    let mut child = command.spawn().expect("starting kiln-executor");
    if let Some(bytes) = stdin {
        let mut pipe = child.stdin.take().expect("stdin pipe");
        pipe.write_all(bytes).expect("writing the context to stdin");
    }
    child.wait_with_output().expect("waiting for kiln-executor")
}

/// Builds and returns the image's files; panics with the log on failure.
fn build(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> BTreeMap<String, String> {
    let out = tempfile::tempdir().unwrap();
    let o = executor(args, env, stdin, out.path());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "kiln-executor {args:?} failed:\n{stderr}"
    );
    let files = layout_files(&out.path().join("layout")).unwrap();
    assert_scratch_is_empty(&out.path().join("state"));
    files
}

/// A fetched context is gone once the build is over.
fn assert_scratch_is_empty(state: &Path) {
    let work = state.join("work");
    if let Ok(entries) = fs::read_dir(&work) {
        let left: Vec<_> = entries.flatten().map(|e| e.path()).collect();
        assert!(left.is_empty(), "scratch space left behind: {left:?}");
    }
}

fn fails(args: &[&str], env: &[(&str, &str)], stdin: Option<&[u8]>) -> String {
    let out = tempfile::tempdir().unwrap();
    let o = executor(args, env, stdin, out.path());
    let stderr = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(
        !o.status.success(),
        "kiln-executor {args:?} succeeded:\n{stderr}"
    );
    assert!(!out.path().join("layout/index.json").exists());
    assert_scratch_is_empty(&out.path().join("state"));
    stderr
}

#[test]
fn dir_url_is_a_local_directory_and_a_missing_one_is_named_once() {
    let ctx = tempfile::tempdir().unwrap();
    fs::write(ctx.path().join("Dockerfile"), DOCKERFILE).unwrap();
    fs::write(ctx.path().join("hello.txt"), "from dir://").unwrap();
    let files = build(
        &["--context", &format!("dir://{}", ctx.path().display())],
        &[],
        None,
    );
    assert_eq!(files["ctx/hello.txt"], "from dir://");

    let err = fails(&["--context", "dir:///nonexistent/kiln-context"], &[], None);
    assert!(err.contains("dir:///nonexistent/kiln-context"), "{err}");
    assert_eq!(
        err.matches("No such file").count() + err.matches("no such directory").count(),
        1,
        "{err}"
    );
}

#[test]
fn local_tar_and_tar_gz_archives_are_contexts() {
    let dir = tempfile::tempdir().unwrap();
    for (name, gzip) in [("ctx.tar", false), ("ctx.tar.gz", true)] {
        let archive = dir.path().join(name);
        let content = format!("from {name}");
        fs::write(
            &archive,
            context_archive(&[("Dockerfile", DOCKERFILE), ("app/a.txt", &content)], gzip),
        )
        .unwrap();
        let files = build(
            &["--context", &format!("tar://{}", archive.display())],
            &[],
            None,
        );
        assert_eq!(files["ctx/app/a.txt"], content, "{name}");
        assert_eq!(files["ctx/Dockerfile"], DOCKERFILE);
    }
}

#[test]
fn tar_stdin_reads_a_tar_gz_piped_into_the_executor() {
    let archive = context_archive(
        &[
            ("Dockerfile", DOCKERFILE),
            ("piped.txt", "through stdin"),
            (
                "other/Dockerfile.alt",
                "FROM scratch\nCOPY piped.txt /alt.txt\n",
            ),
        ],
        true,
    );
    let files = build(&["--context", "tar://stdin"], &[], Some(&archive));
    assert_eq!(files["ctx/piped.txt"], "through stdin");
    // --dockerfile is looked up in the unpacked context.
    let files = build(
        &[
            "--context=tar://stdin",
            "--dockerfile",
            "other/Dockerfile.alt",
        ],
        &[],
        Some(&archive),
    );
    assert_eq!(files["alt.txt"], "through stdin");
}

#[test]
fn a_hostile_archive_is_refused_with_a_clear_error_and_writes_nothing_outside() {
    let dir = tempfile::tempdir().unwrap();
    // A symlink out of the context, then a file written through it.
    let mut builder = tar::Builder::new(Vec::new());
    let mut link = tar::Header::new_gnu();
    link.set_entry_type(tar::EntryType::Symlink);
    link.set_size(0);
    link.set_mode(0o777);
    link.set_uid(0);
    link.set_gid(0);
    link.set_mtime(0);
    builder
        .append_link(&mut link, "escape", dir.path())
        .unwrap();
    let mut file = tar::Header::new_gnu();
    file.set_entry_type(tar::EntryType::Regular);
    file.set_size(4);
    file.set_mode(0o644);
    file.set_uid(0);
    file.set_gid(0);
    file.set_mtime(0);
    builder
        .append_data(&mut file, "escape/pwned.txt", &b"evil"[..])
        .unwrap();
    // And a name with `..`, which tar::Builder refuses: set it raw.
    let mut dotdot = tar::Header::new_gnu();
    dotdot.as_gnu_mut().unwrap().name[..16].copy_from_slice(b"../dotdot-pwned\0");
    dotdot.set_entry_type(tar::EntryType::Regular);
    dotdot.set_size(0);
    dotdot.set_mode(0o644);
    dotdot.set_uid(0);
    dotdot.set_gid(0);
    dotdot.set_mtime(0);
    dotdot.set_cksum();
    let mut archive = builder.into_inner().unwrap();
    let end = archive.len();
    archive.truncate(end - 1024);
    archive.extend_from_slice(dotdot.as_bytes());
    archive.extend_from_slice(&[0; 1024]);
    let path = dir.path().join("evil.tar");
    fs::write(&path, &archive).unwrap();

    let err = fails(
        &["--context", &format!("tar://{}", path.display())],
        &[],
        None,
    );
    // The symlink entry resolves inside the context; the `..` entry is
    // refused by name.
    assert!(
        err.contains("evil.tar") && err.contains("rejected"),
        "{err}"
    );
    assert!(!dir.path().join("pwned.txt").exists());
    assert!(!dir.path().parent().unwrap().join("dotdot-pwned").exists());
}

#[test]
fn git_repositories_served_by_git_daemon_build_the_ref_and_commit_asked_for() {
    let root = tempfile::tempdir().unwrap();
    let work = root.path().join("work");
    fs::create_dir(&work).unwrap();
    git(&work, &["init", "-q", "-b", "main"]).unwrap();
    fs::write(work.join("Dockerfile"), DOCKERFILE).unwrap();
    fs::write(work.join("v.txt"), "one").unwrap();
    fs::create_dir(work.join("sub")).unwrap();
    fs::write(
        work.join("sub/Dockerfile"),
        "FROM scratch\nCOPY s.txt /sub-only.txt\n",
    )
    .unwrap();
    fs::write(work.join("sub/s.txt"), "in sub").unwrap();
    git(&work, &["add", "-A"]).unwrap();
    git(&work, &["commit", "-q", "-m", "one"]).unwrap();
    let first = git(&work, &["rev-parse", "HEAD"]).unwrap();
    git(&work, &["checkout", "-q", "-b", "dev"]).unwrap();
    fs::write(work.join("d.txt"), "dev only").unwrap();
    git(&work, &["add", "-A"]).unwrap();
    git(&work, &["commit", "-q", "-m", "dev"]).unwrap();
    git(&work, &["checkout", "-q", "main"]).unwrap();
    fs::write(work.join("v.txt"), "two").unwrap();
    git(&work, &["commit", "-q", "-am", "two"]).unwrap();
    let served = root.path().join("served");
    fs::create_dir(&served).unwrap();
    git(
        root.path(),
        &["clone", "-q", "--bare", "work", "served/app.git"],
    )
    .unwrap();
    let daemon = GitDaemon::start(&served).unwrap();
    let url = format!("git://{}/app.git", daemon.address());
    let env = [("GIT_PULL_METHOD", "git")];

    let head = build(&["--context", &url], &env, None);
    assert_eq!(head["ctx/v.txt"], "two");
    assert!(!head.contains_key("ctx/d.txt"));
    assert!(!head.keys().any(|k| k.starts_with("ctx/.git")), "{head:?}");

    let dev = build(&["--context", &format!("{url}#refs/heads/dev")], &env, None);
    assert_eq!(
        (dev["ctx/v.txt"].as_str(), dev["ctx/d.txt"].as_str()),
        ("one", "dev only")
    );

    let pinned = build(
        &["--context", &format!("{url}#refs/heads/main#{first}")],
        &env,
        None,
    );
    assert_eq!(pinned["ctx/v.txt"], "one");

    let branch = build(
        &[
            "--context",
            &url,
            "--git",
            "branch=dev",
            "--git=single-branch=true",
        ],
        &env,
        None,
    );
    assert_eq!(branch["ctx/d.txt"], "dev only");

    let sub = build(
        &["--context", &url, "--context-sub-path", "sub"],
        &env,
        None,
    );
    assert_eq!(sub["sub-only.txt"], "in sub");

    let err = fails(
        &["--context", &format!("{url}#refs/heads/nope")],
        &env,
        None,
    );
    assert!(
        err.contains(&url) && err.contains("refs/heads/nope"),
        "{err}"
    );
    let err = fails(
        &["--context", &url, "--context-sub-path", "../.."],
        &env,
        None,
    );
    assert!(
        err.contains("--context-sub-path") && err.contains("leaves"),
        "{err}"
    );
}

#[test]
fn s3_objects_are_fetched_from_an_s3_compatible_store() {
    let Some(s3) =
        kiln_e2e::s3::S3Server::start("s3_objects_are_fetched_from_an_s3_compatible_store")
    else {
        return;
    };
    // s3s-fs serves the files under its data directory as objects.
    let object = s3
        .root()
        .join("data")
        .join(s3.bucket_name())
        .join("builds/ctx.tar.gz");
    fs::create_dir_all(object.parent().unwrap()).unwrap();
    fs::write(
        &object,
        context_archive(&[("Dockerfile", DOCKERFILE), ("s3.txt", "from s3")], true),
    )
    .unwrap();
    let env = [
        ("AWS_ACCESS_KEY_ID", s3.access_key()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_key()),
        ("AWS_REGION", s3.region()),
        ("S3_ENDPOINT", s3.endpoint()),
        ("S3_FORCE_PATH_STYLE", "true"),
    ];
    let context = format!("s3://{}/builds/ctx.tar.gz", s3.bucket_name());
    let files = build(&["--context", &context], &env, None);
    assert_eq!(files["ctx/s3.txt"], "from s3");

    let missing = format!("s3://{}/builds/none.tar.gz", s3.bucket_name());
    let err = fails(&["--context", &missing], &env, None);
    assert!(err.contains(&missing) && err.contains("not found"), "{err}");
}

#[test]
fn azure_blobs_are_fetched_from_azurite() {
    let Some(azurite) = kiln_e2e::azurite::Azurite::start("azure_blobs_are_fetched_from_azurite")
    else {
        return;
    };
    use kiln_e2e::azurite::{ACCOUNT, ACCOUNT_KEY};
    use object_store::ObjectStoreExt as _;
    let store = object_store::azure::MicrosoftAzureBuilder::new()
        .with_account(ACCOUNT)
        .with_access_key(ACCOUNT_KEY)
        .with_endpoint(azurite.account_url())
        .with_allow_http(true)
        .with_container_name(azurite.container())
        .build()
        .expect("configuring the Azurite client");
    let archive = context_archive(
        &[("Dockerfile", DOCKERFILE), ("az.txt", "from azure")],
        true,
    );
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(store.put(&"ctx/context.tar.gz".into(), archive.into()))
        .expect("uploading the context to Azurite");
    let endpoint = azurite.account_url();
    let env = [
        ("AZURE_STORAGE_ACCOUNT_NAME", ACCOUNT),
        ("AZURE_STORAGE_ACCOUNT_KEY", ACCOUNT_KEY),
        ("AZURE_STORAGE_ENDPOINT", endpoint.as_str()),
    ];
    let files = build(
        &[
            "--context",
            &format!("az://{}/ctx/context.tar.gz", azurite.container()),
        ],
        &env,
        None,
    );
    assert_eq!(files["ctx/az.txt"], "from azure");
}
