//! The OCI image config and the rules Docker uses to edit it.
//!
//! [`ImageConfig`] is the JSON document (OCI image-spec `config`, with the
//! Docker extensions `Healthcheck`, `Shell`, `OnBuild` that Docker and
//! BuildKit write too); unknown fields of a base image's config are kept.
//! [`ConfigBuilder`] applies metadata instructions one call each, in plain
//! Rust types, with Docker's semantics: `ENV` replaces a key in place,
//! `WORKDIR` is relative to the previous one, setting `ENTRYPOINT` clears a
//! `CMD` inherited from the base image (not one set in this stage), the base
//! image's `ONBUILD` triggers are handed out once and dropped from the new
//! image. Serialisation is stable: fields in declaration order, maps sorted,
//! `created` (and history timestamps) under the caller's control.

use kiln_common::Digest;
use std::path::{Component, Path, PathBuf};

pub use crate::oci::types::{ContainerConfig, Empty, Healthcheck, History, ImageConfig, RootFs};

/// Applies a stage's metadata instructions and layers to a base config.
#[derive(Debug, Clone)]
pub struct ConfigBuilder {
    config: ImageConfig,
    /// Whether CMD was set in this stage (then ENTRYPOINT keeps it).
    cmd_set: bool,
    base_onbuild: Vec<String>,
    /// Timestamp written into `created` and new history entries.
    timestamp: Option<String>,
}

impl ConfigBuilder {
    /// Starts from the base image's config (its history, diff_ids and
    /// settings carry over; its ONBUILD triggers are set aside).
    pub fn new(mut base: ImageConfig) -> Self {
        let base_onbuild = std::mem::take(&mut base.config.on_build);
        ConfigBuilder {
            config: base,
            cmd_set: false,
            base_onbuild,
            timestamp: None,
        }
    }

    /// The base image's ONBUILD triggers, for the driver to run right after
    /// FROM; returns them once.
    pub fn take_base_onbuild(&mut self) -> Vec<String> {
        std::mem::take(&mut self.base_onbuild)
    }

    /// The RFC 3339 time used for `created` and history (`None` leaves them
    /// out; a fixed value makes builds reproducible).
    pub fn set_timestamp(&mut self, created: Option<String>) -> &mut Self {
        self.timestamp = created;
        self
    }

    pub fn config(&self) -> &ImageConfig {
        &self.config
    }

    /// ENV: replaces the key in place, or appends it.
    pub fn apply_env(&mut self, key: &str, value: &str) -> &mut Self {
        let entry = format!("{key}={value}");
        let env = &mut self.config.config.env;
        match env
            .iter_mut()
            .find(|e| e.split_once('=').map_or(e.as_str(), |(k, _)| k) == key)
        {
            Some(e) => *e = entry,
            None => env.push(entry),
        }
        self
    }

    pub fn add_label(&mut self, key: &str, value: &str) -> &mut Self {
        self.config.config.labels.insert(key.into(), value.into());
        self
    }

    /// MAINTAINER: the config's `author`.
    pub fn set_author(&mut self, author: &str) -> &mut Self {
        self.config.author = Some(author.into());
        self
    }

    /// EXPOSE: `80`, `80/tcp`, `53/udp`, `8000-8002/tcp` (ranges expand).
    pub fn expose(&mut self, port: &str) -> Result<&mut Self, ConfigError> {
        let (ports, proto) = match port.split_once('/') {
            Some((p, proto)) => (p, proto.to_ascii_lowercase()),
            None => (port, "tcp".to_string()),
        };
        if !matches!(proto.as_str(), "tcp" | "udp" | "sctp") {
            return Err(ConfigError::Port(port.into()));
        }
        let parse = |s: &str| s.parse::<u16>().map_err(|_| ConfigError::Port(port.into()));
        let (lo, hi) = match ports.split_once('-') {
            Some((a, b)) => (parse(a)?, parse(b)?),
            None => (parse(ports)?, parse(ports)?),
        };
        if lo > hi {
            return Err(ConfigError::Port(port.into()));
        }
        for p in lo..=hi {
            self.config
                .config
                .exposed_ports
                .insert(format!("{p}/{proto}"), Empty {});
        }
        Ok(self)
    }

    pub fn set_user(&mut self, user: &str) -> &mut Self {
        self.config.config.user = user.into();
        self
    }

    /// WORKDIR: relative paths join the previous working directory (`/`
    /// when none); the result is cleaned lexically.
    pub fn set_workdir(&mut self, dir: &str) -> &mut Self {
        let prev = match self.config.config.working_dir.as_str() {
            "" => "/",
            p => p,
        };
        let joined = Path::new(prev).join(dir);
        self.config.config.working_dir = clean_abs(&joined).display().to_string();
        self
    }

    /// ENTRYPOINT: an inherited CMD is cleared; a CMD from this stage stays.
    pub fn set_entrypoint(&mut self, entrypoint: Vec<String>) -> &mut Self {
        self.config.config.entrypoint = Some(entrypoint);
        if !self.cmd_set {
            self.config.config.cmd = None;
        }
        self
    }

    pub fn set_cmd(&mut self, cmd: Vec<String>) -> &mut Self {
        self.config.config.cmd = Some(cmd);
        self.cmd_set = true;
        self
    }

    pub fn add_volume(&mut self, path: &str) -> &mut Self {
        self.config.config.volumes.insert(path.into(), Empty {});
        self
    }

    pub fn set_stop_signal(&mut self, signal: &str) -> &mut Self {
        self.config.config.stop_signal = signal.into();
        self
    }

    /// HEALTHCHECK: zero durations/retries inherit the base image's values,
    /// as Docker does; `HEALTHCHECK NONE` is `test = ["NONE"]`.
    pub fn set_healthcheck(&mut self, mut check: Healthcheck) -> &mut Self {
        if check.test.first().map(String::as_str) != Some("NONE")
            && let Some(old) = &self.config.config.healthcheck
        {
            for (new, old) in [
                (&mut check.interval, old.interval),
                (&mut check.timeout, old.timeout),
                (&mut check.start_period, old.start_period),
                (&mut check.start_interval, old.start_interval),
                (&mut check.retries, old.retries),
            ] {
                if *new == 0 {
                    *new = old;
                }
            }
        }
        self.config.config.healthcheck = Some(check);
        self
    }

    pub fn set_shell(&mut self, shell: Vec<String>) -> &mut Self {
        self.config.config.shell = Some(shell);
        self
    }

    /// ONBUILD: stored for images built FROM this one.
    pub fn add_onbuild(&mut self, trigger: &str) -> &mut Self {
        self.config.config.on_build.push(trigger.into());
        self
    }

    /// A step that produced a layer.
    pub fn add_layer(&mut self, diff_id: Digest, created_by: &str) -> &mut Self {
        self.config.rootfs.diff_ids.push(diff_id);
        self.push_history(created_by, false);
        self
    }

    /// A step that changed no file (metadata instructions, empty RUN).
    pub fn add_empty_history(&mut self, created_by: &str) -> &mut Self {
        self.push_history(created_by, true);
        self
    }

    fn push_history(&mut self, created_by: &str, empty_layer: bool) {
        self.config.history.push(History {
            created: self.timestamp.clone(),
            created_by: Some(created_by.into()),
            author: None,
            comment: Some("kiln".into()),
            empty_layer,
        });
    }

    pub fn build(mut self) -> ImageConfig {
        self.config.created = self.timestamp.clone();
        self.config
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid port specification {0:?}")]
    Port(String),
}

/// Lexically cleans an absolute path (`.`, `..`, duplicate slashes).
fn clean_abs(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            _ => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> ImageConfig {
        let json = br#"{"architecture":"amd64","os":"linux","config":{"Env":["PATH=/usr/bin","A=1"],"Cmd":["bash"],"OnBuild":["RUN echo hi"],"Custom":1},"rootfs":{"type":"layers","diff_ids":["sha256:0000000000000000000000000000000000000000000000000000000000000000"]},"history":[{"created_by":"base"}],"moby.extra":true}"#;
        ImageConfig::from_json(json).unwrap()
    }

    #[test]
    fn env_replaces_in_place_and_appends_new_keys() {
        let mut b = ConfigBuilder::new(base());
        b.apply_env("PATH", "/bin").apply_env("B", "x=y");
        assert_eq!(b.config().config.env, vec!["PATH=/bin", "A=1", "B=x=y"]);
        assert_eq!(b.config().env("B"), Some("x=y"));
    }

    #[test]
    fn entrypoint_clears_inherited_cmd_but_not_this_stages() {
        let mut b = ConfigBuilder::new(base());
        b.set_entrypoint(vec!["/app".into()]);
        assert_eq!(b.config().config.cmd, None);
        let mut b = ConfigBuilder::new(base());
        b.set_cmd(vec!["--flag".into()])
            .set_entrypoint(vec!["/app".into()]);
        assert_eq!(b.config().config.cmd, Some(vec!["--flag".to_string()]));
    }

    #[test]
    fn workdir_is_relative_to_the_previous_one() {
        let mut b = ConfigBuilder::new(ImageConfig::scratch("linux", "amd64"));
        b.set_workdir("a");
        assert_eq!(b.config().config.working_dir, "/a");
        b.set_workdir("b/../c/.");
        assert_eq!(b.config().config.working_dir, "/a/c");
        b.set_workdir("/abs//x");
        assert_eq!(b.config().config.working_dir, "/abs/x");
    }

    #[test]
    fn expose_normalises_protocols_and_ranges() {
        let mut b = ConfigBuilder::new(ImageConfig::scratch("linux", "amd64"));
        b.expose("80")
            .unwrap()
            .expose("53/UDP")
            .unwrap()
            .expose("8000-8001")
            .unwrap();
        let ports: Vec<_> = b.config().config.exposed_ports.keys().cloned().collect();
        assert_eq!(ports, vec!["53/udp", "80/tcp", "8000/tcp", "8001/tcp"]);
        assert!(b.expose("http").is_err());
        assert!(b.expose("80/icmp").is_err());
        assert!(b.expose("9-1").is_err());
    }

    #[test]
    fn onbuild_triggers_of_the_base_are_handed_out_once_and_not_inherited() {
        let mut b = ConfigBuilder::new(base());
        assert_eq!(b.take_base_onbuild(), vec!["RUN echo hi"]);
        assert!(b.take_base_onbuild().is_empty());
        b.add_onbuild("RUN echo child");
        assert_eq!(b.build().config.on_build, vec!["RUN echo child"]);
    }

    #[test]
    fn healthcheck_inherits_unset_durations_and_none_disables() {
        let mut b = ConfigBuilder::new(ImageConfig::scratch("linux", "amd64"));
        b.set_healthcheck(Healthcheck {
            test: vec!["CMD".into(), "true".into()],
            interval: 5_000_000_000,
            retries: 3,
            ..Default::default()
        });
        b.set_healthcheck(Healthcheck {
            test: vec!["CMD-SHELL".into(), "curl x".into()],
            timeout: 1_000_000_000,
            ..Default::default()
        });
        let h = b.config().config.healthcheck.clone().unwrap();
        assert_eq!(
            (h.interval, h.timeout, h.retries),
            (5_000_000_000, 1_000_000_000, 3)
        );
        b.set_healthcheck(Healthcheck {
            test: vec!["NONE".into()],
            ..Default::default()
        });
        assert_eq!(b.config().config.healthcheck.clone().unwrap().interval, 0);
    }

    #[test]
    fn layers_and_history_accumulate_with_the_chosen_timestamp() {
        let mut b = ConfigBuilder::new(base());
        b.set_timestamp(Some("1970-01-01T00:00:00Z".into()));
        let d = Digest::of_bytes(b"layer");
        b.add_layer(d.clone(), "RUN make")
            .add_empty_history("ENV A=2");
        let c = b.build();
        assert_eq!(c.created.as_deref(), Some("1970-01-01T00:00:00Z"));
        assert_eq!(c.rootfs.diff_ids.len(), 2);
        assert_eq!(c.rootfs.diff_ids[1], d);
        assert_eq!(c.history.len(), 3);
        assert!(!c.history[1].empty_layer);
        assert!(c.history[2].empty_layer);
        assert_eq!(
            c.history[2].created.as_deref(),
            Some("1970-01-01T00:00:00Z")
        );
    }

    #[test]
    fn serialisation_is_stable_and_keeps_unknown_fields() {
        let mut b = ConfigBuilder::new(base());
        b.add_label("z", "1")
            .add_label("a", "2")
            .set_stop_signal("SIGTERM");
        b.add_volume("/data")
            .set_shell(vec!["/bin/bash".into(), "-c".into()]);
        b.set_author("someone");
        let c = b.build();
        let json = String::from_utf8(c.to_json()).unwrap();
        assert_eq!(
            c.to_json(),
            ImageConfig::from_json(&c.to_json()).unwrap().to_json()
        );
        assert!(
            json.starts_with(
                r#"{"author":"someone","architecture":"amd64","os":"linux","config":{"#
            ),
            "{json}"
        );
        assert!(json.contains(r#""Labels":{"a":"2","z":"1"}"#), "{json}");
        assert!(json.contains(r#""Custom":1"#), "{json}");
        assert!(json.contains(r#""moby.extra":true"#), "{json}");
        assert!(json.contains(r#""Volumes":{"/data":{}}"#), "{json}");
        let env_at = json.find("\"Env\"").unwrap();
        let cmd_at = json.find("\"Cmd\"").unwrap();
        assert!(env_at < cmd_at);
        assert_eq!(c.digest(), Digest::of_bytes(json.as_bytes()));
    }
}
