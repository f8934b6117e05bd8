//! Namespaces: a tenant's view of the cache entries.
//!
//! Promises: a [`Namespace`] is always valid (1-63 characters of a-z, 0-9,
//! '.', '_', '-', starting with a letter or digit) or the default, empty
//! one; it serialises as its name (the default as `""`), so both backends
//! and the admin API spell it the same way.

use serde::{Deserialize, Serialize};

/// A tenant's view of the entries. The default namespace is empty.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Namespace(String);

/// A namespace name that breaks the rules of [`Namespace`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "namespace {0:?} is invalid (1-63 characters of a-z, 0-9, '.', '_', '-', starting with a letter or digit)"
)]
pub struct InvalidNamespace(pub String);

impl Namespace {
    pub fn new(name: &str) -> Result<Self, InvalidNamespace> {
        let ok = !name.is_empty()
            && name.len() <= 63
            && name.bytes().enumerate().all(|(i, b)| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || (i > 0 && matches!(b, b'.' | b'_' | b'-'))
            });
        if ok {
            Ok(Self(name.to_owned()))
        } else {
            Err(InvalidNamespace(name.to_owned()))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Namespace {
    type Error = InvalidNamespace;
    fn try_from(s: String) -> Result<Self, InvalidNamespace> {
        if s.is_empty() {
            Ok(Self::default())
        } else {
            Self::new(&s)
        }
    }
}

impl From<Namespace> for String {
    fn from(ns: Namespace) -> String {
        ns.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_the_documented_rules() {
        assert!(Namespace::new("team-a").is_ok());
        assert!(Namespace::new("a.b_c-1").is_ok());
        for bad in ["", "Bad/NS", "-lead", "UPPER", &"x".repeat(64)] {
            assert!(Namespace::new(bad).is_err(), "{bad:?}");
        }
        let ns: Namespace = serde_json::from_str(r#""""#).unwrap();
        assert_eq!(ns, Namespace::default());
        assert!(serde_json::from_str::<Namespace>(r#""Bad""#).is_err());
    }
}
