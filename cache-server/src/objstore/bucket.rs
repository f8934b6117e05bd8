//! The cache's layout in one bucket (under an optional prefix) and the
//! object operations the replicas build on.
//!
//! ```text
//! blobs/sha256/<hex>                        blob bytes, only ever complete and verified
//! entries/<ns>/<key hex>                    {"createdMs": N, "entry": {...}, "refNonce": "<nonce>"}
//! refs/<blob hex>/<ns>/<key b64>.<nonce>    empty: "write <nonce> of this entry names this blob"
//! leases/gc                                 {"holder": "...", "expiresMs": N}
//! gc/doomed/<blob hex>                      empty: GC is about to delete this blob
//! ```
//! `<ns>` is the namespace, or `_` for the default one (a namespace never
//! starts with `_`). `<nonce>` is 128 random bits, new for every write of
//! an entry, so two writes of one key never share a marker and GC can
//! tell the marker of the entry that is there from the marker of one that
//! went (see [`crate::objstore::replica`]). In marker names the key and
//! the nonce are unpadded base64url (43 and 22 characters), which keeps
//! them short (see [`B64`]). Buckets written before nonces existed hold
//! entries without `refNonce` and markers named
//! `refs/<blob hex>/<ns>/<key hex>`: both are still read ("legacy").
//!
//! Promises:
//! - a blob object exists under a digest only if its bytes hash to it: the
//!   upload is hashed while it streams and is only made visible (single PUT,
//!   or `CompleteMultipartUpload`) after the digest matched; a mismatch
//!   aborts the multipart upload, whose parts S3 never lists;
//! - entries are created with `PutMode::Create` (`If-None-Match: *`), so the
//!   first writer across all replicas wins; on a store without conditional
//!   writes (`AWS_CONDITIONAL_PUT=disabled`) it falls back to read-then-put,
//!   which has a window in which two different entries race and the last
//!   one stays (documented in docs/object-storage.md);
//! - the GC lease is taken and renewed with conditional writes too.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use futures::stream::{BoxStream, FuturesUnordered};
use futures::{StreamExt, TryStreamExt};
use kiln_common::{CacheEntry, CacheKey, Digest};
use object_store::path::Path;
use object_store::signer::Signer;
use object_store::{
    GetOptions, GetRange, MultipartUpload, ObjectMeta, ObjectStore, ObjectStoreExt, PutMode,
    PutOptions, PutPayload, PutPayloadMut, UpdateVersion, UploadPart,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::ObjError;
use kiln_storage::{BlobCommit, ContractError, Namespace, now_ms};

/// Smallest part S3 accepts (except the last one).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Parts of one upload sent at the same time: enough to keep a link busy,
/// few enough that an upload holds at most this many parts in memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Objects deleted concurrently by GC.
const DELETE_CONCURRENCY: usize = 16;

/// An entry as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryObject {
    pub created_ms: u64,
    pub entry: CacheEntry,
    /// Nonce of the reference marker this write put for its blob; `None`
    /// for an entry without a layer, and for entries written before nonces
    /// existed (their marker is the legacy path without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_nonce: Option<RefNonce>,
}

/// 128 random bits naming one write of an entry and its reference marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RefNonce([u8; 16]);

impl RefNonce {
    pub fn random() -> RefNonce {
        RefNonce(rand::random())
    }
}

impl std::fmt::Display for RefNonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl std::str::FromStr for RefNonce {
    type Err = String;

    /// 22 characters of unpadded base64url, canonical: see [`from_b64`].
    fn from_str(s: &str) -> Result<RefNonce, String> {
        from_b64(s)
            .map(RefNonce)
            .ok_or_else(|| format!("{s:?} is not a marker nonce (16 bytes in unpadded base64url)"))
    }
}

/// Key and nonce in new marker names. Base64url rather than hex keeps a
/// marker key short enough for stores with tight key limits: s3s-fs,
/// which the tests run on, refuses keys over 158 bytes (its metadata file
/// name holds the key), and a 64-digit key plus a 32-digit nonce in hex
/// would not fit.
const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Decodes exactly `N` bytes, accepting only the canonical spelling: a
/// marker path must print back to itself, or GC would delete a path that
/// is not the one it listed.
fn from_b64<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes: [u8; N] = B64.decode(s).ok()?.try_into().ok()?;
    (B64.encode(bytes) == s).then_some(bytes)
}

impl TryFrom<String> for RefNonce {
    type Error = String;
    fn try_from(s: String) -> Result<RefNonce, String> {
        s.parse()
    }
}

impl From<RefNonce> for String {
    fn from(n: RefNonce) -> String {
        n.to_string()
    }
}

/// Result of [`Bucket::create_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryCreate {
    Created,
    /// Someone (this or another replica) got there first with this one.
    Exists(EntryObject),
}

/// One `refs/` marker: the write `nonce` of entry `(ns, key)` names `blob`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefMarker {
    pub blob: Digest,
    pub ns: Namespace,
    pub key: CacheKey,
    /// `None`: a legacy marker, written before nonces existed.
    pub nonce: Option<RefNonce>,
}

impl RefMarker {
    /// The marker of a new write of `(ns, key)` naming `blob`, with a
    /// fresh nonce.
    pub fn new(blob: Digest, ns: Namespace, key: CacheKey) -> RefMarker {
        RefMarker {
            blob,
            ns,
            key,
            nonce: Some(RefNonce::random()),
        }
    }

    /// The marker the write of `object` put (legacy for an entry without a
    /// nonce); `None` when the entry names no layer, so has no marker.
    pub fn of_entry(ns: &Namespace, key: &CacheKey, object: &EntryObject) -> Option<RefMarker> {
        object.entry.layer.as_ref().map(|layer| RefMarker {
            blob: layer.digest.clone(),
            ns: ns.clone(),
            key: *key,
            nonce: object.ref_nonce,
        })
    }

    /// Whether `object` (the entry now under this marker's key) is the
    /// write this marker was put for. When it is not, the marker's write
    /// lost the first-writer-wins race or its entry was removed since.
    pub fn written_for(&self, object: &EntryObject) -> bool {
        object.ref_nonce == self.nonce
            && object.entry.layer.as_ref().map(|l| &l.digest) == Some(&self.blob)
    }
}

/// One `entries/` object, from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedEntry {
    pub ns: Namespace,
    pub key: CacheKey,
    pub last_modified_ms: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseBody {
    holder: String,
    expires_ms: u64,
}

/// The bucket, its prefix, and how uploads are cut into parts.
#[derive(Clone)]
pub struct Bucket {
    store: Arc<dyn ObjectStore>,
    prefix: String,
    signer: Option<Arc<dyn Signer>>,
    part_size: usize,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("store", &self.store.to_string())
            .field("prefix", &self.prefix)
            .field("part_size", &self.part_size)
            .finish()
    }
}

fn ns_segment(ns: &Namespace) -> &str {
    if ns.as_str().is_empty() {
        "_"
    } else {
        ns.as_str()
    }
}

fn parse_ns(segment: &str) -> Option<Namespace> {
    if segment == "_" {
        Some(Namespace::default())
    } else {
        Namespace::new(segment).ok()
    }
}

fn ctx(context: impl Into<String>) -> impl FnOnce(object_store::Error) -> ObjError {
    let context = context.into();
    move |source| ObjError::Store { context, source }
}

fn is_not_found(e: &object_store::Error) -> bool {
    matches!(e, object_store::Error::NotFound { .. })
}

impl Bucket {
    /// `prefix` is a `/`-separated path inside the bucket ("" for its root).
    pub fn new(store: Arc<dyn ObjectStore>, prefix: &str, part_size: usize) -> Bucket {
        Bucket {
            store,
            prefix: prefix.trim_matches('/').to_owned(),
            signer: None,
            part_size: part_size.max(MIN_PART_SIZE),
        }
    }

    /// Lets [`Bucket::presigned_get`] hand out URLs signed by `signer`.
    pub fn with_signer(mut self, signer: Arc<dyn Signer>) -> Bucket {
        self.signer = Some(signer);
        self
    }

    fn path(&self, rel: &str) -> Path {
        if self.prefix.is_empty() {
            Path::from(rel)
        } else {
            Path::from(format!("{}/{rel}", self.prefix))
        }
    }

    /// Path relative to the prefix, for parsing listings.
    fn relative<'a>(&self, location: &'a Path) -> &'a str {
        let full = location.as_ref();
        if self.prefix.is_empty() {
            full
        } else {
            full.strip_prefix(self.prefix.as_str())
                .and_then(|r| r.strip_prefix('/'))
                .unwrap_or(full)
        }
    }

    pub fn blob_path(&self, digest: &Digest) -> Path {
        self.path(&format!("blobs/sha256/{}", digest.hex()))
    }

    pub fn entry_path(&self, ns: &Namespace, key: &CacheKey) -> Path {
        self.path(&format!("entries/{}/{}", ns_segment(ns), key.to_hex()))
    }

    /// The "directory" of one namespace's entry objects, for listings
    /// paged elsewhere (`admin.rs`).
    pub(crate) fn entries_dir(&self, ns: &Namespace) -> Path {
        self.path(&format!("entries/{}", ns_segment(ns)))
    }

    /// The object store underneath, for listings paged elsewhere.
    pub(crate) fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    fn ref_path(&self, marker: &RefMarker) -> Path {
        let RefMarker {
            blob,
            ns,
            key,
            nonce,
        } = marker;
        // `<key>.<nonce>`, one name, rather than `<key>/<nonce>`: a
        // file-backed store (s3s-fs, MinIO in FS mode) would otherwise make
        // a directory for every key.
        let name = match nonce {
            Some(nonce) => format!("{}.{nonce}", B64.encode(key.as_bytes())),
            None => key.to_hex(),
        };
        self.path(&format!("refs/{}/{}/{name}", blob.hex(), ns_segment(ns)))
    }

    fn lease_path(&self, name: &str) -> Path {
        self.path(&format!("leases/{name}"))
    }

    fn doomed_path(&self, blob: &Digest) -> Path {
        self.path(&format!("gc/doomed/{}", blob.hex()))
    }

    // ---- blobs ---------------------------------------------------------

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

    async fn delete(&self, path: &Path, what: &str) -> Result<bool, ObjError> {
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

    async fn list(&self, rel: &str) -> Result<Vec<ObjectMeta>, ObjError> {
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

    // ---- entries -------------------------------------------------------

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

    async fn existing(&self, ns: &Namespace, key: &CacheKey) -> Result<EntryCreate, ObjError> {
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

    // ---- reference markers ---------------------------------------------

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

    async fn list_refs_under(&self, rel: &str) -> Result<Vec<(RefMarker, u64)>, ObjError> {
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

    // ---- deletion intents ------------------------------------------------

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

    // ---- leases ----------------------------------------------------------

    /// Takes or renews the lease `name` for `holder` until now + `ttl`.
    /// True when `holder` holds it afterwards. Conditional writes make two
    /// replicas that race for an expired lease end with exactly one holder.
    pub async fn acquire_lease(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<bool, ObjError> {
        let path = self.lease_path(name);
        let now = now_ms();
        let body = serde_json::to_vec(&LeaseBody {
            holder: holder.to_owned(),
            expires_ms: now + ttl.as_millis() as u64,
        })
        .map_err(|e| ObjError::Corrupt {
            path: path.to_string(),
            message: e.to_string(),
        })?;
        let mode = match self.store.get(&path).await {
            Err(e) if is_not_found(&e) => PutMode::Create,
            Err(e) => return Err(ctx(format!("GET lease {name}"))(e)),
            Ok(result) => {
                let version = UpdateVersion {
                    e_tag: result.meta.e_tag.clone(),
                    version: result.meta.version.clone(),
                };
                let bytes = result
                    .bytes()
                    .await
                    .map_err(ctx(format!("GET lease {name}")))?;
                // An unreadable lease is treated as expired: GC must not
                // stop forever because of one bad object.
                let current: Option<LeaseBody> = serde_json::from_slice(&bytes).ok();
                if let Some(current) = &current
                    && current.holder != holder
                    && current.expires_ms > now
                {
                    return Ok(false);
                }
                PutMode::Update(version)
            }
        };
        let options = PutOptions {
            mode,
            ..Default::default()
        };
        match self
            .store
            .put_opts(&path, PutPayload::from(body.clone()), options)
            .await
        {
            Ok(_) => Ok(true),
            Err(object_store::Error::AlreadyExists { .. })
            | Err(object_store::Error::Precondition { .. }) => Ok(false),
            Err(object_store::Error::NotImplemented { .. }) => {
                // No conditional writes: the check above is all we have;
                // docs/object-storage.md says to name one GC replica then.
                self.store
                    .put(&path, PutPayload::from(body))
                    .await
                    .map_err(ctx(format!("PUT lease {name}")))?;
                Ok(true)
            }
            Err(e) => Err(ctx(format!("PUT lease {name}"))(e)),
        }
    }

    /// Gives the lease up if `holder` has it (best effort).
    pub async fn release_lease(&self, name: &str, holder: &str) -> Result<(), ObjError> {
        let path = self.lease_path(name);
        let bytes = match self.store.get(&path).await {
            Ok(result) => result
                .bytes()
                .await
                .map_err(ctx(format!("GET lease {name}")))?,
            Err(e) if is_not_found(&e) => return Ok(()),
            Err(e) => return Err(ctx(format!("GET lease {name}"))(e)),
        };
        let ours = serde_json::from_slice::<LeaseBody>(&bytes).is_ok_and(|l| l.holder == holder);
        if ours {
            self.delete(&path, &format!("lease {name}")).await?;
        }
        Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;
    use object_store::memory::InMemory;
    use std::collections::BTreeMap;

    fn bucket() -> (Bucket, Arc<InMemory>) {
        let mem = Arc::new(InMemory::new());
        (Bucket::new(mem.clone(), "cache/v1", MIN_PART_SIZE), mem)
    }

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn entry(by: &str) -> EntryObject {
        EntryObject {
            created_ms: 1,
            entry: CacheEntry {
                layer: None,
                created_by: by.into(),
                created: "2026-11-24T12:00:00Z".into(),
                extra: BTreeMap::new(),
            },
            ref_nonce: None,
        }
    }

    fn pseudo_random(len: usize) -> Vec<u8> {
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    async fn upload(b: &Bucket, expected: &Digest, data: &[u8]) -> Result<BlobCommit, ObjError> {
        let mut up = b.blob_upload(expected).await?;
        for chunk in data.chunks(64 << 10) {
            up.write(Bytes::copy_from_slice(chunk)).await?;
        }
        up.commit().await
    }

    #[tokio::test]
    async fn the_conditional_write_probe_says_yes_for_a_store_that_refuses_overwrites_and_leaves_nothing()
     {
        let (b, _) = bucket();
        assert!(b.honours_conditional_create("r1-probe").await.unwrap());
        assert!(b.list_all().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn small_and_multipart_blobs_round_trip_under_their_digest() {
        let (b, _) = bucket();
        for len in [0, 1000, MIN_PART_SIZE * 2 + 12345] {
            let data = pseudo_random(len);
            let d = Digest::of_bytes(&data);
            assert_eq!(upload(&b, &d, &data).await.unwrap(), BlobCommit::Created);
            assert_eq!(b.blob_size(&d).await.unwrap(), Some(len as u64));
            let read = b.get_blob(&d, None).await.unwrap().unwrap();
            let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
            assert_eq!(got.concat(), data);
            assert_eq!(upload(&b, &d, &data).await.unwrap(), BlobCommit::Existed);
        }
        let (d, meta) = &b.list_blobs().await.unwrap()[0];
        assert!(meta.location.as_ref().starts_with("cache/v1/blobs/sha256/"));
        assert!(b.blob_size(d).await.unwrap().is_some());
    }

    #[tokio::test]
    async fn a_digest_mismatch_leaves_no_object_at_all() {
        let (b, mem) = bucket();
        for len in [10, MIN_PART_SIZE * 2 + 1] {
            let data = pseudo_random(len);
            let wrong = Digest::of_bytes(b"something else");
            let err = upload(&b, &wrong, &data).await.unwrap_err();
            assert!(
                matches!(
                    err,
                    ObjError::Contract(ContractError::DigestMismatch { .. })
                ),
                "{err}"
            );
        }
        let all: Vec<ObjectMeta> = mem.list(None).try_collect().await.unwrap();
        assert!(all.is_empty(), "{all:?}");
    }

    #[tokio::test]
    async fn an_existing_blob_still_refuses_wrong_bytes() {
        let (b, _) = bucket();
        let data = pseudo_random(100);
        let d = Digest::of_bytes(&data);
        upload(&b, &d, &data).await.unwrap();
        let err = upload(&b, &d, b"not it").await.unwrap_err();
        assert!(matches!(
            err,
            ObjError::Contract(ContractError::DigestMismatch { .. })
        ));
    }

    #[tokio::test]
    async fn ranges_are_served_from_the_object() {
        let (b, _) = bucket();
        let data = pseudo_random(1000);
        let d = Digest::of_bytes(&data);
        upload(&b, &d, &data).await.unwrap();
        let read = b.get_blob(&d, Some(10..20)).await.unwrap().unwrap();
        assert_eq!((read.size, read.range.clone()), (1000, 10..20));
        let got: Vec<Bytes> = read.stream.try_collect().await.unwrap();
        assert_eq!(got.concat(), &data[10..20]);
        assert!(
            b.get_blob(&Digest::of_bytes(b"x"), None)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn the_first_entry_written_wins_and_later_ones_see_it() {
        let (b, _) = bucket();
        let ns = Namespace::default();
        assert_eq!(
            b.create_entry(&ns, &key(1), &entry("first")).await.unwrap(),
            EntryCreate::Created
        );
        assert_eq!(
            b.create_entry(&ns, &key(1), &entry("second"))
                .await
                .unwrap(),
            EntryCreate::Exists(entry("first"))
        );
        assert_eq!(
            b.read_entry(&ns, &key(1)).await.unwrap(),
            Some(entry("first"))
        );
        let other = Namespace::new("team-a").unwrap();
        assert_eq!(b.read_entry(&other, &key(1)).await.unwrap(), None);
        let listed = b.list_entries().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!((listed[0].ns.clone(), listed[0].key), (ns, key(1)));
    }

    #[tokio::test]
    async fn reference_markers_list_and_parse_back() {
        let (b, mem) = bucket();
        let d = Digest::of_bytes(b"blob");
        let ns = Namespace::new("team-a").unwrap();
        assert!(!b.has_refs(&d).await.unwrap());
        let first = RefMarker::new(d.clone(), ns.clone(), key(7));
        let second = RefMarker::new(d.clone(), ns.clone(), key(7));
        assert_ne!(first.nonce, second.nonce, "every write has its own nonce");
        b.put_ref(&first).await.unwrap();
        b.put_ref(&second).await.unwrap();
        assert!(b.has_refs(&d).await.unwrap());
        let mut listed: Vec<RefMarker> = b
            .list_refs()
            .await
            .unwrap()
            .into_iter()
            .map(|(m, _)| m)
            .collect();
        listed.sort_by_key(|m| m.nonce.map(|n| n.to_string()));
        let mut expected = vec![first.clone(), second.clone()];
        expected.sort_by_key(|m| m.nonce.map(|n| n.to_string()));
        assert_eq!(listed, expected);
        let nonce = first.nonce.unwrap();
        assert_eq!(
            b.ref_marker_path(&first).as_ref(),
            format!(
                "cache/v1/refs/{}/team-a/{}.{nonce}",
                d.hex(),
                "BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc"
            )
        );
        assert_eq!(nonce.to_string().len(), 22);

        // Deleting one write's marker leaves the other write's.
        b.delete_ref(&first).await.unwrap();
        assert!(b.has_refs(&d).await.unwrap());
        b.delete_ref(&second).await.unwrap();
        assert!(!b.has_refs(&d).await.unwrap());

        // A marker of the previous version (no nonce) still parses, and
        // objects that are no marker are skipped.
        let legacy = format!("cache/v1/refs/{}/_/{}", d.hex(), key(8).to_hex());
        mem.put(&Path::from(legacy.as_str()), PutPayload::new())
            .await
            .unwrap();
        let junk = format!("cache/v1/refs/{}/_/{}.NOTHEX", d.hex(), key(8).to_hex());
        mem.put(&Path::from(junk.as_str()), PutPayload::new())
            .await
            .unwrap();
        let listed = b.list_refs().await.unwrap();
        assert_eq!(listed.len(), 1, "{listed:?}");
        let legacy_marker = RefMarker {
            blob: d.clone(),
            ns: Namespace::default(),
            key: key(8),
            nonce: None,
        };
        assert_eq!(listed[0].0, legacy_marker);
        assert_eq!(b.ref_marker_path(&legacy_marker).as_ref(), legacy);
    }

    #[test]
    fn entry_objects_record_their_marker_nonce_and_old_ones_still_read() {
        let d = Digest::of_bytes(b"layer");
        let mut object = entry("RUN x");
        object.entry.layer = Some(kiln_common::LayerDescriptor {
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
            digest: d.clone(),
            size: 5,
            diff_id: d.clone(),
        });
        let marker = RefMarker::new(d.clone(), Namespace::default(), key(1));
        object.ref_nonce = marker.nonce;
        let json: serde_json::Value = serde_json::to_value(&object).unwrap();
        assert_eq!(json["refNonce"], marker.nonce.unwrap().to_string());
        assert!(marker.written_for(&object));
        assert_eq!(
            RefMarker::of_entry(&Namespace::default(), &key(1), &object),
            Some(marker.clone())
        );

        // As the previous version wrote it: no nonce, a legacy marker.
        let mut old = json.clone();
        old.as_object_mut().unwrap().remove("refNonce");
        let old: EntryObject = serde_json::from_value(old).unwrap();
        assert_eq!(old.ref_nonce, None);
        assert!(!marker.written_for(&old));
        let legacy = RefMarker::of_entry(&Namespace::default(), &key(1), &old).unwrap();
        assert_eq!(legacy.nonce, None);
        assert!(legacy.written_for(&old));
        assert!(!legacy.written_for(&object));

        // The last one spells 16 zero bytes with non-zero padding bits:
        // not the canonical name, so not a nonce.
        let bad_values = ["", "00", "!!!!!!!!!!!!!!!!!!!!!!", "AAAAAAAAAAAAAAAAAAAAAB"];
        for bad in bad_values {
            assert!(bad.parse::<RefNonce>().is_err(), "{bad:?}");
        }
        let mut bad = json;
        bad["refNonce"] = "xyz".into();
        assert!(serde_json::from_value::<EntryObject>(bad).is_err());
    }

    #[tokio::test]
    async fn a_lease_has_one_holder_until_it_expires_or_is_released() {
        let (b, _) = bucket();
        let ttl = Duration::from_secs(60);
        assert!(b.acquire_lease("gc", "a", ttl).await.unwrap());
        assert!(!b.acquire_lease("gc", "b", ttl).await.unwrap());
        assert!(b.acquire_lease("gc", "a", ttl).await.unwrap(), "renewal");
        b.release_lease("gc", "b").await.unwrap();
        assert!(
            !b.acquire_lease("gc", "b", ttl).await.unwrap(),
            "not b's to release"
        );
        b.release_lease("gc", "a").await.unwrap();
        assert!(b.acquire_lease("gc", "b", ttl).await.unwrap());
        // An expired lease goes to whoever asks next.
        assert!(b.acquire_lease("gc2", "a", Duration::ZERO).await.unwrap());
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(b.acquire_lease("gc2", "b", ttl).await.unwrap());
    }
}
