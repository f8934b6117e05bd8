//! Can this process isolate a RUN step? Asked once at startup, before any
//! cache lookup, so that a pod without the privilege finds out in the first
//! second instead of on the first cache miss.
//!
//! [`probe_chroot`] forks a child that does what the chroot runner's step
//! process does first: unshare mount, PID, IPC and UTS namespaces, make the
//! mount tree private and mount a tmpfs (the overlay snapshotter and every
//! mount of a step need the same right). The child exits at once; nothing
//! it did is visible outside it. The answer names the syscall the kernel
//! refused and its errno.
//!
//! [`in_container`] is the rule that lets the executor fall back to the
//! in-place isolation by itself (see `docs/user-guide.md`).

use std::path::Path;

/// What the kernel refused when the probe tried to isolate a step.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {}", std::io::Error::from_raw_os_error(*errno))]
pub struct IsolationDenied {
    /// `unshare(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS)`, `fork`, ...
    pub call: &'static str,
    pub errno: i32,
}

const STEP_UNSHARE: i32 = 1;
const STEP_PRIVATE: i32 = 2;
const STEP_TMPFS: i32 = 3;

/// Tries, in a throwaway child, the namespaces and mounts the chroot
/// runner needs. `Ok` means a RUN step can be isolated here.
pub fn probe_chroot() -> Result<(), IsolationDenied> {
    // The child writes the failed step and its errno to a pipe (an exit
    // status has too few bits for both).
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: plain syscalls; `fds` is a valid 2-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(IsolationDenied {
            call: "pipe2",
            errno: last_errno(),
        });
    }
    let (read_fd, write_fd) = (fds[0], fds[1]);
    let root = c"/";
    let tmpfs = c"tmpfs";
    // SAFETY: the child only makes async-signal-safe syscalls (unshare,
    // mount, write, _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        let errno = last_errno();
        unsafe {
            libc::close(read_fd);
            libc::close(write_fd);
        }
        return Err(IsolationDenied {
            call: "fork",
            errno,
        });
    }
    if pid == 0 {
        unsafe {
            let fail = |step: i32| -> ! {
                let report = [step, *libc::__errno_location()];
                libc::write(
                    write_fd,
                    report.as_ptr().cast(),
                    std::mem::size_of_val(&report),
                );
                libc::_exit(1)
            };
            let flags =
                libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
            if libc::unshare(flags) != 0 {
                fail(STEP_UNSHARE);
            }
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                fail(STEP_PRIVATE);
            }
            // Over `/` of the private namespace: a directory that always
            // exists, and the mount dies with the child.
            if libc::mount(
                tmpfs.as_ptr(),
                root.as_ptr(),
                tmpfs.as_ptr(),
                libc::MS_NOSUID | libc::MS_NODEV,
                std::ptr::null(),
            ) != 0
            {
                fail(STEP_TMPFS);
            }
            libc::_exit(0)
        }
    }
    unsafe { libc::close(write_fd) };
    let mut report = [0i32; 2];
    // SAFETY: reads into a local buffer of the size given.
    let n = unsafe {
        libc::read(
            read_fd,
            report.as_mut_ptr().cast(),
            std::mem::size_of_val(&report),
        )
    };
    unsafe { libc::close(read_fd) };
    let mut status = 0;
    // SAFETY: waits for the child forked above.
    while unsafe { libc::waitpid(pid, &mut status, 0) } < 0 && last_errno() == libc::EINTR {}
    if n == std::mem::size_of_val(&report) as isize {
        let call = match report[0] {
            STEP_UNSHARE => "unshare(CLONE_NEWNS|CLONE_NEWPID|CLONE_NEWIPC|CLONE_NEWUTS)",
            STEP_PRIVATE => "making / private in a new mount namespace",
            STEP_TMPFS => "mounting a tmpfs in a new mount namespace",
            _ => "probing namespaces",
        };
        return Err(IsolationDenied {
            call,
            errno: report[1],
        });
    }
    if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
        Ok(())
    } else {
        Err(IsolationDenied {
            call: "the namespace probe died",
            errno: libc::ECHILD,
        })
    }
}

fn last_errno() -> i32 {
    std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
}

/// Why this process looks like it runs in a container, or `None`. The
/// rule (first match wins): `/.dockerenv` or `/run/.containerenv` exists;
/// the `container` environment variable is set (podman, systemd-nspawn,
/// LXC); `KUBERNETES_SERVICE_HOST` is set (every Kubernetes pod); PID 1's
/// cgroup names a container runtime; `/` is an overlay mount. The first
/// four are the hints `--isolation none` accepts too.
pub fn in_container() -> Option<String> {
    let container = std::env::var("container").ok();
    let kubernetes = std::env::var("KUBERNETES_SERVICE_HOST").ok();
    container_hint(Path::new("/"), container.as_deref(), kubernetes.as_deref())
}

/// [`in_container`] on a given root and environment (for tests).
pub fn container_hint(
    root: &Path,
    container_env: Option<&str>,
    kubernetes_host: Option<&str>,
) -> Option<String> {
    if let Some(found) = super::none::detect_container(root, container_env) {
        return Some(found);
    }
    kubernetes_host
        .filter(|v| !v.is_empty())
        .map(|_| "KUBERNETES_SERVICE_HOST is set (a Kubernetes pod)".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_may_isolate_and_the_probe_leaves_no_mount_behind() {
        let before = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        // The test machine runs the e2e isolation tests as root.
        probe_chroot().unwrap();
        let after = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        assert_eq!(before, after);
    }

    #[test]
    fn a_denial_names_the_syscall_and_the_errno() {
        let denied = IsolationDenied {
            call: "unshare(CLONE_NEWNS)",
            errno: libc::EPERM,
        };
        let text = denied.to_string();
        assert!(
            text.contains("unshare") && text.contains("Operation not permitted"),
            "{text}"
        );
    }

    #[test]
    fn container_hints_follow_the_documented_rule() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        assert_eq!(container_hint(root, None, None), None);
        assert_eq!(container_hint(root, Some(""), Some("")), None);
        assert!(
            container_hint(root, None, Some("10.0.0.1"))
                .unwrap()
                .contains("KUBERNETES_SERVICE_HOST")
        );
        assert!(
            container_hint(root, Some("podman"), None)
                .unwrap()
                .contains("container=podman")
        );
        std::fs::write(root.join(".dockerenv"), "").unwrap();
        assert!(
            container_hint(root, None, None)
                .unwrap()
                .contains(".dockerenv")
        );
    }
}
