//! Record layouts of the index's column families (see the module
//! documentation of [`super`]).

use kiln_common::{CacheEntry, CacheKey, Digest};

use super::StoreError;
use crate::namespace::Namespace;

pub(super) const ENTRY_VALUE_VERSION: u8 = 1;
pub(super) const ENTRY_HEADER: usize = 17;

/// `[ns len][ns]`: the prefix of every entry of a namespace.
pub(super) fn ns_prefix(ns: &Namespace) -> Vec<u8> {
    let name = ns.as_str();
    let mut p = Vec::with_capacity(1 + name.len() + 32);
    p.push(name.len() as u8);
    p.extend_from_slice(name.as_bytes());
    p
}

/// `[ns len][ns][32-byte key]`: an entry's key in `entries`.
pub(super) fn index_key(ns: &Namespace, key: &CacheKey) -> Vec<u8> {
    let mut k = ns_prefix(ns);
    k.extend_from_slice(key.as_bytes());
    k
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct BlobMeta {
    pub(super) size: u64,
    pub(super) created_ms: u64,
    pub(super) accessed_ms: u64,
    pub(super) refs: u64,
}

impl BlobMeta {
    pub(super) fn encode(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        for (i, v) in [self.size, self.created_ms, self.accessed_ms, self.refs]
            .into_iter()
            .enumerate()
        {
            out[i * 8..i * 8 + 8].copy_from_slice(&v.to_be_bytes());
        }
        out
    }

    pub(super) fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        if bytes.len() != 32 {
            return Err(StoreError::Corrupt(format!(
                "blob record has {} bytes, expected 32",
                bytes.len()
            )));
        }
        let at = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&bytes[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        Ok(Self {
            size: at(0),
            created_ms: at(1),
            accessed_ms: at(2),
            refs: at(3),
        })
    }
}

pub(super) struct EntryValue {
    pub(super) created_ms: u64,
    pub(super) accessed_ms: u64,
    pub(super) entry: CacheEntry,
}

pub(super) fn encode_entry(created_ms: u64, accessed_ms: u64, json: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(ENTRY_HEADER + json.len());
    v.push(ENTRY_VALUE_VERSION);
    v.extend_from_slice(&created_ms.to_be_bytes());
    v.extend_from_slice(&accessed_ms.to_be_bytes());
    v.extend_from_slice(json);
    v
}

pub(super) fn decode_entry(bytes: &[u8]) -> Result<EntryValue, StoreError> {
    if bytes.len() < ENTRY_HEADER || bytes[0] != ENTRY_VALUE_VERSION {
        return Err(StoreError::Corrupt("entry record header".into()));
    }
    let mut b = [0u8; 8];
    b.copy_from_slice(&bytes[1..9]);
    let created_ms = u64::from_be_bytes(b);
    b.copy_from_slice(&bytes[9..17]);
    let accessed_ms = u64::from_be_bytes(b);
    let entry = serde_json::from_slice(&bytes[ENTRY_HEADER..])
        .map_err(|e| StoreError::Corrupt(format!("entry JSON: {e}")))?;
    Ok(EntryValue {
        created_ms,
        accessed_ms,
        entry,
    })
}

pub(super) fn lru_key(accessed_ms: u64, index_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + index_key.len());
    k.extend_from_slice(&accessed_ms.to_be_bytes());
    k.extend_from_slice(index_key);
    k
}

pub(super) fn digest_key(d: &Digest) -> Result<[u8; 32], StoreError> {
    let mut out = [0u8; 32];
    hex::decode_to_slice(d.hex(), &mut out)
        .map_err(|e| StoreError::Corrupt(format!("digest {d}: {e}")))?;
    Ok(out)
}

pub(super) fn digest_from_key(bytes: &[u8]) -> Result<Digest, StoreError> {
    let raw: [u8; 32] = bytes
        .try_into()
        .map_err(|_| StoreError::Corrupt("blob key is not 32 bytes".into()))?;
    Ok(Digest::from_sha256(raw))
}

pub(super) fn key_from_index_key(ik: &[u8]) -> Result<CacheKey, StoreError> {
    let raw: [u8; 32] = ik
        .get(ik.len().saturating_sub(32)..)
        .and_then(|s| s.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt("entry key too short".into()))?;
    Ok(CacheKey::from_bytes(raw))
}
