//! The auth matrix: 401 without or with a bad token, 403 for a missing
//! scope, namespaces isolated from each other.

use crate::common;

use common::*;
use kiln_cache_server::auth::{Scope, token_toml};
use kiln_common::LookupResponse;
use reqwest::StatusCode;

struct Tokens {
    reader_a: &'static str,
    writer_a: &'static str,
    writer_b: &'static str,
    admin: &'static str,
}

const T: Tokens = Tokens {
    reader_a: "kiln_reader_a_secret",
    writer_a: "kiln_writer_a_secret",
    writer_b: "kiln_writer_b_secret",
    admin: "kiln_admin_secret",
};

fn tokens_file(dir: &std::path::Path, anonymous_read: bool) -> std::path::PathBuf {
    let text = format!(
        "anonymous_read = {anonymous_read}\n{}\n{}\n{}\n{}",
        token_toml(T.reader_a, Some("reader-a"), &[Scope::Read], Some("team-a")),
        token_toml(
            T.writer_a,
            Some("writer-a"),
            &[Scope::Read, Scope::Write],
            Some("team-a")
        ),
        token_toml(
            T.writer_b,
            Some("writer-b"),
            &[Scope::Read, Scope::Write],
            Some("team-b")
        ),
        token_toml(T.admin, Some("admin"), &[Scope::Admin], None),
    );
    assert!(
        !text.contains(T.admin),
        "plain tokens must not be in the file"
    );
    let path = dir.join("tokens.toml");
    std::fs::write(&path, text).unwrap();
    path
}

async fn status(r: reqwest::RequestBuilder, token: Option<&str>) -> StatusCode {
    let r = match token {
        Some(t) => r.bearer_auth(t),
        None => r,
    };
    r.send().await.unwrap().status()
}

#[tokio::test(flavor = "multi_thread")]
async fn missing_bad_and_underprivileged_tokens_are_refused() {
    let data = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let tokens = tokens_file(conf.path(), false);
    let server = Server::start(data.path(), &["--tokens", tokens.to_str().unwrap()]);
    let c = client();
    let u = &server.url;
    let blob = b"layer bytes";
    let (_, d) = put_blob(&c, u, Some(T.writer_a), blob).await;
    let k = key(1);
    let lookup = || {
        c.post(format!("{u}/v1/lookup"))
            .json(&serde_json::json!({"keys": [k]}))
    };

    for token in [None, Some("not-a-token")] {
        assert_eq!(status(lookup(), token).await, StatusCode::UNAUTHORIZED);
        assert_eq!(
            status(c.get(format!("{u}/v1/blobs/{d}")), token).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(c.head(format!("{u}/v1/blobs/{d}")), token).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(c.put(format!("{u}/v1/blobs/{d}")).body(&blob[..]), token).await,
            StatusCode::UNAUTHORIZED
        );
        assert_eq!(
            status(c.get(format!("{u}/v1/admin/stats")), token).await,
            StatusCode::UNAUTHORIZED
        );
    }
    let r = c
        .post(format!("{u}/v1/lookup"))
        .json(&serde_json::json!({"keys": []}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["www-authenticate"], "Bearer");
    assert_eq!(error_code(r).await, "unauthorized");

    // Read-only token: reads fine, writes and admin forbidden.
    assert_eq!(status(lookup(), Some(T.reader_a)).await, StatusCode::OK);
    assert_eq!(
        status(c.get(format!("{u}/v1/blobs/{d}")), Some(T.reader_a)).await,
        StatusCode::OK
    );
    let e = entry(Some((&d, blob.len() as u64)), "RUN a");
    let r = put_entry(&c, u, Some(T.reader_a), &k, &e).await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    assert_eq!(error_code(r).await, "forbidden");
    assert_eq!(
        status(
            c.put(format!("{u}/v1/blobs/{d}")).body(&blob[..]),
            Some(T.reader_a)
        )
        .await,
        StatusCode::FORBIDDEN
    );

    // Writer: no admin.
    assert_eq!(
        put_entry(&c, u, Some(T.writer_a), &k, &e).await.status(),
        StatusCode::CREATED
    );
    assert_eq!(
        status(c.delete(format!("{u}/v1/entries/{k}")), Some(T.writer_a)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(c.get(format!("{u}/v1/admin/stats")), Some(T.writer_a)).await,
        StatusCode::FORBIDDEN
    );
    assert_eq!(
        status(c.post(format!("{u}/v1/admin/gc")), Some(T.writer_a)).await,
        StatusCode::FORBIDDEN
    );
    // Admin: everything.
    assert_eq!(
        status(c.get(format!("{u}/v1/admin/stats")), Some(T.admin)).await,
        StatusCode::OK
    );
    assert_eq!(
        status(c.post(format!("{u}/v1/admin/gc")), Some(T.admin)).await,
        StatusCode::OK
    );
    // Health and metrics stay open for probes and scrapers.
    assert_eq!(
        status(c.get(format!("{u}/healthz")), None).await,
        StatusCode::OK
    );
    assert_eq!(
        status(c.get(format!("{u}/metrics")), None).await,
        StatusCode::OK
    );
    assert!(!server.log_text().contains("OPEN"));
}

#[tokio::test(flavor = "multi_thread")]
async fn namespaces_cannot_see_or_overwrite_each_other() {
    let data = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let tokens = tokens_file(conf.path(), false);
    let server = Server::start(data.path(), &["--tokens", tokens.to_str().unwrap()]);
    let c = client();
    let u = &server.url;
    let k = key(7);
    let ea = entry(None, "RUN team a");
    let eb = entry(None, "RUN team b");
    assert_eq!(
        put_entry(&c, u, Some(T.writer_a), &k, &ea).await.status(),
        StatusCode::CREATED
    );

    let lookup = |token: &'static str| {
        let c = c.clone();
        let url = format!("{u}/v1/lookup");
        async move {
            c.post(url)
                .bearer_auth(token)
                .json(&serde_json::json!({"keys": [k]}))
                .send()
                .await
                .unwrap()
                .json::<LookupResponse>()
                .await
                .unwrap()
        }
    };
    assert!(
        lookup(T.writer_b).await.entries.is_empty(),
        "team b sees team a's key"
    );
    assert!(
        lookup(T.admin).await.entries.is_empty(),
        "default namespace sees team a's key"
    );
    assert_eq!(lookup(T.reader_a).await.entries[&k], ea);
    assert_eq!(
        status(c.get(format!("{u}/v1/entries/{k}")), Some(T.writer_b)).await,
        StatusCode::NOT_FOUND
    );

    // Team b writing the same key lands in its own namespace...
    assert_eq!(
        put_entry(&c, u, Some(T.writer_b), &k, &eb).await.status(),
        StatusCode::CREATED
    );
    // ...and team a still reads its own entry.
    assert_eq!(lookup(T.writer_a).await.entries[&k], ea);
    assert_eq!(lookup(T.writer_b).await.entries[&k], eb);
    // Team a cannot overwrite its entry with team b's content either.
    assert_eq!(
        put_entry(&c, u, Some(T.writer_a), &k, &eb).await.status(),
        StatusCode::CONFLICT
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_reads_only_when_configured() {
    let data = tempfile::tempdir().unwrap();
    let conf = tempfile::tempdir().unwrap();
    let tokens = tokens_file(conf.path(), true);
    let server = Server::start(data.path(), &["--tokens", tokens.to_str().unwrap()]);
    let c = client();
    let u = &server.url;
    let (_, d) = put_blob(&c, u, Some(T.admin), b"public").await;
    put_entry(&c, u, Some(T.admin), &key(1), &entry(Some((&d, 6)), "RUN")).await;
    assert_eq!(
        status(c.get(format!("{u}/v1/entries/{}", key(1))), None).await,
        StatusCode::OK
    );
    assert_eq!(
        status(c.get(format!("{u}/v1/blobs/{d}")), None).await,
        StatusCode::OK
    );
    let r = put_entry(&c, u, None, &key(2), &entry(None, "RUN")).await;
    assert_eq!(r.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(
        status(c.get(format!("{u}/v1/admin/stats")), None).await,
        StatusCode::UNAUTHORIZED
    );
    // A bad token is still refused, not downgraded to anonymous.
    assert_eq!(
        status(c.get(format!("{u}/v1/entries/{}", key(1))), Some("wrong")).await,
        StatusCode::UNAUTHORIZED
    );
}
