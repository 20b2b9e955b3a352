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
/// slices of about 512 blocks; after each slice the writer releases the lock *fairly*
/// (parking_lot's `unlock_fair`), handing it to every waiting lookup before it takes the lock
/// again. A lookup therefore waits for at most one slice (a few microseconds), never for a
/// whole batch. Recency stamps for the memory bound are relaxed atomics, so lookups never need
/// the lock exclusively.
///
/// Why this and not a sharded or copy-on-write structure: the measurements in
/// docs/benchmarks.md ("kvroute-index", concurrency) show lookup latency under a writer with
/// this scheme within noise of lookups with no writer, at no memory cost, where a left-right
/// copy doubles memory and sharding by hash splits every long lookup across shards.
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
