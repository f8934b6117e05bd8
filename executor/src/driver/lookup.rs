//! The cache around the steps: one batch lookup for every filesystem
//! step, descriptor-only hits, steps that ran handed to the uploader, and
//! hits whose layer the cache could not deliver (lost: built instead).

use super::*;
use crate::cache::CacheError;

/// What the lookup phase found.
pub(super) struct Lookup {
    /// The cache's answer: the hits, or why it gave none.
    pub(super) hits: Result<BTreeMap<CacheKey, CacheEntry>, CacheError>,
    /// Distinct keys asked for.
    pub(super) wanted: usize,
    /// How long the call took, a failed one too (the report's `lookup_ms`:
    /// an unreachable cache shows the time it cost).
    pub(super) millis: u64,
}

/// The lookup phase: one batch call with every filesystem step's chain of
/// keys. It reads the cache and nothing else; the driver records the
/// answer (or, when the cache did not answer, builds without it).
pub(super) fn lookup(cache: &dyn Cache, keys: &inputs::BuildKeys) -> Lookup {
    let chains = keys.chains();
    let mut wanted: Vec<CacheKey> = chains.iter().flatten().copied().collect();
    wanted.sort();
    wanted.dedup();
    let started = Instant::now();
    let hits = cache.lookup_chains(&chains);
    Lookup {
        hits,
        wanted: wanted.len(),
        millis: started.elapsed().as_millis() as u64,
    }
}

impl Driver {
    /// [`lookup`] for this build, when its cache mode reads.
    pub(super) fn lookup_keys(&mut self) {
        let Some(cache) = self.services.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.reads() {
            return;
        }
        let found = lookup(cache.as_ref(), &self.resolved.keys);
        self.record.lookup_ms = found.millis;
        match found.hits {
            Ok(hits) => {
                self.log(&format!(
                    "cache: {} of {} steps found in {} ({} ms)",
                    hits.len(),
                    found.wanted,
                    cache.location(),
                    found.millis
                ));
                self.resolved.hits = hits;
            }
            Err(e) => {
                self.warn(&format!(
                    "the cache is unavailable, building without it: {e}"
                ));
                self.services.cache = None;
                self.uploader.stop_writing();
            }
        }
    }

    /// Lets the cache make the writes it held back (the registry cache's
    /// tags), once every upload is done; hits whose layer could not be had
    /// are left out, so no new entry repeats them. A failure is a warning.
    pub(super) fn finish_cache(&mut self) {
        let Some(cache) = self.services.cache.clone() else {
            return;
        };
        if !self.opts.cache.mode.writes() {
            return;
        }
        let mut chains = self.resolved.keys.chains();
        for chain in &mut chains {
            chain.retain(|k| !self.resolved.lost_hits.contains(k));
        }
        if let Err(e) = cache.finish(&chains) {
            self.opts
                .log
                .warn(&format!("writing the cache failed: {e}"));
        }
    }

    /// A filesystem step whose key hit takes the cached layer (descriptor
    /// only: nothing is downloaded until a later step needs the files);
    /// otherwise the step runs and its result is uploaded in the background.
    pub(super) fn cached_or_run(
        &mut self,
        plan: &Plan,
        stage: &Stage,
        ins: &PlannedInstruction,
        step_key: Option<&StepKey>,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) -> Result<Applied, StepError> {
        let Some(step_key) = step_key.filter(|k| k.filesystem) else {
            return self.instruction(plan, stage, ins, builder, state);
        };
        if self.defer_snapshot {
            // Its changes go into the stage's single snapshot: there is no
            // result of its own to look up or to upload.
            let applied = self.instruction(plan, stage, ins, builder, state)?;
            return Ok(Applied {
                outcome: ran(applied.outcome),
                ..applied
            });
        }
        let created_by = history_text(ins);
        if let Some(entry) = self.resolved.hits.get(&step_key.key).cloned() {
            let layer = entry.layer.map(|layer| LayerRef {
                desc: Descriptor::new(&layer.media_type, layer.digest.clone(), layer.size),
                diff_id: layer.diff_id.clone(),
                blob: self.services.store.path(&layer.digest),
                hit: Some(step_key.key),
            });
            apply_recorded(ins, layer.clone(), &created_by, builder, state);
            return Ok(Applied {
                outcome: StepOutcome::Hit,
                layer,
                times: PhaseTimes::default(),
            });
        }
        let applied = self.instruction(plan, stage, ins, builder, state)?;
        let layer = &applied.layer;
        // A hit the cache could not deliver was built here; the cache keeps
        // its entry (another executor's result, as good as this one).
        if self.resolved.lost_hits.contains(&step_key.key) {
            return Ok(Applied {
                outcome: StepOutcome::Miss,
                ..applied
            });
        }
        let entry = CacheEntry {
            layer: layer.as_ref().map(|l| LayerDescriptor {
                media_type: l.desc.media_type.clone(),
                digest: l.desc.digest.clone(),
                size: l.desc.size,
                diff_id: l.diff_id.clone(),
            }),
            created_by,
            created: rfc3339(unix_now()),
            extra: BTreeMap::new(),
        };
        let blob = layer
            .as_ref()
            .map(|l| (l.desc.digest.clone(), l.blob.clone()));
        self.uploader.upload(step_key.key, entry, blob);
        Ok(Applied {
            outcome: ran(applied.outcome),
            ..applied
        })
    }

    /// A step that already ran in this build, before a restart: its layer
    /// (or none) is taken as it was, like a hit whose bytes are local.
    pub(super) fn replay(
        &mut self,
        ins: &PlannedInstruction,
        done: &RanStep,
        builder: &mut ConfigBuilder,
        state: &mut StageState,
    ) {
        apply_recorded(ins, done.layer.clone(), &history_text(ins), builder, state);
    }

    /// Records that the layer of hit `key` cannot be had; the build loop
    /// turns the hit into a miss and starts over. Returns the message for
    /// the error that unwinds to it.
    pub(super) fn lose_hit(&mut self, key: CacheKey, digest: &Digest, reason: String) -> StepError {
        self.lost_pending = Some(LostHit {
            key,
            digest: digest.clone(),
            reason: reason.clone(),
        });
        StepError::LostHit {
            digest: digest.clone(),
            reason,
        }
    }
}

/// What a step that ran reports: `miss` for a filesystem step, `none` for
/// a metadata step.
fn ran(outcome: StepOutcome) -> StepOutcome {
    match outcome {
        StepOutcome::None => StepOutcome::None,
        _ => StepOutcome::Miss,
    }
}

/// Applies a step's recorded result (a hit's or an earlier run's) to the
/// stage without running it: the layer is added by descriptor, and the
/// stack is rebuilt from the layers when a later step needs it (unpacked
/// layers are reused by diff_id).
pub(super) fn apply_recorded(
    ins: &PlannedInstruction,
    layer: Option<LayerRef>,
    created_by: &str,
    builder: &mut ConfigBuilder,
    state: &mut StageState,
) {
    if let Instruction::Workdir(dir) = &ins.instruction {
        builder.set_workdir(dir);
    }
    let Some(layer) = layer else {
        builder.add_empty_history(created_by);
        return;
    };
    state.layers.push(layer.clone());
    state.lowers = None;
    builder.add_layer(layer.diff_id, created_by);
}
