//! A full disk answers 507 while reads keep working. Needs root (tmpfs).

use crate::common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use reqwest::StatusCode;

/// A tmpfs mounted on a temporary directory, unmounted on drop.
struct Tmpfs {
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Option<Tmpfs> {
        let dir = tempfile::tempdir().unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir.path())
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs {
            path: dir.path().to_owned(),
            _dir: dir,
        })
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.path).status();
        if self.path.join("index").exists() {
            // Still mounted (busy): detach it so the temp dir can go.
            let _ = Command::new("umount").arg("-l").arg(&self.path).status();
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_answers_507_and_reads_keep_working() {
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("SKIPPED: mounting a tmpfs needs root");
        return;
    }
    let fs = Tmpfs::mount("8m").expect("mount -t tmpfs failed");
    // The server must die before the unmount: declared after `fs`, so it
    // drops first.
    let server = Server::start(fs.path(), &[]);
    let c = client();

    let first = bytes(1, 512 << 10);
    let (status, first_digest) = put_blob(&c, &server.url, None, &first).await;
    assert_eq!(status, StatusCode::CREATED);
    let r = put_entry(
        &c,
        &server.url,
        None,
        &key(1),
        &entry(Some((&first_digest, first.len() as u64)), "RUN"),
    )
    .await;
    assert_eq!(r.status(), StatusCode::CREATED);

    let mut saw_507 = false;
    for i in 2..40 {
        let blob = bytes(i, 1 << 20);
        let digest = kiln_common::Digest::of_bytes(&blob);
        let r = c
            .put(format!("{}/v1/blobs/{digest}", server.url))
            .body(blob)
            .send()
            .await
            .unwrap();
        match r.status() {
            StatusCode::CREATED => continue,
            StatusCode::INSUFFICIENT_STORAGE => {
                assert_eq!(error_code(r).await, "insufficient_storage");
                saw_507 = true;
                break;
            }
            other => panic!("unexpected {other}: {}", r.text().await.unwrap()),
        }
    }
    assert!(saw_507, "the 8 MiB volume never filled up");
    assert!(
        files_below(&fs.path().join("tmp")).is_empty(),
        "a failed upload left its temporary file"
    );

    // Fill what the failed upload gave back, so the volume is truly full.
    {
        use std::io::Write;
        let mut filler = std::fs::File::create(fs.path().join("filler")).unwrap();
        let chunk = vec![0u8; 64 << 10];
        while filler.write_all(&chunk).is_ok() {}
    }
    let ready = c
        .get(format!("{}/readyz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(error_code(ready).await, "not_ready");
    let (status, _) = put_blob(&c, &server.url, None, &bytes(99, 256 << 10)).await;
    assert_eq!(status, StatusCode::INSUFFICIENT_STORAGE);

    // Still serving: health, lookups and blob reads.
    let h = c
        .get(format!("{}/healthz", server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(h.status(), StatusCode::OK);
    let r = c
        .get(format!("{}/v1/entries/{}", server.url, key(1)))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::OK);
    let got = c
        .get(format!("{}/v1/blobs/{first_digest}", server.url))
        .send()
        .await
        .unwrap()
        .bytes()
        .await
        .unwrap();
    assert_eq!(got.as_ref(), first.as_slice());
    drop(server);
    drop(fs);
}
