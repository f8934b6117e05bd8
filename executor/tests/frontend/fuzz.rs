//! Robustness: arbitrary text and token soups built from Dockerfile syntax
//! must never make the parser, the planner, the variable expander or the
//! `.dockerignore` matcher panic; they return values or errors.

use kiln_executor::dockerfile::{self, shell};
use kiln_executor::plan::{PlanOptions, plan_source};
use kiln_executor::sources::dockerignore::DockerIgnore;
use proptest::prelude::*;
use std::path::Path;

const TOKENS: &[&str] = &[
    "FROM",
    "from",
    "RUN",
    "CMD",
    "LABEL",
    "MAINTAINER",
    "EXPOSE",
    "ENV",
    "ADD",
    "COPY",
    "ENTRYPOINT",
    "VOLUME",
    "USER",
    "WORKDIR",
    "ARG",
    "ONBUILD",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "SHELL",
    "AS",
    "NONE",
    "scratch",
    "alpine",
    "--platform=",
    "--mount=",
    "type=cache,target=/c",
    "type=secret,id=",
    "from=",
    "--from=",
    "--chown=",
    "--chmod=",
    "--link",
    "--parents",
    "--exclude=",
    "--checksum=",
    "--keep-git-dir",
    "--network=",
    "--interval=",
    "--retries=",
    "--",
    "-",
    "=",
    ",",
    ":",
    "/",
    "'",
    "\"",
    "$",
    "${",
    "}",
    "{",
    ":-",
    ":+",
    ":?",
    "-",
    "+",
    "?",
    "<<",
    "<<-",
    "<<'",
    "EOF",
    "\\",
    "`",
    "[",
    "]",
    "[\"",
    "\"]",
    "\n",
    "\r\n",
    " ",
    "\t",
    "#",
    "# escape=`",
    "# syntax=x",
    "0",
    "1",
    "80/tcp",
    "a",
    "b",
    "x=y",
    "\u{e9}",
    "\u{1F600}",
];

fn soup() -> impl Strategy<Value = String> {
    prop::collection::vec(prop::sample::select(TOKENS), 0..80).prop_map(|tokens| tokens.concat())
}

fn options() -> PlanOptions {
    PlanOptions {
        build_args: vec![("A".into(), "1".into())],
        build_platform: Some("linux/amd64".into()),
        ..PlanOptions::default()
    }
}

fn exercise(text: &str) {
    let _ = dockerfile::parse(text, Path::new("Dockerfile"));
    let _ = plan_source(text, Path::new("Dockerfile"), &options());
    let mut targeted = options();
    targeted.target = Some("a".into());
    let _ = plan_source(text, Path::new("Dockerfile"), &targeted);
    let _ = shell::expand_word(text, &shell::Vars::new(), '\\');
    let _ = shell::expand_heredoc(text, &shell::Vars::new(), '`');
    if let Ok(rules) = DockerIgnore::parse(text, Path::new(".dockerignore")) {
        let _ = rules.is_excluded(text);
        let _ = rules.is_excluded("a/b/c.txt");
        let _ = rules.may_contain_included("a");
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn arbitrary_text_never_panics(text in any::<String>()) {
        exercise(&text);
    }

    #[test]
    fn token_soups_never_panic(text in soup()) {
        exercise(&text);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
        let _ = dockerfile::parse_bytes(&bytes, Path::new("Dockerfile"));
        let mut with_from = b"FROM a\n# \xff comment\n".to_vec();
        with_from.extend_from_slice(&bytes);
        let _ = dockerfile::parse_bytes(&with_from, Path::new("Dockerfile"));
    }

    #[test]
    fn soups_after_a_valid_from_never_panic(text in soup()) {
        exercise(&format!("FROM alpine AS a\n{text}"));
        exercise(&format!("ARG A\nFROM alpine\nRUN {text}\nCOPY {text} /\n"));
    }
}

#[test]
fn pathological_inputs_return_errors() {
    let deep = format!("FROM a\nLABEL x={}\n", "${a:-".repeat(50_000));
    assert!(plan_source(&deep, Path::new("Dockerfile"), &options()).is_err());
    let long_continuation = format!("FROM a\nRUN {}\n", "x \\\n".repeat(20_000));
    assert!(plan_source(&long_continuation, Path::new("Dockerfile"), &options()).is_ok());
}
