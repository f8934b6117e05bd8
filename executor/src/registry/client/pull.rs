//! Pulling: manifests (an index resolved to the platform's manifest),
//! configs, and blobs streamed into the local store, verified.

use super::*;

impl RegistryClient {
    pub(super) async fn get_manifest_at(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        reference: &str,
    ) -> Result<RawManifest, RegistryError> {
        let repo = ep.repo(r);
        let url = format!("{}/v2/{repo}/manifests/{reference}", ep.base);
        let scopes = [pull_scope(&repo)];
        let accept = media::ACCEPT_MANIFESTS.join(", ");
        let resp = self
            .send(ep, &scopes, Method::GET, &url, |b| {
                Ok(b.header(ACCEPT, accept.as_str()))
            })
            .await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        let content_type = resp
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|s| s.split(';').next().unwrap_or(s).trim().to_string());
        let bytes = read_limited(resp, &url, MAX_MANIFEST_SIZE).await?;
        let digest = Digest::of_bytes(&bytes);
        if let Ok(want) = reference.parse::<Digest>()
            && want != digest
        {
            return Err(RegistryError::Manifest {
                reference: url,
                reason: format!("served manifest has digest {digest}, not the requested {want}"),
            });
        }
        #[derive(Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct Probe {
            media_type: Option<String>,
            manifests: Option<serde_json::Value>,
        }
        let probe: Probe = serde_json::from_slice(&bytes).map_err(|e| RegistryError::Manifest {
            reference: url.clone(),
            reason: format!("not JSON: {e}"),
        })?;
        let media_type = match (probe.media_type, content_type) {
            (Some(m), _) => m,
            (None, Some(c)) if media::is_index(&c) || media::is_manifest(&c) => c,
            (None, _) if probe.manifests.is_some() => media::OCI_INDEX.to_string(),
            (None, _) => media::OCI_MANIFEST.to_string(),
        };
        Ok(RawManifest {
            bytes,
            media_type,
            digest,
        })
    }

    /// Fetches a manifest or index by the reference's tag or digest.
    pub async fn get_manifest(&self, r: &ImageRef) -> Result<RawManifest, RegistryError> {
        let ep = self.endpoint(r.registry(), Direction::Pull);
        let reference = r.manifest_reference();
        self.retry(self.opts.pull_retries, || {
            self.get_manifest_at(&ep, r, &reference)
        })
        .await
    }

    pub(super) async fn get_small_blob(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        desc: &Descriptor,
    ) -> Result<Vec<u8>, RegistryError> {
        let repo = ep.repo(r);
        let url = format!("{}/v2/{repo}/blobs/{}", ep.base, desc.digest);
        let scopes = [pull_scope(&repo)];
        if desc.size > MAX_CONFIG_SIZE {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!(
                    "its descriptor says {} bytes, more than the {MAX_CONFIG_SIZE} a config may have",
                    desc.size
                ),
            });
        }
        let resp = self.send(ep, &scopes, Method::GET, &url, Ok).await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        let bytes = read_limited(resp, &url, desc.size)
            .await
            .map_err(|_| RegistryError::Blob {
                digest: desc.digest.clone(),
                url: url.clone(),
                reason: format!("more than the {} bytes its descriptor says", desc.size),
            })?;
        if bytes.len() as u64 != desc.size {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!("{} bytes, its descriptor says {}", bytes.len(), desc.size),
            });
        }
        let got = Digest::of_bytes(&bytes);
        if got != desc.digest {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!("content has digest {got}"),
            });
        }
        Ok(bytes)
    }

    pub(super) async fn resolve_at(
        &self,
        ep: &Endpoint,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<PulledImage, RegistryError> {
        let mut raw = self.get_manifest_at(ep, r, &r.manifest_reference()).await?;
        if media::is_index(&raw.media_type) {
            let index: Index =
                serde_json::from_slice(&raw.bytes).map_err(|e| RegistryError::Manifest {
                    reference: r.to_string(),
                    reason: format!("invalid index: {e}"),
                })?;
            let Some(entry) = select_platform(&index.manifests, platform) else {
                let available: Vec<String> = index
                    .manifests
                    .iter()
                    .filter_map(|d| d.platform.as_ref().map(|p| p.to_string()))
                    .collect();
                return Err(RegistryError::NoPlatform {
                    reference: r.to_string(),
                    platform: platform.to_string(),
                    available: available.join(", "),
                });
            };
            raw = self
                .get_manifest_at(ep, r, &entry.digest.to_string())
                .await?;
        }
        if !media::is_manifest(&raw.media_type) {
            return Err(RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("unsupported manifest media type {}", raw.media_type),
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(&raw.bytes).map_err(|e| RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("invalid manifest: {e}"),
            })?;
        let config_bytes = self.get_small_blob(ep, r, &manifest.config).await?;
        let config: ImageConfig =
            serde_json::from_slice(&config_bytes).map_err(|e| RegistryError::Manifest {
                reference: r.to_string(),
                reason: format!("invalid image config {}: {e}", manifest.config.digest),
            })?;
        Ok(PulledImage {
            reference: r.with_digest(raw.digest.clone()),
            image: ImageDocuments {
                manifest_digest: raw.digest,
                manifest_media_type: raw.media_type,
                manifest_bytes: raw.bytes,
                manifest,
                config_bytes,
                config,
            },
            endpoint: ep.clone(),
        })
    }

    /// An image whose documents were had elsewhere (the cache, by digest:
    /// docs/executor-cache.md, "Base images pinned by digest"), as if
    /// resolved here: its blobs, when needed, come from `r`'s registry.
    pub fn pulled_from_documents(&self, r: &ImageRef, image: ImageDocuments) -> PulledImage {
        PulledImage {
            reference: r.with_digest(image.manifest_digest.clone()),
            endpoint: self.endpoint(r.registry(), Direction::Pull),
            image,
        }
    }

    /// Resolves `r` to one image manifest (choosing `platform` from an
    /// index) and fetches its config; layers are not downloaded. Images are
    /// tried on their mirrors first (see `pull_endpoints`); the layers are
    /// then fetched from whichever endpoint answered.
    pub async fn resolve(
        &self,
        r: &ImageRef,
        platform: &Platform,
    ) -> Result<PulledImage, RegistryError> {
        let endpoints = self.pull_endpoints(r);
        let mirrors = endpoints.iter().filter(|(_, m)| *m).count();
        let mut failures = Vec::new();
        for (ep, is_mirror) in &endpoints {
            match self
                .retry(self.opts.pull_retries, || self.resolve_at(ep, r, platform))
                .await
            {
                Ok(p) => {
                    if *is_mirror {
                        tracing::info!("pulled {r} from mirror {}/v2/{}", ep.base, ep.repo(r));
                    }
                    return Ok(p);
                }
                Err(e) if *is_mirror => {
                    let e = kiln_common::errors::chain(&e);
                    tracing::warn!(
                        "mirror {}/v2/{} failed for {r}: {e}; trying the next mirror or the registry itself",
                        ep.base,
                        ep.repo(r),
                    );
                    failures.push(e);
                }
                Err(e) if mirrors == 0 => return Err(e),
                Err(e) => {
                    failures.push(kiln_common::errors::chain(&e));
                    break;
                }
            }
        }
        Err(RegistryError::Manifest {
            reference: r.to_string(),
            reason: format!(
                "no mirror had it{}: {}",
                if endpoints.iter().all(|(_, m)| *m) {
                    " (--skip-default-registry-fallback: the registry itself was not asked)"
                } else {
                    ", nor the registry itself"
                },
                failures.join("; ")
            ),
        })
    }

    pub(super) async fn fetch_blob_once(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
        tee: Option<std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>>,
    ) -> Result<PathBuf, RegistryError> {
        let ep = &pulled.endpoint;
        let repo = ep.repo(&pulled.reference);
        let url = format!("{}/v2/{repo}/blobs/{}", ep.base, desc.digest);
        let scopes = [pull_scope(&repo)];
        let resp = self.send(ep, &scopes, Method::GET, &url, Ok).await?;
        if !resp.status().is_success() {
            return Err(fail("GET", &url, resp).await);
        }
        if let Some(announced) = resp.content_length().filter(|n| *n != desc.size) {
            return Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: format!(
                    "the response announces {announced} bytes, its descriptor says {}",
                    desc.size
                ),
            });
        }
        // Disk writes happen on a blocking thread fed through a bounded
        // channel, so the async side never blocks and memory stays at a few
        // chunks whatever the blob size.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(16);
        let writer_store = store.clone();
        let digest = desc.digest.clone();
        let size = desc.size;
        let writer = tokio::task::spawn_blocking(move || -> Result<PathBuf, RegistryError> {
            let mut tee = tee;
            let mut w = writer_store.writer()?;
            while let Some(chunk) = rx.blocking_recv() {
                w.write_all(&chunk).map_err(|source| RegistryError::Io {
                    path: writer_store.root().to_path_buf(),
                    source,
                })?;
                // A consumer that stopped (it failed) leaves the blob to be
                // stored all the same.
                if let Some(t) = &tee
                    && t.send(Ok(chunk.to_vec())).is_err()
                {
                    tee = None;
                }
            }
            Ok(w.commit(&digest, Some(size))?)
        });
        let mut stream = resp.bytes_stream();
        let mut received = 0u64;
        let mut failure = None;
        while let Some(chunk) = stream.next().await {
            match chunk {
                Ok(chunk) => {
                    received += chunk.len() as u64;
                    if received > desc.size {
                        failure = Some(RegistryError::Blob {
                            digest: desc.digest.clone(),
                            url: url.clone(),
                            reason: format!(
                                "more than the {} bytes its descriptor says",
                                desc.size
                            ),
                        });
                        break;
                    }
                    if tx.send(chunk).await.is_err() {
                        break;
                    }
                }
                Err(source) => {
                    failure = Some(body_error("GET", &url, source));
                    break;
                }
            }
        }
        drop(tx);
        let written = writer.await.map_err(|e| RegistryError::Io {
            path: store.root().to_path_buf(),
            source: std::io::Error::other(e),
        })?;
        match (failure, written) {
            (Some(e), _) => Err(e),
            (None, Ok(p)) => Ok(p),
            (None, Err(RegistryError::Store(e))) => Err(RegistryError::Blob {
                digest: desc.digest.clone(),
                url,
                reason: e.to_string(),
            }),
            (None, Err(e)) => Err(e),
        }
    }

    /// Downloads one blob of a resolved image into `store` (unless it is
    /// already there), verified against its digest and size.
    pub async fn fetch_blob(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
    ) -> Result<PathBuf, RegistryError> {
        if store.contains(&desc.digest) {
            return Ok(store.path(&desc.digest));
        }
        self.retry(self.opts.pull_retries, || {
            self.fetch_blob_once(pulled, desc, store, None)
        })
        .await
    }

    /// Downloads one blob into `store` like [`Self::fetch_blob`], but once
    /// (no retries: bytes handed on cannot be taken back), handing every
    /// chunk to `tee` as well, as it is written: the consumer (a layer
    /// conversion) works while the blob downloads. The store commits the
    /// blob only if its sha256 and size match, so the consumer's result
    /// counts only when this returns `Ok`. `tee` is closed at the end (or
    /// on failure, when the consumer then sees a stream cut short).
    pub async fn fetch_blob_teed(
        &self,
        pulled: &PulledImage,
        desc: &Descriptor,
        store: &LocalStore,
        tee: std::sync::mpsc::SyncSender<std::io::Result<Vec<u8>>>,
    ) -> Result<PathBuf, RegistryError> {
        self.fetch_blob_once(pulled, desc, store, Some(tee)).await
    }

    /// Downloads every layer of a resolved image into `store`, several at a
    /// time; layers already in the store are not downloaded again.
    pub async fn fetch_layers(
        &self,
        pulled: &PulledImage,
        store: &LocalStore,
    ) -> Result<(), RegistryError> {
        let mut seen = std::collections::HashSet::new();
        let layers: Vec<&Descriptor> = pulled
            .image
            .manifest
            .layers
            .iter()
            .filter(|d| seen.insert(d.digest.clone()))
            .collect();
        futures::stream::iter(layers)
            .map(|d| self.fetch_blob(pulled, d, store))
            .buffer_unordered(self.opts.max_concurrent_transfers.max(1))
            .try_collect::<Vec<_>>()
            .await?;
        Ok(())
    }

    /// Resolves and downloads an image: `(manifest digest, config, layers)`
    /// are in the returned documents, the layer bytes in `store` (config and
    /// manifest too, so later builds can find them offline).
    pub async fn pull(
        &self,
        r: &ImageRef,
        platform: &Platform,
        store: &LocalStore,
    ) -> Result<PulledImage, RegistryError> {
        let pulled = self.resolve(r, platform).await?;
        store.put_bytes(&pulled.image.config_bytes)?;
        store.put_bytes(&pulled.image.manifest_bytes)?;
        self.fetch_layers(&pulled, store).await?;
        Ok(pulled)
    }
}
