//! Lookups: how many leading blocks of a request each cache holds.

use super::run::{chained_prefix, Loc, NO_RUN};
use super::{Index, Slot};
use crate::{Overlap, WorkerOverlap};
use kvroute_protocol::SequenceHash;
use smallvec::SmallVec;

impl Index {
    /// Per cache, how many leading blocks of `query` it holds; caches holding none are left
    /// out. The walk stops as soon as no cache holds the next block.
    pub fn find_matches(&self, query: &[SequenceHash]) -> Overlap {
        let mut overlap = Overlap::default();
        self.find_matches_into(query, &mut overlap);
        overlap
    }

    /// [`Index::find_matches`] into a caller-owned buffer: `out` is overwritten, and a buffer
    /// reused across lookups allocates only when a request matches more caches than any
    /// before it.
    ///
    /// ```
    /// use kvroute_index::{DpRank, Index, Overlap, SequenceHash, WorkerId, WorkerKey};
    ///
    /// let mut index = Index::default();
    /// let worker = WorkerKey::new(WorkerId(1), DpRank(0));
    /// index.apply_stored(worker, None, SequenceHash::from_raw_slice(&[1, 2, 3]))?;
    /// let mut overlap = Overlap::default();
    /// for (query, matched) in [(&[1u64, 2, 9][..], 2), (&[1, 2, 3, 4], 3)] {
    ///     index.find_matches_into(SequenceHash::from_raw_slice(query), &mut overlap);
    ///     assert_eq!(overlap.workers[0].matched_blocks, matched);
    /// }
    /// # Ok::<(), kvroute_index::ApplyError>(())
    /// ```
    pub fn find_matches_into(&self, query: &[SequenceHash], out: &mut Overlap) {
        out.query_blocks = query.len();
        let workers = &mut out.workers;
        workers.clear();
        let mut active: SmallVec<[Slot; 32]> = SmallVec::new();
        let mut depth = 0;
        let mut hint = NO_RUN;
        while let Some(&hash) = query.get(depth) {
            let hinted = self.runs.get(hint as usize);
            let loc = match hinted.filter(|run| run.hashes().first() == Some(&hash)) {
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
                workers.reserve(active.len());
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
            let matched = 1 + chained_prefix(&query[depth + 1..], &run.hashes()[index + 1..]);
            depth += matched;
            hint = if index + matched == run.hashes().len() {
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
    }

    /// The answer for `slot` (every slot in a run is registered).
    fn overlap(&self, slot: Slot, depth: usize) -> Option<WorkerOverlap> {
        self.slot_info(slot).map(|info| WorkerOverlap {
            worker: info.key,
            matched_blocks: depth,
            cached_blocks: info.blocks,
        })
    }
}
