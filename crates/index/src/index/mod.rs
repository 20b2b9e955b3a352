//! The single-writer index: a map from sequence hash to a position in a run of blocks with
//! one worker set (see the crate documentation for why).
//!
//! One concern per module: `run` (what a run is and how one is cut), `write` (stores and
//! removals), `lookup` (`find_matches`), `reclaim` (forgetting caches and unmapping runs
//! nobody holds), `bound` (the memory bound) and `approx` (approximate mode). This one holds
//! the state, the registry of caches and the public entry points.

mod approx;
mod bound;
mod lookup;
mod reclaim;
mod run;
mod write;

pub(crate) use run::{Run, Workers};

use crate::map::{table_bytes, ShardedMap};
use crate::{ApplyError, IndexConfig, IndexStats, WorkerKey};
use approx::RoutedLog;
use kvroute_protocol::{KvCacheEventData, RouterEvent, SequenceHash, WorkerId};
use run::{Keyed, Loc, RunId};
use rustc_hash::FxHashMap;
use std::mem::size_of;

/// Dense number of a registered cache.
pub(crate) type Slot = u32;

/// A registered cache.
#[derive(Debug)]
pub(crate) struct SlotInfo {
    pub(crate) key: WorkerKey,
    pub(crate) blocks: u64,
    /// Fed by [`Index::record_routed`] rather than by events: not part of snapshots.
    pub(crate) approximate: bool,
    /// Every run holding this cache, and possibly runs that no longer do (a removal does not
    /// look for its run here): forgetting a cache visits its own runs, not the index's.
    runs: Vec<RunId>,
    /// Length of `runs` after its last compaction.
    compacted: usize,
}

/// How far [`Index::apply_part`] got through an event.
#[derive(Debug, Default)]
pub(crate) struct Part {
    /// The next block (of the store or removal) to apply.
    from: usize,
    /// Removed blocks the cache did not hold, so far.
    unknown: u64,
}

/// The KV block index. See the crate documentation.
#[derive(Debug)]
pub struct Index {
    map: ShardedMap<SequenceHash, Loc>,
    pub(crate) runs: Vec<Run>,
    free_runs: Vec<RunId>,
    /// Runs that lost their last worker, to reclaim (entries may be stale: re-checked).
    dead_runs: Vec<RunId>,
    pub(crate) slots: Vec<Option<SlotInfo>>,
    free_slots: Vec<Slot>,
    slot_of: FxHashMap<WorkerKey, Slot>,
    /// Advanced after every write; writes and lookups stamp the runs they touch with it.
    clock: u64,
    config: IndexConfig,
    routed: RoutedLog,
    entries: u64,
    unique: u64,
    live_runs: usize,
    counters: IndexStats,
}

impl Index {
    /// An empty index.
    pub fn new(config: IndexConfig) -> Self {
        Self {
            map: ShardedMap::new(),
            runs: Vec::new(),
            free_runs: Vec::new(),
            dead_runs: Vec::new(),
            slots: Vec::new(),
            free_slots: Vec::new(),
            slot_of: FxHashMap::default(),
            clock: 1,
            routed: RoutedLog::default(),
            config,
            entries: 0,
            unique: 0,
            live_runs: 0,
            counters: IndexStats::default(),
        }
    }

    /// The configuration the index was built with.
    pub fn config(&self) -> &IndexConfig {
        &self.config
    }

    /// Applies one event of one cache.
    ///
    /// A store whose parent the cache does not hold, or that names its parent among its
    /// blocks, is skipped whole (as Dynamo does); a removal of blocks the cache does not hold
    /// removes the others. Both are counted and reported as an error; the index stays
    /// consistent. The event's storage tier is not looked at: keep one index per tier.
    pub fn apply_event(&mut self, event: &RouterEvent) -> Result<(), ApplyError> {
        let mut part = Part::default();
        while !self.apply_part(event, &mut part, usize::MAX)? {}
        Ok(())
    }

    /// Applies a stored event given as borrowed parts, without building a [`RouterEvent`]:
    /// `worker` stored the chain `blocks` continuing `parent`. Same semantics as
    /// [`Index::apply_event`].
    ///
    /// ```
    /// use kvroute_index::{DpRank, Index, SequenceHash, WorkerId, WorkerKey};
    ///
    /// let mut index = Index::default();
    /// let worker = WorkerKey::new(WorkerId(1), DpRank(0));
    /// let hashes: &[u64] = &[11, 12, 13];
    /// // `SequenceHash` is `#[repr(transparent)]`: a `&[u64]` is viewed, not copied.
    /// index.apply_stored(worker, None, SequenceHash::from_raw_slice(hashes))?;
    /// index.apply_stored(worker, Some(SequenceHash(13)), &[SequenceHash(14)])?;
    /// assert_eq!(index.entries(), 4);
    /// # Ok::<(), kvroute_index::ApplyError>(())
    /// ```
    pub fn apply_stored(
        &mut self,
        worker: WorkerKey,
        parent: Option<SequenceHash>,
        blocks: &[SequenceHash],
    ) -> Result<(), ApplyError> {
        let slot = self.slot_for(worker);
        self.counters.events += 1;
        let result = self.stored_part(worker, slot, parent, blocks, 0, blocks.len());
        self.after_write(blocks.len());
        result.map(drop)
    }

    /// Applies a removed event given as a borrowed slice: `worker` evicted `blocks`. Same
    /// semantics as [`Index::apply_event`].
    pub fn apply_removed(
        &mut self,
        worker: WorkerKey,
        blocks: &[SequenceHash],
    ) -> Result<(), ApplyError> {
        let slot = self.slot_for(worker);
        self.counters.events += 1;
        let unknown = self.remove_blocks(slot, blocks);
        self.counters.unknown_removals += unknown;
        self.after_write(blocks.len());
        match unknown {
            0 => Ok(()),
            count => Err(ApplyError::UnknownBlocks { worker, count }),
        }
    }

    /// Applies the next (at most) `limit` blocks of `event`, from where `part` stands; returns
    /// whether the event is done. A store cut in parts is the same store: each part continues
    /// the block the part before it ended on. Lets [`crate::SharedIndex`] yield to lookups
    /// inside a long event.
    pub(crate) fn apply_part(
        &mut self,
        event: &RouterEvent,
        part: &mut Part,
        limit: usize,
    ) -> Result<bool, ApplyError> {
        let worker = WorkerKey::new(event.worker_id, event.event.dp_rank);
        let slot = self.slot_for(worker);
        let from = part.from;
        if from == 0 {
            self.counters.events += 1;
        }
        let (result, work) = match &event.event.data {
            KvCacheEventData::Stored(store) => {
                let blocks = &store.blocks;
                let end = blocks.len().min(from.saturating_add(limit));
                let result = self.stored_part(worker, slot, store.parent_hash, blocks, from, end);
                part.from = end;
                (result.map(|()| end == blocks.len()), end - from)
            }
            KvCacheEventData::Removed(removed) => {
                let hashes = &removed.block_hashes;
                let end = hashes.len().min(from.saturating_add(limit));
                let unknown = self.remove_blocks(slot, &hashes[from..end]);
                self.counters.unknown_removals += unknown;
                part.unknown += unknown;
                part.from = end;
                let result = match (end == hashes.len(), part.unknown) {
                    (false, _) => Ok(false),
                    (true, 0) => Ok(true),
                    (true, count) => Err(ApplyError::UnknownBlocks { worker, count }),
                };
                (result, end - from)
            }
            KvCacheEventData::Cleared => {
                self.drop_slot(slot);
                (Ok(true), 0)
            }
        };
        self.after_write(work);
        result
    }

    /// Blocks `from..end` of a store of `blocks` under `parent`: the first part checks the
    /// parent as Dynamo does, a later one continues the block before it.
    fn stored_part<K: Keyed>(
        &mut self,
        worker: WorkerKey,
        slot: Slot,
        parent: Option<SequenceHash>,
        blocks: &[K],
        from: usize,
        end: usize,
    ) -> Result<(), ApplyError> {
        let parent = match from {
            0 => self.check_parent(worker, slot, parent, blocks)?,
            _ => blocks
                .get(from - 1)
                .and_then(|block| self.map.get(&block.key()).copied()),
        };
        let duplicates = self.store(slot, parent, &blocks[from..end]);
        self.counters.duplicate_blocks += duplicates;
        Ok(())
    }

    /// Forgets every data-parallel rank of `worker_id`: its entries and its registration.
    /// Takes time in proportion to the worker's own runs, not the index's.
    pub fn remove_worker(&mut self, worker_id: WorkerId) {
        let slots: Vec<Slot> = self
            .slot_of
            .iter()
            .filter(|(key, _)| key.worker_id == worker_id)
            .map(|(_, &slot)| slot)
            .collect();
        self.unregister(&slots);
    }

    /// Forgets one cache: its entries and its registration.
    pub fn remove_worker_dp_rank(&mut self, worker: WorkerKey) {
        if let Some(&slot) = self.slot_of.get(&worker) {
            self.unregister(&[slot]);
        }
    }

    /// (worker, block) entries: the sum over caches of the blocks each holds, as
    /// [`IndexStats::blocks`], without computing the other statistics.
    pub fn entries(&self) -> u64 {
        self.entries
    }

    /// Sizes and counters. Takes time in proportion to the number of runs (for
    /// [`IndexStats::bytes`]); [`Index::entries`] is the cheap count.
    pub fn stats(&self) -> IndexStats {
        let runs_heap: usize = self
            .runs
            .iter()
            .map(|run| {
                run.heap_bytes()
                    + if run.workers.spilled() {
                        run.workers.capacity() * size_of::<Slot>()
                    } else {
                        0
                    }
            })
            .sum();
        let slots_heap: usize = self
            .slots
            .iter()
            .flatten()
            .map(|info| info.runs.capacity() * size_of::<RunId>())
            .sum();
        let bytes = self.map.bytes()
            + self.runs.capacity() * size_of::<Run>()
            + runs_heap
            + (self.free_runs.capacity() + self.dead_runs.capacity()) * size_of::<RunId>()
            + self.slots.capacity() * size_of::<Option<SlotInfo>>()
            + slots_heap
            + self.free_slots.capacity() * size_of::<Slot>()
            + table_bytes::<(WorkerKey, Slot)>(self.slot_of.capacity())
            + self.routed.bytes();
        IndexStats {
            workers: self.slot_of.len(),
            blocks: self.entries,
            unique_blocks: self.unique,
            nodes: self.live_runs,
            bytes,
            ..self.counters.clone()
        }
    }

    /// The registered caches, in no particular order.
    pub fn workers(&self) -> impl Iterator<Item = WorkerKey> + '_ {
        self.slot_of.keys().copied()
    }

    /// Reclaims every run that lost its last worker now, rather than bit by bit in later
    /// writes, and returns spare capacity.
    pub fn compact(&mut self) {
        self.collect_garbage(usize::MAX);
        self.map.shrink_to_fit();
        self.runs.iter_mut().for_each(Run::shrink);
    }

    pub(crate) fn slot_info(&self, slot: Slot) -> Option<&SlotInfo> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    pub(crate) fn slot_for(&mut self, key: WorkerKey) -> Slot {
        if let Some(&slot) = self.slot_of.get(&key) {
            return slot;
        }
        let info = SlotInfo {
            key,
            blocks: 0,
            approximate: false,
            runs: Vec::new(),
            compacted: 0,
        };
        let slot = match self.free_slots.pop() {
            Some(slot) => {
                self.slots[slot as usize] = Some(info);
                slot
            }
            None => {
                self.slots.push(Some(info));
                (self.slots.len() - 1) as Slot
            }
        };
        self.slot_of.insert(key, slot);
        slot
    }

    fn unregister(&mut self, slots: &[Slot]) {
        if slots.is_empty() {
            return;
        }
        for &slot in slots {
            self.drop_slot(slot);
        }
        self.routed.forget(slots);
        for &slot in slots {
            if let Some(info) = self.slots.get_mut(slot as usize).and_then(Option::take) {
                self.slot_of.remove(&info.key);
                self.free_slots.push(slot);
            }
        }
    }

    /// Records that `slot` holds run `id` (a free function of the fields it needs, so callers
    /// can hold other fields). Drops the runs it no longer holds once the list doubled.
    fn note_run(slots: &mut [Option<SlotInfo>], runs: &[Run], slot: Slot, id: RunId) {
        let Some(Some(info)) = slots.get_mut(slot as usize) else {
            return;
        };
        info.runs.push(id);
        if info.runs.len() >= 2 * info.compacted + 16 {
            info.runs
                .retain(|&id| runs.get(id as usize).is_some_and(|run| run.holds(slot)));
            info.runs.sort_unstable();
            info.runs.dedup();
            info.compacted = info.runs.len();
        }
    }

    pub(crate) fn map_len(&self) -> usize {
        self.map.len()
    }
}

impl Default for Index {
    fn default() -> Self {
        Self::new(IndexConfig::default())
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // tests fail loudly by design

    use super::*;
    use kvroute_protocol::{
        BlockHash, DpRank, KvCacheEvent, KvCacheRemoveData, KvCacheStoreData,
        KvCacheStoredBlockData,
    };

    /// Chained hashes of a 3-ary tree, as in tests/model.rs: block `c` after `h` is `3h+c+1`.
    fn chain(mut h: u64, contents: impl Iterator<Item = u64>) -> Vec<SequenceHash> {
        contents
            .map(|c| {
                h = 3 * h + c + 1;
                SequenceHash(h)
            })
            .collect()
    }

    fn events(seed: u64) -> Vec<RouterEvent> {
        let mut state = seed | 1;
        let mut next = move |n: u64| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % n
        };
        (0..300)
            .map(|_| {
                let worker = next(3);
                let start = if next(3) == 0 { 0 } else { 1 + next(40) };
                let len = next(12) as usize;
                let hashes = chain(start, std::iter::repeat_with(|| next(3)).take(len));
                let data = if next(4) == 0 {
                    KvCacheEventData::Removed(KvCacheRemoveData {
                        block_hashes: hashes,
                    })
                } else {
                    KvCacheEventData::Stored(KvCacheStoreData {
                        parent_hash: (start > 0).then_some(SequenceHash(start)),
                        start_position: None,
                        blocks: hashes
                            .into_iter()
                            .map(|h| KvCacheStoredBlockData {
                                block_hash: h,
                                tokens_hash: BlockHash(h.get()),
                                mm_extra_info: None,
                            })
                            .collect(),
                    })
                };
                RouterEvent::new(
                    WorkerId(worker),
                    KvCacheEvent {
                        event_id: 0,
                        data,
                        dp_rank: DpRank(0),
                    },
                )
            })
            .collect()
    }

    #[test]
    fn an_event_applied_in_parts_is_the_same_event() {
        for seed in 1..20 {
            let events = events(seed);
            let mut whole = Index::default();
            let whole_errors: Vec<_> = events.iter().map(|e| whole.apply_event(e)).collect();
            for limit in [1, 2, 5] {
                let mut parts = Index::default();
                let part_errors: Vec<_> = events
                    .iter()
                    .map(|e| {
                        let mut part = Part::default();
                        loop {
                            match parts.apply_part(e, &mut part, limit) {
                                Ok(false) => {}
                                Ok(true) => return Ok(()),
                                Err(error) => return Err(error),
                            }
                        }
                    })
                    .collect();
                assert_eq!(part_errors, whole_errors);
                let (a, b) = (whole.stats(), parts.stats());
                assert_eq!(
                    (
                        a.blocks,
                        a.unique_blocks,
                        a.workers,
                        a.events,
                        a.duplicate_blocks
                    ),
                    (
                        b.blocks,
                        b.unique_blocks,
                        b.workers,
                        b.events,
                        b.duplicate_blocks
                    )
                );
                for start in 0..40 {
                    let query = chain(0, (0..12).map(|i| (start + i) % 3));
                    let mut x = whole.find_matches(&query).workers;
                    let mut y = parts.find_matches(&query).workers;
                    x.sort_by_key(|w| w.worker);
                    y.sort_by_key(|w| w.worker);
                    assert_eq!(x, y);
                }
            }
        }
    }
}
