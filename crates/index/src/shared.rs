//! One index shared by many lookup tasks and one writer.

use crate::index::Part;
use crate::{ApplyError, Index, IndexStats, Overlap, SnapshotError, WorkerKey};
use kvroute_protocol::{RouterEvent, SequenceHash, WorkerId};
use parking_lot::{RwLock, RwLockWriteGuard};
use std::sync::Arc;
use std::time::Instant;

/// Blocks a writer applies before it hands the lock to waiting lookups: a few microseconds of
/// work, short enough that a waiting lookup usually spins rather than sleeps.
const WRITE_SLICE_BLOCKS: usize = 256;

/// An [`Index`] behind a reader-writer lock whose writer yields between small slices of work.
///
/// Lookups take the lock shared, so any number run at once. A batch of events is applied in
/// slices of 256 blocks (a long event is cut into parts, which stores exactly what the whole
/// event would); after each slice the writer hands the lock fairly to every waiting lookup
/// (parking_lot's `bump`) before it goes on. A lookup therefore waits for at most one slice
/// (tens of microseconds) plus its wake-up, never for a whole batch. Recency stamps for the
/// memory bound are relaxed atomics, so lookups never need the lock exclusively.
///
/// Chosen from measurements (docs/benchmarks.md, "Concurrency (SharedIndex)"): holding the
/// lock for a whole batch makes one lookup wait the whole batch; handing it over every slice
/// bounds the wait to a slice plus a wake-up, at the price of writer throughput while lookups
/// run. A left-right pair of copies would make lookups wait-free but doubles memory and every
/// write; sharding by hash would put each long lookup across all shards.
#[derive(Clone, Debug, Default)]
pub struct SharedIndex {
    inner: Arc<RwLock<Index>>,
}

impl SharedIndex {
    /// Shares `index`.
    pub fn new(index: Index) -> Self {
        Self {
            inner: Arc::new(RwLock::new(index)),
        }
    }

    /// [`Index::find_matches`], concurrently with other lookups and with a writer.
    pub fn find_matches(&self, query: &[SequenceHash]) -> Overlap {
        self.inner.read().find_matches(query)
    }

    /// Applies `events` in order, yielding to lookups between slices of the batch; returns
    /// the skips [`Index::apply_event`] reported (each also counted in the stats).
    pub fn apply_events<'a>(
        &self,
        events: impl IntoIterator<Item = &'a RouterEvent>,
    ) -> Vec<ApplyError> {
        let mut errors = Vec::new();
        let mut guard = self.inner.write();
        for event in events {
            let mut part = Part::default();
            loop {
                let done = guard.apply_part(event, &mut part, WRITE_SLICE_BLOCKS);
                // Lets waiting lookups in (a no-op when none waits).
                RwLockWriteGuard::bump(&mut guard);
                match done {
                    Ok(false) => {}
                    Ok(true) => break,
                    Err(error) => {
                        errors.push(error);
                        break;
                    }
                }
            }
        }
        errors
    }

    /// [`Index::remove_worker`].
    pub fn remove_worker(&self, worker_id: WorkerId) {
        self.inner.write().remove_worker(worker_id);
    }

    /// [`Index::remove_worker_dp_rank`].
    pub fn remove_worker_dp_rank(&self, worker: WorkerKey) {
        self.inner.write().remove_worker_dp_rank(worker);
    }

    /// [`Index::record_routed`].
    pub fn record_routed(&self, worker: WorkerKey, query: &[SequenceHash], now: Instant) {
        self.inner.write().record_routed(worker, query, now);
    }

    /// [`Index::expire_routed`].
    pub fn expire_routed(&self, now: Instant) -> u64 {
        self.inner.write().expire_routed(now)
    }

    /// [`Index::stats`].
    pub fn stats(&self) -> IndexStats {
        self.inner.read().stats()
    }

    /// [`Index::snapshot`], taken while lookups go on (the writer waits).
    pub fn snapshot(&self) -> Vec<u8> {
        self.inner.read().snapshot()
    }

    /// Replaces the whole index with the one `bytes` (from [`SharedIndex::snapshot`])
    /// describes, keeping this index's configuration. On error the index is left as it was.
    pub fn restore(&self, bytes: &[u8]) -> Result<(), SnapshotError> {
        let config = self.inner.read().config().clone();
        let restored = Index::restore(bytes, config)?;
        *self.inner.write() = restored;
        Ok(())
    }
}
