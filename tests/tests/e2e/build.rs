//! Building images with the real `kiln-executor` binary, checked with real
//! tools: a Distribution registry, skopeo, umoci and buildah (which runs the
//! images kiln built). Also the hostile cases: nothing a Dockerfile, a
//! context or a base image does may change the host outside the rootfs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{
    Registry, RegistryAuth, append_layer_to_layout, kiln_bin, make_busybox_layout, push_busybox,
    run,
};

/// Runs kiln-executor; returns the output whatever the exit status.
fn executor(args: &[&str], state: &Path) -> Output {
    Command::new(kiln_bin("kiln-executor"))
        .args(args)
        .arg("--cache-dir")
        .arg(state)
        .output()
        .expect("running kiln-executor")
}

fn executor_ok(args: &[&str], state: &Path) -> String {
    let out = executor(args, state);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "kiln-executor {args:?} failed:\n{stderr}"
    );
    stderr
}

fn write(dir: &Path, rel: &str, content: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, content).unwrap();
}

/// Runs `script` in an image with buildah (vfs storage, chroot isolation);
/// returns stdout.
fn buildah_run(image: &str, script: &str) -> String {
    let root = tempfile::tempdir().unwrap();
    let storage = [
        "--root".to_string(),
        root.path().join("root").display().to_string(),
        "--runroot".to_string(),
        root.path().join("runroot").display().to_string(),
        "--storage-driver".to_string(),
        "vfs".to_string(),
    ];
    let container = run(Command::new("buildah").args(&storage).args([
        "from",
        "--tls-verify=false",
        "--pull-always",
        image,
    ]))
    .expect("buildah from")
    .trim()
    .to_string();
    let out = run(Command::new("buildah").args(&storage).args([
        "run",
        "--isolation",
        "chroot",
        &container,
        "--",
        "/bin/sh",
        "-c",
        script,
    ]));
    let _ = run(Command::new("buildah")
        .args(&storage)
        .args(["rm", &container]));
    let _ = run(Command::new("buildah")
        .args(&storage)
        .args(["rmi", "--all", "--force"]));
    out.expect("buildah run")
}

struct Fixture {
    registry: Registry,
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let registry = Registry::start(RegistryAuth::None).unwrap();
        let work = tempfile::tempdir().unwrap();
        push_busybox(&registry, work.path(), "library/busybox:latest", &[]).unwrap();
        Fixture { registry, work }
    }

    fn base(&self) -> String {
        self.registry.reference("library/busybox:latest")
    }

    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        write(
            &dir,
            "Dockerfile",
            &dockerfile.replace("BASE", &self.base()),
        );
        for (rel, content) in files {
            write(&dir, rel, content);
        }
        dir
    }

    fn state(&self, name: &str) -> PathBuf {
        self.work.path().join(format!("state-{name}"))
    }

    fn build(&self, ctx: &Path, state: &Path, dest: &str, extra: &[&str]) -> String {
        let dest = self.registry.reference(dest);
        let ctx = ctx.display().to_string();
        let host = self.registry.host();
        let mut args = vec![
            "--context",
            &ctx,
            "--destination",
            &dest,
            "--insecure-registry",
            &host,
        ];
        args.extend_from_slice(extra);
        executor_ok(&args, state)
    }
}

#[test]
fn metadata_only_build_pushes_an_image_skopeo_reads_with_the_same_digest() {
    let f = Fixture::new();
    let ctx = f.context(
        "meta",
        "FROM BASE\nENV A=1 B=\"two words\"\nLABEL org.example.x=y\nUSER nobody\nEXPOSE 8080/tcp 53/udp\n\
         WORKDIR /srv\nENTRYPOINT [\"/bin/sh\", \"-c\"]\nCMD [\"echo hi\"]\nSTOPSIGNAL SIGTERM\nVOLUME /data\n",
        &[],
    );
    let digest_file = f.work.path().join("digest");
    let df = digest_file.display().to_string();
    f.build(&ctx, &f.state("meta"), "meta:v1", &["--digest-file", &df]);
    let inspect = f.registry.skopeo_inspect("meta:v1").unwrap();
    assert_eq!(inspect["Labels"]["org.example.x"], "y");
    let env: Vec<String> = serde_json::from_value(inspect["Env"].clone()).unwrap();
    assert!(
        env.contains(&"A=1".to_string()) && env.contains(&"B=two words".to_string()),
        "{env:?}"
    );
    let config: serde_json::Value = serde_json::from_str(
        &run(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{}", f.registry.reference("meta:v1")),
        ]))
        .unwrap(),
    )
    .unwrap();
    let c = &config["config"];
    assert_eq!(c["User"], "nobody");
    assert_eq!(c["WorkingDir"], "/srv");
    assert_eq!(c["Entrypoint"], serde_json::json!(["/bin/sh", "-c"]));
    assert_eq!(c["Cmd"], serde_json::json!(["echo hi"]));
    assert!(
        c["ExposedPorts"].get("8080/tcp").is_some() && c["ExposedPorts"].get("53/udp").is_some()
    );
    assert!(c["Volumes"].get("/data").is_some());
    let raw = f.registry.skopeo_raw_manifest("meta:v1").unwrap();
    let pulled = kiln_common::Digest::of_bytes(&raw).to_string();
    assert_eq!(fs::read_to_string(&digest_file).unwrap().trim(), pulled);
}

#[test]
fn run_and_copy_produce_files_owners_and_modes_that_buildah_sees() {
    let f = Fixture::new();
    let ctx = f.context(
        "runcopy",
        "FROM BASE\n\
         RUN echo 'app:x:1000:1000::/home/app:/bin/sh' >> /etc/passwd && echo 'app:x:1000:' >> /etc/group\n\
         COPY --chown=app:app --chmod=0640 conf/app.conf /etc/app/\n\
         COPY src/ /opt/src/\n\
         WORKDIR /opt\n\
         RUN mkdir -p out && cat src/a.txt src/sub/b.txt > out/joined && chmod 4755 out/joined\n\
         RUN rm /opt/src/a.txt\n\
         USER app\n\
         RUN id -u > /tmp/whoami\n",
        &[
            ("conf/app.conf", "port=1\n"),
            ("src/a.txt", "A\n"),
            ("src/sub/b.txt", "B\n"),
        ],
    );
    f.build(&ctx, &f.state("runcopy"), "runcopy:v1", &[]);
    let out = buildah_run(
        &f.registry.reference("runcopy:v1"),
        "stat -c '%u:%g %a' /etc/app/app.conf; cat /opt/out/joined; stat -c '%a' /opt/out/joined; \
         test -e /opt/src/a.txt && echo still-there || echo deleted; cat /tmp/whoami",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(
        lines,
        ["1000:1000 640", "A", "B", "4755", "deleted", "1000"],
        "{out}"
    );
}

#[test]
fn oci_layout_and_tarball_outputs_are_read_by_skopeo_and_umoci() {
    let f = Fixture::new();
    let ctx = f.context("outputs", "FROM BASE\nRUN echo layered > /layered\n", &[]);
    let layout = f.work.path().join("layout");
    let tarball = f.work.path().join("image.tar");
    let (l, t) = (layout.display().to_string(), tarball.display().to_string());
    f.build(
        &ctx,
        &f.state("outputs"),
        "outputs:v1",
        &["--no-push", "--oci-layout-path", &l, "--tar-path", &t],
    );
    run(Command::new("skopeo").args(["inspect", &format!("oci:{l}:v1")])).unwrap();
    run(Command::new("skopeo").args(["inspect", &format!("docker-archive:{t}")])).unwrap();
    let bundle = f.work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{l}:v1")])
        .arg(&bundle))
    .unwrap();
    assert_eq!(
        fs::read_to_string(bundle.join("rootfs/layered")).unwrap(),
        "layered\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
}

#[test]
fn reproducible_builds_in_different_directories_have_the_same_digest() {
    let f = Fixture::new();
    let dockerfile = "FROM BASE\nCOPY . /app\nRUN ls -l /app > /listing\n";
    let files = [("a.txt", "a"), ("dir/b.txt", "b")];
    let one = f.context("repro-one", dockerfile, &files);
    let two = f.context("somewhere/else/repro-two", dockerfile, &files);
    let digest = |ctx: &Path, name: &str| {
        let file = f.work.path().join(format!("{name}.digest"));
        let file_arg = file.display().to_string();
        f.build(
            ctx,
            &f.state(name),
            &format!("{name}:v1"),
            &[
                "--reproducible",
                "--digest-file",
                &file_arg,
                "--cache=false",
            ],
        );
        fs::read_to_string(file).unwrap()
    };
    assert_eq!(digest(&one, "r1"), digest(&two, "r2"));
}

#[test]
fn multi_stage_builds_only_needed_stages_and_copies_between_them() {
    let f = Fixture::new();
    let ctx = f.context(
        "multi",
        "FROM BASE AS builder\nRUN echo built > /artifact\n\
         FROM BASE AS unused\nRUN exit 1\n\
         FROM BASE\nCOPY --from=builder /artifact /usr/share/artifact\n",
        &[],
    );
    f.build(&ctx, &f.state("multi"), "multi:v1", &[]);
    let out = buildah_run(&f.registry.reference("multi:v1"), "cat /usr/share/artifact");
    assert_eq!(out.trim(), "built");
}

#[test]
fn a_failing_run_names_its_line_and_exit_code() {
    let f = Fixture::new();
    let ctx = f.context(
        "fail",
        "FROM BASE\nRUN echo before\nRUN echo oops >&2; exit 7\n",
        &[],
    );
    let c = ctx.display().to_string();
    let out = executor(
        &[
            "--context",
            &c,
            "--no-push",
            "--insecure-registry",
            &f.registry.host(),
        ],
        &f.state("fail"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Dockerfile:3"), "{stderr}");
    assert!(stderr.contains('7'), "{stderr}");
    assert!(stderr.contains("oops"), "{stderr}");
}

#[test]
fn a_context_symlink_pointing_outside_is_refused() {
    let f = Fixture::new();
    let outside = f.work.path().join("outside-secret");
    fs::write(&outside, "secret").unwrap();
    let ctx = f.context("escape-ctx", "FROM BASE\nCOPY link /stolen\n", &[]);
    std::os::unix::fs::symlink(&outside, ctx.join("link")).unwrap();
    let c = ctx.display().to_string();
    let out = executor(
        &[
            "--context",
            &c,
            "--no-push",
            "--insecure-registry",
            &f.registry.host(),
        ],
        &f.state("escape"),
    );
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("outside the build context"), "{stderr}");
}

#[test]
fn steps_cannot_write_outside_the_rootfs() {
    let f = Fixture::new();
    let marker_dir = tempfile::tempdir().unwrap();
    let marker = marker_dir.path().join("escaped");
    let m = marker.display().to_string();
    // The base image points a symlink at the host path of the marker; a
    // COPY through it and a RUN writing to it and to `..` must stay inside.
    let ctx = f.context(
        "escape-run",
        &format!(
            "FROM BASE\nRUN ln -s {dir} /evil && ln -s ../../../../../../{dir} /evil2\n\
             COPY payload /evil/\nCOPY payload /evil2/escaped\n\
             RUN echo run > /../../../../{m} ; echo run > /evil/escaped2 ; true\n",
            dir = marker_dir.path().display()
        ),
        &[("payload", "p")],
    );
    f.build(&ctx, &f.state("escape-run"), "escape:v1", &["--no-push"]);
    assert!(!marker.exists(), "a step wrote {m} on the host");
    assert!(
        fs::read_dir(marker_dir.path()).unwrap().next().is_none(),
        "host directory changed"
    );
}

#[test]
fn an_oci_layout_made_by_umoci_is_a_valid_base() {
    let f = Fixture::new();
    let layout = f.work.path().join("umoci-layout");
    make_busybox_layout(&layout, "base").unwrap();
    let ctx = f.work.path().join("from-layout");
    fs::create_dir_all(&ctx).unwrap();
    write(
        &ctx,
        "Dockerfile",
        &format!(
            "FROM oci-layout://{}:base\nRUN echo ok > /ok\n",
            layout.display()
        ),
    );
    f.build(&ctx, &f.state("layout"), "fromlayout:v1", &[]);
    let out = buildah_run(&f.registry.reference("fromlayout:v1"), "cat /ok");
    assert_eq!(out.trim(), "ok");
}

#[test]
fn a_docker_archive_made_by_skopeo_is_a_valid_base() {
    let f = Fixture::new();
    let archive = f.work.path().join("busybox.tar");
    run(Command::new("skopeo").args([
        "copy",
        "--src-tls-verify=false",
        &format!("docker://{}", f.base()),
        &format!("docker-archive:{}:kiln.test/busybox:1", archive.display()),
    ]))
    .unwrap();
    let ctx = f.work.path().join("from-archive");
    fs::create_dir_all(&ctx).unwrap();
    write(
        &ctx,
        "Dockerfile",
        &format!(
            "FROM docker-archive://{}:kiln.test/busybox:1\nRUN echo ok > /ok\n",
            archive.display()
        ),
    );
    f.build(&ctx, &f.state("archive"), "fromarchive:v1", &[]);
    let out = buildah_run(&f.registry.reference("fromarchive:v1"), "cat /ok");
    assert_eq!(out.trim(), "ok");
}

#[test]
fn onbuild_triggers_of_the_base_run_in_the_child_and_are_not_inherited() {
    let f = Fixture::new();
    let parent = f.context(
        "onbuild-parent",
        "FROM BASE\nENV FLAVOUR=vanilla\nONBUILD RUN echo \"triggered $FLAVOUR\" > /triggered\nONBUILD COPY marker.txt /marker.txt\n",
        &[],
    );
    f.build(&parent, &f.state("onbuild-parent"), "onbuild-base:v1", &[]);
    let child = f.work.path().join("onbuild-child");
    fs::create_dir_all(&child).unwrap();
    write(
        &child,
        "Dockerfile",
        &format!(
            "FROM {}\nRUN cat /triggered /marker.txt > /both\n",
            f.registry.reference("onbuild-base:v1")
        ),
    );
    write(&child, "marker.txt", "child context\n");
    f.build(&child, &f.state("onbuild-child"), "onbuild-child:v1", &[]);
    let out = buildah_run(&f.registry.reference("onbuild-child:v1"), "cat /both");
    assert_eq!(out, "triggered vanilla\nchild context\n");
    let config: serde_json::Value = serde_json::from_str(
        &run(Command::new("skopeo").args([
            "inspect",
            "--config",
            "--tls-verify=false",
            &format!("docker://{}", f.registry.reference("onbuild-child:v1")),
        ]))
        .unwrap(),
    )
    .unwrap();
    assert!(config["config"].get("OnBuild").is_none(), "{config}");
}

/// A tar made by GNU tar with `--sparse` (`format`: `gnu` for `S` entries,
/// `posix` for PAX 1.0) of one file: `size` bytes, all hole but "end" at
/// the end.
fn gnu_tar_sparse(dir: &Path, name: &str, size: u64, format: &str) -> Vec<u8> {
    let src = dir.join(format!("src-{format}"));
    fs::create_dir_all(&src).unwrap();
    let file = fs::File::create(src.join(name)).unwrap();
    file.set_len(size - 3).unwrap();
    drop(file);
    let mut f = fs::OpenOptions::new()
        .append(true)
        .open(src.join(name))
        .unwrap();
    std::io::Write::write_all(&mut f, b"end").unwrap();
    let tar = dir.join(format!("{format}.tar"));
    let mut cmd = Command::new("tar");
    cmd.arg(format!("--format={format}")).arg("--sparse");
    if format == "posix" {
        cmd.arg("--sparse-version=1.0");
    }
    run(cmd.arg("-cf").arg(&tar).arg("-C").arg(&src).arg(name)).unwrap();
    fs::read(tar).unwrap()
}

#[test]
fn sparse_files_in_a_base_layer_stay_sparse_and_layers_are_bounded() {
    let f = Fixture::new();
    let layout = f.work.path().join("sparse-layout");
    make_busybox_layout(&layout, "base").unwrap();
    const SIZE: u64 = 64 << 30;
    let gnu = gnu_tar_sparse(f.work.path(), "gnu-sparse", SIZE, "gnu");
    let pax = gnu_tar_sparse(f.work.path(), "pax-sparse", SIZE, "posix");
    assert!(gnu.len() < 64 << 10 && pax.len() < 64 << 10);
    append_layer_to_layout(&layout, "base", &gnu).unwrap();
    append_layer_to_layout(&layout, "base", &pax).unwrap();
    let ctx = f.work.path().join("sparse-ctx");
    fs::create_dir_all(&ctx).unwrap();
    write(
        &ctx,
        "Dockerfile",
        &format!(
            "FROM oci-layout://{}:base\nRUN ls -ls /gnu-sparse /pax-sparse > /listing\n",
            layout.display()
        ),
    );
    let ctx_arg = ctx.display().to_string();
    // By default a layer may not expand to 64 GiB: a clear error, no disk.
    let state = f.state("sparse-default");
    let out = executor(&["--context", &ctx_arg, "--no-push"], &state);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("--max-layer-size"), "{stderr}");
    assert!(stderr.contains("gnu-sparse"), "{stderr}");
    // Allowed, the files are unpacked with their holes as holes.
    let state = f.state("sparse-allowed");
    executor_ok(
        &[
            "--context",
            &ctx_arg,
            "--no-push",
            "--max-layer-size=100GiB",
        ],
        &state,
    );
    use std::os::unix::fs::MetadataExt;
    let mut seen = 0;
    for layer in fs::read_dir(state.join("layers")).unwrap().flatten() {
        for name in ["gnu-sparse", "pax-sparse"] {
            let Ok(m) = fs::symlink_metadata(layer.path().join(name)) else {
                continue;
            };
            seen += 1;
            assert_eq!(m.len(), SIZE, "{name}");
            assert!(m.blocks() < 1024, "{name}: {} blocks allocated", m.blocks());
            use std::io::{Read, Seek, SeekFrom};
            let mut file = fs::File::open(layer.path().join(name)).unwrap();
            let mut end = [0u8; 3];
            file.seek(SeekFrom::End(-3)).unwrap();
            file.read_exact(&mut end).unwrap();
            assert_eq!(&end, b"end", "{name}");
            let mut hole = [1u8; 16];
            file.seek(SeekFrom::Start(SIZE / 2)).unwrap();
            file.read_exact(&mut hole).unwrap();
            assert_eq!(hole, [0; 16], "{name}");
        }
    }
    assert_eq!(seen, 2, "both sparse files were unpacked");
}

#[test]
fn a_billion_laughs_dockerfile_is_an_error_naming_its_line() {
    let f = Fixture::new();
    let mut dockerfile = String::from("FROM BASE\nARG a=xxxxxxxxxx\n");
    let names: Vec<char> = ('a'..='j').collect();
    for pair in names.windows(2) {
        dockerfile.push_str(&format!(
            "ARG {}={}\n",
            pair[1],
            format!("${}", pair[0]).repeat(10)
        ));
    }
    dockerfile.push_str("ENV J=$j\nRUN echo ${#J}\n");
    let ctx = f.context("laughs", &dockerfile, &[]);
    let out = executor(
        &["--context", &ctx.display().to_string(), "--no-push"],
        &f.state("laughs"),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "no abort: {stderr}");
    assert!(stderr.contains("Dockerfile:8:"), "{stderr}");
    assert!(stderr.contains("larger than 1048576 bytes"), "{stderr}");
    assert_eq!(
        stderr.matches("larger than").count(),
        1,
        "said once: {stderr}"
    );
}
