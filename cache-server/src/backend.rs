//! The storage seam of the server: [`Backend`] is everything the HTTP API
//! ([`crate::api`]) needs from where blobs and entries live, with two
//! implementations chosen by `--storage`: [`LocalBackend`] here (the
//! RocksDB [`Store`] in `--data`) and [`crate::objstore::Replica`] (a
//! shared bucket, in `objstore/backend.rs`).
//!
//! Every implementation promises:
//! - entries are first-writer-wins per (namespace, key): [`PutOutcome`] is
//!   `Created`, `Identical` (the same entry again) or `Conflict` (a
//!   different one stays);
//! - `put_entry` refuses an entry whose blob is missing or has another size;
//! - a blob is visible under a digest only after its bytes hashed to it
//!   ([`Upload::commit`]); an upload dropped before `commit` leaves nothing
//!   behind;
//! - blob reads stream ([`BlobRead`]) and never hold a blob in memory;
//! - a namespace sees, lists and deletes only its own entries (blobs are
//!   shared: they are named by their content).
//!
//! Errors are an associated type rather than one shared enum: the two
//! backends fail in different ways (a full volume, a bucket that does not
//! answer), and `StoreError` is also the error of the executor's embedded
//! cache, so each keeps its own `thiserror` enum. Each says its
//! [`ErrorClass`] ([`Classify`], defined once in `kiln-storage`, with the
//! contract's refusals as one shared [`kiln_storage::ContractError`]); the
//! API maps a class to a status and code, and this seam knows nothing of
//! HTTP.

use std::collections::BTreeMap;
use std::future::Future;
use std::io::{self, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use kiln_common::{CacheEntry, CacheKey, Digest};
use serde::Serialize;
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;
use tracing::error;

use kiln_storage::{
    BlobCommit, Classify, EntryRecord, GcReport, Namespace, PinGuard, PutOutcome, Stats, Store,
    StoreError, VerifyReport,
};

/// Where blobs and entries live, as the HTTP API sees it.
///
/// Methods return `impl Future + Send` (not `async fn`) so that a generic
/// axum router can require its handlers' futures to be `Send`.
pub trait Backend: Send + Sync + 'static {
    type Error: Classify + std::error::Error + Send + Sync + 'static;
    type Upload: Upload<Error = Self::Error>;
    /// `POST /v1/admin/gc`'s answer.
    type GcReport: Serialize + Send + 'static;
    /// `POST /v1/admin/verify`'s answer.
    type VerifyReport: Serialize + Send + 'static;

    /// The entries present for `keys`; misses are absent.
    fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> impl Future<Output = Result<BTreeMap<CacheKey, CacheEntry>, Self::Error>> + Send;

    fn get_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> impl Future<Output = Result<Option<CacheEntry>, Self::Error>> + Send;

    /// Creates `entry` under `key` unless one is there (first writer wins).
    fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> impl Future<Output = Result<PutOutcome, Self::Error>> + Send;

    /// False when there was no entry.
    fn delete_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> impl Future<Output = Result<bool, Self::Error>> + Send;

    /// Live entries of `ns` in key order: keys whose hex starts with
    /// `prefix`, after `after`, at most `limit`.
    fn list_entries(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> impl Future<Output = Result<Vec<EntryRecord>, Self::Error>> + Send;

    fn blob_size(
        &self,
        digest: &Digest,
    ) -> impl Future<Output = Result<Option<u64>, Self::Error>> + Send;

    /// Streams the blob, or `range` of it (end exclusive, within the blob);
    /// `None` when absent.
    fn read_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> impl Future<Output = Result<Option<BlobRead>, Self::Error>> + Send;

    /// A URL the client may fetch the blob from directly, when the backend
    /// hands those out (presigned bucket URLs). The blob may be absent.
    fn blob_redirect(
        &self,
        digest: &Digest,
    ) -> impl Future<Output = Result<Option<String>, Self::Error>> + Send;

    /// Starts an upload that [`Upload::commit`] verifies against `digest`.
    fn begin_upload(
        &self,
        digest: &Digest,
    ) -> impl Future<Output = Result<Self::Upload, Self::Error>> + Send;

    fn gc(&self) -> impl Future<Output = Result<Self::GcReport, Self::Error>> + Send;

    /// Re-hashes every blob; with `repair`, removes corrupt ones and the
    /// entries naming them (and entries whose blob is missing).
    fn verify(
        &self,
        repair: bool,
    ) -> impl Future<Output = Result<Self::VerifyReport, Self::Error>> + Send;

    fn stats(&self) -> Stats;

    /// Whether the storage takes writes (for `/readyz`).
    fn ready(&self) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// A blob upload in progress. Dropping it before [`Upload::commit`] aborts
/// it: nothing becomes visible.
pub trait Upload: Send + 'static {
    type Error;

    fn write(&mut self, chunk: Bytes) -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Makes the blob visible if its bytes hash to the expected digest;
    /// returns whether it was new and how many bytes were received.
    fn commit(self) -> impl Future<Output = Result<(BlobCommit, u64), Self::Error>> + Send;
}

/// A blob being read.
pub struct BlobRead {
    /// Size of the whole blob.
    pub size: u64,
    /// The bytes `stream` yields (end exclusive).
    pub range: Range<u64>,
    pub stream: BoxStream<'static, io::Result<Bytes>>,
}

/// Runs `backend.gc()` every `interval` (never when zero), when `wakeup` is
/// notified, until `stop` changes.
pub async fn gc_loop<B: Backend>(
    backend: Arc<B>,
    interval: Duration,
    wakeup: Option<Arc<Notify>>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let periodic = async {
            if interval.is_zero() {
                std::future::pending::<()>().await
            } else {
                tokio::time::sleep(interval).await
            }
        };
        let woken = async {
            match &wakeup {
                Some(notify) => notify.notified().await,
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            () = periodic => {}
            () = woken => {}
            _ = stop.changed() => return,
        }
        if let Err(e) = backend.gc().await {
            error!(error = %e, "gc failed");
        }
    }
}

// ---- the local store ---------------------------------------------------------

/// Upload bytes handed to the writer thread at a time.
const UPLOAD_BATCH: usize = 1 << 20;
/// Size of the chunks blob bodies are read from disk in.
const CHUNK: usize = 256 << 10;

/// The local [`Store`] as a [`Backend`]: its blocking calls run on the
/// blocking pool, blob bytes go through a bounded channel to and from a
/// blocking thread doing the file I/O.
#[derive(Clone)]
pub struct LocalBackend {
    store: Store,
    /// Notified when an upload pushes the store over its size limit.
    gc_wakeup: Arc<Notify>,
}

impl LocalBackend {
    pub fn new(store: Store, gc_wakeup: Arc<Notify>) -> Self {
        Self { store, gc_wakeup }
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, StoreError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| joined(&e))?
}

fn joined(e: &tokio::task::JoinError) -> StoreError {
    StoreError::io("a store task", io::Error::other(e.to_string()))
}

impl Backend for LocalBackend {
    type Error = StoreError;
    type Upload = LocalUpload;
    type GcReport = GcReport;
    type VerifyReport = VerifyReport;

    // Point reads that almost always hit the block cache, and never wait
    // for the write lock: cheaper inline than a hop to the blocking pool.
    async fn lookup(
        &self,
        ns: &Namespace,
        keys: &[CacheKey],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, StoreError> {
        self.store.lookup(ns, keys)
    }

    async fn get_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
    ) -> Result<Option<CacheEntry>, StoreError> {
        self.store.get_entry(ns, key)
    }

    async fn put_entry(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        entry: &CacheEntry,
    ) -> Result<PutOutcome, StoreError> {
        let (store, ns, key, entry) = (self.store.clone(), ns.clone(), *key, entry.clone());
        blocking(move || store.put_entry(&ns, &key, &entry)).await
    }

    async fn delete_entry(&self, ns: &Namespace, key: &CacheKey) -> Result<bool, StoreError> {
        let (store, ns, key) = (self.store.clone(), ns.clone(), *key);
        blocking(move || store.delete_entry(&ns, &key)).await
    }

    async fn list_entries(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>, StoreError> {
        let (store, ns, prefix, after) = (
            self.store.clone(),
            ns.clone(),
            prefix.to_owned(),
            after.copied(),
        );
        blocking(move || store.list_entries(&ns, &prefix, after.as_ref(), limit)).await
    }

    async fn blob_size(&self, digest: &Digest) -> Result<Option<u64>, StoreError> {
        Ok(self.store.stat_blob(digest)?.map(|info| info.size))
    }

    async fn read_blob(
        &self,
        digest: &Digest,
        range: Option<Range<u64>>,
    ) -> Result<Option<BlobRead>, StoreError> {
        // Opening may record the access under the write lock: not inline.
        let (store, d) = (self.store.clone(), digest.clone());
        let Some(blob) = blocking(move || store.open_blob(&d)).await? else {
            return Ok(None);
        };
        let size = blob.size;
        let range = match range {
            Some(r) => r.start.min(size)..r.end.min(size),
            None => 0..size,
        };
        Ok(Some(BlobRead {
            size,
            range: range.clone(),
            stream: file_stream(blob.file, range, blob.pin),
        }))
    }

    async fn blob_redirect(&self, _digest: &Digest) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    async fn begin_upload(&self, digest: &Digest) -> Result<LocalUpload, StoreError> {
        Ok(LocalUpload::start(self, digest))
    }

    async fn gc(&self) -> Result<GcReport, StoreError> {
        let store = self.store.clone();
        blocking(move || store.gc()).await
    }

    async fn verify(&self, repair: bool) -> Result<VerifyReport, StoreError> {
        let store = self.store.clone();
        blocking(move || store.verify(repair)).await
    }

    fn stats(&self) -> Stats {
        self.store.stats()
    }

    async fn ready(&self) -> Result<(), StoreError> {
        let store = self.store.clone();
        blocking(move || store.check_writable()).await
    }
}

/// Streams `range` of `file`, read on a blocking thread. The pin travels
/// with the reader, so the blob is safe from eviction until the last byte
/// is handed over or the stream is dropped (the client went away).
fn file_stream(
    file: std::fs::File,
    range: Range<u64>,
    pin: PinGuard,
) -> BoxStream<'static, io::Result<Bytes>> {
    let (tx, rx) = mpsc::channel::<io::Result<Bytes>>(4);
    tokio::task::spawn_blocking(move || {
        let _pin = pin;
        let mut offset = range.start;
        while offset < range.end {
            let want = CHUNK.min((range.end - offset) as usize);
            let mut buf = BytesMut::zeroed(want);
            let result = file.read_at(&mut buf, offset).and_then(|n| {
                if n == 0 {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "blob file is shorter than its recorded size",
                    ))
                } else {
                    Ok(n)
                }
            });
            match result {
                Ok(n) => {
                    buf.truncate(n);
                    offset += n as u64;
                    if tx.blocking_send(Ok(buf.freeze())).is_err() {
                        return; // the stream was dropped
                    }
                }
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    Box::pin(futures::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    }))
}

/// An upload into the local store: batches of about a MiB go through a
/// bounded channel to a blocking thread writing a temporary file (one
/// thread hop per batch instead of per, often 16 KiB, chunk). The digest
/// is pinned for the upload's life, so GC cannot remove the blob between
/// its commit and the entry that follows.
pub struct LocalUpload {
    /// `Some(batch)` carries data, `None` says the body is complete. If the
    /// channel closes without `None` (this upload was dropped) the writer
    /// drops the temporary file.
    tx: Option<mpsc::Sender<Option<Vec<Bytes>>>>,
    writer: Option<JoinHandle<Result<(BlobCommit, u64), StoreError>>>,
    batch: Vec<Bytes>,
    batched: usize,
    store: Store,
    gc_wakeup: Arc<Notify>,
    _pin: PinGuard,
}

impl LocalUpload {
    fn start(backend: &LocalBackend, digest: &Digest) -> Self {
        let pin = backend.store.pin(digest);
        let (tx, mut rx) = mpsc::channel::<Option<Vec<Bytes>>>(4);
        let store = backend.store.clone();
        let expected = digest.clone();
        let writer = tokio::task::spawn_blocking(move || {
            let mut w = store.blob_writer()?;
            loop {
                match rx.blocking_recv() {
                    Some(Some(chunks)) => {
                        for chunk in chunks {
                            w.write_all(&chunk).map_err(|e| {
                                StoreError::io(format!("writing upload of {expected}"), e)
                            })?;
                        }
                    }
                    Some(None) => break,
                    None => {
                        return Err(StoreError::io(
                            format!("upload of {expected}"),
                            io::Error::new(
                                io::ErrorKind::ConnectionAborted,
                                "client aborted the upload",
                            ),
                        ));
                    }
                }
            }
            let size = w.bytes_written();
            Ok((w.commit(&expected)?, size))
        });
        LocalUpload {
            tx: Some(tx),
            writer: Some(writer),
            batch: Vec::new(),
            batched: 0,
            store: backend.store.clone(),
            gc_wakeup: backend.gc_wakeup.clone(),
            _pin: pin,
        }
    }

    async fn send(&mut self, message: Option<Vec<Bytes>>) -> Result<(), StoreError> {
        let delivered = match &self.tx {
            Some(tx) => tx.send(message).await.is_ok(),
            None => false,
        };
        if delivered {
            return Ok(());
        }
        // The writer stopped early (e.g. a full disk): its error says why.
        self.tx = None;
        Err(match self.writer.take() {
            Some(writer) => match writer.await {
                Ok(Err(e)) => e,
                Ok(Ok(_)) => StoreError::io(
                    "an upload",
                    io::Error::other("the writer finished before the upload did"),
                ),
                Err(e) => joined(&e),
            },
            None => StoreError::io("an upload", io::Error::other("the writer already failed")),
        })
    }
}

impl Upload for LocalUpload {
    type Error = StoreError;

    async fn write(&mut self, chunk: Bytes) -> Result<(), StoreError> {
        self.batched += chunk.len();
        self.batch.push(chunk);
        if self.batched >= UPLOAD_BATCH {
            self.batched = 0;
            let batch = std::mem::take(&mut self.batch);
            self.send(Some(batch)).await?;
        }
        Ok(())
    }

    async fn commit(mut self) -> Result<(BlobCommit, u64), StoreError> {
        if !self.batch.is_empty() {
            let batch = std::mem::take(&mut self.batch);
            self.send(Some(batch)).await?;
        }
        self.send(None).await?;
        self.tx = None;
        let result = match self.writer.take() {
            Some(writer) => writer.await.map_err(|e| joined(&e))?,
            None => Err(StoreError::io(
                "an upload",
                io::Error::other("the writer already failed"),
            )),
        };
        if result.is_ok() && self.store.over_limit() {
            self.gc_wakeup.notify_one();
        }
        result
    }
}
