//! Mountable layers (issue 16): a layer converted to an EROFS image and
//! mounted by the kernel shows exactly the tree the unpacker makes of the
//! same layer in overlay-lower form; the image passes `fsck.erofs`; a
//! corrupted or truncated image is refused before any mount; a build with
//! `--isolation chroot` mounts its base instead of unpacking it and leaves
//! no mount behind, also when it is killed with SIGTERM.
//!
//! Needs root (mounts) and erofs-utils (scripts/prereqs.sh).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use kiln_common::Digest;
use kiln_executor::build::fsutil::{get_xattr, list_xattrs};
use kiln_executor::build::unpack::{UnpackOptions, unpack_layer};
use kiln_executor::erofs::{ImageCache, ImageError, Stamp, convert_layer, mount};

/// A tar layer built entry by entry, with full control of the headers.
struct Tar {
    b: tar::Builder<Vec<u8>>,
}

impl Tar {
    fn new() -> Self {
        Tar {
            b: tar::Builder::new(Vec::new()),
        }
    }
    fn header(kind: tar::EntryType, name: &str, mode: u32, uid: u64, gid: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_mtime(1_700_000_000);
        h.set_uid(uid);
        h.set_gid(gid);
        h.set_size(0);
        let bytes = name.as_bytes();
        h.as_old_mut().name[..bytes.len()].copy_from_slice(bytes);
        h
    }
    fn entry(mut self, mut h: tar::Header, data: &[u8]) -> Self {
        h.set_size(data.len() as u64);
        h.set_cksum();
        self.b.append(&h, data).unwrap();
        self
    }
    fn file(self, name: &str, data: &[u8]) -> Self {
        self.file_owned(name, data, 0o644, 0, 0)
    }
    fn file_owned(self, name: &str, data: &[u8], mode: u32, uid: u64, gid: u64) -> Self {
        let h = Self::header(tar::EntryType::Regular, name, mode, uid, gid);
        self.entry(h, data)
    }
    fn dir(self, name: &str, mode: u32) -> Self {
        let h = Self::header(tar::EntryType::Directory, name, mode, 0, 0);
        self.entry(h, b"")
    }
    fn link(self, kind: tar::EntryType, name: &str, target: &str) -> Self {
        let mut h = Self::header(kind, name, 0o777, 0, 0);
        let t = target.as_bytes();
        h.as_old_mut().linkname[..t.len()].copy_from_slice(t);
        self.entry(h, b"")
    }
    fn symlink(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Symlink, name, target)
    }
    /// A symlink whose target needs a GNU long-link record.
    fn long_symlink(mut self, name: &str, target: &str) -> Self {
        let mut h = Self::header(tar::EntryType::Symlink, "placeholder", 0o777, 0, 0);
        self.b.append_link(&mut h, name, target).unwrap();
        self
    }
    fn hardlink(self, name: &str, target: &str) -> Self {
        self.link(tar::EntryType::Link, name, target)
    }
    fn device(self, kind: tar::EntryType, name: &str, major: u32, minor: u32) -> Self {
        let mut h = Self::header(kind, name, 0o620, 0, 5);
        h.set_device_major(major).unwrap();
        h.set_device_minor(minor).unwrap();
        self.entry(h, b"")
    }
    fn pax(mut self, records: &[(&str, &[u8])]) -> Self {
        self.b
            .append_pax_extensions(records.iter().copied())
            .unwrap();
        self
    }
    fn bytes(self) -> Vec<u8> {
        self.b.into_inner().unwrap()
    }
}

/// What the comparison sees of one path.
#[derive(Debug, PartialEq, Eq)]
enum Seen {
    Whiteout,
    Node {
        kind: &'static str,
        mode: u32,
        uid: u32,
        gid: u32,
        /// Files: size and sha256; symlinks: target; devices: rdev.
        content: String,
        mtime: Option<i64>,
        xattrs: Vec<(String, Vec<u8>)>,
        opaque: bool,
    },
}

/// Every path below `root` (not the root itself) and the hard-link groups.
fn snapshot(root: &Path) -> (BTreeMap<PathBuf, Seen>, BTreeSet<Vec<PathBuf>>) {
    let mut out = BTreeMap::new();
    let mut inodes: BTreeMap<u64, Vec<PathBuf>> = BTreeMap::new();
    for entry in walkdir::WalkDir::new(root).min_depth(1).sort_by_file_name() {
        let entry = entry.unwrap();
        let path = entry.path();
        let rel = path.strip_prefix(root).unwrap().to_path_buf();
        let m = fs::symlink_metadata(path).unwrap();
        let ft = m.file_type();
        if ft.is_char_device() && m.rdev() == 0 {
            out.insert(rel, Seen::Whiteout);
            continue;
        }
        let (kind, content) = if ft.is_dir() {
            ("dir", String::new())
        } else if ft.is_file() {
            let bytes = fs::read(path).unwrap();
            ("file", format!("{} {}", m.len(), Digest::of_bytes(&bytes)))
        } else if ft.is_symlink() {
            (
                "symlink",
                fs::read_link(path).unwrap().display().to_string(),
            )
        } else if ft.is_char_device() {
            ("char", m.rdev().to_string())
        } else if ft.is_block_device() {
            ("block", m.rdev().to_string())
        } else {
            ("fifo", String::new())
        };
        if !ft.is_dir() && m.nlink() > 1 {
            inodes.entry(m.ino()).or_default().push(rel.clone());
        }
        let opaque = ft.is_dir()
            && get_xattr(path, "trusted.overlay.opaque")
                .unwrap()
                .is_some_and(|v| v == b"y");
        out.insert(
            rel,
            Seen::Node {
                kind,
                mode: m.mode() & 0o7777,
                uid: m.uid(),
                gid: m.gid(),
                content,
                // Directories the unpacker creates implicitly carry the
                // time of the unpack; the image carries 0.
                mtime: (!ft.is_dir()).then(|| m.mtime()),
                xattrs: list_xattrs(path).unwrap(),
                opaque,
            },
        );
    }
    (out, inodes.into_values().collect())
}

/// A temporary directory whose mount point is unmounted on drop.
struct Mounted {
    dir: tempfile::TempDir,
    target: PathBuf,
    mounted: bool,
}

impl Mounted {
    fn image(image: &Path) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("mnt");
        fs::create_dir(&target).unwrap();
        mount::mount_image(image, &target).unwrap();
        Mounted {
            dir,
            target,
            mounted: true,
        }
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if self.mounted {
            let _ = mount::unmount(&self.target);
        }
        let _ = &self.dir;
    }
}

fn fsck(image: &Path) {
    let out = Command::new("fsck.erofs")
        .arg("--extract")
        .arg(image)
        .output()
        .expect("fsck.erofs (erofs-utils) is installed");
    assert!(
        out.status.success(),
        "fsck.erofs rejected {}: {}{}",
        image.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Unpacks and converts `layer`; both must agree on success, and on
/// success they must give the same tree.
fn assert_same_tree(name: &str, layer: &[u8]) {
    let work = tempfile::tempdir().unwrap();
    let unpacked = work.path().join("unpacked");
    fs::create_dir(&unpacked).unwrap();
    let opts = UnpackOptions {
        max_expanded_size: 8 << 30,
        ..UnpackOptions::overlay_lower()
    };
    let unpack = unpack_layer(layer, &unpacked, &opts, None);
    let image_path = work.path().join("layer.erofs");
    let out = fs::File::create(&image_path).unwrap();
    let converted = convert_layer(layer, None, out, work.path(), opts.max_expanded_size);
    match (&unpack, &converted) {
        (Ok(_), Ok(_)) => {}
        (Err(_), Err(_)) => return,
        _ => panic!(
            "{name}: unpack {:?} but conversion {:?}",
            unpack.as_ref().map(|_| ()),
            converted.as_ref().map(|_| ())
        ),
    }
    fsck(&image_path);
    let m = Mounted::image(&image_path);
    let (want, want_links) = snapshot(&unpacked);
    let (got, got_links) = snapshot(&m.target);
    for (path, seen) in &want {
        assert_eq!(got.get(path), Some(seen), "{name}: {}", path.display());
    }
    assert_eq!(
        got.keys().collect::<Vec<_>>(),
        want.keys().collect::<Vec<_>>(),
        "{name}: same paths"
    );
    assert_eq!(got_links, want_links, "{name}: hard-link groups");
}

#[test]
fn image_and_unpack_agree_on_files_modes_owners_links_and_devices() {
    let big: Vec<u8> = (0..(9u32 << 20)).map(|i| (i % 251) as u8).collect();
    let mut holey = vec![0u8; 40 << 20];
    holey[5000..5100].fill(7);
    holey[(30 << 20)..(30 << 20) + 4096].fill(9);
    let layer = Tar::new()
        .dir("bin/", 0o755)
        .file_owned("bin/busybox", b"\x7fELF", 0o4755, 0, 0)
        .symlink("bin/sh", "busybox")
        .hardlink("bin/ls", "bin/busybox")
        .hardlink("bin/cat", "bin/busybox")
        .file_owned("home/user/notes", b"mine", 0o600, 1000, 1000)
        .file("empty", b"")
        .file("big", &big)
        .file("holey", &holey)
        .device(tar::EntryType::Char, "dev/null", 1, 3)
        .device(tar::EntryType::Block, "dev/sda", 8, 0x1234)
        .device(tar::EntryType::Fifo, "run/fifo", 0, 0)
        .pax(&[
            ("SCHILY.xattr.user.comment", b"hello"),
            (
                "SCHILY.xattr.security.capability",
                // VFS_CAP_REVISION_2, effective, permitted CAP_NET_RAW.
                b"\x01\x00\x00\x02\x00\x20\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00",
            ),
        ])
        .file_owned("usr/bin/ping", b"ping", 0o755, 0, 0)
        .dir("tmp/", 0o1777)
        .long_symlink("long", &"x/".repeat(2000))
        .long_symlink("medium", &"y/".repeat(300))
        .bytes();
    assert_same_tree("files", &layer);

    let mut wide = Tar::new().dir("many/", 0o755);
    for i in 0..3000 {
        wide = wide.file(&format!("many/file-with-a-long-name-{i:05}"), b"x");
    }
    assert_same_tree("large directory", &wide.bytes());
}

#[test]
fn image_and_unpack_agree_on_whiteouts_and_opaque_directories() {
    let layer = Tar::new()
        .dir("etc/", 0o755)
        .file("etc/.wh.gone", b"")
        .file(".wh.removed", b"")
        .dir("opq/", 0o700)
        .file("opq/.wh..wh..opq", b"")
        .file("opq/kept", b"k")
        .file("deep/er/.wh..wh..opq", b"")
        .bytes();
    assert_same_tree("whiteouts", &layer);
}

#[test]
fn image_and_unpack_agree_on_hostile_layers() {
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("dotdot", Tar::new().file("../escaped", b"x").bytes()),
        (
            "dotdot inside",
            Tar::new().file("a/../../outside/x", b"x").bytes(),
        ),
        ("absolute name", Tar::new().file("/abs/file", b"x").bytes()),
        (
            "absolute symlink followed inside",
            Tar::new()
                .symlink("link", "/etc")
                .file("link/passwd", b"inside")
                .bytes(),
        ),
        (
            "relative symlink climbing out",
            Tar::new()
                .symlink("up", "../../../..")
                .file("up/escaped", b"x")
                .bytes(),
        ),
        (
            "file replaces symlink",
            Tar::new()
                .symlink("f", "/etc/shadow")
                .file("f", b"plain")
                .bytes(),
        ),
        (
            "symlink loop",
            Tar::new()
                .symlink("a", "b")
                .symlink("b", "a")
                .file("a/x", b"x")
                .bytes(),
        ),
        (
            "dir replaces file, file replaces dir",
            Tar::new()
                .file("x", b"file")
                .dir("x/", 0o700)
                .file("x/inner", b"i")
                .dir("y/", 0o755)
                .file("y/inner", b"i")
                .file("y", b"now a file")
                .bytes(),
        ),
        (
            "forged overlay xattrs",
            Tar::new()
                .pax(&[("SCHILY.xattr.trusted.overlay.opaque", b"y")])
                .dir("d/", 0o755)
                .pax(&[("SCHILY.xattr.trusted.overlay.redirect", b"/etc")])
                .dir("e/", 0o755)
                .bytes(),
        ),
        (
            "hard link to outside",
            Tar::new().hardlink("passwd", "../../etc/passwd").bytes(),
        ),
        (
            "hard link to a missing file",
            Tar::new().hardlink("x", "nothing").bytes(),
        ),
        (
            "hard link to a directory",
            Tar::new().dir("d/", 0o755).hardlink("x", "d").bytes(),
        ),
        (
            "hard link survives its target's replacement",
            Tar::new()
                .file("a", b"first")
                .hardlink("b", "a")
                .file("a", b"second")
                .bytes(),
        ),
        (
            "whiteout through a symlink",
            Tar::new()
                .symlink("out", "/")
                .file("out/.wh.precious", b"")
                .file("out/.wh..wh..opq", b"")
                .bytes(),
        ),
        ("whiteout of dot", Tar::new().file("a/.wh..", b"").bytes()),
    ];
    for (name, layer) in cases {
        assert_same_tree(name, &layer);
    }
}

#[test]
fn image_and_unpack_agree_on_pax_sparse_files() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("GNU.sparse.size", &b"268435456"[..]),
        ("GNU.sparse.numblocks", &b"2"[..]),
        ("GNU.sparse.map", &b"0,10,268435000,20"[..]),
        ("GNU.sparse.name", &b"sparse"[..]),
    ])
    .unwrap();
    let mut h = Tar::header(
        tar::EntryType::Regular,
        "GNUSparseFile.0/sparse",
        0o600,
        0,
        0,
    );
    let mut data = vec![1u8; 10];
    data.extend([2u8; 20]);
    h.set_size(data.len() as u64);
    h.set_cksum();
    b.append(&h, &data[..]).unwrap();
    let layer = b.into_inner().unwrap();
    assert_same_tree("pax sparse", &layer);
}

fn write_layer(dir: &Path, tar: &[u8]) -> (PathBuf, Digest) {
    let path = dir.join("layer.tar");
    fs::File::create(&path).unwrap().write_all(tar).unwrap();
    (path, Digest::of_bytes(tar))
}

#[test]
fn corrupted_or_truncated_image_is_refused_and_removed() {
    let state = tempfile::tempdir().unwrap();
    let images = ImageCache::new(state.path()).unwrap();
    let (blob, diff_id) = write_layer(
        state.path(),
        &Tar::new().file("etc/os-release", b"ID=kiln\n").bytes(),
    );
    let (image, _) = images.convert(&blob, &diff_id, 1 << 30).unwrap();
    assert!(images.verified(&diff_id).unwrap().is_some());

    // One flipped byte in the metadata.
    let mut bytes = fs::read(&image.path).unwrap();
    let last = bytes.len() - 4096 + 10;
    bytes[last] ^= 0xff;
    let mut perms = fs::metadata(&image.path).unwrap().permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(&image.path, perms).unwrap();
    fs::write(&image.path, &bytes).unwrap();
    match images.verified(&diff_id) {
        Err(ImageError::Corrupt { .. }) => {}
        other => panic!("corrupted image accepted: {other:?}"),
    }
    assert!(!image.path.exists(), "a corrupt image is removed");
    assert!(images.verified(&diff_id).unwrap().is_none());

    // Truncated.
    let (image, _) = images.convert(&blob, &diff_id, 1 << 30).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&image.path);
    let f = match f {
        Ok(f) => f,
        Err(_) => {
            let mut perms = fs::metadata(&image.path).unwrap().permissions();
            #[allow(clippy::permissions_set_readonly_false)]
            perms.set_readonly(false);
            fs::set_permissions(&image.path, perms).unwrap();
            fs::OpenOptions::new()
                .write(true)
                .open(&image.path)
                .unwrap()
        }
    };
    f.set_len(4096).unwrap();
    assert!(matches!(
        images.verified(&diff_id),
        Err(ImageError::Corrupt { .. })
    ));
}

/// Rewrites one byte of `path` in place (same inode) and sets its mtime
/// back: what an editor that wants to go unnoticed does.
fn flip_byte_keeping_size_and_mtime(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let meta = fs::metadata(path).unwrap();
    let mut perms = meta.permissions();
    #[allow(clippy::permissions_set_readonly_false)]
    perms.set_readonly(false);
    fs::set_permissions(path, perms).unwrap();
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= 0xff;
    f.write_all_at(&b, offset).unwrap();
    f.set_times(fs::FileTimes::new().set_modified(meta.modified().unwrap()))
        .unwrap();
    drop(f);
    let now = fs::metadata(path).unwrap();
    assert_eq!(
        (now.len(), now.mtime(), now.mtime_nsec()),
        (meta.len(), meta.mtime(), meta.mtime_nsec())
    );
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .unwrap()
        .trim()
        .to_string()
}

/// Writes a stamp saying that `path`, as it is now, hashed to `digest`.
fn forge_stamp(images: &ImageCache, diff_id: &Digest, path: &Path, digest: &Digest, boot: &str) {
    let meta = fs::metadata(path).unwrap();
    let ns = |s: i64, n: i64| i128::from(s) * 1_000_000_000 + i128::from(n);
    let stamp = Stamp {
        boot_id: boot.to_string(),
        digest: digest.clone(),
        dev: meta.dev(),
        ino: meta.ino(),
        size: meta.len(),
        mtime_ns: ns(meta.mtime(), meta.mtime_nsec()),
        ctime_ns: ns(meta.ctime(), meta.ctime_nsec()),
    };
    fs::write(images.stamp_path(diff_id), stamp.render()).unwrap();
}

#[test]
fn an_image_rewritten_in_place_with_its_mtime_set_back_is_refused_despite_its_stamp() {
    let state = tempfile::tempdir().unwrap();
    let images = ImageCache::new(state.path()).unwrap();
    let (blob, diff_id) = write_layer(
        state.path(),
        &Tar::new().file("etc/os-release", b"ID=kiln\n").bytes(),
    );
    let (image, _) = images.convert(&blob, &diff_id, 1 << 30).unwrap();
    let stamp = fs::read_to_string(images.stamp_path(&diff_id)).unwrap();
    let stamp = Stamp::parse(&stamp).expect("a full hash leaves a stamp");
    assert_eq!(stamp.digest, image.digest);
    assert_eq!(stamp.boot_id, boot_id());
    assert!(images.verified(&diff_id).unwrap().is_some());

    // Same size, same mtime, same inode: only the ctime moved.
    flip_byte_keeping_size_and_mtime(&image.path, 1024 + 7);
    match images.verified(&diff_id) {
        Err(ImageError::Corrupt { .. }) => {}
        other => panic!("a rewritten image was accepted on its stamp: {other:?}"),
    }
    assert!(!image.path.exists(), "a corrupt image is removed");
    assert!(!images.stamp_path(&diff_id).exists(), "and its stamp");

    // Replaced by another file of the same size: another inode.
    let (image, _) = images.convert(&blob, &diff_id, 1 << 30).unwrap();
    let mut bytes = fs::read(&image.path).unwrap();
    bytes[1024 + 7] ^= 0xff;
    let other = state.path().join("other.erofs");
    fs::write(&other, &bytes).unwrap();
    fs::rename(&other, &image.path).unwrap();
    assert!(matches!(
        images.verified(&diff_id),
        Err(ImageError::Corrupt { .. })
    ));
}

#[test]
fn a_stamp_stands_in_for_the_hash_only_in_its_own_boot_and_never_with_rehashing() {
    let state = tempfile::tempdir().unwrap();
    let images = ImageCache::new(state.path()).unwrap();
    let (blob, diff_id) = write_layer(
        state.path(),
        &Tar::new().file("etc/os-release", b"ID=kiln\n").bytes(),
    );
    let corrupt_below_the_filesystem = || {
        // A change no ctime shows (bit-rot, a write to the raw device) is
        // what a stamp cannot see: simulated by stamping after the change.
        let (image, _) = images.convert(&blob, &diff_id, 1 << 30).unwrap();
        flip_byte_keeping_size_and_mtime(&image.path, 1024 + 7);
        image
    };

    // The documented trade-off: in this boot, a matching stamp is trusted
    // (this is what saves the hash before each mount)...
    let image = corrupt_below_the_filesystem();
    forge_stamp(&images, &diff_id, &image.path, &image.digest, &boot_id());
    assert!(images.verified(&diff_id).unwrap().is_some());
    // ...but not with --rehash-layer-images,
    match images.clone().hash_every_mount().verified(&diff_id) {
        Err(ImageError::Corrupt { .. }) => {}
        other => panic!("--rehash-layer-images trusted a stamp: {other:?}"),
    }
    // ...nor a stamp from another boot,
    let image = corrupt_below_the_filesystem();
    forge_stamp(
        &images,
        &diff_id,
        &image.path,
        &image.digest,
        "00000000-0000-0000-0000-000000000000",
    );
    assert!(matches!(
        images.verified(&diff_id),
        Err(ImageError::Corrupt { .. })
    ));
    // ...nor a damaged one.
    let image = corrupt_below_the_filesystem();
    forge_stamp(&images, &diff_id, &image.path, &image.digest, &boot_id());
    let text = fs::read_to_string(images.stamp_path(&diff_id)).unwrap();
    fs::write(images.stamp_path(&diff_id), text.replace("ino ", "inode ")).unwrap();
    assert!(matches!(
        images.verified(&diff_id),
        Err(ImageError::Corrupt { .. })
    ));
}

#[test]
fn conversion_checks_the_diff_id() {
    let dir = tempfile::tempdir().unwrap();
    let tar = Tar::new().file("a", b"A").bytes();
    let out = fs::File::create(dir.path().join("img")).unwrap();
    let err = convert_layer(
        &tar[..],
        Some(&Digest::of_bytes(b"other")),
        out,
        dir.path(),
        1 << 30,
    );
    assert!(err.is_err(), "a layer that is not its diff_id converts");
}

/// Mount points below `dir` in this process's mount namespace.
fn mounts_below(dir: &Path) -> Vec<String> {
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    fs::read_to_string("/proc/self/mountinfo")
        .unwrap()
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .filter(|p| Path::new(p).starts_with(&dir))
        .map(str::to_owned)
        .collect()
}

struct BuildEnv {
    registry: kiln_e2e::Registry,
    server: kiln_e2e::CacheServer,
    work: tempfile::TempDir,
}

impl BuildEnv {
    fn new() -> Self {
        let registry = kiln_e2e::Registry::start(kiln_e2e::RegistryAuth::None).unwrap();
        let work = tempfile::tempdir().unwrap();
        kiln_e2e::push_busybox(&registry, work.path(), "library/busybox:latest", &[]).unwrap();
        let server = kiln_e2e::CacheServer::start().unwrap();
        BuildEnv {
            registry,
            server,
            work,
        }
    }

    fn context(&self, name: &str, dockerfile: &str) -> PathBuf {
        let dir = self.work.path().join(name);
        fs::create_dir_all(&dir).unwrap();
        let base = self.registry.reference("library/busybox:latest");
        fs::write(dir.join("Dockerfile"), dockerfile.replace("BASE", &base)).unwrap();
        dir
    }

    fn command(&self, ctx: &Path, state: &Path) -> Command {
        let mut cmd = Command::new(kiln_e2e::kiln_bin("kiln-executor"));
        cmd.arg("--context")
            .arg(ctx)
            .arg("--destination")
            .arg(self.registry.reference("mountable:v1"))
            .args(["--no-push", "--insecure-registry", &self.registry.host()])
            .args(["--cache-server", &self.server.url()])
            .args(["--isolation", "chroot", "--snapshotter", "overlay"])
            .arg("--cache-dir")
            .arg(state);
        cmd
    }

    fn build_ok(&self, ctx: &Path, state: &Path) -> String {
        let out = self.command(ctx, state).output().unwrap();
        let log = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "build failed:\n{log}");
        log
    }

    fn base_layer(&self) -> (String, Digest) {
        let inspect = self
            .registry
            .skopeo_inspect("library/busybox:latest")
            .unwrap();
        let layer = inspect["Layers"][0].as_str().unwrap().to_string();
        let out = Command::new("skopeo")
            .args(["inspect", "--config", "--tls-verify=false"])
            .arg(format!(
                "docker://{}",
                self.registry.reference("library/busybox:latest")
            ))
            .output()
            .unwrap();
        let config: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        let diff_id: Digest = config["rootfs"]["diff_ids"][0]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        (layer, diff_id)
    }
}

impl Drop for BuildEnv {
    fn drop(&mut self) {
        kiln_e2e::unmount_below(self.work.path());
    }
}

#[test]
fn a_fresh_executor_mounts_the_base_image_from_the_cache_server() {
    let env = BuildEnv::new();
    let (layer, diff_id) = env.base_layer();
    let layer_gets = || {
        env.registry
            .log()
            .lines()
            .filter(|l| l.contains(&format!("/blobs/{layer}")) && l.contains("GET"))
            .filter(|l| l.contains(" 200 "))
            .count()
    };

    // First executor: pulls the base layer, converts it, mounts it, shares
    // the image.
    let one = env.context(
        "one",
        "FROM BASE\nRUN cat /bin/busybox > /copy && echo one > /one\n",
    );
    let state_one = env.work.path().join("state-one");
    let log = env.build_ok(&one, &state_one);
    assert!(
        log.contains("mounted image") && log.contains("converted"),
        "{log}"
    );
    assert!(
        !state_one.join("layers").join(diff_id.hex()).exists(),
        "the base was unpacked:\n{log}"
    );
    assert_eq!(layer_gets(), 1, "the first executor pulls the base layer");
    assert!(
        mounts_below(env.work.path()).is_empty(),
        "a mount outlived the build"
    );

    // A fresh executor whose step misses: the base comes from the cache
    // server as an image, mounted, never unpacked, never pulled.
    let two = env.context(
        "two",
        "FROM BASE\nRUN test -s /bin/busybox && echo two > /two\n",
    );
    let state_two = env.work.path().join("state-two");
    let log = env.build_ok(&two, &state_two);
    assert!(log.contains("downloaded from the cache"), "{log}");
    assert!(
        state_two
            .join("images/v1")
            .join(format!("{}.erofs", diff_id.hex()))
            .is_file()
    );
    assert!(
        !state_two.join("layers").join(diff_id.hex()).exists(),
        "the base was unpacked:\n{log}"
    );
    assert_eq!(layer_gets(), 1, "the base layer was pulled again");
    assert!(
        mounts_below(env.work.path()).is_empty(),
        "a mount outlived the build"
    );

    // The same node again: the local image, no download.
    let three = env.context("three", "FROM BASE\nRUN echo three > /three\n");
    let log = env.build_ok(&three, &state_two);
    assert!(log.contains("from the local image cache"), "{log}");
    assert!(
        mounts_below(env.work.path()).is_empty(),
        "a mount outlived the build"
    );
}

#[test]
fn a_fresh_executor_builds_from_the_cache_server_alone_once_the_registry_is_stopped() {
    let mut env = BuildEnv::new();
    let (layer, diff_id) = env.base_layer();
    let manifest = env
        .registry
        .skopeo_raw_manifest("library/busybox:latest")
        .unwrap();
    let manifest_digest = Digest::of_bytes(&manifest);
    let tagged = env.registry.reference("library/busybox:latest");
    let bare = env.registry.reference("library/busybox");

    // First executor, the base pinned as `name:tag@digest`: resolved by the
    // registry, its documents, layer and image shared through the server.
    let one = env.context(
        "one",
        &format!("FROM {tagged}@{manifest_digest}\nRUN echo one > /one\n"),
    );
    let log = env.build_ok(&one, &env.work.path().join("state-one"));
    assert!(log.contains("not resolved from the cache"), "{log}");
    assert!(log.contains("converted"), "{log}");

    env.registry.stop();

    // A fresh --cache-dir, the same image pinned as `name@digest`, a step
    // that misses: everything comes from the cache server.
    let two = env.context(
        "two",
        &format!("FROM {bare}@{manifest_digest}\nRUN test -s /bin/busybox && echo two > /two\n"),
    );
    let state_two = env.work.path().join("state-two");
    let layout = env.work.path().join("out-layout");
    let out = env
        .command(&two, &state_two)
        .arg("--oci-layout-path")
        .arg(&layout)
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "build without the registry failed:\n{log}"
    );
    assert!(log.contains("from the cache (pinned by digest"), "{log}");
    assert!(log.contains("downloaded from the cache"), "{log}");
    assert!(
        !state_two.join("layers").join(diff_id.hex()).exists(),
        "the base was unpacked:\n{log}"
    );
    assert!(
        mounts_below(env.work.path()).is_empty(),
        "a mount outlived the build"
    );

    // The image: the base's layer (its bytes, by digest) under the step's.
    let blob = |d: &str| {
        layout
            .join("blobs/sha256")
            .join(d.trim_start_matches("sha256:"))
    };
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).unwrap()).unwrap();
    let image_manifest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string();
    let image: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(&image_manifest)).unwrap()).unwrap();
    let layers: Vec<String> = image["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l["digest"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(layers.len(), 2, "{image}");
    assert_eq!(layers[0], layer, "the base layer is the registry's");
    let base_bytes = fs::read(blob(&layers[0])).unwrap();
    assert_eq!(Digest::of_bytes(&base_bytes).to_string(), layer);
    let two_file = Command::new("tar")
        .arg("-xzOf")
        .arg(blob(&layers[1]))
        .arg("two")
        .output()
        .unwrap();
    assert!(two_file.status.success(), "{two_file:?}");
    assert_eq!(two_file.stdout, b"two\n");
    let config = image["config"]["digest"].as_str().unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&fs::read(blob(config)).unwrap()).unwrap();
    assert_eq!(config["rootfs"]["diff_ids"][0], diff_id.to_string());

    // A tag needs the registry: the build fails and says which one.
    let three = env.context(
        "three",
        &format!("FROM {tagged}\nRUN echo three > /three\n"),
    );
    let out = env
        .command(&three, &env.work.path().join("state-three"))
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a tag resolved without its registry:\n{log}"
    );
    assert!(
        log.contains(&format!(
            "the registry {} is needed to resolve the tag",
            env.registry.host()
        )),
        "{log}"
    );
    assert!(
        mounts_below(env.work.path()).is_empty(),
        "a mount outlived the build"
    );
}

/// Files below `dir`, recursively (none when it does not exist).
fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = fs::read_dir(dir) else {
        return out;
    };
    for e in entries.flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(files_below(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[test]
fn a_base_layer_is_converted_while_it_downloads_and_a_wrong_digest_leaves_nothing_behind() {
    let env = BuildEnv::new();
    let (layer, diff_id) = env.base_layer();

    // The gzip header's MTIME field: the decompressed stream, and so the
    // diff_id and the image, stay the same; only the compressed digest
    // says these are not the layer's bytes.
    let blob = env.registry.blob_file(&layer);
    let good = fs::read(&blob).unwrap();
    let mut bad = good.clone();
    bad[4] ^= 0xff;
    fs::write(&blob, &bad).unwrap();
    let ctx = env.context("bad", "FROM BASE\nRUN echo bad > /bad\n");
    let state = env.work.path().join("state-bad");
    let out = env
        .command(&ctx, &state)
        .args(["--image-download-retry", "0"])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        !out.status.success(),
        "a layer with the wrong digest was used:\n{log}"
    );
    assert!(log.contains("converting it as it downloads"), "{log}");
    let hex = layer.trim_start_matches("sha256:");
    let left: Vec<PathBuf> = files_below(&state.join("images"))
        .into_iter()
        .chain(files_below(&state.join("store")).into_iter().filter(|p| {
            p.file_name().is_some_and(|n| n == hex)
                || p.parent().is_some_and(|d| d.ends_with("tmp"))
        }))
        .collect();
    assert!(left.is_empty(), "left behind: {left:?}\n{log}");
    assert!(mounts_below(env.work.path()).is_empty());

    // The right bytes: pulled and converted in one pass, then mounted.
    fs::write(&blob, &good).unwrap();
    let state = env.work.path().join("state-good");
    let log = env.build_ok(&ctx, &state);
    assert!(log.contains("converting it as it downloads"), "{log}");
    assert!(log.contains("mounted image"), "{log}");
    assert!(
        files_below(&state.join("store"))
            .iter()
            .any(|p| p.file_name().is_some_and(|n| n == hex)),
        "the pulled blob is stored"
    );
    // Mounted first, hashed in the background before the build ended: the
    // recorded digest is the file's, and a stamp vouches for it.
    assert!(log.contains("hashed in the background"), "{log}");
    let images = state.join("images/v1");
    let image = fs::read(images.join(format!("{}.erofs", diff_id.hex()))).unwrap();
    let recorded = fs::read_to_string(images.join(format!("{}.sha256", diff_id.hex()))).unwrap();
    assert_eq!(recorded.trim(), Digest::of_bytes(&image).to_string());
    let stamp = fs::read_to_string(images.join(format!("{}.stamp", diff_id.hex()))).unwrap();
    assert_eq!(
        Stamp::parse(&stamp).unwrap().digest,
        Digest::of_bytes(&image)
    );
    assert!(
        !state.join("layers").join(diff_id.hex()).exists(),
        "the base was unpacked:\n{log}"
    );
}

#[test]
fn sigterm_mid_build_leaves_no_mount_behind() {
    let env = BuildEnv::new();
    let ctx = env.context("slow", "FROM BASE\nRUN echo started && sleep 60\n");
    let state = env.work.path().join("state");
    let log_path = env.work.path().join("build.log");
    let mut child = env
        .command(&ctx, &state)
        .stderr(fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    // Wait until the base image and the step's overlay are both mounted.
    loop {
        let log = fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains("started") && mounts_below(&state).len() >= 2 {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the build ended early:\n{log}"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "no mount seen:\n{log}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let killed = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let status = child.wait().unwrap();
    assert!(!status.success());
    let left = mounts_below(&state);
    assert!(left.is_empty(), "mounts left after SIGTERM: {left:?}");
}

/// Not a test: the measurement behind docs/performance.md ("Mountable
/// layers"). `KILN_BENCH_LAYER=blob KILN_BENCH_DIR=dir cargo test --release
/// -p kiln-e2e --test e2e -- --ignored --nocapture mountable_layers::measure`
#[test]
#[ignore]
fn measure_unpack_against_convert_and_mount() {
    let (Some(layer), Some(dir)) = (
        std::env::var_os("KILN_BENCH_LAYER"),
        std::env::var_os("KILN_BENCH_DIR"),
    ) else {
        return;
    };
    let dir = PathBuf::from(dir);
    let sync = || {
        Command::new("sync").status().unwrap();
        fs::write("/proc/sys/vm/drop_caches", "3").ok();
    };
    let unpacked = dir.join("unpacked");
    let _ = fs::remove_dir_all(&unpacked);
    fs::create_dir_all(&unpacked).unwrap();
    sync();
    let t = std::time::Instant::now();
    let stats = unpack_layer(
        fs::File::open(&layer).unwrap(),
        &unpacked,
        &UnpackOptions::overlay_lower(),
        None,
    )
    .unwrap();
    let unpack = t.elapsed();
    let images = ImageCache::new(&dir.join("state")).unwrap();
    let diff_id = {
        let mut r = kiln_executor::build::unpack::decompress(std::io::BufReader::new(
            fs::File::open(&layer).unwrap(),
        ))
        .unwrap();
        let mut w = kiln_common::Sha256Writer::new(std::io::sink());
        std::io::copy(&mut r, &mut w).unwrap();
        w.finish().1
    };
    sync();
    let t = std::time::Instant::now();
    let (image, cstats) = images
        .convert(Path::new(&layer), &diff_id, 64 << 30)
        .unwrap();
    let convert = t.elapsed();
    sync();
    let t = std::time::Instant::now();
    let verified = images.verified(&diff_id).unwrap().unwrap();
    let verify = t.elapsed();
    let t = std::time::Instant::now();
    let m = Mounted::image(&verified.path);
    let mount = t.elapsed();
    let t = std::time::Instant::now();
    let files = walkdir::WalkDir::new(&m.target).into_iter().count();
    let walk = t.elapsed();
    println!(
        "entries {} ({} bytes): unpack {:?}; convert {:?} (image {} bytes); verify {:?}; mount {:?}; walk of {files} {:?}",
        stats.entries, stats.file_bytes, unpack, convert, image.size, verify, mount, walk
    );
    let _ = cstats;
    drop(m);
    let _ = fs::remove_dir_all(&unpacked);
}

#[test]
fn a_huge_sparse_file_is_left_to_the_unpacker() {
    let mut b = tar::Builder::new(Vec::new());
    b.append_pax_extensions([
        ("GNU.sparse.size", &b"4294967296"[..]),
        ("GNU.sparse.numblocks", &b"1"[..]),
        ("GNU.sparse.map", &b"0,10"[..]),
        ("GNU.sparse.name", &b"huge"[..]),
    ])
    .unwrap();
    let mut h = Tar::header(tar::EntryType::Regular, "GNUSparseFile.0/huge", 0o600, 0, 0);
    h.set_size(10);
    h.set_cksum();
    b.append(&h, &[1u8; 10][..]).unwrap();
    let layer = b.into_inner().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = fs::File::create(dir.path().join("img")).unwrap();
    let err = convert_layer(&layer[..], None, out, dir.path(), 8 << 30).unwrap_err();
    assert!(
        matches!(err, kiln_executor::erofs::ConvertError::Unsupported { .. }),
        "{err}"
    );
}
