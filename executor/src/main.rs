//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
//! This binary only parses flags and hands them to the library.

use anyhow::Context;
use clap::Parser;
use kiln_executor::cli::{ExecutorArgs, Verbosity};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args = ExecutorArgs::parse();
    init_logging(args.verbosity);
    let result = if args.dry_run {
        dry_run(&args)
    } else {
        build(&args)
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!(
                "kiln-executor: error: {}",
                kiln_executor::cli::error_report(e.as_ref())
            );
            ExitCode::from(1)
        }
    }
}

/// Library warnings (registry retries, skipped device nodes, ...) go to
/// stderr at the level `-v/--verbosity` asks for.
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
        .with_target(false)
        .try_init();
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
    let opts = args.plan_options()?;
    let plan = kiln_executor::plan::plan(&opts)?;
    for warning in &plan.warnings {
        eprintln!("kiln-executor: warning: {warning}");
    }
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &plan).context("writing the plan")?;
    writeln!(stdout).context("writing the plan")?;
    Ok(())
}
