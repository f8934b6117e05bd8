//! Object-storage settings from the config file, with real processes: a
//! replica started with nothing but `--config FILE` (and credentials in its
//! environment) serves from the bucket the file names, as one started with
//! flags on the same bucket sees; a file holding a credential is refused
//! before anything starts, saying where credentials go.

use crate::common;
use crate::s3_support;

use std::fs;
use std::path::Path;

use kiln_e2e::cache_server::Launch;

use common::{bytes, client, entry, key, put_blob, put_entry};
use reqwest::StatusCode;
use s3_support::{Replica, S3Server, SERVER};

/// A `kiln-cache-server` configured only through `config`: no flags but
/// `--config`, no `KILN_CACHE_*` variables, its log and port file in `dir`
/// (where `config` must name the port file).
fn file_configured(s3: &S3Server, dir: &Path, config: &Path) -> Launch {
    let mut launch = Launch::program(dir, Path::new(SERVER)).args([Path::new("--config"), config]);
    launch
        .command()
        // Nothing inherited: every setting must come from the file.
        .env_clear()
        .env("AWS_ACCESS_KEY_ID", s3.access_key())
        .env("AWS_SECRET_ACCESS_KEY", s3.secret_key())
        .env("RUST_LOG", "info");
    launch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_configured_only_by_its_config_file_serves_from_the_bucket() {
    let Some(s3) =
        S3Server::start("a_replica_configured_only_by_its_config_file_serves_from_the_bucket")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cache.toml");
    let port_file = dir.path().join("port");
    fs::write(
        &config,
        format!(
            r#"# Everything a replica needs, and no credentials.
listen = "127.0.0.1:0"
data = "index"
port_file = "{port_file}"
gc_interval = "0"
storage = "s3://{bucket}/cfg"
s3_endpoint = "{endpoint}"
s3_region = "{region}"
s3_part_size = "5MiB"
miss_recheck = "0"
hit_recheck = "1s"
gc_lease_ttl = "1m"
replica_id = "configured-by-file"
"#,
            port_file = port_file.display(),
            bucket = s3.bucket_name(),
            endpoint = s3.endpoint(),
            region = s3.region(),
        ),
    )
    .unwrap();
    let server = file_configured(&s3, dir.path(), &config).start();
    let url = server.url.clone();

    let c = client();
    // 6 MiB: two parts with the file's 5MiB part size, one PUT with the
    // 16MiB default.
    let data = bytes(42, 6 << 20);
    let (status, digest) = put_blob(&c, &url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);
    let e = entry(Some((&digest, data.len() as u64)), "RUN configured");
    assert_eq!(
        put_entry(&c, &url, None, &key(1), &e).await.status(),
        StatusCode::CREATED
    );
    let log = server.log_text();
    assert!(
        log.contains(&format!("s3://{}/cfg", s3.bucket_name()))
            && log.contains("configured-by-file"),
        "the log does not show the file's bucket and replica id:\n{log}"
    );

    // The objects are in the bucket and under the prefix the file named...
    let keys = s3.keys().await;
    assert!(
        keys.contains(&format!("cfg/blobs/sha256/{}", digest.hex())),
        "{keys:?}"
    );
    assert!(
        keys.contains(&format!("cfg/entries/_/{}", key(1).to_hex())),
        "{keys:?}"
    );
    // A multipart ETag ends in its part count: 5MiB parts, from the file.
    let meta = s3.bucket("cfg").blob_meta(&digest).await.unwrap().unwrap();
    let e_tag = meta.e_tag.unwrap_or_default();
    assert!(e_tag.trim_matches('"').ends_with("-2"), "ETag {e_tag}");
    // ...where a replica configured with flags finds them.
    let flagged = Replica::start(&s3, "cfg", &["--miss-recheck", "0"]);
    let found: serde_json::Value = c
        .post(format!("{}/v1/lookup", flagged.url))
        .json(&serde_json::json!({ "keys": [key(1)] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        found["entries"][key(1).to_hex()]["createdBy"],
        "RUN configured"
    );
    let blob = c
        .get(format!("{}/v1/blobs/{digest}", flagged.url))
        .send()
        .await
        .unwrap();
    assert_eq!(blob.status(), StatusCode::OK);
    assert!(blob.bytes().await.unwrap() == data);
}

#[test]
fn a_config_file_holding_a_credential_is_refused_before_the_server_starts() {
    let Some(s3) =
        S3Server::start("a_config_file_holding_a_credential_is_refused_before_the_server_starts")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cache.toml");
    let port_file = dir.path().join("port");
    fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\ndata = \"index\"\nport_file = \"{}\"\n\
             storage = \"s3://{}/cred\"\ns3_endpoint = \"{}\"\n\
             aws_secret_access_key = \"{}\"\n",
            port_file.display(),
            s3.bucket_name(),
            s3.endpoint(),
            s3.secret_key(),
        ),
    )
    .unwrap();
    let log = file_configured(&s3, dir.path(), &config).refused();
    for part in [
        "aws_secret_access_key",
        "AWS_SECRET_ACCESS_KEY",
        "environment",
        &config.display().to_string(),
    ] {
        assert!(log.contains(part), "{part:?} not in:\n{log}");
    }
    assert!(
        !log.contains(s3.secret_key()),
        "the secret is echoed:\n{log}"
    );
    assert!(!port_file.exists(), "the server listened");
}
