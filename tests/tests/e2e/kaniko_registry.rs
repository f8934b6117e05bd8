//! The registry client as a Kaniko job expects it, end to end: the real
//! `kiln-executor` against real Distribution registries.
//!
//! - Credentials from `config.json` at `$DOCKER_CONFIG`, at the real
//!   `/kaniko/.docker/config.json` (in a private mount namespace), from a
//!   credential helper on `PATH`, and an identity (OAuth2 refresh) token
//!   exchanged at the registry's token server.
//! - `--registry-mirror host/path` asks for `/v2/path/<repo>/...`;
//!   `--registry-map` for any registry, with and without
//!   `--skip-default-registry-fallback`.
//! - Mutual TLS (`--registry-client-cert`) against a registry with
//!   `clientcas`.
//! - The push permission check fails in seconds, before the build, naming
//!   the destination and the config file; skipped with
//!   `--skip-push-permission-check` and `--no-push`.
//! - Transport errors keep their cause: untrusted certificate, plain HTTP
//!   over HTTPS and the other way round, connection refused, DNS.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_e2e::kaniko_registry::{
    KanikoMount, MtlsRegistry, basic_auth_field, write_credential_helper, write_docker_config,
};
use kiln_e2e::{Registry, RegistryAuth, TokenServer, kiln_bin, push_busybox};
use serde_json::json;

/// A job's files: a context with a Dockerfile, a HOME without Docker
/// config, state and scratch directories.
struct Job {
    dir: tempfile::TempDir,
}

struct Ran {
    out: Output,
    stderr: String,
    took: Duration,
}

impl Ran {
    fn ok(&self) -> &Self {
        assert!(
            self.out.status.success(),
            "kiln-executor failed:\n{}",
            self.stderr
        );
        self
    }

    fn failed(&self) -> &Self {
        assert!(
            !self.out.status.success(),
            "kiln-executor succeeded but should not:\n{}",
            self.stderr
        );
        self
    }

    fn says(&self, text: &str) -> &Self {
        assert!(
            self.stderr.contains(text),
            "expected {text:?} in:\n{}",
            self.stderr
        );
        self
    }
}

impl Job {
    fn new(dockerfile: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ctx = dir.path().join("ctx");
        fs::create_dir_all(&ctx).unwrap();
        fs::write(ctx.join("Dockerfile"), dockerfile).unwrap();
        fs::write(ctx.join("a.txt"), "kaniko job\n").unwrap();
        fs::create_dir_all(dir.path().join("home")).unwrap();
        Job { dir }
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// The executor's command line with this job's context and state; no
    /// `DOCKER_CONFIG`, a HOME without `.docker`.
    fn command(&self, program: Command, args: &[&str]) -> Command {
        let mut cmd = program;
        cmd.arg("--context")
            .arg(self.path("ctx"))
            .args(["--cache=false", "--cache-dir"])
            .arg(self.path("state"))
            .args(args)
            .env_remove("DOCKER_CONFIG")
            .env_remove("KANIKO_REGISTRY_MIRROR")
            .env_remove("KANIKO_REGISTRY_MAP")
            .env("HOME", self.path("home"))
            .stdin(Stdio::null());
        cmd
    }

    fn run_command(&self, mut cmd: Command) -> Ran {
        let started = Instant::now();
        let out = cmd.output().expect("running kiln-executor");
        Ran {
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            out,
            took: started.elapsed(),
        }
    }

    fn run(&self, args: &[&str], env: &[(&str, &str)]) -> Ran {
        let mut cmd = self.command(Command::new(kiln_bin("kiln-executor")), args);
        cmd.envs(env.iter().copied());
        self.run_command(cmd)
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

const SCRATCH: &str = "FROM scratch\nCOPY a.txt /a.txt\n";

#[test]
fn credentials_from_docker_config_dir_push_to_a_tls_registry_with_basic_auth() {
    let reg = Registry::start_tls(RegistryAuth::basic("alice", "s3cret")).unwrap();
    let job = Job::new(SCRATCH);
    let host = reg.host();
    let dc = job.path("docker-config");
    write_docker_config(
        &dc,
        &json!({"auths": {host.clone(): {"auth": basic_auth_field("alice", "s3cret")}}}),
    )
    .unwrap();
    let ca = format!("{host}={}", reg.ca_certificate().display());
    job.run(
        &["--registry-certificate", &ca, "-d", &reg.reference("app:1")],
        &[("DOCKER_CONFIG", s(&dc))],
    )
    .ok();
    reg.skopeo_inspect("app:1").unwrap();
    // Kaniko's permission check ran first: an upload started and cancelled.
    let log = reg.log();
    assert!(log.contains("\"DELETE /v2/app/blobs/uploads/"), "{log}");
}

#[test]
fn credentials_at_the_real_kaniko_path_are_read() {
    let reg = Registry::start_tls(RegistryAuth::token("bob", "pw")).unwrap();
    let job = Job::new(SCRATCH);
    let kaniko = job.path("kaniko");
    write_docker_config(
        &kaniko.join(".docker"),
        &json!({"auths": {reg.host(): {"username": "bob", "password": "pw"}}}),
    )
    .unwrap();
    let mount = KanikoMount::new(&kaniko).unwrap();
    let ca = format!("{}={}", reg.host(), reg.ca_certificate().display());
    let cmd = job.command(
        mount.command(&kiln_bin("kiln-executor")),
        &[
            "--registry-certificate",
            &ca,
            "-d",
            &reg.reference("team/app:1"),
        ],
    );
    job.run_command(cmd).ok();
    reg.skopeo_inspect("team/app:1").unwrap();
    assert!(
        reg.token_requests()
            .iter()
            .any(|r| r.contains("repository:team/app:pull,push")),
        "{:?}",
        reg.token_requests()
    );
    // Without the mount, nothing is found, and the error says where it looked.
    job.run(
        &[
            "--registry-certificate",
            &ca,
            "-d",
            &reg.reference("team/app:2"),
        ],
        &[],
    )
    .failed()
    .says("no Docker config found")
    .says("/kaniko/.docker/config.json")
    .says(&format!("registry {}", reg.host()));
}

#[test]
fn a_credential_helper_on_path_is_asked_with_the_server_on_stdin() {
    let reg = Registry::start_tls(RegistryAuth::basic("carol", "helper-pw")).unwrap();
    let job = Job::new(SCRATCH);
    let bin = job.path("bin");
    write_credential_helper(&bin, "test", "carol", "helper-pw").unwrap();
    let dc = job.path("docker-config");
    write_docker_config(&dc, &json!({"credHelpers": {reg.host(): "test"}})).unwrap();
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let ca = format!("{}={}", reg.host(), reg.ca_certificate().display());
    job.run(
        &["--registry-certificate", &ca, "-d", &reg.reference("app:1")],
        &[("DOCKER_CONFIG", s(&dc)), ("PATH", &path)],
    )
    .ok();
    reg.skopeo_inspect("app:1").unwrap();
    let asked = fs::read_to_string(bin.join("test.log")).unwrap();
    assert!(asked.lines().all(|l| l == reg.host()), "{asked}");
    assert!(!asked.is_empty());
}

#[test]
fn an_identity_token_is_exchanged_for_access_tokens_at_the_realm() {
    let reg = Registry::start_tls(RegistryAuth::token("dave", "unused-password")).unwrap();
    let job = Job::new(SCRATCH);
    let dc = job.path("docker-config");
    write_docker_config(
        &dc,
        &json!({"auths": {reg.host(): {
            "auth": basic_auth_field("00000000-0000-0000-0000-000000000000", ""),
            "identitytoken": TokenServer::refresh_token("dave"),
        }}}),
    )
    .unwrap();
    let ca = format!("{}={}", reg.host(), reg.ca_certificate().display());
    job.run(
        &["--registry-certificate", &ca, "-d", &reg.reference("app:1")],
        &[("DOCKER_CONFIG", s(&dc))],
    )
    .ok();
    // Taken before skopeo (which logs in with the password) asks too.
    let requests = reg.token_requests();
    reg.skopeo_inspect("app:1").unwrap();
    assert!(
        requests
            .iter()
            .any(|r| r.starts_with("oauth2 refresh_token:")
                && r.contains("repository:app:pull,push")),
        "{requests:?}"
    );
    assert!(
        requests
            .iter()
            .all(|r| r.starts_with("oauth2 refresh_token:")),
        "no password grant: {requests:?}"
    );
    // A wrong refresh token is refused, naming the file it came from.
    write_docker_config(
        &dc,
        &json!({"auths": {reg.host(): {"identitytoken": "stale"}}}),
    )
    .unwrap();
    job.run(
        &["--registry-certificate", &ca, "-d", &reg.reference("app:2")],
        &[("DOCKER_CONFIG", s(&dc))],
    )
    .failed()
    .says("an identity token")
    .says(s(&dc.join("config.json")));
}

#[test]
fn a_registry_mirror_path_is_a_repository_prefix() {
    let mirror = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&mirror, work.path(), "pfx/library/busybox:latest", &[]).unwrap();
    let job = Job::new("FROM busybox\nCOPY a.txt /a.txt\n");
    let flag = format!("{}/pfx", mirror.host());
    // No internet: success means the mirror served it.
    job.run(
        &[
            "--registry-mirror",
            &flag,
            "--insecure-registry",
            &mirror.host(),
            "--no-push",
        ],
        &[],
    )
    .ok();
    let log = mirror.log();
    assert!(
        log.contains("\"GET /v2/pfx/library/busybox/manifests/latest"),
        "{log}"
    );
    // The same from Kaniko's environment variable (several, `;`-separated).
    let job = Job::new("FROM busybox\nCOPY a.txt /a.txt\n");
    let env = format!("127.0.0.1:1/none;{flag}");
    job.run(
        &[
            "--insecure-registry",
            &mirror.host(),
            "--no-push",
            "--insecure-registry",
            "127.0.0.1:1",
        ],
        &[("KANIKO_REGISTRY_MIRROR", &env)],
    )
    .ok()
    .says("127.0.0.1:1");
}

#[test]
fn a_registry_map_is_tried_first_and_falls_back_unless_told_not_to() {
    let orig = Registry::start(RegistryAuth::None).unwrap();
    let mirror = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&orig, work.path(), "base:1", &[]).unwrap();
    let dockerfile = format!("FROM {}\nCOPY a.txt /a.txt\n", orig.reference("base:1"));
    let map = format!("{}={}/cache", orig.host(), mirror.host());
    let common = [
        "--registry-map",
        &map,
        "--insecure-registry",
        &orig.host(),
        "--insecure-registry",
        &mirror.host(),
        "--no-push",
    ];
    let orig_manifest_gets = || orig.log().matches("\"GET /v2/base/manifests/1").count();

    let before = orig_manifest_gets();
    let job = Job::new(&dockerfile);
    job.run(&common, &[]).ok();
    assert!(
        mirror.log().contains("\"GET /v2/cache/base/manifests/1"),
        "{}",
        mirror.log()
    );
    assert!(
        orig_manifest_gets() > before,
        "fell back to the registry itself"
    );

    let before = orig_manifest_gets();
    let job = Job::new(&dockerfile);
    let mut args = common.to_vec();
    args.push("--skip-default-registry-fallback");
    job.run(&args, &[])
        .failed()
        .says("--skip-default-registry-fallback")
        .says("/v2/cache/base/manifests/1");
    assert_eq!(
        orig_manifest_gets(),
        before,
        "the registry itself was not asked"
    );

    push_busybox(&mirror, work.path(), "cache/base:1", &[]).unwrap();
    let job = Job::new(&dockerfile);
    job.run(&args, &[]).ok();
    assert_eq!(orig_manifest_gets(), before, "served by the mirror alone");
}

#[test]
fn a_registry_requiring_client_certificates_gets_the_one_given_for_it() {
    let reg = MtlsRegistry::start().unwrap();
    let job = Job::new(SCRATCH);
    let host = reg.host();
    let (cert, key) = reg.client_identity();
    let ca = format!("{host}={}", reg.ca().display());
    let identity = format!("{host}={},{}", cert.display(), key.display());
    let dest = format!("{host}/app:1");
    job.run(
        &[
            "--registry-certificate",
            &ca,
            "--registry-client-cert",
            &identity,
            "-d",
            &dest,
        ],
        &[],
    )
    .ok();
    assert!(
        reg.log().contains("\"PUT /v2/app/manifests/1"),
        "{}",
        reg.log()
    );
    // A client certificate for another registry is not presented here.
    let other = format!("127.0.0.1:1={},{}", cert.display(), key.display());
    let ran = job.run(
        &[
            "--registry-certificate",
            &ca,
            "--registry-client-cert",
            &other,
            "-d",
            &dest,
        ],
        &[],
    );
    ran.failed()
        .says("certificate")
        .says("--registry-client-cert");
}

#[test]
fn the_push_permission_check_fails_in_seconds_before_the_build() {
    let reg = Registry::start_tls(RegistryAuth::basic("erin", "right")).unwrap();
    let job = Job::new(SCRATCH);
    let dc = job.path("docker-config");
    let config = write_docker_config(
        &dc,
        &json!({"auths": {reg.host(): {"auth": basic_auth_field("erin", "wrong")}}}),
    )
    .unwrap();
    let ca = format!("{}={}", reg.host(), reg.ca_certificate().display());
    let dest = reg.reference("app:1");
    let env = [("DOCKER_CONFIG", s(&dc))];
    let ran = job.run(&["--registry-certificate", &ca, "-d", &dest], &env);
    ran.failed()
        .says("push permission check")
        .says(&dest)
        .says("as erin (Docker config")
        .says(s(&config));
    assert!(ran.took < Duration::from_secs(10), "took {:?}", ran.took);
    assert!(
        !ran.stderr.contains("COPY a.txt"),
        "the build started:\n{}",
        ran.stderr
    );

    // Skipped: the build runs and the push fails at the end, same message.
    let ran = job.run(
        &[
            "--registry-certificate",
            &ca,
            "-d",
            &dest,
            "--skip-push-permission-check",
        ],
        &env,
    );
    ran.failed().says("COPY a.txt").says(s(&config));
    assert!(
        !ran.stderr.contains("push permission check"),
        "{}",
        ran.stderr
    );
    // Not pushing: nothing to check.
    job.run(
        &["--registry-certificate", &ca, "-d", &dest, "--no-push"],
        &env,
    )
    .ok();
}

#[test]
fn transport_errors_say_what_went_wrong_and_which_flag_helps() {
    let job = Job::new(SCRATCH);
    let tls = Registry::start_tls(RegistryAuth::None).unwrap();
    let plain = Registry::start(RegistryAuth::None).unwrap();

    job.run(&["-d", &tls.reference("app:1")], &[])
        .failed()
        .says("certificate")
        .says("trusted CA certificates: the default ones")
        .says(&format!("--registry-certificate {}=", tls.host()));
    // The CA named is part of the message when the certificate still fails
    // (here: a CA that did not sign it).
    let wrong_ca = format!("{}={}", tls.host(), s(&plain_ca(&job)));
    job.run(
        &[
            "--registry-certificate",
            &wrong_ca,
            "-d",
            &tls.reference("app:1"),
        ],
        &[],
    )
    .failed()
    .says("certificate")
    .says(s(&plain_ca(&job)));

    job.run(&["-d", &plain.reference("app:1")], &[])
        .failed()
        .says("plain-HTTP registry")
        .says(&format!("--insecure-registry {}", plain.host()));
    job.run(
        &[
            "--insecure-registry",
            &tls.host(),
            "-d",
            &tls.reference("app:1"),
        ],
        &[],
    )
    .failed()
    .says("serves HTTPS");

    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    job.run(
        &[
            "--insecure-registry",
            &format!("127.0.0.1:{closed}"),
            "-d",
            &format!("127.0.0.1:{closed}/app:1"),
        ],
        &[],
    )
    .failed()
    .says("connection refused")
    .says(&format!("http://127.0.0.1:{closed}/v2/app/blobs/uploads/"));

    job.run(&["-d", "kiln-test.invalid/app:1"], &[])
        .failed()
        .says("DNS lookup of kiln-test.invalid failed")
        .says("https://kiln-test.invalid/v2/app/blobs/uploads/");
}

/// A CA certificate that signed nothing the test registries use.
fn plain_ca(job: &Job) -> PathBuf {
    let dir = job.path("other-ca");
    if !dir.join("ca.pem").exists() {
        fs::create_dir_all(&dir).unwrap();
        kiln_e2e::make_test_certificates(&dir).unwrap();
    }
    dir.join("ca.pem")
}
