//! `kvroute serve`: the gateway against a NATS server, with workers that register themselves
//! there and a static list.

use crate::flags::ConfigSource;
use anyhow::Result;
use clap::Args;
use kvroute_gateway::{EventsSource, MetricsRender, Server, ServerConfig};

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    source: ConfigSource,
}

pub async fn run(args: ServeArgs, metrics: MetricsRender) -> Result<()> {
    let config = args.source.load(ServerConfig::default())?;
    let server = Server::builder(config.clone())
        .metrics(metrics)
        .start()
        .await?;
    for worker in &config.workers {
        println!("worker {} at {}", worker.id, worker.url);
    }
    let events = match config.events.source {
        EventsSource::None => "no KV events: caches predicted from routing".to_owned(),
        source => format!(
            "KV events ({source:?}) from {} ({}/{})",
            config.nats.url, config.nats.namespace, config.nats.component
        ),
    };
    println!(
        "kvroute serve: gateway on http://{}, {events}",
        server.local_addr()
    );
    server
        .run_until_signal(|| {
            let reloaded = args.source.load(ServerConfig::default());
            reloaded.map_err(|error| format!("{error:#}"))
        })
        .await?;
    println!("stopped");
    Ok(())
}
