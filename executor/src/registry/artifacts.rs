//! Repository-level calls for OCI artifacts that are not images: the
//! registry-backed layer cache (`--cache-repo`) keeps its entries as small
//! artifact manifests under tags and its layers as plain blobs of one
//! repository.
//!
//! A child of [`super::client`] so it shares that module's transport
//! (endpoints, the 401 challenge dance, retries, capped reads) without
//! widening its API. Same promises: blobs are streamed into the local store
//! and committed only when digest and size check out, and nothing a
//! registry sends is read past the size it should have.

use std::io::Write;
use std::path::PathBuf;

use futures::StreamExt;
use kiln_common::Digest;
use reqwest::header::{ACCEPT, CONTENT_TYPE};
use reqwest::{Method, StatusCode};

use super::{
    Body, Direction, MAX_MANIFEST_SIZE, RegistryClient, body_error, fail, pull_scope, push_scope,
    read_limited,
};
use crate::oci::Descriptor;
use crate::registry::{ImageRef, RegistryError};
use crate::store::LocalStore;

impl RegistryClient {
    /// The manifest under `tag` in `repo`, as stored (at most
    /// [`MAX_MANIFEST_SIZE`] bytes), or `None` when the tag does not exist.
    /// Only OCI image manifests are asked for: an artifact is one.
    pub async fn get_tagged_manifest(
        &self,
        repo: &ImageRef,
        tag: &str,
    ) -> Result<Option<Vec<u8>>, RegistryError> {
        let ep = self.endpoint(repo.registry(), Direction::Pull);
        let url = format!("{}/v2/{}/manifests/{tag}", ep.base, repo.repository());
        let scopes = [pull_scope(repo.repository())];
        self.retry(self.opts.pull_retries, || async {
            let resp = self
                .send(&ep, &scopes, Method::GET, &url, |b| {
                    Ok(b.header(ACCEPT, crate::oci::media::OCI_MANIFEST))
                })
                .await?;
            match resp.status() {
                StatusCode::NOT_FOUND => Ok(None),
                s if s.is_success() => Ok(Some(read_limited(resp, &url, MAX_MANIFEST_SIZE).await?)),
                _ => Err(fail("GET", &url, resp).await),
            }
        })
        .await
    }

    /// Downloads blob `digest` of `repo` into `store`, verified against the
    /// digest and exactly `size` bytes; `None` when the repository does not
    /// have it.
    pub async fn fetch_repository_blob(
        &self,
        repo: &ImageRef,
        digest: &Digest,
        size: u64,
        store: &LocalStore,
    ) -> Result<Option<PathBuf>, RegistryError> {
        if store.contains(digest) {
            return Ok(Some(store.path(digest)));
        }
        let ep = self.endpoint(repo.registry(), Direction::Pull);
        let url = format!("{}/v2/{}/blobs/{digest}", ep.base, repo.repository());
        let scopes = [pull_scope(repo.repository())];
        let blob_err = |reason: String| RegistryError::Blob {
            digest: digest.clone(),
            url: url.clone(),
            reason,
        };
        self.retry(self.opts.pull_retries, || async {
            let resp = self.send(&ep, &scopes, Method::GET, &url, Ok).await?;
            if resp.status() == StatusCode::NOT_FOUND {
                return Ok(None);
            }
            if !resp.status().is_success() {
                return Err(fail("GET", &url, resp).await);
            }
            if let Some(announced) = resp.content_length().filter(|n| *n != size) {
                return Err(blob_err(format!(
                    "the response announces {announced} bytes, the cache entry says {size}"
                )));
            }
            let mut writer = store.writer()?;
            let mut received = 0u64;
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(|source| body_error("GET", &url, source))?;
                received += chunk.len() as u64;
                // Cut off at the size: an endless body must not fill the
                // disk before the digest could say it is wrong.
                if received > size {
                    return Err(blob_err(format!(
                        "more than the {size} bytes the cache entry says"
                    )));
                }
                writer
                    .write_all(&chunk)
                    .map_err(|source| RegistryError::Io {
                        path: store.root().to_path_buf(),
                        source,
                    })?;
            }
            // The store refuses bytes that are short or hash to another
            // digest: a corrupt blob never enters the build.
            writer
                .commit(digest, Some(size))
                .map(Some)
                .map_err(|e| blob_err(e.to_string()))
        })
        .await
    }

    /// Uploads a small blob held in memory (e.g. an artifact's config)
    /// unless the repository has it.
    pub async fn push_blob_bytes(
        &self,
        dest: &ImageRef,
        media_type: &str,
        bytes: &[u8],
    ) -> Result<Digest, RegistryError> {
        let desc = Descriptor::new(media_type, Digest::of_bytes(bytes), bytes.len() as u64);
        self.push_blob(dest, &desc, Body::Bytes(bytes), None)
            .await?;
        Ok(desc.digest)
    }

    /// Stores `bytes` as the manifest of `tag` in `repo` unless the tag
    /// exists already; returns whether it was written. Between the check
    /// and the write another client may write the same tag: the last
    /// writer wins there, which callers that need first-writer-wins must
    /// tolerate (see docs/cache-repo.md).
    pub async fn put_manifest_if_absent(
        &self,
        repo: &ImageRef,
        tag: &str,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<bool, RegistryError> {
        let ep = self.endpoint(repo.registry(), Direction::Push);
        let url = format!("{}/v2/{}/manifests/{tag}", ep.base, repo.repository());
        let scopes = [push_scope(repo.repository())];
        let exists = self
            .retry(self.opts.push_retries, || async {
                let resp = self
                    .send(&ep, &scopes, Method::HEAD, &url, |b| {
                        Ok(b.header(ACCEPT, media_type))
                    })
                    .await?;
                match resp.status() {
                    StatusCode::NOT_FOUND => Ok(false),
                    s if s.is_success() => Ok(true),
                    s => Err(super::status_error("HEAD", &url, s, String::new())),
                }
            })
            .await?;
        if exists {
            return Ok(false);
        }
        self.retry(self.opts.push_retries, || async {
            let resp = self
                .send(&ep, &scopes, Method::PUT, &url, |b| {
                    Ok(b.header(CONTENT_TYPE, media_type).body(bytes.to_vec()))
                })
                .await?;
            if resp.status() != StatusCode::CREATED {
                return Err(fail("PUT", &url, resp).await);
            }
            Ok(true)
        })
        .await
    }
}
