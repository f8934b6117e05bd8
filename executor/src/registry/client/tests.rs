//! Specifications of the registry client against real local HTTP servers.

use super::*;

fn client(opts: RegistryOptions) -> RegistryClient {
    RegistryClient::new(RegistryOptions {
        use_docker_config: false,
        ..opts
    })
    .unwrap()
}

#[test]
fn insecure_registries_use_plain_http_and_others_https() {
    let c = client(RegistryOptions {
        insecure_registries: vec!["127.0.0.1:5000".into()],
        ..Default::default()
    });
    assert_eq!(
        c.endpoint("127.0.0.1:5000", Direction::Push).base,
        "http://127.0.0.1:5000"
    );
    assert_eq!(
        c.endpoint("quay.io", Direction::Push).base,
        "https://quay.io"
    );
    assert_eq!(
        c.endpoint("docker.io", Direction::Pull).base,
        "https://registry-1.docker.io"
    );
}

#[test]
fn pull_only_options_do_not_affect_push() {
    let c = client(RegistryOptions {
        insecure_pull: true,
        skip_tls_verify_pull: true,
        ..Default::default()
    });
    let pull = c.endpoint("r.example", Direction::Pull);
    let push = c.endpoint("r.example", Direction::Push);
    assert_eq!(
        (pull.base.as_str(), pull.verify_tls),
        ("http://r.example", false)
    );
    assert_eq!(
        (push.base.as_str(), push.verify_tls),
        ("https://r.example", true)
    );
}

#[test]
fn mirrors_are_tried_before_docker_hub_only() {
    let c = client(RegistryOptions {
        mirrors: vec!["mirror.example".into(), "http://127.0.0.1:5001/".into()],
        ..Default::default()
    });
    let hub = c.pull_endpoints(&ImageRef::parse("busybox").unwrap());
    let bases: Vec<&str> = hub.iter().map(|(e, _)| e.base.as_str()).collect();
    assert_eq!(
        bases,
        [
            "https://mirror.example",
            "http://127.0.0.1:5001",
            "https://registry-1.docker.io"
        ]
    );
    let other = c.pull_endpoints(&ImageRef::parse("quay.io/a/b").unwrap());
    assert_eq!(other.len(), 1);
}

#[test]
fn a_mirror_path_prefixes_the_repository_as_kaniko_does() {
    let c = client(RegistryOptions {
        mirrors: vec!["mirror.example/cache/hub".into()],
        registry_maps: vec![(
            "quay.io".into(),
            vec!["q1.example/quay".into(), "http://127.0.0.1:5001".into()],
        )],
        ..Default::default()
    });
    let busybox = ImageRef::parse("busybox").unwrap();
    let eps = c.pull_endpoints(&busybox);
    let (mirror, is_mirror) = &eps[0];
    assert!(*is_mirror);
    assert_eq!(mirror.base, "https://mirror.example");
    assert_eq!(mirror.repo(&busybox), "cache/hub/library/busybox");
    assert_eq!(eps[1].0.repo(&busybox), "library/busybox");
    assert!(!eps[1].1);
    let quay = ImageRef::parse("quay.io/a/b").unwrap();
    let eps: Vec<(String, String)> = c
        .pull_endpoints(&quay)
        .iter()
        .map(|(e, _)| (e.base.clone(), e.repo(&quay)))
        .collect();
    assert_eq!(
        eps,
        [
            ("https://q1.example".to_string(), "quay/a/b".to_string()),
            ("http://127.0.0.1:5001".to_string(), "a/b".to_string()),
            ("https://quay.io".to_string(), "a/b".to_string()),
        ]
    );
}

#[test]
fn registry_map_keys_name_docker_hub_by_any_of_its_names() {
    let c = client(RegistryOptions {
        registry_maps: vec![("index.docker.io".into(), vec!["m.example".into()])],
        skip_default_registry_fallback: true,
        ..Default::default()
    });
    let eps = c.pull_endpoints(&ImageRef::parse("docker.io/library/alpine").unwrap());
    assert_eq!(eps.len(), 1, "no fallback to Docker Hub itself");
    assert_eq!(eps[0].0.base, "https://m.example");
    // Without a mirror there is nothing to skip.
    assert_eq!(
        c.pull_endpoints(&ImageRef::parse("quay.io/a/b").unwrap())
            .len(),
        1
    );
}

#[tokio::test]
async fn an_immutable_tag_is_no_failure_only_when_asked() {
    let taken = r#"{"errors":[{"code":"MANIFEST_TAGGED","message":"tag v1 is immutable"}]}"#;
    for ignore in [false, true] {
        let (host, seen) = scripted_server(vec![(409, taken.into())]);
        let c = client(RegistryOptions {
            insecure_registries: vec![host.clone()],
            push_ignore_immutable_tag_errors: ignore,
            ..Default::default()
        });
        let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
        let body = manifest_json();
        let pushed = c
            .put_manifest(&dest, body.as_bytes(), media::OCI_MANIFEST)
            .await;
        assert_eq!(seen.lock().unwrap()[0], "PUT /v2/x/manifests/v1 HTTP/1.1");
        match pushed {
            Ok(d) => {
                assert!(ignore);
                assert_eq!(d, Digest::of_bytes(body.as_bytes()));
            }
            Err(e) => {
                assert!(!ignore, "{e}");
                assert!(e.to_string().contains("MANIFEST_TAGGED"), "{e}");
            }
        }
    }
    let plain = RegistryError::Status {
        method: "PUT",
        url: "u".into(),
        status: 400,
        body: "MANIFEST_INVALID".into(),
    };
    assert!(!plain.is_immutable_tag());
}

#[tokio::test]
async fn push_retry_retries_a_manifest_push_that_failed_transiently() {
    let (host, seen) = scripted_server(vec![(503, "busy".into()), (201, String::new())]);
    let c = client(RegistryOptions {
        insecure_registries: vec![host.clone()],
        push_retries: 1,
        retry_backoff: Duration::from_millis(1),
        ..Default::default()
    });
    let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
    c.put_manifest(&dest, manifest_json().as_bytes(), media::OCI_MANIFEST)
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().len(), 2);
    let (host, _) = scripted_server(vec![(503, "busy".into()), (201, String::new())]);
    let c = client(RegistryOptions {
        insecure_registries: vec![host.clone()],
        push_retries: 0,
        ..Default::default()
    });
    let dest = ImageRef::parse(&format!("{host}/x:v1")).unwrap();
    let err = c
        .put_manifest(&dest, manifest_json().as_bytes(), media::OCI_MANIFEST)
        .await
        .unwrap_err();
    assert!(err.to_string().contains("503"), "{err}");
}

#[tokio::test]
async fn the_push_permission_check_starts_an_upload_and_cancels_it() {
    let (host, seen) = scripted_server_with_headers(vec![
        (
            202,
            String::new(),
            "Location: /v2/team/app/blobs/uploads/abc\r\n".into(),
        ),
        (204, String::new(), String::new()),
    ]);
    let c = test_client(&host, 0);
    c.check_push_permission(&ImageRef::parse(&format!("{host}/team/app:1")).unwrap())
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        [
            "POST /v2/team/app/blobs/uploads/ HTTP/1.1",
            "DELETE /v2/team/app/blobs/uploads/abc HTTP/1.1"
        ]
    );
    let (host, _) = scripted_server(vec![(
        403,
        r#"{"errors":[{"code":"DENIED","message":"requested access to the resource is denied"}]}"#
            .into(),
    )]);
    let c = test_client(&host, 0);
    let err = c
        .check_push_permission(&ImageRef::parse(&format!("{host}/team/app:1")).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("authentication failed") && err.contains("403"),
        "{err}"
    );
    assert!(err.contains(&format!("registry {host}")), "{err}");
    assert!(err.contains("anonymously (no Docker config"), "{err}");
}

#[tokio::test]
async fn a_refused_connection_says_so_with_the_url() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let host = format!("127.0.0.1:{port}");
    let c = test_client(&host, 0);
    let err = c
        .get_manifest(&ImageRef::parse(&format!("{host}/x:1")).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("connection refused"), "{err}");
    assert!(
        err.contains(&format!("http://{host}/v2/x/manifests/1")),
        "{err}"
    );
}

#[tokio::test]
async fn a_plain_http_registry_reached_over_https_is_named_as_such() {
    use std::io::Read;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut buf = [0u8; 4096];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(
                b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
            );
        }
    });
    let c = client(RegistryOptions::default());
    let err = c
        .get_manifest(&ImageRef::parse(&format!("{host}/x:1")).unwrap())
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("plain-HTTP registry"), "{err}");
    assert!(
        err.contains(&format!("--insecure-registry {host}")),
        "{err}"
    );
    assert!(
        err.contains(&format!("https://{host}/v2/x/manifests/1")),
        "{err}"
    );
}

#[test]
fn per_registry_tls_material_is_checked_when_the_client_is_made() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let err = RegistryClient::new(RegistryOptions {
        registry_ca_certificates: [("r.example".to_string(), vec![empty.clone()])].into(),
        use_docker_config: false,
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("empty.pem"), "{err}");
    let err = RegistryClient::new(RegistryOptions {
        client_certificates: [(
            "r.example".to_string(),
            (dir.path().join("absent.pem"), empty),
        )]
        .into(),
        use_docker_config: false,
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("absent.pem"), "{err}");
}

/// A scripted HTTP server on 127.0.0.1: answers each connection with
/// the next (status, body) and records the request lines.
fn scripted_server(script: Vec<(u16, String)>) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
    scripted_server_with_headers(
        script
            .into_iter()
            .map(|(s, b)| (s, b, String::new()))
            .collect(),
    )
}

/// [`scripted_server`] with extra header lines (`Name: value\r\n`) per answer.
fn scripted_server_with_headers(
    script: Vec<(u16, String, String)>,
) -> (String, std::sync::Arc<Mutex<Vec<String>>>) {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    let seen = std::sync::Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    std::thread::spawn(move || {
        for (status, body, headers) in script {
            let Ok((mut conn, _)) = listener.accept() else {
                return;
            };
            let mut reader = BufReader::new(conn.try_clone().unwrap());
            let mut first = String::new();
            reader.read_line(&mut first).unwrap();
            loop {
                let mut l = String::new();
                if reader.read_line(&mut l).unwrap() == 0 || l.trim().is_empty() {
                    break;
                }
            }
            log.lock().unwrap().push(first.trim().to_string());
            let _ = write!(
                conn,
                "HTTP/1.1 {status} X\r\nContent-Type: {}\r\nContent-Length: {}\r\n{headers}Connection: close\r\n\r\n{body}",
                media::OCI_MANIFEST,
                body.len()
            );
        }
    });
    (host, seen)
}

fn manifest_json() -> String {
    let d = Digest::of_bytes(b"{}");
    format!(
        r#"{{"schemaVersion":2,"config":{{"mediaType":"{}","digest":"{d}","size":2}},"layers":[]}}"#,
        media::OCI_CONFIG
    )
}

fn test_client(host: &str, retries: u32) -> RegistryClient {
    client(RegistryOptions {
        insecure_registries: vec![host.to_string()],
        pull_retries: retries,
        retry_backoff: Duration::from_millis(1),
        ..Default::default()
    })
}

#[tokio::test]
async fn transient_server_errors_are_retried_until_success() {
    let body = manifest_json();
    let (host, seen) = scripted_server(vec![
        (503, "busy".into()),
        (502, "".into()),
        (200, body.clone()),
    ]);
    let c = test_client(&host, 2);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    let m = c.get_manifest(&r).await.unwrap();
    assert_eq!(m.digest, Digest::of_bytes(body.as_bytes()));
    assert_eq!(m.media_type, media::OCI_MANIFEST);
    assert_eq!(seen.lock().unwrap().len(), 3);
    assert_eq!(
        seen.lock().unwrap()[0],
        "GET /v2/x/manifests/latest HTTP/1.1"
    );
}

#[tokio::test]
async fn retries_are_bounded_and_the_last_error_names_the_url() {
    let (host, seen) = scripted_server(vec![
        (503, "a".into()),
        (503, "b".into()),
        (503, "c".into()),
    ]);
    let c = test_client(&host, 1);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    let err = c.get_manifest(&r).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("http://{host}/v2/x/manifests/latest")),
        "{err}"
    );
    assert!(err.to_string().contains("503"), "{err}");
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn not_found_is_not_retried() {
    let (host, seen) = scripted_server(vec![(404, "{}".into()), (200, manifest_json())]);
    let c = test_client(&host, 3);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    assert!(c.get_manifest(&r).await.is_err());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn manifest_not_matching_the_requested_digest_is_refused() {
    let (host, _) = scripted_server(vec![(200, manifest_json())]);
    let c = test_client(&host, 0);
    let wanted = Digest::of_bytes(b"something else");
    let r = ImageRef::parse(&format!("{host}/x@{wanted}")).unwrap();
    let err = c.get_manifest(&r).await.unwrap_err();
    assert!(err.to_string().contains("not the requested"), "{err}");
}

/// A server answering every request with `status` and a chunked body
/// that never ends.
fn endless_server(status: u16) -> String {
    use std::io::{BufRead, BufReader};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let host = listener.local_addr().unwrap().to_string();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            std::thread::spawn(move || {
                let mut reader = BufReader::new(conn.try_clone().unwrap());
                loop {
                    let mut l = String::new();
                    if reader.read_line(&mut l).unwrap_or(0) == 0 || l.trim().is_empty() {
                        break;
                    }
                }
                let chunk = format!("10000\r\n{}\r\n", "{".repeat(0x10000));
                let _ = write!(
                    conn,
                    "HTTP/1.1 {status} X\r\nContent-Type: {}\r\nTransfer-Encoding: chunked\r\n\r\n",
                    media::OCI_MANIFEST
                )
                .and_then(|_| -> std::io::Result<()> {
                    loop {
                        conn.write_all(chunk.as_bytes())?;
                    }
                });
            });
        }
    });
    host
}

#[tokio::test]
async fn an_endless_manifest_is_refused_at_the_cap_naming_the_url() {
    let host = endless_server(200);
    let c = test_client(&host, 0);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    let err = c.get_manifest(&r).await.unwrap_err();
    assert!(
        err.to_string()
            .contains(&format!("larger than {MAX_MANIFEST_SIZE} bytes")),
        "{err}"
    );
    assert!(err.to_string().contains("/v2/x/manifests/latest"), "{err}");
}

#[tokio::test]
async fn an_endless_error_body_is_read_only_in_part() {
    let host = endless_server(404);
    let c = test_client(&host, 0);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    let err = c.get_manifest(&r).await.unwrap_err();
    assert!(err.to_string().contains("404"), "{err}");
    assert!(err.to_string().len() < 2000, "the body is shown in part");
}

#[tokio::test]
async fn a_config_must_be_exactly_its_descriptors_size() {
    let config = b"{}".to_vec();
    let (host, _) = scripted_server(vec![(200, "{} ".into()), (200, "{".into())]);
    let c = test_client(&host, 0);
    let r = ImageRef::parse(&format!("{host}/x:latest")).unwrap();
    let ep = c.endpoint(r.registry(), Direction::Pull);
    let desc = Descriptor::new(media::OCI_CONFIG, Digest::of_bytes(&config), 2);
    let longer = c.get_small_blob(&ep, &r, &desc).await.unwrap_err();
    assert!(
        longer.to_string().contains("more than the 2 bytes"),
        "{longer}"
    );
    let shorter = c.get_small_blob(&ep, &r, &desc).await.unwrap_err();
    assert!(shorter.to_string().contains("1 bytes"), "{shorter}");
}

#[test]
fn unreadable_ca_certificate_is_an_error_naming_the_file() {
    let err = RegistryClient::new(RegistryOptions {
        ca_certificates: vec!["/nonexistent/ca.pem".into()],
        use_docker_config: false,
        ..Default::default()
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
}

struct NoBlobs;
impl BlobSource for NoBlobs {
    fn blob_path(&self, _: &Digest) -> Option<std::path::PathBuf> {
        None
    }
}

/// A client with `--push-retry 0`, an empty image and a destination on `host`.
fn push_without_retries(host: &str) -> (RegistryClient, ImageDocuments, ImageRef) {
    let c = client(RegistryOptions {
        insecure_registries: vec![host.to_string()],
        push_retries: 0,
        retry_backoff: Duration::from_millis(1),
        ..Default::default()
    });
    let image = ImageDocuments::build(&ImageConfig::default(), Vec::new(), false);
    (c, image, ImageRef::parse(&format!("{host}/x:v1")).unwrap())
}

const BLOB_UNKNOWN_ANSWER: &str =
    r#"{"errors":[{"code":"MANIFEST_BLOB_UNKNOWN","message":"blob unknown to registry"}]}"#;

#[tokio::test]
async fn a_manifest_refused_for_a_blob_just_acknowledged_is_checked_and_put_again() {
    // HEAD config (there), PUT manifest (blob unknown: a concurrent
    // client was relinking it), HEAD config again, PUT manifest.
    let (host, seen) = scripted_server(vec![
        (200, String::new()),
        (400, BLOB_UNKNOWN_ANSWER.into()),
        (200, String::new()),
        (201, String::new()),
    ]);
    let (c, image, dest) = push_without_retries(&host);
    let digest = c.push_image(&image, &[dest], &NoBlobs, &[]).await.unwrap();
    assert_eq!(digest, image.manifest_digest);
    let seen = seen.lock().unwrap();
    let methods: Vec<&str> = seen.iter().map(|l| l.split(' ').next().unwrap()).collect();
    assert_eq!(methods, ["HEAD", "PUT", "HEAD", "PUT"], "{seen:?}");
}

#[tokio::test]
async fn a_manifest_whose_blob_stays_unknown_fails_with_the_registrys_answer() {
    let (host, seen) = scripted_server(vec![
        (200, String::new()),
        (400, BLOB_UNKNOWN_ANSWER.into()),
        (200, String::new()),
        (400, BLOB_UNKNOWN_ANSWER.into()),
        (201, String::new()),
    ]);
    let (c, image, dest) = push_without_retries(&host);
    let err = c
        .push_image(&image, &[dest], &NoBlobs, &[])
        .await
        .unwrap_err();
    assert!(err.is_manifest_blob_unknown(), "{err}");
    assert!(err.to_string().contains("MANIFEST_BLOB_UNKNOWN"), "{err}");
    assert_eq!(
        seen.lock().unwrap().len(),
        4,
        "one retry without --push-retry"
    );
}
