//! `kvroute demo`: the gateway, an in-process event bus and simulated workers in one process.

use crate::wiring::{self, ModelArgs, RoutingArgs};
use anyhow::Result;
use clap::Args;
use kvroute_dispatch::{Registry, Worker};
use kvroute_events::{in_process_bus, IngestConfig, Ingestor, PublisherConfig};
use kvroute_gateway::GatewayConfig;
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::WorkerId;
use kvroute_sim::{SimConfig, SimWorker, WorkerModel};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;

#[derive(Args)]
pub struct DemoArgs {
    /// Where the gateway listens.
    #[arg(long, env = "KVROUTE_LISTEN", default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// Simulated workers.
    #[arg(long, env = "NUM_WORKERS", default_value_t = 2)]
    workers: u64,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Seconds in-flight requests may take to finish after Ctrl-C.
    #[arg(long, default_value_t = 10)]
    drain_timeout_secs: u64,
    /// KV pool of each simulated worker, in blocks.
    #[arg(long, default_value_t = 4096)]
    capacity_blocks: usize,
}

pub async fn run(args: DemoArgs, metrics: kvroute_gateway::MetricsRender) -> Result<()> {
    let preprocessor = args.model.preprocessor()?;
    let (model, block_size) = (&args.model.model, args.model.block_size);
    let index = SharedIndex::new(Index::new(IndexConfig::default()));
    let (bus, source) = in_process_bus(4096);
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());

    let registry = Registry::default();
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    let mut sims = Vec::new();
    for n in 1..=args.workers {
        let id = WorkerId(n);
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let config = SimConfig::new(id, model, block_size)
            .with_engine(WorkerModel::default().with_capacity_blocks(Some(args.capacity_blocks)));
        let worker = SimWorker::new(
            config,
            Arc::clone(&preprocessor),
            bus.publisher(PublisherConfig::new(id)),
        )?;
        sims.push(worker.clone());
        tasks.push(tokio::spawn(worker.serve(listener, wait(stopped.clone()))));
        registry.upsert(Worker::new(id, &url)?);
        println!("simulated worker {id} on {url}");
    }

    let listener = wiring::bind(args.listen).await?;
    let config = GatewayConfig::new(model, block_size)
        .with_metrics(metrics)
        .with_cost(args.routing.cost()?);
    let gateway = wiring::gateway(config, preprocessor, index, registry, Some(&ingestor))?;
    print_usage(listener.local_addr()?, model);
    wiring::serve_until_signal(
        gateway,
        listener,
        Duration::from_secs(args.drain_timeout_secs),
    )
    .await?;

    // The gateway has drained (or given up): whatever the workers still stream has no reader.
    for sim in &sims {
        sim.kill();
    }
    let _ = stop.send(true);
    for task in tasks {
        task.await??;
    }
    drop(bus);
    ingestor.shutdown().await?;
    Ok(())
}

async fn wait(mut stopped: tokio::sync::watch::Receiver<bool>) {
    let _ = stopped.wait_for(|stop| *stop).await;
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
