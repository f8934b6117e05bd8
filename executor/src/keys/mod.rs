//! Cache keys: the one place where text and bytes enter a step's key.
//!
//! Each instruction's key chains on the previous one (the first on the
//! stage's base: a resolved manifest digest and platform, or the last key of
//! the stage it builds on), so a key depends on everything before it. On top
//! of the parent and the canonical expanded instruction ([`text`]):
//!
//! - RUN: the ENV values and build args visible to it (sorted), heredocs,
//!   the sources of `--mount=type=bind`, non-default security;
//! - COPY/ADD from the context: the digest of exactly the selected files
//!   after `.dockerignore` and `--exclude` (path, type, mode, owner, content
//!   or link target; never mtime, never where the context lives), and for
//!   ADD the identity of each download or git checkout;
//! - COPY --from a stage: that stage's last key; from an image: its digest;
//! - filesystem steps: the executor options that change a layer's bytes.
//!
//! Promises: keys depend only on inputs, never on outputs, and are pure
//! (no I/O: the driver resolves digests first and passes them in). Every
//! text that goes into a key is written here field by field from typed
//! values ([`StepInputs`], [`LayerKeyOptions`], [`StepSecurity`],
//! [`base_identity`], ...), never taken from the `--dry-run` rendering,
//! a `Debug` impl or serde: changing those cannot move a key. The pinned
//! vectors (`vectors.rs`) fail on any change of a key; such a change must
//! come with a new [`KEY_SCHEME`] and a line in docs/decisions.md.

mod resolved;
mod text;
#[cfg(test)]
mod vectors;

pub use kiln_common::cache_key::{KEY_SCHEME, KeyInput};
pub use resolved::{
    BindSource, LayerKeyOptions, add_sources, base_identity, bind_mounts, git_identity,
    remote_file_identity, run_security_text,
};

use kiln_common::{CacheKey, CacheKeyBuilder};

use crate::build::runner::security::StepSecurity;
use crate::dockerfile::{self, Heredoc, Instruction, Vars};
use crate::plan::PlannedInstruction;

/// One instruction's key and the named inputs that made it.
#[derive(Debug, Clone)]
pub struct StepKey {
    pub key: CacheKey,
    pub inputs: Vec<KeyInput>,
    /// True for steps that change the filesystem (RUN, COPY, ADD, WORKDIR):
    /// only those have cache entries.
    pub filesystem: bool,
}

/// What a COPY/ADD (or a RUN's bind mounts) reads, resolved by the driver
/// before keys are made.
pub enum SourceIdentity {
    /// blake3 of the selected context files (and heredoc bodies), or the
    /// combination made by [`add_sources`] or [`bind_mounts`].
    Context([u8; 32]),
    /// The last key of the stage named by `--from`.
    Stage(CacheKey),
    /// A base image's identity ([`base_identity`]) for `--from=<image>`.
    Image(String),
}

/// The parts of a planned instruction a key may read. The rendered forms
/// the plan also carries (`expanded`, the dry-run `flags` and `value`) are
/// not here, so no key can depend on them.
#[derive(Clone, Copy)]
pub struct StepInputs<'a> {
    pub instruction: &'a Instruction,
    /// The logical line as written; the key input of `ARG` (as Docker, a
    /// new `--build-arg` value misses from its first use on, not from the
    /// line that declares it).
    pub as_written: &'a str,
    /// ENV values visible to the instruction.
    pub env: &'a Vars,
    /// ARG values visible to the instruction.
    pub args: &'a Vars,
}

impl<'a> StepInputs<'a> {
    pub fn of(ins: &'a PlannedInstruction) -> Self {
        StepInputs {
            instruction: &ins.instruction,
            as_written: &ins.original,
            env: &ins.env,
            args: &ins.args,
        }
    }
}

/// The key a stage starts from when its base is an image; `identity` is
/// made by [`base_identity`].
pub fn base_key(identity: &str) -> CacheKey {
    CacheKeyBuilder::new()
        .str("kind", "base image")
        .str("base", identity)
        .finish()
}

/// The entry that keeps a pulled base-image layer in the cache (so LRU
/// eviction treats it like any layer) is keyed by the layer's digest.
pub fn base_layer_key(digest: &kiln_common::Digest) -> CacheKey {
    CacheKeyBuilder::new()
        .str("kind", "base image layer")
        .digest("layer", digest)
        .finish()
}

/// RUN, COPY, ADD and WORKDIR change the filesystem; the others only the
/// image config.
pub fn is_filesystem_instruction(instruction: &Instruction) -> bool {
    matches!(
        instruction,
        Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) | Instruction::Workdir(_)
    )
}

pub fn is_filesystem_step(ins: &PlannedInstruction) -> bool {
    is_filesystem_instruction(&ins.instruction)
}

/// The key of a step given its parent key. `sources` is required for COPY
/// and ADD (`None` there is keyed as "unresolved"); `run_security` is the
/// security a RUN step runs with (only a non-default one is an input, so
/// default keys stay what they were before the option existed).
pub fn step_key(
    parent: &CacheKey,
    step: StepInputs<'_>,
    sources: Option<&SourceIdentity>,
    layer: &LayerKeyOptions,
    run_security: Option<&StepSecurity>,
) -> StepKey {
    let filesystem = is_filesystem_instruction(step.instruction);
    let instruction = match step.instruction {
        Instruction::Arg(_) => step.as_written.to_owned(),
        other => text::instruction_text(other),
    };
    let mut b = CacheKeyBuilder::new()
        .key("parent", parent)
        .str("instruction", &instruction);
    match step.instruction {
        Instruction::Run(run) => {
            // Sorted by name here, whatever map the plan keeps them in.
            let mut env: Vec<(&String, &String)> = step.env.iter().collect();
            env.sort();
            let mut args: Vec<(&String, &String)> = step.args.iter().collect();
            args.sort();
            b = b
                .pairs("env", &env)
                .pairs("build args", &args)
                .list("heredocs", &heredoc_bodies(&run.heredocs));
            if let Some(SourceIdentity::Context(digest)) = sources {
                b = b.bytes("bind-mounted sources", digest);
            }
            if let Some(security) = run_security.and_then(run_security_text) {
                b = b.str("run security", &security);
            }
        }
        Instruction::Copy(dockerfile::Copy { heredocs, .. })
        | Instruction::Add(dockerfile::Add { heredocs, .. }) => {
            b = match sources {
                Some(SourceIdentity::Context(digest)) => b.bytes("context files", digest),
                Some(SourceIdentity::Stage(key)) => b.key("source stage", key),
                Some(SourceIdentity::Image(identity)) => b.str("source image", identity),
                None => b.str("sources", "unresolved"),
            };
            b = b.list("heredocs", &heredoc_bodies(heredocs));
        }
        _ => {}
    }
    if filesystem {
        b = b.str("layer options", &layer.text());
    }
    let (key, inputs) = b.finish_with_inputs();
    StepKey {
        key,
        inputs,
        filesystem,
    }
}

fn heredoc_bodies(docs: &[Heredoc]) -> Vec<&str> {
    docs.iter().map(|h| h.content.as_str()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::layer::Compression;
    use crate::plan::{PlanOptions, plan_source};
    use std::path::Path;

    fn gzip() -> LayerKeyOptions {
        LayerKeyOptions::default()
    }

    fn zstd() -> LayerKeyOptions {
        LayerKeyOptions {
            compression: Compression::Zstd { level: 3 },
            ..LayerKeyOptions::default()
        }
    }

    fn keys_of(dockerfile: &str, build_args: &[(&str, &str)]) -> Vec<CacheKey> {
        let opts = PlanOptions {
            context: ".".into(),
            build_args: build_args
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            build_platform: Some("linux/amd64".into()),
            platform: Some("linux/amd64".into()),
            ..Default::default()
        };
        let plan = plan_source(dockerfile, Path::new("Dockerfile"), &opts).unwrap();
        let mut parent = base_key("sha256:base linux/amd64");
        let mut keys = Vec::new();
        for ins in &plan.stages[plan.target].instructions {
            let src = SourceIdentity::Context([7; 32]);
            let k = step_key(&parent, StepInputs::of(ins), Some(&src), &gzip(), None);
            parent = k.key;
            keys.push(k.key);
        }
        keys
    }

    #[test]
    fn an_arg_a_run_sees_changes_its_key_but_an_unused_one_does_not() {
        let df = "FROM x\nARG V=1\nRUN echo $V\n";
        let base = keys_of(df, &[]);
        assert_ne!(base, keys_of(df, &[("V", "2")]));
        assert_eq!(base, keys_of(df, &[("UNUSED", "2")]));
    }

    #[test]
    fn an_env_before_a_run_changes_it_and_everything_after() {
        let a = keys_of("FROM x\nENV A=1\nRUN true\nRUN false\n", &[]);
        let b = keys_of("FROM x\nENV A=2\nRUN true\nRUN false\n", &[]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3]);
    }

    #[test]
    fn context_digest_changes_only_copy_and_later_steps() {
        let ins_df = "FROM x\nRUN a\nCOPY . /app\nRUN b\n";
        let opts = PlanOptions {
            context: ".".into(),
            build_platform: Some("linux/amd64".into()),
            platform: Some("linux/amd64".into()),
            ..Default::default()
        };
        let plan = plan_source(ins_df, Path::new("Dockerfile"), &opts).unwrap();
        let chain = |digest: [u8; 32]| {
            let mut parent = base_key("b");
            plan.stages[0]
                .instructions
                .iter()
                .map(|ins| {
                    let source = SourceIdentity::Context(digest);
                    let sources =
                        matches!(ins.instruction, Instruction::Copy(_)).then_some(&source);
                    let k = step_key(&parent, StepInputs::of(ins), sources, &gzip(), None).key;
                    parent = k;
                    k
                })
                .collect::<Vec<_>>()
        };
        let (a, b) = (chain([1; 32]), chain([2; 32]));
        assert_eq!(a[..2], b[..2]);
        assert_ne!(a[2], b[2]);
        assert_ne!(a[3], b[3]);
    }

    /// `FROM x` then `RUN a`, planned for linux/amd64.
    fn one_run_plan() -> crate::plan::Plan {
        let opts = PlanOptions {
            context: ".".into(),
            build_platform: Some("linux/amd64".into()),
            platform: Some("linux/amd64".into()),
            ..Default::default()
        };
        plan_source("FROM x\nRUN a\n", Path::new("Dockerfile"), &opts).unwrap()
    }

    #[test]
    fn layer_options_and_base_change_filesystem_keys() {
        let plan = one_run_plan();
        let run = plan.stages[0].instructions.last().unwrap();
        let k1 = step_key(&base_key("b1"), StepInputs::of(run), None, &gzip(), None);
        let k2 = step_key(&base_key("b1"), StepInputs::of(run), None, &zstd(), None);
        let k3 = step_key(&base_key("b2"), StepInputs::of(run), None, &gzip(), None);
        assert!(k1.filesystem);
        assert_ne!(k1.key, k2.key);
        assert_ne!(k1.key, k3.key);
    }

    /// A step allowed more (`--cap-add`, `RUN --security=insecure`) can
    /// write a different filesystem: it must never hit the default step's
    /// entry, and the default must keep the key it had before the option
    /// existed.
    #[test]
    fn a_runs_extra_privileges_change_its_key_and_only_its_own() {
        let plan = one_run_plan();
        let run = plan.stages[0].instructions.last().unwrap();
        let default = StepSecurity::default();
        assert_eq!(run_security_text(&default), None);
        let plain = step_key(
            &base_key("b1"),
            StepInputs::of(run),
            None,
            &gzip(),
            Some(&default),
        );
        let unset = step_key(&base_key("b1"), StepInputs::of(run), None, &gzip(), None);
        assert_eq!(plain.key, unset.key);
        let mut more = StepSecurity::default();
        more.capabilities.add("NET_ADMIN").unwrap();
        let with_cap = step_key(
            &base_key("b1"),
            StepInputs::of(run),
            None,
            &gzip(),
            Some(&more),
        );
        let insecure = StepSecurity::insecure();
        let privileged = step_key(
            &base_key("b1"),
            StepInputs::of(run),
            None,
            &gzip(),
            Some(&insecure),
        );
        assert_ne!(plain.key, with_cap.key);
        assert_ne!(plain.key, privileged.key);
        assert_ne!(with_cap.key, privileged.key);
    }
}
