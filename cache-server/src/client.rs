//! A small HTTP client for the admin API, used by the `kiln-cache` CLI.
//!
//! It maps error answers back to their `{"error":{"code","message"}}`
//! body, so the CLI can print the server's reason and pick an exit code.

use kiln_common::{CacheEntry, CacheKey, ErrorBody};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::api::EntryPage;
use crate::store::{GcReport, Stats, VerifyReport};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{url}: {status} {code}: {message}")]
    Status {
        url: String,
        status: StatusCode,
        code: String,
        message: String,
    },
    #[error("cannot reach {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
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

/// A GC or verify answer. A replica over object storage adds whether it
/// held the GC lease (`false`: another replica did, nothing was done); the
/// local store leaves it out.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Leased<T> {
    #[serde(flatten)]
    pub report: T,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_held: Option<bool>,
}

impl<T> Leased<T> {
    /// True when another replica holds the GC lease and this one did nothing.
    pub fn refused(&self) -> bool {
        self.lease_held == Some(false)
    }
}

/// Admin client for one server.
pub struct AdminClient {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl AdminClient {
    /// `insecure` accepts any TLS certificate (self-signed test servers).
    pub fn new(base: &str, token: Option<String>, insecure: bool) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .danger_accept_invalid_certs(insecure)
            .build()
            .map_err(|source| ClientError::Transport {
                url: base.to_owned(),
                source,
            })?;
        Ok(Self {
            base: base.trim_end_matches('/').to_owned(),
            token,
            http,
        })
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
        let response = request
            .send()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
        let status = response.status();
        let bytes = response
            .bytes()
            .await
            .map_err(|source| ClientError::Transport {
                url: url.clone(),
                source,
            })?;
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
