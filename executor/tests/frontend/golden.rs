//! Golden plans: every directory under `tests/corpus/` holds a Dockerfile,
//! an optional `args` file (one option a line: `build-arg K=V`, `target T`,
//! `platform os/arch`, `dockerfile relative/path`) and either the expected
//! `--dry-run` plan (`expected.json`) or a substring of the expected error
//! (`expected_error.txt`, the path of the corpus directory left out).
//! `KILN_BLESS=1 cargo test --release -p kiln-executor --test frontend golden::`
//! rewrites them; review every change by eye before committing it.

use kiln_executor::plan::{PlanOptions, plan};
use std::path::{Path, PathBuf};
use std::process::Command;

fn corpus() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/corpus")
}

fn options(dir: &Path) -> PlanOptions {
    let mut opts = PlanOptions {
        context: dir.to_path_buf(),
        dockerfile: None,
        build_args: Vec::new(),
        target: None,
        platform: None,
        // Pinned so the goldens do not depend on the machine running them.
        build_platform: Some("linux/amd64".into()),
        base_env: Default::default(),
    };
    let Ok(args) = std::fs::read_to_string(dir.join("args")) else {
        return opts;
    };
    for line in args.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let (key, value) = line.split_once(' ').unwrap_or((line, ""));
        match key {
            "build-arg" => {
                let (k, v) = value.split_once('=').expect("build-arg K=V");
                opts.build_args.push((k.into(), v.into()));
            }
            "target" => opts.target = Some(value.into()),
            "platform" => opts.platform = Some(value.into()),
            "dockerfile" => opts.dockerfile = Some(dir.join(value)),
            other => panic!("{}: unknown args line {other:?}", dir.display()),
        }
    }
    opts
}

#[test]
fn golden_plans_match() {
    let bless = std::env::var_os("KILN_BLESS").is_some();
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(corpus())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(dirs.len() >= 40, "the corpus should hold at least 40 cases");
    let mut failures = Vec::new();
    for dir in &dirs {
        let name = dir.file_name().unwrap().to_string_lossy().to_string();
        let expected_json = dir.join("expected.json");
        let expected_err = dir.join("expected_error.txt");
        match plan(&options(dir)) {
            Ok(p) => {
                let actual = serde_json::to_string_pretty(&p).unwrap() + "\n";
                if bless {
                    std::fs::write(&expected_json, &actual).unwrap();
                    let _ = std::fs::remove_file(&expected_err);
                    continue;
                }
                match std::fs::read_to_string(&expected_json) {
                    Ok(want) if want == actual => {}
                    Ok(_) => failures.push(format!(
                        "{name}: plan differs from expected.json:\n{actual}"
                    )),
                    Err(_) => failures.push(format!("{name}: planned fine but expected an error")),
                }
            }
            Err(e) => {
                let prefix = format!("{}/", dir.display());
                let message = e.to_string().replace(&prefix, "");
                if bless {
                    std::fs::write(&expected_err, format!("{message}\n")).unwrap();
                    let _ = std::fs::remove_file(&expected_json);
                    continue;
                }
                match std::fs::read_to_string(&expected_err) {
                    Ok(want) if message.contains(want.trim()) => {}
                    Ok(want) => failures.push(format!(
                        "{name}: error {message:?} does not contain {:?}",
                        want.trim()
                    )),
                    Err(_) => failures.push(format!("{name}: unexpected error {message}")),
                }
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

fn executor(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_kiln-executor"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn dry_run_binary_prints_the_plan_and_exits_zero() {
    let dir = corpus().join("multistage-go");
    let out = executor(&[
        "--dry-run",
        "--context",
        dir.to_str().unwrap(),
        "--build-arg",
        "NOT_DECLARED=1",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["target"], 1);
    assert_eq!(plan["stages_to_build"], serde_json::json!([0, 1]));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("not consumed: [NOT_DECLARED]"), "{stderr}");
}

#[test]
fn dry_run_binary_reports_errors_with_location_and_exits_non_zero() {
    let dir = corpus().join("error-unknown-instruction");
    let out = executor(&["--dry-run", "--context", dir.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(out.stdout.is_empty());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("Dockerfile:3:1: unknown instruction: FORM"),
        "{stderr}"
    );
}

#[test]
fn dry_run_binary_honours_dockerfile_target_and_platform() {
    let dir = corpus().join("target-selects-stage");
    let out = executor(&[
        "--dry-run",
        "--context",
        dir.to_str().unwrap(),
        "--dockerfile",
        dir.join("Dockerfile").to_str().unwrap(),
        "--target",
        "test",
        "--custom-platform",
        "linux/arm64",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(plan["target_platform"], "linux/arm64");
    assert_eq!(
        plan["stages"][plan["target"].as_u64().unwrap() as usize]["name"],
        "test"
    );
}

#[test]
fn unknown_flags_are_rejected_by_the_binary() {
    let out = executor(&["--dry-run", "--no-such-flag"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--no-such-flag"));
}
