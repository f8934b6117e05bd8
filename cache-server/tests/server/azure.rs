//! `kiln-cache-server --storage az://container/prefix` on a real Azure
//! Blob Storage API: Azurite, Microsoft's emulator (`kiln_e2e::azurite`).
//! Two replicas, one connected the emulator way
//! (`AZURE_STORAGE_USE_EMULATOR`) and one the way any Azure account is
//! (`--storage-endpoint` with account name and key), share one container:
//! what one stores the other serves, first writer wins, a bad multipart
//! upload leaves nothing in the container, the start-up probe finds
//! conditional writes honoured, and blob GETs can redirect to a SAS URL.

use crate::common;

use std::collections::BTreeMap;
use std::sync::Arc;

use common::{
    bytes, client, entry, get_blob, key, put_blob, put_entry,
    uploads_under_a_wrong_digest_are_refused,
};
use futures::TryStreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest};
use kiln_e2e::azurite::{ACCOUNT, ACCOUNT_KEY, AzureReplica, Azurite, Connect};
use object_store::ObjectStore;
use object_store::azure::MicrosoftAzureBuilder;
use reqwest::StatusCode;

/// Replicas that look a missing key up in the container every time.
const EAGER: &[&str] = &["--miss-recheck", "0"];

/// What a replica logs when the conditional-write probe at start-up found
/// the store refusing to overwrite (`objstore::connect_checked`).
const HONOURED: &str = "the store honours conditional writes";

/// Every object name in the container, as a client of our own sees it
/// (object_store lists committed blobs only, as the replicas do).
async fn names(azurite: &Azurite) -> Vec<String> {
    let store = MicrosoftAzureBuilder::new()
        .with_account(ACCOUNT)
        .with_access_key(ACCOUNT_KEY)
        .with_container_name(azurite.container())
        .with_endpoint(azurite.account_url())
        .with_allow_http(true)
        .build()
        .unwrap();
    let store: Arc<dyn ObjectStore> = Arc::new(store);
    let mut names: Vec<String> = store
        .list(None)
        .map_ok(|meta| meta.location.to_string())
        .try_collect()
        .await
        .unwrap();
    names.sort();
    names
}

async fn lookup(
    c: &reqwest::Client,
    url: &str,
    keys: &[CacheKey],
) -> BTreeMap<CacheKey, CacheEntry> {
    #[derive(serde::Deserialize)]
    struct Answer {
        entries: BTreeMap<CacheKey, CacheEntry>,
    }
    let answer: Answer = c
        .post(format!("{url}/v1/lookup"))
        .json(&serde_json::json!({ "keys": keys }))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    answer.entries
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_share_one_container_first_writer_wins() {
    let Some(azurite) = Azurite::start("azure::two_replicas_share_one_container_first_writer_wins")
    else {
        return;
    };
    let a = AzureReplica::start_azure(&azurite, Connect::Emulator, "shared", EAGER);
    let b = AzureReplica::start_azure(&azurite, Connect::AccountUrl, "shared", EAGER);
    // Azurite refuses the probe's second `If-None-Match: *` create with
    // 409 BlobAlreadyExists, so both use conditional writes.
    for r in [&a, &b] {
        let log = r.log_text();
        assert!(log.contains(HONOURED), "{}:\n{log}", r.url);
    }
    let c = client();
    let data = bytes(1, 300_000);
    let (status, digest) = put_blob(&c, &a.url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);
    let e = entry(Some((&digest, data.len() as u64)), "RUN make");
    let created = put_entry(&c, &a.url, None, &key(1), &e).await;
    assert_eq!(created.status(), StatusCode::CREATED);

    let found = lookup(&c, &b.url, &[key(1), key(2)]).await;
    assert_eq!(found.get(&key(1)), Some(&e));
    assert_eq!(found.len(), 1);
    let (status, body) = get_blob(&c, &b.url, &digest).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data, "the blob through the other replica differs");
    let ranged = c
        .get(format!("{}/v1/blobs/{digest}", b.url))
        .header("range", "bytes=100-199")
        .send()
        .await
        .unwrap();
    assert_eq!(ranged.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(ranged.bytes().await.unwrap().as_ref(), &data[100..200]);

    // First writer wins across replicas; the same entry again is fine.
    let other = entry(Some((&digest, data.len() as u64)), "RUN something else");
    let conflict = put_entry(&c, &b.url, None, &key(1), &other).await;
    assert_eq!(conflict.status(), StatusCode::CONFLICT);
    let again = put_entry(&c, &b.url, None, &key(1), &e).await;
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(lookup(&c, &a.url, &[key(1)]).await.get(&key(1)), Some(&e));

    // GC takes the lease object (a conditional create, then replaced with
    // `If-Match` on its ETag while renewing), runs, and gives it back, so
    // the other replica can take it next; the referenced blob stays.
    for r in [&a, &b] {
        let gc = c
            .post(format!("{}/v1/admin/gc", r.url))
            .send()
            .await
            .unwrap();
        assert_eq!(gc.status(), StatusCode::OK);
        let report: serde_json::Value = gc.json().await.unwrap();
        assert_eq!(report["lease_held"], true, "{}: {report}", r.url);
    }
    assert_eq!(get_blob(&c, &a.url, &digest).await.1, data);

    // The probe object is gone; the blob, the entry and one marker (the
    // losing writer deleted its own) are what is left.
    let left = names(&azurite).await;
    assert!(
        !left.iter().any(|n| n.contains("probes/")),
        "probe objects left: {left:?}"
    );
    assert!(left.contains(&format!("shared/blobs/sha256/{}", digest.hex())));
    let markers = left
        .iter()
        .filter(|n| n.starts_with("shared/refs/"))
        .count();
    assert_eq!(markers, 1, "{left:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_mismatch_on_upload_leaves_nothing_in_the_container() {
    let Some(azurite) =
        Azurite::start("azure::a_digest_mismatch_on_upload_leaves_nothing_in_the_container")
    else {
        return;
    };
    let replica = AzureReplica::start_azure(
        &azurite,
        Connect::Emulator,
        "mismatch",
        &["--storage-part-size", "5MiB"],
    );
    let c = client();
    // 12 MiB goes up as three staged blocks (Put Block), never committed;
    // 1 KiB would be a single Put Blob after the check.
    uploads_under_a_wrong_digest_are_refused(&c, &replica.url, &[12 << 20, 1024]).await;
    let left = names(&azurite).await;
    assert!(left.is_empty(), "objects left in the container: {left:?}");

    // The right bytes under their digest arrive (12 MiB, Put Block List).
    let data = bytes(8, 12 << 20);
    let (status, digest) = put_blob(&c, &replica.url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(
        names(&azurite).await,
        vec![format!("mismatch/blobs/sha256/{}", digest.hex())]
    );
    let (status, body) = get_blob(&c, &replica.url, &digest).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blob_gets_can_redirect_to_a_sas_url() {
    let Some(azurite) = Azurite::start("azure::blob_gets_can_redirect_to_a_sas_url") else {
        return;
    };
    let replica = AzureReplica::start_azure(
        &azurite,
        Connect::AccountUrl,
        "presign",
        &["--presign-ttl", "5m"],
    );
    let c = client();
    let data = bytes(9, 70_000);
    let (status, digest) = put_blob(&c, &replica.url, None, &data).await;
    assert_eq!(status, StatusCode::CREATED);

    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = no_follow
        .get(format!("{}/v1/blobs/{digest}", replica.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), StatusCode::TEMPORARY_REDIRECT);
    let location = r.headers()["location"].to_str().unwrap().to_owned();
    let container = format!("{}/{}/presign/", azurite.account_url(), azurite.container());
    assert!(location.starts_with(&container), "{location}");
    assert!(location.contains("sig="), "{location}");

    // Following it, a client gets the bytes straight from the container.
    let (status, body) = get_blob(&c, &replica.url, &digest).await;
    assert_eq!(status, StatusCode::OK);
    assert!(body == data);
    let missing = Digest::of_bytes(b"never uploaded");
    let (status, _) = get_blob(&c, &replica.url, &missing).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}
