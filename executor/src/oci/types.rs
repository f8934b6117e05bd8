//! The JSON documents of OCI images and their Docker schema2 equivalents:
//! descriptors, manifests, indexes (manifest lists) and image configs, plus
//! the media type constants. Unknown fields are kept (`extra`) so that a
//! document read and written again keeps what kiln does not understand;
//! manifests that are re-served unchanged are always kept as their original
//! bytes by callers, because re-serialising may change their digest.

use std::collections::BTreeMap;

use kiln_common::Digest;
use serde::{Deserialize, Serialize};

use super::Platform;

pub mod media {
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
    pub const OCI_LAYER: &str = "application/vnd.oci.image.layer.v1.tar";
    pub const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
    pub const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
    pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
    pub const DOCKER_MANIFEST_LIST: &str =
        "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
    pub const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
    pub const DOCKER_LAYER_FOREIGN: &str =
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip";
    /// Uncompressed Docker layer (not in the schema2 spec, but written by
    /// some tools).
    pub const DOCKER_LAYER: &str = "application/vnd.docker.image.rootfs.diff.tar";
    pub const OCI_LAYER_NONDISTRIBUTABLE_GZIP: &str =
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip";

    /// The OCI media type of a layer with the same bytes: Docker's gzip
    /// layers become OCI gzip layers, foreign layers OCI non-distributable
    /// ones; anything else is returned as it is.
    pub fn oci_layer_type(media_type: &str) -> &str {
        match media_type {
            DOCKER_LAYER_GZIP => OCI_LAYER_GZIP,
            DOCKER_LAYER_FOREIGN => OCI_LAYER_NONDISTRIBUTABLE_GZIP,
            DOCKER_LAYER => OCI_LAYER,
            other => other,
        }
    }

    /// The Docker schema2 media type of a layer with the same bytes, the
    /// inverse of [`oci_layer_type`]; zstd has no Docker type and stays.
    pub fn docker_layer_type(media_type: &str) -> &str {
        match media_type {
            OCI_LAYER_GZIP => DOCKER_LAYER_GZIP,
            OCI_LAYER_NONDISTRIBUTABLE_GZIP => DOCKER_LAYER_FOREIGN,
            OCI_LAYER => DOCKER_LAYER,
            other => other,
        }
    }

    /// Every manifest kind the client can read, for the `Accept` header.
    pub const ACCEPT_MANIFESTS: &[&str] = &[
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_MANIFEST_LIST,
        DOCKER_MANIFEST,
    ];

    pub fn is_index(media_type: &str) -> bool {
        media_type == OCI_INDEX || media_type == DOCKER_MANIFEST_LIST
    }

    pub fn is_manifest(media_type: &str) -> bool {
        media_type == OCI_MANIFEST || media_type == DOCKER_MANIFEST
    }
}

pub type Annotations = BTreeMap<String, String>;
pub type Extra = serde_json::Map<String, serde_json::Value>;

/// A content descriptor: what a blob is, how big, and its digest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Annotations>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
}

impl Descriptor {
    pub fn new(media_type: &str, digest: Digest, size: u64) -> Self {
        Descriptor {
            media_type: media_type.to_string(),
            digest,
            size,
            urls: None,
            annotations: None,
            platform: None,
            artifact_type: None,
        }
    }
}

/// An image manifest (OCI or Docker schema2; same shape).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub config: Descriptor,
    pub layers: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Annotations>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Manifest {
    /// A new OCI manifest for `config` and `layers`.
    pub fn oci(config: Descriptor, layers: Vec<Descriptor>) -> Self {
        Manifest {
            schema_version: 2,
            media_type: Some(media::OCI_MANIFEST.to_string()),
            config,
            layers,
            annotations: None,
            extra: Extra::new(),
        }
    }

    /// The media type to send as `Content-Type`: the declared one, else
    /// inferred from the config's media type (OCI if unknown).
    pub fn effective_media_type(&self) -> &str {
        match &self.media_type {
            Some(m) => m,
            None if self.config.media_type == media::DOCKER_CONFIG => media::DOCKER_MANIFEST,
            None => media::OCI_MANIFEST,
        }
    }
}

/// An image index or Docker manifest list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Index {
    pub schema_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub media_type: Option<String>,
    pub manifests: Vec<Descriptor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<Annotations>,
    #[serde(flatten)]
    pub extra: Extra,
}

impl Index {
    pub fn oci(manifests: Vec<Descriptor>) -> Self {
        Index {
            schema_version: 2,
            media_type: Some(media::OCI_INDEX.to_string()),
            manifests,
            annotations: None,
            extra: Extra::new(),
        }
    }
}

// The image config: one type for reading base images and for building
// new ones (edited through `build::config::ConfigBuilder`).

/// Serialises as `{}` (the value type of ExposedPorts and Volumes).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Healthcheck {
    /// `["NONE"]` disables an inherited check; `["CMD", ...]`,
    /// `["CMD-SHELL", "..."]` otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// Durations in nanoseconds; 0 means "inherit the default".
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub exposed_ports: BTreeMap<String, Empty>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub volumes: BTreeMap<String, Empty>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub stop_signal: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<Healthcheck>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shell: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub on_build: Vec<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default)]
    pub diff_ids: Vec<Digest>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    pub architecture: String,
    pub os: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    #[serde(default)]
    pub config: ContainerConfig,
    #[serde(default)]
    pub rootfs: RootFs,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for ImageConfig {
    fn default() -> Self {
        ImageConfig::scratch("", "")
    }
}

impl ImageConfig {
    /// The config of `FROM scratch` for a platform.
    pub fn scratch(os: &str, architecture: &str) -> Self {
        ImageConfig {
            created: None,
            author: None,
            architecture: architecture.into(),
            os: os.into(),
            variant: None,
            os_version: None,
            config: ContainerConfig::default(),
            rootfs: RootFs::default(),
            history: Vec::new(),
            extra: BTreeMap::new(),
        }
    }

    /// The platform this config says the image is for.
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
            os_version: self.os_version.clone(),
            os_features: None,
        }
    }

    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// The canonical bytes (compact JSON, stable field order).
    pub fn to_json(&self) -> Vec<u8> {
        // Serialising plain structs, string maps and JSON values cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn digest(&self) -> Digest {
        Digest::of_bytes(&self.to_json())
    }

    /// The value of `key` in the config's environment.
    pub fn env(&self, key: &str) -> Option<&str> {
        self.config
            .env
            .iter()
            .find_map(|e| match e.split_once('=') {
                Some((k, v)) if k == key => Some(v),
                None if e == key => Some(""),
                _ => None,
            })
    }
}

/// Serialises a document the way kiln writes every JSON blob: compact, so the
/// same value always gives the same bytes and digest.
pub fn to_canonical_json<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain data types cannot fail: no maps with non-string
    // keys, no custom serialisers that error.
    serde_json::to_vec(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docker_config_with_nulls_and_unknown_fields_round_trips() {
        let json = r#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/bin"],"Cmd":null,"Image":"sha256:x"},"rootfs":{"type":"layers","diff_ids":["sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"]},"docker_version":"24"}"#;
        let c: ImageConfig = serde_json::from_str(json).unwrap();
        assert_eq!(c.config.env[0], "PATH=/bin");
        assert_eq!(c.config.extra["Image"], "sha256:x");
        assert_eq!(c.extra["docker_version"], "24");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["docker_version"], "24");
        assert_eq!(back["rootfs"]["diff_ids"].as_array().unwrap().len(), 1);
    }

    #[test]
    fn manifest_without_media_type_is_inferred_from_config() {
        let d = Digest::of_bytes(b"x");
        let mut m = Manifest::oci(Descriptor::new(media::DOCKER_CONFIG, d.clone(), 1), vec![]);
        m.media_type = None;
        assert_eq!(m.effective_media_type(), media::DOCKER_MANIFEST);
        m.config.media_type = media::OCI_CONFIG.into();
        assert_eq!(m.effective_media_type(), media::OCI_MANIFEST);
    }
}
