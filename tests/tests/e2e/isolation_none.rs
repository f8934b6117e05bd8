//! `--isolation none` (Kaniko's model: the build runs on `/` of the
//! executor's own container) tested the only safe way on a real machine:
//! inside a throwaway root made with `unshare -m -p -f` and `chroot`, with
//! the executor binary and its libraries copied in. The image must hold the
//! base image and the steps' changes, and nothing of the executor, its
//! state, its libraries or the context.
//!
//! The refusal to run outside a container is not tested here: this test
//! machine is itself a container (it has `/.dockerenv`), and the detection
//! is unit-tested on fake roots in `executor/src/build/runner/none.rs`.

use std::fs;
use std::path::Path;
use std::process::Command;

use kiln_e2e::{kiln_bin, make_busybox_layout, run};

/// Copies `binary` and the shared libraries `ldd` names into `root`.
fn install_with_libraries(binary: &Path, root: &Path, dest: &str) {
    let target = root.join(dest.trim_start_matches('/'));
    fs::create_dir_all(target.parent().unwrap()).unwrap();
    fs::copy(binary, &target).unwrap();
    let ldd = run(Command::new("ldd").arg(binary)).unwrap();
    for line in ldd.lines() {
        let path = line
            .split_whitespace()
            .find(|w| w.starts_with('/'))
            .map(str::to_string);
        if let Some(lib) = path {
            let to = root.join(lib.trim_start_matches('/'));
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(&lib, &to).unwrap();
        }
    }
}

#[test]
fn in_place_builds_in_a_throwaway_root_contain_only_the_image() {
    let work = tempfile::tempdir().unwrap();
    let root = work.path().join("root");
    fs::create_dir_all(&root).unwrap();
    install_with_libraries(&kiln_bin("kiln-executor"), &root, "/kiln/kiln-executor");
    make_busybox_layout(&root.join("base-layout"), "latest").unwrap();
    let ctx = root.join("ctx");
    fs::create_dir_all(&ctx).unwrap();
    fs::write(ctx.join("payload.txt"), "copied\n").unwrap();
    fs::write(
        ctx.join("Dockerfile"),
        "FROM oci-layout:///base-layout:latest\nRUN echo ran > /ran.txt && rm /bin/ls\nCOPY payload.txt /opt/payload.txt\n",
    )
    .unwrap();

    // A container has /proc (the walk snapshotter reads the mount table).
    fs::create_dir_all(root.join("proc")).unwrap();
    let out = Command::new("unshare")
        .args(["-m", "-p", "-f", "--kill-child"])
        .arg(format!("--mount-proc={}", root.join("proc").display()))
        .arg("/usr/sbin/chroot")
        .arg(&root)
        .args([
            "/kiln/kiln-executor",
            "--isolation",
            "none",
            "--context",
            "/ctx",
            "--oci-layout-path",
            "/out",
            "--no-push",
            "--cache-dir",
            "/kiln/cache",
        ])
        .env_clear()
        .env("container", "kiln-test")
        .env("PATH", "/bin")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let bundle = work.path().join("bundle");
    run(Command::new("umoci")
        .args(["unpack", "--image"])
        .arg(format!("{}:latest", root.join("out").display()))
        .arg(&bundle))
    .unwrap();
    let image = bundle.join("rootfs");
    assert_eq!(fs::read_to_string(image.join("ran.txt")).unwrap(), "ran\n");
    assert_eq!(
        fs::read_to_string(image.join("opt/payload.txt")).unwrap(),
        "copied\n"
    );
    assert!(
        image.join("bin/busybox").is_file(),
        "the base image is in the result"
    );
    assert!(
        !image.join("bin/ls").exists(),
        "a deletion is a whiteout in the result"
    );
    for leaked in [
        "kiln",
        "ctx",
        "base-layout",
        "lib",
        "lib64",
        "usr/lib",
        "proc",
    ] {
        assert!(
            !image.join(leaked).exists(),
            "/{leaked} leaked into the image"
        );
    }
}
