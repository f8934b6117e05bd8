//! The configuration's layering, as a user meets it: flags, environment,
//! the config file, and the errors that name where a bad value came from.

use std::path::PathBuf;
use std::time::Duration;

use super::*;
use clap::Parser;

#[test]
fn flags_win_over_the_config_file_which_fills_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache.toml");
    std::fs::write(
        &file,
        "data = \"store\"\nmax_size = \"1GiB\"\nentry_ttl = \"7d\"\nlisten = \"127.0.0.1:9000\"\n",
    )
    .unwrap();
    let args = ServerArgs::try_parse_from([
        "kiln-cache-server",
        "--config",
        file.to_str().unwrap(),
        "--max-size",
        "2GiB",
    ])
    .unwrap();
    let cfg = args.resolve().unwrap();
    assert_eq!(cfg.store.max_size, Some(2 << 30));
    assert_eq!(cfg.store.entry_ttl, Some(Duration::from_secs(7 * 86_400)));
    assert_eq!(cfg.data, dir.path().join("store"));
    assert_eq!(cfg.listen, "127.0.0.1:9000".parse().unwrap());
    assert_eq!(cfg.gc_interval, Duration::from_secs(600));
}

#[test]
fn storage_selects_object_storage_which_shares_the_size_settings() {
    let args = ServerArgs::try_parse_from([
        "kiln-cache-server",
        "--data",
        "/x",
        "--max-size",
        "1GiB",
        "--storage",
        "s3://kiln-cache/ci",
        "--miss-recheck",
        "0",
    ])
    .unwrap();
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(object.url, "s3://kiln-cache/ci");
    assert_eq!(object.replica.max_size, Some(1 << 30));
    assert_eq!(object.replica.miss_recheck, Duration::ZERO);
    let local = ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x"]).unwrap();
    assert!(local.resolve().unwrap().object.is_none());
    let bad = ServerArgs::try_parse_from([
        "kiln-cache-server",
        "--data",
        "/x",
        "--storage",
        "ftp://kiln-cache/p",
    ])
    .unwrap();
    let err = bad.resolve().unwrap_err().to_string();
    assert!(err.contains("ftp://kiln-cache/p"), "{err}");
}

#[test]
fn bad_values_name_the_setting() {
    let args = ServerArgs::try_parse_from([
        "kiln-cache-server",
        "--data",
        "/tmp/x",
        "--max-size",
        "lots",
    ])
    .unwrap();
    let err = args.resolve().unwrap_err().to_string();
    assert!(err.contains("max-size") && err.contains("lots"), "{err}");
    let args = ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x", "--tls-cert", "c"])
        .unwrap();
    assert!(matches!(args.resolve(), Err(ConfigError::HalfTls)));
    assert!(matches!(
        ServerArgs::default().resolve(),
        Err(ConfigError::MissingData)
    ));
}

#[test]
fn client_certificates_need_tls_and_the_default_port_is_7070() {
    let args = ServerArgs::try_parse_from([
        "kiln-cache-server",
        "--data",
        "/x",
        "--tls-client-ca",
        "ca.pem",
    ])
    .unwrap();
    assert!(matches!(
        args.resolve(),
        Err(ConfigError::ClientCaWithoutTls)
    ));
    let (_dir, file, args) = with_file(
        "data = \"x\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\ntls_client_ca = \"ca.pem\"\n",
        &[],
    );
    let cfg = args.resolve().unwrap();
    assert_eq!(
        cfg.tls_client_ca,
        Some(file.parent().unwrap().join("ca.pem"))
    );
    assert_eq!(cfg.listen.port(), 7070);
}

#[test]
fn connection_limits_come_from_flags_or_the_file_and_refuse_zero() {
    let (_dir, _file, args) = with_file(
        "data = \"d\"\nheader_read_timeout = \"5s\"\nmax_connections = 100\n",
        &["--body-read-timeout", "2m"],
    );
    let limits = args.resolve().unwrap().limits;
    assert_eq!(limits.header_read_timeout, Duration::from_secs(5));
    assert_eq!(limits.body_read_timeout, Duration::from_secs(120));
    assert_eq!(limits.max_connections, Some(100));
    let defaults = ServerArgs::try_parse_from(["kiln-cache-server", "--data", "/x"])
        .unwrap()
        .resolve()
        .unwrap()
        .limits;
    assert_eq!(defaults, ConnectionLimits::default());
    for flags in [["--header-read-timeout", "0"], ["--max-connections", "0"]] {
        let args = ServerArgs::try_parse_from(
            ["kiln-cache-server", "--data", "/x"]
                .into_iter()
                .chain(flags),
        )
        .unwrap();
        let err = args.resolve().unwrap_err().to_string();
        assert!(err.contains(&flags[0][2..]), "{err}");
    }
}

/// A config file with `text` in a fresh directory, and the arguments
/// that point at it followed by `flags`.
fn with_file(text: &str, flags: &[&str]) -> (tempfile::TempDir, PathBuf, ServerArgs) {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cache.toml");
    std::fs::write(&file, text).unwrap();
    let mut argv = vec!["kiln-cache-server", "--config", file.to_str().unwrap()];
    argv.extend_from_slice(flags);
    let args = ServerArgs::try_parse_from(argv).unwrap();
    (dir, file, args)
}

const S3_FILE: &str = r#"
data = "index"
storage = "s3://kiln-cache/team-a"
s3_endpoint = "http://minio.minio.svc:9000"
s3_region = "eu-west-1"
s3_part_size = "32MiB"
miss_recheck = "0"
hit_recheck = "5m"
gc_lease_ttl = "90s"
presign_ttl = "2m"
replica_id = "cache-0"
"#;

#[test]
fn object_storage_settings_can_come_from_the_config_file_alone() {
    let (_dir, _, args) = with_file(S3_FILE, &[]);
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(object.url, "s3://kiln-cache/team-a");
    assert_eq!(
        object.endpoint.as_deref(),
        Some("http://minio.minio.svc:9000")
    );
    assert_eq!(object.region.as_deref(), Some("eu-west-1"));
    assert_eq!(object.part_size, 32 << 20);
    assert_eq!(object.replica.miss_recheck, Duration::ZERO);
    assert_eq!(object.replica.hit_recheck, Duration::from_secs(300));
    assert_eq!(object.replica.lease_ttl, Duration::from_secs(90));
    assert_eq!(object.replica.presign, Some(Duration::from_secs(120)));
    assert_eq!(object.replica.holder, "cache-0");

    // `storage = "local"` in the file is the local store.
    let (_dir, _, args) = with_file("data = \"x\"\nstorage = \"local\"\n", &[]);
    assert!(args.resolve().unwrap().object.is_none());
}

#[test]
fn object_storage_flags_win_over_the_config_file() {
    let (_dir, _, args) = with_file(
        S3_FILE,
        &[
            "--storage",
            "s3://other-bucket",
            "--miss-recheck",
            "3s",
            "--replica-id",
            "from-flag",
        ],
    );
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(object.url, "s3://other-bucket");
    assert_eq!(object.replica.miss_recheck, Duration::from_secs(3));
    assert_eq!(object.replica.holder, "from-flag");
    // What no flag gave still comes from the file.
    assert_eq!(object.region.as_deref(), Some("eu-west-1"));
    assert_eq!(object.replica.lease_ttl, Duration::from_secs(90));

    // A flag may also switch a file's bucket back to local storage.
    let (_dir, _, args) = with_file(S3_FILE, &["--storage", "local"]);
    assert!(args.resolve().unwrap().object.is_none());
}

#[test]
fn storage_endpoint_and_part_size_have_new_names_and_keep_the_s3_ones() {
    // The old keys (S3_FILE) and flags keep working.
    let (_dir, _, args) = with_file(S3_FILE, &["--s3-part-size", "8MiB"]);
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(object.part_size, 8 << 20);
    // New names, in the file and as flags; a flag of either name wins
    // over the file's key of either name.
    let file = "data = \"x\"\nstorage = \"az://kiln-cache/ci\"\n\
                storage_endpoint = \"http://127.0.0.1:10000/devstoreaccount1\"\n\
                storage_part_size = \"6MiB\"\n";
    let (_dir, _, args) = with_file(file, &[]);
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(
        object.endpoint.as_deref(),
        Some("http://127.0.0.1:10000/devstoreaccount1")
    );
    assert_eq!(object.part_size, 6 << 20);
    let (_dir, _, args) = with_file(
        file,
        &[
            "--s3-endpoint",
            "http://other:1",
            "--storage-part-size",
            "7MiB",
        ],
    );
    let object = args.resolve().unwrap().object.unwrap();
    assert_eq!(object.endpoint.as_deref(), Some("http://other:1"));
    assert_eq!(object.part_size, 7 << 20);
    // Both names in one layer must agree.
    let (_dir, _, args) = with_file(
        file,
        &[
            "--storage-endpoint",
            "http://a:1",
            "--s3-endpoint",
            "http://b:1",
        ],
    );
    let err = args.resolve().unwrap_err().to_string();
    assert!(
        err.contains("--storage-endpoint") && err.contains("--s3-endpoint"),
        "{err}"
    );
    let (_dir, path, args) = with_file(&format!("{file}s3_part_size = \"9MiB\"\n"), &[]);
    let err = args.resolve().unwrap_err().to_string();
    assert!(
        err.contains("storage_part_size")
            && err.contains("s3_part_size")
            && err.contains(&path.display().to_string()),
        "{err}"
    );
    // A region is S3's alone.
    let (_dir, _, args) = with_file(file, &["--s3-region", "eu-west-1"]);
    let err = args.resolve().unwrap_err().to_string();
    assert!(
        err.contains("--s3-region") && err.contains("az://"),
        "{err}"
    );
}

#[test]
fn the_environment_wins_over_the_config_file() {
    // Only this test sets or reads this variable's value; std's env lock
    // keeps the other tests' (clap's) reads of the environment safe.
    const VAR: &str = "KILN_CACHE_GC_LEASE_TTL";
    // SAFETY: the variable is set and removed within this test, and
    // nothing outside Rust's std (which locks) reads it.
    unsafe { std::env::set_var(VAR, "7m") };
    let parsed = std::panic::catch_unwind(|| {
        let (_dir, _, args) = with_file(S3_FILE, &[]);
        let from_env = args.resolve().unwrap().object.unwrap();
        let (_dir, _, args) = with_file(S3_FILE, &["--gc-lease-ttl", "1m"]);
        let from_flag = args.resolve().unwrap().object.unwrap();
        (from_env.replica.lease_ttl, from_flag.replica.lease_ttl)
    });
    // SAFETY: as above.
    unsafe { std::env::remove_var(VAR) };
    let (from_env, from_flag) = parsed.unwrap();
    assert_eq!(from_env, Duration::from_secs(420), "env over file");
    assert_eq!(from_flag, Duration::from_secs(60), "flag over env");
}

#[test]
fn invalid_file_values_name_the_key_and_the_file() {
    for (line, key, value) in [
        ("s3_part_size = \"1MiB\"", "s3_part_size", "5MiB"),
        ("s3_part_size = \"huge\"", "s3_part_size", "huge"),
        ("miss_recheck = \"soon\"", "miss_recheck", "soon"),
        ("hit_recheck = \"-1s\"", "hit_recheck", "-1s"),
        ("gc_lease_ttl = \"5 minutes\"", "gc_lease_ttl", "5 minutes"),
        ("presign_ttl = \"2x\"", "presign_ttl", "2x"),
        (
            "storage = \"ftp://kiln-cache/p\"",
            "storage",
            "ftp://kiln-cache/p",
        ),
        ("storage = \"s3://AB\"", "storage", "AB"),
        ("max_size = \"lots\"", "max_size", "lots"),
        ("gc_interval = \"often\"", "gc_interval", "often"),
    ] {
        let text = format!("data = \"x\"\nstorage = \"s3://kiln-cache\"\n{line}\n");
        // A repeated key is a TOML error; let the tested line set it.
        let text = if key == "storage" {
            format!("data = \"x\"\n{line}\n")
        } else {
            text
        };
        let (_dir, file, args) = with_file(&text, &[]);
        let err = args.resolve().unwrap_err().to_string();
        for part in [key, value, &file.display().to_string()] {
            assert!(err.contains(part), "{line}: {err:?} lacks {part:?}");
        }
        assert!(
            !err.contains(&format!("--{}", key.replace('_', "-"))),
            "{err}"
        );
    }
    // The same values as flags name the flag.
    let (_dir, _, args) = with_file(S3_FILE, &["--miss-recheck", "soon"]);
    let err = args.resolve().unwrap_err().to_string();
    assert!(
        err.contains("--miss-recheck") && err.contains("soon"),
        "{err}"
    );
    assert!(!err.contains("cache.toml"), "{err}");
}

#[test]
fn unknown_keys_in_the_config_file_are_refused() {
    for text in [
        "data = \"x\"\ns3_bucket = \"kiln\"\n",
        "data = \"x\"\n[storage]\nurl = \"s3://kiln-cache\"\n",
    ] {
        let (_dir, file, args) = with_file(text, &[]);
        let err = args.resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
        let err = err.to_string();
        assert!(err.contains(&file.display().to_string()), "{err}");
    }
    let (_dir, _, args) = with_file("data = \"x\"\ns3_bucket = \"kiln\"\n", &[]);
    let err = args.resolve().unwrap_err().to_string();
    assert!(err.contains("s3_bucket"), "{err}");
}

#[test]
fn credentials_in_the_config_file_are_refused_saying_where_they_go() {
    for (text, key) in [
        ("aws_access_key_id = \"AKIAEXAMPLE\"", "aws_access_key_id"),
        (
            "aws_secret_access_key = \"s3cr3t-value\"",
            "aws_secret_access_key",
        ),
        ("aws_session_token = \"s3cr3t-value\"", "aws_session_token"),
        ("s3-secret-key = \"s3cr3t-value\"", "s3-secret-key"),
        (
            "[s3]\nsecret_access_key = \"s3cr3t-value\"",
            "s3.secret_access_key",
        ),
        (
            "[[backend]]\npassword = \"s3cr3t-value\"",
            "backend.password",
        ),
        (
            "azure_storage_account_key = \"s3cr3t-value\"",
            "azure_storage_account_key",
        ),
        (
            "azure_storage_sas_token = \"s3cr3t-value\"",
            "azure_storage_sas_token",
        ),
        (
            "google_service_account_key = \"s3cr3t-value\"",
            "google_service_account_key",
        ),
    ] {
        // Next to valid settings, and before anything else is checked.
        let text = format!("data = \"x\"\nstorage = \"s3://kiln-cache\"\n{text}\n");
        let (_dir, file, args) = with_file(&text, &[]);
        let err = args.resolve().unwrap_err();
        assert!(matches!(err, ConfigError::Credentials { .. }), "{err:?}");
        let err = err.to_string();
        for part in [
            key,
            "AWS_ACCESS_KEY_ID",
            "AWS_SECRET_ACCESS_KEY",
            "environment",
        ] {
            assert!(err.contains(part), "{err:?} lacks {part:?}");
        }
        assert!(err.contains(&file.display().to_string()), "{err}");
        assert!(
            !err.contains("s3cr3t") && !err.contains("AKIAEXAMPLE"),
            "{err}"
        );
    }
    // `tokens` (the tokens file) and `tls_key` (a path) are no credentials.
    let (_dir, _, args) = with_file(
        "data = \"x\"\ntokens = \"tokens.toml\"\ntls_cert = \"c.pem\"\ntls_key = \"k.pem\"\n",
        &[],
    );
    assert!(args.resolve().is_ok());
}
