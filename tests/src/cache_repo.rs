//! Helpers for the `--cache-repo` tests: what a [`Registry`] holds and was
//! asked, seen from outside kiln (its storage directory, its tag list, its
//! access log), and a Docker `config.json` with its credentials.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use base64::Engine;

use crate::Registry;

/// One line of the registry's access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub status: u16,
}

impl Registry {
    /// The file the registry serves blob `digest` (`sha256:<hex>`) from
    /// (Distribution's filesystem driver layout).
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    /// `GET /v2/<repo>/tags/list`: the repository's tags, none when it does
    /// not exist.
    pub fn tags(&self, repo: &str) -> Result<Vec<String>> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))?;
        stream.set_read_timeout(Some(Duration::from_secs(10)))?;
        let auth = match self.credentials() {
            Some((u, p)) => format!(
                "Authorization: Basic {}\r\n",
                base64::engine::general_purpose::STANDARD.encode(format!("{u}:{p}"))
            ),
            None => String::new(),
        };
        write!(
            stream,
            "GET /v2/{repo}/tags/list HTTP/1.1\r\nHost: {}\r\n{auth}Connection: close\r\n\r\n",
            self.host()
        )?;
        let mut response = String::new();
        stream.read_to_string(&mut response)?;
        let status: u16 = response
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .context("malformed HTTP status line")?;
        if status == 404 {
            return Ok(Vec::new());
        }
        // Distribution answers with chunked or plain bodies; the JSON object
        // is the part between the first '{' and the last '}'.
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, b)| b)
            .unwrap_or("");
        let (Some(start), Some(end)) = (body.find('{'), body.rfind('}')) else {
            bail!("tags/list of {repo}: HTTP {status}: {body}");
        };
        let json: serde_json::Value = serde_json::from_str(&body[start..=end])?;
        if status != 200 {
            bail!("tags/list of {repo}: HTTP {status}: {json}");
        }
        let mut tags: Vec<String> = json["tags"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        tags.sort();
        Ok(tags)
    }

    /// Every request in the access log so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        parse_access_log(&self.log())
    }

    /// A directory for `DOCKER_CONFIG` whose `config.json` holds this
    /// registry's credentials (none for a registry without auth).
    pub fn docker_config_dir(&self, parent: &Path) -> Result<PathBuf> {
        let dir = parent.join("docker-config");
        let auths = match self.credentials() {
            Some((u, p)) => serde_json::json!({
                self.host(): { "auth": crate::basic_auth_field(&u, &p) }
            }),
            None => serde_json::json!({}),
        };
        crate::write_docker_config(&dir, &serde_json::json!({ "auths": auths }))?;
        Ok(dir)
    }
}

/// The requests of a Distribution access log (combined log format:
/// `... "GET /v2/x/manifests/y HTTP/1.1" 200 ...`).
pub fn parse_access_log(log: &str) -> Vec<Request> {
    log.lines()
        .filter_map(|line| {
            let start = line.find("\"GET ").or_else(|| {
                ["HEAD", "PUT", "POST", "PATCH", "DELETE"]
                    .iter()
                    .find_map(|m| line.find(&format!("\"{m} ")))
            })?;
            let rest = &line[start + 1..];
            let (request, after) = rest.split_once('"')?;
            let mut parts = request.split_whitespace();
            let method = parts.next()?.to_string();
            let path = parts.next()?.to_string();
            let status = after.split_whitespace().next()?.parse().ok()?;
            Some(Request {
                method,
                path,
                status,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn access_log_lines_are_parsed() {
        let log = "time=\"x\" level=info msg=\"response completed\"\n\
            127.0.0.1 - - [02/Dec/2026:01:22:02 +0000] \"GET /v2/cache/manifests/kiln-ab HTTP/1.1\" 404 96 \"\" \"kiln/0.1.0\"\n\
            127.0.0.1 - - [02/Dec/2026:01:22:03 +0000] \"HEAD /v2/cache/blobs/sha256:00 HTTP/1.1\" 200 0 \"\" \"kiln/0.1.0\"\n";
        assert_eq!(
            parse_access_log(log),
            [
                Request {
                    method: "GET".into(),
                    path: "/v2/cache/manifests/kiln-ab".into(),
                    status: 404
                },
                Request {
                    method: "HEAD".into(),
                    path: "/v2/cache/blobs/sha256:00".into(),
                    status: 200
                }
            ]
        );
    }
}
