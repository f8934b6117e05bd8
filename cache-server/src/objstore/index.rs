//! A replica's local index cache: RocksDB in `<data>/replica-index` holding
//! the entries this replica has seen in the bucket, plus an in-memory record
//! of recent misses.
//!
//! It is only a cache: everything in it can be fetched again from the
//! bucket, so writes skip fsync and a lost or deleted directory costs a few
//! GETs, never data. It promises:
//! - a cached entry remembers when it was last confirmed in the bucket, so
//!   the replica can re-check it after `hit_recheck` (entries removed by GC
//!   through another replica stop being served within that time);
//! - a miss is remembered for `miss_recheck`, so a hot missing key costs at
//!   most one bucket GET per that interval.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;

use kiln_common::CacheKey;
use rocksdb::{DB, Options, WriteBatch};

use super::ObjError;
use super::bucket::EntryObject;
use kiln_storage::Namespace;

/// Misses remembered at most; past that the record starts over (a few
/// extra GETs), so memory stays bounded however many keys are asked for.
const MAX_REMEMBERED_MISSES: usize = 100_000;
const HEADER: usize = 8;

/// An entry from the local cache and when the bucket last confirmed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cached {
    pub confirmed_ms: u64,
    pub object: EntryObject,
}

/// The local index cache of one replica.
pub struct LocalIndex {
    db: DB,
    misses: Mutex<HashMap<Vec<u8>, u64>>,
}

fn index_key(ns: &Namespace, key: &CacheKey) -> Vec<u8> {
    let ns = ns.as_str().as_bytes();
    let mut k = Vec::with_capacity(1 + ns.len() + 32);
    k.push(ns.len() as u8);
    k.extend_from_slice(ns);
    k.extend_from_slice(key.as_bytes());
    k
}

impl LocalIndex {
    /// Opens (creating) the cache in `dir`.
    pub fn open(dir: &Path) -> Result<LocalIndex, ObjError> {
        let mut options = Options::default();
        options.create_if_missing(true);
        options.set_keep_log_file_num(2);
        options.set_max_total_wal_size(16 << 20);
        options.set_write_buffer_size(8 << 20);
        let db = DB::open(&options, dir)?;
        Ok(LocalIndex {
            db,
            misses: Mutex::new(HashMap::new()),
        })
    }

    /// The cached entries for `keys`, in order.
    pub fn get(&self, ns: &Namespace, keys: &[CacheKey]) -> Result<Vec<Option<Cached>>, ObjError> {
        let ks: Vec<Vec<u8>> = keys.iter().map(|k| index_key(ns, k)).collect();
        let mut out = Vec::with_capacity(keys.len());
        for value in self.db.multi_get(&ks) {
            out.push(match value? {
                // A record we cannot read is as good as absent: the bucket
                // has the truth.
                Some(raw) => decode(&raw),
                None => None,
            });
        }
        Ok(out)
    }

    /// Remembers `object` as confirmed in the bucket at `confirmed_ms`.
    pub fn put(
        &self,
        ns: &Namespace,
        key: &CacheKey,
        object: &EntryObject,
        confirmed_ms: u64,
    ) -> Result<(), ObjError> {
        let ik = index_key(ns, key);
        let json = serde_json::to_vec(object).map_err(|e| ObjError::Corrupt {
            path: "replica-index".into(),
            message: e.to_string(),
        })?;
        let mut value = Vec::with_capacity(HEADER + json.len());
        value.extend_from_slice(&confirmed_ms.to_be_bytes());
        value.extend_from_slice(&json);
        self.db.put(&ik, value)?;
        lock(&self.misses).remove(&ik);
        Ok(())
    }

    /// Forgets `key` (deleted or evicted in the bucket).
    pub fn remove(&self, ns: &Namespace, key: &CacheKey) -> Result<(), ObjError> {
        self.db.delete(index_key(ns, key))?;
        Ok(())
    }

    /// Forgets many keys at once (after a GC pass).
    pub fn remove_many<'a>(
        &self,
        keys: impl IntoIterator<Item = (&'a Namespace, &'a CacheKey)>,
    ) -> Result<(), ObjError> {
        let mut batch = WriteBatch::default();
        for (ns, key) in keys {
            batch.delete(index_key(ns, key));
        }
        self.db.write(batch)?;
        Ok(())
    }

    /// When the bucket last said `key` is absent, if remembered.
    pub fn miss_checked(&self, ns: &Namespace, key: &CacheKey) -> Option<u64> {
        lock(&self.misses).get(&index_key(ns, key)).copied()
    }

    /// Records that the bucket had no entry for `key` at `checked_ms`.
    pub fn record_miss(&self, ns: &Namespace, key: &CacheKey, checked_ms: u64) {
        let mut misses = lock(&self.misses);
        if misses.len() >= MAX_REMEMBERED_MISSES {
            misses.clear();
        }
        misses.insert(index_key(ns, key), checked_ms);
    }
}

fn decode(raw: &[u8]) -> Option<Cached> {
    let header: [u8; HEADER] = raw.get(..HEADER)?.try_into().ok()?;
    let object = serde_json::from_slice(&raw[HEADER..]).ok()?;
    Some(Cached {
        confirmed_ms: u64::from_be_bytes(header),
        object,
    })
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // The map is a hint; a panic mid-update leaves it usable.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::CacheEntry;
    use std::collections::BTreeMap;

    fn object(by: &str) -> EntryObject {
        EntryObject {
            created_ms: 5,
            entry: CacheEntry {
                layer: None,
                created_by: by.into(),
                created: "2026-11-24T12:00:00Z".into(),
                extra: BTreeMap::new(),
            },
            ref_nonce: None,
        }
    }

    #[test]
    fn cached_entries_survive_reopening_and_namespaces_are_apart() {
        let dir = tempfile::tempdir().unwrap();
        let (ns, other) = (Namespace::default(), Namespace::new("b").unwrap());
        let key = CacheKey::from_bytes([3; 32]);
        {
            let index = LocalIndex::open(dir.path()).unwrap();
            index.put(&ns, &key, &object("RUN x"), 42).unwrap();
        }
        let index = LocalIndex::open(dir.path()).unwrap();
        let got = index
            .get(&ns, &[key, CacheKey::from_bytes([4; 32])])
            .unwrap();
        assert_eq!(
            got,
            vec![
                Some(Cached {
                    confirmed_ms: 42,
                    object: object("RUN x")
                }),
                None
            ]
        );
        assert_eq!(index.get(&other, &[key]).unwrap(), vec![None]);
        index.remove(&ns, &key).unwrap();
        assert_eq!(index.get(&ns, &[key]).unwrap(), vec![None]);
    }

    #[test]
    fn a_recorded_miss_is_forgotten_when_the_entry_arrives() {
        let dir = tempfile::tempdir().unwrap();
        let index = LocalIndex::open(dir.path()).unwrap();
        let (ns, key) = (Namespace::default(), CacheKey::from_bytes([1; 32]));
        assert_eq!(index.miss_checked(&ns, &key), None);
        index.record_miss(&ns, &key, 7);
        assert_eq!(index.miss_checked(&ns, &key), Some(7));
        index.put(&ns, &key, &object("RUN y"), 8).unwrap();
        assert_eq!(index.miss_checked(&ns, &key), None);
    }
}
