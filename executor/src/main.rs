//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
//! This binary only parses flags and hands them to the library.

use anyhow::Context;
use clap::Parser;
use kiln_executor::cli::{ExecutorArgs, Verbosity};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = ExecutorArgs::parse();
    init_logging(args.verbosity);
    let result = if args.dry_run {
        dry_run(&args)
    } else {
        cache_settings(&mut args).and_then(|()| build(&args))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "kiln-executor: error: {}",
                kiln_executor::cli::error_report(e.as_ref())
            );
            // A failed RUN exits with the command's status (Kaniko's and
            // Buildah's behaviour); anything else is 1.
            let code = e
                .downcast_ref::<kiln_executor::driver::BuildError>()
                .map_or(1, |b| b.exit_code());
            ExitCode::from(code)
        }
    }
}

/// The cache token from its file and the cache client's TLS material, read
/// before anything is built: a bad file is an error, not a cacheless build.
fn cache_settings(args: &mut ExecutorArgs) -> anyhow::Result<()> {
    args.read_cache_token_file()?;
    kiln_executor::cache::http::install_client_tls(args.cache_tls()?);
    Ok(())
}

/// Library warnings (registry retries, skipped device nodes, ...) go to
/// stderr at the level `-v/--verbosity` asks for, coloured only on a
/// terminal and never with `NO_COLOR` set.
fn init_logging(verbosity: Verbosity) {
    let level = match verbosity {
        Verbosity::Panic | Verbosity::Fatal | Verbosity::Error => "error",
        Verbosity::Warn => "warn",
        Verbosity::Info => "info",
        Verbosity::Debug => "debug",
        Verbosity::Trace => "trace",
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(format!(
            "kiln_executor={level},warn"
        )))
        .with_writer(std::io::stderr)
        .with_ansi(use_ansi())
        .with_target(false)
        .try_init();
}

/// Colour only when stderr is a terminal and `NO_COLOR` is unset or empty
/// (<https://no-color.org>); pod logs and files get plain text.
fn use_ansi() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

fn build(args: &ExecutorArgs) -> anyhow::Result<()> {
    let opts = args.build_options()?;
    for (given, flag) in [
        (args.single_snapshot, "--single-snapshot"),
        (args.cleanup, "--cleanup"),
    ] {
        if given {
            eprintln!(
                "kiln-executor: warning: {flag} is accepted for Kaniko compatibility but has no effect"
            );
        }
    }
    let outcome = kiln_executor::driver::build(opts)?;
    eprintln!("kiln-executor: built {}", outcome.manifest_digest);
    Ok(())
}

fn dry_run(args: &ExecutorArgs) -> anyhow::Result<()> {
    let mut opts = args.plan_options()?;
    // A fetched context lives in a private temporary directory until the
    // plan is printed.
    let _context = args.context_spec()?.prepare(
        &mut opts,
        &std::env::temp_dir(),
        kiln_executor::unpack::DEFAULT_MAX_EXPANDED_SIZE,
    )?;
    let plan = kiln_executor::plan::plan(&opts)?;
    for warning in &plan.warnings {
        eprintln!("kiln-executor: warning: {warning}");
    }
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &plan).context("writing the plan")?;
    writeln!(stdout).context("writing the plan")?;
    Ok(())
}
