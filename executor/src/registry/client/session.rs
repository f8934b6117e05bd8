//! Talking to a registry as someone: credentials (Docker config, helpers),
//! the 401 challenge (Basic or Bearer tokens for exactly the scopes needed,
//! cached per scope), sending a request and retrying transient failures.

use super::*;

pub(super) fn pull_scope(repo: &str) -> String {
    format!("repository:{repo}:pull")
}

pub(super) fn push_scope(repo: &str) -> String {
    format!("repository:{repo}:pull,push")
}

impl RegistryClient {
    pub(super) fn credentials(&self, host: &str) -> Result<Option<Credentials>, RegistryError> {
        let lookup = if host == crate::registry::reference::DOCKER_HUB_API {
            DOCKER_HUB
        } else {
            host
        };
        if let Some(c) = self.opts.credentials.get(lookup) {
            return Ok(Some(c.clone()));
        }
        if let Some(c) = self.lock().credentials.get(lookup) {
            return Ok(c.clone());
        }
        let found = self.docker_config.credentials_for(lookup)?;
        self.lock()
            .credentials
            .insert(lookup.to_string(), found.clone());
        Ok(found)
    }

    /// Who we are at `host` and where that came from, for auth errors:
    /// `as alice (Docker config /kaniko/.docker/config.json)`.
    pub(super) fn identity_description(&self, host: &str) -> String {
        let lookup = if host == crate::registry::reference::DOCKER_HUB_API {
            DOCKER_HUB
        } else {
            host
        };
        if let Some(c) = self.opts.credentials.get(lookup) {
            return format!("as {} (given to the client)", c.describe());
        }
        match self.credentials(host) {
            Ok(Some(c)) => format!(
                "as {} ({})",
                c.describe(),
                self.docker_config.source_description()
            ),
            Ok(None) => match self.docker_config.path() {
                Some(p) => format!(
                    "anonymously ({} has no credentials for {lookup})",
                    p.display()
                ),
                None => format!("anonymously ({})", self.docker_config.source_description()),
            },
            Err(e) => format!("anonymously ({e})"),
        }
    }

    pub(super) fn lock(&self) -> std::sync::MutexGuard<'_, AuthState> {
        // A poisoned lock only means another task panicked mid-update of a
        // cache; the maps are still usable.
        self.auth.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The `Authorization` header for `scopes` on `ep`, if a challenge from
    /// that host is known (the first request to a host goes anonymous); a
    /// registry token is sent as it is, from the first request on.
    pub(super) async fn authorization(
        &self,
        ep: &Endpoint,
        scopes: &[String],
    ) -> Result<Option<String>, RegistryError> {
        let creds = self.credentials(&ep.host)?;
        if let Some(t) = creds.as_ref().and_then(|c| c.registry_token.as_ref()) {
            return Ok(Some(format!("Bearer {t}")));
        }
        let challenge = self.lock().challenges.get(&ep.host).cloned();
        match challenge {
            None => Ok(None),
            Some(Challenge::Basic) => Ok(creds
                .filter(|c| c.identity_token.is_none())
                .map(|c| c.basic_header())),
            Some(Challenge::Bearer { realm, service }) => {
                let key = (ep.host.clone(), scopes.join(" "));
                if let Some((tok, until)) = self.lock().tokens.get(&key)
                    && Instant::now() < *until
                {
                    return Ok(Some(format!("Bearer {tok}")));
                }
                let (tok, ttl) = self
                    .fetch_token(ep, &realm, service.as_deref(), scopes, creds.as_ref())
                    .await?;
                self.lock()
                    .tokens
                    .insert(key, (tok.clone(), Instant::now() + ttl));
                Ok(Some(format!("Bearer {tok}")))
            }
        }
    }

    /// A token for `scopes` from the challenge's realm: with an identity
    /// token, Docker's OAuth2 exchange (`POST` of
    /// `grant_type=refresh_token`); otherwise the distribution spec's `GET`
    /// with Basic credentials (or none). A token server that does not
    /// implement OAuth2 (404 to the `POST`) is asked with `GET`, as Docker
    /// and go-containerregistry do.
    pub(super) async fn fetch_token(
        &self,
        ep: &Endpoint,
        realm: &str,
        service: Option<&str>,
        scopes: &[String],
        creds: Option<&Credentials>,
    ) -> Result<(String, Duration), RegistryError> {
        let mut url = Url::parse(realm).map_err(|e| RegistryError::Auth {
            url: realm.to_string(),
            reason: format!("invalid token realm: {e}"),
        })?;
        let refresh = creds.and_then(|c| c.identity_token.as_deref());
        let mut resp = None;
        if let Some(refresh) = refresh {
            let mut form = vec![
                ("grant_type", "refresh_token".to_string()),
                ("refresh_token", refresh.to_string()),
                ("client_id", "kiln".to_string()),
                ("scope", scopes.join(" ")),
            ];
            if let Some(s) = service {
                form.push(("service", s.to_string()));
            }
            let r = self
                .http(ep)
                .post(url.clone())
                .form(&form)
                .send()
                .await
                .map_err(|source| self.transport_error(ep, "POST", url.as_str(), source))?;
            if r.status() != StatusCode::NOT_FOUND && r.status() != StatusCode::METHOD_NOT_ALLOWED {
                resp = Some(("POST", r));
            }
        }
        let (method, resp) = match resp {
            Some(r) => r,
            None => {
                {
                    let mut q = url.query_pairs_mut();
                    if let Some(s) = service {
                        q.append_pair("service", s);
                    }
                    for s in scopes {
                        q.append_pair("scope", s);
                    }
                }
                let mut req = self.http(ep).get(url.clone());
                if let Some(c) = creds.filter(|c| c.identity_token.is_none()) {
                    req = req.basic_auth(&c.username, Some(&c.password));
                }
                let r = req
                    .send()
                    .await
                    .map_err(|source| self.transport_error(ep, "GET", url.as_str(), source))?;
                ("GET", r)
            }
        };
        if !resp.status().is_success() {
            let status = resp.status();
            let mut body = error_body(resp).await;
            body.truncate(500);
            return Err(RegistryError::Auth {
                url: url.to_string(),
                reason: format!(
                    "registry {}: the token endpoint answered {status} ({method}), {}: {}",
                    ep.host,
                    self.identity_description(&ep.host),
                    body.trim()
                ),
            });
        }
        #[derive(Deserialize)]
        struct TokenResponse {
            token: Option<String>,
            access_token: Option<String>,
            expires_in: Option<u64>,
        }
        let body = read_limited(resp, url.as_str(), MAX_TOKEN_SIZE).await?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| RegistryError::Auth {
            url: url.to_string(),
            reason: format!("token response is not JSON: {e}"),
        })?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::Auth {
                url: url.to_string(),
                reason: "token response has no token".into(),
            })?;
        // The spec's default lifetime is 60 s; renew a little early.
        let ttl = Duration::from_secs(t.expires_in.unwrap_or(60).saturating_sub(10).max(1));
        Ok((token, ttl))
    }

    /// Sends a request built by `make`, authenticating as the registry's
    /// 401 challenge asks and retrying once with credentials. A 401 that
    /// remains, or a 403, is an [`RegistryError::Auth`] naming the
    /// registry and where the credentials came from.
    pub(super) async fn send(
        &self,
        ep: &Endpoint,
        scopes: &[String],
        method: Method,
        url: &str,
        make: impl Fn(RequestBuilder) -> Result<RequestBuilder, RegistryError>,
    ) -> Result<Response, RegistryError> {
        let name = method_name(&method);
        for attempt in 0..2 {
            let mut req = make(self.http(ep).request(method.clone(), url))?;
            if let Some(h) = self.authorization(ep, scopes).await? {
                req = req.header(AUTHORIZATION, h);
            }
            let resp = req
                .send()
                .await
                .map_err(|source| self.transport_error(ep, name, url, source))?;
            let status = resp.status();
            if status == StatusCode::BAD_REQUEST && url.starts_with("http://") {
                // Go's TLS servers (Distribution, Harbor, ...) answer a
                // plain-HTTP request with 400 and this sentence.
                let body = error_body(resp).await;
                if body.contains("HTTP request to an HTTPS server") {
                    return Err(RegistryError::Protocol {
                        url: url.to_string(),
                        reason: format!(
                            "{} serves HTTPS, but was asked in plain HTTP (it is named in \
                             --insecure-registry, or --insecure/--insecure-pull is given): \
                             drop it there to use HTTPS",
                            ep.host
                        ),
                    });
                }
                return Err(status_error(name, url, status, body));
            }
            if status == StatusCode::FORBIDDEN {
                let mut body = error_body(resp).await;
                body.truncate(500);
                return Err(RegistryError::Auth {
                    url: url.to_string(),
                    reason: format!(
                        "registry {}: {name} denied (403) {}: {}",
                        ep.host,
                        self.identity_description(&ep.host),
                        body.trim()
                    ),
                });
            }
            if status != StatusCode::UNAUTHORIZED {
                return Ok(resp);
            }
            let header = resp
                .headers()
                .get(WWW_AUTHENTICATE)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string);
            let challenge = header.as_deref().and_then(parse_challenge);
            let known = self.lock().challenges.get(&ep.host).cloned();
            match challenge {
                Some(c) if attempt == 0 => {
                    let mut st = self.lock();
                    // A 401 with a cached token means the token is stale.
                    st.tokens.remove(&(ep.host.clone(), scopes.join(" ")));
                    st.challenges.insert(ep.host.clone(), c);
                }
                _ => {
                    let mut body = error_body(resp).await;
                    body.truncate(500);
                    return Err(RegistryError::Auth {
                        url: url.to_string(),
                        reason: format!(
                            "registry {}: {name} unauthorized (401) {}{}: {}",
                            ep.host,
                            self.identity_description(&ep.host),
                            if known.is_some() {
                                " after authenticating"
                            } else {
                                ""
                            },
                            body.trim()
                        ),
                    });
                }
            }
        }
        Err(RegistryError::Auth {
            url: url.to_string(),
            reason: format!(
                "registry {}: unauthorized {}",
                ep.host,
                self.identity_description(&ep.host)
            ),
        })
    }

    pub(super) async fn retry<T, F, Fut>(&self, retries: u32, mut f: F) -> Result<T, RegistryError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Result<T, RegistryError>>,
    {
        let mut delay = self.opts.retry_backoff;
        let mut attempt = 0;
        loop {
            match f().await {
                Ok(v) => return Ok(v),
                Err(e) if attempt < retries && e.is_transient() => {
                    attempt += 1;
                    tracing::warn!("{e}; retrying ({attempt}/{retries}) in {delay:?}");
                    tokio::time::sleep(delay).await;
                    delay = delay.saturating_mul(2);
                }
                Err(e) => return Err(e),
            }
        }
    }
}
