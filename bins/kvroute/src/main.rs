//! The kvroute command line: flag parsing and wiring only; the work lives in the library crates.

mod hash;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// Multimodal, KV-cache-aware router for LLM inference.
#[derive(Parser)]
#[command(name = "kvroute", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Print the block and sequence hashes of a token sequence (Dynamo-compatible).
    Hash(hash::HashArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Hash(args) => hash::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvroute: {error:#}");
            ExitCode::FAILURE
        }
    }
}
