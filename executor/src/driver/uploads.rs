//! Background uploads to the cache: the layers of steps that ran, base
//! layers and documents pulled from a registry, layer images.
//!
//! Promises: the execute phase hands an upload over and goes on; nothing
//! here blocks a step. Without a cache, or with a cache mode that does not
//! write, handing over an entry does nothing. The build waits for every
//! upload before it reports and before the cache is closed; a failed upload
//! is a warning (the image is complete without it), never a failed build.

use std::path::PathBuf;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use kiln_common::{CacheEntry, CacheKey, Digest};

use crate::cache::{Cache, CacheError};
use crate::log::Logger;

/// What a finished background upload reports.
#[derive(Debug, Clone, Copy)]
pub(super) struct UploadDone {
    pub(super) key: CacheKey,
    pub(super) bytes: u64,
    pub(super) millis: u64,
}

type Running = JoinHandle<Result<UploadDone, CacheError>>;

/// The uploads of one driver (a build, or one stage's worker).
pub(super) struct Uploader {
    /// The cache to write to; `None` when the build does not write one.
    cache: Option<Arc<dyn Cache>>,
    log: Logger,
    running: Vec<Running>,
    done: Vec<UploadDone>,
}

impl Uploader {
    pub(super) fn new(cache: Option<Arc<dyn Cache>>, writes: bool, log: Logger) -> Self {
        Uploader {
            cache: cache.filter(|_| writes),
            log,
            running: Vec::new(),
            done: Vec::new(),
        }
    }

    /// An uploader for a stage's worker: the same cache, nothing running.
    pub(super) fn for_worker(&self, log: Logger) -> Self {
        Uploader {
            cache: self.cache.clone(),
            log,
            running: Vec::new(),
            done: Vec::new(),
        }
    }

    /// The cache this uploader writes to, if any: for a job of
    /// [`Uploader::spawn`] that does its own writing.
    pub(super) fn cache(&self) -> Option<Arc<dyn Cache>> {
        self.cache.clone()
    }

    /// From now on, hands nothing more to the cache (it did not answer the
    /// lookup); uploads already running finish.
    pub(super) fn stop_writing(&mut self) {
        self.cache = None;
    }

    /// Puts `blob` (digest and file), then the entry for `key`, in the
    /// background.
    pub(super) fn upload(
        &mut self,
        key: CacheKey,
        entry: CacheEntry,
        blob: Option<(Digest, PathBuf)>,
    ) {
        let Some(cache) = self.cache.clone() else {
            return;
        };
        self.spawn(move || {
            let started = Instant::now();
            let mut bytes = 0;
            if let Some((digest, path)) = &blob {
                cache.put_blob(digest, path)?;
                bytes = std::fs::metadata(path).map(|m| m.len()).unwrap_or(0);
            }
            cache.put_entry(&key, &entry)?;
            Ok(UploadDone {
                key,
                bytes,
                millis: started.elapsed().as_millis() as u64,
            })
        });
    }

    /// Runs `job` in the background as one of this driver's uploads (work
    /// that must finish before the build ends, such as hashing a layer
    /// image before it is shared).
    pub(super) fn spawn(
        &mut self,
        job: impl FnOnce() -> Result<UploadDone, CacheError> + Send + 'static,
    ) {
        self.running.push(std::thread::spawn(job));
    }

    /// Takes over the uploads a stage's worker left running.
    pub(super) fn adopt(&mut self, worker: &mut Uploader) {
        self.running.append(&mut worker.running);
        self.done.append(&mut worker.done);
    }

    /// Waits for every running upload; returns the bytes they uploaded.
    pub(super) fn wait(&mut self) -> u64 {
        let mut total = 0;
        for handle in std::mem::take(&mut self.running) {
            match handle.join() {
                Ok(Ok(done)) => {
                    total += done.bytes;
                    self.done.push(done);
                }
                Ok(Err(e)) => self
                    .log
                    .warn(&format!("uploading to the cache failed: {e}")),
                Err(_) => self.log.warn("a cache upload panicked"),
            }
        }
        total
    }

    /// The uploads that finished, in the order they were waited for.
    pub(super) fn done(&self) -> &[UploadDone] {
        &self.done
    }
}
