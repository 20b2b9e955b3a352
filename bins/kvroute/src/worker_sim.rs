//! `kvroute worker-sim`: one simulated worker publishing its KV events to NATS.

use crate::flags::{ModelFlags, NatsFlags};
use anyhow::{Context, Result};
use clap::Args;
use kvroute_events::{NatsPublishConfig, NatsPublisher, PublisherConfig, Registration};
use kvroute_protocol::{WorkerId, WorkerRecord};
use kvroute_sim::{SimConfig, SimWorker, WorkerModel};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Args)]
pub struct WorkerSimArgs {
    /// Where the worker listens.
    #[arg(long, env = "KVROUTE_LISTEN", default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// The id its KV events carry (the ID of `kvroute serve --worker ID=URL`).
    #[arg(long, env = "KVROUTE_WORKER_ID")]
    worker_id: u64,
    #[command(flatten)]
    nats: NatsFlags,
    #[command(flatten)]
    model: ModelFlags,
    /// KV pool capacity in blocks (least recently used blocks are evicted past it).
    #[arg(long, default_value_t = 4096)]
    capacity_blocks: usize,
    /// Prefill speed: uncached prompt tokens per second (`inf`: no prefill time).
    #[arg(long, default_value_t = 20_000.0, value_parser = positive_speed)]
    prefill_tokens_per_second: f64,
    /// Decode speed of one request: generated tokens per second (`inf`: no decode time).
    #[arg(long, default_value_t = 100.0, value_parser = positive_speed)]
    decode_tokens_per_second: f64,
    /// The base URL routers reach it at [default: http://LISTEN address].
    #[arg(long, env = "KVROUTE_ADVERTISE_URL")]
    advertise_url: Option<String>,
    /// Do not register in the NATS worker registry (routers must list it with --worker).
    #[arg(long)]
    no_register: bool,
    /// Tokens generated when a request sets no max_tokens.
    #[arg(long, default_value_t = 16)]
    default_max_tokens: u64,
}

/// A speed in tokens per second, at least 0.001 (`inf` allowed): zero, NaN or a tiny speed
/// would make the simulated durations infinite, NaN or too long to represent.
fn positive_speed(value: &str) -> Result<f64, String> {
    match value.parse::<f64>() {
        Ok(speed) if speed >= 0.001 => Ok(speed),
        _ => Err(format!(
            "{value:?} is not a speed of at least 0.001 tokens per second (or inf)"
        )),
    }
}

/// How long a stopping worker waits for its last events to be acknowledged.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

pub async fn run(args: WorkerSimArgs) -> Result<()> {
    let id = WorkerId(args.worker_id);
    let (model, nats) = (args.model.config(), args.nats.config());
    let preprocessor = Arc::new(model.load_preprocessor()?);
    let client = kvroute_events::connect(&nats.url)
        .await
        .with_context(|| format!("connecting to NATS at {}", nats.url))?;
    let publisher = NatsPublisher::connect(
        client.clone(),
        nats.stream(),
        NatsPublishConfig::default(),
        PublisherConfig::new(id),
    )
    .await
    .with_context(|| format!("setting up KV event publishing on {} (is nats-server running there with JetStream, -js?)", nats.url))?;
    let engine = WorkerModel::default()
        .with_capacity_blocks(Some(args.capacity_blocks))
        .with_speeds(
            args.prefill_tokens_per_second,
            args.decode_tokens_per_second,
        );
    let mut config = SimConfig::new(id, &model.name, model.block_size).with_engine(engine);
    config.default_max_tokens = args.default_max_tokens;
    let worker = SimWorker::new(config, preprocessor, publisher.clone())?;
    let listener = TcpListener::bind(args.listen).await.with_context(|| {
        format!(
            "binding {} (use --listen to pick another address)",
            args.listen
        )
    })?;
    let url = args
        .advertise_url
        .unwrap_or(format!("http://{}", listener.local_addr()?));
    println!(
        "simulated worker {id} on {url}, KV events to {} ({}/{})",
        nats.url, nats.namespace, nats.component
    );
    let registration = if args.no_register {
        None
    } else {
        let js = async_nats::jetstream::new(client.clone());
        let store = kvroute_events::ensure_bucket(&js, &nats.membership())
            .await
            .context("opening the worker registration bucket")?;
        let record = WorkerRecord::new(id, &url)
            .with_model(&model.name)
            .with_block_size(model.block_size);
        let registration = Registration::start(store, &nats.membership(), &record)
            .await
            .context("registering in the worker registry")?;
        println!("registered as worker {id} at {url}");
        Some(registration)
    };
    // Leave the registry first, so routers stop sending while in-flight requests drain.
    let shutdown = async {
        kvroute_gateway::stop_signal().await;
        if let Some(registration) = registration {
            registration.deregister().await;
        }
    };
    worker.serve(listener, shutdown).await?;
    match tokio::time::timeout(FLUSH_TIMEOUT, publisher.flush()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => eprintln!("kvroute: last KV events not flushed: {error}"),
        Err(_) => eprintln!("kvroute: last KV events not acknowledged within {FLUSH_TIMEOUT:?}"),
    }
    println!("stopped");
    Ok(())
}
