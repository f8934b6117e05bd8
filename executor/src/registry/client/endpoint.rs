//! Where a registry's API is reached: the registry itself or a mirror
//! (`--registry-mirror`, `--registry-map`), in the order pulls try them.

use super::*;

/// A registry host as the TLS and mirror settings name it: without a
/// scheme or path; Docker Hub's names are its API host.
pub(super) fn normalize_host(host: &str) -> String {
    let h = host
        .strip_prefix("https://")
        .or_else(|| host.strip_prefix("http://"))
        .unwrap_or(host);
    let h = h.split('/').next().unwrap_or(h);
    if crate::registry::auth::is_hub(h) {
        crate::registry::reference::DOCKER_HUB_API.to_string()
    } else {
        h.to_string()
    }
}

impl RegistryClient {
    pub(super) fn endpoint(&self, host: &str, dir: Direction) -> Endpoint {
        let o = &self.opts;
        let named = |list: &[String]| {
            list.iter()
                .any(|h| normalize_host(h) == normalize_host(host))
        };
        let plain = o.insecure
            || (dir == Direction::Pull && o.insecure_pull)
            || named(&o.insecure_registries);
        let skip_verify = o.skip_tls_verify
            || (dir == Direction::Pull && o.skip_tls_verify_pull)
            || named(&o.skip_tls_verify_registries);
        let host = if host == DOCKER_HUB {
            crate::registry::reference::DOCKER_HUB_API
        } else {
            host
        };
        Endpoint {
            base: format!("{}://{host}", if plain { "http" } else { "https" }),
            host: host.to_string(),
            verify_tls: !skip_verify,
            prefix: String::new(),
        }
    }

    /// A mirror given as `[scheme://]host[:port][/path]`.
    pub(super) fn mirror_endpoint(&self, mirror: &str) -> Endpoint {
        let m = mirror.trim().trim_end_matches('/');
        let (scheme, rest) = match m.split_once("://") {
            Some((s, h)) => (Some(s), h),
            None => (None, m),
        };
        let (host, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let mut ep = self.endpoint(host, Direction::Pull);
        if let Some(s) = scheme {
            ep.base = format!("{s}://{host}");
        }
        ep.prefix = prefix.trim_matches('/').to_string();
        ep
    }

    /// Where to pull `r` from, in order: its mirrors (`--registry-mirror`
    /// for Docker Hub, `--registry-map` for any registry), then the
    /// registry itself unless `--skip-default-registry-fallback` (and
    /// there is a mirror to fall back from).
    pub(super) fn pull_endpoints(&self, r: &ImageRef) -> Vec<(Endpoint, bool)> {
        let mut out = Vec::new();
        let registry = normalize_host(r.registry());
        if r.registry() == DOCKER_HUB {
            out.extend(
                self.opts
                    .mirrors
                    .iter()
                    .map(|m| (self.mirror_endpoint(m), true)),
            );
        }
        for (orig, mirrors) in &self.opts.registry_maps {
            if normalize_host(orig) == registry {
                out.extend(mirrors.iter().map(|m| (self.mirror_endpoint(m), true)));
            }
        }
        if out.is_empty() || !self.opts.skip_default_registry_fallback {
            out.push((self.endpoint(r.registry(), Direction::Pull), false));
        }
        out
    }
}
