//! What a RUN step may do under `--isolation chroot`: the capabilities it
//! keeps and the system calls it may make. This is the security boundary of
//! a build (docs/security.md): the rootfs and namespaces decide what a step
//! can see, this module decides what it can do with what it sees.
//!
//! The default, [`StepSecurity::default`], is what Docker and BuildKit give
//! a RUN step: Docker's 14 default capabilities (bounding, permitted and
//! effective sets; the ambient and inheritable sets empty) and a seccomp
//! filter with the semantics of moby's default profile: an allow-list of
//! system calls, `EPERM` for the ones known to reach past a container
//! (mount, `open_by_handle_at`, `kexec_load`, module loading, `bpf`,
//! `keyctl`, new namespaces, ...), `ENOSYS` for anything unknown (so that
//! newer calls such as `clone3` fall back the way libc expects). A system
//! call gated on a capability in moby's profile is allowed exactly when the
//! step holds that capability (`--cap-add`). `no_new_privs` stays off, as in
//! Docker, so setuid programs in a RUN keep working: capabilities and
//! seccomp are the boundary.
//!
//! Promises: [`PreparedSecurity`] is built before the fork (it allocates);
//! its `apply_*` functions make only async-signal-safe system calls and are
//! called by the step process in the order the chroot runner documents
//! (seccomp while it still holds `CAP_SYS_ADMIN`, then the bounding set,
//! then the identity switch, then the final capability sets). The BPF
//! program is compiled by `seccompiler`, never assembled by hand.

use super::RunError;
use super::userns::IdMapping;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};
use std::collections::BTreeMap;

/// Linux capability names, indexed by number (`capability.h`).
const CAP_NAMES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// Docker's default capability set for a container (and so for a RUN step
/// in Docker and BuildKit).
const DOCKER_DEFAULT_CAPS: [&str; 14] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "FSETID",
    "FOWNER",
    "MKNOD",
    "NET_RAW",
    "SETGID",
    "SETUID",
    "SETFCAP",
    "SETPCAP",
    "NET_BIND_SERVICE",
    "SYS_CHROOT",
    "KILL",
    "AUDIT_WRITE",
];

/// A set of capabilities, one bit per capability number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CapSet(u64);

impl CapSet {
    pub const EMPTY: CapSet = CapSet(0);

    /// Every capability this module knows by name.
    pub fn all() -> CapSet {
        CapSet((1u64 << CAP_NAMES.len()) - 1)
    }

    pub fn docker_default() -> CapSet {
        let mut set = CapSet::EMPTY;
        for name in DOCKER_DEFAULT_CAPS {
            if let Some(n) = cap_number(name) {
                set.0 |= 1 << n;
            }
        }
        set
    }

    pub fn contains(self, name: &str) -> bool {
        cap_number(name).is_some_and(|n| self.0 & (1 << n) != 0)
    }

    pub fn bits(self) -> u64 {
        self.0
    }

    /// Adds a capability by name (`NET_ADMIN`, `CAP_NET_ADMIN`, any case)
    /// or `ALL`.
    pub fn add(&mut self, name: &str) -> Result<(), UnknownCapability> {
        if name.eq_ignore_ascii_case("all") {
            *self = CapSet::all();
            return Ok(());
        }
        let n = cap_number(name).ok_or_else(|| UnknownCapability(name.to_string()))?;
        self.0 |= 1 << n;
        Ok(())
    }

    /// Removes a capability by name, or every one with `ALL`.
    pub fn drop_cap(&mut self, name: &str) -> Result<(), UnknownCapability> {
        if name.eq_ignore_ascii_case("all") {
            *self = CapSet::EMPTY;
            return Ok(());
        }
        let n = cap_number(name).ok_or_else(|| UnknownCapability(name.to_string()))?;
        self.0 &= !(1 << n);
        Ok(())
    }

    /// `CAP_`-prefixed names, in capability-number order.
    pub fn names(self) -> Vec<String> {
        CAP_NAMES
            .iter()
            .enumerate()
            .filter(|(n, _)| self.0 & (1 << n) != 0)
            .map(|(_, name)| format!("CAP_{name}"))
            .collect()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown capability {0:?} (expected a name such as NET_ADMIN or CAP_NET_ADMIN, or ALL)")]
pub struct UnknownCapability(pub String);

fn cap_number(name: &str) -> Option<usize> {
    let upper = name.to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    CAP_NAMES.iter().position(|n| *n == bare)
}

/// Whether the step's system calls are filtered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Seccomp {
    /// moby's default profile semantics (see the module doc).
    #[default]
    Default,
    /// No filter (`--security-opt seccomp=unconfined`).
    Unconfined,
}

/// The security settings of one RUN step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSecurity {
    /// The bounding set, and for a root step also the permitted and
    /// effective sets. A non-root step starts with no effective
    /// capability; setuid programs gain at most these.
    pub capabilities: CapSet,
    pub seccomp: Seccomp,
    /// `RUN --security=insecure` (allowed by `--allow security.insecure`):
    /// no masked paths, writable `/proc/sys` and `/sys`, device nodes usable
    /// everywhere, as BuildKit's insecure mode and `docker run --privileged`.
    pub privileged: bool,
    /// `--userns auto`: the step's ids 0..size are these host ids
    /// (runner/userns.rs); `None`: the step's root is the host's root.
    pub user_namespace: Option<IdMapping>,
}

impl Default for StepSecurity {
    fn default() -> Self {
        StepSecurity {
            capabilities: CapSet::docker_default(),
            seccomp: Seccomp::Default,
            privileged: false,
            user_namespace: None,
        }
    }
}

impl StepSecurity {
    /// What `RUN --security=insecure` gets: every capability, no filter.
    pub fn insecure() -> Self {
        StepSecurity {
            capabilities: CapSet::all(),
            seccomp: Seccomp::Unconfined,
            privileged: true,
            user_namespace: None,
        }
    }
}

/// Syscall numbers by name for the native architecture.
macro_rules! syscalls {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name as i64)),*]
    };
}

type SyscallTable = &'static [(&'static str, i64)];

/// Allowed unconditionally on every architecture (moby's allow-list less
/// what needs a capability Docker does not grant; the `SYS_` prefix is
/// libc's).
const ALLOWED: SyscallTable = syscalls![
    SYS_accept,
    SYS_accept4,
    SYS_adjtimex,
    SYS_bind,
    SYS_brk,
    SYS_capget,
    SYS_capset,
    SYS_chdir,
    SYS_clock_getres,
    SYS_clock_gettime,
    SYS_clock_nanosleep,
    SYS_clone,
    SYS_close,
    SYS_close_range,
    SYS_connect,
    SYS_copy_file_range,
    SYS_dup,
    SYS_dup3,
    SYS_epoll_create1,
    SYS_epoll_ctl,
    SYS_epoll_pwait,
    SYS_epoll_pwait2,
    SYS_eventfd2,
    SYS_execve,
    SYS_execveat,
    SYS_exit,
    SYS_exit_group,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fadvise64,
    SYS_fallocate,
    SYS_fanotify_mark,
    SYS_fchdir,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_fchown,
    SYS_fchownat,
    SYS_fcntl,
    SYS_fdatasync,
    SYS_fgetxattr,
    SYS_flistxattr,
    SYS_flock,
    SYS_fremovexattr,
    SYS_fsetxattr,
    SYS_fstat,
    SYS_fstatfs,
    SYS_fsync,
    SYS_ftruncate,
    SYS_futex,
    SYS_get_mempolicy,
    SYS_get_robust_list,
    SYS_getcpu,
    SYS_getcwd,
    SYS_getdents64,
    SYS_getegid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getgroups,
    SYS_getitimer,
    SYS_getpeername,
    SYS_getpgid,
    SYS_getpid,
    SYS_getppid,
    SYS_getpriority,
    SYS_getrandom,
    SYS_getresgid,
    SYS_getresuid,
    SYS_getrlimit,
    SYS_getrusage,
    SYS_getsid,
    SYS_getsockname,
    SYS_getsockopt,
    SYS_gettid,
    SYS_gettimeofday,
    SYS_getuid,
    SYS_getxattr,
    SYS_inotify_add_watch,
    SYS_inotify_init1,
    SYS_inotify_rm_watch,
    SYS_io_cancel,
    SYS_io_destroy,
    SYS_io_getevents,
    SYS_io_setup,
    SYS_io_submit,
    SYS_ioctl,
    SYS_ioprio_get,
    SYS_ioprio_set,
    SYS_kill,
    SYS_landlock_add_rule,
    SYS_landlock_create_ruleset,
    SYS_landlock_restrict_self,
    SYS_lgetxattr,
    SYS_linkat,
    SYS_listen,
    SYS_listxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_lseek,
    SYS_lsetxattr,
    SYS_madvise,
    SYS_mbind,
    SYS_membarrier,
    SYS_memfd_create,
    SYS_memfd_secret,
    SYS_mincore,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_mlock,
    SYS_mlock2,
    SYS_mlockall,
    SYS_mmap,
    SYS_mprotect,
    SYS_mq_getsetattr,
    SYS_mq_notify,
    SYS_mq_open,
    SYS_mq_timedreceive,
    SYS_mq_timedsend,
    SYS_mq_unlink,
    SYS_mremap,
    SYS_msgctl,
    SYS_msgget,
    SYS_msgrcv,
    SYS_msgsnd,
    SYS_msync,
    SYS_munlock,
    SYS_munlockall,
    SYS_munmap,
    SYS_name_to_handle_at,
    SYS_nanosleep,
    SYS_newfstatat,
    SYS_openat,
    SYS_openat2,
    SYS_pidfd_getfd,
    SYS_pidfd_open,
    SYS_pidfd_send_signal,
    SYS_pipe2,
    SYS_pkey_alloc,
    SYS_pkey_free,
    SYS_pkey_mprotect,
    SYS_ppoll,
    SYS_prctl,
    SYS_pread64,
    SYS_preadv,
    SYS_preadv2,
    SYS_prlimit64,
    SYS_process_mrelease,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_pselect6,
    SYS_ptrace,
    SYS_pwrite64,
    SYS_pwritev,
    SYS_pwritev2,
    SYS_read,
    SYS_readahead,
    SYS_readlinkat,
    SYS_readv,
    SYS_recvfrom,
    SYS_recvmmsg,
    SYS_recvmsg,
    SYS_remap_file_pages,
    SYS_removexattr,
    SYS_renameat2,
    SYS_restart_syscall,
    SYS_rseq,
    SYS_rt_sigaction,
    SYS_rt_sigpending,
    SYS_rt_sigprocmask,
    SYS_rt_sigqueueinfo,
    SYS_rt_sigreturn,
    SYS_rt_sigsuspend,
    SYS_rt_sigtimedwait,
    SYS_rt_tgsigqueueinfo,
    SYS_sched_get_priority_max,
    SYS_sched_get_priority_min,
    SYS_sched_getaffinity,
    SYS_sched_getattr,
    SYS_sched_getparam,
    SYS_sched_getscheduler,
    SYS_sched_rr_get_interval,
    SYS_sched_setaffinity,
    SYS_sched_setattr,
    SYS_sched_setparam,
    SYS_sched_setscheduler,
    SYS_sched_yield,
    SYS_seccomp,
    SYS_semctl,
    SYS_semget,
    SYS_semop,
    SYS_semtimedop,
    SYS_sendfile,
    SYS_sendmmsg,
    SYS_sendmsg,
    SYS_sendto,
    SYS_set_mempolicy,
    SYS_set_robust_list,
    SYS_set_tid_address,
    SYS_setfsgid,
    SYS_setfsuid,
    SYS_setgid,
    SYS_setgroups,
    SYS_setitimer,
    SYS_setpgid,
    SYS_setpriority,
    SYS_setregid,
    SYS_setresgid,
    SYS_setresuid,
    SYS_setreuid,
    SYS_setrlimit,
    SYS_setsid,
    SYS_setsockopt,
    SYS_setuid,
    SYS_setxattr,
    SYS_shmat,
    SYS_shmctl,
    SYS_shmdt,
    SYS_shmget,
    SYS_shutdown,
    SYS_sigaltstack,
    SYS_signalfd4,
    SYS_socket,
    SYS_socketpair,
    SYS_splice,
    SYS_statfs,
    SYS_statx,
    SYS_symlinkat,
    SYS_sync,
    SYS_sync_file_range,
    SYS_syncfs,
    SYS_sysinfo,
    SYS_tee,
    SYS_tgkill,
    SYS_timer_create,
    SYS_timer_delete,
    SYS_timer_getoverrun,
    SYS_timer_gettime,
    SYS_timer_settime,
    SYS_timerfd_create,
    SYS_timerfd_gettime,
    SYS_timerfd_settime,
    SYS_times,
    SYS_tkill,
    SYS_truncate,
    SYS_umask,
    SYS_uname,
    SYS_unlinkat,
    SYS_utimensat,
    SYS_wait4,
    SYS_waitid,
    SYS_write,
    SYS_writev,
];

/// The legacy x86_64 entry points of the same calls.
#[cfg(target_arch = "x86_64")]
const ALLOWED_ARCH: SyscallTable = syscalls![
    SYS_access,
    SYS_alarm,
    SYS_arch_prctl,
    SYS_chmod,
    SYS_chown,
    SYS_creat,
    SYS_dup2,
    SYS_epoll_create,
    SYS_epoll_wait,
    SYS_eventfd,
    SYS_fork,
    SYS_futimesat,
    SYS_get_thread_area,
    SYS_getdents,
    SYS_getpgrp,
    SYS_inotify_init,
    SYS_lchown,
    SYS_link,
    SYS_lstat,
    SYS_mkdir,
    SYS_mknod,
    SYS_modify_ldt,
    SYS_open,
    SYS_pause,
    SYS_pipe,
    SYS_poll,
    SYS_readlink,
    SYS_rename,
    SYS_renameat,
    SYS_rmdir,
    SYS_select,
    SYS_set_thread_area,
    SYS_signalfd,
    SYS_stat,
    SYS_symlink,
    SYS_time,
    SYS_unlink,
    SYS_utime,
    SYS_utimes,
    SYS_vfork,
];
#[cfg(not(target_arch = "x86_64"))]
const ALLOWED_ARCH: SyscallTable = &[];

/// Calls moby's profile allows only with a capability, by that capability;
/// refused with `EPERM` without it.
const GATED: &[(&str, SyscallTable)] = &[
    ("DAC_READ_SEARCH", syscalls![SYS_open_by_handle_at]),
    (
        "SYS_ADMIN",
        syscalls![
            SYS_bpf,
            SYS_fanotify_init,
            SYS_lookup_dcookie,
            SYS_perf_event_open,
            SYS_quotactl,
            SYS_setdomainname,
            SYS_sethostname,
            SYS_setns,
            SYS_mount,
            SYS_umount2,
            SYS_pivot_root,
            SYS_unshare,
            SYS_mount_setattr,
            SYS_move_mount,
            SYS_open_tree,
            SYS_fsopen,
            SYS_fsconfig,
            SYS_fsmount,
            SYS_fspick,
        ],
    ),
    ("SYS_CHROOT", syscalls![SYS_chroot]),
    (
        "SYS_MODULE",
        syscalls![SYS_init_module, SYS_finit_module, SYS_delete_module],
    ),
    ("SYS_PACCT", syscalls![SYS_acct]),
    ("SYS_PTRACE", syscalls![SYS_kcmp, SYS_process_madvise]),
    (
        "SYS_TIME",
        syscalls![SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime],
    ),
    ("SYS_TTY_CONFIG", syscalls![SYS_vhangup]),
    ("SYS_BOOT", syscalls![SYS_reboot]),
    ("SYSLOG", syscalls![SYS_syslog]),
];

#[cfg(target_arch = "x86_64")]
const GATED_ARCH: &[(&str, SyscallTable)] = &[("SYS_RAWIO", syscalls![SYS_iopl, SYS_ioperm])];
#[cfg(not(target_arch = "x86_64"))]
const GATED_ARCH: &[(&str, SyscallTable)] = &[];

fn gated() -> impl Iterator<Item = &'static (&'static str, SyscallTable)> {
    GATED.iter().chain(GATED_ARCH)
}

/// Refused with `EPERM` whatever the capabilities: they reach state that no
/// namespace isolates (kernel keyrings, kexec, swap, io_uring's own
/// syscall surface, userfaultfd). `clone3` is not here on purpose: its
/// flags sit behind a pointer no filter can read, so it is refused with
/// `ENOSYS` (the allow-list's answer), on which libc falls back to `clone`.
const DENIED: SyscallTable = syscalls![
    SYS_keyctl,
    SYS_add_key,
    SYS_request_key,
    SYS_kexec_load,
    SYS_kexec_file_load,
    SYS_swapon,
    SYS_swapoff,
    SYS_userfaultfd,
    SYS_migrate_pages,
    SYS_move_pages,
    SYS_io_uring_setup,
    SYS_io_uring_enter,
    SYS_io_uring_register,
];

/// `clone` flags that make new namespaces (allowed only with SYS_ADMIN).
const CLONE_NAMESPACE_FLAGS: [u64; 7] = [
    libc::CLONE_NEWNS as u64,
    libc::CLONE_NEWUTS as u64,
    libc::CLONE_NEWIPC as u64,
    libc::CLONE_NEWUSER as u64,
    libc::CLONE_NEWPID as u64,
    libc::CLONE_NEWNET as u64,
    libc::CLONE_NEWCGROUP as u64,
];

/// `personality` values moby allows (Linux, 32-bit emulation flags, query).
const PERSONALITIES: [u64; 5] = [0x0, 0x8, 0x20000, 0x20008, 0xffff_ffff];

#[cfg(target_arch = "x86_64")]
const ARCH: Option<TargetArch> = Some(TargetArch::x86_64);
#[cfg(target_arch = "aarch64")]
const ARCH: Option<TargetArch> = Some(TargetArch::aarch64);
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const ARCH: Option<TargetArch> = None;

fn build_error(e: impl std::fmt::Display) -> RunError {
    RunError::setup(
        "building the seccomp filter",
        std::io::Error::other(e.to_string()),
    )
}

fn condition(
    arg: u8,
    len: SeccompCmpArgLen,
    op: SeccompCmpOp,
    value: u64,
) -> Result<SeccompCondition, RunError> {
    SeccompCondition::new(arg, len, op, value).map_err(build_error)
}

/// The two filters of the default profile, in installation order. The
/// kernel runs every filter and keeps the most severe verdict; between two
/// `ERRNO` verdicts the later filter's wins, which is how the explicit
/// refusals (`EPERM`) override the allow-list's `ENOSYS` for unknown calls.
fn default_filters(caps: CapSet) -> Result<Vec<BpfProgram>, RunError> {
    let arch = ARCH.ok_or_else(|| {
        RunError::setup(
            "building the seccomp filter",
            std::io::Error::other(
                "kiln has no default seccomp profile for this CPU architecture; \
                 use --security-opt seccomp=unconfined",
            ),
        )
    })?;
    let held = |cap: &str| caps.contains(cap);

    let mut allow: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in ALLOWED.iter().chain(ALLOWED_ARCH) {
        allow.insert(*nr, Vec::new());
    }
    for (cap, calls) in gated() {
        if held(cap) {
            for (_, nr) in *calls {
                allow.insert(*nr, Vec::new());
            }
        }
    }
    let mut personality = Vec::new();
    for value in PERSONALITIES {
        personality.push(
            SeccompRule::new(vec![condition(
                0,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                value,
            )?])
            .map_err(build_error)?,
        );
    }
    allow.insert(libc::SYS_personality, personality);
    let allow_list = SeccompFilter::new(
        allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        SeccompAction::Allow,
        arch,
    )
    .map_err(build_error)?;

    let mut deny: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (_, nr) in DENIED {
        deny.insert(*nr, Vec::new());
    }
    for (cap, calls) in gated() {
        if !held(cap) {
            for (_, nr) in *calls {
                deny.insert(*nr, Vec::new());
            }
        }
    }
    if !held("SYS_ADMIN") {
        // Rules of one syscall are alternatives: any namespace flag refuses.
        let mut rules = Vec::new();
        for flag in CLONE_NAMESPACE_FLAGS {
            rules.push(
                SeccompRule::new(vec![condition(
                    0,
                    SeccompCmpArgLen::Qword,
                    SeccompCmpOp::MaskedEq(flag),
                    flag,
                )?])
                .map_err(build_error)?,
            );
        }
        deny.insert(libc::SYS_clone, rules);
    }
    let mut unlisted_personality = Vec::new();
    for value in PERSONALITIES {
        unlisted_personality.push(condition(
            0,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Ne,
            value,
        )?);
    }
    deny.insert(
        libc::SYS_personality,
        vec![SeccompRule::new(unlisted_personality).map_err(build_error)?],
    );
    let deny_list = SeccompFilter::new(
        deny,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(build_error)?;

    let mut programs = Vec::new();
    for filter in [allow_list, deny_list] {
        programs.push(BpfProgram::try_from(filter).map_err(build_error)?);
    }
    Ok(programs)
}

/// The step's security, compiled before the fork.
#[derive(Debug)]
pub(crate) struct PreparedSecurity {
    filters: Vec<BpfProgram>,
    keep: CapSet,
    last_cap: u32,
}

/// `struct sock_fprog` (linux/filter.h).
#[repr(C)]
struct SockFprog {
    len: libc::c_ushort,
    filter: *const seccompiler::sock_filter,
}

/// `struct __user_cap_header_struct` and `__user_cap_data_struct`.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
const PR_CAP_AMBIENT: libc::c_int = 47;
const PR_CAP_AMBIENT_CLEAR_ALL: libc::c_ulong = 4;

impl PreparedSecurity {
    pub(crate) fn prepare(security: &StepSecurity) -> Result<Self, RunError> {
        let filters = match security.seccomp {
            Seccomp::Default => default_filters(security.capabilities)?,
            Seccomp::Unconfined => Vec::new(),
        };
        let last_cap = std::fs::read_to_string("/proc/sys/kernel/cap_last_cap")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(CAP_NAMES.len() as u32 - 1);
        // A step cannot hold more than the executor itself (`--cap-add ALL`
        // or privileged mode in a container without every capability).
        let keep = CapSet(security.capabilities.0 & permitted_now()?);
        Ok(PreparedSecurity {
            filters,
            keep,
            last_cap,
        })
    }

    /// Installs the filters. Needs `CAP_SYS_ADMIN` (`no_new_privs` is left
    /// off on purpose); returns the errno on failure.
    ///
    /// # Safety
    /// Async-signal-safe; call in the forked step process only.
    pub(crate) unsafe fn apply_seccomp(&self) -> Result<(), i32> {
        for program in &self.filters {
            let prog = SockFprog {
                len: program.len() as libc::c_ushort,
                filter: program.as_ptr(),
            };
            // SAFETY: `prog` points into a program that lives until exec.
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_seccomp,
                    libc::SECCOMP_SET_MODE_FILTER,
                    0,
                    &prog as *const SockFprog,
                )
            };
            if rc != 0 {
                return Err(errno());
            }
        }
        Ok(())
    }

    /// Drops every capability outside the step's set from the bounding set
    /// (so no setuid or file-capability program can regain it) and clears
    /// the ambient set.
    ///
    /// # Safety
    /// Async-signal-safe; call in the forked step process only.
    pub(crate) unsafe fn apply_bounding(&self) -> Result<(), i32> {
        for cap in 0..=self.last_cap.min(63) {
            if self.keep.0 & (1 << cap) != 0 {
                continue;
            }
            // SAFETY: plain prctl on an integer.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) } != 0 {
                return Err(errno());
            }
        }
        // SAFETY: plain prctl; EINVAL on kernels without ambient sets.
        let rc = unsafe { libc::prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0) };
        if rc != 0 && errno() != libc::EINVAL {
            return Err(errno());
        }
        Ok(())
    }

    /// Sets the permitted and effective sets to the step's (root) or to
    /// nothing (any other uid: the kernel already cleared them at setuid;
    /// this makes it explicit), and the inheritable set to nothing, as
    /// Docker does since CVE-2022-24769.
    ///
    /// # Safety
    /// Async-signal-safe; call in the forked step process only, after the
    /// identity switch.
    pub(crate) unsafe fn apply_capabilities(&self, uid: libc::uid_t) -> Result<(), i32> {
        let set = if uid == 0 { self.keep.0 } else { 0 };
        let mut header = CapHeader {
            version: LINUX_CAPABILITY_VERSION_3,
            pid: 0,
        };
        let word = |shift: u32| (set >> shift) as u32;
        let data = [
            CapData {
                effective: word(0),
                permitted: word(0),
                inheritable: 0,
            },
            CapData {
                effective: word(32),
                permitted: word(32),
                inheritable: 0,
            },
        ];
        // SAFETY: header and a two-element data array, as capset(2) wants
        // for version 3.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(errno());
        }
        Ok(())
    }
}

/// The executor's own permitted capabilities.
fn permitted_now() -> Result<u64, RunError> {
    let mut header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let mut data = [CapData {
        effective: 0,
        permitted: 0,
        inheritable: 0,
    }; 2];
    // SAFETY: capget(2) fills the two-element array for version 3.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_capget,
            &mut header as *mut CapHeader,
            data.as_mut_ptr(),
        )
    };
    if rc != 0 {
        return Err(RunError::setup(
            "reading the executor's capabilities",
            std::io::Error::last_os_error(),
        ));
    }
    Ok(u64::from(data[0].permitted) | (u64::from(data[1].permitted) << 32))
}

fn errno() -> i32 {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers_fourteen() {
        let names = CapSet::docker_default().names();
        assert_eq!(names.len(), 14);
        for dangerous in [
            "DAC_READ_SEARCH",
            "SYS_ADMIN",
            "SYS_MODULE",
            "SYS_PTRACE",
            "NET_ADMIN",
            "SYS_RAWIO",
        ] {
            assert!(!CapSet::docker_default().contains(dangerous), "{dangerous}");
        }
        assert!(CapSet::docker_default().contains("CAP_NET_RAW"));
    }

    #[test]
    fn capabilities_are_added_and_dropped_by_any_spelling() {
        let mut set = CapSet::docker_default();
        set.add("cap_net_admin").unwrap();
        set.add("SYS_PTRACE").unwrap();
        assert!(set.contains("NET_ADMIN") && set.contains("CAP_SYS_PTRACE"));
        set.drop_cap("net_raw").unwrap();
        assert!(!set.contains("NET_RAW"));
        assert_eq!(
            set.add("CAP_WIZARDRY"),
            Err(UnknownCapability("CAP_WIZARDRY".into()))
        );
        set.add("ALL").unwrap();
        assert_eq!(set, CapSet::all());
        set.drop_cap("all").unwrap();
        assert_eq!(set, CapSet::EMPTY);
    }

    #[test]
    fn only_non_default_security_enters_the_cache_key() {
        use crate::keys::run_security_text;
        assert_eq!(run_security_text(&StepSecurity::default()), None);
        let mut more = StepSecurity::default();
        more.capabilities.add("NET_ADMIN").unwrap();
        let a = run_security_text(&more).unwrap();
        let b = run_security_text(&StepSecurity::insecure()).unwrap();
        assert_ne!(a, b);
        assert!(b.contains("privileged=true"), "{b}");
    }

    #[test]
    fn the_default_profile_compiles_within_the_kernels_program_limit() {
        let filters = default_filters(CapSet::docker_default()).unwrap();
        assert_eq!(filters.len(), 2);
        for f in &filters {
            // BPF_MAXINSNS.
            assert!(f.len() <= 4096, "{} instructions", f.len());
        }
        // SYS_ADMIN lifts the namespace-flag rule of clone and the mount
        // family, so that filter is different.
        let mut admin = CapSet::docker_default();
        admin.add("SYS_ADMIN").unwrap();
        assert_ne!(default_filters(admin).unwrap()[1].len(), filters[1].len());
    }

    #[test]
    fn no_syscall_is_both_allowed_and_refused() {
        let allowed: std::collections::HashSet<i64> = ALLOWED
            .iter()
            .chain(ALLOWED_ARCH)
            .map(|(_, nr)| *nr)
            .collect();
        for (name, nr) in DENIED
            .iter()
            .chain(gated().flat_map(|(_, calls)| calls.iter()))
        {
            assert!(!allowed.contains(nr), "{name} is in both lists");
        }
    }
}
