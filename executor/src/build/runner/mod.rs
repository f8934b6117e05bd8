//! Runners: execute one RUN step in a rootfs (`--isolation`).
//!
//! [`Runner::run`] takes a [`RunSpec`] (rootfs, argv with the shell already
//! applied, environment, user, working directory, network mode, extra
//! mounts, hostname, where to stream output) and returns a [`RunOutcome`]
//! (exit status, the last lines of output for error messages). A non-zero
//! exit is an outcome, not an error: the driver decides what it means.
//!
//! - [`chroot::ChrootRunner`]: new mount/PID/IPC/UTS (and network, for
//!   `--network none`) namespaces, `pivot_root` into the rootfs; every
//!   process and mount of the step disappears with it.
//! - [`none::NoneRunner`]: runs on the executor's own `/` (Kaniko's model),
//!   refusing outside a container unless forced.
//!
//! Both promise: environment = the spec's, plus `PATH` and `HOME` defaults;
//! user and groups from the rootfs's passwd/group; working directory created
//! when missing; output streamed line by line with a prefix while the step
//! runs.

pub mod chroot;
pub mod none;
pub mod probe;
pub mod security;
pub mod userns;

use crate::build::user::{ResolvedUser, UserError};
use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Docker's default PATH, used when the image defines none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// Lines of output kept for error messages unless the spec says otherwise.
pub const DEFAULT_TAIL_LINES: usize = 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NetworkMode {
    /// The host's network namespace (Docker's build default).
    #[default]
    Host,
    /// A new network namespace with only `lo`, up.
    None,
}

/// An extra mount for the step (RUN --mount). Targets are paths inside the
/// rootfs; symlinks in them resolve inside the rootfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MountSpec {
    Bind {
        source: PathBuf,
        target: PathBuf,
        readonly: bool,
    },
    Tmpfs {
        target: PathBuf,
        size_bytes: Option<u64>,
    },
}

/// Where a step's output goes: every line, prefixed, to `writer`; the last
/// `tail_lines` lines are also kept in the outcome.
#[derive(Clone)]
pub struct OutputSink {
    pub prefix: String,
    pub writer: Option<Arc<Mutex<dyn Write + Send>>>,
    pub tail_lines: usize,
}

impl Default for OutputSink {
    fn default() -> Self {
        OutputSink {
            prefix: String::new(),
            writer: None,
            tail_lines: DEFAULT_TAIL_LINES,
        }
    }
}

impl std::fmt::Debug for OutputSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputSink")
            .field("prefix", &self.prefix)
            .field("writer", &self.writer.is_some())
            .field("tail_lines", &self.tail_lines)
            .finish()
    }
}

/// One RUN step.
#[derive(Debug, Clone)]
pub struct RunSpec {
    /// The writable rootfs (from a snapshotter). `/` for the none runner.
    pub rootfs: PathBuf,
    /// The command, shell already applied (`["/bin/sh", "-c", "..."]`).
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    /// `user[:group]`, names or numeric ids; `None` is root.
    pub user: Option<String>,
    /// Absolute path inside the rootfs; created when missing.
    pub workdir: PathBuf,
    pub network: NetworkMode,
    pub mounts: Vec<MountSpec>,
    pub hostname: String,
    pub output: OutputSink,
    /// Capabilities, seccomp and privilege (chroot isolation only).
    pub security: security::StepSecurity,
}

impl RunSpec {
    /// A spec with Docker's defaults: root, `/`, host network, hostname
    /// `kiln`, output discarded.
    pub fn new(rootfs: impl Into<PathBuf>, argv: Vec<String>) -> Self {
        RunSpec {
            rootfs: rootfs.into(),
            argv,
            env: Vec::new(),
            user: None,
            workdir: PathBuf::from("/"),
            network: NetworkMode::Host,
            mounts: Vec::new(),
            hostname: "kiln".into(),
            output: OutputSink::default(),
            security: security::StepSecurity::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitStatus {
    Code(i32),
    /// Killed by this signal.
    Signal(i32),
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitStatus::Code(code) => write!(f, "exit code {code}"),
            ExitStatus::Signal(signal) => write!(f, "signal {signal}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// The last lines of output (stdout and stderr interleaved).
    pub tail: Vec<String>,
    pub duration: Duration,
}

impl RunOutcome {
    pub fn success(&self) -> bool {
        self.status == ExitStatus::Code(0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("resolving the step's user: {0}")]
    User(#[from] UserError),
    #[error("starting {argv0}: {source}")]
    Spawn {
        argv0: String,
        #[source]
        source: std::io::Error,
    },
    #[error("setting up the step: {what}: {source}")]
    Setup {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the step has no command")]
    EmptyCommand,
    #[error("refusing to run in place: {0}")]
    Refused(String),
}

impl RunError {
    pub(crate) fn setup(what: impl Into<String>, source: std::io::Error) -> Self {
        RunError::Setup {
            what: what.into(),
            source,
        }
    }
}

/// Runs RUN steps. Implementations are interchangeable for the driver.
pub trait Runner: Send + Sync {
    fn run(&self, spec: &RunSpec) -> Result<RunOutcome, RunError>;
}

/// The step's environment: the spec's variables in order, plus `PATH` and
/// `HOME` when the spec has none.
pub fn step_env(spec_env: &[(String, String)], user: &ResolvedUser) -> Vec<(String, String)> {
    let mut env = spec_env.to_vec();
    if !env.iter().any(|(k, _)| k == "PATH") {
        env.push(("PATH".into(), DEFAULT_PATH.into()));
    }
    if !env.iter().any(|(k, _)| k == "HOME") {
        env.push(("HOME".into(), user.home.display().to_string()));
    }
    env
}

/// A pipe for the step's stdout and stderr: (read end, write end).
pub(crate) fn output_pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: fds is a two-element array; O_CLOEXEC keeps the read end out
    // of the child (std dups the write end onto 1 and 2).
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned only here.
    unsafe {
        use std::os::fd::FromRawFd;
        Ok((OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])))
    }
}

/// Reads the step's output until EOF on a thread: each line goes to the
/// sink with its prefix as it arrives; the last lines arrive on the returned
/// channel at EOF.
pub(crate) fn spawn_pump(
    read: OwnedFd,
    sink: OutputSink,
) -> std::sync::mpsc::Receiver<Vec<String>> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tail: VecDeque<String> = VecDeque::new();
        let mut reader = BufReader::new(std::fs::File::from(read));
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match reader.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            if buf.last() == Some(&b'\n') {
                buf.pop();
            }
            let line = String::from_utf8_lossy(&buf).into_owned();
            if let Some(w) = &sink.writer
                && let Ok(mut w) = w.lock()
            {
                // Output is best effort: a closed log must not fail the step.
                let _ = writeln!(w, "{}{}", sink.prefix, line);
            }
            if sink.tail_lines > 0 {
                if tail.len() == sink.tail_lines {
                    tail.pop_front();
                }
                tail.push_back(line);
            }
        }
        let _ = tx.send(tail.into());
    });
    rx
}

/// Mount points the runner had to create in the rootfs, removed again after
/// the step so they never reach a layer. Parent directories get their
/// mtime back when nothing else touched them, so they do not show up as
/// changed either.
#[derive(Debug, Default)]
pub(crate) struct Stubs {
    /// (created path, parent, parent's times before, parent's mtime after).
    created: Vec<(PathBuf, PathBuf, StatTimes, (i64, i64))>,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct StatTimes {
    atime: (i64, i64),
    mtime: (i64, i64),
}

fn times(path: &Path) -> std::io::Result<StatTimes> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::symlink_metadata(path)?;
    Ok(StatTimes {
        atime: (m.atime(), m.atime_nsec()),
        mtime: (m.mtime(), m.mtime_nsec()),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StubKind {
    Dir,
    File,
}

impl Stubs {
    /// Makes sure `in_root` exists inside `rootfs` as `kind` and returns its
    /// host path (symlinks resolved inside the rootfs). Everything created
    /// is recorded for [`Stubs::remove`].
    pub(crate) fn ensure(
        &mut self,
        rootfs: &Path,
        in_root: &Path,
        kind: StubKind,
    ) -> Result<PathBuf, RunError> {
        let host = crate::build::fsutil::resolve_in_root(rootfs, in_root)
            .map_err(|e| RunError::setup(format!("resolving {}", in_root.display()), e))?;
        if std::fs::symlink_metadata(&host).is_ok() {
            return Ok(host);
        }
        let parent = host
            .parent()
            .ok_or_else(|| RunError::setup("mount point", std::io::Error::other("no parent")))?
            .to_path_buf();
        if std::fs::symlink_metadata(&parent).is_err() {
            let rel = parent.strip_prefix(rootfs).unwrap_or(&parent).to_path_buf();
            self.ensure(rootfs, &Path::new("/").join(rel), StubKind::Dir)?;
        }
        let before = times(&parent)
            .map_err(|e| RunError::setup(format!("inspecting {}", parent.display()), e))?;
        let made = match kind {
            StubKind::Dir => std::fs::create_dir(&host),
            StubKind::File => std::fs::File::create_new(&host).map(|_| ()),
        };
        made.map_err(|e| RunError::setup(format!("creating mount point {}", host.display()), e))?;
        let after = times(&parent)
            .map_err(|e| RunError::setup(format!("inspecting {}", parent.display()), e))?;
        self.created
            .push((host.clone(), parent, before, after.mtime));
        Ok(host)
    }

    /// Removes what `ensure` created (newest first), leaving anything the
    /// step wrote into it.
    pub(crate) fn remove(&mut self) {
        while let Some((path, parent, before, mtime_after)) = self.created.pop() {
            // Only undo the parent's mtime if nothing but our stub touched it.
            let untouched = times(&parent).is_ok_and(|now| now.mtime == mtime_after);
            let removed = match std::fs::symlink_metadata(&path) {
                Ok(m) if m.is_dir() => std::fs::remove_dir(&path).is_ok(),
                Ok(m) if m.len() == 0 => std::fs::remove_file(&path).is_ok(),
                _ => false,
            };
            if removed && untouched {
                let _ =
                    crate::build::fsutil::set_times_nofollow(&parent, before.atime, before.mtime);
            }
        }
    }
}

impl Drop for Stubs {
    fn drop(&mut self) {
        self.remove();
    }
}

#[cfg(test)]
pub(crate) mod testroot {
    //! A tiny rootfs for runner tests: Debian's static busybox plus applet
    //! symlinks, a passwd/group with a non-root user.

    use std::path::Path;

    pub const BUSYBOX: &str = "/bin/busybox";

    pub fn make(root: &Path) {
        for d in ["bin", "etc", "tmp", "root", "home/builder"] {
            std::fs::create_dir_all(root.join(d)).unwrap();
        }
        std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
        let list = std::process::Command::new(BUSYBOX)
            .arg("--list")
            .output()
            .unwrap();
        for applet in String::from_utf8(list.stdout).unwrap().lines() {
            if applet != "busybox" {
                std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
            }
        }
        std::fs::write(
            root.join("etc/passwd"),
            "root:x:0:0:root:/root:/bin/sh\nbuilder:x:1000:1000::/home/builder:/bin/sh\n",
        )
        .unwrap();
        std::fs::write(
            root.join("etc/group"),
            "root:x:0:\nbuilder:x:1000:\nextra:x:2000:builder\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777))
            .unwrap();
        // tempdirs are 0700; a non-root step must be able to enter /.
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::chown(root.join("home/builder"), Some(1000), Some(1000)).unwrap();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn env_gets_path_and_home_defaults_only_when_missing() {
        let u = ResolvedUser::root();
        let env = step_env(&[("A".into(), "1".into())], &u);
        assert_eq!(
            env,
            vec![
                ("A".to_string(), "1".to_string()),
                ("PATH".into(), DEFAULT_PATH.into()),
                ("HOME".into(), "/root".into())
            ]
        );
        let env = step_env(
            &[("PATH".into(), "/x".into()), ("HOME".into(), "/h".into())],
            &u,
        );
        assert_eq!(env.len(), 2);
    }

    #[test]
    fn stubs_are_removed_and_parent_mtime_restored() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("etc")).unwrap();
        let before = times(&d.path().join("etc")).unwrap().mtime;
        let root_before = times(d.path()).unwrap().mtime;
        std::thread::sleep(Duration::from_millis(20));
        let mut stubs = Stubs::default();
        let p = stubs
            .ensure(d.path(), Path::new("/etc/resolv.conf"), StubKind::File)
            .unwrap();
        assert_eq!(p, d.path().join("etc/resolv.conf"));
        stubs
            .ensure(d.path(), Path::new("/proc"), StubKind::Dir)
            .unwrap();
        stubs
            .ensure(d.path(), Path::new("/a/b"), StubKind::Dir)
            .unwrap();
        assert!(d.path().join("a/b").is_dir());
        stubs.remove();
        assert!(!p.exists());
        assert!(!d.path().join("proc").exists());
        assert!(!d.path().join("a").exists());
        assert_eq!(times(&d.path().join("etc")).unwrap().mtime, before);
        assert_eq!(times(d.path()).unwrap().mtime, root_before);
    }

    #[test]
    fn stubs_keep_what_the_step_wrote() {
        let d = tempfile::tempdir().unwrap();
        let mut stubs = Stubs::default();
        stubs
            .ensure(d.path(), Path::new("/etc/hosts"), StubKind::File)
            .unwrap();
        std::fs::write(d.path().join("etc/passwd"), b"x").unwrap();
        stubs.remove();
        assert!(!d.path().join("etc/hosts").exists());
        assert!(d.path().join("etc/passwd").exists());
    }

    #[test]
    fn stub_through_absolute_symlink_stays_in_the_rootfs() {
        let d = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), d.path().join("etc")).unwrap();
        let mut stubs = Stubs::default();
        let p = stubs
            .ensure(d.path(), Path::new("/etc/hosts"), StubKind::File)
            .unwrap();
        assert!(p.starts_with(d.path()));
        assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}
