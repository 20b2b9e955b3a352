//! The single-writer index: a map from sequence hash to a position in a run of blocks with
//! one worker set (see the crate documentation for why).

use crate::approx::RoutedLog;
use crate::map::ShardedMap;
use crate::{ApplyError, IndexConfig, IndexStats, Overlap, WorkerKey, WorkerOverlap};
use kvroute_protocol::{
    KvCacheEventData, KvCacheStoredBlockData, RouterEvent, SequenceHash, WorkerId,
};
use rustc_hash::FxHashMap;
use smallvec::{smallvec, SmallVec};
use std::collections::hash_map::Entry;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

/// Dense number of a registered cache.
pub(crate) type Slot = u32;
/// Position of a run in the run arena.
pub(crate) type RunId = u32;
/// The caches of a run.
pub(crate) type Workers = SmallVec<[Slot; 4]>;
/// "No run" in [`Run::next`].
const NO_RUN: RunId = RunId::MAX;

/// Where a block sits: its run and its position in the run. Positions are absolute, so cutting
/// blocks off the front of a run (`Run::base`) does not rewrite the others' entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    run: RunId,
    pos: u32,
}

/// A maximal stretch of consecutive blocks held by the same caches.
///
/// A run with no hashes is free (in `Index::free_runs`); a run with hashes and no workers is
/// dead: its blocks are still mapped until it is reclaimed (`Index::collect_garbage`).
#[derive(Debug)]
pub(crate) struct Run {
    pub(crate) hashes: Vec<SequenceHash>,
    /// Absolute position of `hashes[0]`.
    base: u32,
    /// A run that continued this one's last block when it was made ([`NO_RUN`]: none): lets a
    /// lookup leaving the run skip the map. Only a hint: checked against the run's first hash.
    next: RunId,
    /// Sorted, distinct caches holding every block of the run (inline up to 4).
    pub(crate) workers: Workers,
    /// Write clock when the run was last matched or stored (the memory bound's LRU key).
    stamp: AtomicU64,
}

impl Run {
    fn index_of(&self, loc: Loc) -> usize {
        (loc.pos - self.base) as usize
    }

    fn len(&self) -> u64 {
        self.hashes.len() as u64
    }

    fn holds(&self, slot: Slot) -> bool {
        self.workers.binary_search(&slot).is_ok()
    }

    fn touch(&self, now: u64) {
        // Read first: lookups on many threads must not bounce the cache line needlessly.
        if self.stamp.load(Ordering::Relaxed) < now {
            self.stamp.store(now, Ordering::Relaxed);
        }
    }

    fn shrink(&mut self) {
        if self.hashes.capacity() > 2 * self.hashes.len() + 4 {
            self.hashes.shrink_to_fit();
        }
    }
}

/// A registered cache.
#[derive(Debug)]
pub(crate) struct SlotInfo {
    pub(crate) key: WorkerKey,
    pub(crate) blocks: u64,
    /// Fed by [`Index::record_routed`] rather than by events: not part of snapshots.
    pub(crate) approximate: bool,
}

/// Anything that names a block by its sequence hash: lets a stored event's blocks be applied
/// in place, without first copying their hashes out.
pub(crate) trait Keyed {
    fn key(&self) -> SequenceHash;
}

impl Keyed for SequenceHash {
    #[inline]
    fn key(&self) -> SequenceHash {
        *self
    }
}

impl Keyed for KvCacheStoredBlockData {
    #[inline]
    fn key(&self) -> SequenceHash {
        self.block_hash
    }
}

/// Number of leading elements `a` and `b` share.
#[inline]
fn common_prefix<K: Keyed>(a: &[K], b: &[SequenceHash]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.key() == **y).count()
}

/// Number of leading elements `a` and `b` share, when both are hash chains: a sequence hash
/// commits to every block before it, so if the last elements of the window agree, so does
/// everything before them, and the first disagreement can be found by bisection. A lookup
/// reads O(log n) hashes of a run instead of all of them.
#[inline]
fn chained_prefix(a: &[SequenceHash], b: &[SequenceHash]) -> usize {
    let len = a.len().min(b.len());
    let (a, b) = (&a[..len], &b[..len]);
    if len == 0 || a[len - 1] == b[len - 1] {
        return len;
    }
    // a[..lo] agree; a[hi] differs.
    let (mut lo, mut hi) = (0, len - 1);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if a[mid] == b[mid] {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
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
    pub(crate) routed: RoutedLog,
    entries: u64,
    unique: u64,
    live_runs: usize,
    counters: IndexStats,
}

/// Blocks of reclamation work every write may do besides its own.
const GC_BUDGET: usize = 256;

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
                let end = store.blocks.len().min(from.saturating_add(limit));
                let checked = match from {
                    0 => self.check_parent(worker, slot, store.parent_hash, &store.blocks),
                    _ => Ok(store.blocks.get(from - 1).map(|b| b.block_hash)),
                };
                let result = checked.map(|parent| {
                    let duplicates = self.store(slot, parent, &store.blocks[from..end]);
                    self.counters.duplicate_blocks += duplicates;
                    part.from = end;
                    end == store.blocks.len()
                });
                (result, end - from)
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
                self.drop_slots(&[slot]);
                (Ok(true), 0)
            }
        };
        self.after_write(work);
        result
    }

    /// Forgets every data-parallel rank of `worker_id`: its entries and its registration.
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

    /// Per cache, how many leading blocks of `query` it holds; caches holding none are left
    /// out. The walk stops as soon as no cache holds the next block.
    pub fn find_matches(&self, query: &[SequenceHash]) -> Overlap {
        let mut workers = Vec::new();
        let mut active: SmallVec<[Slot; 32]> = SmallVec::new();
        let mut depth = 0;
        let mut hint = NO_RUN;
        while let Some(&hash) = query.get(depth) {
            let hinted = self.runs.get(hint as usize);
            let loc = match hinted.filter(|run| run.hashes.first() == Some(&hash)) {
                Some(run) => Loc {
                    run: hint,
                    pos: run.base,
                },
                None => match self.map.get(&hash) {
                    Some(&loc) => loc,
                    None => break,
                },
            };
            let run = &self.runs[loc.run as usize];
            if depth == 0 {
                active.extend_from_slice(&run.workers);
                workers.reserve_exact(active.len());
            } else {
                // Both sorted: a merge keeps the ones still matching.
                let mut theirs = run.workers.iter().peekable();
                active.retain(|slot| {
                    let slot = *slot;
                    while theirs.next_if(|&&other| other < slot).is_some() {}
                    let keep = theirs.peek() == Some(&&slot);
                    if !keep {
                        workers.extend(self.overlap(slot, depth));
                    }
                    keep
                });
            }
            if active.is_empty() {
                break;
            }
            run.touch(self.clock);
            let index = run.index_of(loc);
            let matched = 1 + chained_prefix(&query[depth + 1..], &run.hashes[index + 1..]);
            depth += matched;
            hint = if index + matched == run.hashes.len() {
                run.next
            } else {
                NO_RUN
            };
        }
        workers.extend(
            active
                .into_iter()
                .filter_map(|slot| self.overlap(slot, depth)),
        );
        Overlap {
            query_blocks: query.len(),
            workers,
        }
    }

    /// Sizes and counters.
    pub fn stats(&self) -> IndexStats {
        let runs_heap: usize = self
            .runs
            .iter()
            .map(|run| {
                run.hashes.capacity() * size_of::<SequenceHash>()
                    + if run.workers.spilled() {
                        run.workers.capacity() * size_of::<Slot>()
                    } else {
                        0
                    }
            })
            .sum();
        let bytes = self.map.bytes()
            + self.runs.capacity() * size_of::<Run>()
            + runs_heap
            + (self.free_runs.capacity() + self.dead_runs.capacity()) * size_of::<RunId>()
            + self.slots.capacity() * size_of::<Option<SlotInfo>>()
            + self.slot_of.capacity() * (size_of::<(WorkerKey, Slot)>() + 1)
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

    /// The answer for `slot` (every slot in a run is registered).
    fn overlap(&self, slot: Slot, depth: usize) -> Option<WorkerOverlap> {
        self.slot_info(slot).map(|info| WorkerOverlap {
            worker: info.key,
            matched_blocks: depth,
            cached_blocks: info.blocks,
        })
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
        self.drop_slots(slots);
        self.routed.forget(slots);
        for &slot in slots {
            if let Some(info) = self.slots.get_mut(slot as usize).and_then(Option::take) {
                self.slot_of.remove(&info.key);
                self.free_slots.push(slot);
            }
        }
    }

    /// Removes every entry of `slots` (sorted or not) with one pass over the runs.
    fn drop_slots(&mut self, slots: &[Slot]) {
        for id in 0..self.runs.len() {
            let run = &mut self.runs[id];
            let before = run.workers.len();
            if before == 0 {
                continue;
            }
            run.workers.retain(|slot| !slots.contains(slot));
            let len = run.len();
            if run.workers.len() == before {
                continue;
            }
            let now_dead = run.workers.is_empty();
            self.entries -= len * (before - run.workers.len()) as u64;
            if now_dead {
                self.unique -= len;
                self.live_runs -= 1;
                self.dead_runs.push(id as RunId);
            }
        }
        for &slot in slots {
            if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
                info.blocks = 0;
            }
        }
    }

    /// Whether cache `slot` holds block `hash`.
    fn holds(&self, slot: Slot, hash: SequenceHash) -> bool {
        self.map
            .get(&hash)
            .is_some_and(|loc| self.runs[loc.run as usize].holds(slot))
    }

    /// The run that `hash` ends, if `slot` alone holds it and it can grow.
    fn appendable(&self, slot: Slot, hash: SequenceHash) -> Option<RunId> {
        let loc = self.map.get(&hash)?;
        let run = &self.runs[loc.run as usize];
        let grows = run.hashes.last() == Some(&hash)
            && run.workers[..] == [slot]
            && run.base.checked_add(run.hashes.len() as u32).is_some();
        grows.then_some(loc.run)
    }

    /// Whether `worker` (registered as `slot`) may store `blocks` under `parent`, as Dynamo
    /// decides it; refusals are counted. Returns the parent.
    fn check_parent<K: Keyed>(
        &mut self,
        worker: WorkerKey,
        slot: Slot,
        parent: Option<SequenceHash>,
        blocks: &[K],
    ) -> Result<Option<SequenceHash>, ApplyError> {
        if let Some(parent) = parent {
            if blocks.iter().any(|h| h.key() == parent) {
                self.counters.invalid_stores += 1;
                return Err(ApplyError::SelfReferencingStore { worker, parent });
            }
            if !self.holds(slot, parent) {
                self.counters.unknown_parent += 1;
                return Err(ApplyError::UnknownParent { worker, parent });
            }
        }
        Ok(parent)
    }

    /// Stores the chain `hashes` (continuing `parent`) for `slot`; returns how many of the
    /// blocks it already held.
    fn store<K: Keyed>(&mut self, slot: Slot, parent: Option<SequenceHash>, hashes: &[K]) -> u64 {
        let now = self.clock;
        let mut tail = parent.and_then(|p| self.appendable(slot, p));
        let mut duplicates = 0;
        let mut fresh = 0;
        let mut i = 0;
        while let Some(hash) = hashes.get(i).map(Keyed::key) {
            let loc = match self.map.entry(hash) {
                Entry::Occupied(entry) => *entry.get(),
                Entry::Vacant(entry) => {
                    // A block no cache holds: it grows the run the previous block ends, or
                    // starts one. One map probe per block: the apply hot path.
                    let (id, created) = match tail {
                        Some(id) => (id, false),
                        None => {
                            self.live_runs += 1;
                            let run = Run {
                                // The rest of the event most likely follows.
                                hashes: Vec::with_capacity(hashes.len() - i),
                                base: 0,
                                next: NO_RUN,
                                workers: smallvec![slot],
                                stamp: AtomicU64::new(now),
                            };
                            (alloc_run(&mut self.runs, &mut self.free_runs, run), true)
                        }
                    };
                    let run = &mut self.runs[id as usize];
                    let pos = run.base + run.hashes.len() as u32;
                    run.hashes.push(hash);
                    run.touch(now);
                    entry.insert(Loc { run: id, pos });
                    if created {
                        let previous = i.checked_sub(1).map(|p| hashes[p].key()).or(parent);
                        self.link_after(previous, id);
                    }
                    fresh += 1;
                    tail = (pos < u32::MAX).then_some(id);
                    i += 1;
                    continue;
                }
            };
            let run = &self.runs[loc.run as usize];
            let index = run.index_of(loc);
            let len = 1 + common_prefix(&hashes[i + 1..], &run.hashes[index + 1..]);
            if run.holds(slot) {
                duplicates += len as u64;
                run.touch(now);
            } else {
                let id = self.isolate(loc.run, index, index + len);
                self.add_worker(id, slot);
                self.runs[id as usize].touch(now);
            }
            i += len;
            tail = self.appendable(slot, hashes[i - 1].key());
        }
        self.entries += fresh;
        self.unique += fresh;
        if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
            info.blocks += fresh;
        }
        duplicates
    }

    /// Removes `hashes` from `slot`; returns how many it did not hold.
    pub(crate) fn remove_blocks(&mut self, slot: Slot, hashes: &[SequenceHash]) -> u64 {
        let mut unknown = 0;
        let mut i = 0;
        while let Some(&hash) = hashes.get(i) {
            let Some(&loc) = self.map.get(&hash) else {
                unknown += 1;
                i += 1;
                continue;
            };
            let run = &self.runs[loc.run as usize];
            if !run.holds(slot) {
                unknown += 1;
                i += 1;
                continue;
            }
            // Removals usually name a stretch of a run, in either order: do it in one cut.
            let index = run.index_of(loc);
            let rest = &hashes[i + 1..];
            let forward = common_prefix(rest, &run.hashes[index + 1..]);
            let (lo, hi, len) = if forward > 0 {
                (index, index + 1 + forward, 1 + forward)
            } else {
                let backward = rest
                    .iter()
                    .zip(run.hashes[..index].iter().rev())
                    .take_while(|(x, y)| x == y)
                    .count();
                (index - backward, index + 1, 1 + backward)
            };
            let id = self.isolate(loc.run, lo, hi);
            self.remove_worker_from(id, slot);
            i += len;
        }
        unknown
    }

    fn add_worker(&mut self, id: RunId, slot: Slot) {
        let run = &mut self.runs[id as usize];
        if let Err(at) = run.workers.binary_search(&slot) {
            run.workers.insert(at, slot);
            let len = run.len();
            if run.workers.len() == 1 {
                self.unique += len;
                self.live_runs += 1;
            }
            self.entries += len;
            if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
                info.blocks += len;
            }
        }
    }

    fn remove_worker_from(&mut self, id: RunId, slot: Slot) {
        let run = &mut self.runs[id as usize];
        if let Ok(at) = run.workers.binary_search(&slot) {
            run.workers.remove(at);
            let len = run.len();
            if run.workers.is_empty() {
                self.unique -= len;
                self.live_runs -= 1;
                self.dead_runs.push(id);
            }
            self.entries -= len;
            if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
                info.blocks -= len;
            }
        }
    }

    /// Records run `id` as the continuation of the run that `previous` ends, if it ends one.
    fn link_after(&mut self, previous: Option<SequenceHash>, id: RunId) {
        let Some(&loc) = previous.and_then(|hash| self.map.get(&hash)) else {
            return;
        };
        let run = &mut self.runs[loc.run as usize];
        if run.index_of(loc) + 1 == run.hashes.len() {
            run.next = id;
        }
    }

    /// Cuts run `id` so that its blocks `lo..hi` form a run of their own; returns that run.
    fn isolate(&mut self, id: RunId, lo: usize, hi: usize) -> RunId {
        let mut middle = id;
        if lo > 0 {
            middle = self.split(middle, lo).1;
        }
        if hi - lo < self.runs[middle as usize].hashes.len() {
            middle = self.split(middle, hi - lo).0;
        }
        middle
    }

    /// Splits run `id` before its block `at` (0 < at < len); returns (front, back). The
    /// shorter side moves to a new run, so cutting a long run bit by bit stays linear.
    fn split(&mut self, id: RunId, at: usize) -> (RunId, RunId) {
        let run = &mut self.runs[id as usize];
        let front = at * 2 <= run.hashes.len();
        let moved: Vec<SequenceHash> = if front {
            let moved = run.hashes.drain(..at).collect();
            run.base += at as u32;
            moved
        } else {
            run.hashes.split_off(at)
        };
        run.shrink();
        let workers = run.workers.clone();
        let stamp = AtomicU64::new(run.stamp.load(Ordering::Relaxed));
        let old_next = run.next;
        let live = !workers.is_empty();
        let new_id = self.next_run_id();
        for (pos, hash) in moved.iter().enumerate() {
            // Every moved hash is mapped to this run: the map and the runs agree.
            if let Some(loc) = self.map.get_mut(hash) {
                *loc = Loc {
                    run: new_id,
                    pos: pos as u32,
                };
            }
        }
        let new = self.alloc_run(Run {
            hashes: moved,
            base: 0,
            next: if front { id } else { old_next },
            workers,
            stamp,
        });
        if !front {
            self.runs[id as usize].next = new;
        }
        if live {
            self.live_runs += 1;
        } else {
            self.dead_runs.push(new);
        }
        if front {
            (new, id)
        } else {
            (id, new)
        }
    }

    /// The id the next [`Index::alloc_run`] returns.
    fn next_run_id(&self) -> RunId {
        self.free_runs
            .last()
            .copied()
            .unwrap_or(self.runs.len() as RunId)
    }

    fn alloc_run(&mut self, run: Run) -> RunId {
        alloc_run(&mut self.runs, &mut self.free_runs, run)
    }

    /// Bookkeeping after every write: the memory bound, then some reclamation. The clock moves
    /// on so lookups from now on rank above everything this write stored.
    fn after_write(&mut self, work: usize) {
        self.clock += 1;
        self.enforce_bound();
        self.collect_garbage(GC_BUDGET.max(2 * work));
    }

    /// Reclaims dead runs until about `budget` blocks were unmapped.
    fn collect_garbage(&mut self, budget: usize) {
        let mut done = 0;
        while done < budget {
            let Some(id) = self.dead_runs.pop() else {
                break;
            };
            let run = &mut self.runs[id as usize];
            if run.hashes.is_empty() || !run.workers.is_empty() {
                continue; // already reclaimed, or revived by a later store
            }
            let hashes = std::mem::take(&mut run.hashes);
            run.base = 0;
            done += hashes.len();
            for hash in &hashes {
                self.map.remove(hash);
            }
            self.free_runs.push(id);
        }
        if self.dead_runs.is_empty() && self.dead_runs.capacity() > 1024 {
            self.dead_runs = Vec::new();
        }
    }

    /// Drops least recently matched runs while the index holds more than its bound.
    fn enforce_bound(&mut self) {
        let Some(max) = self.config.max_entries else {
            return;
        };
        if self.entries <= max {
            return;
        }
        let target = max - max / 16;
        let mut by_age: Vec<(u64, RunId)> = self
            .runs
            .iter()
            .enumerate()
            .filter(|(_, run)| !run.workers.is_empty())
            .map(|(id, run)| (run.stamp.load(Ordering::Relaxed), id as RunId))
            .collect();
        by_age.sort_unstable();
        for (_, id) in by_age {
            if self.entries <= target {
                break;
            }
            let before = self.entries;
            for slot in self.runs[id as usize].workers.clone() {
                self.remove_worker_from(id, slot);
            }
            self.counters.evicted_entries += before - self.entries;
        }
    }

    /// Records that the router sent a request with these blocks to `worker`, for a cache that
    /// publishes no events (approximate mode). The blocks count as held until
    /// [`IndexConfig::routed_ttl`] after `now` (recording them again extends that), and are
    /// dropped by [`Index::expire_routed`]. Such a cache is left out of snapshots.
    pub fn record_routed(&mut self, worker: WorkerKey, query: &[SequenceHash], now: Instant) {
        let slot = self.slot_for(worker);
        if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
            info.approximate = true;
        }
        // A block routed again is not a duplicate event: the count is not kept.
        self.store(slot, None, query);
        let deadline = now + self.config.routed_ttl;
        self.routed.record(slot, query, deadline);
        self.after_write(query.len());
    }

    /// Drops approximate-mode blocks whose time ran out by `now`; returns how many entries
    /// expired.
    pub fn expire_routed(&mut self, now: Instant) -> u64 {
        let before = self.entries;
        while let Some((slot, hashes)) = self.routed.pop_expired(now) {
            self.remove_blocks(slot, &hashes);
        }
        let expired = before - self.entries;
        self.counters.expired_entries += expired;
        self.after_write(0);
        expired
    }

    /// Restores the entries of one run: used by snapshot decoding on a fresh index.
    pub(crate) fn insert_run(
        &mut self,
        hashes: Vec<SequenceHash>,
        workers: Workers,
    ) -> Result<(), SequenceHash> {
        let id = self.next_run_id();
        for (pos, &hash) in hashes.iter().enumerate() {
            if self
                .map
                .insert(
                    hash,
                    Loc {
                        run: id,
                        pos: pos as u32,
                    },
                )
                .is_some()
            {
                return Err(hash);
            }
        }
        let len = hashes.len() as u64;
        for &slot in &workers {
            if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
                info.blocks += len;
            }
        }
        self.entries += len * workers.len() as u64;
        self.unique += len;
        self.live_runs += 1;
        self.alloc_run(Run {
            hashes,
            base: 0,
            next: NO_RUN,
            workers,
            stamp: AtomicU64::new(self.clock),
        });
        Ok(())
    }

    pub(crate) fn map_len(&self) -> usize {
        self.map.len()
    }
}

/// Puts `run` in a free slot of the arena (a free function so callers can hold other fields).
fn alloc_run(runs: &mut Vec<Run>, free_runs: &mut Vec<RunId>, run: Run) -> RunId {
    match free_runs.pop() {
        Some(id) => {
            runs[id as usize] = run;
            id
        }
        None => {
            runs.push(run);
            (runs.len() - 1) as RunId
        }
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
    use kvroute_protocol::{BlockHash, DpRank, KvCacheEvent, KvCacheRemoveData, KvCacheStoreData};

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
