//! The registry-backed cache (`--cache-repo REPO`): for users without a
//! cache server, the layer cache lives in one repository of an OCI
//! registry, reached with the same client and credentials as pushes.
//!
//! Format (docs/cache-repo.md): layers are plain blobs of REPO, so an image
//! pushed to the same registry can mount them instead of uploading. Each
//! cache key `k` a build wrote has a small OCI artifact manifest under the
//! tag [`tag_for`]`(k)` = `kiln-<64 hex of k>`; its annotations hold, as
//! JSON, the entry of `k` *and* the entries of the steps that followed `k`
//! in the build that wrote it (the chain suffix, bounded by
//! [`MAX_CHAIN_ENTRIES`] and [`MAX_ENTRIES_BYTES`]), and its `layers` list
//! every layer blob those entries name, so the registry refused the
//! manifest unless they were all there, and keeps them while it is.
//!
//! Lookup walks each stage's chain of keys: one GET of `kiln-<k0>` answers
//! every following step that the writer's build had in common with this
//! one; only where they diverge is the next key's tag asked for, and a
//! missing tag ends the chain (a step nobody finished has no successor
//! anybody built). An unchanged build costs one manifest GET.
//!
//! Writes are batched: `put_entry` only records, and [`Cache::finish`]
//! pushes one tag per new key once the build's uploads are done, never
//! over an existing tag (first writer wins; the check and the write are
//! two requests, see the race in docs/cache-repo.md).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use futures::StreamExt;
use kiln_common::{CacheEntry, CacheKey, Digest};
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;

use super::{Cache, CacheError};
use crate::oci::Descriptor;
use crate::oci::media;
use crate::registry::{ImageRef, RegistryClient, RegistryOptions};
use crate::store::LocalStore;

/// `artifactType` of a cache manifest.
pub const ARTIFACT_TYPE: &str = "application/vnd.kiln.cache.v1+json";
/// Annotation naming the key the manifest was written for.
pub const KEY_ANNOTATION: &str = "dev.kiln.cache.key";
/// Annotation holding the entries (a JSON array of `{"key", "entry"}`).
pub const ENTRIES_ANNOTATION: &str = "dev.kiln.cache.entries";
/// The OCI empty descriptor's media type and content (the config).
pub const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
pub const EMPTY_JSON: &[u8] = b"{}";
/// Most entries one manifest carries (the key's own and its successors').
pub const MAX_CHAIN_ENTRIES: usize = 128;
/// Most bytes of entry JSON one manifest carries; the first entry is
/// always kept.
pub const MAX_ENTRIES_BYTES: usize = 256 << 10;
/// Tags pushed at once at the end of a build.
const PARALLEL_WRITES: usize = 4;

/// The tag of key `k`'s manifest: `kiln-` and the key's 64 lowercase hex
/// digits (69 characters, within the OCI tag grammar
/// `[A-Za-z0-9_][A-Za-z0-9._-]{0,127}`).
pub fn tag_for(key: &CacheKey) -> String {
    format!("kiln-{}", key.to_hex())
}

#[derive(Debug, Serialize, Deserialize)]
struct StoredEntry {
    key: CacheKey,
    entry: CacheEntry,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct ArtifactManifest {
    schema_version: u32,
    media_type: String,
    #[serde(default)]
    artifact_type: Option<String>,
    config: Descriptor,
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

fn empty_descriptor() -> Descriptor {
    Descriptor::new(
        EMPTY_MEDIA_TYPE,
        Digest::of_bytes(EMPTY_JSON),
        EMPTY_JSON.len() as u64,
    )
}

/// The manifest for `chain[0]`'s key holding `chain` (cut at
/// [`MAX_CHAIN_ENTRIES`] / [`MAX_ENTRIES_BYTES`]).
pub fn encode_manifest(chain: &[(CacheKey, CacheEntry)]) -> Vec<u8> {
    let mut stored = Vec::new();
    let mut bytes = 0;
    for (key, entry) in chain.iter().take(MAX_CHAIN_ENTRIES) {
        let item = StoredEntry {
            key: *key,
            entry: entry.clone(),
        };
        let len = serde_json::to_vec(&item).map(|v| v.len()).unwrap_or(0);
        if !stored.is_empty() && bytes + len > MAX_ENTRIES_BYTES {
            break;
        }
        bytes += len;
        stored.push(item);
    }
    let mut layers: Vec<Descriptor> = Vec::new();
    for layer in stored.iter().filter_map(|s| s.entry.layer.as_ref()) {
        if !layers.iter().any(|d| d.digest == layer.digest) {
            layers.push(Descriptor::new(
                &layer.media_type,
                layer.digest.clone(),
                layer.size,
            ));
        }
    }
    if layers.is_empty() {
        // Steps that changed no file: the OCI guidance for an artifact
        // without content is the empty descriptor as its one layer.
        layers.push(empty_descriptor());
    }
    let mut annotations = BTreeMap::new();
    if let Some(first) = stored.first() {
        annotations.insert(KEY_ANNOTATION.to_string(), first.key.to_hex());
    }
    annotations.insert(
        ENTRIES_ANNOTATION.to_string(),
        serde_json::to_string(&stored).unwrap_or_else(|_| "[]".into()),
    );
    let manifest = ArtifactManifest {
        schema_version: 2,
        media_type: media::OCI_MANIFEST.to_string(),
        artifact_type: Some(ARTIFACT_TYPE.to_string()),
        config: empty_descriptor(),
        layers,
        annotations,
    };
    serde_json::to_vec(&manifest).unwrap_or_default()
}

/// The entries of the manifest fetched for `key`, first `key`'s own.
/// Refused: anything but a kiln cache artifact written for `key`, and an
/// entry naming a layer the manifest does not reference (the registry
/// vouched for the referenced blobs when it accepted the manifest).
pub fn decode_manifest(
    key: &CacheKey,
    bytes: &[u8],
) -> Result<Vec<(CacheKey, CacheEntry)>, String> {
    let manifest: ArtifactManifest =
        serde_json::from_slice(bytes).map_err(|e| format!("not an OCI manifest: {e}"))?;
    if manifest.artifact_type.as_deref() != Some(ARTIFACT_TYPE) {
        return Err(format!(
            "artifactType is {:?}, not {ARTIFACT_TYPE}",
            manifest.artifact_type
        ));
    }
    let written_for = manifest.annotations.get(KEY_ANNOTATION);
    if written_for.map(String::as_str) != Some(key.to_hex().as_str()) {
        return Err(format!("written for key {written_for:?}, not {key}"));
    }
    let stored: Vec<StoredEntry> = serde_json::from_str(
        manifest
            .annotations
            .get(ENTRIES_ANNOTATION)
            .ok_or("no entries annotation")?,
    )
    .map_err(|e| format!("entries: {e}"))?;
    if stored.first().map(|s| s.key) != Some(*key) {
        return Err("the first entry is not the key's own".into());
    }
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for s in stored {
        if let Some(layer) = &s.entry.layer
            && !manifest
                .layers
                .iter()
                .any(|d| d.digest == layer.digest && d.size == layer.size)
        {
            return Err(format!(
                "the entry of {} names layer {} ({} bytes), which the manifest does not reference",
                s.key, layer.digest, layer.size
            ));
        }
        if seen.insert(s.key) {
            out.push((s.key, s.entry));
        }
    }
    Ok(out)
}

/// The entries of a build's cached steps, found by walking `chains` (each
/// stage's filesystem keys in build order) with `probe` (the entries under
/// a key's tag, `None` for no tag). A key already answered by an earlier
/// manifest costs nothing; a missing tag ends its chain.
pub fn walk_chains(
    chains: &[Vec<CacheKey>],
    mut probe: impl FnMut(&CacheKey) -> Result<Option<Vec<(CacheKey, CacheEntry)>>, CacheError>,
) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
    let wanted: BTreeSet<CacheKey> = chains.iter().flatten().copied().collect();
    let mut found = BTreeMap::new();
    for chain in chains {
        for key in chain {
            if found.contains_key(key) {
                continue;
            }
            let Some(entries) = probe(key)? else {
                break;
            };
            let mut answered = false;
            for (k, entry) in entries {
                answered |= k == *key;
                if wanted.contains(&k) {
                    found.entry(k).or_insert(entry);
                }
            }
            if !answered {
                break;
            }
        }
    }
    Ok(found)
}

/// The manifests a build writes: one per key in `new`, holding the known
/// entries of that key and of the keys after it in `order` (keys without
/// an entry are skipped; a lookup asks for them by their own tag). Keys
/// in `new` outside `order` (base layers shared through the cache) get a
/// manifest of their own entry, which keeps their blob referenced.
pub fn plan_writes(
    order: &[CacheKey],
    known: &BTreeMap<CacheKey, CacheEntry>,
    new: &BTreeSet<CacheKey>,
) -> Vec<(CacheKey, Vec<(CacheKey, CacheEntry)>)> {
    let mut writes = Vec::new();
    for (i, key) in order.iter().enumerate() {
        if !new.contains(key) {
            continue;
        }
        let chain: Vec<(CacheKey, CacheEntry)> = order[i..]
            .iter()
            .filter_map(|k| known.get(k).map(|e| (*k, e.clone())))
            .take(MAX_CHAIN_ENTRIES)
            .collect();
        if chain.first().map(|(k, _)| k) == Some(key) {
            writes.push((*key, chain));
        }
    }
    let in_order: BTreeSet<&CacheKey> = order.iter().collect();
    for key in new.iter().filter(|k| !in_order.contains(k)) {
        if let Some(entry) = known.get(key) {
            writes.push((*key, vec![(*key, entry.clone())]));
        }
    }
    writes
}

#[derive(Default)]
struct State {
    /// Entries this build's lookups saw (they go into the chains it writes).
    found: BTreeMap<CacheKey, CacheEntry>,
    /// Entries recorded by `put_entry`, written by `finish`.
    put: BTreeMap<CacheKey, CacheEntry>,
}

pub struct RegistryCache {
    client: RegistryClient,
    repo: ImageRef,
    runtime: Handle,
    state: Mutex<State>,
}

impl RegistryCache {
    /// A cache in `repo` (`registry/path`, without tag or digest).
    pub fn new(
        repo: &ImageRef,
        registry: RegistryOptions,
        runtime: Handle,
    ) -> Result<Self, CacheError> {
        let client = RegistryClient::new(registry).map_err(|e| CacheError::Unavailable {
            location: repo.name(),
            message: kiln_common::errors::chain(&e),
        })?;
        Ok(Self {
            client,
            repo: repo.clone(),
            runtime,
            state: Mutex::new(State::default()),
        })
    }

    fn err(&self, e: &(dyn std::error::Error + 'static)) -> CacheError {
        CacheError::Unavailable {
            location: self.location(),
            message: kiln_common::errors::chain(e),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        // The maps stay consistent even if a thread panicked holding them.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The entries under `key`'s tag; an artifact that is not a valid
    /// cache manifest for `key` counts as no tag (it is logged).
    fn probe(&self, key: &CacheKey) -> Result<Option<Vec<(CacheKey, CacheEntry)>>, CacheError> {
        let tag = tag_for(key);
        let Some(bytes) = self
            .runtime
            .block_on(self.client.get_tagged_manifest(&self.repo, &tag))
            .map_err(|e| self.err(&e))?
        else {
            return Ok(None);
        };
        match decode_manifest(key, &bytes) {
            Ok(entries) => Ok(Some(entries)),
            Err(reason) => {
                tracing::warn!(
                    "{}:{tag} is not a usable cache entry: {reason}",
                    self.repo.name()
                );
                Ok(None)
            }
        }
    }
}

impl Cache for RegistryCache {
    fn location(&self) -> String {
        format!("cache repository {}", self.repo.name())
    }

    fn lookup(&self, keys: &[CacheKey]) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
        // Unrelated keys: each is its own chain.
        let chains: Vec<Vec<CacheKey>> = keys.iter().map(|k| vec![*k]).collect();
        self.lookup_chains(&chains)
    }

    fn lookup_chains(
        &self,
        chains: &[Vec<CacheKey>],
    ) -> Result<BTreeMap<CacheKey, CacheEntry>, CacheError> {
        let found = walk_chains(chains, |key| self.probe(key))?;
        self.state()
            .found
            .extend(found.iter().map(|(k, e)| (*k, e.clone())));
        Ok(found)
    }

    fn fetch_blob(
        &self,
        digest: &Digest,
        size: u64,
        store: &LocalStore,
    ) -> Result<PathBuf, CacheError> {
        self.runtime
            .block_on(
                self.client
                    .fetch_repository_blob(&self.repo, digest, size, store),
            )
            .map_err(|e| CacheError::Blob {
                digest: digest.clone(),
                message: kiln_common::errors::chain(&e),
            })?
            .ok_or_else(|| CacheError::NotFound(digest.clone()))
    }

    fn has_blob(&self, digest: &Digest) -> Result<bool, CacheError> {
        Ok(self
            .runtime
            .block_on(self.client.blob_exists(&self.repo, digest))
            .map_err(|e| self.err(&e))?
            .is_some())
    }

    fn put_blob(&self, digest: &Digest, path: &Path) -> Result<(), CacheError> {
        let size = std::fs::metadata(path)
            .map_err(|e| CacheError::Blob {
                digest: digest.clone(),
                message: format!("{}: {e}", path.display()),
            })?
            .len();
        let desc = Descriptor::new("application/octet-stream", digest.clone(), size);
        self.runtime
            .block_on(
                self.client
                    .push_blob_file(&self.repo, &desc, path.to_path_buf(), None),
            )
            .map_err(|e| self.err(&e))
    }

    fn put_entry(&self, key: &CacheKey, entry: &CacheEntry) -> Result<(), CacheError> {
        self.state()
            .put
            .entry(*key)
            .or_insert_with(|| entry.clone());
        Ok(())
    }

    fn finish(&self, chains: &[Vec<CacheKey>]) -> Result<(), CacheError> {
        let (known, new) = {
            let mut state = self.state();
            let put = std::mem::take(&mut state.put);
            let new: BTreeSet<CacheKey> = put.keys().copied().collect();
            let mut known = state.found.clone();
            known.extend(put);
            (known, new)
        };
        if new.is_empty() {
            return Ok(());
        }
        let mut order = Vec::new();
        let mut seen = BTreeSet::new();
        for key in chains.iter().flatten() {
            if seen.insert(*key) {
                order.push(*key);
            }
        }
        let writes = plan_writes(&order, &known, &new);
        let total = writes.len();
        let failures: Vec<String> = self.runtime.block_on(async {
            if let Err(e) = self
                .client
                .push_blob_bytes(&self.repo, EMPTY_MEDIA_TYPE, EMPTY_JSON)
                .await
            {
                return vec![kiln_common::errors::chain(&e)];
            }
            futures::stream::iter(writes)
                .map(|(key, chain)| async move {
                    let bytes = encode_manifest(&chain);
                    self.client
                        .put_manifest_if_absent(
                            &self.repo,
                            &tag_for(&key),
                            &bytes,
                            media::OCI_MANIFEST,
                        )
                        .await
                        .map_err(|e| kiln_common::errors::chain(&e))
                })
                .buffer_unordered(PARALLEL_WRITES)
                .filter_map(|r| async move { r.err() })
                .collect()
                .await
        });
        match failures.first() {
            None => Ok(()),
            Some(first) => Err(CacheError::Unavailable {
                location: self.location(),
                message: format!(
                    "{} of {total} cache entries were not written; the first: {first}",
                    failures.len()
                ),
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kiln_common::LayerDescriptor;

    fn key(n: u8) -> CacheKey {
        CacheKey::from_bytes([n; 32])
    }

    fn entry(n: u8) -> CacheEntry {
        CacheEntry {
            layer: Some(LayerDescriptor {
                media_type: media::OCI_LAYER_GZIP.to_string(),
                digest: Digest::of_bytes(&[n]),
                size: 100 + n as u64,
                diff_id: Digest::of_bytes(&[n, n]),
            }),
            created_by: format!("RUN step {n}"),
            created: "2026-01-01T00:00:00Z".into(),
            extra: BTreeMap::new(),
        }
    }

    fn empty_entry() -> CacheEntry {
        CacheEntry {
            layer: None,
            created_by: "RUN true".into(),
            created: "2026-01-01T00:00:00Z".into(),
            extra: BTreeMap::new(),
        }
    }

    #[test]
    fn tags_are_the_full_key_and_valid_oci_tags() {
        let k: CacheKey = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
            .parse()
            .unwrap();
        let tag = tag_for(&k);
        assert_eq!(
            tag,
            "kiln-0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
        );
        assert!(tag.len() <= 128);
        assert!(ImageRef::parse(&format!("example.com/cache:{tag}")).is_ok());
        assert_ne!(tag_for(&key(1)), tag_for(&key(2)));
    }

    #[test]
    fn a_manifest_round_trips_its_chain_and_references_every_layer() {
        let chain = vec![
            (key(1), entry(1)),
            (key(2), empty_entry()),
            (key(3), entry(3)),
        ];
        let bytes = encode_manifest(&chain);
        let decoded = decode_manifest(&key(1), &bytes).unwrap();
        assert_eq!(decoded, chain);
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["artifactType"], ARTIFACT_TYPE);
        assert_eq!(json["mediaType"], media::OCI_MANIFEST);
        assert_eq!(json["config"]["mediaType"], EMPTY_MEDIA_TYPE);
        let layers: Vec<&str> = json["layers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["digest"].as_str().unwrap())
            .collect();
        assert_eq!(
            layers,
            [
                Digest::of_bytes(&[1]).to_string(),
                Digest::of_bytes(&[3]).to_string()
            ]
        );
    }

    #[test]
    fn a_chain_without_layers_references_the_empty_blob() {
        let bytes = encode_manifest(&[(key(1), empty_entry())]);
        let json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(
            json["layers"][0]["digest"],
            Digest::of_bytes(b"{}").to_string()
        );
        assert_eq!(decode_manifest(&key(1), &bytes).unwrap().len(), 1);
    }

    #[test]
    fn a_manifest_for_another_key_or_with_unreferenced_layers_is_refused() {
        let bytes = encode_manifest(&[(key(1), entry(1))]);
        let err = decode_manifest(&key(2), &bytes).unwrap_err();
        assert!(err.contains("written for key"), "{err}");
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["layers"][0]["digest"] = serde_json::json!(Digest::of_bytes(b"other").to_string());
        let err = decode_manifest(&key(1), &serde_json::to_vec(&json).unwrap()).unwrap_err();
        assert!(err.contains("does not reference"), "{err}");
        let mut json: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        json["artifactType"] = serde_json::json!("application/vnd.example");
        assert!(decode_manifest(&key(1), &serde_json::to_vec(&json).unwrap()).is_err());
        assert!(decode_manifest(&key(1), b"{\"schemaVersion\":2}").is_err());
    }

    #[test]
    fn a_manifest_is_bounded_but_keeps_its_own_entry() {
        let long: Vec<(CacheKey, CacheEntry)> = (0..200u8).map(|n| (key(n), entry(n))).collect();
        let decoded = decode_manifest(&key(0), &encode_manifest(&long)).unwrap();
        assert_eq!(decoded.len(), MAX_CHAIN_ENTRIES);
        let mut huge = entry(1);
        huge.created_by = "x".repeat(MAX_ENTRIES_BYTES);
        let chain = vec![(key(1), huge), (key(2), entry(2))];
        let decoded = decode_manifest(&key(1), &encode_manifest(&chain)).unwrap();
        assert_eq!(decoded.len(), 1, "the second entry does not fit");
    }

    /// A repository as a map from key to the chain stored under its tag,
    /// counting the probes.
    fn walk(
        repo: &BTreeMap<CacheKey, Vec<(CacheKey, CacheEntry)>>,
        chains: &[Vec<CacheKey>],
    ) -> (BTreeMap<CacheKey, CacheEntry>, usize) {
        let mut probes = 0;
        let found = walk_chains(chains, |k| {
            probes += 1;
            Ok(repo.get(k).cloned())
        })
        .unwrap();
        (found, probes)
    }

    fn written(order: &[CacheKey]) -> BTreeMap<CacheKey, Vec<(CacheKey, CacheEntry)>> {
        let known: BTreeMap<CacheKey, CacheEntry> =
            order.iter().map(|k| (*k, entry(k.as_bytes()[0]))).collect();
        let new: BTreeSet<CacheKey> = order.iter().copied().collect();
        plan_writes(order, &known, &new).into_iter().collect()
    }

    #[test]
    fn an_unchanged_build_is_answered_by_one_probe() {
        let order: Vec<CacheKey> = (1..=6).map(key).collect();
        let repo = written(&order);
        assert_eq!(repo.len(), 6, "one tag per key");
        assert_eq!(repo[&key(3)].len(), 4, "key 3's tag holds keys 3 to 6");
        let (found, probes) = walk(&repo, std::slice::from_ref(&order));
        assert_eq!(found.len(), 6);
        assert_eq!(probes, 1);
    }

    #[test]
    fn a_changed_step_costs_one_more_probe_and_ends_the_chain() {
        let order: Vec<CacheKey> = (1..=6).map(key).collect();
        let repo = written(&order);
        // Step 4 changed: so did every key after it.
        let changed = vec![key(1), key(2), key(3), key(40), key(50), key(60)];
        let (found, probes) = walk(&repo, &[changed]);
        assert_eq!(
            found.keys().copied().collect::<Vec<_>>(),
            [key(1), key(2), key(3)]
        );
        assert_eq!(probes, 2, "key 1's tag, then key 40's (missing)");
        let (found, probes) = walk(&BTreeMap::new(), &[order]);
        assert!(found.is_empty());
        assert_eq!(probes, 1, "a cold cache costs one probe per chain");
    }

    #[test]
    fn later_stages_are_answered_from_the_first_stages_tag() {
        let stage0: Vec<CacheKey> = (1..=3).map(key).collect();
        let stage1: Vec<CacheKey> = (10..=12).map(key).collect();
        let order: Vec<CacheKey> = stage0.iter().chain(&stage1).copied().collect();
        let repo = written(&order);
        let (found, probes) = walk(&repo, &[stage0, stage1.clone()]);
        assert_eq!(found.len(), 6);
        assert_eq!(probes, 1);
        // A build whose first stage changed still finds the second stage
        // by its own tag.
        let (found, probes) = walk(&repo, &[vec![key(99)], stage1]);
        assert_eq!(found.len(), 3);
        assert_eq!(probes, 2);
    }

    #[test]
    fn writes_skip_known_keys_and_keep_keys_outside_the_chains() {
        let order = vec![key(1), key(2), key(3)];
        let mut known: BTreeMap<CacheKey, CacheEntry> =
            order.iter().map(|k| (*k, entry(k.as_bytes()[0]))).collect();
        known.insert(key(77), entry(77));
        // Key 1 was a hit; 2, 3 and a base layer (77) are new.
        let new: BTreeSet<CacheKey> = [key(2), key(3), key(77)].into();
        let writes = plan_writes(&order, &known, &new);
        let tags: Vec<CacheKey> = writes.iter().map(|(k, _)| *k).collect();
        assert_eq!(tags, [key(2), key(3), key(77)]);
        assert_eq!(writes[0].1.len(), 2);
        assert_eq!(writes[2].1.len(), 1);
    }
}
