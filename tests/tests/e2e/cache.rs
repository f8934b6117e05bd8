//! The shared cache end to end: real `kiln-executor` processes with separate
//! local state against one real `kiln-cache-server`, checked through the
//! build reports, the server's metrics and the registry.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::world::{BuildWorld, executor_build};
use kiln_e2e::{CacheServer, RegistryAuth, kiln_bin};

/// The shared setup ([`BuildWorld`]: a registry with busybox, a work
/// directory) plus one cache server.
struct Env {
    world: BuildWorld,
    server: CacheServer,
}

impl Env {
    fn new() -> Self {
        let world = BuildWorld::start(RegistryAuth::None).unwrap();
        let server = CacheServer::start().unwrap();
        Env { world, server }
    }

    fn context(&self, name: &str, dockerfile: &str, files: &[(&str, &str)]) -> PathBuf {
        self.world.context(name, dockerfile, files)
    }

    /// Runs one build with fresh or given state; returns the process output
    /// and the parsed report.
    fn build(
        &self,
        ctx: &Path,
        state: &Path,
        dest: &str,
        extra: &[&str],
    ) -> (Output, serde_json::Value) {
        let dest = self.world.registry.reference(dest);
        let url = self.server.url();
        let mut args = vec!["--destination", &dest, "--cache-server", &url];
        args.extend_from_slice(extra);
        executor_build(&self.world.registry, ctx, state, &args, |_| {})
    }

    fn build_ok(&self, ctx: &Path, state: &Path, dest: &str, extra: &[&str]) -> serde_json::Value {
        let (out, report) = self.build(ctx, state, dest, extra);
        assert!(
            out.status.success(),
            "build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        report
    }

    fn fresh_state(&self, name: &str) -> PathBuf {
        self.world.state(name)
    }
}

impl std::ops::Deref for Env {
    type Target = BuildWorld;

    fn deref(&self) -> &BuildWorld {
        &self.world
    }
}

/// Every regular file below `dir` (none if it does not exist).
fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Keys of the filesystem steps by Dockerfile line.
fn keys(report: &serde_json::Value) -> BTreeMap<u64, String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|s| Some((s["line"].as_u64()?, s["key"].as_str()?.to_string())))
        .collect()
}

#[test]
fn a_fresh_executor_rebuilds_everything_from_the_server_without_downloading_layers() {
    let env = Env::new();
    let ctx = env.context(
        "share",
        "FROM BASE\nCOPY app /app\nRUN cat /app/main.txt > /app/built\nRUN echo more > /more\n",
        &[("app/main.txt", "hello\n")],
    );
    let first = env.build_ok(&ctx, &env.fresh_state("one"), "share:v1", &[]);
    assert_eq!(first["summary"]["misses"], 3);
    let gets_before = env.server.metric(
        r#"kiln_cache_http_requests_total{route="/v1/blobs/{digest}",method="GET",status="200"}"#,
    );
    let second_state = env.fresh_state("two");
    let second = env.build_ok(&ctx, &second_state, "share:v1", &[]);
    // Nothing was pulled either: the base layer stays in the registry.
    let stored_blobs = walk_files(&second_state.join("store/blobs"));
    assert!(
        stored_blobs.is_empty(),
        "the fresh executor stored blobs: {stored_blobs:?}"
    );
    assert_eq!(second["summary"]["hits"], 3, "{second}");
    assert_eq!(second["summary"]["misses"], 0);
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);
    assert_eq!(second["summary"]["bytes_downloaded"], 0);
    let gets_after = env.server.metric(
        r#"kiln_cache_http_requests_total{route="/v1/blobs/{digest}",method="GET",status="200"}"#,
    );
    assert_eq!(
        gets_before, gets_after,
        "the second executor downloaded blobs"
    );
}

#[test]
fn exactly_the_expected_keys_change_under_each_mutation() {
    let env = Env::new();
    let dockerfile = "FROM BASE\nARG SEEN=1\nCOPY data/file.txt /file.txt\nENV MODE=a\nRUN echo $SEEN $MODE > /out\n";
    let build_keys = |name: &str, df: &str, setup: &dyn Fn(&Path)| {
        let ctx = env.context(
            name,
            df,
            &[("data/file.txt", "content\n"), ("data/other.txt", "x")],
        );
        setup(&ctx);
        let report = env.build_ok(
            &ctx,
            &env.fresh_state(name),
            "mut:v1",
            &["--no-push", "--cache=false"],
        );
        keys(&report)
    };
    let with_args = |name: &str, args: &[&str]| {
        let ctx = env.context(
            name,
            dockerfile,
            &[("data/file.txt", "content\n"), ("data/other.txt", "x")],
        );
        let report = env.build_ok(
            &ctx,
            &env.fresh_state(name),
            "mut:v1",
            &[&["--no-push", "--cache=false"], args].concat(),
        );
        keys(&report)
    };
    let none = |_: &Path| {};
    let base = build_keys("base", dockerfile, &none);
    let (copy_line, run_line) = (3u64, 5u64);
    let changed = |other: &BTreeMap<u64, String>| -> Vec<u64> {
        base.iter()
            .filter(|(l, k)| other.get(l) != Some(k))
            .map(|(l, _)| *l)
            .collect()
    };

    let content = build_keys("content", dockerfile, &|c| {
        fs::write(c.join("data/file.txt"), "changed\n").unwrap()
    });
    assert_eq!(changed(&content), [copy_line, run_line], "content");
    let mode = build_keys("mode", dockerfile, &|c| {
        fs::set_permissions(c.join("data/file.txt"), fs::Permissions::from_mode(0o600)).unwrap()
    });
    assert_eq!(changed(&mode), [copy_line, run_line], "mode");
    let owner = build_keys("owner", dockerfile, &|c| {
        std::os::unix::fs::chown(c.join("data/file.txt"), Some(4242), Some(4242)).unwrap()
    });
    assert_eq!(changed(&owner), [copy_line, run_line], "owner");
    let mtime = build_keys("mtime", dockerfile, &|c| {
        let f = fs::File::options()
            .write(true)
            .open(c.join("data/file.txt"))
            .unwrap();
        f.set_modified(std::time::SystemTime::UNIX_EPOCH).unwrap();
    });
    assert_eq!(changed(&mtime), Vec::<u64>::new(), "mtime");
    // An ignore rule for a file no COPY names changes no key.
    let unrelated = build_keys("ignore-unrelated", dockerfile, &|c| {
        fs::write(c.join(".dockerignore"), "data/other.txt\n").unwrap()
    });
    assert_eq!(
        changed(&unrelated),
        Vec::<u64>::new(),
        ".dockerignore of an unused file"
    );
    let env_change = build_keys("env", &dockerfile.replace("MODE=a", "MODE=b"), &none);
    assert_eq!(changed(&env_change), [run_line], "ENV before RUN");
    let seen = with_args("seen-arg", &["--build-arg", "SEEN=2"]);
    assert_eq!(changed(&seen), [run_line], "a build arg the RUN sees");
    let unused = with_args("unused-arg", &["--build-arg", "UNUSED=2"]);
    assert_eq!(changed(&unused), Vec::<u64>::new(), "an unused build arg");
    let moved = {
        let ctx = env.context(
            "somewhere/else/entirely",
            dockerfile,
            &[("data/file.txt", "content\n"), ("data/other.txt", "x")],
        );
        keys(&env.build_ok(
            &ctx,
            &env.fresh_state("moved"),
            "mut:v1",
            &["--no-push", "--cache=false"],
        ))
    };
    assert_eq!(changed(&moved), Vec::<u64>::new(), "the context's path");
    // A different base image digest changes every key.
    env.registry
        .skopeo_copy_in(
            &format!(
                "docker://{}",
                env.registry.reference("library/busybox:latest")
            ),
            "library/busybox:latest",
            &["--src-tls-verify=false", "--format", "v2s2"],
        )
        .unwrap();
    let rebased = build_keys("rebased", dockerfile, &none);
    assert_eq!(
        changed(&rebased),
        [copy_line, run_line],
        "base image digest"
    );
}

/// Keys must be the same in every kiln version (until `KEY_SCHEME` is
/// bumped on purpose): an executor that computed other keys would miss
/// every entry earlier executors wrote. Pinned through the real binary, so
/// that the flags' defaults, the `scratch` base, the context digest and the
/// key module are all covered; the values are scheme v1's.
#[test]
fn the_keys_of_a_fixed_build_are_the_same_in_every_version() {
    let env = Env::new();
    let ctx = env.context(
        "golden",
        "FROM scratch\nARG V=1\nCOPY --chmod=0640 app /app\nWORKDIR /app/$V\n",
        &[("app/a.txt", "a\n"), ("app/sub/b.txt", "b\n")],
    );
    // Modes and owners are inputs of the context digest; mtimes are not.
    for (path, mode) in [
        ("app", 0o755),
        ("app/sub", 0o750),
        ("app/a.txt", 0o644),
        ("app/sub/b.txt", 0o600),
    ] {
        fs::set_permissions(ctx.join(path), fs::Permissions::from_mode(mode)).unwrap();
        std::os::unix::fs::chown(ctx.join(path), Some(1000), Some(1000)).unwrap();
    }
    let state = env.fresh_state("golden");
    let report_path = state.with_extension("report.json");
    // As `Env::build`, but with the environment that changes keys removed.
    let out = Command::new(kiln_bin("kiln-executor"))
        .env_remove("SOURCE_DATE_EPOCH")
        .arg("--context")
        .arg(&ctx)
        .arg("--destination")
        .arg(env.registry.reference("golden:v1"))
        .args(["--no-push", "--cache=false", "--reproducible"])
        .args(["--custom-platform", "linux/amd64"])
        .arg("--cache-dir")
        .arg(&state)
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(&report_path).unwrap()).unwrap();
    let pinned: BTreeMap<u64, String> = [
        (
            3,
            "87637091fc34bf320d10cde198b89938229b242baecafb40dba066275f55fabe",
        ),
        (
            4,
            "949bb6ffc40c667ba7ce9f2a17d95412585c025c57fd5ce4488d3256ca5796a0",
        ),
    ]
    .into_iter()
    .map(|(line, key)| (line, key.to_string()))
    .collect();
    assert_eq!(keys(&report), pinned, "{report}");
}

#[test]
fn four_executors_at_once_all_succeed_with_one_entry_per_key() {
    let env = Env::new();
    let ctx = env.context(
        "race",
        "FROM BASE\nRUN echo racing > /r\nCOPY f /f\n",
        &[("f", "same")],
    );
    let reports: Vec<serde_json::Value> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let env = &env;
                let ctx = &ctx;
                s.spawn(move || {
                    env.build_ok(
                        ctx,
                        &env.fresh_state(&format!("racer{i}")),
                        &format!("race:{i}"),
                        // Distribution 2.8 answers 500 now and then when
                        // several clients push the same blob into one
                        // repository at once; retrying is what CI jobs do.
                        &["--push-retry", "3"],
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let first = &reports[0]["image"]["digest"];
    for r in &reports {
        assert_eq!(&r["image"]["digest"], first);
    }
    for (line, key) in keys(&reports[0]) {
        let (status, body) = env.server.get(&format!("/v1/entries/{key}")).unwrap();
        assert_eq!(status, 200, "line {line}: {body}");
        let entry: serde_json::Value = serde_json::from_str(&body).unwrap();
        let layer = &entry["layer"]["digest"];
        let built = reports[0]["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["line"] == line)
            .unwrap();
        assert_eq!(
            &built["layer"], layer,
            "the entry names the layer the image has"
        );
    }
}

#[test]
fn a_cache_server_that_goes_away_mid_build_only_costs_a_warning() {
    let mut env = Env::new();
    let ctx = env.context(
        "degraded",
        "FROM BASE\nRUN sleep 2 && echo slow > /slow\nRUN echo after > /after\n",
        &[],
    );
    let state = env.fresh_state("degraded");
    let handle = {
        let ctx = ctx.clone();
        let state = state.clone();
        let url = env.server.url();
        let host = env.registry.host();
        let dest = env.registry.reference("degraded:v1");
        std::thread::spawn(move || {
            Command::new(kiln_bin("kiln-executor"))
                .arg("--context")
                .arg(&ctx)
                .args([
                    "--destination",
                    &dest,
                    "--insecure-registry",
                    &host,
                    "--cache-server",
                    &url,
                ])
                .arg("--cache-dir")
                .arg(&state)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(800));
    env.server.stop();
    let out = handle.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("warning"), "{stderr}");

    // And a server that is not there at all: one warning, an uncached build.
    let (out, report) = env.build(&ctx, &env.fresh_state("no-server"), "degraded:v2", &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("warning: the cache is unavailable"),
        "{stderr}"
    );
    assert_eq!(report["summary"]["misses"], 2);
    env.server.restart().unwrap();
}

#[test]
fn base_layers_are_pulled_from_the_registry_once_then_served_by_the_cache() {
    let env = Env::new();
    let one = env.context("base-one", "FROM BASE\nRUN echo one > /one\n", &[]);
    let two = env.context("base-two", "FROM BASE\nRUN echo two > /two\n", &[]);
    let layer = env
        .registry
        .skopeo_inspect("library/busybox:latest")
        .unwrap()["Layers"][0]
        .as_str()
        .unwrap()
        .to_string();
    let layer_gets = |log: &str| {
        log.lines()
            .filter(|l| {
                l.contains(&format!("GET /v2/library/busybox/blobs/{layer}")) && l.contains(" 200 ")
            })
            .count()
    };
    env.build_ok(
        &one,
        &env.fresh_state("base-one"),
        "baseone:v1",
        &["--no-push"],
    );
    assert_eq!(
        layer_gets(&env.registry.log()),
        1,
        "the first executor pulls the base layer"
    );
    let second = env.build_ok(
        &two,
        &env.fresh_state("base-two"),
        "basetwo:v1",
        &["--no-push"],
    );
    assert_eq!(
        layer_gets(&env.registry.log()),
        1,
        "the second executor got the base layer from the cache, not the registry"
    );
    assert!(second["summary"]["bytes_downloaded"].as_u64().unwrap() > 0);
}

#[test]
fn several_cache_servers_fail_over_to_the_one_that_answers() {
    let mut env = Env::new();
    let ctx = env.context("failover", "FROM BASE\nRUN echo once > /once\n", &[]);
    // Warm the live server, then point a fresh executor at a dead URL first.
    env.build_ok(
        &ctx,
        &env.fresh_state("warm"),
        "failover:v1",
        &["--no-push"],
    );
    let report_path = env.work.path().join("failover.json");
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(&ctx)
        .args(["--no-push", "--insecure-registry", &env.registry.host()])
        .args([
            "--cache-server",
            &format!("http://127.0.0.1:9,{}", env.server.url()),
            "--reproducible",
        ])
        .arg("--cache-dir")
        .arg(env.fresh_state("failover"))
        .arg("--report")
        .arg(&report_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value =
        serde_json::from_slice(&fs::read(&report_path).unwrap()).unwrap();
    assert_eq!(report["summary"]["hits"], 1, "{report}");
    // With every server gone the build still succeeds, uncached.
    env.server.stop();
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(&ctx)
        .args(["--no-push", "--insecure-registry", &env.registry.host()])
        .args([
            "--cache-server",
            &format!("http://127.0.0.1:9,{}", env.server.url()),
            "--reproducible",
        ])
        .arg("--cache-dir")
        .arg(env.fresh_state("all-down"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The embedded cache and the local store under one `--cache-dir` share
/// each blob's bytes: every blob-named file's content is one inode on disk,
/// whether the cache adopted the store's file (first build) or the store
/// got it back from the cache (after the store was wiped).
#[test]
fn the_embedded_cache_and_the_local_store_keep_one_copy_of_each_blob() {
    use std::collections::{BTreeMap, BTreeSet};
    use std::os::unix::fs::MetadataExt;
    let env = Env::new();
    let first = "FROM BASE\nRUN head -c 300000 /dev/urandom > /noise\n";
    let ctx_one = env.context("one-copy", first, &[]);
    // A hit on the first RUN, then a miss: the rootfs needs every earlier
    // layer back from the cache.
    let ctx_two = env.context("one-copy-2", &format!("{first}RUN echo 2 > /two\n"), &[]);
    let state = env.fresh_state("one-copy");
    let build = |ctx: &Path, state: &Path| {
        let out = Command::new(kiln_bin("kiln-executor"))
            .arg("--context")
            .arg(ctx)
            .arg("--destination")
            .arg(env.registry.reference("onecopy:v1"))
            .args(["--insecure-registry", &env.registry.host(), "--no-push"])
            .arg("--cache-dir")
            .arg(state)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "build failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    // Content digest -> (inodes, trees holding it), over every file named
    // like a blob (64 hex digits) below `state`.
    let copies = |state: &Path| {
        let mut by_content: BTreeMap<String, (BTreeSet<u64>, BTreeSet<String>)> = BTreeMap::new();
        for p in walk_files(state) {
            let name = p.file_name().unwrap().to_string_lossy().to_string();
            if name.len() != 64 || !name.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let bytes = fs::read(&p).unwrap();
            let tree = p
                .strip_prefix(state)
                .unwrap()
                .components()
                .next()
                .unwrap()
                .as_os_str()
                .to_string_lossy()
                .to_string();
            let e = by_content
                .entry(kiln_common::Digest::of_bytes(&bytes).hex().to_string())
                .or_default();
            e.0.insert(fs::metadata(&p).unwrap().ino());
            e.1.insert(tree);
        }
        by_content
    };
    let check = |state: &Path, in_both: usize| {
        let all = copies(state);
        let shared: Vec<_> = all
            .iter()
            .filter(|(_, (_, trees))| trees.contains("store") && trees.contains("cache"))
            .collect();
        assert!(
            shared.len() >= in_both,
            "at least {in_both} blobs are in both the store and the cache: {all:?}"
        );
        for (digest, (inodes, trees)) in &all {
            assert_eq!(
                inodes.len(),
                1,
                "blob {digest} is stored {} times (in {trees:?})",
                inodes.len()
            );
        }
    };
    // The pulled base layer went into the store and then into the cache
    // (the built layer is written in the build's scratch directory, which
    // is gone after the build).
    build(&ctx_one, &state);
    check(&state, 1);
    // The base layer and the first RUN's layer come back from the cache
    // (the unpacked layers are gone too, so the blobs are needed).
    fs::remove_dir_all(state.join("store")).unwrap();
    fs::remove_dir_all(state.join("layers")).unwrap();
    build(&ctx_two, &state);
    check(&state, 2);
}
