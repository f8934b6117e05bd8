//! TLS with rustls: HTTPS with HTTP/2 negotiated by ALPN.

use crate::common;

use std::process::Command;

use common::*;
use reqwest::StatusCode;

#[tokio::test(flavor = "multi_thread")]
async fn tls_serves_https_and_negotiates_http2() {
    let certs = tempfile::tempdir().unwrap();
    let (cert, key) = (certs.path().join("cert.pem"), certs.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
        ])
        .args([
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
        ])
        // Self-signed leaf, not a CA: rustls refuses a CA as end entity.
        .args(["-addext", "basicConstraints=critical,CA:FALSE"])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl is needed to make a test certificate");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );

    let data = tempfile::tempdir().unwrap();
    let server = Server::start(
        data.path(),
        &[
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
        ],
    );
    let url = format!("https://127.0.0.1:{}", server.port);
    let c = reqwest::Client::builder()
        .add_root_certificate(
            reqwest::Certificate::from_pem(&std::fs::read(&cert).unwrap()).unwrap(),
        )
        .build()
        .unwrap();
    let blob = bytes(3, 100_000);
    let (status, digest) = put_blob(&c, &url, None, &blob).await;
    assert_eq!(status, StatusCode::CREATED);
    let r = c
        .get(format!("{url}/v1/blobs/{digest}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.bytes().await.unwrap().as_ref(), blob.as_slice());

    // Plain HTTP on the TLS port gets nowhere.
    let plain = client().get(format!("{}/healthz", server.url)).send().await;
    assert!(plain.is_err() || !plain.unwrap().status().is_success());
}
