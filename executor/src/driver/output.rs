//! Writing the image: registries, OCI layout, docker archive, digest files,
//! and the build summary and report.

use super::*;

impl Driver {
    pub(super) fn timestamp(&self) -> String {
        let secs = if self.opts.reproducible {
            self.opts.source_date_epoch.unwrap_or(0)
        } else {
            unix_now()
        };
        rfc3339(secs)
    }

    /// The `--cache-repo` repository when this build's cache is in it: a
    /// push to the same registry mounts layers from there.
    pub(super) fn cache_repository(&self) -> Option<&ImageRef> {
        self.services.cache.as_ref()?;
        if !self.opts.cache.servers.is_empty() {
            return None;
        }
        self.opts.cache.repo.as_ref()
    }

    /// Layers that came from the cache are downloaded only if an output
    /// needs their bytes: a layout or tarball always does, a push only when
    /// some destination registry does not have the blob yet and cannot
    /// mount it from the cache repository.
    pub(super) fn fetch_missing_blobs(&mut self, target: &StageState) -> Result<(), BuildError> {
        let extra = self
            .services
            .extra_blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        let missing: Vec<LayerRef> = target
            .layers
            .iter()
            .filter(|l| !l.blob.is_file() && !extra.contains_key(&l.desc.digest))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        let local_output = self.opts.oci_layout_path.is_some() || self.opts.tar_path.is_some();
        let destinations: Vec<ImageRef> = if self.opts.no_push {
            Vec::new()
        } else {
            self.opts
                .destinations
                .iter()
                .filter_map(|d| ImageRef::parse(d).ok())
                .collect()
        };
        let cache_repo = self.cache_repository().cloned();
        for layer in missing {
            let mut needed = local_output;
            let mut in_cache_repo = None;
            if !needed {
                for dest in &destinations {
                    if let Some(repo) = cache_repo
                        .as_ref()
                        .filter(|r| r.registry() == dest.registry())
                    {
                        let mountable = *in_cache_repo.get_or_insert_with(|| {
                            self.services
                                .runtime
                                .block_on(
                                    self.services.client.blob_exists(repo, &layer.desc.digest),
                                )
                                .ok()
                                .flatten()
                                .is_some()
                        });
                        if mountable {
                            continue;
                        }
                    }
                    let present = self
                        .services
                        .runtime
                        .block_on(self.services.client.blob_exists(dest, &layer.desc.digest))
                        .ok()
                        .flatten()
                        .is_some();
                    if !present {
                        needed = true;
                        break;
                    }
                }
            }
            if needed {
                self.ensure_blob(&layer)
                    .map_err(|e| BuildError::output(format!("layer {}", layer.desc.digest), e))?;
            }
        }
        Ok(())
    }

    pub(super) fn finish(
        &mut self,
        plan: &Plan,
        target: StageState,
    ) -> Result<BuildOutcome, BuildError> {
        let config = &target.config;
        let layers: Vec<Descriptor> = target.layers.iter().map(|l| l.desc.clone()).collect();
        let docs = ImageDocuments::build(config, layers, false);
        self.record.phase = "fetching the image's layers";
        self.fetch_missing_blobs(&target)?;
        self.record.phase = "writing the image";
        let mut blobs: HashMap<Digest, PathBuf> = self
            .services
            .extra_blobs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        for l in &target.layers {
            blobs.insert(l.desc.digest.clone(), l.blob.clone());
        }
        let source = Blobs {
            store: self.services.store.clone(),
            extra: blobs,
        };
        let destinations: Vec<ImageRef> = self
            .opts
            .destinations
            .iter()
            .map(|d| {
                ImageRef::parse(d).map_err(|e| BuildError::output(format!("destination {d}"), e))
            })
            .collect::<Result<_, _>>()?;
        if let Some(path) = &self.opts.oci_layout_path {
            let layout = if path.join("oci-layout").exists() {
                OciLayout::open(path)
            } else {
                OciLayout::create(path)
            }
            .map_err(|e| BuildError::output(format!("OCI layout {}", path.display()), e))?;
            let ref_name = destinations
                .first()
                .and_then(|d| d.tag().map(str::to_owned))
                .unwrap_or_else(|| "latest".into());
            layout
                .add_image(&docs, &source, Some(&ref_name))
                .map_err(|e| BuildError::output(format!("OCI layout {}", path.display()), e))?;
            self.log(&format!("wrote OCI layout {} ({ref_name})", path.display()));
        }
        if let Some(path) = &self.opts.tar_path {
            crate::oci::archive::write_docker_archive_file(path, &docs, &source, &destinations)
                .map_err(|e| BuildError::output(format!("docker archive {}", path.display()), e))?;
            self.log(&format!("wrote docker archive {}", path.display()));
        }
        if !self.opts.no_push && !destinations.is_empty() {
            // The cache repository first: it holds the layers this build
            // did not download (fetch_missing_blobs counts on the mount).
            let hints: Vec<ImageRef> = self
                .cache_repository()
                .into_iter()
                .chain(target.registry_ref.as_ref())
                .cloned()
                .collect();
            self.record.phase = "pushing";
            let names: Vec<String> = destinations.iter().map(|d| d.to_string()).collect();
            let _progress = self.opts.log.progress(
                &format!("pushing {}", names.join(", ")),
                None,
                crate::log::bytes_sent(),
            );
            let digest = self
                .services
                .runtime
                .block_on(
                    self.services
                        .client
                        .push_image(&docs, &destinations, &source, &hints),
                )
                // The whole chain: a refused connection or a certificate
                // is the cause the user needs, not just "pushing failed".
                .map_err(|e| BuildError::output(format!("pushing {}", names.join(", ")), e))?;
            self.record.phase = "writing the image";
            for d in &destinations {
                self.log(&format!("pushed {d}@{digest}"));
            }
        }
        if let Some(path) = &self.opts.digest_file {
            fs::write(path, docs.manifest_digest.to_string())
                .map_err(|e| BuildError::output(path.display().to_string(), e))?;
        }
        if let Some(path) = &self.opts.image_name_with_digest_file {
            let lines: String = destinations
                .iter()
                .map(|d| format!("{}@{}\n", d.name(), docs.manifest_digest))
                .collect();
            fs::write(path, lines)
                .map_err(|e| BuildError::output(path.display().to_string(), e))?;
        }
        if let Some(path) = &self.opts.image_name_tag_with_digest_file {
            fs::write(
                path,
                name_tag_digest_lines(&destinations, &docs.manifest_digest),
            )
            .map_err(|e| BuildError::output(path.display().to_string(), e))?;
        }
        let _ = plan;
        Ok(BuildOutcome {
            manifest_digest: docs.manifest_digest.clone(),
            image: docs,
            steps: std::mem::take(&mut self.record.steps),
        })
    }
}

/// Kaniko's `--image-name-tag-with-digest-file`: one
/// `<registry>/<repository>:<tag>@<digest>` line per destination (a
/// destination named by digest alone has no tag to write).
fn name_tag_digest_lines(destinations: &[ImageRef], digest: &Digest) -> String {
    destinations
        .iter()
        .map(|d| match d.tag() {
            Some(tag) => format!("{}:{tag}@{digest}\n", d.name()),
            None => format!("{}@{digest}\n", d.name()),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_tag_digest_lines_keep_each_destinations_tag() {
        let digest: Digest = format!("sha256:{}", "ab".repeat(32)).parse().unwrap();
        let destinations: Vec<ImageRef> = ["reg.example:5000/team/app:v1", "busybox"]
            .iter()
            .map(|d| ImageRef::parse(d).unwrap())
            .collect();
        assert_eq!(
            name_tag_digest_lines(&destinations, &digest),
            format!(
                "reg.example:5000/team/app:v1@{digest}\ndocker.io/library/busybox:latest@{digest}\n"
            )
        );
    }
}
