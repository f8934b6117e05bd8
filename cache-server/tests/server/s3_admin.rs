//! `kiln-cache entries` and `kiln-cache verify` against a replica on a real
//! S3-compatible server: entries are paged out of the bucket per namespace,
//! and a blob corrupted (or lost) in the bucket behind the replica's back is
//! found, and with repair deleted along with the entries naming it, only by
//! the holder of the GC lease.

use crate::common;
use crate::s3_support;

use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use common::{CLI, bytes, client, entry, key, put_blob, put_entry};
use kiln_common::Digest;
use object_store::aws::AmazonS3Builder;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use reqwest::StatusCode;
use s3_support::{ACCESS_KEY, BUCKET, Replica, S3Server, SECRET_KEY};

/// Replicas that look a missing key up in the bucket every time.
const EAGER: &[&str] = &["--miss-recheck", "0"];

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

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(&stdout(o))
        .unwrap_or_else(|e| panic!("{e}: {}{}", stdout(o), String::from_utf8_lossy(&o.stderr)))
}

/// The raw bucket, past kiln: what an operator (or bit rot) does to it.
fn raw_bucket(s3: &S3Server) -> Arc<dyn ObjectStore> {
    Arc::new(
        AmazonS3Builder::new()
            .with_bucket_name(BUCKET)
            .with_endpoint(&s3.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id(ACCESS_KEY)
            .with_secret_access_key(SECRET_KEY)
            .build()
            .unwrap(),
    )
}

fn blob_object(prefix: &str, digest: &Digest) -> ObjectPath {
    ObjectPath::from(format!("{prefix}/blobs/sha256/{}", digest.hex()))
}

/// A tokens file with one all-scope token per namespace (`None`: the
/// default one), made by `kiln-cache token create`.
fn tokens(dir: &std::path::Path, namespaces: &[Option<&str>]) -> Vec<String> {
    let mut toml = String::new();
    let mut out = Vec::new();
    for ns in namespaces {
        let mut args = vec![
            "token", "create", "--scope", "read", "--scope", "write", "--scope", "admin",
        ];
        if let Some(ns) = ns {
            args.extend(["--namespace", ns]);
        }
        args.extend(["--output", "json"]);
        let made = json(&cli("http://unused", None, &args));
        toml.push_str(made["toml"].as_str().unwrap());
        out.push(made["token"].as_str().unwrap().to_owned());
    }
    std::fs::write(dir.join("tokens.toml"), toml).unwrap();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_pages_through_the_namespace_of_the_token_in_the_bucket() {
    let Some(s3) =
        S3Server::start("entries_pages_through_the_namespace_of_the_token_in_the_bucket")
    else {
        return;
    };
    let conf = tempfile::tempdir().unwrap();
    let made = tokens(conf.path(), &[None, Some("team-a")]);
    let (ops, team) = (Some(made[0].as_str()), Some(made[1].as_str()));
    let tokens_file = conf.path().join("tokens.toml");
    let mut flags = EAGER.to_vec();
    flags.extend(["--tokens", tokens_file.to_str().unwrap()]);
    let replica = Replica::start(&s3, "admin", &flags);
    let (u, c) = (replica.url.as_str(), client());

    for i in 0..5u64 {
        let data = bytes(i, 1000 + i as usize);
        let (status, d) = put_blob(&c, u, ops, &data).await;
        assert_eq!(status, StatusCode::CREATED);
        let e = entry(Some((&d, data.len() as u64)), &format!("RUN step {i}"));
        assert_eq!(
            put_entry(&c, u, ops, &key(i), &e).await.status(),
            StatusCode::CREATED
        );
    }
    let theirs = entry(None, "RUN theirs");
    assert_eq!(
        put_entry(&c, u, team, &key(7), &theirs).await.status(),
        StatusCode::CREATED
    );

    // `entries` is `ls`; both page through the bucket's entry objects.
    let o = cli(u, ops, &["entries", "--output", "json"]);
    assert_eq!(code(&o), 0, "{}", String::from_utf8_lossy(&o.stderr));
    let listed = json(&o);
    let keys: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["key"].as_str().unwrap())
        .collect();
    let expected: Vec<String> = (0..5).map(|i| key(i).to_string()).collect();
    assert_eq!(keys, expected, "the default namespace, in key order");
    assert!(listed[0]["created_ms"].as_u64().unwrap() > 0);
    assert_eq!(listed[2]["entry"]["createdBy"], "RUN step 2");

    let o = cli(u, ops, &["ls", "--limit", "2", "--output", "json"]);
    assert_eq!(json(&o).as_array().unwrap().len(), 2);
    let prefix = &key(3).to_string()[..16];
    let o = cli(u, ops, &["entries", "--prefix", prefix, "--output", "json"]);
    assert_eq!(json(&o)[0]["key"], key(3).to_string());
    assert_eq!(json(&o).as_array().unwrap().len(), 1);
    let table = stdout(&cli(u, ops, &["entries"]));
    assert!(table.contains("RUN step 4"), "{table}");
    assert!(!table.contains("RUN theirs"), "{table}");

    // Server-side pages of two, joined by `next`.
    let mut after: Option<String> = None;
    let mut paged = Vec::new();
    let mut pages = 0;
    loop {
        let mut request = c
            .get(format!("{u}/v1/admin/entries"))
            .bearer_auth(made[0].as_str())
            .query(&[("limit", "2")]);
        if let Some(a) = &after {
            request = request.query(&[("after", a.as_str())]);
        }
        let page: serde_json::Value = request.send().await.unwrap().json().await.unwrap();
        pages += 1;
        for r in page["entries"].as_array().unwrap() {
            paged.push(r["key"].as_str().unwrap().to_owned());
        }
        match page["next"].as_str() {
            Some(next) => after = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(paged, expected);
    assert_eq!(pages, 3);

    // Another namespace lists only its own.
    let o = cli(u, team, &["entries", "--output", "json"]);
    let listed = json(&o);
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["key"], key(7).to_string());
    assert_eq!(listed[0]["entry"]["createdBy"], "RUN theirs");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_finds_a_blob_corrupted_in_the_bucket_and_repair_removes_it_with_its_entry() {
    let Some(s3) = S3Server::start(
        "verify_finds_a_blob_corrupted_in_the_bucket_and_repair_removes_it_with_its_entry",
    ) else {
        return;
    };
    let replica = Replica::start(&s3, "verify", EAGER);
    let (u, c) = (replica.url.as_str(), client());
    let mut digests = Vec::new();
    for i in 0..3u64 {
        let data = bytes(10 + i, 50_000);
        let (status, d) = put_blob(&c, u, None, &data).await;
        assert_eq!(status, StatusCode::CREATED);
        let e = entry(Some((&d, data.len() as u64)), &format!("RUN step {i}"));
        assert_eq!(
            put_entry(&c, u, None, &key(i), &e).await.status(),
            StatusCode::CREATED
        );
        digests.push(d);
    }
    let o = cli(u, None, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("checked 3 blobs"), "{}", stdout(&o));

    // Bit rot in blob 1 (same length), blob 2 gone: both behind the
    // replica's back, straight in the bucket.
    let raw = raw_bucket(&s3);
    let rotten = blob_object("verify", &digests[1]);
    raw.put(&rotten, PutPayload::from(vec![0xEE_u8; 50_000]))
        .await
        .unwrap();
    raw.delete(&blob_object("verify", &digests[2]))
        .await
        .unwrap();

    let o = cli(u, None, &["verify", "--dry-run"]);
    assert_eq!(code(&o), 6, "{}", stdout(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("CORRUPT {} (not repaired (dry run))", digests[1])),
        "{text}"
    );
    assert!(text.contains(&format!("MISSING {}", digests[2])), "{text}");
    assert!(raw.head(&rotten).await.is_ok(), "a dry run changes nothing");
    assert_eq!(code(&cli(u, None, &["inspect", &key(1).to_string()])), 0);

    // Repair is GC's business: refused while another replica holds the lease.
    let lease = s3.bucket("verify");
    assert!(
        lease
            .acquire_lease("gc", "another-replica", Duration::from_secs(60))
            .await
            .unwrap()
    );
    let o = cli(u, None, &["verify", "--output", "json"]);
    assert_eq!(code(&o), 1, "{}", stdout(&o));
    assert_eq!(json(&o)["lease_held"], false);
    let o = cli(u, None, &["verify"]);
    assert!(
        stdout(&o).contains("another replica holds the GC lease"),
        "{}",
        stdout(&o)
    );
    assert!(raw.head(&rotten).await.is_ok(), "refused: nothing deleted");
    lease.release_lease("gc", "another-replica").await.unwrap();

    let o = cli(u, None, &["verify", "--output", "json"]);
    assert_eq!(code(&o), 6, "{}", stdout(&o));
    let report = json(&o);
    assert_eq!(report["lease_held"], true, "{report}");
    assert_eq!(
        report["corrupt"],
        serde_json::json!([digests[1]]),
        "{report}"
    );
    assert_eq!(
        report["missing"],
        serde_json::json!([digests[2]]),
        "{report}"
    );
    assert_eq!(report["entries_dropped"], 2, "{report}");
    assert!(
        raw.head(&rotten).await.is_err(),
        "the corrupt blob is deleted"
    );
    let keys = s3.keys().await;
    for i in [1, 2] {
        let entry_object = format!("verify/entries/_/{}", key(i).to_hex());
        assert!(!keys.contains(&entry_object), "{entry_object} in {keys:?}");
        assert_eq!(
            code(&cli(u, None, &["inspect", &key(i).to_string()])),
            3,
            "entry {i} is gone"
        );
    }
    assert_eq!(code(&cli(u, None, &["inspect", &key(0).to_string()])), 0);

    let o = cli(u, None, &["verify"]);
    assert_eq!(code(&o), 0, "{}", stdout(&o));
    assert!(stdout(&o).contains("checked 1 blobs"), "{}", stdout(&o));
    assert!(stdout(&o).contains("all blobs match their digests"));
}
