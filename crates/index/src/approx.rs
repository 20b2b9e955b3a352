//! Approximate mode: blocks the router sent to a cache that publishes no events, assumed
//! cached until a deadline.

use crate::index::Slot;
use kvroute_protocol::SequenceHash;
use rustc_hash::FxHashMap;
use std::collections::VecDeque;
use std::mem::size_of;
use std::time::Instant;

/// Deadlines of routed blocks, and the routings in the order they expire.
#[derive(Debug, Default)]
pub(crate) struct RoutedLog {
    /// The latest deadline of each (cache, block): a block routed again lives on.
    deadlines: FxHashMap<(Slot, SequenceHash), Instant>,
    /// One entry per routing, in recording order (deadlines grow with it).
    queue: VecDeque<(Instant, Slot, Box<[SequenceHash]>)>,
}

impl RoutedLog {
    pub(crate) fn record(&mut self, slot: Slot, hashes: &[SequenceHash], deadline: Instant) {
        for &hash in hashes {
            let at = self.deadlines.entry((slot, hash)).or_insert(deadline);
            *at = (*at).max(deadline);
        }
        self.queue.push_back((deadline, slot, hashes.into()));
    }

    /// The blocks of the oldest routing whose deadline passed, less those routed again since.
    pub(crate) fn pop_expired(&mut self, now: Instant) -> Option<(Slot, Vec<SequenceHash>)> {
        if self
            .queue
            .front()
            .is_none_or(|&(deadline, _, _)| deadline > now)
        {
            return None;
        }
        let (_, slot, hashes) = self.queue.pop_front()?;
        let expired = hashes
            .iter()
            .copied()
            .filter(|&hash| match self.deadlines.get(&(slot, hash)) {
                Some(&deadline) if deadline <= now => {
                    self.deadlines.remove(&(slot, hash));
                    true
                }
                _ => false,
            })
            .collect();
        Some((slot, expired))
    }

    /// Forgets the routings of caches that left the index.
    pub(crate) fn forget(&mut self, slots: &[Slot]) {
        if self.queue.is_empty() {
            return;
        }
        self.deadlines.retain(|(slot, _), _| !slots.contains(slot));
        self.queue.retain(|(_, slot, _)| !slots.contains(slot));
    }

    pub(crate) fn bytes(&self) -> usize {
        self.deadlines.capacity() * (size_of::<((Slot, SequenceHash), Instant)>() + 1)
            + self.queue.capacity() * size_of::<(Instant, Slot, Box<[SequenceHash]>)>()
            + self
                .queue
                .iter()
                .map(|(_, _, hashes)| hashes.len() * size_of::<SequenceHash>())
                .sum::<usize>()
    }
}
