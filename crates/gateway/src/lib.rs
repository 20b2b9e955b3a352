//! The kvroute HTTP gateway: OpenAI-compatible endpoints in front of KV-cache-aware routing.
//!
//! It composes the other crates: a request is parsed and turned into the engine's token ids
//! (`kvroute-preprocess`, images through `kvroute-mmhash`), hashed into blocks that carry each
//! image's identity (`kvroute-blockhash`), looked up in the index (`kvroute-index`, kept current
//! by `kvroute-events`), routed by cost and streamed to the chosen worker
//! (`kvroute-dispatch`). Every response says why: `x-kvroute-worker`,
//! `x-kvroute-overlap-blocks`, `x-kvroute-prompt-blocks`, `x-kvroute-predicted-cached-tokens`;
//! `POST /v1/route` returns the whole decision table without dispatching.
//!
//! Workers that register themselves in NATS ([`kvroute_events::Registration`]) join and leave
//! the registry through [`follow_membership`].
//!
//! It is a library so other servers can embed it ([`Gateway::handle`]); the `kvroute` binary
//! only wires it. Its accept loop ([`serve_http`]) and response helpers are public so that
//! other HTTP servers of the project (the simulated worker of `kvroute-sim`) serve the same way;
//! the gateway itself contains no simulator.
//!
//! Endpoints: `POST /v1/chat/completions`, `POST /v1/completions`, `POST /v1/route`,
//! `GET /v1/models`, `GET /health`, `GET /ready`, `GET /metrics`.
//!
//! # Example
//!
//! ```
//! use kvroute_dispatch::Registry;
//! use kvroute_gateway::{Gateway, GatewayConfig};
//! use kvroute_index::{Index, IndexConfig, SharedIndex};
//! use kvroute_preprocess::{ModelFiles, PreprocessConfig, Preprocessor};
//! use std::sync::Arc;
//!
//! let preprocessor = Preprocessor::new(&ModelFiles::bundled_qwen2_vl()?, PreprocessConfig::default())?;
//! let index = SharedIndex::new(Index::new(IndexConfig::default()));
//! let gateway = Gateway::new(
//!     GatewayConfig::new("Qwen/Qwen2-VL-2B-Instruct", 32),
//!     Arc::new(preprocessor),
//!     index,
//!     Registry::default(),
//!     || true,
//! )?;
//! assert_eq!(gateway.config().block_size, 32);
//! // gateway.serve(listener, shutdown).await serves it.
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod accept;
mod body;
mod config;
mod discovery;
mod forward_body;
mod handler;
mod server;
mod usage;

pub use accept::serve_http;
pub use body::{error_response, json_response, BoxError, GatewayBody};
pub use config::{
    BreakerSettings, ConfigError, EventsConfig, EventsSource, ModelConfig, NatsConfig, PolicyName,
    RoutingConfig, ServerConfig, WorkerConfig,
};
pub use discovery::follow_membership;
pub use handler::{bind, Gateway, GatewayConfig, GatewayError, MetricsRender};
pub use server::{
    stop_signal, Next, ReloadReport, ResponseFuture, Server, ServerBuilder, ServerError,
    ServerStats,
};
