//! `kiln-cache-server`: parses flags and runs [`kiln_cache_server::server::serve`].

use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use kiln_cache_server::config::ServerArgs;
use kiln_cache_server::{server, telemetry};

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, each cause once (not anyhow's "Caused by" list,
            // which repeats causes our messages already include).
            eprintln!(
                "kiln-cache-server: error: {}",
                kiln_common::error_report(e.as_ref())
            );
            ExitCode::from(1)
        }
    }
}

fn run() -> anyhow::Result<()> {
    let config = ServerArgs::parse()
        .resolve()
        .context("invalid configuration")?;
    telemetry::init_logging(config.log_format);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("kiln-cache")
        .build()
        .context("starting the async runtime")?;
    runtime
        .block_on(server::serve(config, server::shutdown_signal()))
        .context("kiln-cache-server failed")?;
    Ok(())
}
