//! `kvroute config`: print an example configuration file, or check one.

use crate::flags::ConfigSource;
use anyhow::Result;
use clap::{Args, Subcommand};
use kvroute_gateway::ServerConfig;
use std::path::PathBuf;

#[derive(Args)]
pub struct ConfigArgs {
    #[command(subcommand)]
    command: ConfigCommand,
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Print a commented configuration file with every setting at its default.
    Example,
    /// Validate FILE (and any `kvroute serve` flags and environment variables over it) and
    /// print the effective configuration `kvroute serve` would run with.
    Check {
        /// The configuration file.
        file: Option<PathBuf>,
        #[command(flatten)]
        source: Box<ConfigSource>,
    },
}

pub fn run(args: ConfigArgs) -> Result<()> {
    match args.command {
        ConfigCommand::Example => print!("{}", ServerConfig::example_toml()),
        ConfigCommand::Check { file, mut source } => {
            if file.is_some() {
                source.config = file;
            }
            print!("{}", source.load(ServerConfig::default())?.to_toml());
        }
    }
    Ok(())
}
