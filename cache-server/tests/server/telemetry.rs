//! What an operator's tooling reads from a running server: `/metrics` after
//! real traffic, linted by Prometheus' own `promtool`, and log output that
//! carries colour only on a terminal.

use crate::common;

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use kiln_cache_server::telemetry::{FAMILIES, MAX_SIZE};
use reqwest::StatusCode;

/// `promtool`: `$KILN_PROMTOOL`, else on `PATH`, else where
/// scripts/prereqs.sh puts it. Required: a lint that is skipped silently
/// would let an unlinted family through.
fn promtool() -> PathBuf {
    if let Some(p) = std::env::var_os("KILN_PROMTOOL") {
        return PathBuf::from(p);
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default())
        .chain([PathBuf::from("/opt/kiln-tools/bin")])
    {
        let p = dir.join("promtool");
        if p.is_file() {
            return p;
        }
    }
    panic!("promtool not found (set KILN_PROMTOOL, or run scripts/prereqs.sh, which installs it)");
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_after_real_traffic_pass_promtool_and_describe_every_family() {
    let data = tempfile::tempdir().unwrap();
    // The default blob grace keeps a fresh upload until its entry arrives,
    // even while GC evicts.
    let server = Server::start(data.path(), &["--max-size", "3000"]);
    let (c, url) = (client(), server.url.as_str());

    // A miss, uploads and entries, hits, a missing blob, then eviction.
    let miss = c
        .post(format!("{url}/v1/lookup"))
        .json(&serde_json::json!({"keys": [key(99)]}))
        .send()
        .await
        .unwrap();
    assert_eq!(miss.status(), StatusCode::OK);
    for i in 0..3 {
        if i == 2 {
            // Two entries stored, under the limit: two hits, one miss.
            let hits = c
                .post(format!("{url}/v1/lookup"))
                .json(&serde_json::json!({"keys": [key(0), key(1), key(7)]}))
                .send()
                .await
                .unwrap();
            assert_eq!(hits.status(), StatusCode::OK);
        }
        let blob = bytes(i, 1200);
        let (status, d) = put_blob(&c, url, None, &blob).await;
        assert_eq!(status, StatusCode::CREATED);
        let r = put_entry(&c, url, None, &key(i), &entry(Some((&d, 1200)), "RUN")).await;
        assert_eq!(r.status(), StatusCode::CREATED);
        let got = c.get(format!("{url}/v1/blobs/{d}")).send().await.unwrap();
        assert_eq!(got.bytes().await.unwrap().as_ref(), blob.as_slice());
    }
    let absent = c
        .get(format!("{url}/v1/blobs/sha256:{}", "0".repeat(64)))
        .send()
        .await
        .unwrap();
    assert_eq!(absent.status(), StatusCode::NOT_FOUND);
    // The third upload took the store over its limit (3600 > 3000 bytes):
    // GC evicts the least recently used entry.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        c.post(format!("{url}/v1/admin/gc")).send().await.unwrap();
        let text = c
            .get(format!("{url}/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        if text.contains("kiln_cache_evicted_entry_idle_seconds_count") {
            break text;
        }
        assert!(Instant::now() < deadline, "nothing evicted:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let mut lint = Command::new(promtool())
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write as _;
    lint.stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = lint.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n---\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    // Every family the traffic touched is there, with its HELP line; the
    // configured limit is exported for the "stored bytes against max_size"
    // alert.
    for (name, _, _) in FAMILIES {
        assert!(
            text.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{text}"
        );
    }
    assert!(
        text.lines().any(|l| l == format!("{MAX_SIZE} 3000")),
        "{MAX_SIZE} is not the configured limit:\n{text}"
    );
    assert!(
        text.contains(r#"kiln_cache_lookup_keys_total{result="miss"} 2"#),
        "{text}"
    );
}

#[test]
fn log_lines_carry_no_colour_in_a_file() {
    let data = tempfile::tempdir().unwrap();
    let mut server = Server::start(data.path(), &[]);
    server.terminate(Duration::from_secs(20));
    let log = std::fs::read(&server.log).unwrap();
    assert!(
        String::from_utf8_lossy(&log).contains("listening on"),
        "{}",
        String::from_utf8_lossy(&log)
    );
    assert!(
        !log.contains(&0x1b),
        "ESC in a log written to a file:\n{}",
        String::from_utf8_lossy(&log)
    );
}

/// The server's output on a pseudo-terminal (util-linux `script`), stopped
/// by SIGINT after a second, with `NO_COLOR` set or not.
fn output_on_a_terminal(no_color: Option<&str>) -> Vec<u8> {
    let data = tempfile::tempdir().unwrap();
    let inner = format!(
        "timeout -s INT 1 {SERVER} --listen 127.0.0.1:0 --gc-interval 0 --data {}",
        data.path().display()
    );
    let mut cmd = Command::new("script");
    cmd.args(["-qec", &inner, "/dev/null"])
        .env_remove("NO_COLOR")
        .env("RUST_LOG", "info")
        .stdin(Stdio::null());
    if let Some(v) = no_color {
        cmd.env("NO_COLOR", v);
    }
    let out = cmd
        .output()
        .expect("script (util-linux) runs a pseudo-terminal");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("listening on"),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

#[test]
fn colour_on_a_terminal_unless_no_color_is_set() {
    assert!(output_on_a_terminal(None).contains(&0x1b));
    assert!(!output_on_a_terminal(Some("1")).contains(&0x1b));
}
