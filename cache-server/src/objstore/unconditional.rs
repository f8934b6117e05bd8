//! A store whose conditional writes kiln does not rely on.

use std::ops::Range;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMode, PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions,
};

/// A store whose conditional writes are not to be relied on (the start-up
/// probe found it overwriting, or could not tell): a conditional put
/// (`PutMode::Create` or `Update`) answers `NotImplemented` without a
/// request, which sends every caller in [`bucket`] down its documented
/// fallback, as `AWS_CONDITIONAL_PUT=disabled` does for S3. Everything else
/// goes to the store unchanged.
#[derive(Debug)]
pub(super) struct WithoutConditionalWrites(pub(super) Arc<dyn ObjectStore>);

impl std::fmt::Display for WithoutConditionalWrites {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (without conditional writes)", self.0)
    }
}

/// What object_store's `#[async_trait]` methods return.
type BoxFut<'a, T> =
    Pin<Box<dyn std::future::Future<Output = object_store::Result<T>> + Send + 'a>>;

// The trait is declared with `#[async_trait]`; its methods are written out
// here in that macro's expanded form, each handing the inner store's own
// boxed future back.
impl ObjectStore for WithoutConditionalWrites {
    fn put_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> BoxFut<'async_trait, PutResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        if let PutMode::Create | PutMode::Update(_) = opts.mode {
            let refused = object_store::Error::NotImplemented {
                operation: format!("`put_opts` with mode `{:?}`", opts.mode),
                implementer: self.to_string(),
            };
            return Box::pin(std::future::ready(Err(refused)));
        }
        self.0.put_opts(location, payload, opts)
    }

    fn put_multipart_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        opts: PutMultipartOptions,
    ) -> BoxFut<'async_trait, Box<dyn MultipartUpload>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.put_multipart_opts(location, opts)
    }

    fn get_opts<'life0, 'life1, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        options: GetOptions,
    ) -> BoxFut<'async_trait, GetResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.get_opts(location, options)
    }

    fn get_ranges<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        location: &'life1 Path,
        ranges: &'life2 [Range<u64>],
    ) -> BoxFut<'async_trait, Vec<Bytes>>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.get_ranges(location, ranges)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, object_store::Result<Path>>,
    ) -> BoxStream<'static, object_store::Result<Path>> {
        self.0.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list(prefix)
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
        self.0.list_with_offset(prefix, offset)
    }

    fn list_with_delimiter<'life0, 'life1, 'async_trait>(
        &'life0 self,
        prefix: Option<&'life1 Path>,
    ) -> BoxFut<'async_trait, ListResult>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        Self: 'async_trait,
    {
        self.0.list_with_delimiter(prefix)
    }

    fn copy_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: CopyOptions,
    ) -> BoxFut<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.copy_opts(from, to, options)
    }

    fn rename_opts<'life0, 'life1, 'life2, 'async_trait>(
        &'life0 self,
        from: &'life1 Path,
        to: &'life2 Path,
        options: RenameOptions,
    ) -> BoxFut<'async_trait, ()>
    where
        'life0: 'async_trait,
        'life1: 'async_trait,
        'life2: 'async_trait,
        Self: 'async_trait,
    {
        self.0.rename_opts(from, to, options)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objstore::{Bucket, DEFAULT_PART_SIZE};
    use kiln_common::Digest;
    use object_store::memory::InMemory;
    use std::time::Duration;

    #[tokio::test]
    async fn without_conditional_writes_conditional_puts_take_the_fallback() {
        let inner: Arc<dyn ObjectStore> = Arc::new(InMemory::new());
        let plain = Bucket::new(inner.clone(), "p", DEFAULT_PART_SIZE);
        assert!(plain.honours_conditional_create("probe").await.unwrap());
        let off = Bucket::new(
            Arc::new(WithoutConditionalWrites(inner.clone())),
            "p",
            DEFAULT_PART_SIZE,
        );
        assert!(!off.honours_conditional_create("probe").await.unwrap());
        // Plain writes, reads, listings and multipart uploads pass through.
        let payload = bytes::Bytes::from_static(b"layer");
        let digest = Digest::of_bytes(&payload);
        let mut upload = off.blob_upload(&digest).await.unwrap();
        upload.write(payload).await.unwrap();
        upload.commit().await.unwrap();
        assert_eq!(off.blob_size(&digest).await.unwrap(), Some(5));
        assert_eq!(off.list_blobs().await.unwrap().len(), 1);
        assert!(
            off.acquire_lease("gc", "r1", Duration::from_secs(60))
                .await
                .unwrap()
        );
        assert!(off.delete_blob(&digest).await.unwrap());
    }
}
