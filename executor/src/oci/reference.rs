//! Image references (`[host[:port]/]path[:tag][@digest]`) parsed and
//! normalised the way Docker does it, so that `busybox`,
//! `library/busybox:latest` and `docker.io/library/busybox:latest` name the
//! same thing and the registry client never sees a bare string.

use std::fmt;
use std::str::FromStr;

use kiln_common::Digest;

/// The registry host of Docker Hub as users write it.
pub const DOCKER_HUB: &str = "docker.io";
/// The host Docker Hub's API is actually served from.
pub const DOCKER_HUB_API: &str = "registry-1.docker.io";
/// The tag used when a reference names neither a tag nor a digest.
pub const DEFAULT_TAG: &str = "latest";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ReferenceError {
    #[error("image reference is empty")]
    Empty,
    #[error("invalid image reference {reference:?}: {reason}")]
    Invalid {
        reference: String,
        reason: &'static str,
    },
    #[error("invalid digest in image reference {reference:?}: {source}")]
    Digest {
        reference: String,
        source: kiln_common::DigestError,
    },
}

/// A fully normalised image reference.
///
/// `registry` is the host as written (`docker.io` for Docker Hub, never
/// `index.docker.io`), `repository` always has the `library/` prefix for
/// official Docker Hub images, and `tag` is `latest` when neither a tag nor a
/// digest was given.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct ImageRef {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

impl ImageRef {
    /// Parses and normalises a reference; see the module documentation.
    pub fn parse(s: &str) -> Result<Self, ReferenceError> {
        let invalid = |reason| ReferenceError::Invalid {
            reference: s.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((rest, d)) => {
                let digest = Digest::from_str(d).map_err(|source| ReferenceError::Digest {
                    reference: s.to_string(),
                    source,
                })?;
                (rest, Some(digest))
            }
            None => (s, None),
        };
        // A tag is whatever follows the last ':' if no '/' follows it;
        // otherwise that ':' belonged to a host:port.
        let (name, tag) = match name_tag.rfind(':') {
            Some(i) if !name_tag[i + 1..].contains('/') => {
                (&name_tag[..i], Some(name_tag[i + 1..].to_string()))
            }
            _ => (name_tag, None),
        };
        if let Some(tag) = &tag
            && !valid_tag(tag)
        {
            return Err(invalid("tag must match [A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"));
        }
        if name.is_empty() {
            return Err(invalid("repository name is empty"));
        }
        let (registry, path) = match name.split_once('/') {
            Some((first, rest))
                if first.contains('.') || first.contains(':') || first == "localhost" =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = match registry.as_str() {
            "index.docker.io" | "registry-1.docker.io" => DOCKER_HUB.to_string(),
            _ => registry,
        };
        if registry != registry.to_ascii_lowercase() && !registry.contains(':') {
            // Hosts are case-insensitive, but Docker rejects upper case in them.
            return Err(invalid("registry host must be lower case"));
        }
        let repository = if registry == DOCKER_HUB && !path.contains('/') {
            format!("library/{path}")
        } else {
            path
        };
        if !repository.split('/').all(valid_path_component) {
            return Err(invalid(
                "repository path components must be lower-case alphanumerics separated by '.', '_', '__' or '-'",
            ));
        }
        let tag = match (&tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_string()),
            _ => tag,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// Builds a reference from its parts (used for re-tagging).
    pub fn new(
        registry: &str,
        repository: &str,
        tag: Option<&str>,
        digest: Option<Digest>,
    ) -> Self {
        ImageRef {
            registry: registry.to_string(),
            repository: repository.to_string(),
            tag: tag.map(str::to_string),
            digest,
        }
    }

    /// The registry host as the user names it (`docker.io`, `127.0.0.1:5000`).
    pub fn registry(&self) -> &str {
        &self.registry
    }

    /// The host the registry's API lives on (`registry-1.docker.io` for Hub).
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API
        } else {
            &self.registry
        }
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// What to put after `/manifests/`: the digest if there is one (it is
    /// the stronger promise), else the tag.
    pub fn manifest_reference(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(d), _) => d.to_string(),
            (None, Some(t)) => t.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// The same repository, pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: Digest) -> Self {
        ImageRef {
            digest: Some(digest),
            ..self.clone()
        }
    }

    /// The same repository with another tag and no digest.
    pub fn with_tag(&self, tag: &str) -> Self {
        ImageRef {
            tag: Some(tag.to_string()),
            digest: None,
            ..self.clone()
        }
    }

    /// `registry/repository`, the name without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }
}

fn valid_tag(tag: &str) -> bool {
    let b = tag.as_bytes();
    !b.is_empty()
        && b.len() <= 128
        && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'.' | b'-'))
}

fn valid_path_component(c: &str) -> bool {
    let b = c.as_bytes();
    if b.is_empty() {
        return false;
    }
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    if !alnum(&b[0]) || !alnum(&b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(&b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__', or one or more '-'.
        let start = i;
        while i < b.len() && !alnum(&b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|c| c == b'-');
        if !ok {
            return false;
        }
    }
    true
}

impl FromStr for ImageRef {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        ImageRef::parse(s)
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ImageRef({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn norm(s: &str) -> String {
        ImageRef::parse(s).unwrap().to_string()
    }

    #[test]
    fn bare_name_gets_docker_hub_library_and_latest() {
        assert_eq!(norm("busybox"), "docker.io/library/busybox:latest");
    }

    #[test]
    fn user_repository_on_docker_hub_keeps_its_namespace() {
        assert_eq!(norm("bitnami/redis:7"), "docker.io/bitnami/redis:7");
    }

    #[test]
    fn index_docker_io_is_normalised_to_docker_io() {
        assert_eq!(
            norm("index.docker.io/busybox"),
            "docker.io/library/busybox:latest"
        );
        let r = ImageRef::parse("docker.io/busybox").unwrap();
        assert_eq!(r.api_host(), "registry-1.docker.io");
    }

    #[test]
    fn first_component_with_dot_colon_or_localhost_is_a_host() {
        let r = ImageRef::parse("quay.io/coreos/etcd:v3").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("quay.io", "coreos/etcd", Some("v3"))
        );
        let r = ImageRef::parse("127.0.0.1:5000/app").unwrap();
        assert_eq!(
            (r.registry(), r.repository(), r.tag()),
            ("127.0.0.1:5000", "app", Some("latest"))
        );
        let r = ImageRef::parse("localhost/app:1").unwrap();
        assert_eq!((r.registry(), r.repository()), ("localhost", "app"));
        // Without dot, colon or "localhost" the first component is a namespace.
        let r = ImageRef::parse("myhost/app").unwrap();
        assert_eq!((r.registry(), r.repository()), ("docker.io", "myhost/app"));
    }

    #[test]
    fn port_colon_is_not_mistaken_for_a_tag() {
        let r = ImageRef::parse("localhost:5000/a/b").unwrap();
        assert_eq!(r.registry(), "localhost:5000");
        assert_eq!(r.repository(), "a/b");
        assert_eq!(r.tag(), Some("latest"));
    }

    #[test]
    fn digest_only_reference_has_no_tag() {
        let r = ImageRef::parse(&format!("busybox@sha256:{HEX}")).unwrap();
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest().unwrap().hex(), HEX);
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
        assert_eq!(
            r.to_string(),
            format!("docker.io/library/busybox@sha256:{HEX}")
        );
    }

    #[test]
    fn tag_and_digest_together_keep_both_and_fetch_by_digest() {
        let r = ImageRef::parse(&format!("reg.example:443/x/y:1.2@sha256:{HEX}")).unwrap();
        assert_eq!(r.tag(), Some("1.2"));
        assert_eq!(r.manifest_reference(), format!("sha256:{HEX}"));
    }

    #[test]
    fn invalid_references_are_rejected() {
        assert_eq!(ImageRef::parse(""), Err(ReferenceError::Empty));
        for bad in [
            "Busybox",
            "busybox:",
            "busybox:-bad",
            "a//b",
            "/busybox",
            "busybox@sha256:abc",
            "busybox@md5:0123",
            "foo/bar-",
            "a..b",
        ] {
            assert!(ImageRef::parse(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn separators_in_path_components_follow_distribution_grammar() {
        for good in ["a.b", "a_b", "a__b", "a-b", "a---b", "a1"] {
            assert!(ImageRef::parse(good).is_ok(), "{good:?} should parse");
        }
        assert!(ImageRef::parse("a___b").is_err());
    }

    #[test]
    fn retagging_replaces_tag_and_drops_digest() {
        let r = ImageRef::parse(&format!("localhost:5000/a:1@sha256:{HEX}")).unwrap();
        assert_eq!(r.with_tag("2").to_string(), "localhost:5000/a:2");
    }
}
