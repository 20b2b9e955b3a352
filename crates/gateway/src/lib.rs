//! The kvroute HTTP gateway: OpenAI-compatible endpoints in front of KV-cache-aware routing.
//!
//! It composes the other crates: a request is parsed and turned into the engine's token ids
//! (`kvroute-preprocess`, images through `kvroute-mmhash`), hashed into blocks that carry each
//! image's identity (`kvroute-blockhash`), looked up in the index (`kvroute-index`, kept current
//! by `kvroute-events`), routed by cost and streamed to the chosen worker
//! (`kvroute-dispatch`). Every response says why: `x-kvroute-worker`,
//! `x-kvroute-prompt-tokens`, `x-kvroute-prompt-blocks`, and, when
//! [`AuthConfig::routing_headers`] is on (they tell whether a prefix is cached),
//! `x-kvroute-overlap-blocks` and `x-kvroute-predicted-cached-tokens`; `POST /v1/route`
//! returns the whole decision table without dispatching.
//!
//! It is built to face the internet: parsing, templates, tokenization and image work run on a
//! bounded pool off the async runtime (`/health` answers while it is saturated); connections
//! are limited in number, header and body time, idle time and size ([`ConnectionLimits`]);
//! API keys ([`ApiKeyConfig`]) gate the endpoints, and a key's tenant gets its own cache
//! namespace; upstream timeouts ([`TimeoutsConfig`]) never count against a worker's breaker.
//!
//! Workers that register themselves in NATS ([`kvroute_events::Registration`]) join and leave
//! the registry through [`follow_membership`]; router replicas share the load they put on
//! workers through [`sync_replicas`].
//!
//! It is also the composition root: [`ServerConfig`] is the one typed configuration (TOML file,
//! defaults in one place) and [`Server::builder`] turns it into a running server (index, event
//! source and ingestion, registry, discovery, routing policy, middleware, graceful drain,
//! reload). `kvroute serve` and `kvroute demo` are thin calls of it. Its accept loop
//! ([`serve_http`]) and response helpers are public so that other HTTP servers of the project
//! (the simulated worker of `kvroute-sim`) serve the same way; the gateway itself contains no
//! simulator, reads no environment variable and installs no global state.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/route`,
//! `GET /v1/models`, `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! # Example
//!
//! A server routing to two workers that publish no KV events, on a free port:
//!
//! ```
//! use kvroute_gateway::{EventsSource, Server, ServerConfig, WorkerConfig};
//!
//! # tokio::runtime::Runtime::new()?.block_on(async {
//! let mut config = ServerConfig::default();
//! config.listen = "127.0.0.1:0".parse()?;
//! config.events.source = EventsSource::None;
//! config.nats.discovery = false;
//! config.workers = vec![
//!     WorkerConfig::new(1, "http://10.0.0.5:8000"),
//!     WorkerConfig::new(2, "http://10.0.0.6:8000"),
//! ];
//! let server = Server::builder(config).start().await?;
//! assert_eq!(server.stats().workers, 2);
//! assert!(server.local_addr().port() != 0);
//! server.shutdown().await?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! # })?;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod accept;
mod auth;
mod body;
mod config;
mod cpu;
mod discovery;
mod forward_body;
mod handler;
mod replicas;
mod server;
mod usage;

pub use accept::{serve_http, serve_http_with, ConnectionLimits};
pub use body::{error_response, json_response, BoxError, GatewayBody};
pub use config::{
    ApiKeyConfig, AuthConfig, BreakerSettings, ConfigError, EventsConfig, EventsSource,
    LimitsConfig, ModelConfig, NatsConfig, PolicyName, ReplicaSyncConfig, RoutingConfig,
    ServerConfig, TimeoutsConfig, WorkerConfig,
};
pub use discovery::follow_membership;
pub use handler::{bind, Gateway, GatewayConfig, GatewayError, MetricsRender};
pub use replicas::sync_replicas;
pub use server::{
    stop_signal, Next, ReloadReport, ResponseFuture, Server, ServerBuilder, ServerError,
    ServerStats,
};
