//! TLS clients per registry (CA and client certificates, verification
//! skipped where asked) and the explanation of a request that got no
//! answer, in the user's terms (see the module doc of `client`).

use super::*;

/// HTTP clients trusting the default CA certificates plus `cas`, and
/// presenting `identity` (certificate, key) when given.
pub(super) fn build_transport(
    cas: &[PathBuf],
    identity: Option<&(PathBuf, PathBuf)>,
) -> Result<Transport, RegistryError> {
    let mut verified = reqwest::Client::builder();
    let mut unverified = reqwest::Client::builder().danger_accept_invalid_certs(true);
    for path in cas {
        let pem = std::fs::read(path).map_err(|source| RegistryError::Io {
            path: path.clone(),
            source,
        })?;
        let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
            RegistryError::Config(format!("CA certificate {}: {e}", path.display()))
        })?;
        if certs.is_empty() {
            return Err(RegistryError::Config(format!(
                "CA certificate {}: no PEM certificate in it",
                path.display()
            )));
        }
        for cert in certs {
            verified = verified.add_root_certificate(cert.clone());
            unverified = unverified.add_root_certificate(cert);
        }
    }
    // SSL_CERT_FILE / SSL_CERT_DIR, as Go programs read them: GitLab's
    // Kaniko recipe appends a private CA to /kaniko/ssl/certs/ca-certificates.crt.
    let env_roots =
        crate::tls_roots::from_env().map_err(|e| RegistryError::Config(e.to_string()))?;
    for cert in env_roots.certificates {
        verified = verified.add_root_certificate(cert.clone());
        unverified = unverified.add_root_certificate(cert);
    }
    if let Some((cert, key)) = identity {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|source| RegistryError::Io {
                path: p.clone(),
                source,
            })
        };
        let mut pem = read(cert)?;
        pem.push(b'\n');
        pem.extend(read(key)?);
        let id = reqwest::Identity::from_pem(&pem).map_err(|e| {
            RegistryError::Config(format!(
                "client certificate {} with key {}: {}",
                cert.display(),
                key.display(),
                kiln_common::errors::chain(&e)
            ))
        })?;
        verified = verified.identity(id.clone());
        unverified = unverified.identity(id);
    }
    let build = |b: reqwest::ClientBuilder| {
        b.user_agent(concat!("kiln/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(30))
            // No total timeout (a layer may take minutes), but a
            // connection that stalls this long is retried.
            .read_timeout(Duration::from_secs(120))
            .build()
            .map_err(|e| RegistryError::Config(format!("HTTP client: {e}")))
    };
    let mut trust = "the default ones".to_string();
    for p in cas.iter().chain(&env_roots.sources) {
        trust.push_str(&format!(", {}", p.display()));
    }
    Ok(Transport {
        verified: build(verified)?,
        unverified: build(unverified)?,
        trust,
        identity: identity.is_some(),
    })
}

impl RegistryClient {
    pub(super) fn transport(&self, ep: &Endpoint) -> &Transport {
        self.transports
            .get(&ep.host)
            .unwrap_or(&self.default_transport)
    }

    pub(super) fn http(&self, ep: &Endpoint) -> &reqwest::Client {
        let t = self.transport(ep);
        if ep.verify_tls {
            &t.verified
        } else {
            &t.unverified
        }
    }

    /// A request to `url` that got no answer, explained: see the module
    /// documentation.
    pub(super) fn transport_error(
        &self,
        ep: &Endpoint,
        method: &'static str,
        url: &str,
        source: reqwest::Error,
    ) -> RegistryError {
        use kiln_common::errors::{chain, is_certificate_problem, is_connection_closed};
        let text = chain(&source);
        let lower = text.to_ascii_lowercase();
        let https = url.starts_with("https://");
        let t = self.transport(ep);
        let host = &ep.host;
        let refused = {
            let mut e: Option<&(dyn std::error::Error + 'static)> = Some(&source);
            let mut found = false;
            while let Some(err) = e {
                if let Some(io) = err.downcast_ref::<std::io::Error>()
                    && io.kind() == std::io::ErrorKind::ConnectionRefused
                {
                    found = true;
                }
                e = err.source();
            }
            found || lower.contains("connection refused")
        };
        let detail = if https
            && (lower.contains("invalidcontenttype")
                || lower.contains("corrupt message")
                || lower.contains("wrong version number"))
        {
            format!(
                "the registry does not speak TLS here: it looks like a plain-HTTP registry                  reached over HTTPS (give --insecure-registry {host} if it is meant to be                  plain HTTP): {text}"
            )
        } else if https
            && is_certificate_problem(&source)
            && (lower.contains("certificaterequired")
                || lower.contains("badcertificate")
                || lower.contains("fatal alert"))
        {
            format!(
                "TLS certificate problem: the registry refused {}: {text} (give \
                 --registry-client-cert {host}=CERT,KEY with a certificate it accepts)",
                if t.identity {
                    "the client certificate given"
                } else {
                    "a connection without a client certificate"
                }
            )
        } else if https && is_certificate_problem(&source) {
            format!(
                "TLS certificate problem: {text} (trusted CA certificates: {}; give                  --registry-certificate {host}=CA.pem to trust its CA, or                  --skip-tls-verify-registry {host})",
                t.trust
            )
        } else if https && !t.identity && is_connection_closed(&source) {
            format!(
                "TLS certificate problem, probably: the registry closed the connection, as                  one that requires a client certificate does for a client without one (give                  --registry-client-cert {host}=CERT,KEY): {text} (trusted CA certificates: {})",
                t.trust
            )
        } else if refused {
            format!("connection refused: nothing accepts connections at {host}: {text}")
        } else if lower.contains("dns error")
            || lower.contains("failed to lookup address")
            || lower.contains("name or service not known")
        {
            let name = host.rsplit_once(':').map(|(h, _)| h).unwrap_or(host);
            format!("DNS lookup of {name} failed: {text}")
        } else if source.is_timeout() {
            format!("timed out: {text}")
        } else {
            text
        };
        RegistryError::Http {
            method,
            url: url.to_string(),
            detail,
            source,
        }
    }
}
