//! Snapshot cost after a one-file change on a rootfs of ~64k files.
//!
//! - `overlay/diff`: reading the change from the upper directory;
//! - `overlay/cycle`: mount + one-file change + diff + unmount (what a RUN
//!   step pays besides the command itself);
//! - `walk/diff`: the walk snapshotter's comparison walk (the whole tree);
//! - `walk/cycle`: record + change + compare.
//!
//! Needs root (overlay mounts). The tree is generated once per run in a
//! temporary directory.

use criterion::{Criterion, criterion_group, criterion_main};
use kiln_executor::build::snapshot::Snapshotter;
use kiln_executor::build::snapshot::overlay::OverlaySnapshotter;
use kiln_executor::build::snapshot::walk::WalkSnapshotter;
use std::path::Path;
use std::time::Duration;

const DIRS: usize = 256;
const FILES_PER_DIR: usize = 256;

fn make_tree(root: &Path) {
    for d in 0..DIRS {
        let dir = root.join(format!("usr/lib/pkg{d:03}"));
        std::fs::create_dir_all(&dir).unwrap();
        for f in 0..FILES_PER_DIR {
            std::fs::write(dir.join(format!("file{f:03}.so")), format!("{d}-{f}")).unwrap();
        }
    }
    std::fs::create_dir_all(root.join("etc")).unwrap();
    std::fs::write(root.join("etc/config"), b"v0").unwrap();
}

fn snapshot(c: &mut Criterion) {
    let tmp = tempfile::tempdir().unwrap();
    let lower = tmp.path().join("lower");
    make_tree(&lower);
    let mut counter = 0u64;

    let mut group = c.benchmark_group("snapshot-64k-files-one-change");
    group.sample_size(20);

    let overlay = OverlaySnapshotter::new();
    let scratch = tmp.path().join("ov-diff");
    let m = overlay
        .prepare(std::slice::from_ref(&lower), &scratch)
        .unwrap();
    std::fs::write(m.rootfs.join("etc/config"), b"v1").unwrap();
    group.bench_function("overlay/diff", |b| {
        b.iter(|| {
            let change = overlay.diff(&m).unwrap();
            assert_eq!(change.len(), 2);
        })
    });
    overlay.release(m).unwrap();

    group.bench_function("overlay/cycle", |b| {
        b.iter(|| {
            counter += 1;
            let scratch = tmp.path().join(format!("ov-{counter}"));
            let m = overlay
                .prepare(std::slice::from_ref(&lower), &scratch)
                .unwrap();
            std::fs::write(m.rootfs.join("etc/config"), counter.to_string()).unwrap();
            let change = overlay.diff(&m).unwrap();
            assert_eq!(change.len(), 2);
            overlay.release(m).unwrap();
            std::fs::remove_dir(&scratch).unwrap();
        })
    });

    let walk = WalkSnapshotter::default();
    let m = walk
        .prepare(std::slice::from_ref(&lower), tmp.path())
        .unwrap();
    std::fs::write(lower.join("etc/config"), b"v1").unwrap();
    group.bench_function("walk/diff", |b| {
        b.iter(|| {
            let change = walk.diff(&m).unwrap();
            assert_eq!(change.len(), 2);
        })
    });
    walk.release(m).unwrap();

    group.measurement_time(Duration::from_secs(10));
    group.bench_function("walk/cycle", |b| {
        b.iter(|| {
            counter += 1;
            let m = walk
                .prepare(std::slice::from_ref(&lower), tmp.path())
                .unwrap();
            std::fs::write(lower.join("etc/config"), counter.to_string()).unwrap();
            let change = walk.diff(&m).unwrap();
            assert_eq!(change.len(), 2);
            walk.release(m).unwrap();
        })
    });
    group.finish();
}

criterion_group!(benches, snapshot);
criterion_main!(benches);
