//! Resolving base images: `scratch`, `oci-layout://` directories,
//! `docker-archive://` tarballs and registry images (manifest and config
//! only; layers are fetched when needed).

use super::*;

impl Driver {
    pub(super) fn resolve_base(&mut self, name: &str) -> Result<(), BuildError> {
        if self.resolved.bases.contains_key(name) {
            return Ok(());
        }
        let base_err = |e: BaseError| BuildError::Base {
            reference: name.to_owned(),
            source: e,
        };
        let base = if name.eq_ignore_ascii_case("scratch") {
            BaseImage {
                identity: keys::base_identity(None, &self.services.platform),
                config: image_config::ImageConfig::scratch(
                    &self.services.platform.os,
                    &self.services.platform.architecture,
                ),
                layers: Vec::new(),
                registry_ref: None,
            }
        } else if let Some(rest) = name.strip_prefix("docker-archive://") {
            // `docker-archive://PATH[:TAG]`: a `docker save` tarball, read
            // once into the local store. Tags contain `:` themselves
            // (`repo:tag`), so the path ends at the first `:` that names
            // an existing file.
            let (path, tag) = rest
                .match_indices(':')
                .map(|(i, _)| (&rest[..i], Some(&rest[i + 1..])))
                .find(|(p, _)| Path::new(p).is_file())
                .unwrap_or((rest, None));
            let docs = crate::oci::archive::read_docker_archive(
                Path::new(path),
                &self.services.store,
                tag,
            )
            .map_err(|e| base_err(e.into()))?;
            let store = self.services.store.clone();
            let layers = self.layers_of(&docs, |d| store.path(d))?;
            BaseImage {
                identity: keys::base_identity(Some(&docs.manifest_digest), &self.services.platform),
                config: docs.config.clone(),
                layers,
                registry_ref: None,
            }
        } else if let Some(rest) = name.strip_prefix("oci-layout://") {
            let (path, reference) = parse_layout_reference(rest);
            let layout = OciLayout::open(&path).map_err(|e| base_err(e.into()))?;
            let docs = layout
                .resolve(reference.as_deref(), &self.services.platform)
                .map_err(|e| base_err(e.into()))?;
            let layers = self.layers_of(&docs, |d| layout.path(d))?;
            let mut extra = self
                .services
                .extra_blobs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for l in &layers {
                extra.insert(l.desc.digest.clone(), l.blob.clone());
            }
            drop(extra);
            BaseImage {
                identity: keys::base_identity(Some(&docs.manifest_digest), &self.services.platform),
                config: config_from_bytes(&docs.config_bytes).map_err(base_err)?,
                layers,
                registry_ref: None,
            }
        } else {
            let reference = ImageRef::parse(name).map_err(|e| base_err(e.into()))?;
            self.log(&format!("resolving {reference}"));
            // Only the manifest and config now: layers are fetched when a
            // step needs the filesystem or an output needs their bytes, from
            // the cache when it has them, from the registry otherwise.
            // A base pinned by digest comes from the cache when it has the
            // documents (cached_bases), from the registry otherwise.
            let pulled = match self.base_from_cache(&reference) {
                Some(pulled) => pulled,
                None => {
                    let pulled = self
                        .services
                        .runtime
                        .block_on(
                            self.services
                                .client
                                .resolve(&reference, &self.services.platform),
                        )
                        .map_err(|e| {
                            base_err(cached_bases::registry_resolve_error(&reference, e))
                        })?;
                    self.share_base_documents(&reference, &pulled);
                    pulled
                }
            };
            let store = self.services.store.clone();
            let layers = self.layers_of(&pulled.image, |d| store.path(d))?;
            for layer in &layers {
                self.resolved
                    .base_layers
                    .insert(layer.desc.digest.clone(), (pulled.clone(), layer.clone()));
            }
            BaseImage {
                identity: keys::base_identity(
                    Some(&pulled.image.manifest_digest),
                    &self.services.platform,
                ),
                config: config_from_bytes(&pulled.image.config_bytes).map_err(base_err)?,
                layers,
                registry_ref: Some(pulled.reference.clone()),
            }
        };
        self.resolved.bases.insert(name.to_owned(), base);
        Ok(())
    }

    pub(super) fn layers_of(
        &self,
        docs: &ImageDocuments,
        path_of: impl Fn(&Digest) -> PathBuf,
    ) -> Result<Vec<LayerRef>, BuildError> {
        let diff_ids = &docs.config.rootfs.diff_ids;
        if diff_ids.len() != docs.manifest.layers.len() {
            return Err(BuildError::Base {
                reference: docs.manifest_digest.to_string(),
                source: BaseError::LayerCount {
                    manifest: docs.manifest.layers.len(),
                    diff_ids: diff_ids.len(),
                },
            });
        }
        Ok(docs
            .manifest
            .layers
            .iter()
            .zip(diff_ids)
            .map(|(desc, diff_id)| LayerRef {
                desc: desc.clone(),
                diff_id: diff_id.clone(),
                blob: path_of(&desc.digest),
                hit: None,
            })
            .collect())
    }

    /// A base image's ONBUILD triggers run first in the stage built on it,
    /// as Docker does: each is planned in the context of that base (its
    /// environment, the build's args) and spliced in after the FROM line,
    /// where its errors are reported. Keys cover them like any instruction.
    pub(super) fn splice_onbuild_triggers(
        &mut self,
        plan: &mut Plan,
        opts: &PlanOptions,
    ) -> Result<(), BuildError> {
        for index in plan.stages_to_build.clone() {
            let StageSource::Image(name) = &plan.stages[index].source else {
                continue;
            };
            let Some(base) = self.resolved.bases.get(name) else {
                continue;
            };
            let triggers = base.config.config.on_build.clone();
            if triggers.is_empty() {
                continue;
            }
            let from_line = plan.stages[index].line;
            let text = format!("FROM {name}\n{}\n", triggers.join("\n"));
            let mut trigger_opts = opts.clone();
            trigger_opts.target = None;
            let triggers_plan =
                crate::plan::plan_source(&text, &opts.dockerfile_path(), &trigger_opts).map_err(
                    |source| BuildError::Trigger {
                        file: self.resolved.dockerfile_name.clone(),
                        line: from_line,
                        instruction: format!("ONBUILD triggers of {name}"),
                        source: Box::new(source),
                    },
                )?;
            let mut spliced: Vec<PlannedInstruction> = triggers_plan.stages[0]
                .instructions
                .iter()
                .filter(|i| !matches!(i.instruction, Instruction::From(_)))
                .cloned()
                .collect();
            for ins in &mut spliced {
                ins.line = from_line;
                ins.original = format!("ONBUILD {}", ins.original);
            }
            self.log(&format!(
                "stage {index}: running {} ONBUILD trigger(s) of {name}",
                spliced.len()
            ));
            plan.stages[index].instructions.splice(1..1, spliced);
        }
        Ok(())
    }
}
