//! The robust edges: what a flood of idle clients does to the cache server,
//! what concurrent builds on one `--cache-dir` do to each other, what other
//! local users can reach in it, how a failed build exits, and what FIFOs and
//! bytes that are not UTF-8 in a context do. Real `kiln-cache-server` and
//! `kiln-executor` processes throughout.

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::cache_server::{Launch, ServerProcess};
use kiln_e2e::{kiln_bin, run, unmount_below};

/// Runs kiln-executor with `--cache-dir state`, killing it after `limit`
/// (a hang is a failure, not a stuck test).
fn executor_within(args: &[&str], state: &Path, limit: Duration) -> Output {
    let child = Command::new(kiln_bin("kiln-executor"))
        .args(args)
        .arg("--cache-dir")
        .arg(state)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting kiln-executor");
    wait_within(child, limit)
}

fn wait_within(mut child: Child, limit: Duration) -> Output {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if child.try_wait().expect("waiting for a child").is_some() {
            return child.wait_with_output().expect("collecting output");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let out = child.wait_with_output().expect("collecting output");
    panic!(
        "still running after {limit:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// A context holding the static busybox as `busybox`, for `FROM scratch`
/// builds that run something without a registry.
fn context(dir: &Path, dockerfile: &str) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    fs::copy("/bin/busybox", dir.join("busybox")).expect("busybox-static");
    fs::write(dir.join("Dockerfile"), dockerfile).unwrap();
    dir.to_path_buf()
}

// ---------------------------------------------------------------------------
// The cache server under a flood of idle connections.

/// `kiln-cache-server` with a 256-file limit and a 1 s header timeout,
/// started by the harness's one launcher behind `prlimit` (which execs it:
/// the pid is the server's).
struct LimitedServer {
    process: ServerProcess,
    port: u16,
    tls: bool,
    _dir: tempfile::TempDir,
}

impl LimitedServer {
    fn start(tls: bool) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut launch = Launch::program(dir.path(), Path::new("prlimit"))
            .args(["--nofile=256:256"])
            .args([kiln_bin("kiln-cache-server")]);
        let port_file = launch.port_file().to_owned();
        launch = launch
            .args(["--listen", "127.0.0.1:0", "--header-read-timeout", "1s"])
            .args([Path::new("--port-file"), &port_file])
            .args([Path::new("--data"), &dir.path().join("data")]);
        if tls {
            let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
            run(Command::new("openssl")
                .args([
                    "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                ])
                .args([
                    "-subj",
                    "/CN=127.0.0.1",
                    "-addext",
                    "subjectAltName=IP:127.0.0.1",
                ])
                .arg("-keyout")
                .arg(&key)
                .arg("-out")
                .arg(&cert)
                .stderr(Stdio::null()))
            .unwrap();
            launch = launch.args([Path::new("--tls-cert"), &cert, Path::new("--tls-key"), &key]);
            launch = launch.tls();
        }
        let process = launch.start();
        let server = LimitedServer {
            port: process.port,
            process,
            tls,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while server.healthz(Duration::from_secs(2)).is_err() {
            assert!(Instant::now() < deadline, "not healthy: {}", server.log());
            std::thread::sleep(Duration::from_millis(100));
        }
        server
    }

    fn log(&self) -> String {
        self.process.log_text()
    }

    /// GET /healthz with curl (plain or TLS), within `limit`.
    fn healthz(&self, limit: Duration) -> Result<String, String> {
        let scheme = if self.tls { "https" } else { "http" };
        let out = Command::new("curl")
            .args(["-sS", "-k", "--max-time"])
            .arg(format!("{}", limit.as_secs_f64()))
            .arg(format!("{scheme}://127.0.0.1:{}/healthz", self.port))
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    /// User plus system CPU time of the server, from /proc.
    fn cpu_time(&self) -> Duration {
        let stat = fs::read_to_string(format!("/proc/{}/stat", self.process.pid())).unwrap();
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .unwrap()
            .1
            .split_whitespace()
            .collect();
        let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
        // USER_HZ is 100 on every Linux this runs on.
        Duration::from_millis(ticks * 10)
    }
}

/// Opens `n` connections that never finish a request: half send nothing,
/// half a request head that stops in the middle.
fn half_open(port: u16, n: usize) -> Vec<TcpStream> {
    (0..n)
        .map(|i| {
            let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connect");
            if i % 2 == 1 {
                let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ");
            }
            s
        })
        .collect()
}

fn flood_does_not_stop_service(tls: bool) {
    let server = LimitedServer::start(tls);
    // More than the whole file table of the server.
    let mut idle = half_open(server.port, 300);
    let cpu_before = server.cpu_time();
    let started = Instant::now();
    let answer = server.healthz(Duration::from_secs(20));
    let waited = started.elapsed();
    assert!(
        answer.as_deref().is_ok_and(|b| b.contains("ok")),
        "healthz during the flood: {answer:?} after {waited:?}\n{}",
        server.log()
    );
    // Served once the header timeout freed slots, not at once and not never.
    assert!(waited < Duration::from_secs(15), "{waited:?}");
    // Idle clients were closed by the server, not left hanging.
    let mut closed = 0;
    for s in idle.iter_mut().take(20) {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // EOF or a reset, possibly after a last word (an alert, a 408).
        let mut buf = [0u8; 512];
        for _ in 0..3 {
            match s.read(&mut buf) {
                Ok(0) => {
                    closed += 1;
                    break;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                    closed += 1;
                    break;
                }
                Err(_) => break,
            }
        }
    }
    assert_eq!(closed, 20, "idle connections the server closed of 20");
    // Waiting out timeouts and a full file table costs no CPU to speak of.
    let cpu = server.cpu_time() - cpu_before;
    assert!(
        cpu < Duration::from_secs(2),
        "the server used {cpu:?} of CPU during the flood"
    );
    drop(idle);
    assert!(server.healthz(Duration::from_secs(10)).is_ok());
}

#[test]
fn half_open_connections_beyond_the_file_limit_do_not_stop_the_cache_server() {
    flood_does_not_stop_service(false);
}

#[test]
fn half_open_connections_do_not_stop_the_tls_listener() {
    flood_does_not_stop_service(true);
}

#[test]
fn an_upload_that_stalls_fails_after_the_body_read_timeout() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Launch::new(dir.path())
        .args([Path::new("--data"), &dir.path().join("data")])
        .args(["--body-read-timeout", "1s"])
        .start();
    let mut s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
    let digest = format!("sha256:{}", "ab".repeat(32));
    write!(
        s,
        "PUT /v1/blobs/{digest} HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nonly some bytes"
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let started = Instant::now();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let waited = started.elapsed();
    server.kill9();
    assert!(
        waited < Duration::from_secs(10),
        "the stalled upload held the connection for {waited:?}"
    );
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 4") || answer.starts_with("HTTP/1.1 5"),
        "{answer}"
    );
}

// ---------------------------------------------------------------------------
// One --cache-dir, several builds.

#[test]
fn eight_concurrent_builds_on_one_cache_dir_all_succeed_with_one_digest() {
    let work = tempfile::tempdir().unwrap();
    let ctx = context(
        &work.path().join("ctx"),
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox mkdir -p /out && /bin/busybox echo built > /out/a\"]\n\
         COPY Dockerfile /out/Dockerfile\n",
    );
    let state = work.path().join("state");
    let ctx_arg = ctx.display().to_string();
    let builds: Vec<Child> = (0..8)
        .map(|_| {
            Command::new(kiln_bin("kiln-executor"))
                .args(["--context", &ctx_arg, "--no-push", "--reproducible"])
                .arg("--cache-dir")
                .arg(&state)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    let outputs: Vec<Output> = builds
        .into_iter()
        .map(|c| wait_within(c, Duration::from_secs(300)))
        .collect();
    unmount_below(&state);
    let mut digests = Vec::new();
    for out in &outputs {
        let err = stderr(out);
        assert!(out.status.success(), "a concurrent build failed:\n{err}");
        let digest = err
            .lines()
            .find_map(|l| l.strip_prefix("kiln-executor: built "))
            .unwrap_or_else(|| panic!("no digest in:\n{err}"))
            .to_string();
        digests.push(digest);
    }
    digests.dedup();
    assert_eq!(digests.len(), 1, "{digests:?}");
    // Nothing half-made left in the layer store.
    for entry in fs::read_dir(state.join("layers")).unwrap() {
        let name = entry.unwrap().file_name();
        assert!(
            !name.to_string_lossy().starts_with(".tmp"),
            "left behind: {name:?}"
        );
    }
}

#[test]
fn the_layer_store_and_scratch_space_are_owner_only() {
    let work = tempfile::tempdir().unwrap();
    let ctx = context(
        &work.path().join("ctx"),
        "FROM scratch\nCOPY busybox /bin/busybox\n\
         RUN [\"/bin/busybox\", \"sh\", \"-c\", \"/bin/busybox cp /bin/busybox /su && /bin/busybox chmod 4755 /su\"]\n",
    );
    let state = work.path().join("state");
    // As an older kiln left them: world-traversable.
    for sub in ["layers", "work"] {
        fs::create_dir_all(state.join(sub)).unwrap();
        fs::set_permissions(state.join(sub), fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = executor_within(
        &["--context", &ctx.display().to_string(), "--no-push"],
        &state,
        Duration::from_secs(120),
    );
    unmount_below(&state);
    assert!(out.status.success(), "{}", stderr(&out));
    for sub in ["layers", "work", "store", "run-cache", "cache"] {
        let mode = fs::metadata(state.join(sub)).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o700, "{sub} has mode {mode:o}");
    }
    // The setuid binary is in there, behind the 0700 directory.
    let setuid = fs::read_dir(state.join("layers"))
        .unwrap()
        .filter_map(|e| fs::metadata(e.unwrap().path().join("su")).ok())
        .any(|m| m.permissions().mode() & 0o4000 != 0);
    assert!(setuid, "the RUN layer with the setuid file is in layers/");
}

// ---------------------------------------------------------------------------
// Exits.

/// `len` bytes that do not compress (xorshift), different for each `seed`.
fn incompressible(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len / 8)
        .flat_map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()
        })
        .collect()
}

const FAILING_AFTER_A_BIG_COPY: &str = "FROM scratch\nCOPY busybox /bin/busybox\nCOPY big /big\n\
     RUN [\"/bin/busybox\", \"false\"]\n";

#[test]
fn a_failed_build_finishes_the_uploads_of_the_steps_that_succeeded() {
    // The upload of the big layer runs in the background while the RUN
    // fails at once. A process that exits under it both loses the upload
    // and, now and then, aborts in RocksDB (exit 134).
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&work.path().join("ctx"), FAILING_AFTER_A_BIG_COPY);
    fs::write(ctx.join("big"), incompressible(64 << 20, 1)).unwrap();
    let state = work.path().join("state");
    let args = ["--context", ctx.to_str().unwrap(), "--no-push"];
    let out = executor_within(&args, &state, Duration::from_secs(300));
    unmount_below(&state);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    fs::write(
        ctx.join("Dockerfile"),
        FAILING_AFTER_A_BIG_COPY.replace("\"false\"", "\"true\""),
    )
    .unwrap();
    let out = executor_within(&args, &state, Duration::from_secs(300));
    unmount_below(&state);
    let err = stderr(&out);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("cache: 2 of 3 steps found"), "{err}");
}

#[test]
fn failed_builds_exit_1_and_never_abort_while_uploads_run() {
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&work.path().join("ctx"), FAILING_AFTER_A_BIG_COPY);
    let mut aborts = Vec::new();
    let runs = 20;
    for i in 0..runs {
        // New content each time: nothing is a cache hit, every run uploads.
        fs::write(ctx.join("big"), incompressible(8 << 20, i + 2)).unwrap();
        let state = work.path().join(format!("state-{i}"));
        let out = executor_within(
            &["--context", &ctx.display().to_string(), "--no-push"],
            &state,
            Duration::from_secs(120),
        );
        unmount_below(&state);
        let _ = fs::remove_dir_all(&state);
        let err = stderr(&out);
        match out.status.code() {
            Some(1) => assert!(err.contains("Dockerfile:4: RUN"), "{err}"),
            other => aborts.push(format!("run {i}: exit {other:?}: {err}")),
        }
    }
    assert!(
        aborts.is_empty(),
        "{} of {runs}:\n{}",
        aborts.len(),
        aborts.join("\n")
    );
}

// ---------------------------------------------------------------------------
// FIFOs in the context.

fn mkfifo(path: &Path) {
    run(Command::new("mkfifo").arg(path)).unwrap();
}

#[test]
fn a_fifo_named_dockerignore_is_refused_not_waited_on() {
    let work = tempfile::tempdir().unwrap();
    let ctx = context(
        &work.path().join("ctx"),
        "FROM scratch\nCOPY busybox /bin/busybox\n",
    );
    mkfifo(&ctx.join(".dockerignore"));
    let out = executor_within(
        &["--context", &ctx.display().to_string(), "--no-push"],
        &work.path().join("state"),
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains(".dockerignore") && err.contains("FIFO"),
        "{err}"
    );
}

#[test]
fn a_fifo_named_dockerfile_is_refused_not_waited_on() {
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    mkfifo(&ctx.join("Dockerfile"));
    for extra in [&["--dry-run"][..], &["--no-push"][..]] {
        let mut args = vec!["--context", ctx.to_str().unwrap()];
        args.extend_from_slice(extra);
        let out = executor_within(&args, &work.path().join("state"), Duration::from_secs(60));
        let err = stderr(&out);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("Dockerfile") && err.contains("FIFO"), "{err}");
    }
}

#[test]
fn fifos_elsewhere_in_the_context_are_skipped_by_copy() {
    let work = tempfile::tempdir().unwrap();
    let ctx = context(&work.path().join("ctx"), "FROM scratch\nCOPY . /ctx/\n");
    mkfifo(&ctx.join("pipe"));
    let layout = work.path().join("layout");
    let out = executor_within(
        &[
            "--context",
            ctx.to_str().unwrap(),
            "--no-push",
            "--oci-layout-path",
            layout.to_str().unwrap(),
        ],
        &work.path().join("state"),
        Duration::from_secs(120),
    );
    assert!(out.status.success(), "{}", stderr(&out));
}

// ---------------------------------------------------------------------------
// Bytes that are not UTF-8 in a Dockerfile.

fn dry_run_of(dockerfile: &[u8]) -> Output {
    let work = tempfile::tempdir().unwrap();
    fs::write(work.path().join("Dockerfile"), dockerfile).unwrap();
    executor_within(
        &["--context", work.path().to_str().unwrap(), "--dry-run"],
        &work.path().join("state"),
        Duration::from_secs(60),
    )
}

#[test]
fn invalid_utf8_in_a_comment_is_accepted() {
    let out = dry_run_of(b"# caf\xe9 au lait\nFROM scratch\n  # \xff\xfe\nENV A=1\n");
    assert!(out.status.success(), "{}", stderr(&out));
}

#[test]
fn invalid_utf8_in_an_instruction_names_line_and_column_once() {
    let out = dry_run_of(b"FROM scratch\n# fine\nRUN echo caf\xe9\n");
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(
        err.contains("Dockerfile:3:13: invalid UTF-8 (byte 0xe9)"),
        "{err}"
    );
    assert_eq!(err.matches("invalid UTF-8").count(), 1, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
}

#[test]
fn no_cause_is_printed_twice() {
    // A Dockerfile that cannot be read: its cause (an I/O error) is in the
    // message once.
    let work = tempfile::tempdir().unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(ctx.join("Dockerfile")).unwrap();
    let out = executor_within(
        &["--context", ctx.to_str().unwrap(), "--dry-run"],
        &work.path().join("state"),
        Duration::from_secs(60),
    );
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    let cause = err.rsplit(": ").next().unwrap().trim();
    assert_eq!(err.matches(cause).count(), 1, "{err}");
}
