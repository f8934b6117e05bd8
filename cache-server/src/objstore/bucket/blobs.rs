//! Blob objects: size, ranged reads, presigned URLs, verified uploads
//! ([`BlobUpload`]), deletion.

use std::time::Duration;

use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use kiln_common::Digest;
use object_store::path::Path;
use object_store::{
    GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, PutPayloadMut, UploadPart,
};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::ObjError;
use kiln_storage::{BlobCommit, ContractError};

use super::*;

impl Bucket {
    /// Size of a stored blob, or `None`.
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ObjError> {
        Ok(self.blob_meta(digest).await?.map(|m| m.size))
    }

    /// Listing metadata of a stored blob (size, last modified), or `None`.
    pub async fn blob_meta(&self, digest: &Digest) -> Result<Option<ObjectMeta>, ObjError> {
        match self.store.head(&self.blob_path(digest)).await {
            Ok(meta) => Ok(Some(meta)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ctx(format!("HEAD blob {digest}"))(e)),
        }
    }

    /// Streams a blob (or `range` of it, end exclusive). Returns the total
    /// size, the range served, and the bytes; `None` when absent.
    pub async fn get_blob(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<BlobRead>, ObjError> {
        let options = GetOptions {
            range: range.map(GetRange::Bounded),
            ..Default::default()
        };
        match self.store.get_opts(&self.blob_path(digest), options).await {
            Ok(result) => Ok(Some(BlobRead {
                size: result.meta.size,
                range: result.range.clone(),
                stream: result.into_stream(),
            })),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ctx(format!("GET blob {digest}"))(e)),
        }
    }

    /// A URL the client may GET the blob from directly, when a signer is
    /// configured.
    pub async fn presigned_get(
        &self,
        digest: &Digest,
        expires_in: Duration,
    ) -> Result<Option<String>, ObjError> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(http::Method::GET, &self.blob_path(digest), expires_in)
            .await
            .map_err(ctx(format!("signing a URL for blob {digest}")))?;
        Ok(Some(url.to_string()))
    }

    /// Starts an upload; nothing becomes visible before
    /// [`BlobUpload::commit`] verified the digest. When the blob is already
    /// stored the bytes are only hashed (to answer a mismatch truthfully),
    /// not sent again.
    pub async fn blob_upload(&self, expected: &Digest) -> Result<BlobUpload, ObjError> {
        let exists = self.blob_size(expected).await?.is_some();
        Ok(BlobUpload {
            bucket: self.clone(),
            expected: expected.clone(),
            hasher: Sha256::new(),
            size: 0,
            exists,
            buffer: PutPayloadMut::new(),
            multipart: None,
            in_flight: FuturesUnordered::new(),
        })
    }

    /// Removes a blob; false when it was already gone.
    pub async fn delete_blob(&self, digest: &Digest) -> Result<bool, ObjError> {
        self.delete(&self.blob_path(digest), &format!("blob {digest}"))
            .await
    }

    pub(super) async fn delete(&self, path: &Path, what: &str) -> Result<bool, ObjError> {
        match self.store.delete(path).await {
            Ok(()) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(ctx(format!("DELETE {what}"))(e)),
        }
    }

    /// Every blob with its size and last-modified time.
    pub async fn list_blobs(&self) -> Result<Vec<(Digest, ObjectMeta)>, ObjError> {
        let metas = self.list("blobs/sha256").await?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let rel = self.relative(&meta.location);
            match rel
                .strip_prefix("blobs/sha256/")
                .and_then(|h| Digest::from_hex(h).ok())
            {
                Some(d) => out.push((d, meta)),
                None => warn!(path = %meta.location, "ignoring an object that is not a blob"),
            }
        }
        Ok(out)
    }

    pub(super) async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, ObjError> {
        let prefix = self.path(rel);
        self.store
            .list(Some(&prefix))
            .try_collect()
            .await
            .map_err(ctx(format!("LIST {prefix}")))
    }

    /// Every object under the prefix (tests and `verify` use it).
    pub async fn list_all(&self) -> Result<Vec<ObjectMeta>, ObjError> {
        let prefix = self.path("");
        let stream = if self.prefix.is_empty() {
            self.store.list(None)
        } else {
            self.store.list(Some(&prefix))
        };
        stream
            .try_collect()
            .await
            .map_err(ctx(format!("LIST {prefix}")))
    }

    /// Whether the store refuses to create an object that already exists
    /// (`If-None-Match: *`). Some S3-compatible stores accept the header
    /// and overwrite anyway (Garage 2.5 does), which would quietly turn
    /// first-writer-wins into last-writer-wins; the server asks once at
    /// start-up with a throw-away object under `probes/` and, when the
    /// answer is no, connects without conditional writes so that every
    /// conditional path takes its documented fallback. `false` too when the
    /// client was configured without them (`AWS_CONDITIONAL_PUT=disabled`).
    pub async fn honours_conditional_create(&self, probe_id: &str) -> Result<bool, ObjError> {
        let path = self.path(&format!("probes/conditional-put/{probe_id}"));
        let create = || PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        let body = || PutPayload::from_static(b"kiln conditional-write probe");
        let first = self.store.put_opts(&path, body(), create()).await;
        let honoured = match first {
            Err(object_store::Error::NotImplemented { .. }) => return Ok(false),
            Err(e) => return Err(ctx(format!("PUT {path}"))(e)),
            Ok(_) => match self.store.put_opts(&path, body(), create()).await {
                Err(object_store::Error::AlreadyExists { .. })
                | Err(object_store::Error::Precondition { .. }) => true,
                Ok(_) => false,
                Err(e) => {
                    let _ = self.store.delete(&path).await;
                    return Err(ctx(format!("PUT {path}"))(e));
                }
            },
        };
        self.store
            .delete(&path)
            .await
            .map_err(ctx(format!("DELETE {path}")))?;
        Ok(honoured)
    }
}

/// A blob being read from the bucket.
pub struct BlobRead {
    /// Size of the whole blob.
    pub size: u64,
    /// The bytes `stream` yields (end exclusive).
    pub range: std::ops::Range<u64>,
    pub stream: BoxStream<'static, object_store::Result<Bytes>>,
}

/// An upload in progress: hashes every byte, sends full parts as they fill,
/// and completes only after the digest matched (containerd's
/// `writer.commit(expected)`). Dropped without commit, it aborts the
/// multipart upload.
pub struct BlobUpload {
    bucket: Bucket,
    expected: Digest,
    hasher: Sha256,
    size: u64,
    /// The blob is already stored: only hash.
    exists: bool,
    buffer: PutPayloadMut,
    multipart: Option<Box<dyn MultipartUpload>>,
    in_flight: FuturesUnordered<UploadPart>,
}

impl BlobUpload {
    /// Bytes received so far.
    pub fn bytes_written(&self) -> u64 {
        self.size
    }

    /// Adds bytes; sends a part when one is full, waiting when
    /// [`PARTS_IN_FLIGHT`] are already on their way (backpressure on the
    /// client instead of memory growth).
    pub async fn write(&mut self, chunk: Bytes) -> Result<(), ObjError> {
        self.hasher.update(&chunk);
        self.size += chunk.len() as u64;
        if self.exists {
            return Ok(());
        }
        self.buffer.push(chunk);
        if self.buffer.content_length() >= self.bucket.part_size {
            self.send_part().await?;
        }
        Ok(())
    }

    async fn send_part(&mut self) -> Result<(), ObjError> {
        let part = std::mem::take(&mut self.buffer).freeze();
        if self.multipart.is_none() {
            let path = self.bucket.blob_path(&self.expected);
            let upload = self
                .bucket
                .store
                .put_multipart(&path)
                .await
                .map_err(ctx(format!("starting upload of {}", self.expected)))?;
            self.multipart = Some(upload);
        }
        if let Some(upload) = &mut self.multipart {
            self.in_flight.push(upload.put_part(part));
        }
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_one().await?;
        }
        Ok(())
    }

    async fn wait_one(&mut self) -> Result<(), ObjError> {
        if let Some(result) = self.in_flight.next().await
            && let Err(e) = result
            && !self.lost_to_a_concurrent_upload().await
        {
            return Err(ctx(format!("uploading a part of {}", self.expected))(e));
        }
        Ok(())
    }

    /// After a failed part or completion: whether another upload of the
    /// same blob finished meanwhile. Some stores (Garage) drop every other
    /// multipart upload of a key when one completes (`NoSuchUpload`), so two
    /// executors pushing the same layer through two replicas would see one
    /// fail. Only verified uploads ever create a blob object, so if it is
    /// there now, it holds these bytes: give ours up and only hash the rest.
    async fn lost_to_a_concurrent_upload(&mut self) -> bool {
        if !matches!(self.bucket.blob_size(&self.expected).await, Ok(Some(_))) {
            return false;
        }
        info!(digest = %self.expected, "another upload of this blob finished first; only hashing the rest of ours");
        self.in_flight.clear();
        self.buffer = PutPayloadMut::default();
        if let Some(mut upload) = self.multipart.take() {
            // Usually already gone on the store's side; nothing to reap.
            let _ = upload.abort().await;
        }
        self.exists = true;
        true
    }

    /// Makes the blob visible under its digest if the bytes hash to it;
    /// otherwise aborts, leaving nothing in the bucket.
    pub async fn commit(mut self) -> Result<BlobCommit, ObjError> {
        let actual = Digest::from_sha256(std::mem::take(&mut self.hasher).finalize().into());
        if actual != self.expected {
            self.abort().await;
            return Err(ContractError::DigestMismatch {
                expected: self.expected.clone(),
                actual,
            }
            .into());
        }
        if self.exists {
            return Ok(BlobCommit::Existed);
        }
        let what = self.expected.to_string();
        match self.multipart.is_some() {
            false => {
                let payload = std::mem::take(&mut self.buffer).freeze();
                self.bucket
                    .store
                    .put(&self.bucket.blob_path(&self.expected), payload)
                    .await
                    .map_err(ctx(format!("PUT blob {what}")))?;
            }
            true => {
                if self.buffer.content_length() > 0 {
                    let part = std::mem::take(&mut self.buffer).freeze();
                    if let Some(upload) = &mut self.multipart {
                        self.in_flight.push(upload.put_part(part));
                    }
                }
                while !self.in_flight.is_empty() {
                    if let Err(e) = self.wait_one().await {
                        self.abort().await;
                        return Err(e);
                    }
                }
                if let Some(mut upload) = self.multipart.take()
                    && let Err(e) = upload.complete().await
                {
                    let _ = upload.abort().await;
                    if self.lost_to_a_concurrent_upload().await {
                        return Ok(BlobCommit::Existed);
                    }
                    return Err(ctx(format!("completing upload of {what}"))(e));
                }
                if self.exists {
                    return Ok(BlobCommit::Existed);
                }
            }
        }
        Ok(BlobCommit::Created)
    }

    async fn abort(&mut self) {
        self.in_flight.clear();
        if let Some(mut upload) = self.multipart.take()
            && let Err(e) = upload.abort().await
        {
            warn!(digest = %self.expected, error = %e,
                "could not abort a multipart upload; a bucket lifecycle rule will reap its parts");
        }
    }
}

impl Drop for BlobUpload {
    fn drop(&mut self) {
        // Client went away mid-upload: abort on the runtime, since Drop
        // cannot wait. Without a runtime the parts stay invisible until a
        // lifecycle rule removes them.
        if let Some(mut upload) = self.multipart.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
        {
            let digest = self.expected.clone();
            handle.spawn(async move {
                if let Err(e) = upload.abort().await {
                    warn!(%digest, error = %e, "could not abort an abandoned multipart upload");
                }
            });
        }
    }
}
