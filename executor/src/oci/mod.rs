//! OCI image documents and on-disk image formats.
//!
//! - [`types`]: manifests, indexes, configs, descriptors and media types
//!   (OCI and Docker schema2).
//! - [`platform`]: `Platform` and index entry selection.
//! - [`layout`]: reading and writing OCI image layout directories.
//! - [`archive`]: writing `docker load` tarballs.
//! - [`reference`]: image references (`ImageRef`), Docker's normalisation
//!   of names; `crate::registry::reference` re-exports it.
//! - [`BlobSource`] (from [`crate::blobs`]): where a blob's bytes can be read
//!   from, so that pushing and exporting work the same from the local store
//!   or a layout.
//!
//! Dependencies point one way: `registry` uses `oci`, `oci` uses `store`
//! (reading a `docker save` tarball streams into it), and `store` uses
//! neither.

pub mod archive;
pub mod layout;
pub mod platform;
pub mod reference;
pub mod types;

use kiln_common::Digest;

pub use platform::{Platform, PlatformError};
pub use types::{
    ContainerConfig, Descriptor, History, ImageConfig, Index, Manifest, RootFs, media,
    to_canonical_json,
};

/// Kept so that `crate::oci::BlobSource` still names it; it lives in
/// [`crate::blobs`], below both `oci` and `store`.
pub use crate::blobs::BlobSource;

/// An image held in full: the manifest's bytes as they are hashed, its
/// parsed form, and the config's bytes and parsed form. Layers stay in a
/// [`BlobSource`].
#[derive(Debug, Clone)]
pub struct ImageDocuments {
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    pub manifest_bytes: Vec<u8>,
    pub manifest: Manifest,
    pub config_bytes: Vec<u8>,
    pub config: ImageConfig,
}

impl ImageDocuments {
    /// Builds a new image from a config and layer descriptors: serialises the
    /// config, makes an OCI (or Docker, if `docker_media_types`) manifest and
    /// computes both digests. The config blob must be made available to
    /// pushes and exports by the caller (see `config_bytes`).
    ///
    /// The manifest is in one format throughout: layers that came from a
    /// base image in the other format (a Docker schema2 base under an OCI
    /// manifest) get that format's media type for the same bytes and
    /// digest, as Buildah converts them; strict readers (umoci) refuse a
    /// mix.
    pub fn build(
        config: &ImageConfig,
        mut layers: Vec<Descriptor>,
        docker_media_types: bool,
    ) -> Self {
        for layer in &mut layers {
            let converted = if docker_media_types {
                media::docker_layer_type(&layer.media_type)
            } else {
                media::oci_layer_type(&layer.media_type)
            };
            if converted != layer.media_type {
                layer.media_type = converted.to_owned();
            }
        }
        let config_bytes = to_canonical_json(config);
        let (config_mt, manifest_mt) = if docker_media_types {
            (media::DOCKER_CONFIG, media::DOCKER_MANIFEST)
        } else {
            (media::OCI_CONFIG, media::OCI_MANIFEST)
        };
        let config_desc = Descriptor::new(
            config_mt,
            Digest::of_bytes(&config_bytes),
            config_bytes.len() as u64,
        );
        let mut manifest = Manifest::oci(config_desc, layers);
        manifest.media_type = Some(manifest_mt.to_string());
        let manifest_bytes = to_canonical_json(&manifest);
        ImageDocuments {
            manifest_digest: Digest::of_bytes(&manifest_bytes),
            manifest_media_type: manifest_mt.to_string(),
            manifest_bytes,
            manifest,
            config_bytes,
            config: config.clone(),
        }
    }

    /// The manifest's descriptor (for an index entry).
    pub fn manifest_descriptor(&self) -> Descriptor {
        Descriptor::new(
            &self.manifest_media_type,
            self.manifest_digest.clone(),
            self.manifest_bytes.len() as u64,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_manifest_holds_layer_media_types_of_its_own_format_only() {
        let digest = |b: &[u8]| Digest::of_bytes(b);
        let layers = vec![
            Descriptor::new(media::DOCKER_LAYER_GZIP, digest(b"base"), 4),
            Descriptor::new(media::DOCKER_LAYER_FOREIGN, digest(b"foreign"), 7),
            Descriptor::new(media::OCI_LAYER_GZIP, digest(b"built"), 5),
            Descriptor::new(media::OCI_LAYER_ZSTD, digest(b"zstd"), 4),
        ];
        let config = ImageConfig::default();
        let oci = ImageDocuments::build(&config, layers.clone(), false);
        let types: Vec<&str> = oci
            .manifest
            .layers
            .iter()
            .map(|l| l.media_type.as_str())
            .collect();
        assert_eq!(
            types,
            [
                media::OCI_LAYER_GZIP,
                media::OCI_LAYER_NONDISTRIBUTABLE_GZIP,
                media::OCI_LAYER_GZIP,
                media::OCI_LAYER_ZSTD
            ]
        );
        // Same blobs: only the type changes.
        for (built, given) in oci.manifest.layers.iter().zip(&layers) {
            assert_eq!((&built.digest, built.size), (&given.digest, given.size));
        }
        let docker = ImageDocuments::build(&config, layers, true);
        assert_eq!(
            docker.manifest.layers[0].media_type,
            media::DOCKER_LAYER_GZIP
        );
        assert_eq!(
            docker.manifest.layers[1].media_type,
            media::DOCKER_LAYER_FOREIGN
        );
        assert_eq!(
            docker.manifest.layers[2].media_type,
            media::DOCKER_LAYER_GZIP
        );
    }
}
