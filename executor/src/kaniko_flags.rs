//! Kaniko v1.24.0's executor flags and environment variables, and what
//! kiln-executor does with each: the one source of truth for the Kaniko
//! compatibility of the command line. `docs/kaniko-migration.md` carries the
//! table [`markdown_table`] renders (a test keeps the two equal and checks
//! every flag against `--help`), and [`machinery_warnings`] says, once per
//! flag, what kiln does instead when a flag that only tunes Kaniko's own
//! machinery asks for something kiln does not do.

use clap::ArgMatches;
use clap::parser::ValueSource;

/// How a flag takes its value, as pflag parses it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `--flag`, `--flag=true`, `--flag=false`.
    Bool,
    /// One value; given twice, the last wins.
    Value,
    /// Repeatable; every value is kept.
    Repeated,
}

/// What a Kaniko user gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// Kaniko's meaning.
    Same,
    /// Accepted with a meaning that differs; the note says how and why.
    Different,
    /// Accepted; it tunes something kiln does differently (the note says
    /// what kiln does instead).
    NoOp,
}

impl Status {
    pub fn label(self) -> &'static str {
        match self {
            Status::Same => "same",
            Status::Different => "different",
            Status::NoOp => "no-op",
        }
    }
}

/// One Kaniko flag (deprecated spellings such as `tarPath` are rows of
/// their own, as Kaniko lists them).
#[derive(Debug, Clone, Copy)]
pub struct KanikoFlag {
    pub name: &'static str,
    pub short: Option<char>,
    pub kind: Kind,
    pub status: Status,
    pub note: &'static str,
}

/// One environment variable Kaniko's executor reads.
#[derive(Debug, Clone, Copy)]
pub struct KanikoEnv {
    pub name: &'static str,
    /// The flag it stands for.
    pub flag: &'static str,
    pub status: Status,
    pub note: &'static str,
}

const fn flag(
    name: &'static str,
    short: Option<char>,
    kind: Kind,
    status: Status,
    note: &'static str,
) -> KanikoFlag {
    KanikoFlag {
        name,
        short,
        kind,
        status,
        note,
    }
}

use Kind::{Bool, Repeated, Value};
use Status::{Different, NoOp, Same};

/// Every flag of Kaniko v1.24.0's executor, in Kaniko's documentation order.
pub const FLAGS: &[KanikoFlag] = &[
    flag(
        "context",
        Some('c'),
        Value,
        Same,
        "A directory, `dir://`, `tar://` (a `.tar`/`.tar.gz` file or `stdin`), `git://` (over https; `GIT_PULL_METHOD`), `https://` (git when it ends in `.git`, an Azure blob, else a tarball), `s3://` (`S3_ENDPOINT`, `S3_FORCE_PATH_STYLE`), `gs://`; kiln also takes `az://`, `file://` and `GIT_PULL_METHOD=git`. A git context has no `.git` directory, so the same commit gives the same cache keys.",
    ),
    flag(
        "dockerfile",
        Some('f'),
        Value,
        Same,
        "A relative path not found from the working directory is looked up in the context.",
    ),
    flag("destination", Some('d'), Repeated, Same, ""),
    flag(
        "build-arg",
        None,
        Repeated,
        Same,
        "`K` alone takes the value from the environment.",
    ),
    flag("label", None, Repeated, Same, ""),
    flag("target", None, Value, Same, ""),
    flag("no-push", None, Bool, Same, "Also `KANIKO_NO_PUSH`."),
    flag(
        "no-push-cache",
        None,
        Bool,
        Same,
        "Look the cache up, write nothing to it (no blobs, no tags); applies to every cache backend (it is `--cache-mode read-only`) and is an error with `--cache-mode write-only`.",
    ),
    flag(
        "tar-path",
        None,
        Value,
        Same,
        "A `docker load` tarball, tagged with the destinations.",
    ),
    flag(
        "tarPath",
        None,
        Value,
        Same,
        "Deprecated spelling of `--tar-path`.",
    ),
    flag("oci-layout-path", None, Value, Same, ""),
    flag("digest-file", None, Value, Same, ""),
    flag(
        "image-name-with-digest-file",
        None,
        Value,
        Same,
        "One `<repository>@<digest>` line per destination.",
    ),
    flag(
        "image-name-tag-with-digest-file",
        None,
        Value,
        Same,
        "One `<repository>:<tag>@<digest>` line per destination.",
    ),
    flag(
        "reproducible",
        None,
        Bool,
        Same,
        "Also implied by `SOURCE_DATE_EPOCH`.",
    ),
    flag(
        "single-snapshot",
        None,
        Bool,
        Same,
        "One layer per stage, taken after its last filesystem step; cached under that step's key.",
    ),
    flag(
        "snapshot-mode",
        None,
        Value,
        NoOp,
        "kiln reads a step's changes from its overlay upper directory (or compares full metadata, ctime included, without `--snapshotter overlay`): every change `full` finds, at the cost of `redo` or less. Warns when `redo` or `time`.",
    ),
    flag(
        "snapshotMode",
        None,
        Value,
        NoOp,
        "Deprecated spelling of `--snapshot-mode`.",
    ),
    flag(
        "use-new-run",
        None,
        Bool,
        NoOp,
        "kiln always detects a RUN step's changes without a full-filesystem snapshot (overlay). Warns when true.",
    ),
    flag(
        "cache",
        None,
        Bool,
        Different,
        "Defaults to true (Kaniko: false): without `--cache-server` the cache is embedded in the state directory and needs no set-up; keys are exact, so a hit is always the same result.",
    ),
    flag(
        "cache-repo",
        None,
        Value,
        Different,
        "A layer cache in a registry repository (entries as OCI artifacts tagged `kiln-<key>`, layers as blobs that pushes to the same registry mount; docs/cache-repo.md). The format is kiln's, so Kaniko's and kiln's caches are not shared; `--cache-server` wins when both are given; without the flag kiln uses the embedded cache instead of deriving `<destination>/cache`; `oci:PATH` is refused.",
    ),
    flag(
        "cache-dir",
        None,
        Value,
        Different,
        "kiln's state directory (blobs, unpacked layers, embedded cache, scratch space), not a base-image cache filled by Kaniko's warmer. Default: `--kaniko-dir`/`KANIKO_DIR`, else `$KILN_STATE_DIR`, else `~/.cache/kiln`.",
    ),
    flag(
        "cache-ttl",
        None,
        Value,
        Different,
        "A Go duration (`336h`, `1h30m`, `1.5h`, `90s`; kiln also takes `7d`). Entries of the embedded cache older than this are not reused; a cache server evicts by size instead.",
    ),
    flag(
        "cache-copy-layers",
        None,
        Bool,
        NoOp,
        "kiln caches COPY and ADD steps always (their keys hash the copied files). Warns when false.",
    ),
    flag(
        "cache-run-layers",
        None,
        Bool,
        NoOp,
        "kiln caches RUN steps always; use `--cache-mode` or `--cache=false` to change what is cached. Warns when false.",
    ),
    flag(
        "compressed-caching",
        None,
        Bool,
        NoOp,
        "kiln streams every layer to disk compressed and never holds one in memory. Warns when false.",
    ),
    flag(
        "compression",
        None,
        Value,
        Same,
        "`gzip` (default) or `zstd`.",
    ),
    flag(
        "compression-level",
        None,
        Value,
        Same,
        "gzip 0-9, zstd 1-22; -1 is the default level.",
    ),
    flag(
        "cleanup",
        None,
        Bool,
        Different,
        "At the end, removes the unpacked layers of the state directory (scratch space always goes); blobs and the embedded cache stay. With `--isolation none` the files the build put on `/` are not removed yet.",
    ),
    flag("custom-platform", None, Value, Same, ""),
    flag(
        "customPlatform",
        None,
        Value,
        Same,
        "Deprecated spelling of `--custom-platform`.",
    ),
    flag(
        "skip-unused-stages",
        None,
        Bool,
        NoOp,
        "kiln always builds only the stages the target needs. Warns when false.",
    ),
    flag(
        "context-sub-path",
        None,
        Value,
        Same,
        "Also applied to local directories (Kaniko ignores it there); it may not leave the context.",
    ),
    flag(
        "git",
        None,
        Repeated,
        Same,
        "`branch`, `single-branch`, `recurse-submodules`, `insecure-skip-tls`; repeatable or comma-separated; an unknown key is an error (Kaniko ignores it).",
    ),
    flag(
        "bucket",
        Some('b'),
        Value,
        Same,
        "GCS unless the value has a scheme; replaces a `SCHEME://` or the default `--context`; a plain `--context` that is not a local path is the object's name in the bucket.",
    ),
    flag(
        "insecure",
        None,
        Bool,
        Different,
        "Plain HTTP for pulls as well as pushes, without trying HTTPS first (Kaniko: pushes only, HTTPS first).",
    ),
    flag("insecure-pull", None, Bool, Same, ""),
    flag(
        "insecure-registry",
        None,
        Repeated,
        Different,
        "Straight to plain HTTP (Kaniko tries HTTPS first); an HTTPS registry listed here gets an error saying so.",
    ),
    flag("skip-tls-verify", None, Bool, Same, ""),
    flag("skip-tls-verify-pull", None, Bool, Same, ""),
    flag("skip-tls-verify-registry", None, Repeated, Same, ""),
    flag(
        "registry-certificate",
        None,
        Repeated,
        Same,
        "`REGISTRY=CA.pem`: trusted for that registry besides the default roots; a bare path (kiln's extra) trusts the CA for every registry.",
    ),
    flag(
        "registry-client-cert",
        None,
        Repeated,
        Same,
        "`REGISTRY=CERT,KEY`: mutual TLS with that registry.",
    ),
    flag(
        "registry-map",
        None,
        Repeated,
        Same,
        "`ORIGINAL=M1;M2` (also `KANIKO_REGISTRY_MAP`); pulls only, falling back to the original unless `--skip-default-registry-fallback`.",
    ),
    flag(
        "registry-mirror",
        None,
        Repeated,
        Same,
        "`host[/path]`: the path prefixes the repository (`/v2/<path>/<repo>/...`); also `KANIKO_REGISTRY_MIRROR`; kiln also accepts an `http(s)://` scheme.",
    ),
    flag("skip-default-registry-fallback", None, Bool, Same, ""),
    flag(
        "push-retry",
        None,
        Value,
        Same,
        "Network errors, 5xx and 429 are retried with backoff; other 4xx are not.",
    ),
    flag(
        "push-ignore-immutable-tag-errors",
        None,
        Bool,
        Same,
        "A 400/403/409/412 naming TAG_INVALID, MANIFEST_TAGGED or an immutable tag becomes a warning.",
    ),
    flag(
        "skip-push-permission-check",
        None,
        Bool,
        Same,
        "The check (before the build, once per destination repository) gets a push-scope token and starts and cancels a blob upload; skipped with `--no-push` too.",
    ),
    flag("image-download-retry", None, Value, Same, ""),
    flag(
        "image-fs-extract-retry",
        None,
        Value,
        Same,
        "A base-image layer that fails to extract is fetched again and extracted again, up to N more times.",
    ),
    flag(
        "ignore-path",
        None,
        Repeated,
        Same,
        "Left out of every layer, with either snapshotter.",
    ),
    flag(
        "ignore-var-run",
        None,
        Bool,
        Same,
        "Default true: `/var/run` is left out of every layer; `=false` keeps it.",
    ),
    flag(
        "whitelist-var-run",
        None,
        Bool,
        Same,
        "Deprecated spelling of `--ignore-var-run`.",
    ),
    flag(
        "kaniko-dir",
        None,
        Value,
        Different,
        "kiln's state directory when `--cache-dir` is not given (also `KANIKO_DIR`); without either, kiln does not use `/kaniko`.",
    ),
    flag(
        "force",
        None,
        Bool,
        Different,
        "Needed only with `--isolation none`, which overwrites the filesystem it runs on; the default chroot isolation runs anywhere.",
    ),
    flag(
        "force-build-metadata",
        None,
        Bool,
        Same,
        "Every instruction gets a layer: metadata instructions and steps that changed nothing an empty one.",
    ),
    flag(
        "log-format",
        None,
        Value,
        Same,
        "`text`, `color` or `json`; `color` (the default) colours only on a terminal without `NO_COLOR`; `json` is one object per event with `level`, `msg`, `time` and step fields.",
    ),
    flag(
        "log-timestamp",
        None,
        Bool,
        Same,
        "Text lines start with an RFC 3339 UTC time; JSON always has `time`.",
    ),
    flag(
        "verbosity",
        Some('v'),
        Value,
        Same,
        "panic, fatal, error, warn, info, debug, trace: `warn` hides step lines, `debug` adds cache keys and layer digests; RUN output shows at every level, as in Kaniko.",
    ),
];

/// The environment variables Kaniko's executor reads.
pub const ENV_VARS: &[KanikoEnv] = &[
    KanikoEnv {
        name: "KANIKO_NO_PUSH",
        flag: "no-push",
        status: Different,
        note: "Go's boolean forms (`1`, `true`, `false`, ...); a `--no-push` on the command line wins over it (in Kaniko the variable wins).",
    },
    KanikoEnv {
        name: "KANIKO_REGISTRY_MAP",
        flag: "registry-map",
        status: Same,
        note: "Added to the `--registry-map` flags, as in Kaniko.",
    },
    KanikoEnv {
        name: "KANIKO_REGISTRY_MIRROR",
        flag: "registry-mirror",
        status: Same,
        note: "Split on `,` or `;`; added to the `--registry-mirror` flags, as in Kaniko.",
    },
    KanikoEnv {
        name: "KANIKO_DIR",
        flag: "kaniko-dir",
        status: Different,
        note: "As `--kaniko-dir`, which wins over it.",
    },
];

/// The Markdown table of [`FLAGS`] and [`ENV_VARS`] that
/// `docs/kaniko-migration.md` carries between its `kaniko-flags` markers.
pub fn markdown_table() -> String {
    let mut out = String::from("| Kaniko flag | kiln | Notes |\n|---|---|---|\n");
    for f in FLAGS {
        let name = match f.short {
            Some(s) => format!("`--{}` (`-{s}`)", f.name),
            None => format!("`--{}`", f.name),
        };
        out.push_str(&format!("| {name} | {} | {} |\n", f.status.label(), f.note));
    }
    out.push_str("\n| Environment variable | Flag | kiln | Notes |\n|---|---|---|---|\n");
    for e in ENV_VARS {
        out.push_str(&format!(
            "| `{}` | `--{}` | {} | {} |\n",
            e.name,
            e.flag,
            e.status.label(),
            e.note
        ));
    }
    out
}

/// One warning line per flag that only tunes Kaniko's own machinery and was
/// given (on the command line or in the environment) with a value asking
/// for something kiln does not do. A value that matches what kiln does
/// anyway (`--snapshot-mode=full`, `--cache-copy-layers=true`, ...) is
/// silent: the job gets what it asked for.
pub fn machinery_warnings(matches: &ArgMatches) -> Vec<String> {
    let given = |id: &str| {
        matches!(
            matches.value_source(id),
            Some(ValueSource::CommandLine | ValueSource::EnvVariable)
        )
    };
    let flag_is = |id: &str, value: bool| given(id) && matches.get_one::<bool>(id) == Some(&value);
    let mut warnings = Vec::new();
    if given("snapshot_mode")
        && let Some(mode) = matches
            .get_one::<String>("snapshot_mode")
            .filter(|m| *m != "full")
    {
        warnings.push(format!(
            "--snapshot-mode={mode} has no effect: kiln reads each step's changes from its overlay (or a full metadata walk) and finds every change `full` does"
        ));
    }
    let fixed: [(&str, bool, &str); 5] = [
        (
            "use_new_run",
            true,
            "--use-new-run has no effect: kiln always detects a RUN step's changes without snapshotting the whole filesystem",
        ),
        (
            "cache_copy_layers",
            false,
            "--cache-copy-layers=false has no effect: kiln caches COPY and ADD steps too (their keys hash the copied files)",
        ),
        (
            "cache_run_layers",
            false,
            "--cache-run-layers=false has no effect: kiln caches RUN steps; use --cache-mode or --cache=false to change what is cached",
        ),
        (
            "compressed_caching",
            false,
            "--compressed-caching=false has no effect: kiln streams layers to disk compressed and never holds one in memory",
        ),
        (
            "skip_unused_stages",
            false,
            "--skip-unused-stages=false has no effect: kiln builds only the stages the target needs",
        ),
    ];
    for (id, value, message) in fixed {
        if flag_is(id, value) {
            warnings.push(message.to_owned());
        }
    }
    warnings
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::ExecutorArgs;
    use clap::CommandFactory;

    /// The flags the issue lists for Kaniko v1.24.0, as the issue spells them.
    const ISSUE_15_FLAGS: &str = "context, dockerfile, destination, build-arg, label, target, \
        no-push, no-push-cache, tar-path, tarPath, oci-layout-path, digest-file, \
        image-name-with-digest-file, image-name-tag-with-digest-file, reproducible, \
        single-snapshot, snapshot-mode, snapshotMode, use-new-run, cache, cache-repo, cache-dir, \
        cache-ttl, cache-copy-layers, cache-run-layers, compressed-caching, compression, \
        compression-level, cleanup, custom-platform, customPlatform, skip-unused-stages, \
        context-sub-path, git, bucket, insecure, insecure-pull, insecure-registry, \
        skip-tls-verify, skip-tls-verify-pull, skip-tls-verify-registry, registry-certificate, \
        registry-client-cert, registry-map, registry-mirror, skip-default-registry-fallback, \
        push-retry, push-ignore-immutable-tag-errors, skip-push-permission-check, \
        image-download-retry, image-fs-extract-retry, ignore-path, ignore-var-run, \
        whitelist-var-run, kaniko-dir, force, force-build-metadata, log-format, log-timestamp, \
        verbosity";

    fn docs_path() -> std::path::PathBuf {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/kaniko-migration.md")
    }

    #[test]
    fn the_table_lists_exactly_kanikos_60_flags_and_4_env_vars() {
        let mut expected: Vec<&str> = ISSUE_15_FLAGS.split(", ").map(str::trim).collect();
        let mut table: Vec<&str> = FLAGS.iter().map(|f| f.name).collect();
        assert_eq!(expected.len(), 60);
        expected.sort();
        table.sort();
        assert_eq!(table, expected);
        let env: Vec<&str> = ENV_VARS.iter().map(|e| e.name).collect();
        assert_eq!(
            env,
            [
                "KANIKO_NO_PUSH",
                "KANIKO_REGISTRY_MAP",
                "KANIKO_REGISTRY_MIRROR",
                "KANIKO_DIR"
            ]
        );
        for f in FLAGS {
            assert!(
                f.status != Status::Different && f.status != Status::NoOp || !f.note.is_empty(),
                "--{}: a different or no-op flag says why",
                f.name
            );
        }
    }

    #[test]
    fn every_kaniko_flag_is_in_the_help_with_its_short_form_and_kind() {
        let mut cmd = ExecutorArgs::command();
        let help = cmd.render_long_help().to_string();
        for f in FLAGS {
            let arg = cmd
                .get_arguments()
                .find(|a| {
                    a.get_long() == Some(f.name)
                        || a.get_visible_aliases().is_some_and(|v| v.contains(&f.name))
                })
                .unwrap_or_else(|| panic!("--{} is not a flag of kiln-executor", f.name));
            assert!(
                help.contains(&format!("--{}", f.name)),
                "--{} not in --help",
                f.name
            );
            assert_eq!(arg.get_short(), f.short, "--{}: short form", f.name);
            if let Some(s) = f.short {
                assert!(help.contains(&format!("-{s}, --")), "-{s} not in --help");
            }
            let repeated = matches!(arg.get_action(), clap::ArgAction::Append);
            assert_eq!(
                repeated,
                f.kind == Kind::Repeated,
                "--{}: repeatable",
                f.name
            );
            let takes_optional_value = arg
                .get_num_args()
                .is_some_and(|n| n.min_values() == 0 && n.max_values() == 1);
            assert_eq!(
                takes_optional_value,
                f.kind == Kind::Bool,
                "--{}: a pflag boolean",
                f.name
            );
        }
        use crate::driver::from_cli::{REGISTRY_MAP_ENV, REGISTRY_MIRROR_ENV};
        for e in ENV_VARS {
            assert!(
                cmd.get_arguments()
                    .any(|a| a.get_env().is_some_and(|v| v == e.name))
                    || [REGISTRY_MAP_ENV, REGISTRY_MIRROR_ENV].contains(&e.name),
                "{} is read by no flag",
                e.name
            );
        }
    }

    /// `docs/kaniko-migration.md` carries [`markdown_table`] between its
    /// markers; `KILN_UPDATE_DOCS=1` rewrites it instead of failing.
    #[test]
    fn the_migration_guide_table_matches_the_code() {
        const BEGIN: &str =
            "<!-- kaniko-flags:begin (generated from executor/src/kaniko_flags.rs) -->\n";
        const END: &str = "<!-- kaniko-flags:end -->";
        let path = docs_path();
        let doc = std::fs::read_to_string(&path).expect("docs/kaniko-migration.md");
        let start = doc.find(BEGIN).expect("the begin marker") + BEGIN.len();
        let end = doc.find(END).expect("the end marker");
        let table = markdown_table();
        if doc[start..end] != table {
            if std::env::var_os("KILN_UPDATE_DOCS").is_some() {
                let updated = format!("{}{table}{}", &doc[..start], &doc[end..]);
                std::fs::write(&path, updated).unwrap();
            } else {
                panic!(
                    "docs/kaniko-migration.md's flag table is not the one executor/src/kaniko_flags.rs \
                     renders; run this test with KILN_UPDATE_DOCS=1 to regenerate it"
                );
            }
        }
    }

    fn warnings(args: &[&str]) -> Vec<String> {
        let matches = ExecutorArgs::command()
            .try_get_matches_from(std::iter::once("kiln-executor").chain(args.iter().copied()))
            .unwrap();
        machinery_warnings(&matches)
    }

    #[test]
    fn machinery_flags_warn_once_each_and_only_when_they_ask_for_something_else() {
        assert!(warnings(&[]).is_empty());
        assert!(
            warnings(&[
                "--snapshot-mode=full",
                "--cache-copy-layers",
                "--cache-run-layers=true",
                "--compressed-caching",
                "--skip-unused-stages",
                "--use-new-run=false",
            ])
            .is_empty()
        );
        let w = warnings(&[
            "--snapshotMode",
            "redo",
            "--use-new-run",
            "--cache-copy-layers=false",
            "--cache-run-layers=false",
            "--compressed-caching=false",
            "--skip-unused-stages=false",
        ]);
        assert_eq!(w.len(), 6, "{w:#?}");
        assert!(
            w[0].starts_with("--snapshot-mode=redo has no effect"),
            "{}",
            w[0]
        );
        assert!(w.iter().all(|l| !l.contains('\n')));
    }
}
