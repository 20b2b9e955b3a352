//! `kvroute serve`: the gateway against a NATS server, with workers that register themselves
//! there and a static list.

use crate::wiring::{self, ModelArgs, NatsArgs, RoutingArgs};
use anyhow::{bail, Context, Result};
use clap::{Args, ValueEnum};
use kvroute_dispatch::{BreakerConfig, Registry, Worker};
use kvroute_events::{
    DynamoSource, IngestConfig, Ingestor, NatsSource, NatsSourceConfig, SnapshotSettings,
};
use kvroute_gateway::GatewayConfig;
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::WorkerId;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    nats: NatsArgs,
    /// The workers' endpoint name (used by `--event-wire dynamo`).
    #[arg(long, env = "ENDPOINT", default_value = "generate")]
    endpoint: String,
    #[command(flatten)]
    model: ModelArgs,
    #[command(flatten)]
    routing: RoutingArgs,
    /// Where the gateway listens [default: 0.0.0.0:$API_PORT].
    #[arg(long, env = "KVROUTE_LISTEN")]
    listen: Option<SocketAddr>,
    /// The port listened on when --listen is not given.
    #[arg(long, env = "API_PORT", default_value_t = 8000)]
    api_port: u16,
    /// A static worker as ID=URL (the id its KV events carry, its OpenAI base URL);
    /// repeatable, or comma-separated in WORKERS. Workers that register themselves in NATS
    /// (`kvroute worker-sim` does) need not be listed.
    #[arg(long = "worker", env = "WORKERS", value_name = "ID=URL", value_delimiter = ',',
          value_parser = parse_worker)]
    workers: Vec<Worker>,
    /// How workers publish KV events: kvroute's JetStream stream (`kvroute worker-sim`), or
    /// Dynamo 1.6 workers' NATS core subjects
    /// (`namespace.{NAMESPACE}.component.{COMPONENT}.endpoint.{ENDPOINT}.kv-events`).
    #[arg(long, env = "EVENT_WIRE", value_enum, default_value_t = EventWire::Kvroute)]
    event_wire: EventWire,
    /// Use only the --worker list: do not follow the workers registered in NATS.
    #[arg(long, env = "NO_DISCOVERY")]
    no_discovery: bool,
    /// The workers publish no KV events: predict their caches from the requests routed to
    /// them (each request's blocks count as cached there for --approximate-ttl-secs).
    #[arg(long, env = "NO_KV_EVENTS")]
    no_kv_events: bool,
    /// How long a routed request's blocks count as cached with --no-kv-events.
    #[arg(long, env = "APPROXIMATE_TTL_SECS", default_value_t = 120)]
    approximate_ttl_secs: u64,
    /// Do not keep index snapshots in the JetStream object store (every start replays the
    /// whole stream).
    #[arg(long)]
    no_snapshots: bool,
    /// Seconds between index snapshots while events arrive (one is also written on shutdown).
    #[arg(long, default_value_t = 60)]
    snapshot_interval_secs: u64,
    /// Seconds in-flight requests may take to finish after SIGTERM or Ctrl-C.
    #[arg(long, env = "DRAIN_TIMEOUT_SECS", default_value_t = 30)]
    drain_timeout_secs: u64,
    /// Consecutive failures that take a worker out of rotation.
    #[arg(long, default_value_t = 3)]
    breaker_failures: u32,
    /// Seconds a failed worker stays out of rotation before a trial request.
    #[arg(long, default_value_t = 5)]
    breaker_cooldown_secs: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum EventWire {
    Kvroute,
    Dynamo,
}

fn parse_worker(spec: &str) -> Result<Worker, String> {
    let (id, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not ID=URL (e.g. 1=http://10.0.0.5:8000)"))?;
    let id: u64 = id
        .trim()
        .parse()
        .map_err(|_| format!("worker id {id:?} is not an unsigned integer"))?;
    Worker::new(WorkerId(id), url.trim()).map_err(|e| e.to_string())
}

pub async fn run(args: ServeArgs, metrics: kvroute_gateway::MetricsRender) -> Result<()> {
    if args.workers.is_empty() && args.no_discovery {
        bail!("no workers: pass --worker ID=URL (repeatable), set WORKERS=ID=URL,ID=URL, or drop --no-discovery");
    }
    let mut seen = HashSet::new();
    for worker in &args.workers {
        if !seen.insert(worker.id) {
            bail!("worker id {} is given twice", worker.id);
        }
    }
    let preprocessor = args.model.preprocessor()?;
    let client = args.nats.connect().await?;
    let index = SharedIndex::new(Index::new(
        IndexConfig::default().with_routed_ttl(Duration::from_secs(args.approximate_ttl_secs)),
    ));
    let ingestor = if args.no_kv_events {
        None
    } else {
        Some(spawn_ingestor(&args, client.clone(), index.clone()).await?)
    };

    let registry = Registry::new(
        BreakerConfig::default()
            .with_failure_threshold(args.breaker_failures)
            .with_cooldown(Duration::from_secs(args.breaker_cooldown_secs)),
    );
    for worker in args.workers {
        println!("worker {} at {}", worker.id, worker.url);
        registry.upsert(worker);
    }
    if !args.no_discovery {
        let store = args.nats.registration_bucket(&client).await?;
        let changes = kvroute_events::watch_members(client.clone(), store, &args.nats.membership());
        tokio::spawn(kvroute_gateway::follow_membership(
            changes,
            registry.clone(),
            index.clone(),
            ingestor.as_ref().map(|ingestor| ingestor.control()),
            args.model.block_size,
        ));
        println!(
            "following worker registrations ({}/{})",
            args.nats.namespace, args.nats.component
        );
    }
    let listen = args
        .listen
        .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], args.api_port)));
    let listener = wiring::bind(listen).await?;
    let config = GatewayConfig::new(&args.model.model, args.model.block_size)
        .with_metrics(metrics)
        .with_cost(args.routing.cost()?)
        .with_approximate(args.no_kv_events);
    let gateway = wiring::gateway(config, preprocessor, index, registry, ingestor.as_ref())?;
    let events = if args.no_kv_events {
        "no KV events: caches predicted from routing".to_owned()
    } else {
        format!(
            "KV events from {} ({}/{})",
            args.nats.nats_url, args.nats.namespace, args.nats.component
        )
    };
    println!(
        "kvroute serve: gateway on http://{}, {events}",
        listener.local_addr()?
    );
    wiring::serve_until_signal(
        gateway,
        listener,
        Duration::from_secs(args.drain_timeout_secs),
    )
    .await?;
    if let Some(ingestor) = ingestor {
        // Writes the final snapshot.
        ingestor.shutdown().await?;
    }
    println!("stopped");
    Ok(())
}

/// Ingests KV events from kvroute's JetStream stream (with snapshots) or Dynamo's wire.
async fn spawn_ingestor(
    args: &ServeArgs,
    client: async_nats::Client,
    index: SharedIndex,
) -> Result<Ingestor> {
    let config = IngestConfig::default();
    Ok(match args.event_wire {
        EventWire::Kvroute => {
            let stream = args.nats.stream();
            let js = async_nats::jetstream::new(client.clone());
            kvroute_events::ensure_stream(&js, &stream)
                .await
                .with_context(|| {
                    format!("provisioning the event stream on {} (is nats-server running there with JetStream, -js?)", args.nats.nats_url)
                })?;
            let snapshots = (!args.no_snapshots).then(|| {
                let mut settings = SnapshotSettings::default();
                // One object per (namespace, component): their indexes differ.
                settings.object = format!(
                    "index-{}-{}",
                    kvroute_events::subject_token(&args.nats.namespace),
                    kvroute_events::subject_token(&args.nats.component)
                );
                settings.interval = Duration::from_secs(args.snapshot_interval_secs.max(1));
                settings
            });
            let source_config = NatsSourceConfig::new(stream).with_snapshots(snapshots);
            Ingestor::spawn(NatsSource::new(client, source_config), index, config)
        }
        EventWire::Dynamo => {
            let source = DynamoSource::new(
                client,
                &args.nats.namespace,
                &args.nats.component,
                Some(&args.endpoint),
            );
            Ingestor::spawn(source, index, config)
        }
    })
}
