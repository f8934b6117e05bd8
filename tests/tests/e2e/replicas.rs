//! Cache-server replicas on one S3-compatible bucket, end to end: a real
//! S3 server (s3s-fs), real `kiln-cache-server` replicas on it, the real
//! `kiln-executor`. The proof docs/object-storage.md asks for: killing the
//! replica an executor is using in the middle of a build leaves the build
//! succeeding through another replica, and everything the build stored,
//! through either, is in the shared cache for the next executor.
//!
//! Entries written through a replica that is then killed, with no build
//! running, are found through the survivors at the HTTP level in
//! `cache-server/tests/server/s3_replicas.rs`
//! (`killing_a_replica_mid_sequence_leaves_the_others_serving`); the second
//! build here shows the same through an executor.

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kiln_e2e::s3::{Replica, S3Server};
use kiln_e2e::{kiln_bin, make_busybox_layout, run, unmount_below};

/// Entries a replica created (first writer) since it started.
const ENTRIES_CREATED: &str =
    r#"kiln_cache_http_requests_total{route="/v1/entries/{key}",method="PUT",status="201"}"#;

/// Entries a replica could not store because the bucket failed.
const ENTRIES_UNAVAILABLE: &str =
    r#"kiln_cache_http_requests_total{route="/v1/entries/{key}",method="PUT",status="503"}"#;

/// Generous: this runs on loaded 2-core CI machines.
const BUILD_TIMEOUT: Duration = Duration::from_secs(600);
const STEP_TIMEOUT: Duration = Duration::from_secs(300);

/// What the gated step prints when it starts waiting (the Dockerfile text
/// does not contain it, so the executor's own log lines cannot match).
const GATE_WAITING: &str = "waiting for the gate";

/// Six layer-producing steps. The fourth (line 4) waits until the test
/// creates `gate/open` in the context, which it bind-mounts: the test kills
/// the replica while that step runs, without guessing with sleeps how long
/// anything takes. Keys are computed before any step runs, so the file
/// appearing mid-build does not change this build's keys, and the test
/// removes it again before the next build.
const DOCKERFILE: &str = "\
FROM oci-layout://BASE:latest
RUN mkdir -p /out && echo one > /out/one
COPY app/a.txt /out/a.txt
RUN --mount=type=bind,source=gate,target=/gate printf 'waiting for the %s\\n' gate && for i in $(seq 3000); do [ -e /gate/open ] && break; sleep 0.2; done && test -e /gate/open && echo slow > /out/slow
RUN cat /out/a.txt /out/slow > /out/joined
COPY app/b.txt /out/b.txt
RUN echo last > /out/last && ls /out > /out/list
";

/// Filesystem steps before the gated one, and from it on.
const STEPS_BEFORE_GATE: usize = 2;
const STEPS_FROM_GATE: usize = 4;

/// The test's scratch directory. An executor killed mid-step (when the
/// test fails) leaves the step's overlay mounted in its state directory:
/// those mounts are undone before the directory is removed.
struct Work(tempfile::TempDir);

impl Work {
    fn new() -> Work {
        Work(tempfile::tempdir().unwrap())
    }

    fn path(&self) -> &Path {
        self.0.path()
    }
}

impl Drop for Work {
    fn drop(&mut self) {
        unmount_below(self.0.path());
    }
}

/// A running `kiln-executor` whose stdout and stderr are collected as they
/// arrive; killed on drop.
struct Executor {
    child: Option<Child>,
    output: Arc<Mutex<String>>,
    pumps: Vec<JoinHandle<()>>,
}

impl Executor {
    /// Builds `ctx` into the OCI layout `layout`; its state and temporary
    /// files go to `state`, so nothing of it is left outside the test's
    /// directory even when it is killed.
    fn spawn(ctx: &Path, state: &Path, layout: &Path, report: &Path, servers: &str) -> Executor {
        let tmp = state.join("tmp");
        fs::create_dir_all(&tmp).unwrap();
        let mut child = Command::new(kiln_bin("kiln-executor"))
            .env("TMPDIR", &tmp)
            .arg("--context")
            .arg(ctx)
            .args(["--no-push", "--reproducible", "--cache-server", servers])
            .arg("--oci-layout-path")
            .arg(layout)
            .arg("--cache-dir")
            .arg(state)
            .arg("--report")
            .arg(report)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kiln-executor");
        let output = Arc::new(Mutex::new(String::new()));
        let pipes: [Box<dyn Read + Send>; 2] = [
            Box::new(child.stdout.take().unwrap()),
            Box::new(child.stderr.take().unwrap()),
        ];
        let pumps = pipes
            .into_iter()
            .map(|pipe| {
                let output = output.clone();
                std::thread::spawn(move || {
                    for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                        let mut out = output.lock().unwrap();
                        out.push_str(&line);
                        out.push('\n');
                    }
                })
            })
            .collect();
        Executor {
            child: Some(child),
            output,
            pumps,
        }
    }

    /// Everything it printed so far.
    fn output(&self) -> String {
        self.output.lock().unwrap().clone()
    }

    /// Polls every 100 ms until `ready(output so far)` holds; panics with
    /// the output when the executor exits first or after `timeout`.
    fn wait_for(&mut self, what: &str, timeout: Duration, mut ready: impl FnMut(&str) -> bool) {
        let deadline = Instant::now() + timeout;
        while !ready(&self.output()) {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().unwrap()) {
                self.child = None;
                self.join_pumps();
                panic!(
                    "kiln-executor exited ({status}) while the test waited for {what}:\n{}",
                    self.output()
                );
            }
            assert!(
                Instant::now() < deadline,
                "timed out after {timeout:?} waiting for {what}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for it to exit (killing it after `timeout`); returns its
    /// status and output.
    fn wait(&mut self, timeout: Duration) -> (ExitStatus, String) {
        let child = self
            .child
            .as_mut()
            .expect("the executor was already reaped");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                self.join_pumps();
                panic!(
                    "kiln-executor did not finish within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        self.child = None;
        self.join_pumps();
        (status, self.output())
    }

    fn join_pumps(&mut self) {
        for pump in self.pumps.drain(..) {
            let _ = pump.join();
        }
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Panics when the executor said it builds without the cache or could not
/// upload a step: with a live replica left, neither may happen.
fn assert_not_degraded(output: &str) {
    for degraded in [
        "warning: the cache is unavailable",
        "warning: uploading to the cache failed",
    ] {
        assert!(
            !output.contains(degraded),
            "the build degraded instead of failing over:\n{output}"
        );
    }
}

fn read_report(path: &Path) -> serde_json::Value {
    let bytes = fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_slice(&bytes).unwrap()
}

/// The report's filesystem steps (those with a cache key), in order.
fn filesystem_steps(report: &serde_json::Value) -> Vec<serde_json::Value> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| !s["key"].is_null())
        .cloned()
        .collect()
}

/// The layer digests of `oci:<layout>:<tag>`, as skopeo reads them.
fn layers(layout: &Path, tag: &str) -> Vec<String> {
    let inspect = run(Command::new("skopeo")
        .arg("inspect")
        .arg(format!("oci:{}:{tag}", layout.display())))
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&inspect).unwrap();
    json["Layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_owned())
        .collect()
}

/// The build context: the Dockerfile on `base`, two files to COPY, and the
/// (closed) gate directory.
fn make_context(dir: &Path, base: &Path) -> PathBuf {
    let ctx = dir.join("context");
    fs::create_dir_all(ctx.join("app")).unwrap();
    fs::create_dir_all(ctx.join("gate")).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        DOCKERFILE.replace("BASE", &base.display().to_string()),
    )
    .unwrap();
    fs::write(ctx.join("app/a.txt"), "from the context\n").unwrap();
    fs::write(ctx.join("app/b.txt"), "copied after the kill\n").unwrap();
    fs::write(
        ctx.join("gate/README"),
        "The test creates `open` here to let line 4 finish.\n",
    )
    .unwrap();
    ctx
}

#[test]
fn killing_the_replica_in_use_mid_build_fails_over_and_keeps_every_step_cached() {
    if let Some(s3) = S3Server::start(
        "killing_the_replica_in_use_mid_build_fails_over_and_keeps_every_step_cached",
    ) {
        kill_the_replica_in_use_mid_build(s3, false);
    }
}

/// The same on a three-node Garage cluster, where the storage node under
/// the replica in use goes down with it: the build goes on through the
/// other replica and the two remaining nodes, and after the node is back a
/// replica on it serves the whole build.
#[test]
fn killing_the_replica_in_use_and_its_storage_node_mid_build_still_caches_every_step() {
    if let Some(s3) = S3Server::start_garage(
        "killing_the_replica_in_use_and_its_storage_node_mid_build_still_caches_every_step",
    ) {
        kill_the_replica_in_use_mid_build(s3, true);
    }
}

/// R1 on storage node 0 and R2 on the last node; R1 (and with
/// `kill_storage_node` its node) dies while the gated step runs.
fn kill_the_replica_in_use_mid_build(mut s3: S3Server, kill_storage_node: bool) {
    let work = Work::new();
    let base = work.path().join("base");
    make_busybox_layout(&base, "latest").unwrap();
    let ctx = make_context(work.path(), &base);
    let gate = ctx.join("gate/open");

    let mut r1 = Replica::start_on(&s3, 0, "e2e", &[]);
    let r2 = Replica::start_on(&s3, s3.nodes() - 1, "e2e", &[]);

    // --- build 1: R1 first, so R1 is the replica in use --------------------
    let (layout1, report1) = (
        work.path().join("image-1"),
        work.path().join("report-1.json"),
    );
    let mut build = Executor::spawn(
        &ctx,
        &work.path().join("state-1"),
        &layout1,
        &report1,
        &format!("{},{}", r1.url, r2.url),
    );
    // The gated step runs, and the steps before it are stored through R1.
    build.wait_for(
        "the gated step to start and the earlier steps to be stored through R1",
        STEP_TIMEOUT,
        |output| {
            assert_not_degraded(output);
            assert_eq!(
                r1.metric(ENTRIES_UNAVAILABLE),
                0.0,
                "R1 could not store entries in the bucket (its log and the S3 server's errors follow)"
            );
            output.contains(GATE_WAITING) && r1.metric(ENTRIES_CREATED) >= STEPS_BEFORE_GATE as f64
        },
    );
    assert_eq!(
        r1.metric(ENTRIES_CREATED),
        STEPS_BEFORE_GATE as f64,
        "R1 stored more than the steps before the gate"
    );
    assert_eq!(
        r2.metric(ENTRIES_CREATED),
        0.0,
        "R2 was used before the kill"
    );
    r1.kill9();
    if kill_storage_node {
        s3.kill_node(0);
    }
    assert!(
        r1.get("/healthz").is_err(),
        "R1 still answers after kill -9"
    );
    fs::write(&gate, "").unwrap();

    let (status, output) = build.wait(BUILD_TIMEOUT);
    assert!(status.success(), "build 1 failed ({status}):\n{output}");
    fs::remove_file(&gate).unwrap();
    assert_not_degraded(&output);
    let first = read_report(&report1);
    let steps = filesystem_steps(&first);
    assert_eq!(steps.len(), STEPS_BEFORE_GATE + STEPS_FROM_GATE, "{first}");
    for step in &steps {
        assert_eq!(step["cache"], "miss", "{step}");
        assert!(
            !step["durations_ms"]["upload"].is_null() && !step["bytes"]["uploaded"].is_null(),
            "line {} was not uploaded: {step}",
            step["line"]
        );
    }
    // Every step from the gated one on went to the cache through R2.
    assert_eq!(
        r2.metric(ENTRIES_CREATED),
        STEPS_FROM_GATE as f64,
        "entries stored through R2:\n{output}"
    );

    // The image holds every step's layer, in order, and every step's files.
    let image_layers = layers(&layout1, "latest");
    let base_layers = layers(&base, "latest");
    let step_layers: Vec<String> = steps
        .iter()
        .map(|s| s["layer"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(image_layers, [base_layers, step_layers].concat());
    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", layout1.display()))
        .arg(&bundle))
    .unwrap();
    let file = |name: &str| fs::read_to_string(bundle.join("rootfs/out").join(name)).unwrap();
    assert_eq!(file("one"), "one\n");
    assert_eq!(file("a.txt"), "from the context\n");
    assert_eq!(file("slow"), "slow\n");
    assert_eq!(file("joined"), "from the context\nslow\n");
    assert_eq!(file("b.txt"), "copied after the kill\n");
    assert_eq!(file("last"), "last\n");
    assert_eq!(
        file("list"),
        "a.txt\nb.txt\njoined\nlast\nlist\none\nslow\n"
    );
    assert!(bundle.join("rootfs/bin/busybox").is_file());
    assert!(
        !bundle.join("rootfs/gate").exists(),
        "the bind mount's stub is in the image"
    );

    // --- build 2: a new replica with an empty index, a fresh executor -------
    if kill_storage_node {
        s3.restart_node(0).unwrap();
    }
    let r3 = Replica::start_on(&s3, 0, "e2e", &[]);
    let (layout2, report2) = (
        work.path().join("image-2"),
        work.path().join("report-2.json"),
    );
    let mut build = Executor::spawn(
        &ctx,
        &work.path().join("state-2"),
        &layout2,
        &report2,
        &r3.url,
    );
    let (status, output) = build.wait(BUILD_TIMEOUT);
    assert!(status.success(), "build 2 failed ({status}):\n{output}");
    let second = read_report(&report2);
    for step in filesystem_steps(&second) {
        assert_eq!(step["cache"], "hit", "line {}: {second}", step["line"]);
    }
    assert_eq!(second["summary"]["hits"], steps.len(), "{second}");
    assert_eq!(second["summary"]["misses"], 0, "{second}");
    assert_eq!(second["summary"]["cache"], r3.url.as_str(), "{second}");
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);
    assert_eq!(layers(&layout2, "latest"), image_layers);
}
