//! A simulated inference worker on its own: an OpenAI-compatible server (kvroute-sim's
//! `SimWorker`) that tokenizes and hashes every request as the router does, keeps a KV block
//! pool with LRU eviction, and publishes real stored/removed events to NATS JetStream, where
//! `kvroute serve`, the `embed_router` example or the `standalone_indexer` example read them.
//!
//! ```sh
//! nats-server -js &
//! cargo run -p kvroute-examples --example mock_worker -- --worker-id 1 --listen 127.0.0.1:8001
//! ```

use clap::Parser;
use kvroute_events::{connect, NatsPublishConfig, NatsPublisher, PublisherConfig, StreamSettings};
use kvroute_preprocess::{ModelFiles, PreprocessConfig, Preprocessor};
use kvroute_protocol::WorkerId;
use kvroute_sim::{SimConfig, SimWorker};
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// A simulated worker publishing its KV events to NATS.
#[derive(Parser, Debug)]
pub struct Args {
    /// The id its KV events carry.
    #[arg(long)]
    worker_id: u64,
    /// Where it listens (its OpenAI base URL).
    #[arg(long, default_value = "127.0.0.1:8001")]
    listen: SocketAddr,
    /// The NATS server (JetStream enabled).
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The deployment's namespace and component: events go to
    /// `kvroute.kv_events.{namespace}.{component}.{worker_id}`.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// See --namespace.
    #[arg(long, default_value = "trtllm")]
    component: String,
    /// Tokens per KV block (the router's must be the same).
    #[arg(long, default_value_t = 32)]
    block_size: u32,
}

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    run(args, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Serves on `listener` until `shutdown`, then waits until its last events are acknowledged.
pub async fn run(
    args: Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let id = WorkerId(args.worker_id);
    // The bundled Qwen2-VL tokenizer and chat template (a model directory: ModelFiles::from_dir).
    let model = ModelFiles::bundled_qwen2_vl()?;
    let preprocessor = Arc::new(Preprocessor::new(&model, PreprocessConfig::default())?);

    // Publishing creates the stream if needed, numbers events, and answers full-state
    // requests from consumers that saw a gap.
    let stream = StreamSettings::default().for_component(&args.namespace, &args.component);
    let publisher = NatsPublisher::connect(
        connect(&args.nats_url).await?,
        stream,
        NatsPublishConfig::default(),
        PublisherConfig::new(id),
    )
    .await?;

    let config = SimConfig::new(id, "Qwen/Qwen2-VL-2B-Instruct", args.block_size);
    let worker = SimWorker::new(config, preprocessor, publisher.clone())?;
    println!("mock worker {id} on http://{}", listener.local_addr()?);
    worker.serve(listener, shutdown).await?;
    publisher.flush().await?;
    Ok(())
}
