//! What a Kaniko user sees of a running build, with the real
//! `kiln-executor`: the CI log (step headers before the step, end lines
//! with outcome and duration, `--log-format json`, no escape sequences in
//! a pipe or with `NO_COLOR`, `--verbosity`), `--report` for builds and
//! pushes that fail, progress lines of a slow download, and the isolation
//! fallback in a pod that may not create namespaces (run in a throwaway
//! root with `CAP_SYS_ADMIN` dropped, never in place on this machine's `/`).

use std::fs;
use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::runtime::ThrowawayRoot;
use kiln_e2e::{Registry, RegistryAuth, kiln_bin, make_busybox_layout};

/// A context with a Dockerfile on a local busybox layout.
struct Project {
    dir: tempfile::TempDir,
}

impl Project {
    fn new(steps: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_busybox_layout(&dir.path().join("base"), "latest").unwrap();
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(&ctx).unwrap();
        fs::write(
            ctx.join("Dockerfile"),
            format!(
                "FROM oci-layout://{}:latest\n{steps}",
                dir.path().join("base").display()
            ),
        )
        .unwrap();
        Project { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// The executor building the context (state in the project), with `args`.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(kiln_bin("kiln-executor"));
        cmd.arg("--context")
            .arg(self.path("ctx"))
            .arg("--cache-dir")
            .arg(self.path("state"))
            .args(args)
            .env_remove("NO_COLOR");
        cmd
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("running kiln-executor")
    }
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    let text = stderr(&out);
    assert!(out.status.success(), "kiln-executor failed:\n{text}");
    text
}

/// The one line containing `needle`, with its index.
fn line_with(text: &str, needle: &str) -> (usize, String) {
    let found: Vec<(usize, &str)> = text
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(needle))
        .collect();
    assert_eq!(found.len(), 1, "one line with {needle:?} in:\n{text}");
    (found[0].0, found[0].1.to_owned())
}

/// `(1.23s)`-style duration at the end of a line.
fn ends_with_duration(line: &str) -> bool {
    line.rsplit_once(" (")
        .and_then(|(_, d)| d.strip_suffix("s)"))
        .is_some_and(|d| d.parse::<f64>().is_ok() || d.contains('m'))
}

/// The report's step on Dockerfile line `line`.
fn step_at(report: &serde_json::Value, line: u64) -> &serde_json::Value {
    report["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["line"] == line))
        .unwrap_or_else(|| panic!("no step on line {line}: {report:#}"))
}

const MARKER_STEP: &str = "RUN echo marker-$((6*7))";

#[test]
fn the_step_header_is_printed_before_the_steps_output_and_the_end_line_after() {
    let p = Project::new(&format!("{MARKER_STEP}\n"));
    let first = ok(p.run(&["--no-push"]));
    let (header_at, _) = line_with(&first, &format!("[stage 0 line 2] {MARKER_STEP}"));
    let (output_at, output) = line_with(&first, "marker-42");
    let (end_at, end) = line_with(&first, "cache miss: RUN echo marker");
    assert_eq!(output, "[stage 0 line 2] marker-42");
    assert!(
        header_at < output_at && output_at < end_at,
        "header, output, end line in that order:\n{first}"
    );
    assert!(
        end.starts_with("[stage 0 line 2] cache miss: ") && ends_with_duration(&end),
        "{end}"
    );

    let second = ok(p.run(&["--no-push"]));
    let (_, end) = line_with(&second, "cache hit: RUN echo marker");
    assert!(ends_with_duration(&end), "{end}");
    assert!(
        !second.contains("marker-42"),
        "a hit does not run:\n{second}"
    );
}

#[test]
fn json_logs_are_one_object_per_line_with_the_steps_fields() {
    let p = Project::new(&format!("ENV A=1\n{MARKER_STEP}\n"));
    let text = ok(p.run(&["--no-push", "--log-format=json", "--log-timestamp"]));
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l:?}\n{text}")))
        .collect();
    for e in &events {
        assert!(e["level"].is_string() && e["msg"].is_string(), "{e}");
        assert!(e["time"].as_str().is_some_and(|t| t.ends_with('Z')), "{e}");
    }
    let of = |kind: &str| -> Vec<&serde_json::Value> {
        events.iter().filter(|e| e["event"] == kind).collect()
    };
    let starts = of("step_start");
    assert_eq!(starts.len(), 2, "ENV and RUN: {events:?}");
    assert_eq!(starts[1]["stage"], 0);
    assert_eq!(starts[1]["line"], 3);
    assert_eq!(starts[1]["instruction"], MARKER_STEP);
    let ends = of("step_end");
    assert_eq!(ends.len(), 1, "{events:?}");
    assert_eq!(ends[0]["outcome"], "miss");
    assert!(ends[0]["duration_ms"].is_u64(), "{}", ends[0]);
    assert_eq!(ends[0]["line"], 3);
    let output = of("output");
    assert_eq!(output.len(), 1, "{events:?}");
    assert_eq!(output[0]["msg"], "marker-42");
    assert_eq!(output[0]["line"], 3);
    assert_eq!(of("image").len(), 1, "the final digest is an event too");
}

#[test]
fn no_escape_sequences_in_a_pipe_or_with_no_color() {
    let p = Project::new(&format!("{MARKER_STEP}\nRUN echo warn >&2\n"));
    // The default format is Kaniko's `color`: plain text in a pipe.
    let piped = ok(p.run(&["--no-push"]));
    assert!(piped.contains("cache miss"), "{piped}");
    assert!(!piped.contains('\x1b'), "{piped:?}");

    // On a terminal (script(1) gives the executor one), colour appears,
    // unless NO_COLOR is set.
    let on_tty = |no_color: bool| -> String {
        let line = format!(
            "{} --context {} --cache-dir {} --no-push --cache=false",
            kiln_bin("kiln-executor").display(),
            p.path("ctx").display(),
            p.path("state").display()
        );
        let mut cmd = Command::new("script");
        cmd.args(["-qec", &line, "/dev/null"])
            .env_remove("NO_COLOR");
        if no_color {
            cmd.env("NO_COLOR", "1");
        }
        let out = cmd.output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stdout)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let coloured = on_tty(false);
    assert!(
        coloured.contains("cache miss") && coloured.contains('\x1b'),
        "{coloured:?}"
    );
    let plain = on_tty(true);
    assert!(
        plain.contains("cache miss") && !plain.contains('\x1b'),
        "{plain:?}"
    );
    // `text` never colours, even on a terminal.
    let text = ok(p.run(&["--no-push", "--log-format", "text"]));
    assert!(!text.contains('\x1b'));
}

#[test]
fn verbosity_warn_hides_step_lines_and_debug_adds_detail() {
    let p = Project::new(&format!("{MARKER_STEP}\n"));
    let quiet = ok(p.run(&["--no-push", "-v", "warn"]));
    assert!(
        !quiet.contains("RUN echo"),
        "no header or end line:\n{quiet}"
    );
    assert!(
        !quiet.contains("cache miss") && !quiet.contains("built "),
        "{quiet}"
    );
    // The build's own output is shown at every verbosity, as Kaniko does.
    assert!(quiet.contains("marker-42"), "{quiet}");

    let info = ok(p.run(&["--no-push", "--cache=false"]));
    assert!(!info.contains("cache key"), "{info}");
    let debug = ok(p.run(&["--no-push", "--cache=false", "--verbosity=debug"]));
    assert!(debug.contains("[stage 0 line 2] cache key "), "{debug}");
    assert!(debug.contains("debug: "), "{debug}");
}

#[test]
fn a_failing_run_step_still_writes_the_report_with_the_step_and_the_error() {
    let p = Project::new("RUN echo one > /one\nRUN echo about to fail && exit 3\n");
    let report = p.path("report.json");
    let out = p.run(&["--no-push", "--report", report.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["summary"]["success"], false, "{r:#}");
    assert_eq!(r["error"]["phase"], "building");
    assert_eq!(r["error"]["step"]["stage"], 0);
    assert_eq!(r["error"]["step"]["line"], 3);
    assert_eq!(
        r["error"]["step"]["instruction"],
        "RUN echo about to fail && exit 3"
    );
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("line 3") || message.contains(":3:"),
        "{message}"
    );
    assert!(
        message.contains("about to fail"),
        "the step's output tail: {message}"
    );
    assert_eq!(r["error"]["exit_code"], 3);
    // The step before it is in the report as it ran.
    assert_eq!(step_at(&r, 2)["cache"], "miss", "{r:#}");
    assert!(r["image"].is_null());
    // The end line of the failed step is in the log, before the error.
    let log = stderr(&out);
    let (end_at, _) = line_with(&log, "failed: RUN echo about to fail");
    let (error_at, _) = line_with(&log, "kiln-executor: error: ");
    assert!(end_at < error_at, "{log}");
}

#[test]
fn a_failing_push_still_writes_the_report_with_the_error() {
    let registry = Registry::start(RegistryAuth::None).unwrap();
    // The step gives the test time to stop the registry after the build
    // started (and after any check made before the build).
    let p = Project::new("RUN sleep 2 && echo done > /done\n");
    let report = p.path("report.json");
    let destination = registry.reference("pushed:v1");
    let mut child = p
        .command(&[
            "--destination",
            &destination,
            "--insecure-registry",
            &registry.host(),
            "--report",
            report.to_str().unwrap(),
        ])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut log = String::new();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        log.push_str(&line);
        log.push('\n');
        if line.contains("[stage 0 line 2] RUN sleep 2") {
            break;
        }
    }
    drop(registry);
    for line in lines {
        log.push_str(&line.unwrap());
        log.push('\n');
    }
    let status = child.wait().unwrap();
    assert!(!status.success(), "the push cannot succeed:\n{log}");
    let r: serde_json::Value = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    assert_eq!(r["summary"]["success"], false, "{r:#}");
    assert_eq!(r["error"]["phase"], "pushing", "{r:#}");
    assert!(r["error"]["step"].is_null(), "{r:#}");
    let message = r["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("127.0.0.1"),
        "names the registry: {message}"
    );
    assert_eq!(
        step_at(&r, 2)["cache"],
        "miss",
        "the build is reported: {r:#}"
    );
}

/// A context inside a throwaway root: a busybox layout as the base and a
/// RUN step that misses the (empty) cache.
fn throwaway_project() -> ThrowawayRoot {
    let root = ThrowawayRoot::new();
    make_busybox_layout(&root.path().join("base-layout"), "latest").unwrap();
    let ctx = root.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM oci-layout:///base-layout:latest\nRUN echo ran > /ran.txt\n",
    )
    .unwrap();
    root
}

const IN_ROOT_ARGS: [&str; 8] = [
    "--context",
    "/ctx",
    "--oci-layout-path",
    "/out",
    "--no-push",
    "--cache-dir",
    "/kiln/cache",
    "--log-format=text",
];

#[test]
fn in_a_container_without_namespaces_run_steps_fall_back_to_in_place_with_a_notice() {
    let root = throwaway_project();
    let out = root
        .command(true, &[("container", "kiln-test")], &IN_ROOT_ARGS)
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let (notice_at, notice) = line_with(&log, "isolation: ");
    assert!(
        notice.contains("--isolation none")
            && notice.contains("Operation not permitted")
            && notice.contains("container=kiln-test"),
        "{notice}"
    );
    let (header_at, _) = line_with(&log, "[stage 0 line 2] RUN echo ran");
    assert!(notice_at < header_at, "the notice comes first:\n{log}");
    line_with(&log, "cache miss: RUN echo ran");

    let bundle = tempfile::tempdir().unwrap();
    let image = kiln_e2e::umoci_unpack(&root.path().join("out"), &bundle.path().join("b")).unwrap();
    assert_eq!(fs::read_to_string(image.join("ran.txt")).unwrap(), "ran\n");
}

#[test]
fn outside_a_container_without_namespaces_the_executor_refuses_at_startup() {
    let root = throwaway_project();
    let started = Instant::now();
    let out = root.command(true, &[], &IN_ROOT_ARGS).output().unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("--isolation none") && log.contains("CAP_SYS_ADMIN"),
        "names both fixes: {log}"
    );
    assert!(log.contains("Operation not permitted"), "{log}");
    assert!(!log.contains("[stage"), "nothing was built: {log}");
    assert!(!root.path().join("ran.txt").exists());
    assert!(!root.path().join("out").exists());
    assert!(started.elapsed() < Duration::from_secs(20));

    // An explicit --isolation chroot in a container does not fall back.
    let mut args = IN_ROOT_ARGS.to_vec();
    args.extend(["--isolation", "chroot"]);
    let out = root
        .command(true, &[("container", "kiln-test")], &args)
        .output()
        .unwrap();
    let log = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{log}");
    assert!(
        log.contains("--isolation none") && !log.contains("[stage"),
        "{log}"
    );
}

/// A build through `cache`, JSON log; returns the events and the report.
fn json_build(
    registry: &Registry,
    ctx: &std::path::Path,
    state: &std::path::Path,
    cache: &str,
) -> (Vec<serde_json::Value>, serde_json::Value) {
    let report = state.with_extension("report.json");
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(ctx)
        .args(["--insecure-registry", &registry.host(), "--no-push"])
        .args(["--cache-server", cache, "--log-format", "json"])
        .arg("--cache-dir")
        .arg(state)
        .arg("--report")
        .arg(&report)
        .output()
        .unwrap();
    let log = stderr(&out);
    assert!(out.status.success(), "{log}");
    let events = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let report = serde_json::from_slice(&fs::read(&report).unwrap()).unwrap();
    (events, report)
}

fn millis_of(time: &serde_json::Value) -> u64 {
    // `2026-12-02T01:07:31.123Z` -> milliseconds since midnight.
    let t = time.as_str().unwrap();
    let clock = &t[11..23];
    let (h, rest) = clock.split_once(':').unwrap();
    let (m, rest) = rest.split_once(':').unwrap();
    let (s, ms) = rest.split_once('.').unwrap();
    let n = |x: &str| x.parse::<u64>().unwrap();
    ((n(h) * 60 + n(m)) * 60 + n(s)) * 1000 + n(ms)
}

#[test]
fn a_slow_layer_download_prints_progress_every_two_seconds_and_a_fast_one_none() {
    use kiln_e2e::hostile::{BlobAnswer, HostileCache, LookupAnswer};
    let registry = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    kiln_e2e::push_busybox(&registry, work.path(), "library/busybox:latest", &[]).unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        format!(
            "FROM {}\nRUN echo one > /one\nRUN cat /one > /two\n",
            registry.reference("library/busybox:latest")
        ),
    )
    .unwrap();

    // Warm a real cache server; its layers arrive quickly: no progress.
    let server = kiln_e2e::CacheServer::start().unwrap();
    let warm_state = work.path().join("warm");
    let (events, report) = json_build(&registry, &ctx, &warm_state, &server.url());
    assert!(
        !events.iter().any(|e| e["event"] == "progress"),
        "{events:?}"
    );
    let step = step_at(&report, 2);
    let key = step["key"].as_str().unwrap().to_string();
    let digest = step["layer"].as_str().unwrap().to_string();
    let (status, entry) = server.get(&format!("/v1/entries/{key}")).unwrap();
    assert_eq!(status, 200, "{entry}");
    let hex = digest.trim_start_matches("sha256:");
    let layer = fs::read(
        warm_state
            .join("store/blobs/sha256")
            .join(&hex[..2])
            .join(hex),
    )
    .unwrap();

    // A cache that sends half of line 2's layer and then stalls: line 3
    // needs that layer's files, so the executor waits for it (until its
    // idle timeout) and reports while it waits.
    let hostile = HostileCache::start(
        LookupAnswer::Entries(vec![(key, entry)]),
        std::collections::HashMap::from([(digest.clone(), BlobAnswer::Stall(layer.clone()))]),
    )
    .unwrap();
    let (events, report) = json_build(&registry, &ctx, &work.path().join("cold"), &hostile.url());
    let progress: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["event"] == "progress").collect();
    assert!(progress.len() >= 3, "{events:?}");
    for p in &progress {
        let msg = p["msg"].as_str().unwrap();
        assert!(
            msg.starts_with(&format!("fetching layer {digest} from the cache: ")),
            "{msg}"
        );
        assert!(msg.ends_with("/s"), "the rate: {msg}");
        assert_eq!(p["total"], layer.len() as u64);
        assert!(p["bytes"].as_u64().unwrap() <= layer.len() as u64);
        assert!(p["rate_bytes_per_s"].is_u64());
    }
    for pair in progress.windows(2) {
        const DAY: u64 = 86_400_000;
        let gap = (millis_of(&pair[1]["time"]) + DAY - millis_of(&pair[0]["time"])) % DAY;
        // Every 2 s, never more often; a busy machine may delay a tick, but
        // a CI log must still see one every few seconds.
        assert!(
            (1900..=5000).contains(&gap),
            "one report every 2 s, not more often: {gap} ms"
        );
    }
    // The stalled hit was built instead; the build went on.
    assert_eq!(step_at(&report, 2)["cache"], "miss", "{report:#}");
}
