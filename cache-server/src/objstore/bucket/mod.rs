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
//!
//! Files: `names.rs` (entry objects, nonces, markers), `blobs.rs`,
//! `entries.rs`, `refs.rs` (markers, deletion intents), `lease.rs`:
//! one `impl Bucket` block each.

use std::sync::Arc;

use base64::Engine as _;
use kiln_common::{CacheKey, Digest};
use object_store::ObjectStore;
use object_store::path::Path;
use object_store::signer::Signer;

use super::ObjError;
use kiln_storage::Namespace;

mod blobs;
mod entries;
mod lease;
mod names;
mod refs;
#[cfg(test)]
mod tests;

pub use blobs::{BlobRead, BlobUpload};
use names::{B64, from_b64};
pub use names::{EntryCreate, EntryObject, RefMarker, RefNonce};

/// Smallest part S3 accepts (except the last one).
pub const MIN_PART_SIZE: usize = 5 << 20;
/// Parts of one upload sent at the same time: enough to keep a link busy,
/// few enough that an upload holds at most this many parts in memory.
const PARTS_IN_FLIGHT: usize = 2;
/// Objects deleted concurrently by GC.
const DELETE_CONCURRENCY: usize = 16;

/// One `entries/` object, from a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedEntry {
    pub ns: Namespace,
    pub key: CacheKey,
    pub last_modified_ms: u64,
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
}
