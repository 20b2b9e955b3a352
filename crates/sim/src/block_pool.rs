//! The worker's side of the blocks a router's index mirrors: one engine's KV block pool, and
//! the KV events it publishes when the pool changes.

use kvroute_protocol::{
    KvCacheEventData, KvCacheRemoveData, KvCacheStoreData, KvCacheStoredBlockData, SequenceHash,
};
use std::collections::{BTreeMap, HashMap};
use std::ops::Range;

/// The blocks one worker holds, with least-recently-used eviction as in vLLM's prefix cache:
/// a prompt's blocks are used from last to first, so that a prefix outlives its continuations.
///
/// Blocks are keyed as the engine hashes them (tokens and media). Each also carries the key a
/// router's index knows it by: the same key for a media-aware router, a hash of the text alone
/// for a router that ignores media. Several engine blocks can share one router key, so the pool
/// counts them to tell when a router key appears and when it is gone.
///
/// ```
/// use kvroute_sim::BlockPool;
/// use kvroute_protocol::SequenceHash;
///
/// let keys = |ids: &[u64]| ids.iter().copied().map(SequenceHash).collect::<Vec<_>>();
/// let mut pool = BlockPool::new(Some(3));
/// let first = pool.store(&keys(&[1, 2]), &keys(&[1, 2]));
/// assert_eq!(first.stored[0].blocks, 0..2);
/// // A continuation of the same prefix: only block 3 is new.
/// assert_eq!(pool.lookup(&keys(&[1, 2, 3])), 2);
/// let second = pool.store(&keys(&[1, 2, 3]), &keys(&[1, 2, 3]));
/// assert_eq!((second.stored[0].parent, second.stored[0].blocks.clone()), (Some(SequenceHash(2)), 2..3));
/// // Another prompt evicts the least recently used block: the continuation, not the prefix.
/// let other = pool.store(&keys(&[9]), &keys(&[9]));
/// assert_eq!(other.removed, keys(&[3]));
/// ```
#[derive(Debug, Default)]
pub struct BlockPool {
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

/// What [`BlockPool::store`] changed, in router keys: the events the engine would publish.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolChanges {
    /// Runs of consecutive blocks whose router keys are new to this worker, in prompt order.
    pub stored: Vec<StoredRun>,
    /// Router keys that no block of this worker carries any more.
    pub removed: Vec<SequenceHash>,
}

/// Consecutive blocks of a stored prompt whose router keys are new to the worker.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StoredRun {
    /// The router key of the block before the run (`None` at the start of the prompt).
    pub parent: Option<SequenceHash>,
    /// Positions of the run's blocks in the keys given to [`BlockPool::store`].
    pub blocks: Range<usize>,
}

impl PoolChanges {
    /// The KV events an engine publishes for these changes: one `stored` event per run, under
    /// its parent, then one `removed` event if any router key left. `block` describes the
    /// stored block at a position of the keys given to [`BlockPool::store`] (`None` leaves it
    /// out of its event).
    ///
    /// ```
    /// use kvroute_protocol::{BlockHash, KvCacheEventData, KvCacheStoredBlockData, SequenceHash};
    /// use kvroute_sim::BlockPool;
    ///
    /// let keys: Vec<SequenceHash> = [1, 2].into_iter().map(SequenceHash).collect();
    /// let mut pool = BlockPool::new(None);
    /// let events = pool.store(&keys, &keys).into_events(|i| {
    ///     Some(KvCacheStoredBlockData {
    ///         block_hash: keys[i],
    ///         tokens_hash: BlockHash(keys[i].get()),
    ///         mm_extra_info: None,
    ///     })
    /// });
    /// assert!(matches!(&events[..], [KvCacheEventData::Stored(s)] if s.blocks.len() == 2));
    /// ```
    pub fn into_events(
        self,
        block: impl Fn(usize) -> Option<KvCacheStoredBlockData>,
    ) -> Vec<KvCacheEventData> {
        let mut events: Vec<KvCacheEventData> = self
            .stored
            .into_iter()
            .map(|run| {
                KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: run.parent,
                    start_position: None,
                    blocks: run.blocks.filter_map(&block).collect(),
                })
            })
            .collect();
        if !self.removed.is_empty() {
            events.push(KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: self.removed,
            }));
        }
        events
    }
}

impl BlockPool {
    /// A pool of `capacity` blocks (`None`: it never evicts).
    pub fn new(capacity: Option<usize>) -> Self {
        Self {
            capacity,
            ..Self::default()
        }
    }

    /// How many leading blocks of `keys` the pool holds; they become the most recently used.
    pub fn lookup(&mut self, keys: &[SequenceHash]) -> usize {
        let cached = keys
            .iter()
            .take_while(|k| self.blocks.contains_key(k))
            .count();
        for key in keys[..cached].iter().rev() {
            if let Some(held) = self.blocks.get_mut(key) {
                self.clock += 1;
                self.by_age.remove(&held.stamp);
                held.stamp = self.clock;
                self.by_age.insert(self.clock, *key);
            }
        }
        cached
    }

    /// Stores a prefilled prompt: `keys` as the engine hashes them, `router_keys` as the router
    /// does (the same length; extra keys of either are ignored). Blocks past the capacity are
    /// not stored; the least recently used blocks of other prompts are evicted to make room.
    pub fn store(&mut self, keys: &[SequenceHash], router_keys: &[SequenceHash]) -> PoolChanges {
        let len = keys.len().min(router_keys.len());
        let wanted = self.capacity.map_or(len, |c| len.min(c));
        // Runs of blocks new to the router, found walking backwards: positions end..start.
        let mut runs: Vec<Range<usize>> = Vec::new();
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
                        Some(run) if run.start == i + 1 => run.start = i,
                        _ => runs.push(i..i + 1),
                    }
                }
            }
            self.by_age.insert(stamp, key);
        }
        let stored = runs
            .into_iter()
            .rev()
            .map(|blocks| StoredRun {
                parent: blocks.start.checked_sub(1).map(|p| router_keys[p]),
                blocks,
            })
            .collect();
        let mut removed = Vec::new();
        if let Some(capacity) = self.capacity {
            while self.blocks.len() > capacity {
                let Some((_, victim)) = self.by_age.pop_first() else {
                    break;
                };
                let Some(held) = self.blocks.remove(&victim) else {
                    continue;
                };
                if let Some(refs) = self.router_refs.get_mut(&held.router_key) {
                    *refs -= 1;
                    if *refs == 0 {
                        self.router_refs.remove(&held.router_key);
                        removed.push(held.router_key);
                    }
                }
            }
        }
        PoolChanges { stored, removed }
    }

    /// Blocks held.
    pub fn len(&self) -> usize {
        self.blocks.len()
    }

    /// Whether the pool holds no block.
    pub fn is_empty(&self) -> bool {
        self.blocks.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn keys(ids: &[u64]) -> Vec<SequenceHash> {
        ids.iter().copied().map(SequenceHash).collect()
    }

    fn run(parent: Option<u64>, blocks: Range<usize>) -> StoredRun {
        StoredRun {
            parent: parent.map(SequenceHash),
            blocks,
        }
    }

    #[test]
    fn stores_report_new_runs_with_their_parent() {
        let mut pool = BlockPool::new(None);
        let first = pool.store(&keys(&[1, 2, 3]), &keys(&[1, 2, 3]));
        assert_eq!(first.stored, [run(None, 0..3)]);
        let second = pool.store(&keys(&[1, 2, 4, 5]), &keys(&[1, 2, 4, 5]));
        assert_eq!(second.stored, [run(Some(2), 2..4)]);
        assert_eq!(pool.lookup(&keys(&[1, 2, 4, 9])), 3);
        // A block held in the middle of a prompt splits its new blocks into two runs.
        let third = pool.store(&keys(&[6, 4, 7]), &keys(&[6, 4, 7]));
        assert_eq!(third.stored, [run(None, 0..1), run(Some(4), 2..3)]);
    }

    #[test]
    fn least_recently_used_blocks_go_first_and_prefixes_last() {
        let mut pool = BlockPool::new(Some(4));
        pool.store(&keys(&[1, 2]), &keys(&[1, 2]));
        pool.store(&keys(&[3, 4]), &keys(&[3, 4]));
        assert_eq!(pool.lookup(&keys(&[1, 2])), 2);
        let changes = pool.store(&keys(&[5]), &keys(&[5]));
        // 3 and 4 are the oldest; 4 (the continuation) goes before 3.
        assert_eq!(changes.removed, keys(&[4]));
        assert_eq!(pool.len(), 4);
        assert_eq!(pool.lookup(&keys(&[3, 4])), 1);
    }

    #[test]
    fn router_keys_shared_by_several_blocks_leave_with_the_last() {
        let mut pool = BlockPool::new(Some(2));
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
        let mut pool = BlockPool::new(Some(2));
        let changes = pool.store(&keys(&[1, 2, 3]), &keys(&[1, 2, 3]));
        assert_eq!(changes.stored, [run(None, 0..2)]);
        assert_eq!(pool.len(), 2);
    }

    proptest! {
        /// Against a reference model: a vector ordered from least to most recently used.
        #[test]
        fn matches_a_reference_lru(
            capacity in 1usize..6,
            prompts in proptest::collection::vec(proptest::collection::vec(0u64..4, 1..5), 1..30),
        ) {
            let mut pool = BlockPool::new(Some(capacity));
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
                let before = model.clone();
                let changes = pool.store(&ks, &ks);
                for k in chained[..chained.len().min(capacity)].iter().rev() {
                    model.retain(|m| m != k);
                    model.push(*k);
                }
                let mut evicted = Vec::new();
                while model.len() > capacity {
                    evicted.push(model.remove(0));
                }
                prop_assert_eq!(pool.len(), model.len());
                for k in &model {
                    prop_assert!(pool.blocks.contains_key(&SequenceHash(*k)));
                }
                // The runs reported are exactly the blocks that were not held before.
                let new: Vec<usize> = (0..chained.len().min(capacity))
                    .filter(|&i| !before.contains(&chained[i]) && !chained[..i].contains(&chained[i]))
                    .collect();
                let reported: Vec<usize> = changes.stored.iter().flat_map(|r| r.blocks.clone()).collect();
                prop_assert_eq!(reported, new);
                prop_assert_eq!(changes.removed, keys(&evicted));
            }
        }
    }
}
