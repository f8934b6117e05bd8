//! The admin walks of a replica over the bucket: one page of a namespace's
//! entries (`GET /v1/admin/entries`) and re-hashing every blob
//! (`POST /v1/admin/verify`), answering with the same JSON as the local
//! store.
//!
//! A page lists only from where it starts (`list_with_offset`, S3's
//! `start-after`), relying on S3 listing keys in UTF-8 binary order, so it
//! costs one LIST page and a GET per entry, not a listing of the bucket.
//! Verification streams every blob through sha256 (never in memory).
//! Repairing deletes, so it runs only under the GC lease: verification and
//! GC never delete from the bucket at the same time.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use kiln_common::{CacheKey, Digest};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tracing::{info, warn};

use super::bucket::EntryObject;
use super::replica::GC_LEASE;
use super::{ObjError, Replica};
use kiln_storage::{EntryRecord, Namespace, VerifyReport, now_ms};

/// Entry objects read at the same time.
const ENTRY_READS: usize = 32;
/// Blobs hashed at the same time.
const BLOB_READS: usize = 4;

/// The digest a blob's bytes hash to, and how many there were.
type Rehash = (Digest, u64);

/// What a verification did: the local store's report, or that another
/// replica holds the GC lease and this one did nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaVerifyReport {
    /// In the bucket, `quarantined` means corrupt blobs were deleted (a
    /// bucket has no quarantine), and `missing` lists blobs that entries
    /// name but the bucket does not have.
    #[serde(flatten)]
    pub report: VerifyReport,
    /// False when a repair was asked for while another replica held the GC
    /// lease: nothing was checked. A dry run needs no lease (true).
    pub lease_held: bool,
}

impl Replica {
    /// Live entries of `ns` in key order whose hex starts with `prefix`,
    /// after `after`, at most `limit`. The bucket keeps no last-use time:
    /// `last_access_ms` is the entry's creation time, the age GC evicts by.
    pub async fn list_entry_page(
        &self,
        ns: &Namespace,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<Vec<EntryRecord>, ObjError> {
        let prefix = prefix.to_ascii_lowercase();
        let bucket = self.bucket();
        let dir = bucket.entries_dir(ns);
        // The offset is exclusive: one character short of a full-length
        // prefix still lists the key equal to it.
        let from_prefix = (!prefix.is_empty()).then(|| prefix[..prefix.len().min(63)].to_owned());
        let start = from_prefix.max(after.map(CacheKey::to_hex));
        let mut listing = match &start {
            Some(start) => bucket
                .object_store()
                .list_with_offset(Some(&dir), &dir.clone().join(start.as_str())),
            None => bucket.object_store().list(Some(&dir)),
        };
        let ttl = self.config().entry_ttl.map(|t| t.as_millis() as u64);
        let now = now_ms();
        let mut out = Vec::new();
        let mut exhausted = false;
        while out.len() < limit && !exhausted {
            let mut keys = Vec::new();
            while keys.len() < limit - out.len() {
                let Some(meta) = listing.next().await else {
                    exhausted = true;
                    break;
                };
                let meta = meta.map_err(|source| ObjError::Store {
                    context: format!("LIST {dir}"),
                    source,
                })?;
                let Some(key) = meta
                    .location
                    .filename()
                    .and_then(|name| name.parse::<CacheKey>().ok())
                else {
                    warn!(path = %meta.location, "ignoring an object that is not an entry");
                    continue;
                };
                // Stores that ignore the offset list from the start.
                if after.is_some_and(|a| key <= *a) {
                    continue;
                }
                let hex = key.to_hex();
                if !hex.starts_with(&prefix) {
                    if hex.as_str() > prefix.as_str() {
                        exhausted = true;
                        break;
                    }
                    continue;
                }
                keys.push(key);
            }
            let read: Vec<(CacheKey, Result<Option<EntryObject>, ObjError>)> =
                futures::stream::iter(keys)
                    .map(|key| async move { (key, bucket.read_entry(ns, &key).await) })
                    .buffered(ENTRY_READS)
                    .collect()
                    .await;
            for (key, object) in read {
                match object {
                    Ok(Some(object))
                        if ttl.is_none_or(|ttl| now.saturating_sub(object.created_ms) <= ttl) =>
                    {
                        out.push(EntryRecord {
                            key,
                            created_ms: object.created_ms,
                            last_access_ms: object.created_ms,
                            entry: object.entry,
                        });
                    }
                    // Deleted since the listing, or expired.
                    Ok(_) => {}
                    Err(ObjError::Corrupt { path, message }) => {
                        warn!(%path, %message, "not listing an unreadable entry object");
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(out)
    }

    /// Re-hashes every blob in the bucket and reports corrupt ones and
    /// blobs that entries name but the bucket lacks. With `repair` (only
    /// as the GC lease holder) corrupt blobs are deleted, and so are the
    /// entries naming them or a missing blob.
    pub async fn verify(&self, repair: bool) -> Result<ReplicaVerifyReport, ObjError> {
        if !repair {
            return Ok(ReplicaVerifyReport {
                report: self.verify_pass(false).await?,
                lease_held: true,
            });
        }
        let bucket = self.bucket();
        let ttl = self.config().lease_ttl;
        // A holder name of its own: this replica's GC loop then sees the
        // lease taken and skips its pass instead of running alongside.
        let holder = format!(
            "{}/verify-{:08x}",
            self.config().holder,
            rand::random::<u32>()
        );
        if !bucket.acquire_lease(GC_LEASE, &holder, ttl).await? {
            info!("verify skipped: another replica holds the GC lease");
            return Ok(ReplicaVerifyReport::default());
        }
        // Hashing a large bucket can outlast the lease: renew it meanwhile.
        let keep_lease = async {
            let every = (ttl / 3).max(Duration::from_secs(1));
            loop {
                tokio::time::sleep(every).await;
                // A renewal that hangs must not let verification run on
                // past the lease, alongside the GC of whoever takes it.
                let renewed =
                    tokio::time::timeout(every, bucket.acquire_lease(GC_LEASE, &holder, ttl))
                        .await
                        .map_err(|_| {
                            ObjError::Conflict(
                            "renewing the GC lease did not finish in time; stopping verification"
                                .into(),
                        )
                        })??;
                if !renewed {
                    return Err::<(), _>(ObjError::Conflict(
                        "the GC lease expired and another replica took it; stopping verification"
                            .into(),
                    ));
                }
            }
        };
        let result = tokio::select! {
            result = self.verify_pass(true) => result,
            Err(e) = keep_lease => Err(e),
        };
        if let Err(e) = bucket.release_lease(GC_LEASE, &holder).await {
            warn!(error = %e, "could not release the GC lease; it expires by itself");
        }
        let report = result?;
        info!(?report, "verify finished");
        Ok(ReplicaVerifyReport {
            report,
            lease_held: true,
        })
    }

    async fn verify_pass(&self, repair: bool) -> Result<VerifyReport, ObjError> {
        let bucket = self.bucket();
        let mut report = VerifyReport {
            quarantined: repair,
            ..Default::default()
        };
        // Blobs before entries: an entry names a blob that existed when it
        // was created, so one listed after the blobs may name a blob that
        // is only new; that is confirmed below before it counts as missing.
        let blobs = bucket.list_blobs().await?;
        let listed: HashSet<Digest> = blobs.iter().map(|(d, _)| d.clone()).collect();
        let hashed: Vec<(Digest, Result<Option<Rehash>, ObjError>)> = futures::stream::iter(blobs)
            .map(|(digest, _)| async move {
                let result = self.hash_blob(&digest).await;
                (digest, result)
            })
            .buffer_unordered(BLOB_READS)
            .collect()
            .await;
        for (digest, result) in hashed {
            // None: deleted since the listing (GC), nothing to check.
            let Some((actual, bytes)) = result? else {
                continue;
            };
            report.blobs_checked += 1;
            report.bytes_checked += bytes;
            if actual != digest {
                warn!(%digest, %actual, "blob content does not match its digest");
                report.corrupt.push(digest);
            }
        }
        report.corrupt.sort();

        let entries = bucket.list_entries().await?;
        let read: Vec<(Namespace, CacheKey, Result<Option<EntryObject>, ObjError>)> =
            futures::stream::iter(entries)
                .map(|e| async move {
                    let object = bucket.read_entry(&e.ns, &e.key).await;
                    (e.ns, e.key, object)
                })
                .buffer_unordered(ENTRY_READS)
                .collect()
                .await;
        let mut naming: HashMap<Digest, Vec<(Namespace, CacheKey)>> = HashMap::new();
        for (ns, key, object) in read {
            match object {
                Ok(Some(object)) => {
                    if let Some(layer) = object.entry.layer {
                        naming.entry(layer.digest).or_default().push((ns, key));
                    }
                }
                Ok(None) => {}
                Err(ObjError::Corrupt { path, message }) => {
                    warn!(%path, %message, "skipping an unreadable entry object");
                }
                Err(e) => return Err(e),
            }
        }
        for (digest, names) in &naming {
            if listed.contains(digest) || bucket.blob_size(digest).await?.is_some() {
                continue;
            }
            let mut still = false;
            for (ns, key) in names {
                still |= bucket.entry_exists(ns, key).await?;
            }
            if still {
                report.missing.push(digest.clone());
            }
        }
        report.missing.sort();

        if repair {
            report.entries_dropped = self.drop_bad(&report, &naming).await?;
        }
        Ok(report)
    }

    /// The sha256 and length of a stored blob, streamed; `None` when absent.
    async fn hash_blob(&self, digest: &Digest) -> Result<Option<Rehash>, ObjError> {
        let Some(read) = self.bucket().get_blob(digest, None).await? else {
            return Ok(None);
        };
        let mut hasher = Sha256::new();
        let mut bytes = 0u64;
        let mut stream = read.stream.map_err(|source| ObjError::Store {
            context: format!("reading blob {digest}"),
            source,
        });
        while let Some(chunk) = stream.try_next().await? {
            hasher.update(&chunk);
            bytes += chunk.len() as u64;
        }
        Ok(Some((Digest::from_sha256(hasher.finalize().into()), bytes)))
    }

    /// Deletes corrupt blobs and the entries naming them or a missing
    /// blob; returns how many entries went. A corrupt blob is announced
    /// like a GC deletion first (see [`crate::objstore::replica`]), so no
    /// writer creates a new entry for it meanwhile, and its reference
    /// markers are listed after that to find entries created since the
    /// entry listing.
    async fn drop_bad(
        &self,
        report: &VerifyReport,
        naming: &HashMap<Digest, Vec<(Namespace, CacheKey)>>,
    ) -> Result<u64, ObjError> {
        let bucket = self.bucket();
        let mut dropped = 0;
        for digest in &report.missing {
            // Pushed again since it was found missing: its entries are fine.
            if bucket.blob_size(digest).await?.is_some() {
                continue;
            }
            for (ns, key) in naming.get(digest).into_iter().flatten() {
                dropped += u64::from(self.drop_entry_naming(ns, key, digest).await?);
            }
        }
        if report.corrupt.is_empty() {
            return Ok(dropped);
        }
        // One blob at a time, intent first and its markers listed after
        // it: a writer honours an intent only while it is younger than the
        // lease TTL, so an intent written long before its blob's turn (many
        // corrupt blobs, a slow store) would let a new entry slip past.
        for digest in &report.corrupt {
            bucket.put_doomed(digest).await?;
            let result = async {
                let mut candidates: HashSet<(Namespace, CacheKey)> =
                    naming.get(digest).into_iter().flatten().cloned().collect();
                candidates.extend(
                    bucket
                        .list_refs_of(digest)
                        .await?
                        .into_iter()
                        .map(|(m, _)| (m.ns, m.key)),
                );
                let mut gone = 0;
                for (ns, key) in &candidates {
                    gone += u64::from(self.drop_entry_naming(ns, key, digest).await?);
                }
                // Entries first: no entry may name a blob that is gone.
                bucket.delete_blob(digest).await?;
                warn!(%digest, "deleted a corrupt blob from the bucket");
                Ok::<u64, ObjError>(gone)
            }
            .await;
            // Withdrawn even after a failure: a leftover intent would make
            // writers refuse this blob until it goes stale.
            if let Err(e) = bucket.delete_doomed(digest).await {
                warn!(%digest, error = %e, "could not withdraw a deletion intent; it goes stale by itself");
            }
            dropped += result?;
        }
        Ok(dropped)
    }

    /// Deletes the entry under `key` if it (still) names `digest`: a marker
    /// may be left over from a writer whose entry names another blob.
    async fn drop_entry_naming(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        digest: &Digest,
    ) -> Result<bool, ObjError> {
        let names_it = self
            .bucket()
            .read_entry(ns, key)
            .await?
            .and_then(|o| o.entry.layer)
            .is_some_and(|layer| layer.digest == *digest);
        if !names_it {
            return Ok(false);
        }
        Replica::delete_entry(self, ns, key).await
    }
}
