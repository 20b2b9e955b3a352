//! `kvroute demo`: the gateway, an in-process event bus (or vLLM's ZeroMQ wire on loopback)
//! and simulated workers in one process.

use crate::flags::ConfigSource;
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use kvroute_dispatch::Worker;
use kvroute_events::{EnginePublisher, EnginePublisherConfig, PublisherConfig};
use kvroute_gateway::{EventsSource, MetricsRender, Server, ServerConfig, WorkerConfig};
use kvroute_protocol::WorkerId;
use kvroute_sim::{SimConfig, SimEvents, SimWorker, WorkerModel};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

#[derive(Args)]
pub struct DemoArgs {
    /// Simulated workers.
    #[arg(long = "workers", env = "KVROUTE_NUM_WORKERS", default_value_t = 2)]
    num_workers: u64,
    /// KV pool of each simulated worker, in blocks.
    #[arg(long, default_value_t = 4096)]
    capacity_blocks: usize,
    /// Which engine the simulated workers publish KV events as: kvroute (its own events on an
    /// in-process bus) or vLLM (exactly vLLM's ZeroMQ PUB and replay sockets on loopback, read
    /// by the engine source as `kvroute serve --worker-events` does).
    #[arg(long, value_enum, default_value_t = DemoEngine::Kvroute)]
    engine: DemoEngine,
    #[command(flatten)]
    source: ConfigSource,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum DemoEngine {
    Kvroute,
    Vllm,
}

/// The demo's configuration: the server's, on loopback, with its events on an in-process
/// bus, no NATS and a short drain.
fn demo_defaults() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.listen = SocketAddr::from(([127, 0, 0, 1], 8000));
    config.drain_timeout_secs = 10;
    config.events.source = EventsSource::InProcess;
    config.nats.discovery = false;
    // A loopback demo shows what the cache did; an internet-facing serve does not.
    config.auth.routing_headers = true;
    config
}

pub async fn run(args: DemoArgs, metrics: MetricsRender) -> Result<()> {
    if args.engine == DemoEngine::Vllm {
        return run_vllm(args, metrics).await;
    }
    // Whatever a file says, the demo's workers live in this process.
    let demo = |config: &mut ServerConfig| config.events.source = EventsSource::InProcess;
    let mut config = args.source.load(demo_defaults())?;
    demo(&mut config);
    let (model, block_size) = (config.model.name.clone(), config.model.block_size);
    let server = Server::builder(config).metrics(metrics).start().await?;

    let mut sims = Vec::new();
    if let Some(bus) = server.in_process_bus() {
        for n in 1..=args.num_workers {
            let id = WorkerId(n);
            let listener = TcpListener::bind("127.0.0.1:0").await?;
            let url = format!("http://{}", listener.local_addr()?);
            let engine = WorkerModel::default().with_capacity_blocks(Some(args.capacity_blocks));
            let settings = SimConfig::new(id, &model, block_size).with_engine(engine);
            let worker = SimWorker::new(
                settings,
                Arc::clone(server.preprocessor()),
                bus.publisher(PublisherConfig::new(id)),
            )?;
            sims.push(worker.clone());
            tokio::spawn(worker.serve(listener, std::future::pending()));
            server.registry().upsert(Worker::new(id, &url)?);
            println!("simulated worker {id} on {url}");
        }
    }
    run_until_signal(server, &sims, &args.source, demo).await
}

/// The demo with workers publishing vLLM's wire: their sockets are bound first, so the
/// server starts with every worker's endpoints listed, as `kvroute serve --worker-events`.
async fn run_vllm(args: DemoArgs, metrics: MetricsRender) -> Result<()> {
    let mut config = args.source.load(demo_defaults())?;
    let mut bound = Vec::new();
    for n in 1..=args.num_workers {
        let sockets =
            EnginePublisherConfig::new("tcp://127.0.0.1:0").with_replay("tcp://127.0.0.1:0");
        let publisher = EnginePublisher::bind(sockets)
            .await
            .context("binding a simulated worker's KV event sockets on loopback")?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let mut worker = WorkerConfig::new(n, format!("http://{}", listener.local_addr()?))
            .with_events(publisher.endpoint());
        worker.events_replay = publisher.replay_endpoint().map(str::to_owned);
        println!(
            "simulated worker {n} on {}, vLLM KV events on {} (replay {})",
            worker.url,
            publisher.endpoint(),
            publisher.replay_endpoint().unwrap_or_default()
        );
        bound.push((worker, publisher, listener));
    }
    let workers: Vec<WorkerConfig> = bound.iter().map(|(w, _, _)| w.clone()).collect();
    // Whatever a file says, the demo's workers are these (also after a reload).
    let demo = move |config: &mut ServerConfig| {
        config.events.source = EventsSource::Engines;
        config.workers.clone_from(&workers);
    };
    demo(&mut config);
    let (model, block_size) = (config.model.name.clone(), config.model.block_size);
    let server = Server::builder(config).metrics(metrics).start().await?;
    let mut sims = Vec::new();
    for (worker, publisher, listener) in bound {
        let engine = WorkerModel::default().with_capacity_blocks(Some(args.capacity_blocks));
        let settings = SimConfig::new(WorkerId(worker.id), &model, block_size).with_engine(engine);
        let events = SimEvents::from(publisher);
        let sim = SimWorker::new(settings, Arc::clone(server.preprocessor()), events)?;
        sims.push(sim.clone());
        tokio::spawn(sim.serve(listener, std::future::pending()));
    }
    run_until_signal(server, &sims, &args.source, demo).await
}

/// Prints how to try the demo, serves until a stop signal (reloading the configuration,
/// adjusted by `demo`, on SIGHUP), then stops the simulated workers.
async fn run_until_signal(
    server: Server,
    sims: &[SimWorker],
    source: &ConfigSource,
    demo: impl Fn(&mut ServerConfig),
) -> Result<()> {
    print_usage(server.local_addr(), &server.config().model.name);
    server
        .run_until_signal(|| {
            let mut reloaded = source.load(demo_defaults());
            if let Ok(config) = &mut reloaded {
                demo(config);
            }
            reloaded.map_err(|error| format!("{error:#}"))
        })
        .await?;
    // The gateway has drained (or given up): whatever the workers still stream has no reader.
    for sim in sims {
        sim.kill();
    }
    Ok(())
}

fn print_usage(addr: SocketAddr, model: &str) {
    let base = format!("http://{addr}");
    println!(
        r#"
kvroute demo is up: gateway on {base}. Try (from the repository root):

# a text request, twice: the second goes to the same worker with its prefix cached
curl -s {base}/v1/chat/completions -H 'content-type: application/json' -D - \
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Tell me about KV caches."}}]}}'

# an image request; send it twice and watch x-kvroute-overlap-blocks and
# usage.prompt_tokens_details.cached_tokens (the body goes through a file: images are large)
printf '{{"model": "{model}", "messages": [{{"role": "user", "content": [{{"type": "image_url", "image_url": {{"url": "data:image/png;base64,%s"}}}}, {{"type": "text", "text": "What is in this image?"}}]}}]}}' \
  "$(base64 -w0 tests/fixtures/images/chelsea.png)" > /tmp/kvroute-image.json
curl -s {base}/v1/chat/completions -H 'content-type: application/json' -D - -d @/tmp/kvroute-image.json

# streaming
curl -sN {base}/v1/chat/completions -H 'content-type: application/json' \
  -d '{{"model": "{model}", "stream": true, "messages": [{{"role": "user", "content": "Stream, please."}}]}}'

# why a request would go where it goes, without sending it
curl -s {base}/v1/route -H 'content-type: application/json' \
  -d '{{"model": "{model}", "messages": [{{"role": "user", "content": "Tell me about KV caches."}}]}}'

curl -s {base}/metrics | grep kvroute_
Ctrl-C stops the demo.
"#
    );
}
