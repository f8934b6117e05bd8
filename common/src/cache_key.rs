//! Cache keys: what a build step's output depends on, hashed.
//!
//! A key is a blake3 hash in derive-key mode, so its context string both
//! versions the scheme (bump [`KEY_SCHEME`] and every old key misses) and
//! separates it from any other blake3 use. Inputs go through
//! [`CacheKeyBuilder`], which frames each one as
//! `tag, name length, name, value length, value`: two different input lists
//! can never produce the same byte stream, so they can never collide short of
//! breaking blake3. The builder also remembers each input by name, so a build
//! report can show why a key changed.
//!
//! This module owns the hashing; which inputs a build step's key has, and
//! the exact text of each, is decided in one place, the executor's `keys`
//! module, whose pinned vectors also pin this framing.

use std::fmt;
use std::str::FromStr;

/// Context string of the key derivation; changing it invalidates every key.
pub const KEY_SCHEME: &str = "kiln 2026-11 build step cache key v1";

/// A 32-byte blake3 cache key, shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey([u8; 32]);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cache key {0:?} must be 64 lowercase hex characters")]
pub struct MalformedCacheKey(pub String);

impl CacheKey {
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CacheKey({})", self.to_hex())
    }
}

impl FromStr for CacheKey {
    type Err = MalformedCacheKey;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower_hex = s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !lower_hex {
            return Err(MalformedCacheKey(s.to_owned()));
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| MalformedCacheKey(s.to_owned()))?;
        Ok(Self(out))
    }
}

impl serde::Serialize for CacheKey {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for CacheKey {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// The type tag written before each input, part of the framing.
#[derive(Clone, Copy)]
#[repr(u8)]
enum Tag {
    Str = 1,
    Bytes = 2,
    U64 = 3,
    Bool = 4,
    Key = 5,
    Digest = 6,
    List = 7,
    Pair = 8,
}

/// One input as it went into a key, for reports ("why did this step miss?").
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct KeyInput {
    pub name: String,
    pub value: String,
}

/// Builds a [`CacheKey`] from named, typed inputs. Order matters: the same
/// inputs in another order give another key, so callers add them in a fixed
/// order.
#[derive(Clone)]
pub struct CacheKeyBuilder {
    hasher: blake3::Hasher,
    inputs: Vec<KeyInput>,
}

impl Default for CacheKeyBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl CacheKeyBuilder {
    pub fn new() -> Self {
        Self {
            hasher: blake3::Hasher::new_derive_key(KEY_SCHEME),
            inputs: Vec::new(),
        }
    }

    fn frame(&mut self, tag: Tag, name: &str, value: &[u8]) {
        self.hasher.update(&[tag as u8]);
        self.hasher.update(&(name.len() as u64).to_le_bytes());
        self.hasher.update(name.as_bytes());
        self.hasher.update(&(value.len() as u64).to_le_bytes());
        self.hasher.update(value);
    }

    fn remember(&mut self, name: &str, shown: String) {
        self.inputs.push(KeyInput {
            name: name.to_owned(),
            value: shown,
        });
    }

    pub fn str(mut self, name: &str, value: &str) -> Self {
        self.frame(Tag::Str, name, value.as_bytes());
        self.remember(name, value.to_owned());
        self
    }

    /// Raw bytes; the report shows their blake3 hash, never the bytes, so a
    /// secret-derived input cannot leak through it.
    pub fn bytes(mut self, name: &str, value: &[u8]) -> Self {
        self.frame(Tag::Bytes, name, value);
        self.remember(name, format!("blake3:{}", blake3::hash(value).to_hex()));
        self
    }

    pub fn u64(mut self, name: &str, value: u64) -> Self {
        self.frame(Tag::U64, name, &value.to_le_bytes());
        self.remember(name, value.to_string());
        self
    }

    pub fn bool(mut self, name: &str, value: bool) -> Self {
        self.frame(Tag::Bool, name, &[value as u8]);
        self.remember(name, value.to_string());
        self
    }

    pub fn key(mut self, name: &str, value: &CacheKey) -> Self {
        self.frame(Tag::Key, name, value.as_bytes());
        self.remember(name, value.to_hex());
        self
    }

    /// A digest, hashed as `algorithm:hex` (written out here, not taken
    /// from `Display`, so the key cannot follow a change of how digests
    /// are shown).
    pub fn digest(mut self, name: &str, value: &crate::Digest) -> Self {
        let text = format!("{}:{}", value.algorithm(), value.hex());
        self.frame(Tag::Digest, name, text.as_bytes());
        self.remember(name, value.to_string());
        self
    }

    /// An ordered list of strings; framed as a count then each element, so
    /// `["a,b"]` and `["a", "b"]` differ.
    pub fn list<S: AsRef<str>>(mut self, name: &str, items: &[S]) -> Self {
        self.frame(Tag::List, name, &(items.len() as u64).to_le_bytes());
        for item in items {
            let item = item.as_ref().as_bytes();
            self.hasher.update(&(item.len() as u64).to_le_bytes());
            self.hasher.update(item);
        }
        let shown: Vec<&str> = items.iter().map(AsRef::as_ref).collect();
        self.remember(name, format!("{shown:?}"));
        self
    }

    /// Ordered key/value pairs (environment, build args). Callers sort them
    /// when their order carries no meaning.
    pub fn pairs<K: AsRef<str>, V: AsRef<str>>(mut self, name: &str, pairs: &[(K, V)]) -> Self {
        self.frame(Tag::Pair, name, &(pairs.len() as u64).to_le_bytes());
        let mut shown = Vec::with_capacity(pairs.len());
        for (k, v) in pairs {
            for part in [k.as_ref().as_bytes(), v.as_ref().as_bytes()] {
                self.hasher.update(&(part.len() as u64).to_le_bytes());
                self.hasher.update(part);
            }
            shown.push(format!("{}={}", k.as_ref(), v.as_ref()));
        }
        self.remember(name, shown.join(" "));
        self
    }

    /// The inputs added so far, in order.
    pub fn inputs(&self) -> &[KeyInput] {
        &self.inputs
    }

    pub fn finish(&self) -> CacheKey {
        CacheKey(*self.hasher.finalize().as_bytes())
    }

    /// The key and the named inputs that made it.
    pub fn finish_with_inputs(self) -> (CacheKey, Vec<KeyInput>) {
        (CacheKey(*self.hasher.finalize().as_bytes()), self.inputs)
    }
}

/// The key of an artifact derived from one layer (for `"erofs"`: the
/// layer's mountable image, docs/cache-api.md): the layer's diff_id, since
/// the artifact depends only on the uncompressed content (the gzip and zstd
/// forms of a layer share it), and the artifact's format version, so that a
/// new writer never reads an old format. The first input's name is one no
/// step key starts with, so the two kinds of keys never meet.
pub fn derived_artifact_key(kind: &str, diff_id: &crate::Digest, format_version: u64) -> CacheKey {
    CacheKeyBuilder::new()
        .str("derived artifact", kind)
        .digest("layer diff_id", diff_id)
        .u64("format version", format_version)
        .finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_inputs_same_key() {
        let a = CacheKeyBuilder::new()
            .str("instruction", "RUN make")
            .finish();
        let b = CacheKeyBuilder::new()
            .str("instruction", "RUN make")
            .finish();
        assert_eq!(a, b);
    }

    #[test]
    fn concatenation_cannot_collide() {
        let a = CacheKeyBuilder::new().str("a", "bc").finish();
        let b = CacheKeyBuilder::new().str("ab", "c").finish();
        let c = CacheKeyBuilder::new().str("a", "b").str("", "c").finish();
        assert_ne!(a, b);
        assert_ne!(a, c);
        let l1 = CacheKeyBuilder::new().list("l", &["a,b"]).finish();
        let l2 = CacheKeyBuilder::new().list("l", &["a", "b"]).finish();
        assert_ne!(l1, l2);
        let p1 = CacheKeyBuilder::new().pairs("e", &[("A", "B=C")]).finish();
        let p2 = CacheKeyBuilder::new().pairs("e", &[("A=B", "C")]).finish();
        assert_ne!(p1, p2);
    }

    #[test]
    fn types_are_domain_separated() {
        let s = CacheKeyBuilder::new().str("x", "1").finish();
        let b = CacheKeyBuilder::new().bytes("x", b"1").finish();
        assert_ne!(s, b);
        let n = CacheKeyBuilder::new().u64("x", 1).finish();
        let raw = CacheKeyBuilder::new()
            .bytes("x", &1u64.to_le_bytes())
            .finish();
        assert_ne!(n, raw);
    }

    #[test]
    fn key_is_not_plain_blake3_of_the_inputs() {
        let k = CacheKeyBuilder::new().str("x", "y").finish();
        assert_ne!(k.as_bytes(), blake3::hash(b"y").as_bytes());
    }

    #[test]
    fn hex_round_trip_and_validation() {
        let k = CacheKeyBuilder::new().u64("n", 7).finish();
        assert_eq!(k.to_hex().parse::<CacheKey>().unwrap(), k);
        assert!("ABCD".parse::<CacheKey>().is_err());
        assert!(k.to_hex().to_uppercase().parse::<CacheKey>().is_err());
        let json = serde_json::to_string(&k).unwrap();
        assert_eq!(serde_json::from_str::<CacheKey>(&json).unwrap(), k);
    }

    /// The framing of every input type, pinned: a change here moves every
    /// key of every build (see `KEY_SCHEME`).
    #[test]
    fn framing_of_every_input_type_is_pinned() {
        let digest: crate::Digest =
            "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
                .parse()
                .unwrap();
        let parent = CacheKeyBuilder::new().str("kind", "base image").finish();
        let key = CacheKeyBuilder::new()
            .key("parent", &parent)
            .str("instruction", "RUN make")
            .bytes("context files", &[3; 32])
            .u64("n", 7)
            .bool("b", true)
            .digest("layer", &digest)
            .list("heredocs", &["a\n", ""])
            .pairs("env", &[("A", "1"), ("B", "two words")])
            .finish();
        assert_eq!(
            key.to_hex(),
            "1d752f781debabc8c7db068d5ebdc01808117cb3065c07ac0037c90870f4ecfd"
        );
    }

    #[test]
    fn report_never_shows_raw_bytes() {
        let (_, inputs) = CacheKeyBuilder::new()
            .bytes("secret", b"hunter2")
            .finish_with_inputs();
        assert!(!inputs[0].value.contains("hunter2"));
        assert!(inputs[0].value.starts_with("blake3:"));
    }
}
