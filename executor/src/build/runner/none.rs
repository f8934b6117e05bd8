//! The `none` isolation: the step runs directly on `/`, the executor's own
//! container filesystem, as Kaniko does, for build pods that may create
//! neither namespaces nor mounts.
//!
//! Promises:
//! - it refuses to run unless `/` looks like a container (`/.dockerenv`,
//!   `/run/.containerenv`, a `container` environment variable, a container
//!   cgroup of PID 1, an overlay root mount, or `KUBERNETES_SERVICE_HOST`:
//!   [`super::probe::in_container`]) or `force` is set, because
//!   the step overwrites the filesystem it runs on;
//! - user, groups, environment and working directory as in the chroot
//!   runner; `--network none` uses a network namespace when the pod allows
//!   one and fails otherwise; RUN --mount and the hostname need the chroot
//!   isolation (an error, not a silent difference);
//! - the step runs in its own process group, killed when the step ends, so
//!   background processes do not outlive it (a process that calls `setsid`
//!   escapes; only the chroot isolation's PID namespace is airtight).

use super::{
    ExitStatus, NetworkMode, RunError, RunOutcome, RunSpec, Runner, output_pipe, spawn_pump,
    step_env,
};
use crate::build::fsutil::cstring;
use crate::build::user::{ResolvedUser, resolve_user};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Default, Clone)]
pub struct NoneRunner {
    force: bool,
}

impl NoneRunner {
    /// `force` skips the container check (`--force`).
    pub fn new(force: bool) -> Self {
        NoneRunner { force }
    }
}

/// Why `root` looks like a container's filesystem, or `None`. `container_env`
/// is the value of the `container` environment variable (podman, systemd-nspawn).
pub fn detect_container(root: &Path, container_env: Option<&str>) -> Option<String> {
    for marker in [".dockerenv", "run/.containerenv"] {
        if root.join(marker).exists() {
            return Some(format!("/{marker} exists"));
        }
    }
    if let Some(v) = container_env
        && !v.is_empty()
    {
        return Some(format!("container={v} is set"));
    }
    if let Ok(cg) = std::fs::read_to_string(root.join("proc/1/cgroup")) {
        for hint in [
            "docker",
            "kubepods",
            "containerd",
            "libpod",
            "lxc",
            "buildkit",
        ] {
            if cg.contains(hint) {
                return Some(format!("PID 1's cgroup mentions {hint}"));
            }
        }
    }
    if let Ok(info) = std::fs::read_to_string(root.join("proc/self/mountinfo")) {
        for line in info.lines() {
            let fields: Vec<&str> = line.split(' ').collect();
            let Some(sep) = fields.iter().position(|f| *f == "-") else {
                continue;
            };
            if fields.get(4) == Some(&"/") && fields.get(sep + 1) == Some(&"overlay") {
                return Some("/ is an overlay mount".into());
            }
        }
    }
    None
}

/// Creates the missing components of `workdir` owned by the step's user.
fn make_workdir(workdir: &Path, user: &ResolvedUser) -> Result<(), RunError> {
    let mut cur = PathBuf::from("/");
    for comp in workdir.components() {
        if let std::path::Component::Normal(n) = comp {
            cur.push(n);
            match std::fs::create_dir(&cur) {
                Ok(()) => std::os::unix::fs::chown(&cur, Some(user.uid), Some(user.gid))
                    .map_err(|e| RunError::setup(format!("chown {}", cur.display()), e))?,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => {
                    return Err(RunError::setup(
                        format!("creating working directory {}", cur.display()),
                        e,
                    ));
                }
            }
        }
    }
    Ok(())
}

impl Runner for NoneRunner {
    fn run(&self, spec: &RunSpec) -> Result<RunOutcome, RunError> {
        let argv0 = spec.argv.first().ok_or(RunError::EmptyCommand)?;
        if spec.rootfs != Path::new("/") {
            return Err(RunError::Refused(format!(
                "the none isolation runs on /, not {}",
                spec.rootfs.display()
            )));
        }
        if !self.force && super::probe::in_container().is_none() {
            return Err(RunError::Refused(
                "/ does not look like a container; it would be modified in place (use --force to run anyway)"
                    .into(),
            ));
        }
        if !spec.mounts.is_empty() {
            return Err(RunError::Refused(
                "RUN --mount needs --isolation chroot".into(),
            ));
        }
        let user = match &spec.user {
            Some(u) => resolve_user(Path::new("/"), u)?,
            None => ResolvedUser::root(),
        };
        let env = step_env(&spec.env, &user);
        let workdir = Path::new("/").join(&spec.workdir);
        make_workdir(&workdir, &user)?;
        let cworkdir = cstring(&workdir).map_err(|e| RunError::setup("working directory", e))?;

        let (out_read, out_write) =
            output_pipe().map_err(|e| RunError::setup("creating a pipe", e))?;
        let out_write2 = out_write
            .try_clone()
            .map_err(|e| RunError::setup("creating a pipe", e))?;
        // stdin is an empty pipe rather than /dev/null, which a minimal
        // container (or the throwaway test root) may lack.
        let (stdin_read, stdin_write) =
            output_pipe().map_err(|e| RunError::setup("creating a pipe", e))?;
        drop(stdin_write);
        let (uid, gid, groups) = (user.uid, user.gid, user.groups.clone());
        let net_none = spec.network == NetworkMode::None;
        let mut cmd = Command::new(argv0);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::from(stdin_read))
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(out_write2))
            .process_group(0);
        // SAFETY: only async-signal-safe syscalls on data prepared above.
        unsafe {
            cmd.pre_exec(move || {
                if net_none
                    && (libc::unshare(libc::CLONE_NEWNET) != 0 || !super::chroot::loopback_up())
                {
                    return Err(std::io::Error::last_os_error());
                }
                if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                    || libc::chdir(cworkdir.as_ptr()) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let spawned = cmd.spawn();
        drop(cmd);
        let mut child = spawned.map_err(|source| RunError::Spawn {
            argv0: argv0.clone(),
            source,
        })?;
        let pump = spawn_pump(out_read, spec.output.clone());
        let status = child.wait();
        // The step's process group goes with it.
        // SAFETY: signalling the group we created for the child.
        unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
        // A process that left the group may hold the pipe open: do not wait
        // for it forever.
        let tail = pump
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_default();
        let status = status.map_err(|e| RunError::setup("waiting for the step", e))?;
        let status = match (status.code(), status.signal()) {
            (Some(code), _) => ExitStatus::Code(code),
            (None, Some(sig)) => ExitStatus::Signal(sig),
            (None, None) => ExitStatus::Code(-1),
        };
        Ok(RunOutcome {
            status,
            tail,
            duration: started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::super::testroot;
    use super::*;

    #[test]
    fn detects_container_markers() {
        let d = tempfile::tempdir().unwrap();
        assert_eq!(detect_container(d.path(), None), None);
        assert!(detect_container(d.path(), Some("podman")).is_some());
        std::fs::create_dir_all(d.path().join("proc/1")).unwrap();
        std::fs::write(d.path().join("proc/1/cgroup"), "0::/init.scope\n").unwrap();
        assert_eq!(detect_container(d.path(), None), None);
        std::fs::write(
            d.path().join("proc/1/cgroup"),
            "0::/kubepods/burstable/pod1/abc\n",
        )
        .unwrap();
        assert!(
            detect_container(d.path(), None)
                .unwrap()
                .contains("kubepods")
        );
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join(".dockerenv"), "").unwrap();
        assert!(detect_container(d.path(), None).is_some());
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("proc/self")).unwrap();
        std::fs::write(
            d.path().join("proc/self/mountinfo"),
            "22 1 0:21 / / rw,relatime - overlay overlay rw,lowerdir=/a\n",
        )
        .unwrap();
        assert!(detect_container(d.path(), None).is_some());
    }

    #[test]
    fn refuses_other_roots_and_mounts() {
        let r = NoneRunner::new(true);
        let spec = RunSpec::new("/tmp", vec!["/bin/true".into()]);
        assert!(matches!(r.run(&spec).unwrap_err(), RunError::Refused(_)));
        let mut spec = RunSpec::new("/", vec!["/bin/true".into()]);
        spec.mounts.push(super::super::MountSpec::Tmpfs {
            target: "/x".into(),
            size_bytes: None,
        });
        assert!(matches!(r.run(&spec).unwrap_err(), RunError::Refused(_)));
    }

    #[test]
    fn refuses_on_this_host_unless_it_is_a_container() {
        // This machine's / is checked but never written: with a container
        // detected we only assert that detection and refusal agree.
        let env = std::env::var("container").ok();
        let detected = detect_container(Path::new("/"), env.as_deref());
        let spec = RunSpec::new("/", vec!["/bin/sh".into(), "-c".into(), "exit 0".into()]);
        if detected.is_none() {
            let err = NoneRunner::new(false).run(&spec).unwrap_err();
            assert!(err.to_string().contains("--force"), "{err}");
        }
    }

    /// Runs `f` on a thread whose `/` is a throwaway busybox rootfs: the
    /// thread unshares its filesystem context and mount namespace (both
    /// per-thread after `unshare`), makes mounts private, and chroots. The
    /// none runner then sees that rootfs as `/`; the host's `/` is never
    /// the target.
    fn in_throwaway_root<T: Send + 'static>(
        root: &Path,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> T {
        let root = cstring(root).unwrap();
        std::thread::spawn(move || {
            // SAFETY: plain syscalls; failure panics before `f` runs.
            unsafe {
                assert_eq!(libc::unshare(libc::CLONE_FS | libc::CLONE_NEWNS), 0);
                assert_eq!(
                    libc::mount(
                        std::ptr::null(),
                        c"/".as_ptr(),
                        std::ptr::null(),
                        libc::MS_REC | libc::MS_PRIVATE,
                        std::ptr::null()
                    ),
                    0
                );
                assert_eq!(libc::chroot(root.as_ptr()), 0);
                assert_eq!(libc::chdir(c"/".as_ptr()), 0);
            }
            assert!(
                Path::new("/kiln-throwaway-root").exists(),
                "not in the throwaway root"
            );
            f()
        })
        .join()
        .unwrap()
    }

    fn throwaway() -> tempfile::TempDir {
        let d = tempfile::tempdir().unwrap();
        testroot::make(d.path());
        std::fs::write(d.path().join("kiln-throwaway-root"), "").unwrap();
        d
    }

    #[test]
    fn runs_in_place_with_user_env_and_workdir_inside_a_throwaway_root() {
        let d = throwaway();
        std::fs::write(d.path().join(".dockerenv"), "").unwrap();
        let out = in_throwaway_root(d.path(), || {
            let mut spec = RunSpec::new(
                "/",
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "id -u; id -G; pwd; echo $HOME $V; echo made > /made-by-step; exit 5".into(),
                ],
            );
            spec.user = Some("builder".into());
            spec.env = vec![("V".into(), "v1".into())];
            spec.workdir = "/app/src".into();
            NoneRunner::new(false).run(&spec).unwrap()
        });
        assert_eq!(out.status, ExitStatus::Code(5));
        assert_eq!(
            out.tail,
            vec![
                "1000",
                "1000 2000",
                "/app/src",
                "/home/builder v1",
                "/bin/sh: can't create /made-by-step: Permission denied"
            ]
        );
        // The step ran as builder, so it could not write to / ...
        assert!(!d.path().join("made-by-step").exists());
        // ... and the working directory was created in the throwaway root.
        use std::os::unix::fs::MetadataExt;
        assert_eq!(
            std::fs::metadata(d.path().join("app/src")).unwrap().uid(),
            1000
        );
        assert!(!Path::new("/app/src").exists());
    }

    #[test]
    fn refuses_in_a_throwaway_root_without_container_markers_unless_forced() {
        let d = throwaway();
        let (refused, forced) = in_throwaway_root(d.path(), || {
            let spec = RunSpec::new(
                "/",
                vec!["/bin/sh".into(), "-c".into(), "echo ok > /forced".into()],
            );
            // The throwaway root has no /proc, so only markers could match.
            let refused = NoneRunner::new(false).run(&spec);
            let forced = NoneRunner::new(true).run(&spec).unwrap();
            (refused.is_err(), forced)
        });
        if std::env::var("container").is_err() {
            assert!(refused);
        }
        assert!(forced.success());
        assert_eq!(std::fs::read(d.path().join("forced")).unwrap(), b"ok\n");
    }

    #[test]
    fn background_processes_are_killed_with_the_step() {
        let d = throwaway();
        let started = Instant::now();
        let out = in_throwaway_root(d.path(), || {
            let spec = RunSpec::new(
                "/",
                vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "sleep 301 & echo $! > /bgpid; echo started".into(),
                ],
            );
            NoneRunner::new(true).run(&spec).unwrap()
        });
        assert!(out.success());
        assert!(started.elapsed() < Duration::from_secs(4));
        let pid: i32 = std::fs::read_to_string(d.path().join("bgpid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        std::thread::sleep(Duration::from_millis(200));
        let state = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for its reaper.
        assert!(state.is_empty() || state.contains(") Z"), "{state}");
    }
}
