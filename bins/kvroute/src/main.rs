//! The kvroute command line: flag parsing and wiring only; the work lives in the library crates.

mod config;
mod demo;
mod flags;
mod hash;
mod replay;
mod serve;
mod tokens;
mod worker_sim;

use clap::{Parser, Subcommand};
use std::process::ExitCode;
use std::sync::Arc;

/// mimalloc instead of the system allocator: tokenizing a prompt makes thousands of small
/// allocations, and glibc's malloc/free/realloc took over a third of the gateway's time for
/// a text request (callgrind; figures in docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Multimodal, KV-cache-aware router for LLM inference.
#[derive(Parser)]
#[command(name = "kvroute", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway with simulated workers and an in-process event bus (no NATS needed).
    Demo(demo::DemoArgs),
    /// Run the gateway against a NATS server (KV events) and a list of workers.
    Serve(serve::ServeArgs),
    /// Print an example configuration file, or check one.
    Config(config::ConfigArgs),
    /// Run one simulated worker that publishes its KV events to NATS.
    WorkerSim(worker_sim::WorkerSimArgs),
    /// Print the block and sequence hashes of a token sequence (Dynamo-compatible).
    Hash(hash::HashArgs),
    /// Print the prompt kvroute computes for a chat request: token ids, media spans, visual
    /// tokens per image and video.
    Tokens(tokens::TokensArgs),
    /// Measure routing quality: replay a trace (or the multimodal workload) through the index
    /// and routing policies against simulated workers, in virtual time.
    Replay(replay::ReplayArgs),
}

fn main() -> ExitCode {
    flags::apply_env_aliases();
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    let result = match cli.command {
        Command::Hash(args) => hash::run(args),
        Command::Config(args) => config::run(args),
        Command::Tokens(args) => tokens::run(args),
        Command::Replay(args) => replay::run(args),
        Command::Demo(args) => serve_async(|metrics| demo::run(args, metrics)),
        Command::Serve(args) => serve_async(|metrics| serve::run(args, metrics)),
        Command::WorkerSim(args) => runtime().and_then(|rt| rt.block_on(worker_sim::run(args))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("kvroute: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a server command on a multi-threaded runtime with the Prometheus recorder installed.
fn serve_async<F, Fut>(command: F) -> anyhow::Result<()>
where
    F: FnOnce(kvroute_gateway::MetricsRender) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<()>>,
{
    raise_open_file_limit();
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let upkeep = handle.clone();
    let render: kvroute_gateway::MetricsRender = Arc::new(move || handle.render());
    runtime()?.block_on(async move {
        // Histograms buffer every sample until drained: a scrape drains them, and so must this
        // task, or a gateway nobody scrapes grows by every request's samples.
        tokio::spawn(async move {
            let mut every = tokio::time::interval(METRICS_UPKEEP);
            loop {
                every.tick().await;
                upkeep.run_upkeep();
            }
        });
        command(render).await
    })
}

/// Raises the soft limit on open files to the hard limit: the usual soft default (1024) is
/// a few hundred idle clients away from refusing every new connection.
fn raise_open_file_limit() {
    if let Err(error) = rlimit::increase_nofile_limit(u64::MAX) {
        eprintln!("kvroute: could not raise the open-file limit: {error}");
    }
}

/// How often histogram samples are folded into their summaries (the exporter's own default).
const METRICS_UPKEEP: std::time::Duration = std::time::Duration::from_secs(5);

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        super::Cli::command().debug_assert();
    }
}
