//! `kvroute worker-sim`: one simulated worker publishing its KV events to NATS, or on vLLM's
//! own ZeroMQ wire.

use crate::flags::{ModelFlags, NatsFlags};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kvroute_events::{
    EnginePublisher, EnginePublisherConfig, NatsPublishConfig, NatsPublisher, PublisherConfig,
    Registration,
};
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
    /// How it publishes KV events: kvroute's JetStream stream (registering in NATS), or
    /// exactly as a vLLM engine does (ZeroMQ PUB and replay sockets, no NATS: routers list it
    /// with --worker and --worker-events).
    #[arg(long, env = "KVROUTE_EVENT_WIRE", value_enum, default_value_t = SimWire::Kvroute)]
    event_wire: SimWire,
    /// With --event-wire vllm: the PUB endpoint (vLLM's `endpoint`).
    #[arg(long, default_value = "tcp://*:5557")]
    kv_events_endpoint: String,
    /// With --event-wire vllm: the replay ROUTER endpoint (vLLM's `replay_endpoint`).
    #[arg(long, default_value = "tcp://*:5558")]
    kv_events_replay_endpoint: String,
    /// With --event-wire vllm: sequence numbers of KV event batches never sent live (only
    /// through replay), as if the network dropped them; for tests of gap healing.
    #[arg(long, hide = true, value_delimiter = ',')]
    lose_kv_batches: Vec<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SimWire {
    Kvroute,
    Vllm,
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

fn engine(args: &WorkerSimArgs) -> WorkerModel {
    WorkerModel::default()
        .with_capacity_blocks(Some(args.capacity_blocks))
        .with_speeds(
            args.prefill_tokens_per_second,
            args.decode_tokens_per_second,
        )
}

async fn bind(listen: SocketAddr) -> Result<TcpListener> {
    TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen} (use --listen to pick another address)"))
}

pub async fn run(args: WorkerSimArgs) -> Result<()> {
    if args.event_wire == SimWire::Vllm {
        return run_vllm(args).await;
    }
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
    let mut config = SimConfig::new(id, &model.name, model.block_size).with_engine(engine(&args));
    config.default_max_tokens = args.default_max_tokens;
    let worker = SimWorker::new(config, preprocessor, publisher.clone())?;
    let listener = bind(args.listen).await?;
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

/// The worker publishing vLLM's wire: no NATS, no registration.
async fn run_vllm(args: WorkerSimArgs) -> Result<()> {
    let id = WorkerId(args.worker_id);
    let model = args.model.config();
    let preprocessor = Arc::new(model.load_preprocessor()?);
    let events = EnginePublisherConfig::new(&args.kv_events_endpoint)
        .with_replay(&args.kv_events_replay_endpoint)
        .with_lost_batches(args.lose_kv_batches.clone());
    let publisher = EnginePublisher::bind(events).await.with_context(|| {
        format!(
            "binding the KV event sockets {} and {}",
            args.kv_events_endpoint, args.kv_events_replay_endpoint
        )
    })?;
    let endpoints = format!(
        "{} (replay {})",
        publisher.endpoint(),
        publisher.replay_endpoint().unwrap_or_default()
    );
    let mut config = SimConfig::new(id, &model.name, model.block_size).with_engine(engine(&args));
    config.default_max_tokens = args.default_max_tokens;
    let worker = SimWorker::new(config, preprocessor, publisher)?;
    let listener = bind(args.listen).await?;
    println!(
        "simulated worker {id} on http://{}, vLLM KV events on {endpoints}",
        listener.local_addr()?
    );
    worker
        .serve(listener, kvroute_gateway::stop_signal())
        .await?;
    println!("stopped");
    Ok(())
}
