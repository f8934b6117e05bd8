//! Mounting verified EROFS images read-only, and unmounting every mount
//! kiln made when the process ends, also on SIGTERM/SIGINT.
//!
//! An image is mounted straight from its file (EROFS file-backed mounts,
//! Linux 6.12+); where the kernel refuses that, through a loop device set up
//! with `LOOP_CTL_GET_FREE` + `LOOP_CONFIGURE` (autoclear, read-only, so the
//! device goes with the mount).
//!
//! Every mount point kiln mounts (images here, overlays in the snapshotter)
//! is registered in a fixed table that the signal handler walks with
//! `umount2(MNT_DETACH)` only (async-signal-safe) before re-raising the
//! signal, so an interrupted build leaves no mount behind.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Once;
use std::sync::atomic::{AtomicPtr, Ordering};

const SLOTS: usize = 4096;
static MOUNTS: [AtomicPtr<libc::c_char>; SLOTS] =
    [const { AtomicPtr::new(std::ptr::null_mut()) }; SLOTS];
static HANDLER: Once = Once::new();

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Records `target` as mounted by us, for the signal handler.
pub fn register(target: &Path) {
    install_handler();
    let Ok(c) = cpath(target) else { return };
    let ptr = c.into_raw();
    for slot in &MOUNTS {
        if slot
            .compare_exchange(
                std::ptr::null_mut(),
                ptr,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_ok()
        {
            return;
        }
    }
    // Table full: the mount is still undone by the normal paths. The
    // string is freed, it is in no slot.
    // SAFETY: ptr came from CString::into_raw above and is in no slot.
    drop(unsafe { CString::from_raw(ptr) });
}

/// Forgets `target` after it was unmounted. The string is leaked, not
/// freed: the signal handler may be reading it right now.
pub fn unregister(target: &Path) {
    let Ok(c) = cpath(target) else { return };
    for slot in &MOUNTS {
        let p = slot.load(Ordering::Acquire);
        if p.is_null() {
            continue;
        }
        // SAFETY: non-null slot pointers are leaked CStrings, never freed.
        if unsafe { std::ffi::CStr::from_ptr(p) } == c.as_c_str() {
            let _ =
                slot.compare_exchange(p, std::ptr::null_mut(), Ordering::AcqRel, Ordering::Acquire);
            return;
        }
    }
}

extern "C" fn on_signal(sig: libc::c_int) {
    // Last registered first: overlays sit over the images they use.
    for slot in MOUNTS.iter().rev() {
        let p = slot.load(Ordering::Acquire);
        if !p.is_null() {
            // SAFETY: p is a valid NUL-terminated string that is never freed.
            unsafe { libc::umount2(p, libc::MNT_DETACH) };
        }
    }
    // SAFETY: restoring the default action and re-raising is async-signal-safe.
    unsafe {
        libc::signal(sig, libc::SIG_DFL);
        libc::raise(sig);
    }
}

fn install_handler() {
    HANDLER.call_once(|| {
        for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            // SAFETY: on_signal only makes async-signal-safe calls.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as usize;
                sa.sa_flags = libc::SA_RESETHAND;
                libc::sigemptyset(&mut sa.sa_mask);
                libc::sigaction(sig, &sa, std::ptr::null_mut());
            }
        }
    });
}

/// Mounts the image at `image` read-only on `target` (a directory).
pub fn mount_image(image: &Path, target: &Path) -> io::Result<()> {
    let src = cpath(image)?;
    let dst = cpath(target)?;
    let fstype = c"erofs";
    // Read-only; no nodev/nosuid: the image's device nodes and setuid
    // files are the image's content, seen by RUN steps through the overlay.
    let flags = libc::MS_RDONLY;
    // SAFETY: valid C strings, null data.
    let r = unsafe {
        libc::mount(
            src.as_ptr(),
            dst.as_ptr(),
            fstype.as_ptr(),
            flags,
            std::ptr::null(),
        )
    };
    if r == 0 {
        register(target);
        return Ok(());
    }
    let file_backed = io::Error::last_os_error();
    match mount_via_loop(image, &dst, flags) {
        Ok(()) => {
            register(target);
            Ok(())
        }
        Err(e) => Err(io::Error::new(
            e.kind(),
            format!("file-backed mount: {file_backed}; loop device: {e}"),
        )),
    }
}

fn mount_via_loop(image: &Path, dst: &CString, flags: libc::c_ulong) -> io::Result<()> {
    use std::os::unix::io::AsRawFd;
    const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
    const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
    const LO_FLAGS_READ_ONLY: u32 = 1;
    const LO_FLAGS_AUTOCLEAR: u32 = 4;
    #[repr(C)]
    struct LoopInfo64 {
        lo_device: u64,
        lo_inode: u64,
        lo_rdevice: u64,
        lo_offset: u64,
        lo_sizelimit: u64,
        lo_number: u32,
        lo_encrypt_type: u32,
        lo_encrypt_key_size: u32,
        lo_flags: u32,
        lo_file_name: [u8; 64],
        lo_crypt_name: [u8; 64],
        lo_encrypt_key: [u8; 32],
        lo_init: [u64; 2],
    }
    #[repr(C)]
    struct LoopConfig {
        fd: u32,
        block_size: u32,
        info: LoopInfo64,
        reserved: [u64; 8],
    }
    let ctl = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    let backing = std::fs::File::open(image)?;
    for _ in 0..8 {
        // SAFETY: plain ioctl without argument.
        let n = unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let dev_path = format!("/dev/loop{n}");
        let dev = std::fs::OpenOptions::new().read(true).open(&dev_path)?;
        // SAFETY: LoopConfig is plain data; all-zero is a valid value.
        let mut cfg: LoopConfig = unsafe { std::mem::zeroed() };
        cfg.fd = backing.as_raw_fd() as u32;
        cfg.info.lo_flags = LO_FLAGS_READ_ONLY | LO_FLAGS_AUTOCLEAR;
        // SAFETY: cfg outlives the call; the kernel only reads it.
        let r = unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EBUSY) {
                continue; // raced with another user of the device
            }
            return Err(e);
        }
        let src = cpath(Path::new(&dev_path))?;
        // SAFETY: valid C strings, null data.
        let m = unsafe {
            libc::mount(
                src.as_ptr(),
                dst.as_ptr(),
                c"erofs".as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        // With autoclear the device is released when the last user (the
        // mount, or this fd if the mount failed) goes.
        return if m == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        };
    }
    Err(io::Error::other("no free loop device"))
}

/// Unmounts `target` (lazily when busy) and forgets it.
pub fn unmount(target: &Path) -> io::Result<()> {
    let c = cpath(target)?;
    // SAFETY: valid C string.
    let mut r = unsafe { libc::umount2(c.as_ptr(), 0) };
    if r != 0 && io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        // SAFETY: as above.
        r = unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    let result = if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    };
    unregister(target);
    result
}
