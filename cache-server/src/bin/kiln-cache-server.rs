//! `kiln-cache-server`: parses flags and runs [`kiln_cache_server::server::serve`].

use anyhow::Context;
use clap::Parser;
use kiln_cache_server::config::ServerArgs;
use kiln_cache_server::{server, telemetry};

fn main() -> anyhow::Result<()> {
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
