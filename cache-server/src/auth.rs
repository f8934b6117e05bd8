//! Bearer-token authentication and scopes.
//!
//! The tokens file (TOML) lists only sha256 hashes of tokens, never the
//! tokens themselves, so a leaked file grants nothing:
//!
//! ```toml
//! anonymous_read = false          # optional: unauthenticated lookups/GETs
//!
//! [[token]]
//! name = "ci"                     # optional, shown in logs
//! sha256 = "<64 hex: sha256 of the token>"
//! scopes = ["read", "write"]      # read, write, admin (admin implies all)
//! namespace = "team-a"            # optional; default namespace otherwise
//! ```
//!
//! A token bound to a namespace reads and writes only that namespace's
//! entries (the store prefixes index keys with it). Blobs are
//! content-addressed and shared: knowing a digest already implies knowing
//! the content.

use std::collections::HashMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use kiln_storage::Namespace;

/// What a caller may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }
}

/// An authenticated (or anonymous) caller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    pub name: String,
    pub scopes: Vec<Scope>,
    pub namespace: Namespace,
}

impl Principal {
    pub fn allows(&self, scope: Scope) -> bool {
        self.scopes.contains(&Scope::Admin) || self.scopes.contains(&scope)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("reading tokens file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("tokens file {path}: {message}")]
    Invalid { path: String, message: String },
    /// No credentials and anonymous access is off.
    #[error("authentication required: send Authorization: Bearer <token>")]
    Missing,
    /// Credentials that match no token.
    #[error("the bearer token is not valid")]
    BadToken,
    #[error("this token lacks the {0} scope")]
    Forbidden(&'static str),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    #[serde(default)]
    anonymous_read: bool,
    #[serde(default, rename = "token")]
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenRecord {
    #[serde(default)]
    name: Option<String>,
    sha256: String,
    scopes: Vec<Scope>,
    #[serde(default)]
    namespace: Option<String>,
}

/// The server's authentication policy.
#[derive(Debug, Clone)]
pub enum Auth {
    /// No tokens file: everyone may do everything in the default namespace.
    Open,
    Tokens {
        by_hash: HashMap<[u8; 32], Principal>,
        anonymous_read: bool,
    },
}

impl Auth {
    /// Loads and validates a tokens file.
    pub fn from_file(path: &Path) -> Result<Auth, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_toml(&text).map_err(|message| AuthError::Invalid {
            path: path.display().to_string(),
            message,
        })
    }

    fn from_toml(text: &str) -> Result<Auth, String> {
        let file: TokensFile = toml::from_str(text).map_err(|e| e.to_string())?;
        let mut by_hash = HashMap::new();
        for (i, record) in file.tokens.into_iter().enumerate() {
            let mut hash = [0u8; 32];
            hex::decode_to_slice(record.sha256.to_ascii_lowercase(), &mut hash)
                .map_err(|_| format!("token #{}: sha256 must be 64 hex characters", i + 1))?;
            if record.scopes.is_empty() {
                return Err(format!("token #{}: scopes must not be empty", i + 1));
            }
            let namespace = match record.namespace.as_deref() {
                None | Some("") => Namespace::default(),
                Some(ns) => Namespace::new(ns).map_err(|e| format!("token #{}: {e}", i + 1))?,
            };
            let principal = Principal {
                name: record.name.unwrap_or_else(|| format!("token#{}", i + 1)),
                scopes: record.scopes,
                namespace,
            };
            if by_hash.insert(hash, principal).is_some() {
                return Err(format!(
                    "token #{}: the same token hash is listed twice",
                    i + 1
                ));
            }
        }
        Ok(Auth::Tokens {
            by_hash,
            anonymous_read: file.anonymous_read,
        })
    }

    /// Who is calling, from the `Authorization` header value (if any).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Principal, AuthError> {
        let (by_hash, anonymous_read) = match self {
            Auth::Open => {
                return Ok(Principal {
                    name: "anonymous".into(),
                    scopes: vec![Scope::Read, Scope::Write, Scope::Admin],
                    namespace: Namespace::default(),
                });
            }
            Auth::Tokens {
                by_hash,
                anonymous_read,
            } => (by_hash, *anonymous_read),
        };
        let Some(header) = authorization else {
            return if anonymous_read {
                Ok(Principal {
                    name: "anonymous".into(),
                    scopes: vec![Scope::Read],
                    namespace: Namespace::default(),
                })
            } else {
                Err(AuthError::Missing)
            };
        };
        let token = header
            .strip_prefix("Bearer ")
            .or_else(|| header.strip_prefix("bearer "))
            .map(str::trim)
            .ok_or(AuthError::BadToken)?;
        // Tokens are looked up by their hash: the comparison that could leak
        // timing happens on a sha256 output, which reveals nothing about
        // the token.
        let hash: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        by_hash.get(&hash).cloned().ok_or(AuthError::BadToken)
    }

    /// [`Auth::authenticate`] plus a scope check.
    pub fn require(
        &self,
        authorization: Option<&str>,
        scope: Scope,
    ) -> Result<Principal, AuthError> {
        let principal = self.authenticate(authorization)?;
        if principal.allows(scope) {
            Ok(principal)
        } else if authorization.is_none() {
            // An anonymous caller asking for more than anonymous access
            // should log in, not be told it is forbidden.
            Err(AuthError::Missing)
        } else {
            Err(AuthError::Forbidden(scope.as_str()))
        }
    }

    pub fn is_open(&self) -> bool {
        matches!(self, Auth::Open)
    }
}

/// Hex sha256 of a token, as written in the tokens file.
pub fn hash_token(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// A new random token (256 bits, hex, with a recognisable prefix so
/// secret scanners can find leaked ones).
pub fn generate_token() -> String {
    format!("kiln_{}", hex::encode(rand::random::<[u8; 32]>()))
}

/// The `[[token]]` table to paste into the tokens file for `token`.
pub fn token_toml(
    token: &str,
    name: Option<&str>,
    scopes: &[Scope],
    namespace: Option<&str>,
) -> String {
    let mut out = String::from("[[token]]\n");
    if let Some(name) = name {
        out.push_str(&format!("name = {}\n", toml_string(name)));
    }
    out.push_str(&format!("sha256 = \"{}\"\n", hash_token(token)));
    let scopes: Vec<String> = scopes
        .iter()
        .map(|s| format!("\"{}\"", s.as_str()))
        .collect();
    out.push_str(&format!("scopes = [{}]\n", scopes.join(", ")));
    if let Some(ns) = namespace {
        out.push_str(&format!("namespace = {}\n", toml_string(ns)));
    }
    out
}

fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> (Auth, String, String) {
        let reader = generate_token();
        let admin = generate_token();
        let text = format!(
            "{}\n{}",
            token_toml(&reader, Some("reader"), &[Scope::Read], Some("team-a")),
            token_toml(&admin, None, &[Scope::Admin], None)
        );
        (Auth::from_toml(&text).unwrap(), reader, admin)
    }

    #[test]
    fn generated_snippet_authenticates_the_generated_token() {
        let (auth, reader, admin) = policy();
        let p = auth
            .authenticate(Some(&format!("Bearer {reader}")))
            .unwrap();
        assert_eq!(p.name, "reader");
        assert_eq!(p.namespace, Namespace::new("team-a").unwrap());
        assert!(p.allows(Scope::Read) && !p.allows(Scope::Write));
        let a = auth
            .require(Some(&format!("Bearer {admin}")), Scope::Write)
            .unwrap();
        assert_eq!(a.namespace, Namespace::default());
    }

    #[test]
    fn missing_bad_and_underprivileged_tokens_are_refused() {
        let (auth, reader, _) = policy();
        assert!(matches!(auth.authenticate(None), Err(AuthError::Missing)));
        assert!(matches!(
            auth.authenticate(Some("Bearer kiln_nope")),
            Err(AuthError::BadToken)
        ));
        assert!(matches!(
            auth.authenticate(Some(&format!("Basic {reader}"))),
            Err(AuthError::BadToken)
        ));
        assert!(matches!(
            auth.require(Some(&format!("Bearer {reader}")), Scope::Write),
            Err(AuthError::Forbidden("write"))
        ));
    }

    #[test]
    fn anonymous_read_is_only_read() {
        let auth = Auth::from_toml("anonymous_read = true\n").unwrap();
        assert!(auth.require(None, Scope::Read).is_ok());
        assert!(matches!(
            auth.require(None, Scope::Write),
            Err(AuthError::Missing)
        ));
    }

    #[test]
    fn malformed_files_are_rejected_with_the_reason() {
        for (text, needle) in [
            (
                "[[token]]\nsha256 = \"abc\"\nscopes = [\"read\"]\n",
                "64 hex",
            ),
            ("[[token]]\nsha256 = \"", "string"),
            (
                "[[token]]\nsha256 = \"00000000000000000000000000000000000000000000000000000000000000000\"\nscopes = [\"fly\"]\n",
                "fly",
            ),
            ("plain_tokens = [\"x\"]\n", "unknown field"),
        ] {
            let err = Auth::from_toml(text).unwrap_err();
            assert!(err.contains(needle), "{err}");
        }
    }
}
