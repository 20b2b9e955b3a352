//! Reclamation: forgetting a cache's entries, and unmapping the blocks of runs nobody holds
//! any more, a bounded amount per write.

use super::{Index, RunId, Slot};

/// Blocks of reclamation work every write may do besides its own.
const GC_BUDGET: usize = 256;

impl Index {
    /// Bookkeeping after every write: the memory bound, then some reclamation. The clock moves
    /// on so lookups from now on rank above everything this write stored.
    pub(super) fn after_write(&mut self, work: usize) {
        self.clock += 1;
        self.enforce_bound();
        self.collect_garbage(GC_BUDGET.max(2 * work));
    }

    /// Reclaims dead runs until about `budget` blocks were unmapped.
    pub(super) fn collect_garbage(&mut self, budget: usize) {
        let mut done = 0;
        while done < budget {
            let Some(id) = self.dead_runs.pop() else {
                break;
            };
            let run = &mut self.runs[id as usize];
            if run.hashes().is_empty() || !run.workers.is_empty() {
                continue; // already reclaimed, or revived by a later store
            }
            let hashes = run.take_hashes();
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

    /// Removes every entry of `slot`, visiting only the runs on its list; the cache stays
    /// registered. Runs left with no cache are reclaimed by later writes.
    pub(super) fn drop_slot(&mut self, slot: Slot) {
        let Some(Some(info)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        let mut runs: Vec<RunId> = std::mem::take(&mut info.runs);
        info.blocks = 0;
        info.compacted = 0;
        for &id in &runs {
            let run = &mut self.runs[id as usize];
            // Stale entries (runs the cache left, ids reused) and repeats fail this test.
            let Ok(at) = run.workers.binary_search(&slot) else {
                continue;
            };
            run.workers.remove(at);
            let len = run.len();
            self.entries -= len;
            if run.workers.is_empty() {
                self.unique -= len;
                self.live_runs -= 1;
                self.dead_runs.push(id);
            }
        }
        runs.clear();
        if let Some(Some(info)) = self.slots.get_mut(slot as usize) {
            info.runs = runs;
        }
    }
}
