#![forbid(unsafe_code)]
//! The `medrelay` binary: parses the command line and hands over to the library.

mod cli;

use std::process::ExitCode;

use clap::Parser;
use medrelay::processor::sandbox;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    // The parser sandbox's child: no runtime, no threads, nothing parsed yet.
    if args.get(1).map(String::as_str) == Some(sandbox::SUBCOMMAND) {
        return sandbox::child::main(&args[2..]);
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("medrelay: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cli = cli::Cli::parse_from(args);
    match runtime.block_on(cli::run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("medrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}
