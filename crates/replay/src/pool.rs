//! A simulated worker's KV block pool: least-recently-used eviction, and the keys the router
//! knows each block by.

use kvroute_protocol::SequenceHash;
use std::collections::{BTreeMap, HashMap};

/// The blocks one worker holds, keyed as the engine hashes them (tokens and media). Each block
/// also carries the key the router's index knows it by (the same key for a media-aware router,
/// a text-only hash otherwise); several engine blocks can share one router key, so the pool
/// counts them to tell when the router's key appears and disappears.
#[derive(Debug, Default)]
pub(crate) struct Pool {
    capacity: Option<usize>,
    clock: u64,
    blocks: HashMap<SequenceHash, Held>,
    by_age: BTreeMap<u64, SequenceHash>,
    router_refs: HashMap<SequenceHash, u32>,
}

#[derive(Debug, Clone, Copy)]
struct Held {
    stamp: u64,
    router_key: SequenceHash,
}

/// What storing a request's blocks changed, in the router's keys.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct StoreOutcome {
    /// Runs of consecutive blocks the router did not know on this worker: (parent, blocks).
    pub stored: Vec<(Option<SequenceHash>, Vec<SequenceHash>)>,
    /// Router keys no block of this worker carries any more.
    pub removed: Vec<SequenceHash>,
}

impl Pool {
    /// A pool of `capacity` blocks (`None`: never evicts).
    pub fn new(capacity: Option<usize>) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// Leading blocks of `keys` held; they become the most recently used.
    pub fn lookup(&mut self, keys: &[SequenceHash]) -> usize {
        let cached = keys
            .iter()
            .take_while(|k| self.blocks.contains_key(k))
            .count();
        // Later blocks first, so that a prefix outlives its continuations.
        for key in keys[..cached].iter().rev() {
            self.touch(*key);
        }
        cached
    }

    fn touch(&mut self, key: SequenceHash) {
        if let Some(held) = self.blocks.get_mut(&key) {
            self.clock += 1;
            self.by_age.remove(&held.stamp);
            held.stamp = self.clock;
            self.by_age.insert(self.clock, key);
        }
    }

    /// Stores a prefilled prompt: `keys` as the engine hashes them, `router_keys` as the
    /// router does (same length). Blocks past the capacity are not stored; least recently used
    /// blocks of other prompts are evicted to make room.
    pub fn store(&mut self, keys: &[SequenceHash], router_keys: &[SequenceHash]) -> StoreOutcome {
        let wanted = self.capacity.map_or(keys.len(), |c| keys.len().min(c));
        let mut outcome = StoreOutcome::default();
        // Runs of blocks new to the router, found walking backwards: (first index, blocks
        // from last to first).
        let mut runs: Vec<(usize, Vec<SequenceHash>)> = Vec::new();
        for i in (0..wanted).rev() {
            let (key, router_key) = (keys[i], router_keys[i]);
            self.clock += 1;
            let stamp = self.clock;
            if let Some(held) = self.blocks.get_mut(&key) {
                self.by_age.remove(&held.stamp);
                held.stamp = stamp;
            } else {
                self.blocks.insert(key, Held { stamp, router_key });
                let refs = self.router_refs.entry(router_key).or_insert(0);
                *refs += 1;
                if *refs == 1 {
                    match runs.last_mut() {
                        Some((first, blocks)) if *first == i + 1 => {
                            *first = i;
                            blocks.push(router_key);
                        }
                        _ => runs.push((i, vec![router_key])),
                    }
                }
            }
            self.by_age.insert(stamp, key);
        }
        outcome.stored = runs
            .into_iter()
            .rev()
            .map(|(first, mut blocks)| {
                blocks.reverse();
                (first.checked_sub(1).map(|p| router_keys[p]), blocks)
            })
            .collect();
        if let Some(capacity) = self.capacity {
            while self.blocks.len() > capacity {
                let Some((_, victim)) = self.by_age.pop_first() else {
                    break;
                };
                if let Some(held) = self.blocks.remove(&victim) {
                    if let Some(refs) = self.router_refs.get_mut(&held.router_key) {
                        *refs -= 1;
                        if *refs == 0 {
                            self.router_refs.remove(&held.router_key);
                            outcome.removed.push(held.router_key);
                        }
                    }
                }
            }
        }
        outcome
    }

    /// Blocks held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.blocks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(ids: &[u64]) -> Vec<SequenceHash> {
        ids.iter().copied().map(SequenceHash).collect()
    }

    #[test]
    fn stores_report_new_runs_with_their_parent() {
        let mut pool = Pool::new(None);
        let first = pool.store(&keys(&[1, 2, 3]), &keys(&[1, 2, 3]));
        assert_eq!(first.stored, [(None, keys(&[1, 2, 3]))]);
        let second = pool.store(&keys(&[1, 2, 4, 5]), &keys(&[1, 2, 4, 5]));
        assert_eq!(second.stored, [(Some(SequenceHash(2)), keys(&[4, 5]))]);
        assert_eq!(pool.lookup(&keys(&[1, 2, 4, 9])), 3);
    }

    #[test]
    fn least_recently_used_blocks_go_first_and_prefixes_last() {
        let mut pool = Pool::new(Some(4));
        pool.store(&keys(&[1, 2]), &keys(&[1, 2]));
        pool.store(&keys(&[3, 4]), &keys(&[3, 4]));
        assert_eq!(pool.lookup(&keys(&[1, 2])), 2);
        let outcome = pool.store(&keys(&[5]), &keys(&[5]));
        // 3 and 4 are the oldest; 4 (the continuation) goes before 3.
        assert_eq!(outcome.removed, keys(&[4]));
        assert_eq!(pool.len(), 4);
        assert_eq!(pool.lookup(&keys(&[3, 4])), 1);
    }

    #[test]
    fn router_keys_shared_by_several_blocks_leave_with_the_last() {
        let mut pool = Pool::new(Some(2));
        // Two images, same text: engine keys 10 and 11, router key 7 for both.
        let a = pool.store(&keys(&[10]), &keys(&[7]));
        assert_eq!(a.stored.len(), 1);
        let b = pool.store(&keys(&[11]), &keys(&[7]));
        assert!(b.stored.is_empty());
        let c = pool.store(&keys(&[12]), &keys(&[8]));
        assert!(
            c.removed.is_empty(),
            "router key 7 is still held by block 11"
        );
        let d = pool.store(&keys(&[13]), &keys(&[9]));
        assert_eq!(d.removed, keys(&[7]));
    }

    #[test]
    fn prompts_longer_than_the_pool_keep_their_prefix() {
        let mut pool = Pool::new(Some(2));
        let outcome = pool.store(&keys(&[1, 2, 3]), &keys(&[1, 2, 3]));
        assert_eq!(outcome.stored, [(None, keys(&[1, 2]))]);
        assert_eq!(pool.len(), 2);
    }

    proptest! {
        /// Against a reference model: a vector ordered from least to most recently used.
        #[test]
        fn matches_a_reference_lru(
            capacity in 1usize..6,
            prompts in proptest::collection::vec(proptest::collection::vec(0u64..4, 1..5), 1..30),
        ) {
            let mut pool = Pool::new(Some(capacity));
            let mut model: Vec<u64> = Vec::new();
            for prompt in prompts {
                // Prefix-chained keys, as sequence hashes are.
                let chained: Vec<u64> = prompt
                    .iter()
                    .scan(0u64, |acc, &b| { *acc = acc.wrapping_mul(31).wrapping_add(b + 1); Some(*acc) })
                    .collect();
                let ks = keys(&chained);
                let cached = chained.iter().take_while(|k| model.contains(k)).count();
                prop_assert_eq!(pool.lookup(&ks), cached);
                for k in chained[..cached].iter().rev() {
                    model.retain(|m| m != k);
                    model.push(*k);
                }
                pool.store(&ks, &ks);
                for k in chained[..chained.len().min(capacity)].iter().rev() {
                    model.retain(|m| m != k);
                    model.push(*k);
                }
                while model.len() > capacity {
                    model.remove(0);
                }
                prop_assert_eq!(pool.len(), model.len());
                for k in &model {
                    prop_assert!(pool.blocks.contains_key(&SequenceHash(*k)));
                }
            }
        }
    }
}
