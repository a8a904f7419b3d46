#![forbid(unsafe_code)]
//! The `medrelay` binary: parses the command line and hands over to the library.

mod cli;

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = cli::Cli::parse();
    match cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("medrelay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
