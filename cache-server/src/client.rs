//! A small HTTP client for the admin API, used by the `kiln-cache` CLI.
//!
//! It maps error answers back to their `{"error":{"code","message"}}`
//! body, so the CLI can print the server's reason and pick an exit code. A
//! TLS certificate that is refused (the server's, or ours under mutual TLS)
//! is its own error, naming the CA file trusted, not "cannot reach".

use std::path::PathBuf;

use kiln_common::{CacheEntry, CacheKey, ErrorBody};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;

use kiln_common::wire::admin::{EntryPage, GcReport, Leased, Stats, VerifyReport};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {status} {code}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {message}")]
    Transport { url: String, message: String },
    #[error("{url}: TLS certificate problem: {message} (trusted CAs: {trust})")]
    Certificate {
        url: String,
        message: String,
        trust: String,
    },
    #[error("{path}: {message}")]
    TlsFile { path: String, message: String },
    #[error("{url}: unexpected answer: {message}")]
    Decode { url: String, message: String },
}

impl ClientError {
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Status { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// How the admin client does TLS (`--ca-cert`, `--client-cert`,
/// `--client-key`, `--insecure`).
#[derive(Debug, Clone, Default)]
pub struct ClientTls {
    /// Accept any server certificate (self-signed test servers only).
    pub insecure: bool,
    /// PEM CA certificate(s) trusted besides the default ones: a private
    /// CA that signed the server's certificate.
    pub ca_cert: Option<PathBuf>,
    /// PEM client certificate chain and its key, for a server that requires
    /// client certificates (`--tls-client-ca`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

impl ClientTls {
    /// The trusted CAs, for messages.
    fn trust(&self) -> String {
        match &self.ca_cert {
            Some(ca) => format!("{} and the default CA certificates", ca.display()),
            None => {
                "the default CA certificates only; give a private CA with --ca-cert FILE".to_owned()
            }
        }
    }
}

/// Admin client for one server.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
    trust: String,
    has_identity: bool,
}

impl AdminClient {
    pub fn new(base: &str, token: Option<String>, tls: &ClientTls) -> Result<Self, ClientError> {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| ClientError::TlsFile {
                path: p.display().to_string(),
                message: e.to_string(),
            })
        };
        let invalid = |p: &PathBuf, e: reqwest::Error| ClientError::TlsFile {
            path: p.display().to_string(),
            message: kiln_common::errors::chain(&e),
        };
        let mut builder = reqwest::Client::builder().danger_accept_invalid_certs(tls.insecure);
        if let Some(ca) = &tls.ca_cert {
            let certs =
                reqwest::Certificate::from_pem_bundle(&read(ca)?).map_err(|e| invalid(ca, e))?;
            if certs.is_empty() {
                return Err(ClientError::TlsFile {
                    path: ca.display().to_string(),
                    message: "contains no PEM certificate".into(),
                });
            }
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        if let Some((cert, key)) = &tls.identity {
            let mut pem = read(cert)?;
            pem.push(b'\n');
            pem.extend(read(key)?);
            let identity = reqwest::Identity::from_pem(&pem).map_err(|e| invalid(cert, e))?;
            builder = builder.identity(identity);
        }
        let http = builder.build().map_err(|e| ClientError::Transport {
            url: base.to_owned(),
            message: kiln_common::errors::chain(&e),
        })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
            trust: tls.trust(),
            has_identity: tls.identity.is_some(),
        })
    }

    /// A failed exchange: a certificate problem, or a server not reached.
    /// An `https` connection closed by the server although we gave no
    /// client certificate is most likely a server requiring one
    /// ([`kiln_common::errors::is_connection_closed`]).
    fn transport(&self, url: &str, e: &reqwest::Error) -> ClientError {
        use kiln_common::errors::{is_certificate_problem, is_connection_closed};
        let mut message = kiln_common::errors::chain(e);
        let closed = url.starts_with("https://") && !self.has_identity && is_connection_closed(e);
        if closed {
            message = format!(
                "the server closed the connection, as one that requires client certificates \
                 does for a client without one (give --client-cert and --client-key): {message}"
            );
        }
        if closed || is_certificate_problem(e) {
            ClientError::Certificate {
                url: url.to_owned(),
                message,
                trust: self.trust.clone(),
            }
        } else {
            ClientError::Transport {
                url: url.to_owned(),
                message,
            }
        }
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Option<T>, ClientError> {
        let url = format!("{}{}", self.base, path);
        let mut request = self.http.request(method, &url).query(query);
        if let Some(token) = &self.token {
            request = request.bearer_auth(token);
        }
        let response = request.send().await.map_err(|e| self.transport(&url, &e))?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| self.transport(&url, &e))?;
        if !status.is_success() {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => (body.error.code, body.error.message),
                Err(_) => (
                    status.as_str().to_owned(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(ClientError::Status {
                url,
                status,
                code,
                message,
            });
        }
        if status == StatusCode::NO_CONTENT {
            return Ok(None);
        }
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ClientError::Decode {
                url,
                message: e.to_string(),
            })
    }

    async fn call_some<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<T, ClientError> {
        let url = format!("{}{}", self.base, path);
        self.call(method, path, query)
            .await?
            .ok_or(ClientError::Decode {
                url,
                message: "empty body".into(),
            })
    }

    pub async fn stats(&self) -> Result<Stats, ClientError> {
        self.call_some(Method::GET, "/v1/admin/stats", &[]).await
    }

    pub async fn list(
        &self,
        prefix: &str,
        after: Option<&CacheKey>,
        limit: usize,
    ) -> Result<EntryPage, ClientError> {
        let mut query = vec![("prefix", prefix.to_owned()), ("limit", limit.to_string())];
        if let Some(after) = after {
            query.push(("after", after.to_hex()));
        }
        self.call_some(Method::GET, "/v1/admin/entries", &query)
            .await
    }

    pub async fn get_entry(&self, key: &CacheKey) -> Result<CacheEntry, ClientError> {
        self.call_some(Method::GET, &format!("/v1/entries/{}", key.to_hex()), &[])
            .await
    }

    pub async fn delete_entry(&self, key: &CacheKey) -> Result<(), ClientError> {
        self.call::<serde_json::Value>(
            Method::DELETE,
            &format!("/v1/entries/{}", key.to_hex()),
            &[],
        )
        .await
        .map(|_| ())
    }

    pub async fn gc(&self) -> Result<Leased<GcReport>, ClientError> {
        self.call_some(Method::POST, "/v1/admin/gc", &[]).await
    }

    pub async fn verify(&self, repair: bool) -> Result<Leased<VerifyReport>, ClientError> {
        self.call_some(
            Method::POST,
            "/v1/admin/verify",
            &[("repair", repair.to_string())],
        )
        .await
    }
}
