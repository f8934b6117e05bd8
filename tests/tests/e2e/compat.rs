//! Dockerfile compatibility: the cases where kiln once built a different
//! image than BuildKit, or none (issue 17). Each test builds with the real
//! `kiln-executor` on a local busybox base, unpacks the result with umoci
//! (an independent reader) and checks the root filesystem, the exit status
//! or the manifest against what BuildKit does.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{Registry, RegistryAuth, kiln_bin, make_busybox_layout, push_busybox, run};

/// A work directory with a busybox base image in an OCI layout.
struct Bench {
    work: tempfile::TempDir,
    base: PathBuf,
}

impl Bench {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        let base = work.path().join("base");
        make_busybox_layout(&base, "latest").unwrap();
        Bench { work, base }
    }

    /// A context `name` with `dockerfile` (`BASE` replaced by the base
    /// image) and `files`.
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let base = format!("oci-layout://{}:latest", self.base.display());
        fs::write(dir.join("Dockerfile"), dockerfile.replace("BASE", &base)).unwrap();
        for (rel, content) in files {
            let p = dir.join(rel);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, content).unwrap();
        }
        dir
    }

    /// Runs kiln-executor on `ctx`, writing an OCI layout `<ctx>.layout`.
    fn executor(&self, ctx: &Path, extra: &[&str]) -> Output {
        Command::new(kiln_bin("kiln-executor"))
            .arg("--context")
            .arg(ctx)
            .arg("--oci-layout-path")
            .arg(layout_of(ctx))
            .args(["--destination", "kiln.local/compat:latest", "--no-push"])
            .arg("--cache-dir")
            .arg(self.work.path().join("state"))
            .args(extra)
            .output()
            .expect("running kiln-executor")
    }

    /// Builds `ctx` and returns the unpacked root filesystem.
    fn build(&self, ctx: &Path) -> PathBuf {
        let out = self.executor(ctx, &[]);
        assert!(
            out.status.success(),
            "kiln-executor failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        unpack(&layout_of(ctx), &ctx.with_extension("bundle"))
    }
}

fn layout_of(ctx: &Path) -> PathBuf {
    ctx.with_extension("layout")
}

/// `umoci unpack`s `layout:latest` into `bundle`; returns its rootfs.
fn unpack(layout: &Path, bundle: &Path) -> PathBuf {
    kiln_e2e::umoci_unpack(layout, bundle).unwrap()
}

fn owner(p: &Path) -> (u32, u32) {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
    (m.uid(), m.gid())
}

fn mode(p: &Path) -> u32 {
    fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .mode()
        & 0o7777
}

#[test]
fn copy_from_a_stage_keeps_owners_and_context_files_become_root() {
    let b = Bench::new();
    let ctx = b.context(
        "owners",
        "FROM BASE AS builder\n\
         RUN mkdir -p /myapp/somedir && echo x > /myapp/somedir/file \
          && chown 123:123 /myapp/somedir && chown 321:321 /myapp/somedir/file\n\
         FROM BASE\n\
         COPY --from=builder /myapp /myapp\n\
         COPY --from=builder --chown=5:6 /myapp /chowned\n\
         COPY ctx.txt /ctx.txt\n",
        &[("ctx.txt", "from the context\n")],
    );
    std::os::unix::fs::chown(ctx.join("ctx.txt"), Some(4242), Some(4343)).unwrap();
    let root = b.build(&ctx);
    assert_eq!(owner(&root.join("myapp/somedir")), (123, 123));
    assert_eq!(owner(&root.join("myapp/somedir/file")), (321, 321));
    assert_eq!(owner(&root.join("chowned/somedir/file")), (5, 6));
    assert_eq!(owner(&root.join("ctx.txt")), (0, 0));
}

#[test]
fn identical_and_empty_steps_and_130_layers_build_on_overlay() {
    let b = Bench::new();
    // Seven byte-identical layers in one stage.
    let seven = "FROM BASE\n".to_string() + &"COPY context/foo /foo\n".repeat(7);
    let ctx = b.context("seven", &seven, &[("context/foo", "foo\n")]);
    let root = b.build(&ctx);
    assert_eq!(fs::read_to_string(root.join("foo")).unwrap(), "foo\n");

    // A 16-step stage of user switches, copies to $HOME and steps that
    // change nothing or the same thing again.
    let sixteen = "FROM BASE\n\
         RUN echo 'alice:x:1001:1001::/home/alice:/bin/sh' >> /etc/passwd && echo 'alice:x:1001:' >> /etc/group\n\
         RUN mkdir -p /home/alice && chown alice:alice /home/alice\n\
         USER alice\n\
         ENV HOME=/home/alice\n\
         RUN echo $HOME\n\
         COPY --chown=alice:alice context/foo $HOME/foo\n\
         RUN echo $HOME\n\
         USER root\n\
         RUN echo $HOME\n\
         COPY --chown=alice:alice context/foo $HOME/foo\n\
         USER alice\n\
         RUN echo $HOME\n\
         COPY --chown=alice:alice context/foo $HOME/foo\n\
         WORKDIR /\n\
         RUN test \"$(cat $HOME/foo)\" = foo\n\
         COPY --chown=alice:alice context/foo $HOME/foo\n";
    let ctx = b.context("sixteen", sixteen, &[("context/foo", "foo\n")]);
    let root = b.build(&ctx);
    assert_eq!(owner(&root.join("home/alice/foo")), (1001, 1001));

    // 130 layers and a RUN over all of them.
    let mut many = "FROM BASE\n".to_string();
    let mut files = Vec::new();
    for i in 0..130 {
        many.push_str(&format!("COPY f{i} /layers/f{i}\n"));
        files.push((format!("f{i}"), format!("{i}\n")));
    }
    many.push_str(
        "RUN test \"$(ls /layers | wc -l)\" -eq 130 && cat /layers/f0 /layers/f129 > /ends\n",
    );
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(a, c)| (a.as_str(), c.as_str()))
        .collect();
    let ctx = b.context("many", &many, &files);
    let root = b.build(&ctx);
    assert_eq!(fs::read_to_string(root.join("ends")).unwrap(), "0\n129\n");
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout_of(&ctx).join("index.json")).unwrap()).unwrap();
    let digest = index["manifests"][0]["digest"].as_str().unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(
        &fs::read(layout_of(&ctx).join("blobs/sha256").join(&digest[7..])).unwrap(),
    )
    .unwrap();
    assert_eq!(manifest["layers"].as_array().unwrap().len(), 1 + 130 + 1);
}

#[test]
fn volume_declares_no_directory_as_in_buildkit() {
    let b = Bench::new();
    let ctx = b.context(
        "volume-missing",
        "FROM BASE\nVOLUME /foo1\nRUN echo hello > /foo1/hello\n",
        &[],
    );
    let out = b.executor(&ctx, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("Dockerfile:3: RUN echo hello"), "{stderr}");
    let ctx = b.context(
        "volume",
        "FROM BASE\nVOLUME /foo2\nRUN test ! -e /foo2\n",
        &[],
    );
    let root = b.build(&ctx);
    assert!(!root.join("foo2").exists());
}

#[test]
fn a_symlink_source_is_copied_as_its_target_under_the_name_given() {
    let b = Bench::new();
    let ctx = b.context(
        "symlink",
        "FROM BASE AS t\n\
         RUN mkdir -p /workdir /temp && echo target-content > /temp/target \
          && ln -s ../temp/target /workdir/relative_link && ln -s /temp /workdir/abs_dir_link\n\
         FROM BASE\n\
         COPY --from=t /workdir/relative_link /workdirAnother/\n\
         COPY --from=t /workdir/relative_l* /globbed/\n\
         COPY --from=t /workdir/abs_dir_link /dir-contents/\n\
         COPY link /from-context/\n",
        &[("real/file.txt", "context target\n")],
    );
    std::os::unix::fs::symlink("real/file.txt", ctx.join("link")).unwrap();
    let root = b.build(&ctx);
    for copied in ["workdirAnother/relative_link", "globbed/relative_link"] {
        let p = root.join(copied);
        assert!(fs::symlink_metadata(&p).unwrap().is_file(), "{copied}");
        assert_eq!(fs::read_to_string(&p).unwrap(), "target-content\n");
    }
    assert!(!root.join("workdirAnother/target").exists());
    assert_eq!(
        fs::read_to_string(root.join("dir-contents/target")).unwrap(),
        "target-content\n"
    );
    assert_eq!(
        fs::read_to_string(root.join("from-context/link")).unwrap(),
        "context target\n"
    );
}

#[test]
fn wildcards_matching_nothing_are_skipped_and_brackets_escape() {
    let b = Bench::new();
    let ctx = b.context(
        "wildcards",
        "FROM BASE AS s\nRUN mkdir /src && echo a > /src/a\n\
         FROM BASE\n\
         COPY context/bar/doesnotexist* context/foo hello\n\
         COPY context/arr[[]0].txt /mydir/\n\
         COPY --from=s /src/nothing* /src/a /from-stage\n",
        &[("context/foo", "foo\n"), ("context/arr[0].txt", "arr\n")],
    );
    let root = b.build(&ctx);
    assert_eq!(fs::read_to_string(root.join("hello")).unwrap(), "foo\n");
    assert_eq!(
        fs::read_to_string(root.join("mydir/arr[0].txt")).unwrap(),
        "arr\n"
    );
    assert_eq!(fs::read_to_string(root.join("from-stage")).unwrap(), "a\n");

    let ctx = b.context(
        "wildcards-none",
        "FROM BASE\nCOPY context/none* context/nothing* /x/\n",
        &[("context/foo", "foo\n")],
    );
    let out = b.executor(&ctx, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("\"context/none*\": no such file or directory"),
        "{stderr}"
    );
}

#[test]
fn workdir_under_user_belongs_to_that_user_parents_included() {
    let b = Bench::new();
    let ctx = b.context(
        "workdir-user",
        "FROM BASE\n\
         RUN echo 'alice:x:1001:1002::/home/alice:/bin/sh' >> /etc/passwd \
          && echo 'alice:x:1002:' >> /etc/group && echo 'staff:x:1003:' >> /etc/group\n\
         USER 9999\n\
         WORKDIR /workdir/w/uid\n\
         USER 9999:9998\n\
         WORKDIR /workdir/w/uid-gid\n\
         USER alice\n\
         WORKDIR /workdir/w/name\n\
         USER alice:staff\n\
         WORKDIR /workdir/w/name-group/deeper\n\
         USER root\n\
         WORKDIR /workdir/w/root\n",
        &[],
    );
    let root = b.build(&ctx);
    let w = root.join("workdir/w");
    assert_eq!(owner(&root.join("workdir")), (9999, 9999));
    assert_eq!(owner(&w), (9999, 9999));
    assert_eq!(owner(&w.join("uid")), (9999, 9999));
    assert_eq!(owner(&w.join("uid-gid")), (9999, 9998));
    assert_eq!(owner(&w.join("name")), (1001, 1002));
    assert_eq!(owner(&w.join("name-group")), (1001, 1003));
    assert_eq!(owner(&w.join("name-group/deeper")), (1001, 1003));
    assert_eq!(owner(&w.join("root")), (0, 0));
    assert_eq!(mode(&w.join("uid")), 0o755);
}

#[test]
fn a_directory_created_for_a_directory_source_is_0755() {
    let b = Bench::new();
    let ctx = b.context(
        "dirmode",
        "FROM BASE\nADD context/tars /tmp/tars\nCOPY context/tars /copied/tars\n",
        &[("context/tars/sub/file", "f\n")],
    );
    for d in ["context/tars", "context/tars/sub"] {
        fs::set_permissions(ctx.join(d), fs::Permissions::from_mode(0o775)).unwrap();
    }
    let root = b.build(&ctx);
    assert_eq!(mode(&root.join("tmp/tars")), 0o755);
    assert_eq!(mode(&root.join("copied/tars")), 0o755);
    // Directories inside the source keep their mode.
    assert_eq!(mode(&root.join("tmp/tars/sub")), 0o775);
}

#[test]
fn a_failing_run_makes_the_executor_exit_with_its_status() {
    let b = Bench::new();
    let ctx = b.context("exit42", "FROM BASE\nRUN exit 42\n", &[]);
    let out = b.executor(&ctx, &[]);
    assert_eq!(
        out.status.code(),
        Some(42),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ctx = b.context("second", "FROM BASE\nRUN true\nRUN exit 3\n", &[]);
    assert_eq!(b.executor(&ctx, &[]).status.code(), Some(3));
    // Errors of the executor's own stay 1.
    let ctx = b.context("missing", "FROM BASE\nCOPY missing /x\n", &[]);
    assert_eq!(b.executor(&ctx, &[]).status.code(), Some(1));
}

#[test]
fn an_image_on_a_docker_format_base_is_written_with_oci_media_types_only() {
    let registry = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(
        &registry,
        work.path(),
        "library/busybox:docker",
        &["--format", "v2s2"],
    )
    .unwrap();
    let base_manifest: serde_json::Value = serde_json::from_slice(
        &registry
            .skopeo_raw_manifest("library/busybox:docker")
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        base_manifest["layers"][0]["mediaType"],
        "application/vnd.docker.image.rootfs.diff.tar.gzip"
    );
    let ctx = work.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nRUN echo hi > /hi\n",
            registry.reference("library/busybox:docker")
        ),
    )
    .unwrap();
    let layout = work.path().join("layout");
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(&ctx)
        .arg("--oci-layout-path")
        .arg(&layout)
        .args([
            "--destination",
            &registry.reference("built:latest"),
            "--insecure-registry",
            &registry.host(),
        ])
        .arg("--cache-dir")
        .arg(work.path().join("state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pushed: serde_json::Value =
        serde_json::from_slice(&registry.skopeo_raw_manifest("built:latest").unwrap()).unwrap();
    assert_eq!(
        pushed["mediaType"],
        "application/vnd.oci.image.manifest.v1+json"
    );
    let layers = pushed["layers"].as_array().unwrap();
    assert_eq!(layers.len(), 2);
    for layer in layers {
        assert_eq!(
            layer["mediaType"], "application/vnd.oci.image.layer.v1.tar+gzip",
            "{pushed}"
        );
    }
    // The same bytes: the base layer keeps its digest.
    assert_eq!(layers[0]["digest"], base_manifest["layers"][0]["digest"]);
    // umoci, a strict reader, accepts the layout and the pushed image.
    run(Command::new("umoci").args(["stat", "--image", &format!("{}:latest", layout.display())]))
        .unwrap();
    let root = unpack(&layout, &work.path().join("bundle"));
    assert_eq!(fs::read_to_string(root.join("hi")).unwrap(), "hi\n");
    let pulled = work.path().join("pulled");
    run(Command::new("skopeo")
        .args(["copy", "--src-tls-verify=false"])
        .arg(format!("docker://{}", registry.reference("built:latest")))
        .arg(format!("oci:{}:latest", pulled.display())))
    .unwrap();
    let root = unpack(&pulled, &work.path().join("bundle2"));
    assert!(root.join("hi").is_file());
}
