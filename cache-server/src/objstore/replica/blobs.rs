//! Blob reads, presigned URLs and uploads, straight to the bucket.

use kiln_common::Digest;

use crate::objstore::ObjError;
use crate::objstore::bucket::{BlobRead, BlobUpload};

use super::*;

impl Replica {
    pub async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, ObjError> {
        self.bucket.blob_size(digest).await
    }

    pub async fn get_blob(
        &self,
        digest: &Digest,
        range: Option<std::ops::Range<u64>>,
    ) -> Result<Option<BlobRead>, ObjError> {
        self.bucket.get_blob(digest, range).await
    }

    pub async fn blob_upload(&self, expected: &Digest) -> Result<BlobUpload, ObjError> {
        self.bucket.blob_upload(expected).await
    }

    /// A signed URL for the blob when redirects are configured.
    pub async fn presigned_get(&self, digest: &Digest) -> Result<Option<String>, ObjError> {
        match self.config.presign {
            Some(ttl) => self.bucket.presigned_get(digest, ttl).await,
            None => Ok(None),
        }
    }
}
