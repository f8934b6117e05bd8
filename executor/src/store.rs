//! The executor's local content store: blobs by digest under
//! `<dir>/blobs/sha256/<aa>/<hex>`, where pulled base-image blobs and built
//! layers land so that a second build does not download them again.
//!
//! It is [`kiln_storage::ContentStore`], the one content store of kiln (the
//! cache server's and the embedded cache's blobs live in the same kind of
//! tree): bytes stream into a temporary file in `<dir>/tmp` while their
//! sha256 is computed, and [`BlobWriter::commit`] fsyncs and renames the
//! file to its final name only if the digest (and size, when given) match.
//! A blob is never visible under its digest while partial, and a dropped
//! writer leaves nothing behind. A blob whose bytes already sit in a file on
//! the same filesystem (the embedded cache's copy) is hard-linked in by
//! [`LocalStore::link_from`], never copied. This module adds what only the
//! executor needs: the store as a [`BlobSource`] for exports.

use std::path::PathBuf;

use kiln_common::Digest;

use crate::blobs::BlobSource;

pub use kiln_storage::content::{
    BlobWriter, ContentError as StoreError, ContentStore as LocalStore,
};

impl BlobSource for LocalStore {
    fn blob_path(&self, digest: &Digest) -> Option<PathBuf> {
        let p = self.path(digest);
        p.is_file().then_some(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_blob_is_a_blob_source_and_a_missing_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let store = LocalStore::new(dir.path()).unwrap();
        let d = store.put_bytes(b"layer").unwrap();
        assert_eq!(BlobSource::blob_path(&store, &d), Some(store.path(&d)));
        assert_eq!(
            BlobSource::blob_path(&store, &Digest::of_bytes(b"none")),
            None
        );
    }
}
