//! kiln-executor: turns a Dockerfile and a build context into an OCI image.
//! This binary only parses flags and hands them to the library.

use anyhow::Context;
use kiln_executor::cli::ExecutorArgs;
use kiln_executor::log::{Level, Logger, TracingBridge};
use std::io::Write;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = ExecutorArgs::parse_args();
    let log = init_logging(&args);
    // Flags that tune Kaniko's own machinery: one line each on what kiln
    // does instead (kiln_executor::kaniko_flags).
    for warning in &args.machinery_warnings {
        log.warn(warning);
    }
    let result = if args.dry_run {
        dry_run(&args, &log)
    } else {
        cache_settings(&mut args).and_then(|()| build(&args, &log))
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log.fatal(
                &kiln_executor::cli::error_report(e.as_ref()),
                &[("event", "build_failed".into())],
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

/// One logger for everything the executor prints (`--log-format`,
/// `--log-timestamp`, `-v/--verbosity`); the library's `tracing` events
/// (registry retries, skipped device nodes, ...) go through it too.
fn init_logging(args: &ExecutorArgs) -> Logger {
    use tracing_subscriber::layer::SubscriberExt;
    let log = Logger::stderr(args.log_config());
    let subscriber = tracing_subscriber::registry().with(TracingBridge::new(log.clone()));
    let _ = tracing::subscriber::set_global_default(subscriber);
    log
}

fn build(args: &ExecutorArgs, log: &Logger) -> anyhow::Result<()> {
    let mut opts = args.build_options()?;
    opts.log = log.clone();
    let outcome = kiln_executor::driver::build(opts)?;
    log.log(
        Level::Info,
        &format!("kiln-executor: built {}", outcome.manifest_digest),
        &[
            ("event", "image".into()),
            ("digest", outcome.manifest_digest.to_string().into()),
        ],
    );
    Ok(())
}

fn dry_run(args: &ExecutorArgs, log: &Logger) -> anyhow::Result<()> {
    let mut opts = args.plan_options()?;
    // A fetched context lives in a private temporary directory until the
    // plan is printed.
    let _context = args.context_spec()?.prepare(
        &mut opts,
        &std::env::temp_dir(),
        kiln_executor::build::unpack::DEFAULT_MAX_EXPANDED_SIZE,
    )?;
    let plan = kiln_executor::plan::plan(&opts)?;
    for warning in &plan.warnings {
        log.warn(warning);
    }
    let mut stdout = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut stdout, &plan).context("writing the plan")?;
    writeln!(stdout).context("writing the plan")?;
    Ok(())
}
