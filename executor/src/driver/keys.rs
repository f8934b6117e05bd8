//! Cache keys for every step of a plan, computed before anything runs.
//!
//! Each instruction's key chains on the previous one (the first on the
//! stage's base: a resolved manifest digest and platform, or the last key of
//! the stage it builds on), so a key depends on everything before it. On top
//! of the parent and the canonical expanded instruction:
//!
//! - RUN: the ENV values and build args visible to it (sorted), heredocs;
//! - COPY/ADD from the context: the digest of exactly the selected files
//!   after `.dockerignore` and `--exclude` (path, type, mode, owner, content
//!   or link target; never mtime, never where the context lives);
//! - COPY --from a stage: that stage's last key; from an image: its digest;
//! - filesystem steps: the executor options that change a layer's bytes.
//!
//! Keys depend only on inputs, never on outputs.

use kiln_common::cache_key::KeyInput;
use kiln_common::{CacheKey, CacheKeyBuilder};

use crate::dockerfile::Instruction;
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

/// What a COPY/ADD reads, resolved by the driver before keys are made.
pub enum SourceIdentity {
    /// blake3 of the selected context files (and heredoc bodies).
    Context([u8; 32]),
    /// The last key of the stage named by `--from`.
    Stage(CacheKey),
    /// A base image's identity (digest and platform) for `--from=<image>`.
    Image(String),
}

/// The key a stage starts from when its base is an image.
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

pub fn is_filesystem_step(ins: &PlannedInstruction) -> bool {
    matches!(
        ins.instruction,
        Instruction::Run(_) | Instruction::Copy(_) | Instruction::Add(_) | Instruction::Workdir(_)
    )
}

/// The key of `ins` given its parent key. `sources` is required for COPY
/// and ADD; `options` names the executor options that change layer bytes;
/// `run_security` is a RUN step's non-default security (capabilities,
/// seccomp, privilege), `None` for the default so default keys stay put.
pub fn step_key(
    parent: &CacheKey,
    ins: &PlannedInstruction,
    sources: Option<&SourceIdentity>,
    options: &str,
    run_security: Option<&str>,
) -> StepKey {
    let filesystem = is_filesystem_step(ins);
    // An ARG's value matters where it is used (RUN sees it, a COPY path
    // expands it), not where it is declared: as Docker, a new --build-arg
    // value misses from its first use on, not from the ARG line.
    let text = match &ins.instruction {
        Instruction::Arg(_) => &ins.original,
        _ => &ins.expanded,
    };
    let mut b = CacheKeyBuilder::new()
        .key("parent", parent)
        .str("instruction", text);
    let heredocs: Vec<&str> = ins.heredocs.iter().map(|h| h.content.as_str()).collect();
    match &ins.instruction {
        Instruction::Run(_) => {
            let env: Vec<(&String, &String)> = ins.env.iter().collect();
            let args: Vec<(&String, &String)> = ins.args.iter().collect();
            b = b
                .pairs("env", &env)
                .pairs("build args", &args)
                .list("heredocs", &heredocs);
            if let Some(SourceIdentity::Context(digest)) = sources {
                b = b.bytes("bind-mounted sources", digest);
            }
            if let Some(security) = run_security {
                b = b.str("run security", security);
            }
        }
        Instruction::Copy(_) | Instruction::Add(_) => {
            b = match sources {
                Some(SourceIdentity::Context(digest)) => b.bytes("context files", digest),
                Some(SourceIdentity::Stage(key)) => b.key("source stage", key),
                Some(SourceIdentity::Image(identity)) => b.str("source image", identity),
                None => b.str("sources", "unresolved"),
            };
            b = b.list("heredocs", &heredocs);
        }
        _ => {}
    }
    if filesystem {
        b = b.str("layer options", options);
    }
    let (key, inputs) = b.finish_with_inputs();
    StepKey {
        key,
        inputs,
        filesystem,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{PlanOptions, plan_source};
    use std::path::Path;

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
            let k = step_key(&parent, ins, Some(&src), "gzip", None);
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
                    let k = step_key(&parent, ins, sources, "gzip", None).key;
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
        let k1 = step_key(&base_key("b1"), run, None, "gzip", None);
        let k2 = step_key(&base_key("b1"), run, None, "zstd", None);
        let k3 = step_key(&base_key("b2"), run, None, "gzip", None);
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
        use crate::build::runner::security::StepSecurity;
        let plan = one_run_plan();
        let run = plan.stages[0].instructions.last().unwrap();
        let default = StepSecurity::default().key_text();
        assert_eq!(default, None);
        let plain = step_key(&base_key("b1"), run, None, "gzip", default.as_deref());
        let mut more = StepSecurity::default();
        more.capabilities.add("NET_ADMIN").unwrap();
        let with_cap = step_key(
            &base_key("b1"),
            run,
            None,
            "gzip",
            more.key_text().as_deref(),
        );
        let insecure = StepSecurity::insecure().key_text();
        let privileged = step_key(&base_key("b1"), run, None, "gzip", insecure.as_deref());
        assert_ne!(plain.key, with_cap.key);
        assert_ne!(plain.key, privileged.key);
        assert_ne!(with_cap.key, privileged.key);
    }
}
