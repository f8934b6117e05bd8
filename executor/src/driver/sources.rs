//! Where COPY, ADD and RUN --mount read from: the build context, another
//! stage, an image, secrets and remote (URL, git) sources.

use super::*;

impl Driver {
    pub(super) fn context_digest(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<[u8; 32], StepError> {
        let from_context: Vec<String> = sources
            .iter()
            .filter(|s| !s.starts_with("<<"))
            .cloned()
            .collect();
        if from_context.is_empty() {
            return Ok([0; 32]);
        }
        let selections = self.select_context(&from_context, excludes)?;
        let ctx = self.context()?;
        Ok(ctx.digest(&selections)?)
    }

    /// COPY/ADD sources in the context, minus `--exclude` patterns (matched
    /// against paths relative to each source, with .dockerignore rules).
    pub(super) fn select_context(
        &mut self,
        sources: &[String],
        excludes: &[String],
    ) -> Result<Vec<crate::sources::context::Selection>, StepError> {
        let exclude = if excludes.is_empty() {
            None
        } else {
            Some(DockerIgnore::parse(
                &excludes.join("\n"),
                Path::new("--exclude"),
            )?)
        };
        let ctx = self.context()?;
        let mut selections = ctx.select(sources)?;
        if let Some(exclude) = exclude {
            for sel in &mut selections {
                let root = sel.root.clone();
                sel.entries.retain(|&i| {
                    let path = &ctx.entry(i).path;
                    let relative = path
                        .strip_prefix(&root)
                        .unwrap_or(path)
                        .trim_start_matches('/');
                    let relative = if relative.is_empty() {
                        root.rsplit('/').next().unwrap_or("")
                    } else {
                        relative
                    };
                    relative.is_empty() || !exclude.is_excluded(relative)
                });
            }
            selections.retain(|s| !s.entries.is_empty());
        }
        Ok(selections)
    }

    /// Downloads or clones a remote ADD source once per build.
    pub(super) fn fetch_remote(
        &mut self,
        source: &str,
        checksum: Option<&str>,
        keep_git_dir: bool,
    ) -> Result<remote::RemoteSource, StepError> {
        if let Some(r) = self.resolved.remote.get(source) {
            return Ok(r.clone());
        }
        self.scratch_counter += 1;
        let dir = self.work.join(format!("remote-{}", self.scratch_counter));
        let fetched = if remote::is_git(source) {
            if checksum.is_some() {
                return Err(remote::RemoteError::ChecksumOnGit.into());
            }
            self.log(&format!("cloning {source}"));
            remote::clone(source, keep_git_dir, &dir)?
        } else {
            self.log(&format!("downloading {source}"));
            let client = reqwest::Client::builder()
                .connect_timeout(std::time::Duration::from_secs(30))
                .build()
                .map_err(remote::RemoteError::Client)?;
            self.services
                .runtime
                .block_on(remote::download(&client, source, checksum, &dir))?
        };
        self.resolved
            .remote
            .insert(source.to_owned(), fetched.clone());
        Ok(fetched)
    }

    pub(super) fn context(&mut self) -> Result<&BuildContext, StepError> {
        if self.context.is_none() {
            let dockerfile = self.opts.plan.dockerfile_path();
            let ignore = DockerIgnore::load(&self.opts.plan.context, &dockerfile)?;
            let visibility = |path: &str, is_dir: bool| {
                if !ignore.is_excluded(path) {
                    Visibility::Included
                } else if is_dir && ignore.may_contain_included(path) {
                    Visibility::ExcludedButDescend
                } else {
                    Visibility::Excluded
                }
            };
            let ctx = BuildContext::scan(&self.opts.plan.context, &visibility)?;
            self.context = Some(Arc::new(ctx));
        }
        self.context
            .as_deref()
            .ok_or_else(|| StepError::invalid("no build context"))
    }

    pub(super) fn context_sources(
        &mut self,
        sources: &[String],
        excludes: &[String],
        heredocs: &[dockerfile::Heredoc],
        parents: bool,
    ) -> Result<Vec<CopyRoot>, StepError> {
        let mut roots = Vec::new();
        let mut from_context = Vec::new();
        for s in sources {
            let name = s
                .trim_start_matches("<<")
                .trim_start_matches('-')
                .trim_matches(['"', '\'']);
            match heredocs
                .iter()
                .find(|h| s.starts_with("<<") && h.name == name)
            {
                Some(h) => {
                    self.scratch_counter += 1;
                    let dir = self.work.join(format!("heredoc-{}", self.scratch_counter));
                    let file = dir.join(&h.name);
                    let io = |e| StepError::io(format!("writing heredoc {}", file.display()), e);
                    fs::create_dir_all(&dir).map_err(io)?;
                    fs::write(&file, &h.content).map_err(io)?;
                    let mut root = walk_root(&file, &h.name).map_err(io)?;
                    root.name = h.name.clone();
                    roots.push(root);
                }
                None => from_context.push(s.clone()),
            }
        }
        if from_context.is_empty() {
            return Ok(roots);
        }
        let selections = self.select_context(&from_context, excludes)?;
        let ctx = self.context()?;
        for sel in selections {
            let name = sel.name.clone();
            let entries = sel
                .entries
                .iter()
                .map(|&i| {
                    let e = ctx.entry(i);
                    let relative = e
                        .path
                        .strip_prefix(&sel.root)
                        .unwrap_or("")
                        .trim_start_matches('/');
                    CopyItem {
                        relative: PathBuf::from(relative),
                        host: ctx.absolute(e),
                    }
                })
                .collect();
            roots.push(CopyRoot {
                name,
                is_dir: sel.is_dir,
                entries,
            });
            if parents {
                // --parents: the source keeps its path from the context root
                // under the destination (`a/b.txt` lands at `<dest>/a/b.txt`).
                if let Some(root) = roots.last_mut() {
                    let prefix = PathBuf::from(&sel.root);
                    for item in &mut root.entries {
                        item.relative = prefix.join(&item.relative);
                    }
                    root.is_dir = true;
                }
            }
        }
        Ok(roots)
    }

    /// Sources of `COPY --from=<stage>`: read from a view of that stage.
    pub(super) fn stage_sources(
        &mut self,
        index: usize,
        sources: &[String],
    ) -> Result<Vec<CopyRoot>, StepError> {
        let mut state = self
            .stages
            .get(&index)
            .cloned()
            .ok_or_else(|| StepError::invalid(format!("stage {index} has not been built")))?;
        if self.services.snapshotter.lower_layout() == LowerLayout::Flattened
            && self.opts.isolation == Isolation::None
        {
            return Err(StepError::invalid(
                "COPY --from another stage is not supported with --isolation none yet",
            ));
        }
        let lowers = self.ensure_lowers(&mut state, index)?;
        let roots = self.sources_from_lowers(&lowers, sources);
        if let Some(s) = self.stages.get_mut(&index) {
            s.lowers = Some(lowers);
        }
        roots
    }

    /// Sources of `COPY --from=<image>`.
    pub(super) fn image_sources(
        &mut self,
        image: &str,
        sources: &[String],
    ) -> Result<Vec<CopyRoot>, StepError> {
        let base = self
            .resolved
            .bases
            .get(image)
            .cloned()
            .ok_or_else(|| StepError::Base {
                reference: image.to_owned(),
                source: BaseError::NotResolved,
            })?;
        let mut state = StageState {
            config: base.config,
            layers: base.layers,
            lowers: None,
            registry_ref: None,
        };
        self.scratch_counter += 1;
        let lowers = self.ensure_lowers(&mut state, 10_000 + self.scratch_counter)?;
        self.sources_from_lowers(&lowers, sources)
    }

    pub(super) fn sources_from_lowers(
        &mut self,
        lowers: &[PathBuf],
        sources: &[String],
    ) -> Result<Vec<CopyRoot>, StepError> {
        self.scratch_counter += 1;
        let scratch = self.work.join(format!("from-{}", self.scratch_counter));
        fs::create_dir_all(&scratch)
            .map_err(|e| StepError::io(format!("creating {}", scratch.display()), e))?;
        let mounted = self.services.snapshotter.prepare(lowers, &scratch)?;
        // The view is copied out of before it is released: sources are
        // copied into scratch space so the mount can go now.
        let result = (|| {
            let copy_dir = scratch.join("sources");
            let mut roots = Vec::new();
            for (n, source) in sources.iter().enumerate() {
                let matches = glob_in_root(&mounted.rootfs, source)?;
                // As for context sources: a wildcard that matches nothing
                // is skipped, a plain path that is missing is an error.
                if matches.is_empty() && !source.contains(['*', '?', '[']) {
                    return Err(StepError::invalid(format!(
                        "{source}: no such file or directory in the source stage"
                    )));
                }
                for RootMatch { host, name } in matches {
                    let staged = copy_dir.join(n.to_string()).join(&name);
                    let parent = staged.parent().unwrap_or(&copy_dir);
                    fs::create_dir_all(parent)
                        .map_err(|e| StepError::io(format!("creating {}", parent.display()), e))?;
                    let status = std::process::Command::new("cp")
                        .arg("-a")
                        .arg("--")
                        .arg(&host)
                        .arg(&staged)
                        .status()
                        .map_err(|e| StepError::io("running cp", e))?;
                    if !status.success() {
                        return Err(StepError::invalid(format!(
                            "copying {} out of the source stage failed",
                            host.display()
                        )));
                    }
                    roots.push(
                        walk_root(&staged, &name).map_err(|e| {
                            StepError::io(format!("reading {}", staged.display()), e)
                        })?,
                    );
                }
            }
            if roots.is_empty() {
                return Err(StepError::invalid(format!(
                    "{}: no source matches anything in the source stage",
                    sources.join(" ")
                )));
            }
            Ok(roots)
        })();
        self.services.snapshotter.release(mounted)?;
        result
    }
}
