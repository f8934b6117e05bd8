//! `--isolation chroot` as a security boundary, tested with the real
//! executor and a hostile RUN step (`tests/fixtures/escape_probe.c`,
//! compiled statically into the image): every known way out of a RUN step
//! (the "shocker" file-handle escape, mounts, a raw host disk through
//! mknod, writes to /proc/sys, /proc/sysrq-trigger and /sys, module
//! loading, new user namespaces, kernel keyrings, ptrace and signals to the
//! executor) is refused, with both snapshotters, and the host is unchanged;
//! what ordinary builds need (chown, mknod of image content, setuid
//! programs, ping with CAP_NET_RAW) still works; and the documented escape
//! hatches (`--cap-add`, `--allow security.insecure`) do what they say.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use kiln_e2e::{fill_busybox_rootfs, kiln_bin, run, umoci_unpack};

const SNAPSHOTTERS: [&str; 2] = ["overlay", "walk"];

/// A build context whose `rootfs/` is busybox plus the probe (also as a
/// setuid-root copy).
struct Context {
    dir: tempfile::TempDir,
}

impl Context {
    fn new(dockerfile: &str) -> Context {
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        fill_busybox_rootfs(&rootfs).unwrap();
        for applet in ["ping", "mknod", "mount", "grep"] {
            let link = rootfs.join("bin").join(applet);
            if !link.exists() {
                std::os::unix::fs::symlink("busybox", link).unwrap();
            }
        }
        let probe = rootfs.join("bin/escape_probe");
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/escape_probe.c");
        run(Command::new("cc")
            .args(["-static", "-O2", "-o"])
            .arg(&probe)
            .arg(&source))
        .expect("compiling the escape probe (cc -static; needs libc6-dev)");
        let suid = rootfs.join("bin/suid_probe");
        fs::copy(&probe, &suid).unwrap();
        fs::set_permissions(&suid, fs::Permissions::from_mode(0o4755)).unwrap();
        fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        Context { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }
}

/// Runs a build of `ctx` with `snapshotter` and a fresh state directory.
fn build(ctx: &Context, snapshotter: &str, extra: &[&str]) -> (Output, String, PathBuf) {
    let state = ctx.path().join(format!("state-{snapshotter}"));
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(ctx.path())
        .arg("--cache-dir")
        .arg(&state)
        .args(["--no-push", "--snapshotter", snapshotter])
        .args(extra)
        .output()
        .expect("running kiln-executor");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    (out, stderr, state)
}

/// The probe's verdict lines (prefix removed) from the step output.
fn verdicts(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
        .filter(|l| l.contains(": blocked (") || l.ends_with(": ALLOWED"))
        .map(str::to_string)
        .collect()
}

fn status_line<'a>(stderr: &'a str, field: &str) -> Option<&'a str> {
    stderr
        .lines()
        .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
        .find_map(|l| l.strip_prefix(field))
        .map(str::trim)
}

/// Mount points on the host below `dir` (other builds may run at the same
/// time on this machine, so only our own directory is compared).
fn mount_points_below(dir: &Path) -> Vec<String> {
    let prefix = dir.display().to_string();
    let mut points: Vec<String> = fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4).map(str::to_string))
        .filter(|p| p.starts_with(&prefix))
        .collect();
    points.sort();
    points
}

#[test]
fn every_escape_attempt_in_a_run_step_is_refused_and_the_host_is_unchanged() {
    let ctx = Context::new(
        "FROM scratch\nCOPY rootfs/ /\nARG HOST_PID\nARG DEV_MAJOR\nARG DEV_MINOR\n\
         RUN /bin/escape_probe status && /bin/escape_probe $HOST_PID $DEV_MAJOR $DEV_MINOR\n",
    );
    let swappiness = fs::read_to_string("/proc/sys/vm/swappiness").unwrap();
    // The disk the state directory (and so the rootfs) lives on.
    let dev = fs::metadata(ctx.path()).unwrap().dev();
    let (major, minor) = (libc_major(dev), libc_minor(dev));
    for snapshotter in SNAPSHOTTERS {
        let pid = std::process::id().to_string();
        let (out, stderr, _) = build(
            &ctx,
            snapshotter,
            &[
                "--build-arg",
                &format!("HOST_PID={pid}"),
                "--build-arg",
                &format!("DEV_MAJOR={major}"),
                "--build-arg",
                &format!("DEV_MINOR={minor}"),
            ],
        );
        let got = verdicts(&stderr);
        let allowed: Vec<&String> = got.iter().filter(|v| v.ends_with("ALLOWED")).collect();
        assert!(
            allowed.is_empty(),
            "{snapshotter}: a RUN step could {allowed:?}\n{stderr}"
        );
        for attempt in [
            "open_by_handle_at",
            "mount",
            "raw-device-rootfs",
            "raw-device-dev",
            "proc-sys-write",
            "sysrq-trigger",
            "sysfs-write",
            "kcore",
            "init_module",
            "unshare-user",
            "unshare-mount",
            "keyctl",
            "ptrace-executor",
            "signal-executor",
        ] {
            assert!(
                got.iter()
                    .any(|v| v.starts_with(&format!("{attempt}: blocked"))),
                "{snapshotter}: no verdict for {attempt}: {got:?}\n{stderr}"
            );
        }
        assert!(out.status.success(), "{snapshotter}: {stderr}");
        // Docker's 14 capabilities, a seccomp filter, no_new_privs off.
        assert_eq!(status_line(&stderr, "CapEff:"), Some("00000000a80425fb"));
        assert_eq!(status_line(&stderr, "CapBnd:"), Some("00000000a80425fb"));
        assert_eq!(status_line(&stderr, "CapInh:"), Some("0000000000000000"));
        assert_eq!(status_line(&stderr, "CapAmb:"), Some("0000000000000000"));
        assert_eq!(status_line(&stderr, "Seccomp:"), Some("2"));
        assert_eq!(status_line(&stderr, "NoNewPrivs:"), Some("0"));
    }
    assert_eq!(
        fs::read_to_string("/proc/sys/vm/swappiness").unwrap(),
        swappiness
    );
    assert_eq!(mount_points_below(ctx.path()), Vec::<String>::new());
}

#[test]
fn ordinary_privileged_build_steps_still_work() {
    // chown, a device node as image content (CAP_MKNOD), a setuid program
    // run by a non-root user (no_new_privs off, no nosuid rootfs), ping
    // (CAP_NET_RAW), and a non-root step that has no capability at all.
    let ctx = Context::new(
        "FROM scratch\nCOPY rootfs/ /\n\
         RUN touch /owned && chown 123:456 /owned && mknod /dev-null-copy c 1 3 && \
             chown root:root /bin/suid_probe && chmod 4755 /bin/suid_probe\n\
         RUN ping -c 1 -W 5 127.0.0.1 > /dev/null && echo ping-ok\n\
         USER nobody\n\
         RUN /bin/suid_probe euid && /bin/escape_probe status\n",
    );
    for snapshotter in SNAPSHOTTERS {
        let layout = ctx.path().join(format!("layout-{snapshotter}"));
        let (out, stderr, _) = build(
            &ctx,
            snapshotter,
            &[
                "--oci-layout-path",
                layout.to_str().unwrap(),
                "--destination",
                "kiln.local/probe:latest",
            ],
        );
        assert!(out.status.success(), "{snapshotter}: {stderr}");
        assert!(stderr.contains("ping-ok"), "{stderr}");
        assert!(stderr.contains("euid=0"), "setuid did not apply:\n{stderr}");
        assert_eq!(status_line(&stderr, "CapEff:"), Some("0000000000000000"));
        assert_eq!(status_line(&stderr, "CapBnd:"), Some("00000000a80425fb"));
        // The first RUN's layer holds the owned file and the device node.
        let unpacked = umoci_unpack(&layout, &ctx.path().join(format!("unpacked-{snapshotter}")))
            .expect("umoci unpack");
        let owned = fs::metadata(unpacked.join("owned")).unwrap();
        assert_eq!((owned.uid(), owned.gid()), (123, 456));
        let node = fs::symlink_metadata(unpacked.join("dev-null-copy")).unwrap();
        use std::os::unix::fs::FileTypeExt;
        assert!(node.file_type().is_char_device());
        assert_eq!(node.rdev(), libc_makedev(1, 3));
    }
}

#[test]
fn cap_add_and_the_insecure_entitlement_lift_the_restrictions_they_name() {
    let mount_step = "FROM scratch\nCOPY rootfs/ /\n\
         RUN mkdir -p /m && mount -t tmpfs none /m && echo mounted && /bin/escape_probe status\n";
    let ctx = Context::new(mount_step);
    let (out, stderr, _) = build(&ctx, "overlay", &[]);
    assert!(
        !out.status.success(),
        "mount succeeded by default:\n{stderr}"
    );
    let (out, stderr, _) = build(&ctx, "walk", &["--cap-add", "SYS_ADMIN"]);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("mounted"), "{stderr}");
    assert_eq!(status_line(&stderr, "CapEff:"), Some("00000000a82425fb"));

    let insecure = Context::new(
        "FROM scratch\nCOPY rootfs/ /\nRUN --security=insecure /bin/escape_probe status\n",
    );
    let (out, stderr, _) = build(&insecure, "overlay", &[]);
    assert!(!out.status.success());
    assert!(
        stderr.contains("Dockerfile:3:") && stderr.contains("--allow security.insecure"),
        "{stderr}"
    );
    let (out, stderr, _) = build(&insecure, "walk", &["--allow", "security.insecure"]);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(status_line(&stderr, "Seccomp:"), Some("0"));
    // Every capability the executor itself holds (this test machine may
    // itself be a container without some).
    let own = fs::read_to_string("/proc/self/status").unwrap();
    let own_permitted = own
        .lines()
        .find_map(|l| l.strip_prefix("CapPrm:"))
        .map(str::trim)
        .unwrap();
    assert_eq!(status_line(&stderr, "CapEff:"), Some(own_permitted));

    let (out, stderr, _) = build(&insecure, "walk", &["--cap-add", "WIZARDRY"]);
    assert!(!out.status.success());
    assert!(
        stderr.contains("unknown capability \"WIZARDRY\""),
        "{stderr}"
    );
}

/// `--userns auto`: the step's root is host uid 100000 (or root's
/// /etc/subuid range), yet the layer holds the ids the step asked for,
/// because the rootfs is an idmapped mount; escapes are still refused.
#[test]
fn with_userns_auto_the_steps_root_is_unprivileged_and_the_layer_keeps_its_ids() {
    let ctx = Context::new(
        "FROM scratch\nCOPY rootfs/ /\nARG HOST_PID\n\
         RUN cat /proc/self/uid_map && id -u && touch /by-root /by-user && chown 1000:2000 /by-user \
             && mkdir /dir && chmod 0750 /dir && (mknod /node c 1 3 || echo mknod-refused)\n\
         RUN /bin/escape_probe status && /bin/escape_probe $HOST_PID 1 0\n",
    );
    for snapshotter in SNAPSHOTTERS {
        let layout = ctx.path().join(format!("userns-layout-{snapshotter}"));
        let pid = std::process::id().to_string();
        let (out, stderr, _) = build(
            &ctx,
            snapshotter,
            &[
                "--userns",
                "auto",
                "--build-arg",
                &format!("HOST_PID={pid}"),
                "--oci-layout-path",
                layout.to_str().unwrap(),
                "--destination",
                "kiln.local/userns:latest",
            ],
        );
        let allowed: Vec<String> = verdicts(&stderr)
            .into_iter()
            .filter(|v| v.ends_with("ALLOWED"))
            .collect();
        assert!(allowed.is_empty(), "{snapshotter}: {allowed:?}\n{stderr}");
        assert!(out.status.success(), "{snapshotter}: {stderr}");
        let map_line = stderr
            .lines()
            .filter_map(|l| l.split_once("] ").map(|(_, rest)| rest))
            .find(|l| l.split_whitespace().count() == 3 && l.trim_start().starts_with('0'))
            .unwrap_or_else(|| panic!("no uid_map line:\n{stderr}"));
        let host_uid: u64 = map_line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(host_uid >= 65_536, "the step's root is host uid {host_uid}");
        assert!(stderr.contains("mknod-refused"), "{stderr}");
        assert_eq!(status_line(&stderr, "CapEff:"), Some("00000000a80425fb"));
        let unpacked = umoci_unpack(
            &layout,
            &ctx.path().join(format!("userns-unpacked-{snapshotter}")),
        )
        .expect("umoci unpack");
        let by_root = fs::metadata(unpacked.join("by-root")).unwrap();
        assert_eq!((by_root.uid(), by_root.gid()), (0, 0));
        let by_user = fs::metadata(unpacked.join("by-user")).unwrap();
        assert_eq!((by_user.uid(), by_user.gid()), (1000, 2000));
        let dir = fs::metadata(unpacked.join("dir")).unwrap();
        assert_eq!((dir.uid(), dir.mode() & 0o7777), (0, 0o750));
    }
}

fn libc_makedev(major: u64, minor: u64) -> u64 {
    ((major & 0xffff_f000) << 32)
        | ((major & 0x0fff) << 8)
        | ((minor & 0xffff_ff00) << 12)
        | (minor & 0x00ff)
}

fn libc_major(dev: u64) -> u64 {
    ((dev >> 32) & 0xffff_f000) | ((dev >> 8) & 0x0fff)
}

fn libc_minor(dev: u64) -> u64 {
    ((dev >> 12) & 0xffff_ff00) | (dev & 0x00ff)
}
