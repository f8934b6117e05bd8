//! The shared cache over TLS with a private CA, end to end: a real
//! `kiln-cache-server` requiring client certificates and a token, real
//! `kiln-executor` builds against it (`--cache-ca-cert`,
//! `--cache-client-cert`, `--cache-token-file`) and `kiln-cache stats`
//! (`--ca-cert`, `--client-cert`, `--client-key`). A missing CA or client
//! certificate is reported as a certificate problem, not as a server that
//! cannot be reached.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use kiln_e2e::cache_server::{Launch, ServerProcess};
use kiln_e2e::{
    Registry, RegistryAuth, kiln_bin, make_client_certificate, make_test_certificates, push_busybox,
};

/// A TLS cache server (mutual TLS, tokens) on a port it picked, started by
/// the harness's one launcher.
struct TlsServer;

impl TlsServer {
    fn start(dir: &Path, tokens: &Path) -> ServerProcess {
        Launch::new(dir)
            .tls()
            .args([Path::new("--data"), &dir.join("data")])
            .args([Path::new("--tls-cert"), &dir.join("server.pem")])
            .args([Path::new("--tls-key"), &dir.join("server.key")])
            .args([Path::new("--tls-client-ca"), &dir.join("ca.pem")])
            .args([Path::new("--tokens"), tokens])
            .start()
    }
}

struct Env {
    registry: Registry,
    server: ServerProcess,
    dir: tempfile::TempDir,
    token_file: PathBuf,
}

impl Env {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        make_test_certificates(dir.path()).unwrap();
        make_client_certificate(dir.path()).unwrap();
        // One token for builds and admin, made by the admin CLI itself.
        let made = Command::new(kiln_bin("kiln-cache"))
            .args(["token", "create", "--name", "ci", "--output", "json"])
            .args(["--scope", "read", "--scope", "write", "--scope", "admin"])
            .output()
            .unwrap();
        assert!(made.status.success(), "{made:?}");
        let made: serde_json::Value = serde_json::from_slice(&made.stdout).unwrap();
        let tokens = dir.path().join("tokens.toml");
        fs::write(&tokens, made["toml"].as_str().unwrap()).unwrap();
        // As a mounted Secret would hold it: with a trailing newline.
        let token_file = dir.path().join("token");
        fs::write(
            &token_file,
            format!("{}\n", made["token"].as_str().unwrap()),
        )
        .unwrap();

        let registry = Registry::start(RegistryAuth::None).unwrap();
        push_busybox(&registry, dir.path(), "library/busybox:latest", &[]).unwrap();
        let server = TlsServer::start(dir.path(), &tokens);
        Env {
            registry,
            server,
            dir,
            token_file,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn context(&self) -> PathBuf {
        let ctx = self.path("ctx");
        fs::create_dir_all(&ctx).unwrap();
        let base = self.registry.reference("library/busybox:latest");
        fs::write(
            ctx.join("Dockerfile"),
            format!("FROM {base}\nCOPY a.txt /a.txt\n"),
        )
        .unwrap();
        fs::write(ctx.join("a.txt"), "over TLS\n").unwrap();
        ctx
    }

    /// One build with fresh state; stderr goes to a file (as in a pod log).
    fn build(&self, name: &str, tls: &[&str]) -> (Output, String, serde_json::Value) {
        let state = self.path(&format!("state-{name}"));
        let report = self.path(&format!("{name}.report.json"));
        let stderr = self.path(&format!("{name}.stderr"));
        let out = Command::new(kiln_bin("kiln-executor"))
            .arg("--context")
            .arg(self.context())
            .args([
                "--no-push",
                "--reproducible",
                "--destination",
                "kiln.local/tls:v1",
            ])
            .args(["--insecure-registry", &self.registry.host()])
            .args(["--cache-server", &self.server.url])
            .arg("--cache-token-file")
            .arg(&self.token_file)
            .args(tls)
            .arg("--cache-dir")
            .arg(&state)
            .arg("--report")
            .arg(&report)
            .env_remove("KILN_CACHE_TOKEN")
            .env_remove("NO_COLOR")
            .stdin(Stdio::null())
            .stderr(fs::File::create(&stderr).unwrap())
            .output()
            .unwrap();
        let stderr = fs::read(&stderr).unwrap();
        assert!(
            !stderr.contains(&0x1b),
            "colour escapes in a log file: {}",
            String::from_utf8_lossy(&stderr)
        );
        let report = fs::read(&report)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null);
        (out, String::from_utf8_lossy(&stderr).into_owned(), report)
    }

    fn stats(&self, tls: &[&str]) -> Output {
        Command::new(kiln_bin("kiln-cache"))
            .args(["--server", &self.server.url, "--output", "json", "stats"])
            .arg("--token-file")
            .arg(&self.token_file)
            .args(tls)
            .env_remove("KILN_CACHE_TOKEN")
            .output()
            .unwrap()
    }
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn builds_and_the_admin_cli_use_a_cache_server_with_a_private_ca_and_client_certificates() {
    let env = Env::new();
    let ca = env.path("ca.pem");
    let client = format!(
        "{},{}",
        s(&env.path("client.pem")),
        s(&env.path("client.key"))
    );
    let tls = ["--cache-ca-cert", s(&ca), "--cache-client-cert", &client];

    let (out, stderr, first) = env.build("first", &tls);
    assert!(out.status.success(), "{stderr}");
    assert!(!stderr.contains("building without"), "{stderr}");
    assert_eq!(first["summary"]["misses"], 1, "{first}");
    // A second executor with fresh state gets the step from the server.
    let (out, stderr, second) = env.build("second", &tls);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(second["summary"]["hits"], 1, "{second}\n{stderr}");
    assert_eq!(second["image"]["digest"], first["image"]["digest"]);

    let stats = env.stats(&[
        "--ca-cert",
        s(&ca),
        "--client-cert",
        s(&env.path("client.pem")),
        "--client-key",
        s(&env.path("client.key")),
    ]);
    assert!(
        stats.status.success(),
        "{}",
        String::from_utf8_lossy(&stats.stderr)
    );
    let stats: serde_json::Value = serde_json::from_slice(&stats.stdout).unwrap();
    // The server saw both builds' lookups: the first missed (its step, and
    // the mountable image of its base layer), the second hit.
    assert_eq!(stats["lookups_miss"], 2, "{stats}");
    assert_eq!(stats["lookups_hit"], 1, "{stats}");
    assert!(
        !env.server.log_text().contains('\u{1b}'),
        "{}",
        env.server.log_text()
    );
}

#[test]
fn a_missing_ca_or_client_certificate_is_reported_as_a_certificate_problem() {
    let env = Env::new();
    let ca = env.path("ca.pem");
    let client = format!(
        "{},{}",
        s(&env.path("client.pem")),
        s(&env.path("client.key"))
    );

    // The executor builds without the cache and says why.
    let (out, stderr, report) = env.build("no-ca", &["--cache-client-cert", &client]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(report["summary"]["hits"], 0, "{report}");
    assert!(
        stderr.contains("TLS certificate problem") && stderr.contains("--cache-ca-cert"),
        "{stderr}"
    );
    let (out, stderr, _) = env.build("no-client-cert", &["--cache-ca-cert", s(&ca)]);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("certificate") && stderr.contains(s(&ca)),
        "{stderr}"
    );

    // The admin CLI: exit 7, "certificate", and which CAs it trusted.
    let no_ca = env.stats(&[]);
    let text = String::from_utf8_lossy(&no_ca.stderr);
    assert_eq!(no_ca.status.code(), Some(7), "{text}");
    assert!(
        text.contains("certificate")
            && text.contains("--ca-cert")
            && !text.contains("cannot reach"),
        "{text}"
    );
    let no_client_cert = env.stats(&["--ca-cert", s(&ca)]);
    let text = String::from_utf8_lossy(&no_client_cert.stderr);
    assert_eq!(no_client_cert.status.code(), Some(7), "{text}");
    assert!(
        text.contains("certificate") && text.contains(s(&ca)),
        "{text}"
    );
}
