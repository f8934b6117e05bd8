//! Entry objects: first-writer-wins creation, reads, listings, deletes.

use kiln_common::CacheKey;
use object_store::{ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload};
use tracing::warn;

use super::ObjError;
use kiln_storage::Namespace;

use super::*;

impl Bucket {
    /// The entry object under `key`, or `None`.
    pub async fn read_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<Option<EntryObject>, ObjError> {
        let path = self.entry_path(ns, key);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(ctx(format!("GET entry {key}")))?,
            Err(e) if is_not_found(&e) => return Ok(None),
            Err(e) => return Err(ctx(format!("GET entry {key}"))(e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ObjError::Corrupt {
                path: path.to_string(),
                message: e.to_string(),
            })
    }

    /// Whether the entry object still exists (cheap revalidation).
    pub async fn entry_exists(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, ObjError> {
        match self.store.head(&self.entry_path(ns, key)).await {
            Ok(_) => Ok(true),
            Err(e) if is_not_found(&e) => Ok(false),
            Err(e) => Err(ctx(format!("HEAD entry {key}"))(e)),
        }
    }

    /// Creates the entry object unless one exists (first writer wins
    /// across replicas).
    pub async fn create_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        object: &EntryObject,
    ) -> Result<EntryCreate, ObjError> {
        let path = self.entry_path(ns, key);
        let body = serde_json::to_vec(object).map_err(|e| ObjError::Corrupt {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        let create = PutOptions {
            mode: PutMode::Create,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body.clone()), create)
            .await
        {
            Ok(_) => Ok(EntryCreate::Created),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => self.existing(ns, key).await,
            Err(object_store::Error::NotImplemented { .. }) => {
                // No conditional writes on this store: check, write, then
                // read back, so that of two writers whose writes both
                // landed before the read-backs, both agree on the object
                // that stayed. Only a writer whose PUT lands after the
                // other's read-back can still be told "created" wrongly.
                if let Some(existing) = self.read_entry(ns, key).await? {
                    return Ok(EntryCreate::Exists(existing));
                }
                self.store
                    .put(&path, PutPayload::from(body))
                    .await
                    .map_err(ctx(format!("PUT entry {key}")))?;
                match self.read_entry(ns, key).await? {
                    Some(stayed) if stayed != *object => Ok(EntryCreate::Exists(stayed)),
                    _ => Ok(EntryCreate::Created),
                }
            }
            Err(e) => Err(ctx(format!("PUT entry {key}"))(e)),
        }
    }

    pub(super) async fn existing(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<EntryCreate, ObjError> {
        match self.read_entry(ns, key).await? {
            Some(existing) => Ok(EntryCreate::Exists(existing)),
            // Deleted between our failed create and the read (GC): the
            // caller may simply try again.
            None => Err(ObjError::Conflict(format!(
                "entry {key} changed while it was being written; try again"
            ))),
        }
    }

    /// Removes an entry object; false when it was already gone.
    pub async fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, ObjError> {
        self.delete(&self.entry_path(ns, key), &format!("entry {key}"))
            .await
    }

    /// Every entry object with its last-modified time (its creation: entry
    /// objects are never rewritten).
    pub async fn list_entries(&self) -> Result<Vec<ListedEntry>, ObjError> {
        let metas = self.list("entries").await?;
        let mut out = Vec::with_capacity(metas.len());
        for meta in metas {
            let rel = self.relative(&meta.location);
            let parsed = rel.strip_prefix("entries/").and_then(|rest| {
                let (ns, key) = rest.split_once('/')?;
                Some((parse_ns(ns)?, key.parse::<CacheKey>().ok()?))
            });
            match parsed {
                Some((ns, key)) => out.push(ListedEntry {
                    ns,
                    key,
                    last_modified_ms: meta.last_modified.timestamp_millis().max(0) as u64,
                }),
                None => warn!(path = %meta.location, "ignoring an object that is not an entry"),
            }
        }
        Ok(out)
    }
}
