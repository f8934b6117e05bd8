use super::*;

fn env_none(_: &str) -> Option<String> {
    None
}

fn parse(context: &str) -> Result<Source, SourceError> {
    ContextSpec::parse(context, true, None, None, GitOptions::default(), &env_none)
        .map(|s| s.source)
}

#[test]
fn plain_paths_and_dir_urls_are_local_directories() {
    assert_eq!(parse("ctx").unwrap(), Source::Dir("ctx".into()));
    assert_eq!(
        parse("dir:///work/ctx").unwrap(),
        Source::Dir("/work/ctx".into())
    );
    assert_eq!(
        parse("tar:///tmp/c.tar.gz").unwrap(),
        Source::Tar("/tmp/c.tar.gz".into())
    );
    assert_eq!(parse("tar://stdin").unwrap(), Source::TarStdin);
}

#[test]
fn git_urls_follow_kanikos_syntax_and_pull_method() {
    let Source::Git(g) = parse("git://example.com/org/repo.git#refs/heads/dev#0123abc").unwrap()
    else {
        panic!("not git")
    };
    assert_eq!(g.url, "https://example.com/org/repo.git");
    assert_eq!(g.reference.as_deref(), Some("refs/heads/dev"));
    assert_eq!(g.commit.as_deref(), Some("0123abc"));
    let http = |name: &str| (name == "GIT_PULL_METHOD").then(|| "git".to_owned());
    let spec = ContextSpec::parse(
        "git://127.0.0.1:9418/r.git",
        true,
        None,
        None,
        GitOptions::default(),
        &http,
    )
    .unwrap();
    let Source::Git(g) = spec.source else {
        panic!("not git")
    };
    assert_eq!(
        (g.url.as_str(), g.reference, g.commit),
        ("git://127.0.0.1:9418/r.git", None, None)
    );
    let Source::Git(g) = parse("https://example.com/r.git#main").unwrap() else {
        panic!("not git")
    };
    assert_eq!(
        (g.url.as_str(), g.reference.as_deref()),
        ("https://example.com/r.git", Some("main"))
    );
    let bad = |name: &str| (name == "GIT_PULL_METHOD").then(|| "ssh".to_owned());
    let err = ContextSpec::parse(
        "git://h/r.git",
        true,
        None,
        None,
        GitOptions::default(),
        &bad,
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("GIT_PULL_METHOD") && err.contains("ssh"),
        "{err}"
    );
}

#[test]
fn bucket_urls_name_bucket_and_object() {
    let object = |context: &str| match parse(context).unwrap() {
        Source::Object(o) => o,
        other => panic!("{context}: {other:?}"),
    };
    let s3 = object("s3://builds/app/ctx.tar.gz");
    assert_eq!(
        (s3.store, s3.bucket.as_str(), s3.key.as_str()),
        (Store::S3, "builds", "app/ctx.tar.gz")
    );
    let gs = object("gs://builds");
    assert_eq!((gs.store, gs.key.as_str()), (Store::Gcs, DEFAULT_OBJECT));
    let az = object("az://container/dir/ctx.tar.gz");
    assert_eq!(
        (az.store, az.bucket.as_str(), az.key.as_str()),
        (Store::Azure, "container", "dir/ctx.tar.gz")
    );
    let blob = object("https://acct.blob.core.windows.net/container/ctx.tar.gz");
    assert_eq!(
        (blob.store, blob.bucket.as_str(), blob.key.as_str()),
        (Store::Azure, "container", "ctx.tar.gz")
    );
    assert_eq!(
        blob.azure_account,
        Some(("acct".into(), "https://acct.blob.core.windows.net".into()))
    );
    assert!(parse("s3://bucket-only").is_err());
    assert!(parse("s3:///key").is_err());
    assert_eq!(
        parse("https://example.com/ctx.tar.gz").unwrap(),
        Source::HttpsTar("https://example.com/ctx.tar.gz".into())
    );
    let err = parse("ftp://h/x").unwrap_err().to_string();
    assert!(
        err.contains("ftp://h/x") && err.contains("unknown scheme"),
        "{err}"
    );
}

#[test]
fn bucket_flag_replaces_default_or_remote_context_like_kaniko() {
    let spec = |context: &str, explicit: bool, bucket: &str| {
        ContextSpec::parse(
            context,
            explicit,
            Some(bucket),
            None,
            GitOptions::default(),
            &env_none,
        )
        .unwrap()
        .given
    };
    assert_eq!(spec(".", false, "b"), "gs://b");
    assert_eq!(spec("s3://x/y", true, "b"), "gs://b");
    assert_eq!(spec(".", false, "s3://b/k.tgz"), "s3://b/k.tgz");
    assert_eq!(
        spec("no/such/local/dir.tar.gz", true, "b"),
        "gs://b/no/such/local/dir.tar.gz"
    );
    // An existing local directory stays one, as in Kaniko.
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().to_str().unwrap();
    assert_eq!(spec(local, true, "b"), local);
}

#[test]
fn git_options_take_kanikos_keys_one_or_several_at_a_time() {
    let o = GitOptions::parse(&["branch=dev", "single-branch=true,recurse-submodules=1"]).unwrap();
    assert_eq!(o.branch.as_deref(), Some("dev"));
    assert!(o.single_branch && o.recurse_submodules && !o.insecure_skip_tls);
    let o = GitOptions::parse(&["insecure-skip-tls=True", "single-branch=false"]).unwrap();
    assert!(o.insecure_skip_tls && !o.single_branch);
    for bad in ["branch", "single-branch=yes", "colour=blue"] {
        let err = GitOptions::parse(&[bad]).unwrap_err().to_string();
        assert!(
            err.contains("--git") && err.contains(bad.split('=').next().unwrap()),
            "{err}"
        );
    }
}

#[test]
fn s3_endpoint_follows_kanikos_path_style_switch() {
    assert_eq!(
        s3_endpoint("https://minio.example:9000", "b", true),
        "https://minio.example:9000"
    );
    assert_eq!(
        s3_endpoint("https://minio.example:9000/", "b", false),
        "https://b.minio.example:9000"
    );
    // No virtual host on an IP address.
    assert_eq!(
        s3_endpoint("http://127.0.0.1:9000", "b", false),
        "http://127.0.0.1:9000"
    );
}

fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        h.set_entry_type(tar::EntryType::Regular);
        builder.append_data(&mut h, name, *data).unwrap();
    }
    builder.into_inner().unwrap().finish().unwrap()
}

#[test]
fn a_tar_context_is_unpacked_into_a_private_directory_removed_on_drop() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("ctx.tar.gz");
    fs::write(
        &archive,
        tar_gz(&[("Dockerfile", b"FROM scratch\n"), ("app/a.txt", b"a")]),
    )
    .unwrap();
    let spec = ContextSpec::parse(
        &format!("tar://{}", archive.display()),
        true,
        None,
        Some("app"),
        GitOptions::default(),
        &env_none,
    )
    .unwrap();
    let scratch = dir.path().join("scratch");
    let m = spec.materialize(&scratch, 1 << 20).unwrap();
    assert_eq!(fs::read(m.dir().join("a.txt")).unwrap(), b"a");
    let private = m.dir().parent().unwrap().parent().unwrap();
    assert_eq!(
        fs::metadata(private).unwrap().permissions().mode() & 0o777,
        0o700
    );
    drop(m);
    assert_eq!(
        fs::read_dir(&scratch).unwrap().count(),
        0,
        "scratch left behind"
    );
}

#[test]
fn a_hostile_archive_is_refused_and_leaves_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("evil.tar");
    // `tar::Builder` refuses `..` itself: write the name into the header.
    let mut h = tar::Header::new_gnu();
    h.as_gnu_mut().unwrap().name[..13].copy_from_slice(b"../escaped.tx");
    h.set_size(1);
    h.set_mode(0o644);
    h.set_entry_type(tar::EntryType::Regular);
    h.set_uid(0);
    h.set_gid(0);
    h.set_mtime(0);
    h.set_cksum();
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(&[b'x'; 512]);
    bytes.extend_from_slice(&[0; 1024]);
    fs::write(&archive, bytes).unwrap();
    let spec = ContextSpec::parse(
        &format!("tar://{}", archive.display()),
        true,
        None,
        None,
        GitOptions::default(),
        &env_none,
    )
    .unwrap();
    let scratch = dir.path().join("scratch");
    let err = spec.materialize(&scratch, 1 << 20).unwrap_err().to_string();
    assert!(
        err.contains("evil.tar") && err.contains("rejected"),
        "{err}"
    );
    assert_eq!(fs::read_dir(&scratch).unwrap().count(), 0);
    assert!(!dir.path().join("escaped.tx").exists());
}

#[test]
fn a_missing_directory_is_named_once() {
    let err = ContextSpec::parse(
        "dir:///no/such/kiln-ctx",
        true,
        None,
        None,
        GitOptions::default(),
        &env_none,
    )
    .unwrap()
    .materialize(Path::new("/tmp"), 1)
    .unwrap_err()
    .to_string();
    assert_eq!(
        err,
        "build context dir:///no/such/kiln-ctx: no such directory"
    );
}

#[test]
fn the_sub_path_must_stay_inside_the_context() {
    let dir = tempfile::tempdir().unwrap();
    fs::create_dir(dir.path().join("sub")).unwrap();
    std::os::unix::fs::symlink("/etc", dir.path().join("out")).unwrap();
    let with = |sub: &str| {
        ContextSpec::parse(
            dir.path().to_str().unwrap(),
            true,
            None,
            Some(sub),
            GitOptions::default(),
            &env_none,
        )
        .unwrap()
        .materialize(Path::new("/tmp"), 1)
    };
    assert_eq!(
        with("sub").unwrap().dir(),
        fs::canonicalize(dir.path().join("sub")).unwrap()
    );
    for (sub, why) in [("../x", "leaves"), ("out", "outside"), ("none", "no such")] {
        let err = with(sub).unwrap_err().to_string();
        assert!(
            err.contains("--context-sub-path") && err.contains(why),
            "{sub}: {err}"
        );
    }
}

#[test]
fn dockerfile_resolves_against_the_materialized_context() {
    let ctx = Path::new("/ctx");
    assert_eq!(
        resolve_dockerfile(None, ctx),
        PathBuf::from("/ctx/Dockerfile")
    );
    assert_eq!(
        resolve_dockerfile(Some(Path::new("sub/D")), ctx),
        PathBuf::from("/ctx/sub/D")
    );
    assert_eq!(
        resolve_dockerfile(Some(Path::new("/abs/D")), ctx),
        PathBuf::from("/abs/D")
    );
}

#[test]
fn an_empty_archive_is_an_error_not_an_empty_context() {
    let dir = tempfile::tempdir().unwrap();
    let archive = dir.path().join("empty.tar");
    fs::write(&archive, [0u8; 1024]).unwrap();
    let err = ContextSpec::parse(
        &format!("tar://{}", archive.display()),
        true,
        None,
        None,
        GitOptions::default(),
        &env_none,
    )
    .unwrap()
    .materialize(&dir.path().join("scratch"), 1 << 20)
    .unwrap_err()
    .to_string();
    assert!(err.contains("empty.tar") && err.contains("empty"), "{err}");
}
