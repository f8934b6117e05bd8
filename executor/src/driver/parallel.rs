//! The execute phase over stages: stages whose dependencies are built run
//! at once, up to `--jobs` of them, each on its own thread with its own
//! driver ([`Driver::stage_worker`]): its own scratch directory (so step,
//! source and layer-mount directories never collide), its own step records
//! and upload handles, the build's services (store, cache, snapshotter,
//! runner, registry client) shared. What a worker produced is merged back
//! when it ends, so the report lists steps in plan order whatever order the
//! stages finished in, and every result is the same as a sequential
//! build's: keys, hits and layers depend only on the stage's inputs.
//!
//! A failing stage stops the others before their next step (a step already
//! running finishes); the first failure is the build's error. With one job
//! (`--jobs 1`, and always for in-place builds, which share `/`) stages run
//! in plan order on the calling thread, as they always have.

use std::sync::atomic::Ordering;

use super::*;

/// A stage's worker when it ends: its driver (to merge) and its result.
type Finished = (usize, Result<(), BuildError>, Box<Driver>);

impl Driver {
    /// Builds every stage of `plan.stages_to_build`.
    pub(super) fn build_stages(&mut self, plan: &Plan) -> Result<(), BuildError> {
        self.services.cancel.store(false, Ordering::SeqCst);
        let jobs = self.opts.jobs.max(1).min(plan.stages_to_build.len());
        // A chain of stages has nothing to overlap: it builds as it always
        // has, without stage marks on its lines.
        if jobs <= 1 || !has_independent_stages(plan) {
            for &index in &plan.stages_to_build {
                let started = Instant::now();
                self.build_stage(plan, &plan.stages[index])?;
                self.log(&format!(
                    "stage {index} built in {:.2}s",
                    started.elapsed().as_secs_f64()
                ));
            }
            return Ok(());
        }
        let order = &plan.stages_to_build;
        let mut pending: Vec<usize> = order.clone();
        let mut steps: HashMap<usize, Vec<StepRecord>> = HashMap::new();
        let mut failure: Option<BuildError> = None;
        std::thread::scope(|scope| {
            let (done_tx, done_rx) = std::sync::mpsc::channel::<Finished>();
            let mut running = 0;
            loop {
                while failure.is_none() && running < jobs {
                    let ready = pending.iter().position(|&i| {
                        plan.stages[i]
                            .depends_on
                            .iter()
                            .all(|d| self.stages.contains_key(d) || !order.contains(d))
                    });
                    let Some(at) = ready else { break };
                    let index = pending.remove(at);
                    let mut worker = match self.stage_worker(plan, index) {
                        Ok(w) => Box::new(w),
                        Err(e) => {
                            failure = Some(e);
                            self.services.cancel.store(true, Ordering::SeqCst);
                            break;
                        }
                    };
                    let done_tx = done_tx.clone();
                    running += 1;
                    scope.spawn(move || {
                        let started = Instant::now();
                        // A panic must still report back, or the loop would
                        // wait for this stage forever.
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            worker.build_stage(plan, &plan.stages[index])
                        }))
                        .unwrap_or_else(|_| {
                            Err(BuildError::Internal(format!(
                                "building stage {index} panicked"
                            )))
                        });
                        if result.is_ok() {
                            worker.log(&format!(
                                "stage {index} built in {:.2}s",
                                started.elapsed().as_secs_f64()
                            ));
                        }
                        let _ = done_tx.send((index, result, worker));
                    });
                }
                if running == 0 {
                    break;
                }
                let Ok((index, result, worker)) = done_rx.recv() else {
                    break;
                };
                running -= 1;
                steps.insert(index, self.merge_worker(index, *worker));
                if let Err(e) = result
                    && failure.is_none()
                {
                    failure = Some(e);
                    self.services.cancel.store(true, Ordering::SeqCst);
                }
            }
        });
        // The report's order: plan order, each stage's steps together.
        for index in order {
            if let Some(records) = steps.remove(index) {
                self.record.steps.extend(records);
            }
        }
        if let Some(e) = failure {
            return Err(e);
        }
        if let Some(left) = pending.first() {
            return Err(BuildError::Internal(format!(
                "stage {left} never had its dependencies built"
            )));
        }
        Ok(())
    }

    /// A driver for building stage `index` on its own thread: the build's
    /// services and resolved inputs, the stages built so far, and its own
    /// scratch directory inside this build's.
    fn stage_worker(&self, plan: &Plan, index: usize) -> Result<Driver, BuildError> {
        let build = self.work.file_name().unwrap_or_default().to_string_lossy();
        // Named after the build too: unpacking uses the name for temporary
        // directories in the shared layer directory.
        let work = self.work.join(format!("{build}.stage-{index}"));
        fs::create_dir_all(&work).map_err(|e| {
            BuildError::setup(format!("creating scratch space {}", work.display()), e)
        })?;
        let name = plan.stages[index]
            .name
            .clone()
            .unwrap_or_else(|| index.to_string());
        let mut opts = self.opts.clone();
        opts.log = opts.log.for_stage(&name);
        let uploader = self.uploader.for_worker(opts.log.clone());
        Ok(Driver {
            opts,
            services: self.services.clone(),
            resolved: self.resolved.clone(),
            record: Record::new(self.record.started, "building"),
            uploader,
            work,
            context: self.context.clone(),
            context_dir: None,
            stages: self.stages.clone(),
            scratch_counter: 0,
            lost_pending: None,
            ran: self.ran.clone(),
            open_snapshot: None,
            defer_snapshot: false,
            mounts: mountable::LayerMounts {
                images: self.mounts.images.clone(),
                mounted: self.mounts.mounted.clone(),
                extra: Vec::new(),
            },
        })
    }

    /// Takes what a stage's worker produced: the stage, the steps it ran
    /// (for a restart to replay), its uploads, mounts, downloads and, if it
    /// failed, where. Returns its step records.
    fn merge_worker(&mut self, index: usize, mut worker: Driver) -> Vec<StepRecord> {
        if let Some(open) = worker.open_snapshot.take() {
            let _ = self.services.snapshotter.release(open.mounted);
        }
        if let Some(state) = worker.stages.remove(&index) {
            self.stages.insert(index, state);
        }
        self.ran.extend(worker.ran.drain());
        self.uploader.adopt(&mut worker.uploader);
        self.record.bytes_downloaded += worker.record.bytes_downloaded;
        if self.lost_pending.is_none() {
            self.lost_pending = worker.lost_pending.take();
        }
        if worker.record.current_step.is_some() {
            self.record.current_step = worker.record.current_step.take();
        }
        if self.context.is_none() {
            self.context = worker.context.take();
        }
        for (diff_id, dir) in worker.mounts.mounted.drain() {
            match self.mounts.mounted.get(&diff_id) {
                None => {
                    self.mounts.mounted.insert(diff_id, dir);
                }
                Some(ours) if *ours != dir => self.mounts.extra.push(dir),
                Some(_) => {}
            }
        }
        self.mounts.extra.append(&mut worker.mounts.extra);
        std::mem::take(&mut worker.record.steps)
    }

    /// Whether another stage failed: this one stops before its next step.
    pub(super) fn cancelled(&self) -> bool {
        self.services.cancel.load(Ordering::SeqCst)
    }
}

/// Whether two of the stages to build depend on each other neither
/// directly nor through others, so that they can build at once.
fn has_independent_stages(plan: &Plan) -> bool {
    let order = &plan.stages_to_build;
    // Every stage's dependencies, transitively (`order` lists
    // dependencies first).
    let mut closure: HashMap<usize, std::collections::BTreeSet<usize>> = HashMap::new();
    for &i in order {
        let mut all = std::collections::BTreeSet::new();
        for &d in &plan.stages[i].depends_on {
            all.insert(d);
            if let Some(deeper) = closure.get(&d) {
                all.extend(deeper.iter().copied());
            }
        }
        closure.insert(i, all);
    }
    order.iter().enumerate().any(|(n, a)| {
        order[n + 1..]
            .iter()
            .any(|b| !closure[a].contains(b) && !closure[b].contains(a))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan_of(dockerfile: &str) -> Plan {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("Dockerfile"), dockerfile).unwrap();
        crate::plan::plan(&PlanOptions {
            context: dir.path().to_path_buf(),
            ..PlanOptions::default()
        })
        .unwrap()
    }

    #[test]
    fn only_stages_that_need_nothing_of_each_other_count_as_independent() {
        let chain = "FROM scratch AS a\nFROM a AS b\nCOPY --from=a / /\nFROM b\n";
        assert!(!has_independent_stages(&plan_of(chain)));
        let single = "FROM scratch\nENV A=1\n";
        assert!(!has_independent_stages(&plan_of(single)));
        let fan_in = "FROM scratch AS a\nFROM scratch AS b\nFROM scratch\n\
                      COPY --from=a / /a\nCOPY --from=b / /b\n";
        assert!(has_independent_stages(&plan_of(fan_in)));
    }
}
