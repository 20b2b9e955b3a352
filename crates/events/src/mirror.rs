//! A publisher's copy of its own cache state, so it can resend the full state when asked.

use kvroute_protocol::{
    BlockExtraInfo, BlockHash, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData,
    SequenceHash,
};
use rustc_hash::{FxHashMap, FxHashSet};
use std::collections::hash_map::Entry;

/// The most blocks one resent store holds, so no event outgrows a message.
const MAX_CHAIN_BLOCKS: usize = 256;

/// One stored block: 40 bytes, as the log is written for every block a worker stores.
#[derive(Clone, Debug)]
struct Block {
    hash: SequenceHash,
    /// The block before it in its chain, if `has_parent`.
    parent: SequenceHash,
    tokens_hash: BlockHash,
    /// Boxed: most blocks have none, and `None` then costs one word.
    mm_extra_info: Option<Box<BlockExtraInfo>>,
    has_parent: bool,
    /// False once removed: the entry waits for [`Mirror::compact`].
    held: bool,
}

impl Block {
    fn parent(&self) -> Option<SequenceHash> {
        self.has_parent.then_some(self.parent)
    }
}

/// The blocks one (worker, dp rank) holds, with the same acceptance rules as the index (a
/// store under an unknown parent is skipped whole), in the order they were stored.
///
/// Every publish goes through [`Mirror::apply`], so it is on the worker's hot path (it was a
/// third of the NATS benchmark's CPU with a SipHash map of blocks and a BTreeMap of orders).
/// Blocks are appended to a log in store order; a small Fx map (the keys are hashes already)
/// gives each held block's position. Removed blocks stay in the log, marked, until they
/// outnumber the held ones.
#[derive(Clone, Debug, Default)]
pub(crate) struct Mirror {
    /// Where each held block sits in `log`.
    positions: FxHashMap<SequenceHash, usize>,
    /// Stored blocks in store order, including removed ones not yet compacted away.
    log: Vec<Block>,
}

impl Mirror {
    /// Applies one event.
    pub(crate) fn apply(&mut self, data: &KvCacheEventData) {
        match data {
            KvCacheEventData::Stored(store) => {
                let known_parent = store
                    .parent_hash
                    .is_none_or(|p| self.positions.contains_key(&p));
                let self_referencing = store
                    .parent_hash
                    .is_some_and(|p| store.blocks.iter().any(|b| b.block_hash == p));
                if !known_parent || self_referencing {
                    return;
                }
                self.positions.reserve(store.blocks.len());
                let mut parent = store.parent_hash;
                for block in &store.blocks {
                    let position = self.log.len();
                    if let Entry::Vacant(entry) = self.positions.entry(block.block_hash) {
                        entry.insert(position);
                        self.log.push(Block {
                            hash: block.block_hash,
                            parent: parent.unwrap_or_default(),
                            tokens_hash: block.tokens_hash,
                            mm_extra_info: block.mm_extra_info.clone().map(Box::new),
                            has_parent: parent.is_some(),
                            held: true,
                        });
                    }
                    parent = Some(block.block_hash);
                }
            }
            KvCacheEventData::Removed(removed) => {
                for hash in &removed.block_hashes {
                    if let Some(position) = self.positions.remove(hash) {
                        self.log[position].held = false;
                    }
                }
                if self.log.len() > 2 * self.positions.len() + 1024 {
                    self.compact();
                }
            }
            KvCacheEventData::Cleared => *self = Self::default(),
        }
    }

    /// A held block.
    fn get(&self, hash: SequenceHash) -> Option<&Block> {
        self.positions
            .get(&hash)
            .map(|&position| &self.log[position])
    }

    /// The blocks held, in the order they were stored.
    fn held(&self) -> impl Iterator<Item = &Block> + '_ {
        self.log.iter().filter(|block| block.held)
    }

    /// Drops removed blocks from the log.
    fn compact(&mut self) {
        self.log.retain(|block| block.held);
        for (position, block) in self.log.iter().enumerate() {
            if let Some(slot) = self.positions.get_mut(&block.hash) {
                *slot = position;
            }
        }
    }

    /// Number of blocks held.
    pub(crate) fn len(&self) -> usize {
        self.positions.len()
    }

    /// The state as stores that rebuild it from nothing: chains of consecutive blocks, each
    /// block after its parent; a block whose parent was evicted starts a chain of its own.
    pub(crate) fn full_state(&self) -> Vec<KvCacheStoreData> {
        let mut chains: Vec<KvCacheStoreData> = Vec::new();
        let mut emitted = FxHashSet::default();
        emitted.reserve(self.len());
        // Blocks already in `chains`: a parent not yet written (only possible when a faulty
        // engine's hashes form a cycle) is not named, so no store names an unstored parent.
        let mut written = FxHashSet::default();
        written.reserve(self.len());
        let mut lineage = Vec::new();
        for hash in self.held().map(|block| block.hash) {
            // Collect the not yet emitted ancestors, then emit them oldest first.
            let mut cursor = Some(hash);
            while let Some(current) = cursor.filter(|&h| self.positions.contains_key(&h)) {
                if !emitted.insert(current) {
                    break;
                }
                lineage.push(current);
                cursor = self.get(current).and_then(Block::parent);
            }
            while let Some(current) = lineage.pop() {
                let Some(block) = self.get(current) else {
                    continue;
                };
                let data = KvCacheStoredBlockData {
                    block_hash: current,
                    tokens_hash: block.tokens_hash,
                    mm_extra_info: block.mm_extra_info.as_deref().cloned(),
                };
                let parent = block.parent().filter(|p| written.contains(p));
                written.insert(current);
                match chains.last_mut() {
                    Some(chain)
                        if parent.is_some()
                            && chain.blocks.len() < MAX_CHAIN_BLOCKS
                            && chain.blocks.last().map(|b| b.block_hash) == parent =>
                    {
                        chain.blocks.push(data)
                    }
                    _ => chains.push(KvCacheStoreData {
                        parent_hash: parent,
                        start_position: None,
                        blocks: vec![data],
                    }),
                }
            }
        }
        chains
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use kvroute_protocol::KvCacheRemoveData;

    fn stored(parent: Option<u64>, blocks: &[u64]) -> KvCacheEventData {
        KvCacheEventData::Stored(KvCacheStoreData {
            parent_hash: parent.map(SequenceHash),
            start_position: None,
            blocks: blocks
                .iter()
                .map(|&h| KvCacheStoredBlockData {
                    block_hash: SequenceHash(h),
                    tokens_hash: BlockHash(h + 1000),
                    // Every third block holds an image.
                    mm_extra_info: (h % 3 == 0).then(|| BlockExtraInfo {
                        mm_objects: vec![kvroute_protocol::BlockMmObjectInfo {
                            mm_hash: kvroute_protocol::MediaId(h),
                            offsets: vec![(0, 4)],
                        }],
                    }),
                })
                .collect(),
        })
    }

    fn removed(blocks: &[u64]) -> KvCacheEventData {
        KvCacheEventData::Removed(KvCacheRemoveData {
            block_hashes: blocks.iter().copied().map(SequenceHash).collect(),
        })
    }

    fn shape(chains: &[KvCacheStoreData]) -> Vec<(Option<u64>, Vec<u64>)> {
        chains
            .iter()
            .map(|c| {
                (
                    c.parent_hash.map(|p| p.0),
                    c.blocks.iter().map(|b| b.block_hash.0).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn full_state_rebuilds_chains_parents_first() {
        let mut mirror = Mirror::default();
        mirror.apply(&stored(None, &[1, 2, 3]));
        mirror.apply(&stored(Some(2), &[4, 5]));
        mirror.apply(&stored(Some(9), &[6])); // unknown parent: skipped, like the index
        mirror.apply(&removed(&[1]));
        assert_eq!(
            shape(&mirror.full_state()),
            vec![(None, vec![2, 3]), (Some(2), vec![4, 5])]
        );
        mirror.apply(&stored(None, &[1])); // re-stored after its children: emitted before them
        assert_eq!(mirror.len(), 5);
        assert_eq!(
            shape(&mirror.full_state()),
            vec![(None, vec![1, 2, 3]), (Some(2), vec![4, 5])]
        );
        mirror.apply(&KvCacheEventData::Cleared);
        assert!(mirror.full_state().is_empty());

        let long: Vec<u64> = (100..700).collect();
        mirror.apply(&stored(None, &long));
        let chains = mirror.full_state();
        let lengths: Vec<usize> = chains.iter().map(|c| c.blocks.len()).collect();
        assert_eq!(lengths, vec![256, 256, 88]);
        assert_eq!(chains[1].parent_hash, Some(SequenceHash(355)));
    }

    /// The mirror as it was first written: every held block in a list in store order.
    #[derive(Default)]
    struct Reference {
        held: Vec<(SequenceHash, Option<SequenceHash>)>,
    }

    impl Reference {
        fn holds(&self, hash: SequenceHash) -> bool {
            self.held.iter().any(|&(h, _)| h == hash)
        }

        fn apply(&mut self, data: &KvCacheEventData) {
            match data {
                KvCacheEventData::Stored(store) => {
                    let parent_ok = store.parent_hash.is_none_or(|p| self.holds(p))
                        && !store
                            .blocks
                            .iter()
                            .any(|b| Some(b.block_hash) == store.parent_hash);
                    if !parent_ok {
                        return;
                    }
                    let mut parent = store.parent_hash;
                    for block in &store.blocks {
                        if !self.holds(block.block_hash) {
                            self.held.push((block.block_hash, parent));
                        }
                        parent = Some(block.block_hash);
                    }
                }
                KvCacheEventData::Removed(removed) => {
                    self.held.retain(|(h, _)| !removed.block_hashes.contains(h))
                }
                KvCacheEventData::Cleared => self.held.clear(),
            }
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        Store(Option<u64>, Vec<u64>),
        Remove(Vec<u64>),
        Clear,
        Compact,
    }

    fn op() -> impl Strategy<Value = Op> {
        let hash = 0..24u64;
        prop_oneof![
            8 => (proptest::option::of(hash.clone()), proptest::collection::vec(hash.clone(), 0..6))
                .prop_map(|(p, b)| Op::Store(p, b)),
            4 => proptest::collection::vec(hash, 0..4).prop_map(Op::Remove),
            1 => Just(Op::Clear),
            2 => Just(Op::Compact),
        ]
    }

    use proptest::prelude::*;

    proptest! {
        #[test]
        fn matches_the_reference_model(ops in proptest::collection::vec(op(), 0..80)) {
            let mut mirror = Mirror::default();
            let mut reference = Reference::default();
            for op in ops {
                let data = match op {
                    Op::Store(parent, blocks) => stored(parent, &blocks),
                    Op::Remove(blocks) => removed(&blocks),
                    Op::Clear => KvCacheEventData::Cleared,
                    Op::Compact => {
                        mirror.compact();
                        continue;
                    }
                };
                mirror.apply(&data);
                reference.apply(&data);
                let held: Vec<SequenceHash> = mirror.held().map(|b| b.hash).collect();
                let expected: Vec<SequenceHash> = reference.held.iter().map(|&(h, _)| h).collect();
                prop_assert_eq!(held, expected);
                for &(hash, parent) in &reference.held {
                    prop_assert_eq!(mirror.get(hash).unwrap().parent(), parent);
                }
            }
            // The full state rebuilds the same blocks from nothing.
            let mut rebuilt = Mirror::default();
            for chain in mirror.full_state() {
                rebuilt.apply(&KvCacheEventData::Stored(chain));
            }
            for block in mirror.held() {
                let again = rebuilt.get(block.hash).unwrap();
                prop_assert_eq!(again.tokens_hash, block.tokens_hash);
                prop_assert_eq!(&again.mm_extra_info, &block.mm_extra_info);
            }
            let mut blocks: Vec<SequenceHash> = mirror.positions.keys().copied().collect();
            let mut again: Vec<SequenceHash> = rebuilt.positions.keys().copied().collect();
            blocks.sort_unstable();
            again.sort_unstable();
            prop_assert_eq!(again, blocks);
        }
    }
}
