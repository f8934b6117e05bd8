//! Registry credentials and authentication challenges, found the way
//! Docker and Kaniko find them.
//!
//! Credentials come from explicit configuration or Docker's `config.json`,
//! the first that exists of `$DOCKER_CONFIG/config.json` (`$DOCKER_CONFIG`
//! may also name the file itself), `/kaniko/.docker/config.json` (where
//! Kaniko jobs write it) and `~/.docker/config.json`. In it: `auths` entries
//! (`auth` = base64 `user:password`, `username`/`password`,
//! `identitytoken` = an OAuth2 refresh token exchanged at the token realm,
//! `registrytoken` = a bearer token sent as it is), `credHelpers` and
//! `credsStore`, which run `docker-credential-<helper> get` with the server
//! on stdin (a `<token>` username in its answer means the secret is an
//! identity token). Docker Hub's names (`docker.io`, `index.docker.io`,
//! `registry-1.docker.io`, `https://index.docker.io/v1/`) are one registry.
//! Where the credentials came from is kept, so an authentication error can
//! name the file. Challenges are the `WWW-Authenticate` headers of a 401:
//! `Basic realm=...` or `Bearer realm=...,service=...,scope=...`.

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
/// Where Kaniko's image keeps the Docker configuration.
pub const KANIKO_DOCKER_CONFIG: &str = "/kaniko/.docker/config.json";

/// What a client presents to a registry.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    pub username: String,
    pub password: String,
    /// An OAuth2 refresh token (`identitytoken`): exchanged for an access
    /// token at the Bearer realm (`grant_type=refresh_token`), as Docker
    /// does; ACR and other OAuth2 registries issue these.
    pub identity_token: Option<String>,
    /// A bearer token for the registry itself (`registrytoken`), sent
    /// without any exchange.
    pub registry_token: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({}, <redacted>)", self.describe())
    }
}

impl Credentials {
    pub fn new(username: &str, password: &str) -> Self {
        Credentials {
            username: username.to_string(),
            password: password.to_string(),
            identity_token: None,
            registry_token: None,
        }
    }

    /// An identity (OAuth2 refresh) token; `username` is kept for the
    /// messages only (Docker writes `<token>` or the account name).
    pub fn with_identity_token(username: &str, token: &str) -> Self {
        Credentials {
            identity_token: Some(token.to_string()),
            ..Credentials::new(username, "")
        }
    }

    pub fn with_registry_token(token: &str) -> Self {
        Credentials {
            registry_token: Some(token.to_string()),
            ..Credentials::new("", "")
        }
    }

    pub fn basic_header(&self) -> String {
        let raw = format!("{}:{}", self.username, self.password);
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(raw)
        )
    }

    /// How they appear in messages, never with a secret.
    pub fn describe(&self) -> String {
        match (&self.registry_token, &self.identity_token) {
            (Some(_), _) => "a registry token".to_string(),
            (None, Some(_)) if self.username.is_empty() || self.username == "<token>" => {
                "an identity token".to_string()
            }
            (None, Some(_)) => format!("an identity token of {}", self.username),
            (None, None) => self.username.clone(),
        }
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
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

/// Docker's `config.json`, loaded once.
#[derive(Debug, Default)]
pub struct DockerConfig {
    file: DockerConfigFile,
    path: Option<PathBuf>,
    /// The files looked for when none was found (for messages).
    searched: Vec<PathBuf>,
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

/// Whether `host` is one of Docker Hub's names.
pub fn is_hub(host: &str) -> bool {
    matches!(
        key_host(host),
        "docker.io" | "index.docker.io" | "registry-1.docker.io"
    )
}

/// The config files to try, in order: `$DOCKER_CONFIG` (a directory, or
/// the file itself), Kaniko's, then `~/.docker`.
fn candidates(
    docker_config: Option<PathBuf>,
    home: Option<PathBuf>,
    kaniko: &Path,
) -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Some(d) = docker_config.filter(|d| !d.as_os_str().is_empty()) {
        if d.is_file() {
            out.push(d);
        } else {
            out.push(d.join("config.json"));
        }
    }
    out.push(kaniko.to_path_buf());
    if let Some(h) = home.filter(|h| !h.as_os_str().is_empty()) {
        out.push(h.join(".docker/config.json"));
    }
    out
}

impl DockerConfig {
    /// Loads the first `config.json` that exists (see the module
    /// documentation); none means no credentials.
    pub fn load_default() -> Result<Self, RegistryError> {
        Self::load_first(&candidates(
            std::env::var_os("DOCKER_CONFIG").map(PathBuf::from),
            std::env::var_os("HOME").map(PathBuf::from),
            Path::new(KANIKO_DOCKER_CONFIG),
        ))
    }

    /// Loads the first of `paths` that exists.
    pub fn load_first(paths: &[PathBuf]) -> Result<Self, RegistryError> {
        for p in paths {
            if p.is_file() {
                return Self::load(p);
            }
        }
        Ok(DockerConfig {
            searched: paths.to_vec(),
            ..DockerConfig::default()
        })
    }

    /// Loads a specific `config.json`; a missing file means no credentials.
    pub fn load(path: &Path) -> Result<Self, RegistryError> {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(DockerConfig {
                    searched: vec![path.to_path_buf()],
                    ..DockerConfig::default()
                });
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
            searched: Vec::new(),
            helper_dirs: Vec::new(),
        })
    }

    /// The file the credentials were read from, if one was found.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// Where credentials for `registry` were looked for, for messages:
    /// `/kaniko/.docker/config.json`, or that no file was found and where.
    pub fn source_description(&self) -> String {
        match &self.path {
            Some(p) => format!("Docker config {}", p.display()),
            None if self.searched.is_empty() => "no Docker config (not read)".to_string(),
            None => format!(
                "no Docker config found (looked for {})",
                self.searched
                    .iter()
                    .map(|p| p.display().to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// The value of the first key of `map` naming `registry`: the exact
    /// key first, then keys with the same host (Docker Hub's aliases are
    /// one host), in sorted order so the choice does not depend on hashing.
    fn find<'a, V>(map: &'a HashMap<String, V>, registry: &str) -> Option<&'a V> {
        let hub = is_hub(registry);
        if let Some(v) = map.get(registry) {
            return Some(v);
        }
        if hub && let Some(v) = map.get(DOCKER_HUB_CONFIG_KEY) {
            return Some(v);
        }
        let mut keys: Vec<&String> = map
            .keys()
            .filter(|k| key_host(k) == registry || (hub && is_hub(k)))
            .collect();
        keys.sort();
        keys.first().and_then(|k| map.get(*k))
    }

    /// Credentials for a registry host (`docker.io` for Docker Hub).
    pub fn credentials_for(&self, registry: &str) -> Result<Option<Credentials>, RegistryError> {
        let hub = is_hub(registry) || registry == DOCKER_HUB;
        let server = if hub { DOCKER_HUB_CONFIG_KEY } else { registry };
        let helper = Self::find(&self.file.cred_helpers, registry)
            .cloned()
            .or_else(|| self.file.creds_store.clone())
            .filter(|h| !h.is_empty());
        if let Some(helper) = helper
            && let Some(c) = run_credential_helper(&helper, server, &self.helper_dirs)?
        {
            return Ok(Some(c));
        }
        let Some(entry) = Self::find(&self.file.auths, registry) else {
            return Ok(None);
        };
        if let Some(t) = entry.registrytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::with_registry_token(t)));
        }
        let (mut user, mut password) = (entry.username.clone(), entry.password.clone());
        if let Some(auth) = entry.auth.as_deref().filter(|a| !a.trim().is_empty()) {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(auth.trim())
                .map_err(|e| self.bad(registry, &format!("auth is not base64: {e}")))?;
            let text =
                String::from_utf8(decoded).map_err(|_| self.bad(registry, "auth is not UTF-8"))?;
            let (u, p) = text
                .split_once(':')
                .ok_or_else(|| self.bad(registry, "auth is not user:password"))?;
            user = Some(u.to_string());
            password = Some(p.to_string());
        }
        if let Some(t) = entry.identitytoken.as_deref().filter(|t| !t.is_empty()) {
            return Ok(Some(Credentials::with_identity_token(
                user.as_deref().unwrap_or(""),
                t,
            )));
        }
        match (user, password) {
            (Some(u), Some(p)) => Ok(Some(Credentials::new(&u, &p))),
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
    // Docker's convention: a helper storing an identity token answers
    // with the username `<token>`.
    if parsed.username == "<token>" {
        return Ok(Some(Credentials::with_identity_token(
            &parsed.username,
            &parsed.secret,
        )));
    }
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

    #[test]
    fn config_is_found_at_docker_config_then_kaniko_then_home() {
        let dir = tempfile::tempdir().unwrap();
        let (dc, kaniko, home) = (
            dir.path().join("dc"),
            dir.path().join("kaniko/.docker/config.json"),
            dir.path().join("home"),
        );
        for d in [
            &dc,
            &kaniko.parent().unwrap().to_path_buf(),
            &home.join(".docker"),
        ] {
            std::fs::create_dir_all(d).unwrap();
        }
        let write = |p: &Path, user: &str| {
            std::fs::write(
                p,
                format!(r#"{{"auths":{{"r.example":{{"username":"{user}","password":"x"}}}}}}"#),
            )
            .unwrap()
        };
        let user = |paths: Vec<PathBuf>| {
            DockerConfig::load_first(&paths)
                .unwrap()
                .credentials_for("r.example")
                .unwrap()
                .map(|c| c.username)
        };
        let all = || candidates(Some(dc.clone()), Some(home.clone()), &kaniko);
        assert_eq!(user(all()), None);
        let none = DockerConfig::load_first(&all())
            .unwrap()
            .source_description();
        assert!(
            none.contains("no Docker config found") && none.contains("kaniko/.docker/config.json"),
            "{none}"
        );
        write(&home.join(".docker/config.json"), "home");
        assert_eq!(user(all()).as_deref(), Some("home"));
        write(&kaniko, "kaniko");
        assert_eq!(user(all()).as_deref(), Some("kaniko"));
        write(&dc.join("config.json"), "dc");
        assert_eq!(user(all()).as_deref(), Some("dc"));
        // $DOCKER_CONFIG may name the file itself.
        let file = dir.path().join("other.json");
        write(&file, "file");
        assert_eq!(
            user(candidates(Some(file.clone()), None, &kaniko)).as_deref(),
            Some("file")
        );
        let cfg = DockerConfig::load_first(&all()).unwrap();
        assert_eq!(cfg.path(), Some(dc.join("config.json").as_path()));
        assert!(cfg.source_description().contains("dc/config.json"));
    }

    #[test]
    fn identity_and_registry_tokens_are_read_from_auths() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("config.json");
        let auth = base64::engine::general_purpose::STANDARD
            .encode("00000000-0000-0000-0000-000000000000:");
        std::fs::write(
            &p,
            format!(
                r#"{{"auths":{{
                    "acr.example":{{"auth":"{auth}","identitytoken":"refresh-me"}},
                    "tok.example":{{"registrytoken":"bearer-me"}},
                    "plain.example":{{"identitytoken":"only-token"}}}}}}"#
            ),
        )
        .unwrap();
        let cfg = DockerConfig::load(&p).unwrap();
        let acr = cfg.credentials_for("acr.example").unwrap().unwrap();
        assert_eq!(acr.identity_token.as_deref(), Some("refresh-me"));
        assert_eq!(acr.username, "00000000-0000-0000-0000-000000000000");
        let tok = cfg.credentials_for("tok.example").unwrap().unwrap();
        assert_eq!(tok.registry_token.as_deref(), Some("bearer-me"));
        assert_eq!(tok.describe(), "a registry token");
        let plain = cfg.credentials_for("plain.example").unwrap().unwrap();
        assert_eq!(plain.identity_token.as_deref(), Some("only-token"));
        assert!(
            !format!("{plain:?}").contains("only-token"),
            "secrets stay out of Debug"
        );
    }

    #[test]
    fn docker_hub_is_found_under_any_of_its_names() {
        let dir = tempfile::tempdir().unwrap();
        for key in [
            "https://index.docker.io/v1/",
            "index.docker.io",
            "docker.io",
            "registry-1.docker.io",
            "https://index.docker.io/v2/",
        ] {
            let p = dir.path().join("config.json");
            std::fs::write(
                &p,
                format!(r#"{{"auths":{{"{key}":{{"username":"hub","password":"pw"}}}}}}"#),
            )
            .unwrap();
            let cfg = DockerConfig::load(&p).unwrap();
            for name in ["docker.io", "index.docker.io", "registry-1.docker.io"] {
                assert_eq!(
                    cfg.credentials_for(name).unwrap(),
                    Some(Credentials::new("hub", "pw")),
                    "{key} for {name}"
                );
            }
            assert_eq!(cfg.credentials_for("quay.io").unwrap(), None);
        }
        // The exact key wins over an alias.
        let p = dir.path().join("both.json");
        std::fs::write(
            &p,
            r#"{"auths":{"docker.io":{"username":"alias","password":"a"},"https://index.docker.io/v1/":{"username":"exact","password":"e"}}}"#,
        )
        .unwrap();
        let cfg = DockerConfig::load(&p).unwrap();
        assert_eq!(
            cfg.credentials_for("index.docker.io")
                .unwrap()
                .unwrap()
                .username,
            "exact"
        );
    }

    #[test]
    fn a_helper_answering_token_as_username_gives_an_identity_token() {
        let dir = tempfile::tempdir().unwrap();
        let helper = dir.path().join("docker-credential-kilntok");
        std::fs::write(
            &helper,
            "#!/bin/sh\nread server\necho \"{\\\"ServerURL\\\":\\\"$server\\\",\\\"Username\\\":\\\"<token>\\\",\\\"Secret\\\":\\\"rt-$server\\\"}\"\n",
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&helper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let p = dir.path().join("config.json");
        std::fs::write(&p, r#"{"credsStore":"kilntok"}"#).unwrap();
        let mut cfg = DockerConfig::load(&p).unwrap();
        cfg.helper_dirs.push(dir.path().to_path_buf());
        let c = cfg.credentials_for("acr.example").unwrap().unwrap();
        assert_eq!(c.identity_token.as_deref(), Some("rt-acr.example"));
        // Docker Hub is asked for under its config key.
        let hub = cfg.credentials_for("docker.io").unwrap().unwrap();
        assert_eq!(
            hub.identity_token.as_deref(),
            Some("rt-https://index.docker.io/v1/")
        );
    }
}
