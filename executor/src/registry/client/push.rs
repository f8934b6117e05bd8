//! Pushing: blobs (mounted, in one PUT or in chunks), manifests, Kaniko's
//! push permission check, and whole images to every destination.

use super::*;

impl RegistryClient {
    /// `Some(size)` if the repository has the blob.
    pub async fn blob_exists(
        &self,
        dest: &ImageRef,
        digest: &Digest,
    ) -> Result<Option<u64>, RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        self.blob_exists_at(&ep, dest, digest, &[push_scope(dest.repository())])
            .await
    }

    pub(super) async fn blob_exists_at(
        &self,
        ep: &Endpoint,
        dest: &ImageRef,
        digest: &Digest,
        scopes: &[String],
    ) -> Result<Option<u64>, RegistryError> {
        let url = format!("{}/v2/{}/blobs/{digest}", ep.base, dest.repository());
        let resp = self.send(ep, scopes, Method::HEAD, &url, Ok).await?;
        match resp.status() {
            s if s.is_success() => Ok(Some(
                resp.headers()
                    .get(CONTENT_LENGTH)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse().ok())
                    .unwrap_or(0),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("HEAD", &url, s, String::new())),
        }
    }

    pub(super) fn resolve_location(
        base: &str,
        resp: &Response,
        url: &str,
    ) -> Result<String, RegistryError> {
        let loc = resp
            .headers()
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                status_error(
                    "POST",
                    url,
                    resp.status(),
                    "no Location header in upload response".into(),
                )
            })?;
        let base =
            Url::parse(&format!("{base}/")).map_err(|e| RegistryError::Config(e.to_string()))?;
        base.join(loc).map(|u| u.to_string()).map_err(|e| {
            status_error(
                "POST",
                url,
                resp.status(),
                format!("bad Location {loc}: {e}"),
            )
        })
    }

    pub(super) fn file_body(
        path: &PathBuf,
        offset: u64,
        len: u64,
    ) -> Result<reqwest::Body, RegistryError> {
        let io = |source| RegistryError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::File::open(path).map_err(io)?;
        f.seek(SeekFrom::Start(offset)).map_err(io)?;
        let f = tokio::fs::File::from_std(f).take(len);
        // Counted as sent for the push's progress lines (crate::log).
        let sent = crate::log::bytes_sent();
        Ok(reqwest::Body::wrap_stream(
            tokio_util::io::ReaderStream::with_capacity(f, 256 * 1024).inspect_ok(move |chunk| {
                sent.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
            }),
        ))
    }

    /// Uploads one blob to `dest` unless the repository has it: mounted from
    /// `mount_from` (a repository of the same registry) when possible, else
    /// in one PUT, or in chunks when larger than `chunk_size`.
    pub(super) async fn push_blob_once(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        body: &Body<'_>,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let repo = dest.repository();
        let mut scopes = vec![push_scope(repo)];
        if let Some(from) = mount_from {
            scopes.push(pull_scope(from));
        }
        if self
            .blob_exists_at(&ep, dest, &desc.digest, &scopes)
            .await?
            .is_some()
        {
            return Ok(());
        }
        let mut url = format!("{}/v2/{repo}/blobs/uploads/", ep.base);
        if let Some(from) = mount_from {
            url = format!("{url}?mount={}&from={from}", desc.digest);
        }
        let resp = self
            .send(&ep, &scopes, Method::POST, &url, |b| {
                Ok(b.header(CONTENT_LENGTH, "0"))
            })
            .await?;
        match resp.status() {
            StatusCode::CREATED if mount_from.is_some() => {
                tracing::debug!("mounted {} into {dest} from {mount_from:?}", desc.digest);
                return Ok(());
            }
            StatusCode::ACCEPTED => {}
            _ => return Err(fail("POST", &url, resp).await),
        }
        let mut location = Self::resolve_location(&ep.base, &resp, &url)?;
        let size = desc.size;
        let chunked = self.opts.chunk_size > 0 && size > self.opts.chunk_size;
        if chunked {
            let Body::File(path) = body else {
                return Err(RegistryError::Config("chunked upload needs a file".into()));
            };
            let mut offset = 0;
            while offset < size {
                let n = self.opts.chunk_size.min(size - offset);
                let range = format!("{}-{}", offset, offset + n - 1);
                let resp = self
                    .send(&ep, &scopes, Method::PATCH, &location, |b| {
                        Ok(b.header(CONTENT_TYPE, "application/octet-stream")
                            .header(CONTENT_LENGTH, n.to_string())
                            .header("Content-Range", range.as_str())
                            .body(Self::file_body(path, offset, n)?))
                    })
                    .await?;
                if resp.status() != StatusCode::ACCEPTED {
                    return Err(fail("PATCH", &location, resp).await);
                }
                location = Self::resolve_location(&ep.base, &resp, &location)?;
                offset += n;
            }
        }
        let mut put_url = Url::parse(&location)
            .map_err(|e| RegistryError::Config(format!("upload URL {location}: {e}")))?;
        put_url
            .query_pairs_mut()
            .append_pair("digest", &desc.digest.to_string());
        let put_url = put_url.to_string();
        let resp = self
            .send(&ep, &scopes, Method::PUT, &put_url, |b| {
                let b = b.header(CONTENT_TYPE, "application/octet-stream");
                Ok(match (chunked, body) {
                    (true, _) => b.header(CONTENT_LENGTH, "0"),
                    (false, Body::Bytes(bytes)) => b.body(bytes.to_vec()),
                    (false, Body::File(path)) => b
                        .header(CONTENT_LENGTH, size.to_string())
                        .body(Self::file_body(path, 0, size)?),
                })
            })
            .await?;
        if resp.status() != StatusCode::CREATED {
            return Err(fail("PUT", &put_url, resp).await);
        }
        Ok(())
    }

    pub(super) async fn push_blob(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        body: Body<'_>,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.retry(self.opts.push_retries, || {
            self.push_blob_once(dest, desc, &body, mount_from)
        })
        .await
    }

    /// Uploads a blob file (see `push_blob_once` for the strategy).
    pub async fn push_blob_file(
        &self,
        dest: &ImageRef,
        desc: &Descriptor,
        path: PathBuf,
        mount_from: Option<&str>,
    ) -> Result<(), RegistryError> {
        self.push_blob(dest, desc, Body::File(path), mount_from)
            .await
    }

    /// Uploads a manifest under the reference's tag (or digest) and returns
    /// its digest.
    pub async fn put_manifest(
        &self,
        dest: &ImageRef,
        bytes: &[u8],
        media_type: &str,
    ) -> Result<Digest, RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let digest = Digest::of_bytes(bytes);
        let reference = dest
            .tag()
            .map(str::to_string)
            .unwrap_or_else(|| digest.to_string());
        let url = format!("{}/v2/{}/manifests/{reference}", ep.base, dest.repository());
        let scopes = [push_scope(dest.repository())];
        let pushed = self
            .retry(self.opts.push_retries, || async {
                let resp = self
                    .send(&ep, &scopes, Method::PUT, &url, |b| {
                        Ok(b.header(CONTENT_TYPE, media_type).body(bytes.to_vec()))
                    })
                    .await?;
                if resp.status() != StatusCode::CREATED {
                    return Err(fail("PUT", &url, resp).await);
                }
                let served = resp
                    .headers()
                    .get("Docker-Content-Digest")
                    .and_then(|v| v.to_str().ok());
                if let Some(served) = served
                    && served != digest.to_string()
                {
                    return Err(RegistryError::Manifest {
                        reference: dest.to_string(),
                        reason: format!(
                            "registry stored the manifest as {served}, expected {digest}"
                        ),
                    });
                }
                Ok(())
            })
            .await;
        match pushed {
            Err(e) if self.opts.push_ignore_immutable_tag_errors && e.is_immutable_tag() => {
                tracing::warn!(
                    "{dest}: the registry keeps this tag immutable; not overwritten \
                     (--push-ignore-immutable-tag-errors): {}",
                    kiln_common::errors::chain(&e)
                );
                Ok(digest)
            }
            Err(e) => Err(e),
            Ok(()) => Ok(digest),
        }
    }

    /// Kaniko's push permission check, done before the build: authenticate
    /// for the push scope of `dest`'s repository, start a blob upload
    /// (`POST /v2/<repo>/blobs/uploads/`) and cancel it (`DELETE` of the
    /// upload's location), so bad credentials or a missing permission fail
    /// in seconds rather than after the build. Nothing is written.
    pub async fn check_push_permission(&self, dest: &ImageRef) -> Result<(), RegistryError> {
        let ep = self.endpoint(dest.registry(), Direction::Push);
        let repo = dest.repository();
        let scopes = [push_scope(repo)];
        let url = format!("{}/v2/{repo}/blobs/uploads/", ep.base);
        self.retry(self.opts.push_retries, || async {
            let resp = self
                .send(&ep, &scopes, Method::POST, &url, |b| {
                    Ok(b.header(CONTENT_LENGTH, "0"))
                })
                .await?;
            if !resp.status().is_success() {
                return Err(fail("POST", &url, resp).await);
            }
            // Cancelling is a courtesy (abandoned uploads expire anyway):
            // its failure does not fail the check.
            if let Ok(location) = Self::resolve_location(&ep.base, &resp, &url) {
                match self.send(&ep, &scopes, Method::DELETE, &location, Ok).await {
                    Ok(r) if r.status().is_success() || r.status() == StatusCode::NOT_FOUND => {}
                    Ok(r) => tracing::debug!("cancelling upload {location}: HTTP {}", r.status()),
                    Err(e) => tracing::debug!("cancelling upload {location}: {e}"),
                }
            }
            Ok(())
        })
        .await
    }

    /// Pushes an image to every destination and returns its manifest
    /// digest. Per registry, each blob is uploaded once (to the first
    /// destination there) and mounted into the others; `mount_hints` name
    /// repositories (e.g. the base image's) that may already hold layers.
    pub async fn push_image(
        &self,
        image: &ImageDocuments,
        destinations: &[ImageRef],
        layers: &dyn BlobSource,
        mount_hints: &[ImageRef],
    ) -> Result<Digest, RegistryError> {
        let mut by_registry: Vec<(String, Vec<&ImageRef>)> = Vec::new();
        for d in destinations {
            match by_registry.iter_mut().find(|(r, _)| r == d.registry()) {
                Some((_, v)) => v.push(d),
                None => by_registry.push((d.registry().to_string(), vec![d])),
            }
        }
        let mut seen = std::collections::HashSet::new();
        let blobs: Vec<&Descriptor> = image
            .manifest
            .layers
            .iter()
            .filter(|d| seen.insert(d.digest.clone()))
            .collect();
        for (registry, dests) in &by_registry {
            // A registry may answer MANIFEST_BLOB_UNKNOWN for a blob it has
            // just acknowledged: Distribution rewrites a repository's blob
            // link in place (truncate, then write), so a manifest checked
            // while another client links the same blob into the same
            // repository sees an empty link. Uploading again (each blob is
            // looked up first, so only a really missing one moves) and
            // putting the manifest again is what resolves it; once even
            // without --push-retry, since the registry contradicts itself.
            let retries = self.opts.push_retries.max(1);
            let mut delay = self.opts.retry_backoff;
            let mut attempt = 0;
            loop {
                match self
                    .push_to_registry(image, registry, dests, &blobs, layers, mount_hints)
                    .await
                {
                    Err(e) if attempt < retries && e.is_manifest_blob_unknown() => {
                        attempt += 1;
                        tracing::warn!(
                            "{e}; checking the blobs again and retrying ({attempt}/{retries}) in {delay:?}"
                        );
                        tokio::time::sleep(delay).await;
                        delay = delay.saturating_mul(2);
                    }
                    result => break result?,
                }
            }
        }
        Ok(image.manifest_digest.clone())
    }

    /// One registry's part of [`Self::push_image`]: the blobs to the first
    /// destination there, mounted into the others, then every manifest.
    async fn push_to_registry(
        &self,
        image: &ImageDocuments,
        registry: &str,
        dests: &[&ImageRef],
        blobs: &[&Descriptor],
        layers: &dyn BlobSource,
        mount_hints: &[ImageRef],
    ) -> Result<(), RegistryError> {
        let n = self.opts.max_concurrent_transfers.max(1);
        let first = dests[0];
        let hint = mount_hints
            .iter()
            .find(|h| h.registry() == registry && h.repository() != first.repository())
            .map(|h| h.repository().to_string());
        futures::stream::iter(blobs.iter().copied())
            .map(|desc| {
                let hint = hint.clone();
                async move {
                    let path =
                        layers
                            .blob_path(&desc.digest)
                            .ok_or_else(|| RegistryError::Blob {
                                digest: desc.digest.clone(),
                                url: first.to_string(),
                                reason: "not available locally to push".into(),
                            })?;
                    self.push_blob(first, desc, Body::File(path), hint.as_deref())
                        .await
                }
            })
            .buffer_unordered(n)
            .try_collect::<Vec<_>>()
            .await?;
        self.push_blob(
            first,
            &image.manifest.config,
            Body::Bytes(&image.config_bytes),
            None,
        )
        .await?;
        for other in &dests[1..] {
            let from =
                (other.repository() != first.repository()).then(|| first.repository().to_string());
            futures::stream::iter(blobs.iter().copied().chain([&image.manifest.config]))
                .map(|desc| {
                    let from = from.clone();
                    async move {
                        let body = if desc.digest == image.manifest.config.digest {
                            Body::Bytes(&image.config_bytes)
                        } else {
                            match layers.blob_path(&desc.digest) {
                                Some(p) => Body::File(p),
                                None => {
                                    return Err(RegistryError::Blob {
                                        digest: desc.digest.clone(),
                                        url: other.to_string(),
                                        reason: "not available locally to push".into(),
                                    });
                                }
                            }
                        };
                        self.push_blob(other, desc, body, from.as_deref()).await
                    }
                })
                .buffer_unordered(n)
                .try_collect::<Vec<_>>()
                .await?;
        }
        for d in dests {
            self.put_manifest(d, &image.manifest_bytes, &image.manifest_media_type)
                .await?;
        }
        Ok(())
    }
}
