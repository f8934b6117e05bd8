//! Specifications of the planner, through its public entry points.

use super::*;
use crate::dockerfile::{ErrorKind, Instruction, Vars, shell};
use std::collections::BTreeMap;
use std::sync::Arc;

fn opts(args: &[(&str, &str)], target: Option<&str>) -> PlanOptions {
    PlanOptions {
        context: PathBuf::from("/ctx"),
        dockerfile: None,
        build_args: args
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        target: target.map(str::to_string),
        platform: None,
        build_platform: Some("linux/amd64".into()),
        base_env: BTreeMap::new(),
    }
}

fn plan_of(src: &str, args: &[(&str, &str)], target: Option<&str>) -> Result<Plan, PlanError> {
    plan_source(src, Path::new("Dockerfile"), &opts(args, target))
}

fn ok(src: &str) -> Plan {
    plan_of(src, &[], None).unwrap()
}

fn expanded(plan: &Plan, stage: usize, i: usize) -> &str {
    &plan.stages[stage].instructions[i].expanded
}

fn error_kind(src: &str) -> ErrorKind {
    match plan_of(src, &[], None) {
        Err(PlanError::Dockerfile(e)) => e.kind,
        other => panic!("expected a Dockerfile error, got {other:?}"),
    }
}

#[test]
fn global_args_are_only_visible_in_from_unless_redeclared() {
    let p = ok("ARG V=1\nARG IMG=alpine:$V\nFROM $IMG\nRUN echo\nLABEL a=$V\nARG V\nLABEL b=$V\n");
    assert_eq!(p.stages[0].base, "alpine:1");
    assert_eq!(expanded(&p, 0, 2), "LABEL a=\"\"");
    assert_eq!(expanded(&p, 0, 4), "LABEL b=1");
}

#[test]
fn build_args_override_defaults_everywhere() {
    let src = "ARG V=1\nFROM a:$V\nARG V\nARG W=x\nLABEL v=$V w=$W\n";
    let p = plan_of(src, &[("V", "9"), ("W", "y")], None).unwrap();
    assert_eq!(p.stages[0].base, "a:9");
    assert_eq!(expanded(&p, 0, 3), "LABEL v=9 w=y");
    assert!(p.warnings.is_empty());
}

#[test]
fn env_overrides_an_earlier_arg_and_later_instructions_see_it() {
    let p = plan_of(
        "FROM a\nARG V=arg\nENV V=env\nENV W=$V X=${V}2\nWORKDIR /$W\n",
        &[("V", "cli")],
        None,
    )
    .unwrap();
    assert_eq!(expanded(&p, 0, 3), "ENV W=env X=env2");
    assert_eq!(expanded(&p, 0, 4), "WORKDIR /env");
    let run_env = &p.stages[0].instructions[4].env;
    assert_eq!(run_env.get("W").map(String::as_str), Some("env"));
}

#[test]
fn env_pairs_on_one_line_see_the_environment_before_the_line() {
    let p = ok("FROM a\nENV A=1\nENV A=2 B=$A\nLABEL b=$B\n");
    assert_eq!(expanded(&p, 0, 3), "LABEL b=1");
}

#[test]
fn run_cmd_entrypoint_are_not_expanded_but_see_args() {
    let p = plan_of(
        "FROM a\nARG T=x\nRUN echo $T\nCMD echo $T\n",
        &[("HTTP_PROXY", "http://p")],
        None,
    )
    .unwrap();
    assert_eq!(expanded(&p, 0, 2), "RUN echo $T");
    assert_eq!(expanded(&p, 0, 3), "CMD echo $T");
    let run = &p.stages[0].instructions[2];
    assert_eq!(run.args.get("T").map(String::as_str), Some("x"));
    assert_eq!(
        run.args.get("HTTP_PROXY").map(String::as_str),
        Some("http://p")
    );
    assert!(
        p.warnings.is_empty(),
        "proxy args are never reported unused"
    );
}

#[test]
fn platform_args_are_predefined_for_from_and_declarable_in_stages() {
    let mut o = opts(&[], None);
    o.platform = Some("linux/arm/v7".into());
    let p = plan_source(
            "FROM --platform=$BUILDPLATFORM a:$TARGETARCH\nLABEL x=$TARGETOS\nARG TARGETPLATFORM TARGETVARIANT\nLABEL p=$TARGETPLATFORM v=$TARGETVARIANT\n",
            Path::new("Dockerfile"),
            &o,
        )
        .unwrap();
    assert_eq!(p.stages[0].base, "a:arm");
    assert_eq!(p.stages[0].platform.as_deref(), Some("linux/amd64"));
    assert_eq!(expanded(&p, 0, 1), "LABEL x=\"\"");
    assert_eq!(expanded(&p, 0, 3), "LABEL p=linux/arm/v7 v=v7");
    assert_eq!(p.target_platform.to_string(), "linux/arm/v7");
}

#[test]
fn bare_global_platform_arg_keeps_its_predefined_value() {
    let p = ok(
        "ARG TARGETPLATFORM\nARG UNSET\nFROM --platform=$TARGETPLATFORM a$UNSET\nARG TARGETPLATFORM\nLABEL p=$TARGETPLATFORM\n",
    );
    assert_eq!(p.stages[0].platform.as_deref(), Some("linux/amd64"));
    assert_eq!(p.stages[0].base, "a");
    assert_eq!(expanded(&p, 0, 2), "LABEL p=linux/amd64");
}

#[test]
fn unused_build_args_produce_a_warning() {
    let p = plan_of("ARG USED\nFROM a\n", &[("USED", "1"), ("NOPE", "2")], None).unwrap();
    assert_eq!(
        p.warnings,
        vec!["one or more build args were not consumed: [NOPE]"]
    );
}

#[test]
fn args_declared_only_in_skipped_stages_are_unused() {
    let p = plan_of("FROM a AS x\nARG ONLYX\nFROM b\n", &[("ONLYX", "1")], None).unwrap();
    assert_eq!(p.stages_to_build, vec![1]);
    assert_eq!(p.warnings.len(), 1);
}

#[test]
fn stages_resolve_by_name_and_index_and_unused_ones_are_skipped() {
    let src = "FROM a AS Base\nENV E=1\nFROM b AS unused\nFROM base AS mid\nFROM c\nCOPY --from=MID /x /x\nCOPY --from=0 /y /y\nCOPY --from=nginx:1 /z /z\n";
    let p = ok(src);
    assert_eq!(p.stages[2].base_stage, Some(0));
    assert_eq!(
        p.stages[2].instructions[0].env.get("E").map(String::as_str),
        Some("1")
    );
    assert_eq!(p.stages[3].depends_on, vec![0, 2]);
    assert_eq!(p.stages_to_build, vec![0, 2, 3]);
    assert_eq!(p.target, 3);
    assert_eq!(p.stages[3].instructions[3].stage_refs, Vec::<usize>::new());
}

#[test]
fn a_stage_built_from_another_inherits_its_env() {
    let p = ok("FROM a AS one\nENV E=1\nFROM one\nLABEL e=$E\n");
    assert_eq!(expanded(&p, 1, 1), "LABEL e=1");
}

#[test]
fn from_a_name_equal_to_its_own_stage_name_is_the_image() {
    let p = ok("FROM node AS node\nRUN x\n");
    assert_eq!(p.stages[0].base_stage, None);
}

#[test]
fn target_selects_a_stage_case_insensitively() {
    let p = plan_of(
        "FROM a AS Build\nFROM b AS test\nCOPY --from=build / /\nFROM c\n",
        &[],
        Some("TEST"),
    )
    .unwrap();
    assert_eq!(p.target, 1);
    assert_eq!(p.stages_to_build, vec![0, 1]);
    let e = plan_of("FROM a AS x\n", &[], Some("nope")).unwrap_err();
    assert!(matches!(e, PlanError::TargetNotFound { .. }));
    assert!(e.to_string().contains("\"nope\""));
}

#[test]
fn forward_references_and_cycles_are_rejected() {
    let later = plan_of(
        "FROM a AS one\nCOPY --from=two /x /x\nFROM b AS two\nFROM c\nCOPY --from=one / /\n",
        &[],
        None,
    )
    .unwrap_err();
    assert_eq!(
        later.to_string(),
        "Dockerfile:2:1: cannot copy from stage \"two\", it needs to be defined before current stage \"one\""
    );
    // A stage the build does not need may refer forward.
    let p = ok("FROM a AS unused\nCOPY --from=two / /\nFROM b AS two\n");
    assert_eq!(p.stages_to_build, vec![1]);
    let cycle = error_kind(
        "FROM a AS one\nCOPY --from=two / /\nFROM b AS two\nRUN --mount=from=one,target=/m x\n",
    );
    assert_eq!(
        cycle,
        ErrorKind::Cycle(vec!["one".into(), "two".into(), "one".into()])
    );
    let own = error_kind("FROM a AS me\nCOPY --from=me / /\n");
    assert!(matches!(own, ErrorKind::Cycle(_)));
}

#[test]
fn from_values_may_not_use_variables() {
    let e = error_kind("FROM a AS x\nFROM b\nARG S=x\nCOPY --from=$S / /\n");
    assert_eq!(e, ErrorKind::FromExpansion("$S".into()));
    let m = error_kind("FROM a AS x\nFROM b\nRUN --mount=from=${S:-x},target=/m true\n");
    assert!(matches!(m, ErrorKind::FromExpansion(_)));
}

#[test]
fn from_platform_must_be_a_platform() {
    assert!(matches!(
        error_kind("ARG P\nFROM --platform=$P a\n"),
        ErrorKind::Syntax(_)
    ));
    assert!(matches!(
        error_kind("FROM --platform=linux a\n"),
        ErrorKind::Syntax(_)
    ));
}

#[test]
fn mount_from_adds_a_dependency_and_mount_values_are_expanded() {
    let p = ok("FROM a AS src\nFROM b\nARG DIR=/m\nRUN --mount=type=bind,from=src,target=$DIR x\n");
    let run = &p.stages[1].instructions[2];
    assert_eq!(run.stage_refs, vec![0]);
    let Instruction::Run(r) = &run.instruction else {
        panic!()
    };
    assert_eq!(r.mounts[0].target.as_deref(), Some("/m"));
    assert_eq!(p.stages_to_build, vec![0, 1]);
}

#[test]
fn stage_index_out_of_range_is_an_undefined_stage() {
    let e = plan_of("FROM a\nCOPY --from=3 / /\n", &[], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:1: stage \"3\" is not defined in this Dockerfile"
    );
}

#[test]
fn required_variables_fail_with_their_message_and_location() {
    let e = plan_of("FROM a\n  WORKDIR ${DIR:?set DIR}\n", &[], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:3: variable substitution failed: DIR: set DIR"
    );
    let e = plan_of("ARG IMG\nFROM ${IMG:?}\n", &[], None).unwrap_err();
    assert!(e.to_string().contains("IMG: is not allowed to be unset"));
    assert!(plan_of("ARG IMG\nFROM ${IMG:?}\n", &[("IMG", "x")], None).is_ok());
}

#[test]
fn structural_errors_are_reported() {
    assert_eq!(
        error_kind("RUN x\nFROM a\n"),
        ErrorKind::BeforeFrom("RUN".into())
    );
    assert_eq!(error_kind("ARG A\n"), ErrorKind::NoFrom);
    assert_eq!(error_kind(""), ErrorKind::NoFrom);
    assert_eq!(
        error_kind("FROM a AS x\nFROM b AS X\n"),
        ErrorKind::DuplicateStageName("x".into())
    );
    assert!(matches!(
        error_kind("ARG E\nFROM $E\n"),
        ErrorKind::EmptyBase(_)
    ));
    assert!(matches!(
        error_kind("FROM a\nEXPOSE $P\n"),
        ErrorKind::InvalidPort(_)
    ));
    assert!(matches!(
        error_kind("FROM a\nEXPOSE 80/xyz\n"),
        ErrorKind::InvalidPort(_)
    ));
}

#[test]
fn flag_errors_on_continued_lines_point_at_the_physical_line() {
    let e = plan_of(
        "FROM a\nRUN --network=none \\\n  --mount=type=cache,target=/c,size=1 true\n",
        &[],
        None,
    )
    .unwrap_err();
    assert!(
        e.to_string().starts_with("Dockerfile:3:3: invalid value"),
        "{e}"
    );
}

#[test]
fn flag_errors_point_at_the_flag_column() {
    let e = plan_of("FROM a\nCOPY --link --bogus=1 a b\n", &[], None).unwrap_err();
    assert_eq!(
        e.to_string(),
        "Dockerfile:2:13: unknown flag --bogus for COPY"
    );
}

#[test]
fn copy_heredocs_expand_unless_quoted_and_run_heredocs_never() {
    let p =
        ok("FROM a\nARG N=kiln\nCOPY <<A <<'B' /d/\nhi $N\nA\nhi $N\nB\nRUN <<EOF\necho $N\nEOF\n");
    let copy = &p.stages[0].instructions[2];
    assert_eq!(copy.heredocs[0].content, "hi kiln\n");
    assert_eq!(copy.heredocs[1].content, "hi $N\n");
    let run = &p.stages[0].instructions[3];
    assert_eq!(run.heredocs[0].content, "echo $N\n");
    assert_eq!(run.expanded, "RUN <<EOF\necho $N\nEOF");
}

#[test]
fn onbuild_healthcheck_shell_maintainer_are_not_expanded() {
    let p = ok(
        "FROM a\nENV X=1\nONBUILD RUN echo $X\nHEALTHCHECK CMD test $X\nSHELL [\"/bin/$X\"]\nMAINTAINER $X\n",
    );
    assert_eq!(expanded(&p, 0, 2), "ONBUILD RUN echo $X");
    assert_eq!(expanded(&p, 0, 3), "HEALTHCHECK CMD test $X");
    assert_eq!(expanded(&p, 0, 4), "SHELL [\"/bin/$X\"]");
    assert_eq!(expanded(&p, 0, 5), "MAINTAINER $X");
}

#[test]
fn expanded_instructions_cover_every_expanding_kind() {
    let p = ok(
        "FROM a\nENV U=app P=80 D=/data S=SIGINT Q=\"x y\"\nUSER $U:$U\nEXPOSE $P ${P}/udp\nVOLUME $D [\"/v\"]\nVOLUME [\"$D\"]\nSTOPSIGNAL $S\nLABEL \"k $U\"=$Q\nADD --chown=$U --chmod=0${P} --checksum=sha256:$P --exclude=$D src$P $D/\nCOPY --chown=$U:$U --exclude=*.$P [\"$D\", \"/x\"]\n",
    );
    assert_eq!(expanded(&p, 0, 2), "USER app:app");
    assert_eq!(expanded(&p, 0, 3), "EXPOSE 80 80/udp");
    // Shell-form words go through Docker's word processing: quotes removed.
    assert_eq!(expanded(&p, 0, 4), "VOLUME [\"/data\",\"[/v]\"]");
    assert_eq!(expanded(&p, 0, 5), "VOLUME [\"/data\"]");
    assert_eq!(expanded(&p, 0, 6), "STOPSIGNAL SIGINT");
    assert_eq!(expanded(&p, 0, 7), "LABEL \"k app\"=\"x y\"");
    assert_eq!(
        expanded(&p, 0, 8),
        "ADD --chown=app --chmod=080 --checksum=sha256:80 --exclude=/data src80 /data/"
    );
    assert_eq!(
        expanded(&p, 0, 9),
        "COPY --chown=app:app --exclude=*.80 /data /x"
    );
}

#[test]
fn plan_reads_the_dockerfile_from_the_context() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("Dockerfile"), "FROM scratch\n").unwrap();
    let mut o = opts(&[], None);
    o.context = dir.path().to_path_buf();
    let p = plan(&o).unwrap();
    assert_eq!(p.stages[0].base, "scratch");
    o.dockerfile = Some(dir.path().join("missing"));
    assert!(matches!(plan(&o), Err(PlanError::Read { .. })));
}

#[test]
fn base_image_env_is_used_when_the_engine_supplies_it() {
    let mut o = opts(&[], None);
    let mut env = Vars::new();
    env.insert("PATH".into(), "/usr/bin".into());
    o.base_env.insert("alpine:3".into(), env);
    let p = plan_source(
        "ARG T=3\nFROM alpine:$T\nENV PATH=/opt:$PATH\nFROM busybox\nENV PATH=/opt:$PATH\n",
        Path::new("Dockerfile"),
        &o,
    )
    .unwrap();
    assert_eq!(expanded(&p, 0, 1), "ENV PATH=/opt:/usr/bin");
    assert_eq!(
        p.stages[0].env.get("PATH").map(String::as_str),
        Some("/opt:/usr/bin")
    );
    assert_eq!(expanded(&p, 1, 1), "ENV PATH=/opt:");
}

#[test]
fn platforms_parse_and_reject_garbage() {
    for bad in ["linux", "linux/", "a/b/c/d", ""] {
        let mut o = opts(&[], None);
        o.platform = Some(bad.into());
        let err = plan_source("FROM a\n", Path::new("Dockerfile"), &o).unwrap_err();
        assert!(matches!(err, PlanError::Platform(_)), "{bad}: {err}");
    }
}

/// Before kiln had one `Platform`, the planner kept `v8` here (so
/// TARGETVARIANT was `v8` for `linux/arm64/v8` and empty for
/// `linux/arm64`) while index selection treated both as one platform.
#[test]
fn arm64_with_and_without_v8_plans_the_same_platform_args() {
    let df = "FROM a\nARG TARGETPLATFORM TARGETVARIANT TARGETARCH\nLABEL p=$TARGETPLATFORM v=$TARGETVARIANT a=$TARGETARCH\n";
    for given in ["linux/arm64", "linux/arm64/v8", "Linux/AArch64"] {
        let mut o = opts(&[], None);
        o.platform = Some(given.into());
        let p = plan_source(df, Path::new("Dockerfile"), &o).unwrap();
        assert_eq!(
            expanded(&p, 0, 2),
            "LABEL p=linux/arm64 v=\"\" a=arm64",
            "{given}"
        );
        assert_eq!(p.target_platform.to_string(), "linux/arm64", "{given}");
    }
}

#[test]
fn bare_arm_gets_its_default_variant_v7() {
    let mut o = opts(&[], None);
    o.platform = Some("linux/arm".into());
    let p = plan_source(
        "FROM a\nARG TARGETVARIANT\nLABEL v=$TARGETVARIANT\n",
        Path::new("Dockerfile"),
        &o,
    )
    .unwrap();
    assert_eq!(expanded(&p, 0, 2), "LABEL v=v7");
    assert_eq!(p.target_platform.to_string(), "linux/arm/v7");
}

#[test]
fn dry_run_json_prints_platforms_as_text() {
    let mut o = opts(&[], None);
    o.platform = Some("linux/arm64/v8".into());
    let p = plan_source("FROM a\n", Path::new("Dockerfile"), &o).unwrap();
    let json = serde_json::to_value(&p).unwrap();
    assert_eq!(json["target_platform"], "linux/arm64");
    assert_eq!(json["build_platform"], "linux/amd64");
}

/// `ARG a=xxxxxxxxxx`, then each ARG ten times the one before: a
/// "billion laughs" of 516 bytes or so.
fn laughs(levels: usize) -> String {
    let names: Vec<char> = ('a'..='z').take(levels).collect();
    let mut src = String::from("FROM scratch\nARG a=xxxxxxxxxx\n");
    for pair in names.windows(2) {
        let prev = format!("${}", pair[0]);
        src.push_str(&format!("ARG {}={}\n", pair[1], prev.repeat(10)));
    }
    src.push_str(&format!("RUN echo ${}\n", names[levels - 1]));
    src
}

#[test]
fn chained_expansions_stop_at_the_size_limit_and_name_the_line() {
    let src = laughs(9);
    assert!(src.len() < 600, "{}", src.len());
    let err = plan_of(&src, &[], None).unwrap_err();
    // a=10 bytes, ..., f=1,000,000 bytes still fits, g=10^7 does not.
    let Err(PlanError::Dockerfile(e)) = plan_of(&src, &[], None) else {
        panic!("expected a Dockerfile error");
    };
    assert_eq!(e.line, 8, "{err}");
    assert!(
        matches!(e.kind, ErrorKind::Expansion(shell::ExpandError::TooLong)),
        "{err}"
    );
    assert!(err.to_string().contains("larger than"), "{err}");
}

#[test]
fn many_large_values_exhaust_the_expansion_budget() {
    // Each value stays under the per-word limit, but copies of them for
    // every later instruction would not fit in memory for long.
    let mut src = laughs(6);
    for i in 0..200 {
        src.push_str(&format!("ENV v{i}=$f\n"));
    }
    let Err(PlanError::Dockerfile(e)) = plan_of(&src, &[], None) else {
        panic!("expected a Dockerfile error");
    };
    assert!(
        matches!(
            e.kind,
            ErrorKind::Expansion(shell::ExpandError::BudgetExceeded(_))
        ),
        "{e}"
    );
    assert!(e.line > 8 && e.line < 200, "{e}");
}

#[test]
fn instructions_share_unchanged_variable_copies() {
    let p = ok("FROM a\nARG X=1\nLABEL a=1\nLABEL b=2\nENV Y=2\nLABEL c=3\n");
    let ins = &p.stages[0].instructions;
    assert!(Arc::ptr_eq(&ins[2].args, &ins[3].args));
    assert!(Arc::ptr_eq(&ins[2].env, &ins[3].env));
    assert!(!Arc::ptr_eq(&ins[3].env, &ins[5].env));
    assert_eq!(ins[5].env.get("Y").map(String::as_str), Some("2"));
}
