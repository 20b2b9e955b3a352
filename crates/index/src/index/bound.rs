//! The memory bound: past `IndexConfig::max_entries`, the least recently matched runs go.

use super::{Index, RunId};
use std::sync::atomic::Ordering;

impl Index {
    /// Drops least recently matched runs while the index holds more than its bound.
    pub(super) fn enforce_bound(&mut self) {
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
}
