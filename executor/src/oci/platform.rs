//! `Platform` (`os/arch[/variant]`), kiln's one platform type: what
//! `--custom-platform` and `FROM --platform` parse to, what the planner's
//! `BUILDPLATFORM`/`TARGETPLATFORM` arguments are made from, and what index
//! entries and image configs carry.
//!
//! Promises: [`Platform::normalized`] is containerd's normalisation (the one
//! BuildKit applies to build platforms): names lower-cased, architecture
//! aliases (`aarch64`, `x86_64`, `armhf`, ...) mapped to Go's names, `arm64`'s
//! default variant `v8` dropped and `arm`'s default `v7` filled in, so
//! `linux/arm64` and `linux/arm64/v8` are one platform (printed
//! `linux/arm64`), and `linux/arm` is `linux/arm/v7`. [`Platform::matches`]
//! compares the normalised OS, architecture and variant of both sides (that
//! is the rule that picks one manifest out of an index); `os.version` and
//! `os.features` are carried but not compared.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Platform {
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
    #[serde(
        rename = "os.features",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_features: Option<Vec<String>>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid platform {0:?}: expected os/arch[/variant], e.g. linux/amd64 or linux/arm64/v8")]
pub struct PlatformError(pub String);

impl Platform {
    pub fn new(os: &str, architecture: &str, variant: Option<&str>) -> Self {
        Platform {
            os: os.to_string(),
            architecture: architecture.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
            os_features: None,
        }
    }

    /// The platform kiln runs on (always `linux`), normalised.
    pub fn host() -> Self {
        let arch = match std::env::consts::ARCH {
            "x86" => "386",
            "powerpc64" => "ppc64le",
            // Rust's other names are either Go's or aliases `normalized`
            // knows (x86_64, aarch64, arm).
            other => other,
        };
        Platform::new("linux", arch, None).normalized()
    }

    /// The same platform in containerd's normal form (see the module doc);
    /// `os.version` and `os.features` are kept as they are.
    pub fn normalized(&self) -> Platform {
        let os = match self.os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_string(),
            other => other.to_string(),
        };
        let arch = self.architecture.to_ascii_lowercase();
        let variant = self.variant.as_deref().map(str::to_ascii_lowercase);
        let (arch, variant): (&str, Option<String>) = match (arch.as_str(), variant.as_deref()) {
            ("i386", _) => ("386", None),
            ("x86_64" | "x86-64" | "amd64", Some("v1")) => ("amd64", None),
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64", v.map(str::to_string)),
            ("aarch64" | "arm64", Some("8" | "v8" | "v8.0") | None) => ("arm64", None),
            ("aarch64" | "arm64", Some("9" | "9.0" | "v9.0")) => ("arm64", Some("v9".into())),
            ("aarch64" | "arm64", v) => ("arm64", v.map(str::to_string)),
            ("armhf", _) => ("arm", Some("v7".into())),
            ("armel", _) => ("arm", Some("v6".into())),
            ("arm", None | Some("7")) => ("arm", Some("v7".into())),
            ("arm", Some(v @ ("5" | "6" | "8"))) => ("arm", Some(format!("v{v}"))),
            (a, v) => (a, v.map(str::to_string)),
        };
        Platform {
            os,
            architecture: arch.to_string(),
            variant,
            os_version: self.os_version.clone(),
            os_features: self.os_features.clone(),
        }
    }

    /// Whether an image for `candidate` satisfies a request for `self`:
    /// the same OS, architecture and variant once both are normalised.
    pub fn matches(&self, candidate: &Platform) -> bool {
        let (want, have) = (self.normalized(), candidate.normalized());
        want.os == have.os && want.architecture == have.architecture && want.variant == have.variant
    }
}

/// Picks the index entry for `platform` (entries without a platform never
/// match, so attestation manifests are skipped).
pub fn select_platform<'a>(
    entries: &'a [super::Descriptor],
    platform: &Platform,
) -> Option<&'a super::Descriptor> {
    entries
        .iter()
        .find(|d| d.platform.as_ref().is_some_and(|p| platform.matches(p)))
}

impl FromStr for Platform {
    type Err = PlatformError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split('/').collect();
        if parts.iter().any(|p| p.is_empty()) {
            return Err(PlatformError(s.to_string()));
        }
        match parts.as_slice() {
            [os, arch] => Ok(Platform::new(os, arch, None)),
            [os, arch, variant] => Ok(Platform::new(os, arch, Some(variant))),
            _ => Err(PlatformError(s.to_string())),
        }
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_os_arch_variant() {
        let p: Platform = "linux/arm64/v8".parse().unwrap();
        assert_eq!(
            (p.os.as_str(), p.architecture.as_str(), p.variant.as_deref()),
            ("linux", "arm64", Some("v8"))
        );
        assert_eq!(p.to_string(), "linux/arm64/v8");
        assert_eq!(
            "linux/amd64".parse::<Platform>().unwrap().to_string(),
            "linux/amd64"
        );
        assert!("linux".parse::<Platform>().is_err());
        assert!("linux//v7".parse::<Platform>().is_err());
        assert!("a/b/c/d".parse::<Platform>().is_err());
    }

    #[test]
    fn implied_variants_match_explicit_ones() {
        let want: Platform = "linux/arm64".parse().unwrap();
        assert!(want.matches(&"linux/arm64/v8".parse().unwrap()));
        let want: Platform = "linux/arm/v7".parse().unwrap();
        assert!(want.matches(&"linux/arm".parse().unwrap()));
        assert!(!want.matches(&"linux/arm/v6".parse().unwrap()));
    }

    #[test]
    fn different_os_or_arch_do_not_match() {
        let want: Platform = "linux/amd64".parse().unwrap();
        assert!(!want.matches(&"linux/arm64".parse().unwrap()));
        assert!(!want.matches(&"windows/amd64".parse().unwrap()));
        assert!(want.matches(&"linux/amd64".parse().unwrap()));
    }

    #[test]
    fn host_platform_is_linux_and_normalised() {
        let host = Platform::host();
        assert_eq!(host.os, "linux");
        assert_eq!(host, host.normalized());
    }

    fn norm(s: &str) -> String {
        s.parse::<Platform>().unwrap().normalized().to_string()
    }

    #[test]
    fn normalisation_is_containerds() {
        for (given, want) in [
            ("linux/arm64/v8", "linux/arm64"),
            ("linux/arm64", "linux/arm64"),
            ("linux/aarch64", "linux/arm64"),
            ("linux/arm64/8", "linux/arm64"),
            ("linux/arm64/v9.0", "linux/arm64/v9"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/7", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/armel", "linux/arm/v6"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/amd64/v1", "linux/amd64"),
            ("linux/amd64/v3", "linux/amd64/v3"),
            ("linux/i386", "linux/386"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/riscv64", "linux/riscv64"),
        ] {
            assert_eq!(norm(given), want, "{given}");
        }
    }

    /// The two types kiln used to have disagreed here: the planner gave
    /// `linux/arm64` no variant, the index matcher `v8`. Both spellings
    /// must now be one platform on either side of a match.
    #[test]
    fn arm64_with_and_without_v8_is_one_platform_both_ways() {
        let bare: Platform = "linux/arm64".parse().unwrap();
        let v8: Platform = "linux/arm64/v8".parse().unwrap();
        assert!(bare.matches(&v8) && v8.matches(&bare));
        assert_eq!(bare.normalized(), v8.normalized());
        assert!(!v8.matches(&"linux/arm64/v9".parse().unwrap()));
    }

    #[test]
    fn index_entry_is_chosen_by_normalised_platform() {
        let index: crate::oci::Index = serde_json::from_value(serde_json::json!({
            "schemaVersion": 2,
            "manifests": [
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": format!("sha256:{}", "a".repeat(64)), "size": 1,
                 "platform": {"os": "linux", "architecture": "amd64"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": format!("sha256:{}", "b".repeat(64)), "size": 1,
                 "platform": {"os": "linux", "architecture": "arm", "variant": "v7"}},
                {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                 "digest": format!("sha256:{}", "c".repeat(64)), "size": 1,
                 "platform": {"os": "linux", "architecture": "arm64", "variant": "v8"}}
            ]
        }))
        .unwrap();
        let pick = |want: &str| {
            select_platform(&index.manifests, &want.parse().unwrap())
                .map(|d| d.digest.to_string().chars().last().unwrap())
        };
        assert_eq!(pick("linux/arm64"), Some('c'));
        assert_eq!(pick("linux/aarch64"), Some('c'));
        assert_eq!(pick("linux/arm"), Some('b'));
        assert_eq!(pick("linux/x86_64"), Some('a'));
        assert_eq!(pick("linux/arm/v6"), None);
        assert_eq!(pick("windows/amd64"), None);
    }
}
