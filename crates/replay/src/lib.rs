//! Routing quality, measured: replaying request traces through kvroute's index and routing
//! code against simulated workers.
//!
//! It owns the replay engine ([`replay`]: virtual time, workers following a
//! [`kvroute_sim::WorkerModel`] with a [`kvroute_sim::BlockPool`] each, and KV events feeding
//! the real [`kvroute_index::Index`]), Mooncake-format traces ([`read_jsonl`], extended with
//! media ids per block), the seeded multimodal workload generator ([`multimodal`]), the JSON
//! summary ([`ReplaySummary`]: hit rate against the ideal of one infinite cache, time to first
//! token, load imbalance, phantom hits) and SVG plots ([`plot`]). The routing policies
//! themselves live in `kvroute-dispatch` ([`kvroute_dispatch::RoutingPolicy`]); this crate
//! does no I/O beyond the readers and writers it is given, and prints nothing.
//!
//! # Example
//!
//! ```
//! use kvroute_replay::{replay, PolicyName, ReplayConfig, TraceRequest, Workload};
//!
//! // Three requests sharing a two-block prefix (blocks of 512 tokens).
//! let request = |t, ids: &[u64]| TraceRequest {
//!     timestamp: t, input_length: 512 * ids.len() as u64, output_length: 20,
//!     hash_ids: ids.to_vec(), media_ids: vec![],
//! };
//! let trace = [request(0, &[0, 1, 2]), request(100, &[0, 1, 3]), request(200, &[0, 1, 4])];
//! let workload = Workload::from_trace(&trace, 512, 512)?;
//! assert_eq!(workload.ideal().hit_rate(), 4.0 / 9.0);
//!
//! let config = ReplayConfig::default().with_workers(4);
//! let mut policy = PolicyName::KvAware.build(Default::default(), 42);
//! let report = replay(&workload, &config, policy.as_mut(), &mut |_, _| {})?;
//! assert_eq!(report.summary.hit_rate, 4.0 / 9.0);
//! assert_eq!(report.summary.phantom_blocks, 0);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

pub mod multimodal;
pub mod plot;
mod report;
mod sim;
mod trace;
mod workload;

pub use report::{Latency, ReplayReport, ReplaySummary, RequestRecord};
pub use sim::{replay, replay_replicas, ReplayConfig, ReplayError};
pub use trace::{read_jsonl, spread_simultaneous, write_jsonl, TraceError, TraceRequest};
pub use workload::{IdealReuse, Workload};

use kvroute_dispatch::{CostConfig, KvAware, LeastLoaded, Random, RoundRobin, RoutingPolicy};
use std::fmt;
use std::str::FromStr;

/// The standard policies, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PolicyName {
    /// kvroute's cost over media-aware prefixes ([`KvAware`]).
    KvAware,
    /// [`RoundRobin`].
    RoundRobin,
    /// [`Random`].
    Random,
    /// [`LeastLoaded`].
    LeastLoaded,
    /// kvroute's cost over text-only prefixes ([`KvAware::text_only`]).
    TextOnly,
}

impl PolicyName {
    /// Every standard policy.
    pub const ALL: [PolicyName; 5] = [
        PolicyName::KvAware,
        PolicyName::RoundRobin,
        PolicyName::Random,
        PolicyName::LeastLoaded,
        PolicyName::TextOnly,
    ];

    /// The name used on the command line and in reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PolicyName::KvAware => "kv-aware",
            PolicyName::RoundRobin => "round-robin",
            PolicyName::Random => "random",
            PolicyName::LeastLoaded => "least-loaded",
            PolicyName::TextOnly => "text-only",
        }
    }

    /// The policy, its random choices seeded with `seed`; `cost` weighs the kv-aware,
    /// text-only and least-loaded policies.
    pub fn build(self, cost: CostConfig, seed: u64) -> Box<dyn RoutingPolicy> {
        match self {
            PolicyName::KvAware => Box::new(KvAware::new(cost, seed)),
            PolicyName::RoundRobin => Box::new(RoundRobin::new()),
            PolicyName::Random => Box::new(Random::new(seed)),
            PolicyName::LeastLoaded => Box::new(LeastLoaded::new(cost, seed)),
            PolicyName::TextOnly => Box::new(KvAware::text_only(cost, seed)),
        }
    }
}

impl fmt::Display for PolicyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A policy name that is not one of [`PolicyName::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown policy {0:?} (expected kv-aware, round-robin, random, least-loaded or text-only)")]
pub struct UnknownPolicy(pub String);

impl FromStr for PolicyName {
    type Err = UnknownPolicy;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        PolicyName::ALL
            .into_iter()
            .find(|p| p.as_str() == name)
            .ok_or_else(|| UnknownPolicy(name.to_owned()))
    }
}
