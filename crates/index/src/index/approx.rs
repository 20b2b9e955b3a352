//! Approximate mode: blocks the router sent to a cache that publishes no events, assumed
//! cached until a deadline.

use super::{Index, Slot};
use crate::map::table_bytes;
use crate::WorkerKey;
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
        table_bytes::<((Slot, SequenceHash), Instant)>(self.deadlines.capacity())
            + self.queue.capacity() * size_of::<(Instant, Slot, Box<[SequenceHash]>)>()
            + self
                .queue
                .iter()
                .map(|(_, _, hashes)| hashes.len() * size_of::<SequenceHash>())
                .sum::<usize>()
    }
}

impl Index {
    /// Records that the router sent a request with these blocks to `worker`, for a cache that
    /// publishes no events (approximate mode). The blocks count as held until
    /// [`IndexConfig::routed_ttl`](crate::IndexConfig::routed_ttl) after `now` (recording them
    /// again extends that), and are dropped by [`Index::expire_routed`]. Such a cache is left
    /// out of snapshots.
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
}
