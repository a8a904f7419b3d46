#![forbid(unsafe_code)]
//! The `medrelay` binary: parses the command line and hands over to the library.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = medrelay::cli::Cli::parse();
    match medrelay::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("medrelay: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
