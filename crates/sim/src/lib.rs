//! Simulated inference engines, for demos, tests and routing-quality replay.
//!
//! It owns everything kvroute simulates about a worker:
//! - [`BlockPool`]: one engine's KV block pool with least-recently-used eviction (a prefix
//!   outlives its continuations, as in vLLM), telling which stored and removed KV events the
//!   engine publishes ([`PoolChanges::into_events`]);
//! - [`WorkerModel`]: how a simulated engine behaves (pool size, prefill and decode speeds,
//!   concurrency), one settings type for the real-time worker below and for `kvroute-replay`'s
//!   virtual-time workers;
//! - [`SimWorker`]: an OpenAI-compatible HTTP worker that preprocesses and hashes requests
//!   exactly as the router does, follows a [`WorkerModel`] in real time, publishes its KV events
//!   through a [`kvroute_events::Publisher`] or on vLLM's own ZeroMQ wire ([`SimEvents`]) and
//!   reports `cached_tokens` from its real pool
//!   (`kvroute demo`, `kvroute worker-sim`, the end-to-end tests).
//!
//! It does not route, index or replay: the router's side lives in `kvroute-gateway`,
//! `kvroute-index` and `kvroute-dispatch`, none of which depends on this crate; trace replay
//! in virtual time lives in `kvroute-replay`.
//!
//! # Example
//!
//! ```no_run
//! use kvroute_events::{in_process_bus, PublisherConfig};
//! use kvroute_preprocess::{ModelFiles, PreprocessConfig, Preprocessor};
//! use kvroute_protocol::WorkerId;
//! use kvroute_sim::{SimConfig, SimWorker, WorkerModel};
//! use std::sync::Arc;
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let preprocessor = Preprocessor::new(&ModelFiles::bundled_qwen2_vl()?, PreprocessConfig::default())?;
//! let (bus, _events) = in_process_bus(1024);
//! let config = SimConfig::new(WorkerId(1), "Qwen/Qwen2-VL-2B-Instruct", 32)
//!     .with_engine(WorkerModel::default().with_capacity_blocks(Some(8192)).with_speeds(10_000.0, 50.0));
//! let worker = SimWorker::new(config, Arc::new(preprocessor), bus.publisher(PublisherConfig::new(WorkerId(1))))?;
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! worker.serve(listener, std::future::pending()).await?;
//! # Ok(())
//! # }
//! ```

mod block_pool;
mod http_worker;
mod model;

pub use block_pool::{BlockPool, PoolChanges, StoredRun};
pub use http_worker::{SimConfig, SimError, SimEvents, SimWorker, MAX_COMPLETION_TOKENS};
pub use model::{InvalidModel, WorkerModel};
