//! Kaniko's command line against the real `kiln-executor` binary: every flag
//! of Kaniko v1.24.0's executor (from `kiln_executor::kaniko_flags`, the
//! table docs/kaniko-migration.md is generated from) in each pflag syntax,
//! and one test per flag whose Kaniko meaning kiln implements, showing its
//! effect on a real build (an offline busybox base made by umoci, images
//! read back from the OCI layout kiln writes, a real registry where a pull
//! is the point).

use std::collections::BTreeSet;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{Registry, RegistryAuth, kiln_bin, make_busybox_layout, push_busybox};
use kiln_executor::kaniko_flags::{FLAGS, Kind};

/// A context with a Dockerfile, its own state directory and an output
/// layout, in a temporary directory.
struct Fixture {
    work: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Self {
        let work = tempfile::tempdir().unwrap();
        make_busybox_layout(&work.path().join("base"), "latest").unwrap();
        Fixture { work }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.work.path().join(rel)
    }

    /// A context `name` whose Dockerfile is `dockerfile` with `BASE`
    /// replaced by the busybox layout.
    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        let dir = self.path(name);
        fs::create_dir_all(&dir).unwrap();
        let base = format!("oci-layout://{}:latest", self.path("base").display());
        fs::write(dir.join("Dockerfile"), dockerfile.replace("BASE", &base)).unwrap();
        for (rel, content) in files {
            fs::write(dir.join(rel), content).unwrap();
        }
        dir
    }
}

fn executor(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(kiln_bin("kiln-executor"));
    cmd.args(args);
    for var in [
        "KANIKO_NO_PUSH",
        "KANIKO_DIR",
        "KANIKO_REGISTRY_MAP",
        "KANIKO_REGISTRY_MIRROR",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(envs.iter().copied());
    cmd.output().expect("running kiln-executor")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn ok(args: &[&str], envs: &[(&str, &str)]) -> String {
    let out = executor(args, envs);
    let err = stderr(&out);
    assert!(
        out.status.success(),
        "kiln-executor {args:?} failed:\n{err}"
    );
    err
}

/// Builds `ctx` with its own state directory into an OCI layout; returns
/// the layout and stderr.
fn build(f: &Fixture, ctx: &Path, name: &str, extra: &[&str]) -> (PathBuf, String) {
    let layout = f.path(&format!("{name}-layout"));
    let state = f.path(&format!("{name}-state"));
    let (c, l, s) = (
        ctx.display().to_string(),
        layout.display().to_string(),
        state.display().to_string(),
    );
    let mut args = vec![
        "--context",
        &c,
        "--no-push",
        "--oci-layout-path",
        &l,
        "--cache-dir",
        &s,
    ];
    args.extend_from_slice(extra);
    let log = ok(&args, &[]);
    (layout, log)
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

fn blob(layout: &Path, digest: &str) -> PathBuf {
    layout
        .join("blobs/sha256")
        .join(digest.trim_start_matches("sha256:"))
}

/// The manifest of the only (or last) image of a layout.
fn manifest(layout: &Path) -> serde_json::Value {
    let index = read_json(&layout.join("index.json"));
    let last = index["manifests"]
        .as_array()
        .unwrap()
        .last()
        .unwrap()
        .clone();
    read_json(&blob(layout, last["digest"].as_str().unwrap()))
}

/// The paths in each layer of the layout's image, bottom first.
fn layer_paths(layout: &Path) -> Vec<BTreeSet<String>> {
    manifest(layout)["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            let file = fs::File::open(blob(layout, l["digest"].as_str().unwrap())).unwrap();
            let mut decoded = Vec::new();
            flate2::read::GzDecoder::new(file)
                .read_to_end(&mut decoded)
                .unwrap();
            let mut archive = tar::Archive::new(&decoded[..]);
            archive
                .entries()
                .unwrap()
                .map(|e| {
                    let e = e.unwrap();
                    e.path()
                        .unwrap()
                        .to_string_lossy()
                        .trim_start_matches("./")
                        .trim_end_matches('/')
                        .to_string()
                })
                .collect()
        })
        .collect()
}

/// A value each non-boolean flag accepts in a dry run of `ctx`.
fn sample_value(name: &str, ctx: &Path) -> String {
    match name {
        "context" => ctx.display().to_string(),
        "dockerfile" => ctx.join("Dockerfile").display().to_string(),
        "target" => "final".into(),
        "custom-platform" | "customPlatform" => format!("linux/{}", kiln_e2e::host_arch()),
        "snapshot-mode" | "snapshotMode" => "redo".into(),
        "compression" => "zstd".into(),
        "compression-level" | "push-retry" | "image-download-retry" | "image-fs-extract-retry" => {
            "2".into()
        }
        "cache-ttl" => "1h30m".into(),
        "log-format" => "json".into(),
        "verbosity" => "debug".into(),
        "build-arg" | "label" | "git" => "branch=main".into(),
        // A subdirectory of the context (here the context itself).
        "context-sub-path" => ".".into(),
        "registry-certificate" => "reg.example=/nonexistent/ca.pem".into(),
        "registry-client-cert" => "reg.example=/nonexistent/c.pem,/nonexistent/k.pem".into(),
        "registry-map" => "index.docker.io=mirror.example".into(),
        "destination" => "reg.example/team/app:v1".into(),
        _ => "/tmp/kiln-flag-matrix-value".into(),
    }
}

#[test]
fn every_kaniko_flag_is_accepted_in_each_pflag_syntax() {
    let f = Fixture::new();
    let ctx = f.context("matrix", "FROM scratch AS final\nENV A=1\n", &[]);
    let c = ctx.display().to_string();
    let mut failures = Vec::new();
    for flag in FLAGS {
        let long = format!("--{}", flag.name);
        let forms: Vec<Vec<String>> = match flag.kind {
            Kind::Bool => vec![
                vec![long.clone()],
                vec![format!("{long}=true")],
                vec![format!("{long}=false")],
            ],
            Kind::Value | Kind::Repeated => {
                let v = sample_value(flag.name, &ctx);
                let mut forms = vec![vec![format!("{long}={v}")], vec![long.clone(), v.clone()]];
                if let Some(s) = flag.short {
                    forms.push(vec![format!("-{s}"), v.clone()]);
                    forms.push(vec![format!("-{s}={v}")]);
                }
                if flag.kind == Kind::Repeated {
                    forms.push(vec![long.clone(), v.clone(), format!("{long}={v}")]);
                }
                forms
            }
        };
        for form in forms {
            let mut args = vec!["--dry-run", "--context", &c];
            args.extend(form.iter().map(String::as_str));
            let out = executor(&args, &[]);
            if !out.status.success() {
                failures.push(format!("{form:?}: {}", stderr(&out)));
            }
        }
    }
    assert!(failures.is_empty(), "rejected:\n{}", failures.join("\n"));
    // And pflag's refusals stay refusals.
    let out = executor(&["--dry-run", "--context", &c, "--cache-ttl"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = executor(&["--dry-run", "--context", &c, "--no-push=maybe"], &[]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
}

#[test]
fn every_kaniko_flag_is_in_the_real_binarys_help() {
    let out = executor(&["--help"], &[]);
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in FLAGS {
        assert!(
            help.contains(&format!("--{}", flag.name)),
            "--{} missing from --help",
            flag.name
        );
    }
}

#[test]
fn machinery_flags_print_one_warning_each_only_when_kiln_does_otherwise() {
    let f = Fixture::new();
    let ctx = f.context("warn", "FROM scratch\nENV A=1\n", &[]);
    let c = ctx.display().to_string();
    let log = ok(
        &[
            "--dry-run",
            "--context",
            &c,
            "--snapshot-mode=redo",
            "--use-new-run",
            "--cache-run-layers=false",
            "--skip-unused-stages=false",
        ],
        &[],
    );
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("has no effect"))
        .collect();
    assert_eq!(warnings.len(), 4, "{log}");
    assert!(warnings[0].contains("--snapshot-mode=redo"), "{log}");
    let quiet = ok(
        &[
            "--dry-run",
            "--context",
            &c,
            "--snapshotMode",
            "full",
            "--skip-unused-stages",
            "--cache-copy-layers=true",
        ],
        &[],
    );
    assert!(!quiet.contains("warning"), "{quiet}");
}

#[test]
fn a_repeated_single_value_flag_keeps_the_last_value() {
    let f = Fixture::new();
    let ctx = f.context("last", "FROM BASE\nRUN echo x > /x\n", &[]);
    let (first, last) = (f.path("first.digest"), f.path("last.digest"));
    let (a, b) = (first.display().to_string(), last.display().to_string());
    let (layout, _) = build(
        &f,
        &ctx,
        "last",
        &[
            "--digest-file",
            &a,
            "--digest-file",
            &b,
            "--compression=zstd",
            "--compression",
            "gzip",
        ],
    );
    assert!(!first.exists(), "the first --digest-file was used");
    let digest = fs::read_to_string(&last).unwrap();
    let index = read_json(&layout.join("index.json"));
    assert_eq!(index["manifests"][0]["digest"], digest.as_str());
    // gzip, the last --compression, is what layer_paths can read.
    assert_eq!(layer_paths(&layout).len(), 2);
}

#[test]
fn digest_files_name_each_destination_with_and_without_its_tag() {
    let f = Fixture::new();
    let ctx = f.context("names", "FROM BASE\nRUN echo x > /x\n", &[]);
    let files = ["digest", "name", "name-tag"].map(|n| f.path(n).display().to_string());
    build(
        &f,
        &ctx,
        "names",
        &[
            "--destination",
            "reg.example:5000/team/app:v1",
            "-d",
            "reg.example:5000/team/app",
            "--digest-file",
            &files[0],
            "--image-name-with-digest-file",
            &files[1],
            "--image-name-tag-with-digest-file",
            &files[2],
        ],
    );
    let digest = fs::read_to_string(&files[0]).unwrap();
    assert!(digest.starts_with("sha256:"), "{digest}");
    assert_eq!(
        fs::read_to_string(&files[1]).unwrap(),
        format!("reg.example:5000/team/app@{digest}\nreg.example:5000/team/app@{digest}\n")
    );
    assert_eq!(
        fs::read_to_string(&files[2]).unwrap(),
        format!(
            "reg.example:5000/team/app:v1@{digest}\nreg.example:5000/team/app:latest@{digest}\n"
        )
    );
}

#[test]
fn single_snapshot_makes_one_layer_per_stage_and_caches_it_whole() {
    let f = Fixture::new();
    let dockerfile =
        "FROM BASE\nRUN echo a > /a\nCOPY f /f\nWORKDIR /w\nRUN rm /a && echo b > /b\nENV X=1\n";
    let ctx = f.context("single", dockerfile, &[("f", "file")]);
    let (per_step, _) = build(&f, &ctx, "per-step", &[]);
    assert_eq!(layer_paths(&per_step).len(), 1 + 4);

    let (single, log) = build(&f, &ctx, "single", &["--single-snapshot"]);
    let layers = layer_paths(&single);
    assert_eq!(layers.len(), 1 + 1, "{log}");
    let top = &layers[1];
    for path in ["f", "b", "w"] {
        assert!(top.contains(path), "{path} not in {top:?}");
    }
    // /a was made and removed within the one snapshot: neither it nor a
    // whiteout for it is in the layer.
    assert!(
        !top.iter().any(|p| p == "a" || p.ends_with(".wh.a")),
        "{top:?}"
    );
    let config = read_json(&blob(
        &single,
        manifest(&single)["config"]["digest"].as_str().unwrap(),
    ));
    assert_eq!(config["rootfs"]["diff_ids"].as_array().unwrap().len(), 2);
    assert_eq!(config["config"]["WorkingDir"], "/w");

    // Again with the same state: the stage's layer is one cache hit, and no
    // step runs.
    let state = f.path("single-state").display().to_string();
    let (again, log) = build(
        &f,
        &ctx,
        "single",
        &["--single-snapshot=true", "--cache-dir", &state],
    );
    assert!(log.contains("cache hit"), "{log}");
    assert!(!log.contains("cache miss"), "{log}");
    assert_eq!(manifest(&again)["layers"], manifest(&single)["layers"]);
}

#[test]
fn var_run_stays_out_of_layers_unless_ignore_var_run_is_false() {
    let f = Fixture::new();
    let dockerfile = "FROM BASE\nRUN mkdir -p /var/run/x && echo s > /var/run/x/secret && echo k > /keep && mkdir -p /opt/skip && echo y > /opt/skip/y\n";
    let ctx = f.context("varrun", dockerfile, &[]);
    for (name, extra, kept) in [
        ("default", &[][..], false),
        ("ignored", &["--ignore-var-run=true"][..], false),
        ("kept", &["--ignore-var-run=false"][..], true),
        ("whitelist", &["--whitelist-var-run=false"][..], true),
    ] {
        let mut args = vec!["--ignore-path", "/opt/skip"];
        args.extend_from_slice(extra);
        let (layout, _) = build(&f, &ctx, name, &args);
        let top = layer_paths(&layout).pop().unwrap();
        assert!(top.contains("keep"), "{name}: {top:?}");
        assert!(
            !top.iter().any(|p| p.starts_with("opt/skip")),
            "{name}: {top:?}"
        );
        assert_eq!(
            top.iter().any(|p| p.starts_with("var/run")),
            kept,
            "{name}: {top:?}"
        );
        assert_eq!(top.contains("var/run/x/secret"), kept, "{name}: {top:?}");
    }
}

#[test]
fn cache_ttl_takes_go_durations_and_names_a_bad_one() {
    let f = Fixture::new();
    let ctx = f.context("ttl", "FROM BASE\nRUN echo x > /x\n", &[]);
    for good in ["336h0m0s", "1h30m", "1.5h", "90s", "500ms"] {
        build(&f, &ctx, "ttl", &["--cache-ttl", good]);
    }
    let c = ctx.display().to_string();
    let state = f.path("ttl-bad-state");
    let out = executor(
        &[
            "--context",
            &c,
            "--no-push",
            "--cache-dir",
            &state.display().to_string(),
            "--cache-ttl=2weeks",
        ],
        &[],
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("--cache-ttl \"2weeks\"") && err.contains("1h30m"),
        "{err}"
    );
    assert!(
        !state.exists(),
        "a bad --cache-ttl changed nothing, yet {state:?} exists"
    );
}

#[test]
fn force_build_metadata_gives_every_instruction_a_layer() {
    let f = Fixture::new();
    let ctx = f.context("meta", "FROM BASE\nENV A=1\nRUN true\nLABEL l=v\n", &[]);
    let (plain, _) = build(&f, &ctx, "meta-plain", &[]);
    assert_eq!(layer_paths(&plain).len(), 1);
    let (forced, _) = build(&f, &ctx, "meta-forced", &["--force-build-metadata"]);
    let layers = layer_paths(&forced);
    assert_eq!(layers.len(), 1 + 3);
    assert!(layers[1..].iter().all(BTreeSet::is_empty), "{layers:?}");
}

#[test]
fn kaniko_dir_and_its_variable_are_the_state_directory() {
    let f = Fixture::new();
    let ctx = f.context("kdir", "FROM BASE\nRUN echo x > /x\n", &[]);
    let c = ctx.display().to_string();
    let by_env = f.path("by-env");
    let by_flag = f.path("by-flag");
    let layout = f.path("kdir-layout").display().to_string();
    let args = ["--context", &c, "--no-push", "--oci-layout-path", &layout];
    ok(&args, &[("KANIKO_DIR", by_env.to_str().unwrap())]);
    assert!(by_env.join("store").is_dir() && by_env.join("layers").is_dir());
    let flag = format!("--kaniko-dir={}", by_flag.display());
    let mut with_flag = args.to_vec();
    with_flag.push(&flag);
    let other = f.path("by-env-unused");
    ok(&with_flag, &[("KANIKO_DIR", other.to_str().unwrap())]);
    assert!(by_flag.join("store").is_dir());
    assert!(!other.exists(), "--kaniko-dir wins over KANIKO_DIR");
}

#[test]
fn kaniko_no_push_in_the_environment_skips_the_push() {
    let f = Fixture::new();
    let ctx = f.context("nopush", "FROM BASE\nRUN echo x > /x\n", &[]);
    let c = ctx.display().to_string();
    let state = f.path("nopush-state").display().to_string();
    // Nothing listens on port 1: a push would fail.
    let args = [
        "--context",
        &c,
        "--cache-dir",
        &state,
        "--destination",
        "127.0.0.1:1/app:v1",
    ];
    ok(&args, &[("KANIKO_NO_PUSH", "1")]);
    ok(&args, &[("KANIKO_NO_PUSH", "true")]);
    let out = executor(&args, &[("KANIKO_NO_PUSH", "false")]);
    assert!(
        !out.status.success(),
        "pushed to nothing?\n{}",
        stderr(&out)
    );
}

#[test]
fn cleanup_removes_the_unpacked_layers_at_the_end() {
    let f = Fixture::new();
    let ctx = f.context("cleanup", "FROM BASE\nRUN echo x > /x\n", &[]);
    let layers_in = |name: &str| {
        fs::read_dir(f.path(&format!("{name}-state/layers")))
            .map(|d| d.count())
            .unwrap_or(0)
    };
    build(&f, &ctx, "kept", &[]);
    assert!(layers_in("kept") > 0);
    let (layout, _) = build(&f, &ctx, "cleaned", &["--cleanup"]);
    assert_eq!(layers_in("cleaned"), 0);
    assert!(f.path("cleaned-state/store").is_dir(), "the store stays");
    assert_eq!(layer_paths(&layout).len(), 2);
}

#[test]
fn image_fs_extract_retry_fetches_a_damaged_base_layer_again() {
    let registry = Registry::start(RegistryAuth::None).unwrap();
    let f = Fixture::new();
    push_busybox(&registry, f.work.path(), "library/busybox:latest", &[]).unwrap();
    let base = registry.reference("library/busybox:latest");
    let ctx = f.path("retry");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!("FROM {base}\nRUN echo x > /x\n"),
    )
    .unwrap();
    let c = ctx.display().to_string();
    let state = f.path("retry-state");
    let s = state.display().to_string();
    let host = registry.host();
    // Extraction is what the flag retries: no layer images, which would
    // let the build mount the layer converted by the first build.
    let args = [
        "--context",
        &c,
        "--no-push",
        "--cache=false",
        "--cache-dir",
        &s,
        "--insecure-registry",
        &host,
        "--mountable-layers=false",
    ];
    ok(&args, &[]);
    // Damage the pulled base layer and forget its unpacked form.
    let layer = manifest_layer_of(&registry, "library/busybox:latest");
    let stored = find_file(&state.join("store"), layer.trim_start_matches("sha256:"))
        .expect("the base layer in the local store");
    let damage = || {
        fs::write(&stored, b"not a gzip stream").unwrap();
        fs::remove_dir_all(state.join("layers")).unwrap();
    };
    damage();
    let out = executor(&args, &[]);
    assert!(!out.status.success(), "built from a damaged layer?");
    assert!(stderr(&out).contains(&layer), "{}", stderr(&out));

    damage();
    let mut retry = args.to_vec();
    retry.push("--image-fs-extract-retry=1");
    let log = ok(&retry, &[]);
    assert!(log.contains("fetching it again (retry 1 of 1)"), "{log}");
}

fn manifest_layer_of(registry: &Registry, repo_tag: &str) -> String {
    let raw = registry.skopeo_raw_manifest(repo_tag).unwrap();
    let manifest: serde_json::Value = serde_json::from_slice(&raw).unwrap();
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn find_file(dir: &Path, name_contains: &str) -> Option<PathBuf> {
    for entry in fs::read_dir(dir).ok()? {
        let path = entry.ok()?.path();
        if path.is_dir() {
            if let Some(found) = find_file(&path, name_contains) {
                return Some(found);
            }
        } else if path.to_string_lossy().contains(name_contains) {
            return Some(path);
        }
    }
    None
}
