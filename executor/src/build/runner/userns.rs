//! User-namespaced RUN steps (`--userns auto`): the step's root is an
//! unprivileged host uid, so that even a step that got past every other
//! restriction holds no privilege over the host's files.
//!
//! The step joins a user namespace that maps ids 0..size to a range of
//! subordinate host ids (root's range in `/etc/subuid` and `/etc/subgid`,
//! else 100000..165535). Its rootfs and `RUN --mount` binds are *idmapped*
//! mounts (`mount_setattr(MOUNT_ATTR_IDMAP)`) with the same mapping, so a
//! file the step creates as its uid 0 is stored as uid 0 on disk and the
//! layer holds the ids the image asked for; nothing is chowned afterwards.
//!
//! Promises: [`UserNamespace::create`] leaves no process behind (the holder
//! process is reaped before it returns); the descriptor it returns is
//! close-on-exec. Limits (docs/security.md): ids outside 0..size cannot be
//! used in the step; device nodes cannot be created; raw sockets (`ping`)
//! need a network namespace of the step's own (`--network none`).

use super::RunError;
use std::os::fd::{AsRawFd, OwnedFd};

/// The host id range a step's ids 0..size map to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IdMapping {
    pub host_uid: u32,
    pub host_gid: u32,
    pub size: u32,
}

/// Used when `/etc/subuid` has no range for root: the conventional first
/// subordinate range.
pub const DEFAULT_MAPPING: IdMapping = IdMapping {
    host_uid: 100_000,
    host_gid: 100_000,
    size: 65_536,
};

impl IdMapping {
    /// Root's first range of at least 65536 ids in `/etc/subuid` and
    /// `/etc/subgid`, else [`DEFAULT_MAPPING`].
    pub fn for_root() -> IdMapping {
        let uid = subid_range("/etc/subuid");
        let gid = subid_range("/etc/subgid");
        match (uid, gid) {
            (Some((host_uid, u)), Some((host_gid, g))) => IdMapping {
                host_uid,
                host_gid,
                size: u.min(g),
            },
            _ => DEFAULT_MAPPING,
        }
    }
}

fn subid_range(path: &str) -> Option<(u32, u32)> {
    let text = std::fs::read_to_string(path).ok()?;
    parse_subid_range(&text)
}

fn parse_subid_range(text: &str) -> Option<(u32, u32)> {
    text.lines().find_map(|line| {
        let mut fields = line.trim().split(':');
        let (user, start, count) = (fields.next()?, fields.next()?, fields.next()?);
        if user != "root" && user != "0" {
            return None;
        }
        let (start, count) = (start.parse::<u32>().ok()?, count.parse::<u32>().ok()?);
        (count >= 65_536 && start > 0).then_some((start, count))
    })
}

/// A user namespace with a mapping, held by a descriptor.
#[derive(Debug)]
pub(crate) struct UserNamespace {
    fd: OwnedFd,
}

impl UserNamespace {
    /// Makes the namespace: a short-lived child unshares it, the executor
    /// (privileged) writes its maps and opens `/proc/<child>/ns/user`, then
    /// the child exits.
    pub(crate) fn create(map: &IdMapping) -> Result<UserNamespace, RunError> {
        let setup = |what: &str, e: std::io::Error| RunError::setup(what.to_string(), e);
        let (ready_read, ready_write) =
            super::output_pipe().map_err(|e| setup("creating a pipe", e))?;
        let (hold_read, hold_write) =
            super::output_pipe().map_err(|e| setup("creating a pipe", e))?;
        // SAFETY: the child only makes async-signal-safe system calls on
        // descriptors that already exist, then exits.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(setup(
                "forking the user namespace holder",
                std::io::Error::last_os_error(),
            ));
        }
        if pid == 0 {
            // SAFETY: as above; `_exit` never returns.
            unsafe {
                let ok: u8 = if libc::unshare(libc::CLONE_NEWUSER) == 0 {
                    1
                } else {
                    0
                };
                libc::write(ready_write.as_raw_fd(), (&ok as *const u8).cast(), 1);
                // Our copy of the write end would keep the read below from
                // ever seeing EOF.
                libc::close(hold_write.as_raw_fd());
                let mut byte = 0u8;
                // Returns when the executor closes its end.
                libc::read(hold_read.as_raw_fd(), (&mut byte as *mut u8).cast(), 1);
                libc::_exit(0);
            }
        }
        drop(ready_write);
        drop(hold_read);
        let result = (|| {
            let mut ok = [0u8; 1];
            let n = std::io::Read::read(&mut std::fs::File::from(ready_read), &mut ok)
                .map_err(|e| setup("waiting for the user namespace", e))?;
            if n != 1 || ok[0] != 1 {
                return Err(setup(
                    "creating a user namespace",
                    std::io::Error::other(
                        "unshare(CLONE_NEWUSER) failed (user namespaces disabled?)",
                    ),
                ));
            }
            let proc = format!("/proc/{pid}");
            std::fs::write(
                format!("{proc}/uid_map"),
                format!("0 {} {}\n", map.host_uid, map.size),
            )
            .map_err(|e| setup("writing uid_map", e))?;
            std::fs::write(
                format!("{proc}/gid_map"),
                format!("0 {} {}\n", map.host_gid, map.size),
            )
            .map_err(|e| setup("writing gid_map", e))?;
            let ns = std::fs::File::open(format!("{proc}/ns/user"))
                .map_err(|e| setup("opening the user namespace", e))?;
            Ok(UserNamespace {
                fd: OwnedFd::from(ns),
            })
        })();
        drop(hold_write);
        let mut status = 0;
        // SAFETY: reaping the child forked above.
        unsafe { libc::waitpid(pid, &mut status, 0) };
        result
    }

    pub(crate) fn raw_fd(&self) -> libc::c_int {
        self.fd.as_raw_fd()
    }
}

/// `struct mount_attr` (linux/mount.h).
#[repr(C)]
struct MountAttr {
    attr_set: u64,
    attr_clr: u64,
    propagation: u64,
    userns_fd: u64,
}

const MOUNT_ATTR_NODEV: u64 = 0x0000_0004;
const MOUNT_ATTR_NOSUID: u64 = 0x0000_0002;
const MOUNT_ATTR_RDONLY: u64 = 0x0000_0001;
const MOUNT_ATTR_IDMAP: u64 = 0x0010_0000;
const OPEN_TREE_CLONE: libc::c_uint = 1;
const MOVE_MOUNT_F_EMPTY_PATH: libc::c_uint = 0x0000_0004;

/// Flags of an idmapped mount besides the mapping.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct MountFlags {
    pub nodev: bool,
    pub nosuid: bool,
    pub readonly: bool,
}

/// Mounts `source` on `target` as an idmapped clone (non-recursive), with
/// the mapping of the namespace `userns_fd`. Returns `false` with errno set
/// on failure.
///
/// # Safety
/// Async-signal-safe: call in the forked step process with C strings that
/// live until exec.
pub(crate) unsafe fn idmapped_bind(
    source: &std::ffi::CStr,
    target: &std::ffi::CStr,
    userns_fd: libc::c_int,
    flags: MountFlags,
) -> bool {
    // SAFETY: plain system calls on the given strings and a local struct.
    unsafe {
        let tree = libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            source.as_ptr(),
            OPEN_TREE_CLONE | libc::O_CLOEXEC as libc::c_uint,
        ) as libc::c_int;
        if tree < 0 {
            return false;
        }
        let mut set = MOUNT_ATTR_IDMAP;
        if flags.nodev {
            set |= MOUNT_ATTR_NODEV;
        }
        if flags.nosuid {
            set |= MOUNT_ATTR_NOSUID;
        }
        if flags.readonly {
            set |= MOUNT_ATTR_RDONLY;
        }
        let attr = MountAttr {
            attr_set: set,
            attr_clr: 0,
            propagation: 0,
            userns_fd: userns_fd as u64,
        };
        let empty = c"";
        let ok = libc::syscall(
            libc::SYS_mount_setattr,
            tree,
            empty.as_ptr(),
            libc::AT_EMPTY_PATH,
            &attr as *const MountAttr,
            std::mem::size_of::<MountAttr>(),
        ) == 0
            && libc::syscall(
                libc::SYS_move_mount,
                tree,
                empty.as_ptr(),
                libc::AT_FDCWD,
                target.as_ptr(),
                MOVE_MOUNT_F_EMPTY_PATH,
            ) == 0;
        let errno = *libc::__errno_location();
        libc::close(tree);
        *libc::__errno_location() = errno;
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Wraps a raw descriptor from [`UserNamespace::raw_fd`] for tests.
    fn duplicate(fd: libc::c_int) -> OwnedFd {
        use std::os::fd::FromRawFd;
        // SAFETY: dup of a valid descriptor gives one we own.
        unsafe { OwnedFd::from_raw_fd(libc::dup(fd)) }
    }

    #[test]
    fn roots_first_large_subordinate_range_is_used() {
        let text = "alice:100000:65536\nroot:200000:10\nroot:300000:65536\n";
        assert_eq!(parse_subid_range(text), Some((300000, 65536)));
        assert_eq!(parse_subid_range("alice:1:65536\n"), None);
        assert_eq!(parse_subid_range("garbage\n\nroot:x:y\n"), None);
    }

    #[test]
    fn a_namespace_is_made_with_the_mapping_and_no_process_is_left() {
        let map = IdMapping {
            host_uid: 400_000,
            host_gid: 410_000,
            size: 65_536,
        };
        let ns = UserNamespace::create(&map).unwrap();
        let fd = duplicate(ns.raw_fd());
        // The namespace exists independently of its (reaped) holder.
        let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
        assert!(link.to_string_lossy().starts_with("user:["), "{link:?}");
    }
}
