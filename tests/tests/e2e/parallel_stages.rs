//! Independent stages of a multi-stage build run at once (`--jobs`), with
//! the real `kiln-executor` and a Distribution registry: the image is the
//! one a sequential build makes, the report lists steps in plan order, the
//! lines of each stage carry its name, and a failing stage stops the others.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{Registry, RegistryAuth, kiln_bin, push_busybox};

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

    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let base = self.registry.reference("library/busybox:latest");
        fs::write(dir.join("Dockerfile"), dockerfile.replace("BASE", &base)).unwrap();
        dir
    }

    fn path(&self, name: &str) -> PathBuf {
        self.work.path().join(name)
    }

    /// Runs kiln-executor on `ctx` with its own state directory `name`.
    fn executor(&self, ctx: &Path, name: &str, extra: &[&str]) -> Output {
        Command::new(kiln_bin("kiln-executor"))
            .arg("--context")
            .arg(ctx)
            .arg("--no-push")
            .arg("--insecure-registry")
            .arg(self.registry.host())
            .arg("--cache-dir")
            .arg(self.path(&format!("state-{name}")))
            .args(extra)
            .output()
            .expect("running kiln-executor")
    }

    fn executor_ok(&self, ctx: &Path, name: &str, extra: &[&str]) -> String {
        let out = self.executor(ctx, name, extra);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.success(),
            "kiln-executor {extra:?} failed:\n{stderr}"
        );
        stderr
    }
}

fn report(path: &Path) -> serde_json::Value {
    serde_json::from_slice(&fs::read(path).unwrap()).unwrap()
}

/// The report's steps as (stage, line, instruction, cache, layer).
fn step_rows(report: &serde_json::Value) -> Vec<String> {
    report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{} {} {} {} {}",
                s["stage"], s["line"], s["instruction"], s["cache"], s["layer"]
            )
        })
        .collect()
}

const FAN_IN: &str = "FROM BASE AS a\n\
                      RUN echo a > /a && sleep 1\n\
                      FROM BASE AS b\n\
                      RUN echo b > /b && sleep 1\n\
                      FROM BASE\n\
                      COPY --from=a /a /a\n\
                      COPY --from=b /b /b\n";

#[test]
fn stages_built_at_once_give_the_sequential_builds_digest_and_report_order() {
    let f = Fixture::new();
    let ctx = f.context("fan-in", FAN_IN);
    let build = |name: &str, jobs: &str| {
        let digest = f.path(&format!("{name}.digest"));
        let report_file = f.path(&format!("{name}.json"));
        let stderr = f.executor_ok(
            &ctx,
            name,
            &[
                "--reproducible",
                "--cache=false",
                "--jobs",
                jobs,
                "--digest-file",
                digest.to_str().unwrap(),
                "--report",
                report_file.to_str().unwrap(),
            ],
        );
        (
            fs::read_to_string(digest).unwrap(),
            report(&report_file),
            stderr,
        )
    };
    let (sequential, seq_report, seq_log) = build("sequential", "1");
    let (parallel, par_report, par_log) = build("parallel", "2");
    assert_eq!(parallel, sequential, "the same image, whatever --jobs");
    assert_eq!(step_rows(&par_report), step_rows(&seq_report));
    let stages: Vec<u64> = par_report["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_u64().unwrap())
        .collect();
    assert!(stages.is_sorted(), "plan order: {stages:?}");
    // One job: today's lines; several: each stage's lines carry its name.
    assert!(!seq_log.contains("[a] "), "{seq_log}");
    assert!(
        par_log.contains("[a] [stage 0 line 2] RUN echo a"),
        "{par_log}"
    );
    assert!(
        par_log.contains("[b] [stage 1 line 4] RUN echo b"),
        "{par_log}"
    );
}

#[test]
fn independent_stages_run_at_the_same_time() {
    let f = Fixture::new();
    // Each stage's RUN waits (up to a minute) for the other's to start:
    // both finish only if they run at once. The cache mount is one host
    // directory both steps see.
    let meet = |me: &str, other: &str| {
        format!(
            "RUN --mount=type=cache,id=meet,target=/meet touch /meet/{me} && i=0 && \
             while [ ! -e /meet/{other} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done && \
             [ -e /meet/{other} ] && echo met > /{me}\n"
        )
    };
    let dockerfile = format!(
        "FROM BASE AS a\n{}FROM BASE AS b\n{}FROM BASE\nCOPY --from=a /a /a\nCOPY --from=b /b /b\n",
        meet("a", "b"),
        meet("b", "a")
    );
    let ctx = f.context("meet", &dockerfile);
    f.executor_ok(&ctx, "meet", &["--jobs", "2", "--cache=false"]);
}

#[test]
fn a_failing_stage_stops_the_others_and_is_the_builds_error() {
    let f = Fixture::new();
    let ctx = f.context(
        "fail",
        "FROM BASE AS a\n\
         RUN echo failing; exit 3\n\
         FROM BASE AS b\n\
         RUN sleep 8\n\
         RUN echo never > /never\n\
         FROM BASE\n\
         COPY --from=a / /a\n\
         COPY --from=b / /b\n",
    );
    let report_file = f.path("fail.json");
    let out = f.executor(
        &ctx,
        "fail",
        &[
            "--jobs",
            "2",
            "--cache=false",
            "--report",
            report_file.to_str().unwrap(),
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("Dockerfile:2: RUN echo failing; exit 3"),
        "{stderr}"
    );
    assert!(!stderr.contains("RUN echo never"), "{stderr}");
    let report = report(&report_file);
    assert_eq!(report["summary"]["success"], false);
    assert_eq!(report["error"]["step"]["line"], 2, "{report}");
    assert!(
        !step_rows(&report).iter().any(|r| r.contains("echo never")),
        "{report}"
    );
}
