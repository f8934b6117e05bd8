//! Where a blob's bytes can be read from, as a file: the local content
//! store and OCI layout directories both are such sources, so that pushing
//! and exporting work the same from either. Kept below `oci` and `store`
//! (it depends on neither) so that neither depends on the other for it.

use std::path::PathBuf;

use kiln_common::Digest;

/// Something that holds blobs as files (the local store, an OCI layout).
pub trait BlobSource: Send + Sync {
    /// The path of the blob's bytes, if this source has it.
    fn blob_path(&self, digest: &Digest) -> Option<PathBuf>;
}
