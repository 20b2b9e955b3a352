//! Runs (compressed radix-tree edges): what one is, comparing blocks against one, and cutting
//! one where the caches holding its blocks stop agreeing.

use super::{Index, Slot};
use kvroute_protocol::{KvCacheStoredBlockData, SequenceHash};
use smallvec::SmallVec;
use std::mem::size_of;
use std::sync::atomic::{AtomicU64, Ordering};

/// Position of a run in the run arena.
pub(crate) type RunId = u32;
/// The caches of a run.
pub(crate) type Workers = SmallVec<[Slot; 4]>;
/// "No run" in [`Run::next`].
pub(super) const NO_RUN: RunId = RunId::MAX;

/// Where a block sits: its run and its position in the run. Positions are absolute, so cutting
/// blocks off the front of a run (`Run::base`) does not rewrite the others' entries.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Loc {
    pub(super) run: RunId,
    pub(super) pos: u32,
}

/// A maximal stretch of consecutive blocks held by the same caches.
///
/// A run with no hashes is free (in `Index::free_runs`); a run with hashes and no workers is
/// dead: its blocks are still mapped until it is reclaimed (`Index::collect_garbage`).
#[derive(Debug)]
pub(crate) struct Run {
    /// The run's hashes after the first `cut`, which were cut off the front and belong to
    /// other runs now: cutting the front costs a copy of the cut part, not a shift of the rest
    /// (a cache storing a shared run block by block cuts it once per block).
    blocks: Vec<SequenceHash>,
    cut: u32,
    /// Absolute position of `hashes()[0]`.
    pub(super) base: u32,
    /// A run that continued this one's last block when it was made ([`NO_RUN`]: none): lets a
    /// lookup leaving the run skip the map. Only a hint: checked against the run's first hash.
    pub(super) next: RunId,
    /// Sorted, distinct caches holding every block of the run (inline up to 4).
    pub(crate) workers: Workers,
    /// Write clock when the run was last matched or stored (the memory bound's LRU key).
    pub(super) stamp: AtomicU64,
}

impl Run {
    pub(super) fn new(hashes: Vec<SequenceHash>, workers: Workers, now: u64) -> Self {
        Self {
            blocks: hashes,
            cut: 0,
            base: 0,
            next: NO_RUN,
            workers,
            stamp: AtomicU64::new(now),
        }
    }

    /// The run's blocks, in order.
    #[inline]
    pub(crate) fn hashes(&self) -> &[SequenceHash] {
        &self.blocks[self.cut as usize..]
    }

    pub(super) fn push(&mut self, hash: SequenceHash) {
        self.blocks.push(hash);
    }

    /// Heap bytes of the hashes.
    pub(super) fn heap_bytes(&self) -> usize {
        self.blocks.capacity() * size_of::<SequenceHash>()
    }

    /// Empties the run (it becomes free); returns the hashes it held.
    pub(super) fn take_hashes(&mut self) -> Vec<SequenceHash> {
        let mut hashes = std::mem::take(&mut self.blocks);
        hashes.drain(..self.cut as usize);
        self.cut = 0;
        self.base = 0;
        hashes
    }

    /// Cuts off and returns the first `at` blocks.
    pub(super) fn cut_front(&mut self, at: usize) -> Vec<SequenceHash> {
        let moved = self.hashes()[..at].to_vec();
        self.cut += at as u32;
        self.base += at as u32;
        // Shift the rest down once the cut part outgrows it: amortized O(1) per block cut.
        if self.cut as usize > self.hashes().len() {
            self.shrink();
        }
        moved
    }

    /// Cuts off and returns the blocks from `at` on.
    fn cut_back(&mut self, at: usize) -> Vec<SequenceHash> {
        let moved = self.blocks.split_off(self.cut as usize + at);
        if self.blocks.capacity() > 2 * self.blocks.len() + 4 {
            self.blocks.shrink_to_fit();
        }
        moved
    }

    pub(super) fn index_of(&self, loc: Loc) -> usize {
        (loc.pos - self.base) as usize
    }

    pub(super) fn len(&self) -> u64 {
        self.hashes().len() as u64
    }

    pub(super) fn holds(&self, slot: Slot) -> bool {
        self.workers.binary_search(&slot).is_ok()
    }

    pub(super) fn touch(&self, now: u64) {
        // Read first: lookups on many threads must not bounce the cache line needlessly.
        if self.stamp.load(Ordering::Relaxed) < now {
            self.stamp.store(now, Ordering::Relaxed);
        }
    }

    pub(super) fn shrink(&mut self) {
        if self.cut > 0 {
            self.blocks.drain(..self.cut as usize);
            self.cut = 0;
        }
        if self.blocks.capacity() > 2 * self.blocks.len() + 4 {
            self.blocks.shrink_to_fit();
        }
    }
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
pub(super) fn common_prefix<K: Keyed>(a: &[K], b: &[SequenceHash]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x.key() == **y).count()
}

/// Number of leading elements `a` and `b` share, when both are hash chains: a sequence hash
/// commits to every block before it, so if the last elements of the window agree, so does
/// everything before them, and the first disagreement can be found by bisection. A lookup
/// reads O(log n) hashes of a run instead of all of them.
#[inline]
pub(super) fn chained_prefix(a: &[SequenceHash], b: &[SequenceHash]) -> usize {
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

/// Puts `run` in a free slot of the arena (a free function so callers can hold other fields).
pub(super) fn alloc_run(runs: &mut Vec<Run>, free_runs: &mut Vec<RunId>, run: Run) -> RunId {
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

impl Index {
    /// Records run `id` as the continuation of the run that the block at `previous` ends, if
    /// it ends one.
    pub(super) fn link_after(&mut self, previous: Option<Loc>, id: RunId) {
        let Some(loc) = previous else {
            return;
        };
        let run = &mut self.runs[loc.run as usize];
        if run.index_of(loc) + 1 == run.hashes().len() {
            run.next = id;
        }
    }

    /// Cuts run `id` so that its blocks `lo..hi` form a run of their own; returns that run.
    pub(super) fn isolate(&mut self, id: RunId, lo: usize, hi: usize) -> RunId {
        let mut middle = id;
        if lo > 0 {
            middle = self.split(middle, lo).1;
        }
        if hi - lo < self.runs[middle as usize].hashes().len() {
            middle = self.split(middle, hi - lo).0;
        }
        middle
    }

    /// Splits run `id` before its block `at` (0 < at < len); returns (front, back). The
    /// shorter side moves to a new run, so cutting a long run bit by bit stays linear.
    fn split(&mut self, id: RunId, at: usize) -> (RunId, RunId) {
        let run = &mut self.runs[id as usize];
        let front = at * 2 <= run.hashes().len();
        let moved = if front {
            run.cut_front(at)
        } else {
            run.cut_back(at)
        };
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
        let mut new_run = Run::new(moved, workers, 0);
        new_run.next = if front { id } else { old_next };
        new_run.stamp = stamp;
        let new = self.alloc_run(new_run);
        if !front {
            self.runs[id as usize].next = new;
        }
        if live {
            self.live_runs += 1;
            for i in 0..self.runs[new as usize].workers.len() {
                let slot = self.runs[new as usize].workers[i];
                Self::note_run(&mut self.slots, &self.runs, slot, new);
            }
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
    pub(super) fn next_run_id(&self) -> RunId {
        self.free_runs
            .last()
            .copied()
            .unwrap_or(self.runs.len() as RunId)
    }

    pub(super) fn alloc_run(&mut self, run: Run) -> RunId {
        alloc_run(&mut self.runs, &mut self.free_runs, run)
    }
}
