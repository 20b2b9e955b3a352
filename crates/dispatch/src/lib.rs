//! Choosing a worker and sending the request there.
//!
//! It owns the worker registry (static or registered at run time) with each worker's load
//! (in-flight requests, blocks still prefilling, KV blocks held; with several router replicas,
//! the others' reported load folded in, expiring with a silent replica) and a circuit breaker
//! ([`Registry`]), the
//! routing cost (docs/architecture.md) with random tie-breaks and an optional temperature ([`decide`]),
//! and forwarding over a pooled HTTP client that streams the worker's response through, retrying
//! on another worker before the first byte ([`Forwarder`]). It does not know about tokens,
//! hashes or the index: the caller passes each worker's overlap in blocks.
//!
//! # Example
//!
//! ```
//! use kvroute_dispatch::{decide, CostConfig, Registry, TieBreaker, Worker};
//! use kvroute_protocol::WorkerId;
//! use std::time::Instant;
//!
//! let registry = Registry::default();
//! registry.upsert(Worker::new(WorkerId(1), "http://127.0.0.1:9001")?);
//! registry.upsert(Worker::new(WorkerId(2), "http://127.0.0.1:9002")?);
//!
//! // Worker 2 holds 6 of the prompt's 8 blocks.
//! let overlap = |id: WorkerId| if id == WorkerId(2) { 6 } else { 0 };
//! let eligible = registry.eligible(Instant::now());
//! let inputs = eligible.iter().map(|w| w.candidate(overlap(w.worker().id)));
//! let decision = decide(8, inputs, &CostConfig::default(), &mut TieBreaker::new()).unwrap();
//! assert_eq!(decision.chosen().unwrap().worker, WorkerId(2));
//! assert_eq!(decision.chosen().unwrap().new_blocks, 2);
//! # Ok::<(), kvroute_dispatch::InvalidWorkerUrl>(())
//! ```

mod cost;
mod forward;
mod policy;
mod pool;
mod registry;

pub use cost::{decide, Candidate, CandidateInput, CostConfig, Decision, TieBreaker};
pub use forward::{ForwardBody, ForwardConfig, ForwardError, Forwarded, Forwarder};
pub use policy::{
    decision_row, KvAware, LeastLoaded, PrefixKeys, Random, RoundRobin, RoutingPolicy, SharedPolicy,
};
pub use pool::WorkerBody;
pub use registry::{
    BreakerConfig, Eligible, InvalidWorkerUrl, LoadGuard, Registry, ReplicaReport, Worker,
    WorkerStatus,
};
