//! The one launcher of `kiln-cache-server` processes for every test in the
//! workspace: the end-to-end tests ([`crate::CacheServer`], the replicas of
//! [`crate::s3`] and [`crate::azurite`], the TLS and flood tests) and the
//! cache server's own integration tests (`cache-server/tests/server/`).
//!
//! Promises: a [`Launch`] starts the server with its log in a file and a
//! port file it writes once it listens, and returns only when it listens
//! (the port read from that file), or panics with the server's log when it
//! exits early or takes longer than 60 s. The [`ServerProcess`] it returns is
//! SIGKILLed and reaped on drop, and prints its log when the test panics.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::Result;

/// How long a server may take to listen (a busy 2-core CI machine runs
/// several test binaries' worth of processes at once).
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A `kiln-cache-server` command line being put together; [`Launch::start`]
/// runs it.
pub struct Launch {
    command: Command,
    port_file: PathBuf,
    log: PathBuf,
    scheme: &'static str,
}

impl Launch {
    /// The workspace's `kiln-cache-server` (found with [`crate::kiln_bin`])
    /// on a port it picks (`--listen 127.0.0.1:0`), writing `dir/port` once
    /// it listens and logging (`RUST_LOG=info`) to `dir/server.log`. Add
    /// `--data` and the rest with [`Launch::args`].
    pub fn new(dir: &Path) -> Launch {
        Launch::listen(dir, 0)
    }

    /// [`Launch::new`] on `port` (0: one the server picks); for a server
    /// restarted on the port its clients already know.
    pub fn listen(dir: &Path, port: u16) -> Launch {
        Launch::binary(dir, &crate::kiln_bin("kiln-cache-server"), port)
    }

    /// [`Launch::listen`] with the server binary at `binary` (for example
    /// one built by cargo for the cache server's own tests).
    pub fn binary(dir: &Path, binary: &Path, port: u16) -> Launch {
        let mut launch = Launch::program(dir, binary);
        launch
            .command
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"));
        let port_file = launch.port_file.clone();
        launch.command.arg("--port-file").arg(port_file);
        launch
    }

    /// `program` with no arguments yet and the same log and port file in
    /// `dir`: for a server behind a wrapper (`prlimit ... kiln-cache-server`)
    /// or configured only by a file that names [`Launch::port_file`] itself.
    pub fn program(dir: &Path, program: &Path) -> Launch {
        let mut command = Command::new(program);
        command
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(Stdio::null());
        Launch {
            command,
            port_file: dir.join("port"),
            log: dir.join("server.log"),
            scheme: "http",
        }
    }

    /// The file the server writes its port to once it listens.
    pub fn port_file(&self) -> &Path {
        &self.port_file
    }

    /// The server speaks HTTPS (its URL says so).
    pub fn tls(mut self) -> Launch {
        self.scheme = "https";
        self
    }

    /// Appends arguments.
    pub fn args<I, S>(mut self, args: I) -> Launch
    where
        I: IntoIterator<Item = S>,
        S: AsRef<std::ffi::OsStr>,
    {
        self.command.args(args);
        self
    }

    /// The command itself, for anything else (environment, more arguments).
    pub fn command(&mut self) -> &mut Command {
        &mut self.command
    }

    /// Starts the server and waits until it listens; panics with its log
    /// when it exits first or does not listen within 60 s.
    pub fn start(self) -> ServerProcess {
        let Launch {
            mut command,
            port_file,
            log,
            scheme,
        } = self;
        // A restart in the same directory must not read the old port.
        let _ = fs::remove_file(&port_file);
        let log_file = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating the server log {}: {e}", log.display()));
        let child = command
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
        let mut server = ServerProcess {
            child: Some(child),
            port: 0,
            url: String::new(),
            log,
        };
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(text) = fs::read_to_string(&port_file)
                && let Ok(port) = text.trim().parse::<u16>()
            {
                server.port = port;
                server.url = format!("{scheme}://127.0.0.1:{port}");
                return server;
            }
            if let Some(status) = server.child.as_mut().and_then(|c| c.try_wait().ok()?) {
                server.child = None;
                panic!(
                    "kiln-cache-server exited early ({status}):\n{}",
                    server.log_text()
                );
            }
            assert!(
                Instant::now() < deadline,
                "kiln-cache-server did not listen within {START_TIMEOUT:?}:\n{}",
                server.log_text()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Launch {
    /// Starts a server that is expected to refuse its settings: waits for it
    /// to exit and returns its log. Panics when it exits successfully,
    /// listens (writes its port file) or still runs after 60 s.
    pub fn refused(self) -> String {
        let Launch {
            mut command,
            port_file,
            log,
            ..
        } = self;
        let _ = fs::remove_file(&port_file);
        let log_file = fs::File::create(&log)
            .unwrap_or_else(|e| panic!("creating the server log {}: {e}", log.display()));
        let mut child = command
            .stderr(log_file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {:?}: {e}", command.get_program()));
        let log_text = || fs::read_to_string(&log).unwrap_or_default();
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                assert!(
                    !status.success(),
                    "kiln-cache-server exited 0:\n{}",
                    log_text()
                );
                assert!(
                    !port_file.exists(),
                    "kiln-cache-server listened:\n{}",
                    log_text()
                );
                return log_text();
            }
            if port_file.exists() || Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kiln-cache-server did not refuse to start:\n{}", log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A running `kiln-cache-server` started by [`Launch::start`].
pub struct ServerProcess {
    child: Option<Child>,
    /// The port it listens on.
    pub port: u16,
    /// `http://127.0.0.1:PORT` (`https://` after [`Launch::tls`]).
    pub url: String,
    /// Its log (stderr).
    pub log: PathBuf,
}

impl ServerProcess {
    /// What the server logged so far.
    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Its process id (panics once it was stopped).
    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("server already stopped").id() as i32
    }

    /// Whether it was stopped by [`ServerProcess::kill9`] or
    /// [`ServerProcess::terminate`].
    pub fn is_stopped(&self) -> bool {
        self.child.is_none()
    }

    /// `kill -9` and reap (nothing when already stopped).
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then wait up to `timeout` for it to exit; panics (after a
    /// SIGKILL) with its log when it does not.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server already stopped");
        // SAFETY: kill(2) on the pid of our own unreaped child.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("waiting for the server") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("kiln-cache-server ignored SIGTERM:\n{}", self.log_text());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// GET a path over plain HTTP; returns status and body.
    pub fn get(&self, path: &str) -> Result<(u16, String)> {
        crate::http_get(self.port, path)
    }

    /// The sum of the Prometheus samples named `sample` (`name{labels}` as
    /// printed) on `/metrics`; 0 when absent or when the server does not
    /// answer.
    pub fn metric(&self, sample: &str) -> f64 {
        match self.get("/metrics") {
            Ok((200, body)) => crate::metric_sum(&body, sample),
            _ => 0.0,
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!(
                "---- kiln-cache-server {} log ----\n{}",
                self.url,
                self.log_text()
            );
        }
    }
}
