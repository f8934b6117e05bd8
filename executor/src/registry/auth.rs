//! Registry credentials and authentication challenges.
//!
//! Credentials come from explicit configuration or Docker's `config.json`
//! (`$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`): `auths`
//! entries (`auth` = base64 `user:password`, or `username`/`password`), and
//! `credHelpers` / `credsStore`, which run `docker-credential-<helper> get`
//! with the server on stdin. Challenges are the `WWW-Authenticate` headers
//! of a 401: `Basic realm=...` or `Bearer realm=...,service=...,scope=...`.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use base64::Engine;
use serde::Deserialize;

use super::RegistryError;
use super::reference::DOCKER_HUB;

/// The key Docker uses for Docker Hub in `config.json`.
pub const DOCKER_HUB_CONFIG_KEY: &str = "https://index.docker.io/v1/";

#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.username)
    }
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Self {
        Credentials {
            username: username.to_string(),
            password: password.to_string(),
        }
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
struct DockerConfigFile {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
    #[serde(default)]
    creds_store: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "lowercase")]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
}

/// Docker's `config.json`, loaded once.
#[derive(Debug, Default)]
pub struct DockerConfig {
    file: DockerConfigFile,
    path: Option<PathBuf>,
    /// Directories searched for helpers before `PATH` (tests use it so that
    /// they need not change the process environment).
    helper_dirs: Vec<PathBuf>,
}

/// Strips a config key (`https://host/v1/`, `host`) down to the host.
fn key_host(key: &str) -> &str {
    let k = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    k.split('/').next().unwrap_or(k)
}

fn is_hub(host: &str) -> bool {
    matches!(
        host,
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

impl DockerConfig {
    /// Loads `$DOCKER_CONFIG/config.json`, else `~/.docker/config.json`;
    /// a missing file means no credentials.
    pub fn load_default() -> Result<Self, RegistryError> {
        let dir = match std::env::var_os("DOCKER_CONFIG") {
            Some(d) => PathBuf::from(d),
            None => match std::env::var_os("HOME") {
                Some(h) => PathBuf::from(h).join(".docker"),
                None => return Ok(DockerConfig::default()),
            },
        };
        Self::load(&dir.join("config.json"))
    }

    /// Loads a specific `config.json`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig::default());
            }
            Err(source) => {
                return Err(RegistryError::Io {
                    path: path.to_path_buf(),
                    source,
                });
            }
        };
        let file = serde_json::from_slice(&bytes)
            .map_err(|e| RegistryError::Config(format!("{}: {e}", path.display())))?;
        Ok(DockerConfig {
            file,
            path: Some(path.to_path_buf()),
            helper_dirs: Vec::new(),
        })
    }

    /// Credentials for a registry host (`docker.io` for Docker Hub).
    pub fn credentials_for(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        let hub = is_hub(registry) || registry == DOCKER_HUB;
        let server = if hub { DOCKER_HUB_CONFIG_KEY } else { registry };
        let helper = self
            .file
            .cred_helpers
            .iter()
            .find(|(k, _)| key_host(k) == registry || (hub && is_hub(key_host(k))))
            .map(|(_, v)| v.clone())
            .or_else(|| self.file.creds_store.clone());
        if let Some(helper) = helper
            && let Some(c) = run_credential_helper(&helper, server, &self.helper_dirs)?
        {
            return Ok(Some(c));
        }
        let entry = self
            .file
            .auths
            .iter()
            .find(|(k, _)| key_host(k) == registry || (hub && is_hub(key_host(k))))
            .map(|(_, v)| v);
        let Some(entry) = entry else { return Ok(None) };
        if let Some(auth) = &entry.auth {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| self.bad(registry, &format!("auth is not base64: {e}")))?;
            let text =
                String::from_utf8(decoded).map_err(|_| self.bad(registry, "auth is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| self.bad(registry, "auth is not user:password"))?;
            return Ok(Some(Credentials::new(u, p)));
        }
        match (&entry.username, &entry.password) {
            (Some(u), Some(p)) => Ok(Some(Credentials::new(u, p))),
            _ => Ok(None),
        }
    }

    fn bad(&self, registry: &str, why: &str) -> RegistryError {
        let at = self
            .path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_default();
        RegistryError::Config(format!("{at}: credentials for {registry}: {why}"))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperOutput {
    username: String,
    secret: String,
}

/// Runs `docker-credential-<helper> get`; "not found" answers mean none.
fn run_credential_helper(
    helper: &str,
    server: &str,
    dirs: &[PathBuf],
) -> Result<Option<Credentials>, RegistryError> {
    let program = format!("docker-credential-{helper}");
    let executable = dirs
        .iter()
        .map(|d| d.join(&program))
        .find(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from(&program));
    let err = |reason: String| RegistryError::CredentialHelper {
        helper: program.clone(),
        reason,
    };
    let mut child = Command::new(&executable)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| err(format!("cannot run: {e}")))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| err(format!("writing stdin: {e}")))?;
    }
    let out = child.wait_with_output().map_err(|e| err(e.to_string()))?;
    if !out.status.success() {
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        if text.to_lowercase().contains("not found") {
            return Ok(None);
        }
        return Err(err(format!("{}: {}", out.status, text.trim())));
    }
    let parsed: HelperOutput =
        serde_json::from_slice(&out.stdout).map_err(|e| err(format!("unexpected output: {e}")))?;
    Ok(Some(Credentials::new(&parsed.username, &parsed.secret)))
}

/// A parsed `WWW-Authenticate` challenge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Challenge {
    Basic,
    Bearer {
        realm: String,
        service: Option<String>,
    },
}

/// Parses `Scheme k="v", k2=v2` (quoted values may contain commas).
pub fn parse_challenge(header: &str) -> Option<Challenge> {
    let header = header.trim();
    let (scheme, rest) = header.split_once(' ').unwrap_or((header, ""));
    let params = parse_params(rest);
    match scheme.to_ascii_lowercase().as_str() {
        "basic" => Some(Challenge::Basic),
        "bearer" => Some(Challenge::Bearer {
            realm: params.get("realm")?.clone(),
            service: params.get("service").cloned(),
        }),
        _ => None,
    }
}

fn parse_params(s: &str) -> HashMap<String, String> {
    let mut out = HashMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let key: String = std::iter::from_fn(|| chars.next_if(|c| *c != '=')).collect();
        if key.is_empty() || chars.next().is_none() {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            value = std::iter::from_fn(|| chars.next_if(|c| *c != ',')).collect();
        }
        out.insert(key.trim().to_ascii_lowercase(), value.trim().to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_challenge_with_commas_in_scope_is_parsed() {
        let c = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#,
        );
        assert_eq!(
            c,
            Some(Challenge::Bearer {
                realm: "https://auth.docker.io/token".into(),
                service: Some("registry.docker.io".into())
            })
        );
        assert_eq!(
            parse_challenge(r#"Basic realm="Registry Realm""#),
            Some(Challenge::Basic)
        );
        assert_eq!(parse_challenge("Negotiate"), None);
        assert_eq!(
            parse_challenge("Bearer service=x"),
            None,
            "a bearer challenge needs a realm"
        );
    }

    #[test]
    fn config_auths_with_base64_and_plain_fields() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD.encode("alice:s3cr:et");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{"https://index.docker.io/v1/":{{"auth":"{auth}"}},"127.0.0.1:5000":{{"username":"bob","password":"pw"}},"https://reg.example/v2/":{{}}}}}}"#
            ),
        )
        .unwrap();
        let cfg = DockerConfig::load(&p).unwrap();
        assert_eq!(
            cfg.credentials_for("docker.io").unwrap(),
            Some(Credentials::new("alice", "s3cr:et"))
        );
        assert_eq!(
            cfg.credentials_for("127.0.0.1:5000").unwrap(),
            Some(Credentials::new("bob", "pw"))
        );
        assert_eq!(cfg.credentials_for("reg.example").unwrap(), None);
        assert_eq!(cfg.credentials_for("other.example").unwrap(), None);
    }

    #[test]
    fn missing_config_means_anonymous_and_bad_json_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let cfg = DockerConfig::load(&dir.path().join("absent.json")).unwrap();
        assert_eq!(cfg.credentials_for("docker.io").unwrap(), None);
        let p = dir.path().join("bad.json");
        std::fs::write(&p, "{").unwrap();
        let err = DockerConfig::load(&p).unwrap_err();
        assert!(err.to_string().contains("bad.json"), "{err}");
    }

    #[test]
    fn credential_helper_is_run_with_server_on_stdin() {
        let dir = tempfile::tempdir().unwrap();
        // A real executable helper, found through PATH like Docker does.
        let helper = dir.path().join("docker-credential-kilntest");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\nif [ \"$server\" = reg.example ]; then echo '{\"ServerURL\":\"reg.example\",\"Username\":\"u\",\"Secret\":\"s\"}'; else echo 'credentials not found in native keychain'; exit 1; fi\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(
            &p,
            r#"{"credHelpers":{"reg.example":"kilntest","other.example":"kilntest"}}"#,
        )
        .unwrap();
        let mut cfg = DockerConfig::load(&p).unwrap();
        cfg.helper_dirs.push(dir.path().to_path_buf());
        assert_eq!(
            cfg.credentials_for("reg.example").unwrap(),
            Some(Credentials::new("u", "s"))
        );
        assert_eq!(cfg.credentials_for("other.example").unwrap(), None);
        let p2 = dir.path().join("config2.json");
        std::fs::write(&p2, r#"{"credsStore":"absent-helper-kiln"}"#).unwrap();
        let err = DockerConfig::load(&p2)
            .unwrap()
            .credentials_for("x.example")
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("docker-credential-absent-helper-kiln"),
            "{err}"
        );
    }
}
