//! `kiln-cache` against a running server (and offline on a data dir).

use crate::common;

use std::process::{Command, Output};

use common::*;
use kiln_common::CacheEntry;
use reqwest::StatusCode;

fn cli(server: &str, token: Option<&str>, args: &[&str]) -> Output {
    let mut cmd = Command::new(CLI);
    cmd.arg("--server")
        .arg(server)
        .args(args)
        .env_remove("KILN_CACHE_TOKEN");
    if let Some(t) = token {
        cmd.env("KILN_CACHE_TOKEN", t);
    }
    cmd.output().unwrap()
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn admin_commands_work_against_a_running_server() {
    // A token made by the CLI itself, used by the server.
    let made = cli(
        "http://127.0.0.1:1",
        None,
        &[
            "token", "create", "--scope", "admin", "--name", "ops", "--output", "json",
        ],
    );
    assert_eq!(code(&made), 0, "{}", String::from_utf8_lossy(&made.stderr));
    let made: serde_json::Value = serde_json::from_str(&stdout(&made)).unwrap();
    let token = made["token"].as_str().unwrap().to_owned();
    let conf = tempfile::tempdir().unwrap();
    let tokens = conf.path().join("tokens.toml");
    std::fs::write(&tokens, made["toml"].as_str().unwrap()).unwrap();
    assert!(!std::fs::read_to_string(&tokens).unwrap().contains(&token));

    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        data.path(),
        &["--tokens", tokens.to_str().unwrap(), "--blob-grace", "0s"],
    );
    let (u, t) = (server.url.as_str(), Some(token.as_str()));
    let c = client();
    let mut digests = Vec::new();
    for i in 0..3 {
        let blob = bytes(i, 1000 + i as usize);
        let (status, d) = put_blob(&c, u, t, &blob).await;
        assert_eq!(status, StatusCode::CREATED);
        put_entry(
            &c,
            u,
            t,
            &key(i),
            &entry(Some((&d, blob.len() as u64)), &format!("RUN step {i}")),
        )
        .await;
        digests.push(d);
    }

    let o = cli(u, t, &["stats", "--output", "json"]);
    assert_eq!(code(&o), 0);
    let stats: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(stats["entries"], 3);
    let o = cli(u, t, &["stats"]);
    assert!(stdout(&o).contains("entries          3"), "{}", stdout(&o));

    let o = cli(u, t, &["ls"]);
    assert_eq!(code(&o), 0);
    assert_eq!(stdout(&o).lines().count(), 4, "{}", stdout(&o));
    assert!(stdout(&o).contains("RUN step 2"));
    let o = cli(u, t, &["ls", "--limit", "2", "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&stdout(&o))
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        2
    );
    let prefix = &key(1).to_string()[..16];
    let o = cli(u, t, &["ls", "--prefix", prefix, "--output", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);
    assert_eq!(listed[0]["key"], key(1).to_string());

    let k1 = key(1).to_string();
    let o = cli(u, t, &["inspect", &k1, "--output", "json"]);
    assert_eq!(code(&o), 0);
    let e: CacheEntry = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(e.created_by, "RUN step 1");
    assert!(stdout(&cli(u, t, &["inspect", &k1])).contains(&digests[1].to_string()));

    assert_eq!(code(&cli(u, t, &["rm", &k1])), 0);
    assert_eq!(code(&cli(u, t, &["inspect", &k1])), 3, "not found after rm");
    assert_eq!(code(&cli(u, t, &["rm", &k1])), 3);

    let o = cli(u, t, &["gc", "--output", "json"]);
    assert_eq!(code(&o), 0);
    let gc: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(
        gc["blobs_removed"], 1,
        "the removed entry's blob is collected"
    );

    // Corrupt one stored blob behind the server's back.
    let victim = data.path().join("blobs").join(digests[2].sharded_path());
    std::fs::write(&victim, b"bit rot").unwrap();
    let o = cli(u, t, &["verify", "--dry-run"]);
    assert_eq!(code(&o), 6, "{}", stdout(&o));
    assert!(victim.exists(), "dry run changes nothing");
    let o = cli(u, t, &["verify"]);
    assert_eq!(code(&o), 6);
    assert!(
        stdout(&o).contains(&format!("CORRUPT {}", digests[2])),
        "{}",
        stdout(&o)
    );
    assert!(!victim.exists());
    assert!(
        data.path()
            .join("quarantine")
            .join(digests[2].hex())
            .exists()
    );
    assert_eq!(code(&cli(u, t, &["verify"])), 0, "clean after quarantine");
    assert_eq!(code(&cli(u, t, &["inspect", &key(2).to_string()])), 3);

    // Errors map to exit codes.
    assert_eq!(code(&cli(u, Some("wrong"), &["stats"])), 4);
    assert_eq!(code(&cli(u, None, &["stats"])), 4);
    assert_eq!(code(&cli("http://127.0.0.1:1", t, &["stats"])), 5);
    assert_eq!(code(&cli(u, t, &["inspect", "nothex"])), 2);

    // Offline verify needs the server stopped (RocksDB is single-process).
    drop(server);
    let o = Command::new(CLI)
        .args(["verify", "--data"])
        .arg(data.path())
        .output()
        .unwrap();
    assert_eq!(
        code(&o),
        0,
        "{}{}",
        stdout(&o),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(stdout(&o).contains("checked 1 blobs"), "{}", stdout(&o));
}

#[test]
fn token_create_prints_the_token_and_its_tokens_file_lines() {
    let o = cli(
        "http://unused",
        None,
        &[
            "token",
            "create",
            "--scope",
            "read",
            "--scope",
            "write",
            "--namespace",
            "team-a",
        ],
    );
    assert_eq!(code(&o), 0);
    let text = stdout(&o);
    let token = text
        .lines()
        .next()
        .unwrap()
        .strip_prefix("token: ")
        .unwrap();
    assert!(
        token.starts_with("kiln_") && token.len() == 5 + 64,
        "{token}"
    );
    assert!(text.contains(&format!("sha256 = \"{}\"", sha256_hex(token.as_bytes()))));
    assert!(text.contains("scopes = [\"read\", \"write\"]"));
    assert!(text.contains("namespace = \"team-a\""));
    let bad = cli(
        "http://unused",
        None,
        &[
            "token",
            "create",
            "--scope",
            "read",
            "--namespace",
            "Team/A",
        ],
    );
    assert_eq!(code(&bad), 1);
}
