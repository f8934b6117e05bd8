//! The `chroot` isolation (default): a RUN step in its own mount, PID, IPC
//! and UTS namespaces (plus a network namespace with only `lo` for
//! `--network none`), `pivot_root`ed into the rootfs.
//!
//! How the process tree is made (the reasoning is in docs/build-engine.md):
//! `std::process::Command` forks; its `pre_exec` hook, running in the
//! single-threaded child, unshares the namespaces and forks again with a raw
//! `clone` so the step becomes PID 1 of the new PID namespace. The middle
//! process closes every descriptor and waits, mirroring the step's exit.
//! The step process makes `/` private, binds the rootfs onto itself, mounts
//! `/proc`, a minimal `/dev`, `/dev/shm`, `/dev/pts`, copies of the host's
//! `/etc/resolv.conf` and `/etc/hosts` and the extra mounts, pivots into the
//! rootfs, drops the old root, sets hostname, user and groups, enters the
//! working directory and execs the command. Everything after the first fork
//! uses only async-signal-safe syscalls on data prepared beforehand.
//!
//! Promises: nothing the step mounts is visible outside it (private mount
//! namespace); when the step's PID 1 exits, the kernel kills every other
//! process of the step; if the executor dies (Ctrl-C), `PR_SET_PDEATHSIG`
//! kills the middle process and then the step. Mount points the runner had
//! to create are removed afterwards, so they never reach a layer.

use super::security::PreparedSecurity;
use super::userns::{IdMapping, MountFlags, UserNamespace, idmapped_bind};
use super::{
    ExitStatus, MountSpec, NetworkMode, RunError, RunOutcome, RunSpec, Runner, StubKind, Stubs,
    output_pipe, spawn_pump, step_env,
};
use crate::build::fsutil::{cstring, resolve_in_root};
use crate::build::user::{ResolvedUser, resolve_user};
use std::ffi::CString;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Host devices bind-mounted into the step's `/dev` (Docker's set).
const DEVICES: [&str; 6] = ["null", "zero", "full", "random", "urandom", "tty"];

#[derive(Debug, Default, Clone)]
pub struct ChrootRunner;

impl ChrootRunner {
    pub fn new() -> Self {
        ChrootRunner
    }
}

/// One setup action in the step's process, before `pivot_root`. Paths are
/// host paths under the rootfs, resolved (symlinks inside the rootfs)
/// before the fork.
#[derive(Debug)]
enum Op {
    Mount {
        source: Option<CString>,
        target: CString,
        fstype: Option<CString>,
        flags: libc::c_ulong,
        data: Option<CString>,
        optional: bool,
    },
    Mkdir(CString),
    Touch(CString),
    Symlink {
        target: CString,
        link: CString,
    },
    /// Creates a file with these bytes (on the step's private tmpfs),
    /// owned by `owner` when given.
    WriteFile {
        path: CString,
        contents: Vec<u8>,
        owner: Option<(libc::uid_t, libc::gid_t)>,
    },
    /// An idmapped bind with the step's user namespace (`--userns auto`).
    IdmappedBind {
        source: CString,
        target: CString,
        flags: MountFlags,
    },
}

/// Everything the step process needs, built before the fork so the child
/// never allocates.
#[derive(Debug)]
struct ChildPlan {
    ns_flags: libc::c_int,
    rootfs: CString,
    ops: Vec<Op>,
    net_none: bool,
    hostname: CString,
    workdir_chain: Vec<CString>,
    workdir: CString,
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
    security: PreparedSecurity,
    /// The user namespace to join (`--userns auto`), held open by `run`.
    userns_fd: Option<libc::c_int>,
    err_fd: libc::c_int,
}

/// Failure codes written to the error pipe: an op index, or a fixed stage.
const STAGE_UNSHARE: u32 = 1_000_000;
const STAGE_FORK: u32 = 1_000_001;
const STAGE_PRIVATE: u32 = 1_000_002;
const STAGE_PIVOT: u32 = 1_000_003;
const STAGE_HOSTNAME: u32 = 1_000_004;
const STAGE_LOOPBACK: u32 = 1_000_005;
const STAGE_WORKDIR: u32 = 1_000_006;
const STAGE_IDS: u32 = 1_000_007;
const STAGE_SECCOMP: u32 = 1_000_008;
const STAGE_BOUNDING: u32 = 1_000_009;
const STAGE_CAPS: u32 = 1_000_010;
const STAGE_USERNS: u32 = 1_000_011;

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

impl ChildPlan {
    /// Reports which stage failed and returns the error for std to send.
    fn fail(&self, stage: u32) -> std::io::Error {
        self.fail_with(stage, errno())
    }

    fn fail_with(&self, stage: u32, e: i32) -> std::io::Error {
        let mut msg = [0u8; 8];
        msg[..4].copy_from_slice(&stage.to_ne_bytes());
        msg[4..].copy_from_slice(&e.to_ne_bytes());
        // SAFETY: writing 8 bytes from a stack buffer; best effort.
        unsafe { libc::write(self.err_fd, msg.as_ptr().cast(), msg.len()) };
        std::io::Error::from_raw_os_error(e)
    }

    /// Runs in the forked child (see the module doc): async-signal-safe
    /// syscalls only, no allocation.
    fn enter(&self) -> std::io::Result<()> {
        // SAFETY (whole function): plain syscalls on pointers to data owned
        // by `self`, which lives until exec.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            if libc::unshare(self.ns_flags) != 0 {
                return Err(self.fail(STAGE_UNSHARE));
            }
            let pid = libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_long, 0, 0, 0, 0);
            if pid < 0 {
                return Err(self.fail(STAGE_FORK));
            }
            if pid > 0 {
                self.wait_and_mirror(pid as libc::pid_t);
            }
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL, 0, 0, 0);
            let root = c"/";
            if libc::mount(
                std::ptr::null(),
                root.as_ptr(),
                std::ptr::null(),
                libc::MS_REC | libc::MS_PRIVATE,
                std::ptr::null(),
            ) != 0
            {
                return Err(self.fail(STAGE_PRIVATE));
            }
            for (i, op) in self.ops.iter().enumerate() {
                if !apply(op, self.userns_fd) {
                    return Err(self.fail(i as u32));
                }
            }
            let dot = c".";
            if libc::chdir(self.rootfs.as_ptr()) != 0
                || libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) != 0
                || libc::umount2(dot.as_ptr(), libc::MNT_DETACH) != 0
                || libc::chdir(root.as_ptr()) != 0
            {
                return Err(self.fail(STAGE_PIVOT));
            }
            if libc::sethostname(self.hostname.as_ptr(), self.hostname.as_bytes().len()) != 0 {
                return Err(self.fail(STAGE_HOSTNAME));
            }
            if self.net_none && !loopback_up() {
                return Err(self.fail(STAGE_LOOPBACK));
            }
            if let Some(fd) = self.userns_fd {
                // Joining the namespace gives every capability inside it
                // (and a full bounding set, dropped below); becoming its
                // root makes the working directory below the step's own.
                if libc::setns(fd, libc::CLONE_NEWUSER) != 0
                    || libc::setresgid(0, 0, 0) != 0
                    || libc::setresuid(0, 0, 0) != 0
                {
                    return Err(self.fail(STAGE_USERNS));
                }
            }
            for dir in &self.workdir_chain {
                if libc::mkdir(dir.as_ptr(), 0o755) == 0 {
                    if libc::chown(dir.as_ptr(), self.uid, self.gid) != 0 {
                        return Err(self.fail(STAGE_WORKDIR));
                    }
                } else if errno() != libc::EEXIST {
                    return Err(self.fail(STAGE_WORKDIR));
                }
            }
            // Seccomp first, while the step still holds CAP_SYS_ADMIN (a
            // filter without no_new_privs needs it; in a user namespace, its
            // CAP_SYS_ADMIN there); every call below is on the allow-list.
            if let Err(e) = self.security.apply_seccomp() {
                return Err(self.fail_with(STAGE_SECCOMP, e));
            }
            if let Err(e) = self.security.apply_bounding() {
                return Err(self.fail_with(STAGE_BOUNDING, e));
            }
            // No descriptor of the executor (a RocksDB file, a socket, a
            // directory on the host) may survive into the step: a
            // directory descriptor outside the rootfs is a way out of it.
            if libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            ) != 0
            {
                for fd in 3..4096 {
                    libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC);
                }
            }
            if libc::setgroups(self.groups.len(), self.groups.as_ptr()) != 0
                || libc::setgid(self.gid) != 0
                || libc::setuid(self.uid) != 0
            {
                return Err(self.fail(STAGE_IDS));
            }
            if let Err(e) = self.security.apply_capabilities(self.uid) {
                return Err(self.fail_with(STAGE_CAPS, e));
            }
            if libc::chdir(self.workdir.as_ptr()) != 0 {
                return Err(self.fail(STAGE_WORKDIR));
            }
        }
        Ok(())
    }

    /// The middle process: holds no descriptor (so pipes reach EOF when the
    /// step's processes are gone), waits for the step and exits the same way.
    unsafe fn wait_and_mirror(&self, pid: libc::pid_t) -> ! {
        unsafe {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            let mut status = 0;
            loop {
                let r = libc::waitpid(pid, &mut status, 0);
                if r == pid {
                    break;
                }
                if r < 0 && errno() != libc::EINTR {
                    libc::_exit(127);
                }
            }
            if libc::WIFSIGNALED(status) {
                let sig = libc::WTERMSIG(status);
                let no_core = libc::rlimit {
                    rlim_cur: 0,
                    rlim_max: 0,
                };
                libc::setrlimit(libc::RLIMIT_CORE, &no_core);
                libc::signal(sig, libc::SIG_DFL);
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::sigprocmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
                libc::kill(libc::getpid(), sig);
                libc::_exit(128 + sig);
            }
            libc::_exit(libc::WEXITSTATUS(status));
        }
    }
}

fn opt_ptr(c: &Option<CString>) -> *const libc::c_char {
    c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr())
}

/// Applies one op; `false` on failure (errno set).
fn apply(op: &Op, userns_fd: Option<libc::c_int>) -> bool {
    // SAFETY: syscalls on C strings owned by the op.
    unsafe {
        match op {
            Op::Mount {
                source,
                target,
                fstype,
                flags,
                data,
                optional,
            } => {
                let rc = libc::mount(
                    opt_ptr(source),
                    target.as_ptr(),
                    opt_ptr(fstype),
                    *flags,
                    opt_ptr(data).cast(),
                );
                rc == 0 || *optional
            }
            Op::Mkdir(p) => libc::mkdir(p.as_ptr(), 0o755) == 0 || errno() == libc::EEXIST,
            Op::Touch(p) => {
                let fd = libc::open(
                    p.as_ptr(),
                    libc::O_CREAT | libc::O_WRONLY | libc::O_CLOEXEC | libc::O_NOFOLLOW,
                    0o644,
                );
                fd >= 0 && libc::close(fd) == 0
            }
            Op::Symlink { target, link } => libc::symlink(target.as_ptr(), link.as_ptr()) == 0,
            Op::WriteFile {
                path,
                contents,
                owner,
            } => {
                let fd = libc::open(
                    path.as_ptr(),
                    libc::O_CREAT | libc::O_EXCL | libc::O_WRONLY | libc::O_CLOEXEC,
                    0o644,
                );
                if fd < 0 {
                    return false;
                }
                if let Some((uid, gid)) = owner
                    && libc::fchown(fd, *uid, *gid) != 0
                {
                    libc::close(fd);
                    return false;
                }
                let mut written = 0;
                while written < contents.len() {
                    let n = libc::write(
                        fd,
                        contents[written..].as_ptr().cast(),
                        contents.len() - written,
                    );
                    if n <= 0 {
                        libc::close(fd);
                        return false;
                    }
                    written += n as usize;
                }
                libc::close(fd) == 0
            }
            Op::IdmappedBind {
                source,
                target,
                flags,
            } => match userns_fd {
                Some(fd) => idmapped_bind(source, target, fd, *flags),
                None => {
                    *libc::__errno_location() = libc::EINVAL;
                    false
                }
            },
        }
    }
}

/// Brings `lo` up in the new network namespace.
pub(super) fn loopback_up() -> bool {
    // SAFETY: a socket and two ioctls on a zeroed ifreq naming "lo".
    unsafe {
        let sock = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if sock < 0 {
            return false;
        }
        let mut ifr: libc::ifreq = std::mem::zeroed();
        for (i, b) in b"lo".iter().enumerate() {
            ifr.ifr_name[i] = *b as libc::c_char;
        }
        let mut ok = libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut ifr) == 0;
        if ok {
            ifr.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            ok = libc::ioctl(sock, libc::SIOCSIFFLAGS, &ifr) == 0;
        }
        libc::close(sock);
        ok
    }
}

fn c(path: impl AsRef<std::ffi::OsStr>) -> Result<CString, RunError> {
    cstring(path.as_ref()).map_err(|e| RunError::setup("preparing the step", e))
}

fn mount_op(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> Result<Op, RunError> {
    Ok(Op::Mount {
        source: source.map(c).transpose()?,
        target: c(target)?,
        fstype: fstype.map(c).transpose()?,
        flags,
        data: data.map(c).transpose()?,
        optional: false,
    })
}

fn bind_op(source: &Path, target: &Path) -> Result<Op, RunError> {
    Ok(Op::Mount {
        source: Some(c(source)?),
        target: c(target)?,
        fstype: None,
        flags: libc::MS_BIND | libc::MS_REC,
        data: None,
        optional: false,
    })
}

/// runc's masked paths: hidden behind `/dev/null` (files) or an empty
/// read-only tmpfs (directories) unless the step is privileged.
const MASKED_PATHS: [&str; 12] = [
    "/proc/acpi",
    "/proc/asound",
    "/proc/interrupts",
    "/proc/kcore",
    "/proc/keys",
    "/proc/latency_stats",
    "/proc/timer_list",
    "/proc/timer_stats",
    "/proc/sched_debug",
    "/proc/scsi",
    "/sys/firmware",
    "/sys/devices/virtual/powercap",
];

/// runc's read-only paths under `/proc`.
const READONLY_PATHS: [&str; 5] = [
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// Builds the setup ops (with their descriptions) and creates the mount
/// points the rootfs lacks (recorded in `stubs`).
fn plan_mounts(
    spec: &RunSpec,
    rootfs: &Path,
    host_copies: &Path,
    stubs: &mut Stubs,
) -> Result<(Vec<Op>, Vec<String>), RunError> {
    let privileged = spec.security.privileged;
    let userns: Option<IdMapping> = spec.security.user_namespace;
    let mut ops = Vec::new();
    let mut what = Vec::new();
    let mut push = |op: Op, desc: String| {
        ops.push(op);
        what.push(desc);
    };
    if userns.is_some() {
        push(
            Op::IdmappedBind {
                source: c(rootfs)?,
                target: c(rootfs)?,
                flags: MountFlags {
                    nodev: !privileged,
                    ..MountFlags::default()
                },
            },
            format!("idmapping rootfs {}", rootfs.display()),
        );
    } else {
        push(
            bind_op(rootfs, rootfs)?,
            format!("binding rootfs {}", rootfs.display()),
        );
    }
    if !privileged && userns.is_none() {
        // The step keeps CAP_MKNOD (Docker's default) to create device
        // nodes for the image, but there is no device cgroup here: a node
        // it made must not open, or `mknod sda b 8 0` reads the host disk.
        push(
            remount_op(rootfs, libc::MS_NODEV)?,
            format!("making {} nodev", rootfs.display()),
        );
    }

    let proc_dir = stubs.ensure(rootfs, Path::new("/proc"), StubKind::Dir)?;
    let nosuid = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    push(
        mount_op(Some("proc"), &proc_dir, Some("proc"), nosuid, None)?,
        format!("mounting proc on {}", proc_dir.display()),
    );
    let sys = resolve_in_root(rootfs, Path::new("/sys"))
        .map_err(|e| RunError::setup("resolving /sys", e))?;
    let sys_mounted = sys.is_dir();
    if sys_mounted {
        // A fresh sysfs (never a bind of the host's /sys, whose submounts
        // such as the cgroup tree would stay writable); it shows the
        // network namespace of its mounter, which is the step's own.
        // Optional: where sysfs may not be mounted, the step sees the
        // image's own (usually empty) /sys, which reveals nothing.
        let ro = if privileged { 0 } else { libc::MS_RDONLY };
        push(
            optional(mount_op(
                Some("sysfs"),
                &sys,
                Some("sysfs"),
                nosuid | ro,
                None,
            )?),
            format!("mounting sysfs on {}", sys.display()),
        );
    }
    if !privileged {
        let dev_null = c("/dev/null")?;
        for path in MASKED_PATHS {
            let in_root = Path::new(path);
            let Ok(host_meta) = std::fs::symlink_metadata(in_root) else {
                continue;
            };
            let Some(target) = under_mounted(in_root, &proc_dir, sys_mounted.then_some(&sys))
            else {
                continue;
            };
            let op = if host_meta.is_dir() {
                mount_op(
                    Some("tmpfs"),
                    &target,
                    Some("tmpfs"),
                    nosuid | libc::MS_RDONLY,
                    None,
                )?
            } else {
                Op::Mount {
                    source: Some(dev_null.clone()),
                    target: c(&target)?,
                    fstype: None,
                    flags: libc::MS_BIND,
                    data: None,
                    optional: false,
                }
            };
            // Under /sys the mask follows the optional sysfs mount above.
            let op = if in_root.starts_with("/sys") {
                optional(op)
            } else {
                op
            };
            push(op, format!("masking {path}"));
        }
        for path in READONLY_PATHS {
            let in_root = Path::new(path);
            if std::fs::symlink_metadata(in_root).is_err() {
                continue;
            }
            let Some(target) = under_mounted(in_root, &proc_dir, None) else {
                continue;
            };
            push(
                bind_op(&target, &target)?,
                format!("binding {path} onto itself"),
            );
            push(
                remount_op(&target, nosuid | libc::MS_RDONLY)?,
                format!("making {path} read-only"),
            );
        }
    }

    let dev = stubs.ensure(rootfs, Path::new("/dev"), StubKind::Dir)?;
    let dev_data = match userns {
        Some(map) => format!(
            "mode=755,size=65536k,uid={},gid={}",
            map.host_uid, map.host_gid
        ),
        None => "mode=755,size=65536k".to_string(),
    };
    push(
        mount_op(
            Some("tmpfs"),
            &dev,
            Some("tmpfs"),
            libc::MS_NOSUID | libc::MS_NODEV | libc::MS_STRICTATIME,
            Some(&dev_data),
        )?,
        format!("mounting tmpfs on {}", dev.display()),
    );
    for name in DEVICES {
        let host = Path::new("/dev").join(name);
        if !host.exists() {
            continue;
        }
        let target = dev.join(name);
        push(
            Op::Touch(c(&target)?),
            format!("creating {}", target.display()),
        );
        push(
            bind_op(&host, &target)?,
            format!("binding {}", host.display()),
        );
    }
    let shm = dev.join("shm");
    push(Op::Mkdir(c(&shm)?), format!("creating {}", shm.display()));
    push(
        mount_op(
            Some("shm"),
            &shm,
            Some("tmpfs"),
            nosuid,
            Some("mode=1777,size=65536k"),
        )?,
        format!("mounting tmpfs on {}", shm.display()),
    );
    let pts = dev.join("pts");
    push(Op::Mkdir(c(&pts)?), format!("creating {}", pts.display()));
    push(
        mount_op(
            Some("devpts"),
            &pts,
            Some("devpts"),
            libc::MS_NOSUID | libc::MS_NOEXEC,
            Some("newinstance,ptmxmode=0666,mode=0620"),
        )?,
        format!("mounting devpts on {}", pts.display()),
    );
    for (target, link) in [
        ("pts/ptmx", "ptmx"),
        ("/proc/self/fd", "fd"),
        ("/proc/self/fd/0", "stdin"),
        ("/proc/self/fd/1", "stdout"),
        ("/proc/self/fd/2", "stderr"),
    ] {
        push(
            Op::Symlink {
                target: c(target)?,
                link: c(dev.join(link))?,
            },
            format!("linking {}", dev.join(link).display()),
        );
    }

    // The step's /etc/hosts, /etc/resolv.conf and /etc/hostname: files on a
    // tmpfs private to the step, bound into place. Never a bind of a file on
    // a host disk: a handle to any inode of a host filesystem is a way to
    // the whole of it (open_by_handle_at).
    push(
        mount_op(
            Some("tmpfs"),
            host_copies,
            Some("tmpfs"),
            nosuid,
            Some("mode=755,size=1m"),
        )?,
        format!("mounting tmpfs on {}", host_copies.display()),
    );
    let mut etc_files = Vec::new();
    for name in ["resolv.conf", "hosts"] {
        let host = Path::new("/etc").join(name);
        if let Ok(bytes) = read_regular_file(&host, 1 << 20) {
            etc_files.push((name, bytes));
        }
    }
    etc_files.push(("hostname", format!("{}\n", spec.hostname).into_bytes()));
    for (name, contents) in etc_files {
        let copy = host_copies.join(name);
        push(
            Op::WriteFile {
                path: c(&copy)?,
                contents,
                owner: userns.map(|m| (m.host_uid, m.host_gid)),
            },
            format!("writing the step's /etc/{name}"),
        );
        let target = stubs.ensure(rootfs, &Path::new("/etc").join(name), StubKind::File)?;
        push(
            bind_op(&copy, &target)?,
            format!("binding {}", target.display()),
        );
    }

    for m in &spec.mounts {
        match m {
            MountSpec::Bind {
                source,
                target,
                readonly,
            } => {
                let kind = if source.is_dir() {
                    StubKind::Dir
                } else {
                    StubKind::File
                };
                let t = stubs.ensure(rootfs, target, kind)?;
                if userns.is_some() {
                    push(
                        Op::IdmappedBind {
                            source: c(source)?,
                            target: c(&t)?,
                            flags: MountFlags {
                                nodev: !privileged,
                                nosuid: !privileged,
                                readonly: *readonly,
                            },
                        },
                        format!("idmapping {} on {}", source.display(), t.display()),
                    );
                    continue;
                }
                push(
                    bind_op(source, &t)?,
                    format!("binding {} on {}", source.display(), t.display()),
                );
                // A bind keeps the flags of the host mount it comes from: a
                // cache mount on the host disk must not let a node made in
                // it open a host device, nor run setuid programs.
                let ro = if *readonly { libc::MS_RDONLY } else { 0 };
                let nodev = if privileged {
                    0
                } else {
                    libc::MS_NODEV | libc::MS_NOSUID
                };
                if ro | nodev != 0 {
                    push(
                        remount_op(&t, ro | nodev)?,
                        format!("restricting {}", t.display()),
                    );
                }
            }
            MountSpec::Tmpfs { target, size_bytes } => {
                let t = stubs.ensure(rootfs, target, StubKind::Dir)?;
                let data = size_bytes.map(|s| format!("size={s}"));
                push(
                    mount_op(
                        Some("tmpfs"),
                        &t,
                        Some("tmpfs"),
                        libc::MS_NOSUID | libc::MS_NODEV,
                        data.as_deref(),
                    )?,
                    format!("mounting tmpfs on {}", t.display()),
                );
            }
        }
    }
    Ok((ops, what))
}

/// Where `/proc/...` or `/sys/...` lands on the host, given where the
/// step's proc and sysfs are mounted; `None` for a path under an unmounted
/// sysfs.
fn under_mounted(path: &Path, proc_dir: &Path, sys: Option<&PathBuf>) -> Option<PathBuf> {
    if let Ok(rest) = path.strip_prefix("/proc") {
        return Some(proc_dir.join(rest));
    }
    let rest = path.strip_prefix("/sys").ok()?;
    sys.map(|s| s.join(rest))
}

/// The same op, allowed to fail.
fn optional(mut op: Op) -> Op {
    if let Op::Mount { optional, .. } = &mut op {
        *optional = true;
    }
    op
}

/// Changes the per-mount flags of the bind mount at `target`.
fn remount_op(target: &Path, flags: libc::c_ulong) -> Result<Op, RunError> {
    mount_op(
        None,
        target,
        None,
        libc::MS_BIND | libc::MS_REMOUNT | flags,
        None,
    )
}

/// Reads a host file only if it is a regular one (a FIFO would block the
/// build) and not larger than `limit`.
fn read_regular_file(path: &Path, limit: u64) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut bytes = Vec::new();
    crate::sources::context::open_regular_file(path)?
        .take(limit)
        .read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// `/a/b/c` -> `["/a", "/a/b", "/a/b/c"]` (made inside the new root, where
/// symlinks can only resolve inside it).
fn workdir_chain(workdir: &Path) -> Result<Vec<CString>, RunError> {
    let mut chain = Vec::new();
    let mut cur = PathBuf::from("/");
    for comp in workdir.components() {
        if let std::path::Component::Normal(n) = comp {
            cur.push(n);
            chain.push(c(&cur)?);
        }
    }
    Ok(chain)
}

fn read_failure(err_read: OwnedFd) -> Option<(u32, i32)> {
    let mut buf = Vec::new();
    std::fs::File::from(err_read).read_to_end(&mut buf).ok()?;
    if buf.len() < 8 {
        return None;
    }
    let stage = u32::from_ne_bytes(buf[..4].try_into().ok()?);
    let e = i32::from_ne_bytes(buf[4..8].try_into().ok()?);
    Some((stage, e))
}

impl Runner for ChrootRunner {
    fn run(&self, spec: &RunSpec) -> Result<RunOutcome, RunError> {
        let argv0 = spec.argv.first().ok_or(RunError::EmptyCommand)?;
        let rootfs = std::fs::canonicalize(&spec.rootfs)
            .map_err(|e| RunError::setup(format!("rootfs {}", spec.rootfs.display()), e))?;
        let user = match &spec.user {
            Some(u) => resolve_user(&rootfs, u)?,
            None => ResolvedUser::root(),
        };
        let env = step_env(&spec.env, &user);
        let host_copies =
            tempfile::tempdir().map_err(|e| RunError::setup("temporary directory", e))?;
        let mut stubs = Stubs::default();
        let user_namespace = spec
            .security
            .user_namespace
            .as_ref()
            .map(UserNamespace::create)
            .transpose()?;
        let (ops, what) = plan_mounts(spec, &rootfs, host_copies.path(), &mut stubs)?;

        let (err_read, err_write) =
            super::output_pipe().map_err(|e| RunError::setup("creating a pipe", e))?;
        let mut ns_flags =
            libc::CLONE_NEWNS | libc::CLONE_NEWPID | libc::CLONE_NEWIPC | libc::CLONE_NEWUTS;
        if spec.network == NetworkMode::None {
            ns_flags |= libc::CLONE_NEWNET;
        }
        let workdir = if spec.workdir.is_absolute() {
            spec.workdir.clone()
        } else {
            Path::new("/").join(&spec.workdir)
        };
        let plan = ChildPlan {
            ns_flags,
            rootfs: c(&rootfs)?,
            ops,
            net_none: spec.network == NetworkMode::None,
            hostname: c(&spec.hostname)?,
            workdir_chain: workdir_chain(&workdir)?,
            workdir: c(&workdir)?,
            uid: user.uid,
            gid: user.gid,
            groups: user.groups.clone(),
            security: PreparedSecurity::prepare(&spec.security)?,
            userns_fd: user_namespace.as_ref().map(UserNamespace::raw_fd),
            err_fd: err_write.as_raw_fd(),
        };

        let (out_read, out_write) =
            output_pipe().map_err(|e| RunError::setup("creating a pipe", e))?;
        let out_write2 = out_write
            .try_clone()
            .map_err(|e| RunError::setup("creating a pipe", e))?;
        let mut cmd = Command::new(argv0);
        cmd.args(&spec.argv[1..])
            .env_clear()
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::from(out_write))
            .stderr(Stdio::from(out_write2));
        // SAFETY: `enter` only makes async-signal-safe syscalls on data
        // prepared above (see the module doc).
        unsafe {
            cmd.pre_exec(move || plan.enter());
        }
        let started = Instant::now();
        let spawned = cmd.spawn();
        // Drops our copies of the pipes' write ends (held by `cmd`).
        drop(cmd);
        drop(err_write);
        let mut child = match spawned {
            Ok(child) => child,
            Err(source) => {
                drop(out_read);
                stubs.remove();
                return Err(match read_failure(err_read) {
                    Some((stage, e)) => {
                        let desc = match stage {
                            STAGE_UNSHARE => "creating namespaces".to_string(),
                            STAGE_FORK => "forking into the PID namespace".into(),
                            STAGE_PRIVATE => "making mounts private".into(),
                            STAGE_PIVOT => format!("pivot_root into {}", rootfs.display()),
                            STAGE_HOSTNAME => "setting the hostname".into(),
                            STAGE_LOOPBACK => "bringing up lo".into(),
                            STAGE_WORKDIR => {
                                format!("entering working directory {}", workdir.display())
                            }
                            STAGE_IDS => format!("switching to uid {} gid {}", user.uid, user.gid),
                            STAGE_SECCOMP => "installing the seccomp filter".into(),
                            STAGE_BOUNDING => "dropping capabilities from the bounding set".into(),
                            STAGE_CAPS => "setting the step's capabilities".into(),
                            STAGE_USERNS => "joining the step's user namespace".into(),
                            i => what
                                .get(i as usize)
                                .cloned()
                                .unwrap_or_else(|| format!("step {i}")),
                        };
                        RunError::setup(desc, std::io::Error::from_raw_os_error(e))
                    }
                    None => RunError::Spawn {
                        argv0: argv0.clone(),
                        source,
                    },
                });
            }
        };
        let pump = spawn_pump(out_read, spec.output.clone());
        let status = child.wait();
        let tail = pump.recv().unwrap_or_default();
        stubs.remove();
        let status = status.map_err(|e| RunError::setup("waiting for the step", e))?;
        use std::os::unix::process::ExitStatusExt;
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
    use std::sync::{Arc, Mutex};

    struct Root {
        dir: tempfile::TempDir,
    }

    impl Root {
        fn new() -> Self {
            let dir = tempfile::tempdir().unwrap();
            testroot::make(dir.path());
            Root { dir }
        }
        fn path(&self) -> &Path {
            self.dir.path()
        }
        fn spec(&self, script: &str) -> RunSpec {
            RunSpec::new(
                self.path(),
                vec!["/bin/sh".into(), "-c".into(), script.into()],
            )
        }
    }

    fn run(spec: &RunSpec) -> (RunOutcome, String) {
        let buf: Arc<Mutex<Vec<u8>>> = Arc::new(Mutex::new(Vec::new()));
        let mut spec = spec.clone();
        spec.output.writer = Some(buf.clone());
        spec.output.prefix = "[step] ".into();
        let out = ChrootRunner::new().run(&spec).unwrap();
        let text = String::from_utf8(buf.lock().unwrap().clone()).unwrap();
        (out, text)
    }

    /// The host's mount table, less the mounts that other tests running at
    /// the same time make in their own temporary directories (the step's
    /// would be below `own`, and are kept).
    fn mountinfo(own: &Path) -> String {
        let tmp = std::env::temp_dir().display().to_string();
        let own = own.display().to_string();
        std::fs::read_to_string("/proc/self/mountinfo")
            .unwrap()
            .lines()
            .filter(|l| {
                l.split_whitespace().nth(4).is_none_or(|point| {
                    !point.starts_with(&tmp) || point == tmp || point.starts_with(&own)
                })
            })
            .map(|l| format!("{l}\n"))
            .collect()
    }

    #[test]
    fn echo_streams_prefixed_output_and_succeeds() {
        let r = Root::new();
        let (out, text) = run(&r.spec("echo hello; echo oops >&2"));
        assert!(out.success());
        assert_eq!(text, "[step] hello\n[step] oops\n");
        assert_eq!(out.tail, vec!["hello", "oops"]);
    }

    #[test]
    fn exit_codes_propagate() {
        let r = Root::new();
        let (out, _) = run(&r.spec("exit 7"));
        assert_eq!(out.status, ExitStatus::Code(7));
        let (out, _) = run(&r.spec("sh -c 'exit 42'"));
        assert_eq!(out.status, ExitStatus::Code(42));
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        let r = Root::new();
        let mut spec = r.spec("for i in 1 2 3 4 5; do echo line$i; done; exit 3");
        spec.output.tail_lines = 2;
        let (out, _) = run(&spec);
        assert_eq!(out.tail, vec!["line4", "line5"]);
        assert_eq!(out.status, ExitStatus::Code(3));
    }

    #[test]
    fn writes_land_in_the_rootfs() {
        let r = Root::new();
        let (out, _) = run(&r.spec("echo data > /tmp/written && mkdir -p /opt/x"));
        assert!(out.success());
        assert_eq!(
            std::fs::read(r.path().join("tmp/written")).unwrap(),
            b"data\n"
        );
        assert!(r.path().join("opt/x").is_dir());
    }

    #[test]
    fn user_groups_env_cwd_and_hostname_are_applied() {
        let r = Root::new();
        let mut spec = r.spec("id -u; id -g; id -G; echo $HOME; echo $PATH; echo $FOO; pwd; hostname; ls -ld . | awk '{print $3}'");
        spec.user = Some("builder".into());
        spec.env = vec![("FOO".into(), "bar baz".into())];
        spec.workdir = "/work/dir".into();
        spec.hostname = "stepbox".into();
        let (out, _) = run(&spec);
        assert!(out.success(), "{:?}", out.tail);
        assert_eq!(
            out.tail,
            vec![
                "1000",
                "1000",
                "1000 2000",
                "/home/builder",
                super::super::DEFAULT_PATH,
                "bar baz",
                "/work/dir",
                "stepbox",
                "builder"
            ]
        );
        let meta = std::fs::metadata(r.path().join("work/dir")).unwrap();
        use std::os::unix::fs::MetadataExt;
        assert_eq!((meta.uid(), meta.gid()), (1000, 1000));
    }

    #[test]
    fn numeric_user_and_group() {
        let r = Root::new();
        let mut spec = r.spec("id -u; id -g; id -G");
        spec.user = Some("4242:4343".into());
        let (out, _) = run(&spec);
        assert_eq!(out.tail, vec!["4242", "4343", "4343"]);
    }

    #[test]
    fn proc_shows_a_new_pid_namespace() {
        let r = Root::new();
        let (out, _) =
            run(&r.spec("echo $$; cat /proc/1/cmdline | tr '\\0' ' '; echo; ps -o pid | wc -l"));
        assert!(out.success(), "{:?}", out.tail);
        assert_eq!(out.tail[0], "1");
        assert!(out.tail[1].starts_with("/bin/sh -c"), "{:?}", out.tail);
        // header + sh + ps + wc (and the subshell, at most).
        let n: usize = out.tail[2].trim().parse().unwrap();
        assert!(n <= 5, "saw {n} lines of ps: host processes are visible");
    }

    #[test]
    fn network_none_has_only_loopback_up() {
        let r = Root::new();
        let mut spec = r.spec("ls /sys/class/net 2>/dev/null || cat /proc/net/dev | tail -n +3 | cut -d: -f1 | tr -d ' '; ip link show lo | head -1");
        spec.network = NetworkMode::None;
        let (out, _) = run(&spec);
        assert!(out.success(), "{:?}", out.tail);
        assert_eq!(out.tail[0], "lo");
        assert!(out.tail[1].contains("UP"), "{:?}", out.tail);
    }

    #[test]
    fn background_processes_die_with_the_step() {
        let r = Root::new();
        let started = Instant::now();
        let (out, _) = run(&r.spec("sleep 300 > /dev/null 2>&1 & echo started"));
        assert!(out.success());
        // Output pipe reached EOF: no process of the step is left.
        assert!(started.elapsed().as_secs() < 30);
        // The kernel kills the rest of the step's PID namespace when its
        // init exits; the killed process can stay in the table for a
        // moment while it is torn down, so allow it a little time to go.
        let sleeping = || {
            let ps = Command::new("ps").args(["-eo", "args"]).output().unwrap();
            String::from_utf8_lossy(&ps.stdout)
                .lines()
                .any(|l| l == "sleep 300")
        };
        let deadline = Instant::now() + std::time::Duration::from_secs(5);
        while sleeping() && Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        assert!(!sleeping(), "the step's background process outlived it");
    }

    #[test]
    fn host_mount_table_is_unchanged_and_stubs_are_removed() {
        let r = Root::new();
        assert!(!r.path().join("proc").exists());
        let before = mountinfo(r.path());
        let (out, _) = run(&r.spec("mount | grep -c . ; test -c /dev/null && echo devnull; test -f /etc/resolv.conf && echo resolv"));
        assert!(out.success(), "{:?}", out.tail);
        assert!(out.tail.contains(&"devnull".to_string()));
        assert_eq!(before, mountinfo(r.path()));
        for stub in [
            "proc",
            "dev",
            "etc/resolv.conf",
            "etc/hosts",
            "etc/hostname",
        ] {
            assert!(!r.path().join(stub).exists(), "{stub} left in the rootfs");
        }
        // Also after a failing step.
        let (out, _) = run(&r.spec("exit 1"));
        assert!(!out.success());
        assert_eq!(before, mountinfo(r.path()));
    }

    #[test]
    fn resolv_conf_written_by_the_step_does_not_touch_the_host() {
        let r = Root::new();
        let host_before = std::fs::read("/etc/resolv.conf").ok();
        let (out, _) = run(&r.spec("echo 'nameserver 9.9.9.9' > /etc/resolv.conf"));
        assert!(out.success() || host_before.is_none(), "{:?}", out.tail);
        assert_eq!(std::fs::read("/etc/resolv.conf").ok(), host_before);
    }

    #[test]
    fn escapes_through_dotdot_and_symlinks_stay_inside() {
        let r = Root::new();
        let host = tempfile::tempdir().unwrap();
        let target = host.path().join("escape");
        let script = format!(
            "echo x > /../../../{t}; ln -s {dir} /link; echo y > /link/escape; cd /; cd ../../..; echo z > escape2",
            t = target.display(),
            dir = host.path().display()
        );
        let (out, _) = run(&r.spec(&script));
        let _ = out;
        assert!(!target.exists());
        assert_eq!(std::fs::read_dir(host.path()).unwrap().count(), 0);
        assert!(r.path().join("escape2").exists());
    }

    #[test]
    fn bind_and_tmpfs_mounts_are_visible_and_removed() {
        let r = Root::new();
        let src = tempfile::tempdir().unwrap();
        std::fs::write(src.path().join("in"), b"from host\n").unwrap();
        let mut spec = r.spec("cat /mnt/src/in; echo no > /mnt/src/new || echo readonly; echo t > /cache/t && echo tmpfs-ok");
        spec.mounts = vec![
            MountSpec::Bind {
                source: src.path().to_path_buf(),
                target: "/mnt/src".into(),
                readonly: true,
            },
            MountSpec::Tmpfs {
                target: "/cache".into(),
                size_bytes: Some(1 << 20),
            },
        ];
        let (out, _) = run(&spec);
        assert!(
            out.tail.contains(&"from host".to_string()),
            "{:?}",
            out.tail
        );
        assert!(out.tail.contains(&"readonly".to_string()));
        assert!(out.tail.contains(&"tmpfs-ok".to_string()));
        assert!(!src.path().join("new").exists());
        assert!(!r.path().join("cache").exists());
        assert!(!r.path().join("mnt").exists());
    }

    /// The runner's mount points (/proc, /dev, /etc/resolv.conf,
    /// /etc/hosts, RUN --mount targets) never show up in the step's change.
    #[test]
    fn on_overlay_only_the_steps_own_writes_are_a_change() {
        use crate::build::snapshot::{ChangeKind, Snapshotter, overlay::OverlaySnapshotter};
        let r = Root::new();
        let scratch = tempfile::tempdir().unwrap();
        let snap = OverlaySnapshotter::new();
        let m = snap
            .prepare(&[r.path().to_path_buf()], scratch.path())
            .unwrap();
        let mut spec = RunSpec::new(
            &m.rootfs,
            vec![
                "/bin/sh".into(),
                "-c".into(),
                "echo hi > /tmp/x; cat /etc/hosts > /dev/null".into(),
            ],
        );
        spec.mounts = vec![MountSpec::Tmpfs {
            target: "/run/cache".into(),
            size_bytes: None,
        }];
        let out = ChrootRunner::new().run(&spec).unwrap();
        assert!(out.success(), "{:?}", out.tail);
        let change = snap.diff(&m).unwrap();
        let got: Vec<_> = change
            .entries()
            .iter()
            .map(|e| {
                (
                    e.path.display().to_string(),
                    matches!(e.kind, ChangeKind::Delete),
                )
            })
            .collect();
        assert_eq!(
            got,
            vec![("tmp".to_string(), false), ("tmp/x".to_string(), false)]
        );
        // And the layer holds exactly that.
        use crate::build::layer::{LayerOptions, write_layer};
        let out_dir = tempfile::tempdir().unwrap();
        let layer = write_layer(&change, &LayerOptions::default(), out_dir.path())
            .unwrap()
            .unwrap();
        let gz = std::fs::File::open(&layer.path).unwrap();
        let mut ar = tar::Archive::new(flate2::read::GzDecoder::new(gz));
        let mut entries = Vec::new();
        for e in ar.entries().unwrap() {
            let mut e = e.unwrap();
            let mut data = String::new();
            e.read_to_string(&mut data).unwrap();
            entries.push((e.path().unwrap().display().to_string(), data));
        }
        assert_eq!(
            entries,
            vec![
                ("tmp/".to_string(), String::new()),
                ("tmp/x".into(), "hi\n".into())
            ]
        );
        snap.release(m).unwrap();
    }

    #[test]
    fn with_walk_only_the_steps_own_writes_are_a_change() {
        use crate::build::snapshot::{Snapshotter, walk::WalkSnapshotter};
        let r = Root::new();
        let snap = WalkSnapshotter::default();
        let m = snap.prepare(&[r.path().to_path_buf()], r.path()).unwrap();
        let (out, _) = run(&r.spec("echo hi > /tmp/x; cat /etc/resolv.conf > /dev/null"));
        assert!(out.success(), "{:?}", out.tail);
        let got: Vec<_> = snap
            .diff(&m)
            .unwrap()
            .entries()
            .iter()
            .map(|e| e.path.display().to_string())
            .collect();
        assert_eq!(got, vec!["tmp", "tmp/x"]);
    }

    /// Waits for a process whose argv is exactly `cmdline` to appear.
    fn find_process(cmdline: &[u8]) -> i32 {
        let deadline = Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let found = std::fs::read_dir("/proc").unwrap().find_map(|e| {
                let e = e.ok()?;
                let cmd = std::fs::read(e.path().join("cmdline")).ok()?;
                if cmd != cmdline {
                    return None;
                }
                e.file_name().to_string_lossy().parse::<i32>().ok()
            });
            if let Some(pid) = found {
                return pid;
            }
            assert!(Instant::now() < deadline, "step never started");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    fn is_gone(pid: i32) -> bool {
        let deadline = Instant::now() + std::time::Duration::from_secs(10);
        while Instant::now() < deadline {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z") {
                return true;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        false
    }

    /// Killing the step from outside (the executor's side) is reported as
    /// that signal, not as an exit code.
    #[test]
    fn a_step_killed_by_a_signal_reports_the_signal() {
        let r = Root::new();
        let spec = r.spec("exec sleep 4243");
        let handle = std::thread::spawn(move || ChrootRunner::new().run(&spec).unwrap());
        let pid = find_process(b"sleep\x004243\x00");
        // SAFETY: signalling the step process found above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let out = handle.join().unwrap();
        assert_eq!(out.status, ExitStatus::Signal(libc::SIGKILL));
    }

    /// If the process between the executor and the step dies (the executor
    /// was interrupted), the step dies with it (PR_SET_PDEATHSIG), and so
    /// does everything in its PID namespace.
    #[test]
    fn when_the_middle_process_dies_the_step_dies_too() {
        let r = Root::new();
        let spec = r.spec("sleep 4245 & exec sleep 4244");
        let handle = std::thread::spawn(move || ChrootRunner::new().run(&spec).unwrap());
        let step = find_process(b"sleep\x004244\x00");
        let background = find_process(b"sleep\x004245\x00");
        let status = std::fs::read_to_string(format!("/proc/{step}/status")).unwrap();
        let middle: i32 = status
            .lines()
            .find_map(|l| l.strip_prefix("PPid:"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        // SAFETY: signalling the step's parent, found above.
        unsafe { libc::kill(middle, libc::SIGKILL) };
        let out = handle.join().unwrap();
        assert_eq!(out.status, ExitStatus::Signal(libc::SIGKILL));
        assert!(is_gone(step), "step survived its parent");
        assert!(is_gone(background), "background process survived");
    }

    #[test]
    fn missing_command_and_unknown_user_are_errors() {
        let r = Root::new();
        let spec = RunSpec::new(r.path(), vec!["/bin/does-not-exist".into()]);
        let err = ChrootRunner::new().run(&spec).unwrap_err();
        assert!(matches!(err, RunError::Spawn { .. }), "{err}");
        assert!(!r.path().join("proc").exists());
        let mut spec = r.spec("true");
        spec.user = Some("nobody-such".into());
        assert!(matches!(
            ChrootRunner::new().run(&spec).unwrap_err(),
            RunError::User(_)
        ));
        let spec = RunSpec::new(r.path(), vec![]);
        assert!(matches!(
            ChrootRunner::new().run(&spec).unwrap_err(),
            RunError::EmptyCommand
        ));
    }
}
