//! Names and records of the bucket layout: entry objects, write nonces,
//! reference markers.

use base64::Engine as _;
use kiln_common::{CacheEntry, CacheKey, Digest};
use serde::{Deserialize, Serialize};

use kiln_storage::Namespace;

/// An entry as stored in the bucket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct EntryObject {
    pub created_ms: u64,
    pub entry: CacheEntry,
    /// Nonce of the reference marker this write put for its blob; `None`
    /// for an entry without a layer, and for entries written before nonces
    /// existed (their marker is the legacy path without one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ref_nonce: Option<RefNonce>,
}

/// 128 random bits naming one write of an entry and its reference marker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RefNonce([u8; 16]);

impl RefNonce {
    pub fn random() -> RefNonce {
        RefNonce(rand::random())
    }
}

impl std::fmt::Display for RefNonce {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&B64.encode(self.0))
    }
}

impl std::str::FromStr for RefNonce {
    type Err = String;

    /// 22 characters of unpadded base64url, canonical: see [`from_b64`].
    fn from_str(s: &str) -> Result<RefNonce, String> {
        from_b64(s)
            .map(RefNonce)
            .ok_or_else(|| format!("{s:?} is not a marker nonce (16 bytes in unpadded base64url)"))
    }
}

/// Key and nonce in new marker names. Base64url rather than hex keeps a
/// marker key short enough for stores with tight key limits: s3s-fs,
/// which the tests run on, refuses keys over 158 bytes (its metadata file
/// name holds the key), and a 64-digit key plus a 32-digit nonce in hex
/// would not fit.
pub(super) const B64: base64::engine::GeneralPurpose =
    base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// Decodes exactly `N` bytes, accepting only the canonical spelling: a
/// marker path must print back to itself, or GC would delete a path that
/// is not the one it listed.
pub(super) fn from_b64<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes: [u8; N] = B64.decode(s).ok()?.try_into().ok()?;
    (B64.encode(bytes) == s).then_some(bytes)
}

impl TryFrom<String> for RefNonce {
    type Error = String;
    fn try_from(s: String) -> Result<RefNonce, String> {
        s.parse()
    }
}

impl From<RefNonce> for String {
    fn from(n: RefNonce) -> String {
        n.to_string()
    }
}

/// Result of [`Bucket::create_entry`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryCreate {
    Created,
    /// Someone (this or another replica) got there first with this one.
    Exists(EntryObject),
}

/// One `refs/` marker: the write `nonce` of entry `(ns, key)` names `blob`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RefMarker {
    pub blob: Digest,
    pub ns: Namespace,
    pub key: CacheKey,
    /// `None`: a legacy marker, written before nonces existed.
    pub nonce: Option<RefNonce>,
}

impl RefMarker {
    /// The marker of a new write of `(ns, key)` naming `blob`, with a
    /// fresh nonce.
    pub fn new(blob: Digest, ns: Namespace, key: CacheKey) -> RefMarker {
        RefMarker {
            blob,
            ns,
            key,
            nonce: Some(RefNonce::random()),
        }
    }

    /// The marker the write of `object` put (legacy for an entry without a
    /// nonce); `None` when the entry names no layer, so has no marker.
    pub fn of_entry(ns: &Namespace, key: &CacheKey, object: &EntryObject) -> Option<RefMarker> {
        object.entry.layer.as_ref().map(|layer| RefMarker {
            blob: layer.digest.clone(),
            ns: ns.clone(),
            key: *key,
            nonce: object.ref_nonce,
        })
    }

    /// Whether `object` (the entry now under this marker's key) is the
    /// write this marker was put for. When it is not, the marker's write
    /// lost the first-writer-wins race or its entry was removed since.
    pub fn written_for(&self, object: &EntryObject) -> bool {
        object.ref_nonce == self.nonce
            && object.entry.layer.as_ref().map(|l| &l.digest) == Some(&self.blob)
    }
}
