//! A real S3-compatible server (s3s-fs, installed from crates.io, see
//! docs/object-storage.md) on 127.0.0.1 for the object-storage tests, and
//! `kiln-cache-server` replicas pointed at it. Every process is killed and
//! every directory removed when its guard drops.
//!
//! When the s3s-fs binary is missing the tests skip with a loud message,
//! unless `KILN_REQUIRE_S3` is set (CI sets it after installing), in which
//! case they fail.

#![allow(dead_code)]

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kiln_cache_server::objstore::Bucket;
use object_store::aws::AmazonS3Builder;

pub const ACCESS_KEY: &str = "kiln-test-access";
pub const SECRET_KEY: &str = "kiln-test-secret-key";
pub const BUCKET: &str = "kiln-cache";
pub const SERVER: &str = env!("CARGO_BIN_EXE_kiln-cache-server");

/// Where s3s-fs is: `$KILN_S3S_FS`, `/opt/kiln-tools/bin/s3s-fs`, or PATH.
pub fn s3s_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("KILN_S3S_FS") {
        return Some(PathBuf::from(p)).filter(|p| p.is_file());
    }
    let installed = PathBuf::from("/opt/kiln-tools/bin/s3s-fs");
    if installed.is_file() {
        return Some(installed);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("s3s-fs"))
            .find(|p| p.is_file())
    })
}

/// A running s3s-fs with one empty bucket; killed on drop.
pub struct S3Server {
    child: Option<Child>,
    pub endpoint: String,
    pub root: tempfile::TempDir,
    log: PathBuf,
}

impl S3Server {
    /// Starts s3s-fs, or returns `None` (after saying so loudly) when it is
    /// not installed and `KILN_REQUIRE_S3` is unset.
    pub fn start(test: &str) -> Option<S3Server> {
        let Some(binary) = s3s_binary() else {
            if std::env::var_os("KILN_REQUIRE_S3").is_some() {
                panic!(
                    "KILN_REQUIRE_S3 is set but s3s-fs is not installed; run: \
                     cargo install --locked s3s-fs --version 0.14.1 --features binary --root /opt/kiln-tools"
                );
            }
            // Straight to the stderr handle, past the test harness's output
            // capture: a skip must be seen in a normal `cargo test` run.
            let _ = std::io::Write::write_all(
                &mut std::io::stderr(),
                format!(
                    "\n!!!!! SKIPPED {test}: no S3-compatible server (s3s-fs) installed.\n\
                     !!!!! Install it with: cargo install --locked s3s-fs --version 0.14.1 --features binary --root /opt/kiln-tools\n\
                     !!!!! (set KILN_REQUIRE_S3=1 to make this a failure)\n"
                )
                .as_bytes(),
            );
            return None;
        };
        let root = tempfile::tempdir().unwrap();
        let data = root.path().join("data");
        // s3s-fs maps a bucket to a directory under its root.
        fs::create_dir_all(data.join(BUCKET)).unwrap();
        let log = root.path().join("s3s-fs.log");
        let child = Command::new(&binary)
            .args(["--host", "127.0.0.1", "--port", "0"])
            .args(["--access-key", ACCESS_KEY, "--secret-key", SECRET_KEY])
            .arg(&data)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(fs::File::create(&log).unwrap())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
        let mut server = S3Server {
            child: Some(child),
            endpoint: String::new(),
            root,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let text = fs::read_to_string(&server.log).unwrap_or_default();
            if let Some(port) = text
                .split("http://127.0.0.1:")
                .nth(1)
                .map(|rest| {
                    rest.chars()
                        .take_while(char::is_ascii_digit)
                        .collect::<String>()
                })
                .filter(|p| !p.is_empty())
            {
                server.endpoint = format!("http://127.0.0.1:{port}");
                return Some(server);
            }
            if let Some(status) = server.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("s3s-fs exited early ({status}):\n{text}");
            }
            assert!(Instant::now() < deadline, "s3s-fs did not start:\n{text}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A client of the test bucket under `prefix`, for looking inside.
    pub fn bucket(&self, prefix: &str) -> Bucket {
        let s3 = AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap();
        Bucket::new(Arc::new(s3), prefix, 5 << 20)
    }

    /// Object keys in the bucket (relative to the bucket).
    pub async fn keys(&self) -> Vec<String> {
        let mut keys: Vec<String> = self
            .bucket("")
            .list_all()
            .await
            .unwrap()
            .into_iter()
            .map(|m| m.location.to_string())
            .collect();
        keys.sort();
        keys
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A `kiln-cache-server` replica on the test bucket; SIGKILLed on drop.
pub struct Replica {
    child: Option<Child>,
    pub url: String,
    pub data: tempfile::TempDir,
    log: PathBuf,
}

impl Replica {
    /// Starts a replica with `--storage s3://BUCKET/prefix` plus `extra`.
    pub fn start(s3: &S3Server, prefix: &str, extra: &[&str]) -> Replica {
        let data = tempfile::tempdir().unwrap();
        let port_file = data.path().join("port");
        let log = data.path().join("server.log");
        let child = Command::new(SERVER)
            .args(["--listen", "127.0.0.1:0", "--gc-interval", "0", "--data"])
            .arg(data.path().join("data"))
            .arg("--port-file")
            .arg(&port_file)
            .args(["--storage", &format!("s3://{BUCKET}/{prefix}")])
            .args(["--s3-endpoint", &s3.endpoint, "--s3-region", "us-east-1"])
            .args(extra)
            .env("AWS_ACCESS_KEY_ID", ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
            .env_remove("AWS_SESSION_TOKEN")
            .env_remove("AWS_PROFILE")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut replica = Replica {
            child: Some(child),
            url: String::new(),
            data,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(text) = fs::read_to_string(&port_file)
                && let Ok(port) = text.trim().parse::<u16>()
            {
                replica.url = format!("http://127.0.0.1:{port}");
                return replica;
            }
            if let Some(status) = replica.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("replica exited early ({status}):\n{}", replica.log_text());
            }
            assert!(
                Instant::now() < deadline,
                "replica did not start:\n{}",
                replica.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn data_dir(&self) -> &Path {
        self.data.path()
    }

    /// `kill -9` and reap.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("---- replica {} log ----\n{}", self.url, self.log_text());
        }
    }
}
