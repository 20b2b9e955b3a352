//! The router's map from cached KV blocks to the workers that hold them.
//!
//! It owns the index: applying workers' KV events (stored, removed, cleared) per
//! (worker, dp rank), answering "how many leading blocks of this request does each worker
//! already hold" ([`Index::find_matches`]), removing workers, snapshots for cold starts, a
//! memory bound, and an approximate mode for workers that publish no events. It does no I/O:
//! transport, event-id gap detection and the routing cost live in `kvroute-events` and
//! `kvroute-dispatch`; hashing tokens into [`SequenceHash`]es lives in `kvroute-blockhash`.
//!
//! # Example
//!
//! ```
//! // The protocol types the API takes are re-exported: no second dependency needed.
//! use kvroute_index::{
//!     BlockHash, DpRank, Index, IndexConfig, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
//!     KvCacheStoredBlockData, RouterEvent, SequenceHash, WorkerId, WorkerKey,
//! };
//!
//! let blocks = |hashes: &[u64]| {
//!     hashes
//!         .iter()
//!         .map(|&h| KvCacheStoredBlockData {
//!             block_hash: SequenceHash(h),
//!             tokens_hash: BlockHash(h),
//!             mm_extra_info: None,
//!         })
//!         .collect()
//! };
//! let stored = RouterEvent::new(
//!     WorkerId(7),
//!     KvCacheEvent {
//!         event_id: 0,
//!         dp_rank: DpRank(0),
//!         data: KvCacheEventData::Stored(KvCacheStoreData {
//!             parent_hash: None,
//!             start_position: None,
//!             blocks: blocks(&[11, 12, 13]),
//!         }),
//!     },
//! );
//!
//! let mut index = Index::new(IndexConfig::default());
//! index.apply_event(&stored)?;
//! let overlap = index.find_matches(&[SequenceHash(11), SequenceHash(12), SequenceHash(99)]);
//! assert_eq!(overlap.workers.len(), 1);
//! assert_eq!(overlap.workers[0].worker, WorkerKey::new(WorkerId(7), DpRank(0)));
//! assert_eq!(overlap.workers[0].matched_blocks, 2);
//! assert_eq!(index.stats().blocks, 3);
//! # Ok::<(), kvroute_index::ApplyError>(())
//! ```
//!
//! # Structure
//!
//! A sequence hash already commits to every block before it, so it *is* a radix-tree node
//! identity: the tree's edges are implied by the hashes and need not be stored. The index keeps
//! one hash map from sequence hash to a position in a *run*: a maximal stretch of consecutive
//! blocks held by exactly the same set of workers, stored as a contiguous array of hashes (the
//! compressed edge of a radix tree). A lookup hashes the first query block, then compares the
//! query against the run's array sequentially, and only goes back to the map where the run
//! ends, so a 4096-block prompt costs a few map probes plus a linear scan. Worker membership is
//! kept per run, not per block, which is why a (worker, block) entry costs a fraction of a
//! per-worker hash map entry, and why removing a worker touches runs, not blocks.
//!
//! Each cache keeps the list of runs it holds, and runs whose last worker left are reclaimed
//! incrementally by later writes (bounded work per event), so [`Index::remove_worker`] takes
//! time in proportion to the worker's own runs, whatever the size of the index.
//!
//! Lookups trust the hash chain: when a query block and a run block at the same distance
//! agree, everything between them agrees too, so a lookup checks the far end of each run and
//! bisects only where they differ (a 4096-block prompt reads a few dozen hashes). Writes
//! compare block by block. A worker publishing hashes that do not chain can only get wrong
//! overlaps for itself; the index stays consistent.
//!
//! # Semantics (and where they differ from Dynamo's `RadixTree`)
//!
//! * A store continuing a parent the cache does not hold is skipped whole and counted, as in
//!   Dynamo ([`ApplyError::UnknownParent`]); so is a store naming its parent among its blocks.
//! * A removal removes exactly the named blocks. Dynamo also drops, for that worker, the
//!   blocks after a removed one on the same compressed edge; for lookups this makes no
//!   difference (a match stops at the first missing block), for [`IndexStats::blocks`] it
//!   does.
//! * `cleared` drops a cache's blocks and keeps it registered; removing a worker forgets it.
//!
//! # Embedding
//!
//! Besides [`Index::apply_event`], stores and removals can be applied from borrowed slices
//! ([`Index::apply_stored`], [`Index::apply_removed`]), lookups can fill a caller-owned buffer
//! ([`Index::find_matches_into`]), and [`SequenceHash::from_raw_slice`] views a `&[u64]` as
//! sequence hashes without a copy. [`Index::entries`] is the O(1) entry count.
//!
//! # Concurrency
//!
//! [`Index`] is a plain single-writer structure: writes take `&mut self`, lookups `&self`.
//! [`SharedIndex`] shares one between many lookup tasks and one writer. See its documentation
//! for the measured choice.

mod index;
mod map;
mod shared;
mod snapshot;

pub use index::Index;
pub use shared::SharedIndex;
pub use snapshot::{SnapshotError, SNAPSHOT_VERSION};

/// The protocol types this crate's API takes, so an embedder needs no second dependency.
pub use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, RouterEvent, SequenceHash, WorkerId,
};
use std::fmt;
use std::time::Duration;

/// One KV cache: a worker and one of its data-parallel ranks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WorkerKey {
    /// The worker.
    pub worker_id: WorkerId,
    /// The data-parallel rank inside the worker (0 without data parallelism).
    pub dp_rank: DpRank,
}

impl WorkerKey {
    /// The cache of `dp_rank` inside `worker_id`.
    pub const fn new(worker_id: WorkerId, dp_rank: DpRank) -> Self {
        Self { worker_id, dp_rank }
    }
}

impl fmt::Display for WorkerKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/dp{}", self.worker_id, self.dp_rank)
    }
}

/// How an [`Index`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexConfig {
    /// The most (worker, block) entries the index keeps. Past it, the least recently matched
    /// runs are dropped (and counted in [`IndexStats::evicted_entries`]) until the index is
    /// back under 15/16 of the bound. `None`: unbounded.
    pub max_entries: Option<u64>,
    /// How long a block recorded with [`Index::record_routed`] (approximate mode) is assumed
    /// to stay in a worker's cache.
    pub routed_ttl: Duration,
}

impl Default for IndexConfig {
    fn default() -> Self {
        Self {
            max_entries: None,
            routed_ttl: Duration::from_secs(120),
        }
    }
}

impl IndexConfig {
    /// This configuration with a bound of `max_entries` (worker, block) entries.
    pub fn with_max_entries(mut self, max_entries: u64) -> Self {
        self.max_entries = Some(max_entries);
        self
    }

    /// This configuration with approximate-mode entries expiring after `ttl`.
    pub fn with_routed_ttl(mut self, ttl: Duration) -> Self {
        self.routed_ttl = ttl;
        self
    }
}

/// What [`Index::find_matches`] found for one request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Overlap {
    /// Number of blocks in the query (the request's full blocks).
    pub query_blocks: usize,
    /// Every cache holding at least the query's first block, in no particular order.
    pub workers: Vec<WorkerOverlap>,
}

/// One cache's overlap with a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerOverlap {
    /// The cache.
    pub worker: WorkerKey,
    /// How many leading blocks of the query the cache holds (at least 1).
    pub matched_blocks: usize,
    /// How many blocks the cache holds in total (a proxy for its memory pressure).
    pub cached_blocks: u64,
}

/// Sizes and counters of an [`Index`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct IndexStats {
    /// Registered caches (a cache registers with its first event and leaves with
    /// [`Index::remove_worker`] / [`Index::remove_worker_dp_rank`]).
    pub workers: usize,
    /// (worker, block) entries: the sum over caches of the blocks each holds.
    pub blocks: u64,
    /// Distinct sequence hashes held by at least one cache.
    pub unique_blocks: u64,
    /// Runs (compressed nodes) holding at least one cache.
    pub nodes: usize,
    /// Heap bytes the index uses, including capacity slack and not yet reclaimed runs.
    pub bytes: usize,
    /// Events applied (including the ones that were partly or wholly skipped).
    pub events: u64,
    /// Stored events skipped because the cache did not hold their parent block.
    pub unknown_parent: u64,
    /// Stored events skipped because a block named its own parent.
    pub invalid_stores: u64,
    /// Stored blocks the cache already held.
    pub duplicate_blocks: u64,
    /// Removed blocks the cache did not hold.
    pub unknown_removals: u64,
    /// Entries dropped by the memory bound.
    pub evicted_entries: u64,
    /// Approximate-mode entries that expired.
    pub expired_entries: u64,
}

/// Why an event was wholly or partly skipped. The index is consistent either way, and the
/// skip is counted in [`IndexStats`]; the caller decides whether to resynchronise the worker.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// A store continued a parent block the cache does not hold (it was never stored, or was
    /// removed since). As Dynamo does, the whole store is skipped.
    #[error("{worker} stored blocks under parent {parent} it does not hold; store skipped")]
    UnknownParent {
        /// The cache that sent the event.
        worker: WorkerKey,
        /// The parent it named.
        parent: SequenceHash,
    },
    /// A store listed its own parent among its blocks. As Dynamo does, it is skipped.
    #[error("{worker} stored block {parent} as its own descendant; store skipped")]
    SelfReferencingStore {
        /// The cache that sent the event.
        worker: WorkerKey,
        /// The parent that also appears among the blocks.
        parent: SequenceHash,
    },
    /// A removal named blocks the cache does not hold; the others were removed.
    #[error("{worker} removed {count} block(s) it does not hold")]
    UnknownBlocks {
        /// The cache that sent the event.
        worker: WorkerKey,
        /// How many of the named blocks were not held.
        count: u64,
    },
}
