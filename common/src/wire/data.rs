//! JSON types of the cache server's data plane (see docs/cache-api.md).
//!
//! Entries keep fields they do not know (`extra`), so an older server or
//! client passes newer fields through unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{CacheKey, Digest};

/// Maximum number of keys one `POST /v1/lookup` may carry; more is a 413.
pub const MAX_LOOKUP_KEYS: usize = 1024;

/// The layer a cached step produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LayerDescriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed tar, for the image config's `rootfs.diff_ids`.
    pub diff_id: Digest,
}

/// What the cache knows about one step. `layer: None` records a step that
/// changed no file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CacheEntry {
    pub layer: Option<LayerDescriptor>,
    pub created_by: String,
    /// RFC 3339.
    pub created: String,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupRequest {
    pub keys: Vec<CacheKey>,
}

/// Only the keys that hit appear in `entries`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LookupResponse {
    pub entries: BTreeMap<CacheKey, CacheEntry>,
}

/// The answer to `PUT /v1/blobs/{digest}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobPutResponse {
    pub digest: Digest,
    pub size: u64,
}

/// `{"error": {"code": "...", "message": "..."}}`
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorDetail {
    pub code: String,
    pub message: String,
}

impl ErrorBody {
    pub fn new(code: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            error: ErrorDetail {
                code: code.into(),
                message: message.into(),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_json_matches_the_documented_shape_and_keeps_unknown_fields() {
        let json = r#"{"layer":{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip",
            "digest":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "size":32,
            "diffId":"sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"},
            "createdBy":"RUN true","created":"2026-11-24T00:00:00Z","future":{"x":1}}"#;
        let entry: CacheEntry = serde_json::from_str(json).unwrap();
        assert_eq!(entry.layer.as_ref().unwrap().size, 32);
        assert_eq!(entry.extra["future"]["x"], 1);
        let again: serde_json::Value = serde_json::to_value(&entry).unwrap();
        assert_eq!(again["future"]["x"], 1);
        assert_eq!(
            again["layer"]["diffId"],
            entry.layer.unwrap().diff_id.to_string()
        );
    }

    #[test]
    fn empty_step_has_null_layer() {
        let entry = CacheEntry {
            layer: None,
            created_by: "RUN true".into(),
            created: "2026-11-24T00:00:00Z".into(),
            extra: BTreeMap::new(),
        };
        let v = serde_json::to_value(&entry).unwrap();
        assert!(v["layer"].is_null());
    }

    #[test]
    fn lookup_rejects_malformed_keys() {
        assert!(serde_json::from_str::<LookupRequest>(r#"{"keys":["nothex"]}"#).is_err());
    }
}
