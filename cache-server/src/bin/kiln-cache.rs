//! `kiln-cache`: the admin command line; see [`kiln_cache_server::cli`].

use std::process::ExitCode;

use clap::Parser;
use kiln_cache_server::cli::{self, CliArgs};

fn main() -> ExitCode {
    let args = CliArgs::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kiln-cache: starting the async runtime: {e}");
            return ExitCode::from(cli::EXIT_FAILURE);
        }
    };
    let mut stdout = std::io::stdout().lock();
    ExitCode::from(runtime.block_on(cli::run(args, &mut stdout)))
}
