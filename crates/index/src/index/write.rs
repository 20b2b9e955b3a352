//! Writes: stores and removals of one cache's blocks.

use super::run::{alloc_run, common_prefix, Keyed, Loc, Run, RunId, Workers};
use super::{Index, Slot};
use crate::{ApplyError, WorkerKey};
use kvroute_protocol::SequenceHash;
use smallvec::smallvec;
use std::collections::hash_map::Entry;

impl Index {
    /// Whether `worker` (registered as `slot`) may store `blocks` under `parent`, as Dynamo
    /// decides it; refusals are counted. Returns where the parent sits.
    pub(super) fn check_parent<K: Keyed>(
        &mut self,
        worker: WorkerKey,
        slot: Slot,
        parent: Option<SequenceHash>,
        blocks: &[K],
    ) -> Result<Option<Loc>, ApplyError> {
        let Some(parent) = parent else {
            return Ok(None);
        };
        if blocks.iter().any(|h| h.key() == parent) {
            self.counters.invalid_stores += 1;
            return Err(ApplyError::SelfReferencingStore { worker, parent });
        }
        match self.map.get(&parent) {
            Some(&loc) if self.runs[loc.run as usize].holds(slot) => Ok(Some(loc)),
            _ => {
                self.counters.unknown_parent += 1;
                Err(ApplyError::UnknownParent { worker, parent })
            }
        }
    }

    /// The run that the block at `loc` ends, if `slot` alone holds it and it can grow.
    fn appendable(&self, slot: Slot, loc: Loc) -> Option<RunId> {
        let run = &self.runs[loc.run as usize];
        let grows = run.index_of(loc) + 1 == run.hashes().len()
            && run.workers[..] == [slot]
            && run.base.checked_add(run.hashes().len() as u32).is_some();
        grows.then_some(loc.run)
    }

    /// Stores the chain `hashes` (continuing the block at `parent`) for `slot`; returns how
    /// many of the blocks it already held. Where the previous block sits is carried along, so
    /// a block no cache holds costs exactly one map probe.
    pub(super) fn store<K: Keyed>(&mut self, slot: Slot, parent: Option<Loc>, hashes: &[K]) -> u64 {
        let now = self.clock;
        let mut previous = parent;
        let mut tail = parent.and_then(|loc| self.appendable(slot, loc));
        let mut duplicates = 0;
        let mut fresh = 0;
        let mut i = 0;
        while let Some(hash) = hashes.get(i).map(Keyed::key) {
            let loc = match self.map.entry(hash) {
                Entry::Occupied(entry) => *entry.get(),
                Entry::Vacant(entry) => {
                    // A block no cache holds: it grows the run the previous block ends, or
                    // starts one.
                    let (id, created) = match tail {
                        Some(id) => (id, false),
                        None => {
                            self.live_runs += 1;
                            // The rest of the event most likely follows.
                            let hashes = Vec::with_capacity(hashes.len() - i);
                            let run = Run::new(hashes, smallvec![slot], now);
                            (alloc_run(&mut self.runs, &mut self.free_runs, run), true)
                        }
                    };
                    let run = &mut self.runs[id as usize];
                    let loc = Loc {
                        run: id,
                        pos: run.base + run.hashes().len() as u32,
                    };
                    run.push(hash);
                    run.touch(now);
                    entry.insert(loc);
                    if created {
                        Self::note_run(&mut self.slots, &self.runs, slot, id);
                        self.link_after(previous, id);
                    }
                    fresh += 1;
                    tail = (loc.pos < u32::MAX).then_some(id);
                    previous = Some(loc);
                    i += 1;
                    continue;
                }
            };
            let run = &self.runs[loc.run as usize];
            let index = run.index_of(loc);
            let len = 1 + common_prefix(&hashes[i + 1..], &run.hashes()[index + 1..]);
            let last = if run.holds(slot) {
                duplicates += len as u64;
                run.touch(now);
                Loc {
                    run: loc.run,
                    pos: loc.pos + (len - 1) as u32,
                }
            } else if let Some(tail) = previous.filter(|&p| self.continues(p, loc, len, slot)) {
                self.move_to_tail(tail, loc.run, len, slot);
                let run = &self.runs[tail.run as usize];
                run.touch(now);
                Loc {
                    run: tail.run,
                    pos: run.base + run.hashes().len() as u32 - 1,
                }
            } else {
                let id = self.isolate(loc.run, index, index + len);
                self.add_worker(id, slot);
                let run = &self.runs[id as usize];
                run.touch(now);
                Loc {
                    run: id,
                    pos: run.base + (len - 1) as u32,
                }
            };
            i += len;
            tail = self.appendable(slot, last);
            previous = Some(last);
        }
        self.entries += fresh;
        self.unique += fresh;
        if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
            info.blocks += fresh;
        }
        duplicates
    }

    /// Whether `slot` storing the first `len` blocks of the live run at `loc` (not all of them,
    /// and not held by `slot`) can move them onto the end of the run that ends at `tail`: that run
    /// holds exactly the other run's caches plus `slot`. A cache storing a shared run block by
    /// block (one event per decode step) then grows one run instead of cutting one per block.
    fn continues(&self, tail: Loc, loc: Loc, len: usize, slot: Slot) -> bool {
        let (target, source) = (&self.runs[tail.run as usize], &self.runs[loc.run as usize]);
        tail.run != loc.run
            && !source.workers.is_empty()
            && source.index_of(loc) == 0
            && len < source.hashes().len()
            && target.index_of(tail) + 1 == target.hashes().len()
            && target.workers.len() == source.workers.len() + 1
            && target.holds(slot)
            && source.workers.iter().all(|&w| target.holds(w))
            && target
                .base
                .checked_add((target.hashes().len() + len) as u32)
                .is_some()
    }

    /// Moves the first `len` blocks of run `source` onto the end of the run that ends at
    /// `tail` (see [`Index::continues`]): `slot` now holds them too.
    fn move_to_tail(&mut self, tail: Loc, source: RunId, len: usize, slot: Slot) {
        let moved = self.runs[source as usize].cut_front(len);
        let target = &mut self.runs[tail.run as usize];
        let end = target.base + target.hashes().len() as u32;
        for (pos, &hash) in (end..).zip(&moved) {
            target.push(hash);
            if let Some(loc) = self.map.get_mut(&hash) {
                *loc = Loc { run: tail.run, pos };
            }
        }
        target.next = source;
        self.entries += len as u64;
        if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
            info.blocks += len as u64;
        }
    }

    /// Removes `hashes` from `slot`; returns how many it did not hold.
    pub(super) fn remove_blocks(&mut self, slot: Slot, hashes: &[SequenceHash]) -> u64 {
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
            let forward = common_prefix(rest, &run.hashes()[index + 1..]);
            let (lo, hi, len) = if forward > 0 {
                (index, index + 1 + forward, 1 + forward)
            } else {
                let backward = rest
                    .iter()
                    .zip(run.hashes()[..index].iter().rev())
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
            Self::note_run(&mut self.slots, &self.runs, slot, id);
        }
    }

    /// Takes `slot` out of run `id` (its list of runs keeps `id` until it is next compacted).
    pub(super) fn remove_worker_from(&mut self, id: RunId, slot: Slot) {
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

    /// Restores the entries of one run: used by snapshot decoding on a fresh index.
    pub(crate) fn insert_run(
        &mut self,
        hashes: Vec<SequenceHash>,
        workers: Workers,
    ) -> Result<(), SequenceHash> {
        let id = self.next_run_id();
        for (pos, &hash) in hashes.iter().enumerate() {
            let loc = Loc {
                run: id,
                pos: pos as u32,
            };
            if self.map.insert(hash, loc).is_some() {
                return Err(hash);
            }
        }
        let len = hashes.len() as u64;
        self.entries += len * workers.len() as u64;
        self.unique += len;
        self.live_runs += 1;
        let holders = workers.clone();
        self.alloc_run(Run::new(hashes, workers, self.clock));
        for slot in holders {
            if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
                info.blocks += len;
            }
            Self::note_run(&mut self.slots, &self.runs, slot, id);
        }
        Ok(())
    }
}
