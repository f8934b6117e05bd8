//! Reference markers (which entry write names which blob) and GC's
//! deletion intents.

use futures::StreamExt;
use kiln_common::{CacheKey, Digest};
use object_store::path::Path;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tracing::warn;

use super::ObjError;

use super::*;

impl Bucket {
    /// Records that a write of the entry `(ns, key)` names `blob`; GC
    /// keeps a blob while any marker for it exists.
    pub async fn put_ref(&self, marker: &RefMarker) -> Result<(), ObjError> {
        let RefMarker { blob, key, .. } = marker;
        self.store
            .put(&self.ref_path(marker), PutPayload::new())
            .await
            .map_err(ctx(format!("PUT reference {blob} <- {key}")))?;
        Ok(())
    }

    /// Removes exactly this marker (this nonce), if it is there; another
    /// write's marker for the same entry and blob stays.
    pub async fn delete_ref(&self, marker: &RefMarker) -> Result<bool, ObjError> {
        let RefMarker { blob, key, .. } = marker;
        self.delete(
            &self.ref_path(marker),
            &format!("reference {blob} <- {key}"),
        )
        .await
    }

    /// Whether any marker names `blob` (one LIST, at most one page).
    pub async fn has_refs(&self, blob: &Digest) -> Result<bool, ObjError> {
        let prefix = self.path(&format!("refs/{}", blob.hex()));
        let first = self.store.list(Some(&prefix)).next().await;
        match first {
            None => Ok(false),
            Some(Ok(_)) => Ok(true),
            Some(Err(e)) => Err(ctx(format!("LIST {prefix}"))(e)),
        }
    }

    /// Every marker, with its last-modified time.
    pub async fn list_refs(&self) -> Result<Vec<(RefMarker, u64)>, ObjError> {
        self.list_refs_under("refs").await
    }

    /// The markers naming `blob`, with their last-modified times.
    pub async fn list_refs_of(&self, blob: &Digest) -> Result<Vec<(RefMarker, u64)>, ObjError> {
        self.list_refs_under(&format!("refs/{}", blob.hex())).await
    }

    pub(super) async fn list_refs_under(
        &self,
        rel: &str,
    ) -> Result<Vec<(RefMarker, u64)>, ObjError> {
        let metas = self.list(rel).await?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let rel = self.relative(&meta.location);
            let parsed = rel.strip_prefix("refs/").and_then(|rest| {
                let mut parts = rest.split('/');
                let blob = Digest::from_hex(parts.next()?).ok()?;
                let ns = parse_ns(parts.next()?)?;
                let last = parts.next()?;
                let (key, nonce) = match last.split_once('.') {
                    Some((key, nonce)) => (
                        CacheKey::from_bytes(from_b64(key)?),
                        Some(nonce.parse::<RefNonce>().ok()?),
                    ),
                    None => (last.parse::<CacheKey>().ok()?, None),
                };
                parts.next().is_none().then_some(RefMarker {
                    blob,
                    ns,
                    key,
                    nonce,
                })
            });
            match parsed {
                Some(marker) => {
                    out.push((marker, meta.last_modified.timestamp_millis().max(0) as u64))
                }
                None => warn!(path = %meta.location, "ignoring an object that is not a reference"),
            }
        }
        Ok(out)
    }

    /// Deletes many objects concurrently, counting the ones that existed.
    pub async fn delete_many(&self, paths: Vec<Path>) -> Result<u64, ObjError> {
        let results: Vec<Result<bool, ObjError>> = futures::stream::iter(paths)
            .map(|p| async move {
                let what = p.to_string();
                self.delete(&p, &what).await
            })
            .buffer_unordered(DELETE_CONCURRENCY)
            .collect()
            .await;
        let mut n = 0;
        for r in results {
            n += u64::from(r?);
        }
        Ok(n)
    }

    pub fn ref_marker_path(&self, marker: &RefMarker) -> Path {
        self.ref_path(marker)
    }

    /// Announces that GC is about to delete `blob` (see
    /// [`crate::objstore::replica`] for the protocol).
    pub async fn put_doomed(&self, blob: &Digest) -> Result<(), ObjError> {
        self.store
            .put(&self.doomed_path(blob), PutPayload::new())
            .await
            .map_err(ctx(format!("PUT deletion intent for {blob}")))?;
        Ok(())
    }

    pub async fn delete_doomed(&self, blob: &Digest) -> Result<bool, ObjError> {
        self.delete(
            &self.doomed_path(blob),
            &format!("deletion intent for {blob}"),
        )
        .await
    }

    /// When GC announced the deletion of `blob`, if it did.
    pub async fn doomed_since(&self, blob: &Digest) -> Result<Option<u64>, ObjError> {
        match self.store.head(&self.doomed_path(blob)).await {
            Ok(meta) => Ok(Some(meta.last_modified.timestamp_millis().max(0) as u64)),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(ctx(format!("HEAD deletion intent for {blob}"))(e)),
        }
    }

    /// Every deletion intent with its time (to clear ones a crashed GC left).
    pub async fn list_doomed(&self) -> Result<Vec<(Path, u64)>, ObjError> {
        Ok(self
            .list("gc/doomed")
            .await?
            .into_iter()
            .map(|m| (m.location, m.last_modified.timestamp_millis().max(0) as u64))
            .collect())
    }
}
