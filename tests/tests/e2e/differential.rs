//! Differential test against a real peer: the same Dockerfiles built by
//! kiln and by `buildah build` (vfs storage, chroot isolation) must give the
//! same root filesystem — paths, types, content, mode, owner, link targets
//! and xattrs; timestamps aside.

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use kiln_e2e::{Registry, RegistryAuth, kiln_bin, push_busybox, run};

/// Everything about one path that both builders must agree on.
#[derive(Debug, PartialEq, Eq)]
struct Node {
    kind: &'static str,
    mode: u32,
    uid: u32,
    gid: u32,
    content: Option<String>,
    link: Option<String>,
    xattrs: Vec<String>,
}

fn snapshot(root: &Path) -> BTreeMap<String, Node> {
    let mut out = BTreeMap::new();
    for entry in walkdir_sorted(root) {
        let rel = entry.strip_prefix(root).unwrap().display().to_string();
        let meta = fs::symlink_metadata(&entry).unwrap();
        let ft = meta.file_type();
        let (kind, content, link) = if ft.is_symlink() {
            (
                "symlink",
                None,
                Some(fs::read_link(&entry).unwrap().display().to_string()),
            )
        } else if ft.is_dir() {
            ("dir", None, None)
        } else if ft.is_file() {
            let bytes = fs::read(&entry).unwrap();
            (
                "file",
                Some(kiln_common::Digest::of_bytes(&bytes).to_string()),
                None,
            )
        } else {
            ("special", None, None)
        };
        let xattrs = run(Command::new("getfattr")
            .args(["-h", "-d", "-m", "-", "--absolute-names"])
            .arg(&entry))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(str::to_string)
        .collect();
        out.insert(
            rel,
            Node {
                kind,
                mode: meta.mode() & 0o7777,
                uid: meta.uid(),
                gid: meta.gid(),
                content,
                link,
                xattrs,
            },
        );
    }
    out
}

fn walkdir_sorted(root: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        let mut children: Vec<_> = fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        children.sort();
        for c in children {
            if fs::symlink_metadata(&c).unwrap().is_dir() {
                stack.push(c.clone());
            }
            out.push(c);
        }
    }
    out
}

fn unpack(layout: &Path, tag: &str, bundle: &Path) {
    run(Command::new("umoci")
        .args(["unpack", "--image", &format!("{}:{tag}", layout.display())])
        .arg(bundle))
    .unwrap();
}

fn buildah_build(ctx: &Path, layout: &Path, storage: &Path) {
    let store = [
        "--root".to_string(),
        storage.join("root").display().to_string(),
        "--runroot".to_string(),
        storage.join("runroot").display().to_string(),
        "--storage-driver".to_string(),
        "vfs".to_string(),
    ];
    run(Command::new("buildah")
        .args(&store)
        .args([
            "build",
            "--isolation",
            "chroot",
            "--tls-verify=false",
            "--layers=false",
            "-t",
            "localhost/diff:latest",
        ])
        .arg(ctx))
    .unwrap();
    run(Command::new("buildah")
        .args(&store)
        .args(["push", "localhost/diff:latest"])
        .arg(format!("oci:{}:latest", layout.display())))
    .unwrap();
    let _ = run(Command::new("buildah")
        .args(&store)
        .args(["rmi", "--all", "--force"]));
}

const DOCKERFILE: &str = r#"FROM BASE
ARG GREETING=hi
ENV APP=/opt/app
RUN echo 'svc:x:1001:1002::/home/svc:/bin/sh' >> /etc/passwd && echo 'svc:x:1002:' >> /etc/group
WORKDIR $APP
COPY --chown=svc:svc src/ ./src/
COPY --chmod=0751 tool.sh /usr/local/bin/tool
ADD archive.tar /opt/extracted/
RUN mkdir -p data && echo "$GREETING" > data/greeting && ln -s data/greeting greeting-link \
 && chmod 2750 data && touch data/setuid && chmod 4755 data/setuid
RUN rm -f /opt/app/src/remove-me && mkdir -p /var/empty-dir
USER svc
RUN echo owned-by-svc > /tmp/svc-file
"#;

#[test]
fn kiln_and_buildah_produce_the_same_root_filesystem() {
    let registry = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&registry, work.path(), "library/busybox:latest", &[]).unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(ctx.join("src/nested")).unwrap();
    fs::write(ctx.join("src/main.c"), "int main(void) { return 0; }\n").unwrap();
    fs::write(ctx.join("src/nested/util.h"), "#pragma once\n").unwrap();
    fs::write(ctx.join("src/remove-me"), "x").unwrap();
    fs::write(ctx.join("tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    let archive_src = work.path().join("archive-src");
    fs::create_dir_all(archive_src.join("inner")).unwrap();
    fs::write(archive_src.join("inner/file.txt"), "from the archive\n").unwrap();
    run(Command::new("tar")
        .arg("-C")
        .arg(&archive_src)
        .args(["--owner=0", "--group=0", "-cf"])
        .arg(ctx.join("archive.tar"))
        .arg("inner"))
    .unwrap();
    let base = registry.reference("library/busybox:latest");
    fs::write(ctx.join("Dockerfile"), DOCKERFILE.replace("BASE", &base)).unwrap();

    assert_same_root_filesystem(&registry, &ctx, work.path());
}

/// Dockerfile cases of issue 17 on which kiln once differed from BuildKit
/// and Buildah agrees with BuildKit: `COPY --from` keeps owners, a symlink
/// source is copied as its target under its own name, a directory copied
/// from the context gets a 0755 destination, WORKDIR under USER belongs to
/// the user. (A wildcard that matches nothing beside another source is
/// checked in compat.rs only: Buildah then makes the destination a
/// directory, BuildKit copies each source on its own and writes a file.)
const COMPAT_DOCKERFILE: &str = r#"FROM BASE AS builder
RUN mkdir -p /myapp/somedir /workdir /temp && echo x > /myapp/somedir/file \
 && chown 123:123 /myapp/somedir && chown 321:321 /myapp/somedir/file \
 && echo target > /temp/target && ln -s ../temp/target /workdir/relative_link
FROM BASE
COPY --from=builder /myapp /myapp
COPY --from=builder /workdir/relative_link /workdirAnother/
ADD context/tars /tmp/tars
USER 9999
WORKDIR /workdir/uid
"#;

#[test]
fn kiln_and_buildah_agree_on_copy_from_symlinks_and_created_directories() {
    use std::os::unix::fs::PermissionsExt;
    let registry = Registry::start(RegistryAuth::None).unwrap();
    let work = tempfile::tempdir().unwrap();
    push_busybox(&registry, work.path(), "library/busybox:latest", &[]).unwrap();
    let ctx = work.path().join("ctx");
    fs::create_dir_all(ctx.join("context/tars/sub")).unwrap();
    fs::write(ctx.join("context/tars/sub/file"), "f\n").unwrap();
    for d in ["context/tars", "context/tars/sub"] {
        fs::set_permissions(ctx.join(d), fs::Permissions::from_mode(0o775)).unwrap();
    }
    let base = registry.reference("library/busybox:latest");
    fs::write(
        ctx.join("Dockerfile"),
        COMPAT_DOCKERFILE.replace("BASE", &base),
    )
    .unwrap();
    assert_same_root_filesystem(&registry, &ctx, work.path());
}

/// Builds `ctx` with kiln and with Buildah and compares the root
/// filesystems (see the module doc).
fn assert_same_root_filesystem(registry: &Registry, ctx: &Path, work: &Path) {
    let kiln_layout = work.join("kiln-layout");
    let out = Command::new(kiln_bin("kiln-executor"))
        .arg("--context")
        .arg(ctx)
        .arg("--oci-layout-path")
        .arg(&kiln_layout)
        .args(["--destination", "kiln.local/diff:latest", "--no-push"])
        .args(["--insecure-registry", &registry.host()])
        .arg("--cache-dir")
        .arg(work.join("kiln-state"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let buildah_layout = work.join("buildah-layout");
    buildah_build(ctx, &buildah_layout, &work.join("buildah-storage"));

    let (kb, bb) = (work.join("kiln-bundle"), work.join("buildah-bundle"));
    unpack(&kiln_layout, "latest", &kb);
    unpack(&buildah_layout, "latest", &bb);
    let (k, b) = (snapshot(&kb.join("rootfs")), snapshot(&bb.join("rootfs")));
    // Buildah leaves the empty mount points of its RUN containers in the
    // image (/dev, /proc, /sys, /run and empty /etc/{hostname,hosts,
    // resolv.conf}); kiln, like BuildKit, removes what it created. Those
    // placeholders are the only difference allowed, and only while empty.
    const BUILDAH_PLACEHOLDERS: [&str; 7] = [
        "dev",
        "proc",
        "sys",
        "run",
        "etc/hostname",
        "etc/hosts",
        "etc/resolv.conf",
    ];
    let empty_file = kiln_common::Digest::of_bytes(b"").to_string();
    let mut differences = Vec::new();
    for path in k
        .keys()
        .chain(b.keys())
        .collect::<std::collections::BTreeSet<_>>()
    {
        match (k.get(path), b.get(path)) {
            (Some(x), Some(y)) if x == y => {}
            (None, Some(y))
                if BUILDAH_PLACEHOLDERS.contains(&path.as_str())
                    && (y.kind == "dir" || y.content.as_deref() == Some(empty_file.as_str())) => {}
            (x, y) => differences.push(format!("{path}: kiln {x:?} / buildah {y:?}")),
        }
    }
    assert!(
        differences.is_empty(),
        "root filesystems differ:\n{}",
        differences.join("\n")
    );
}
