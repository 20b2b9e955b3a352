//! A publisher's copy of its own cache state, so it can resend the full state when asked.

use kvroute_protocol::{
    BlockExtraInfo, BlockHash, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData,
    SequenceHash,
};
use std::collections::{BTreeMap, HashMap, HashSet};

/// The most blocks one resent store holds, so no event outgrows a message.
const MAX_CHAIN_BLOCKS: usize = 256;

#[derive(Clone, Debug)]
struct Block {
    parent: Option<SequenceHash>,
    tokens_hash: BlockHash,
    mm_extra_info: Option<BlockExtraInfo>,
    order: u64,
}

/// The blocks one (worker, dp rank) holds, with the same acceptance rules as the index (a
/// store under an unknown parent is skipped whole), in the order they were stored.
#[derive(Clone, Debug, Default)]
pub(crate) struct Mirror {
    blocks: HashMap<SequenceHash, Block>,
    order: BTreeMap<u64, SequenceHash>,
    next_order: u64,
}

impl Mirror {
    /// Applies one event.
    pub(crate) fn apply(&mut self, data: &KvCacheEventData) {
        match data {
            KvCacheEventData::Stored(store) => {
                let known_parent = store
                    .parent_hash
                    .is_none_or(|p| self.blocks.contains_key(&p));
                let self_referencing = store
                    .parent_hash
                    .is_some_and(|p| store.blocks.iter().any(|b| b.block_hash == p));
                if !known_parent || self_referencing {
                    return;
                }
                let mut parent = store.parent_hash;
                for block in &store.blocks {
                    if !self.blocks.contains_key(&block.block_hash) {
                        let order = self.next_order;
                        self.next_order += 1;
                        self.order.insert(order, block.block_hash);
                        self.blocks.insert(
                            block.block_hash,
                            Block {
                                parent,
                                tokens_hash: block.tokens_hash,
                                mm_extra_info: block.mm_extra_info.clone(),
                                order,
                            },
                        );
                    }
                    parent = Some(block.block_hash);
                }
            }
            KvCacheEventData::Removed(removed) => {
                for hash in &removed.block_hashes {
                    if let Some(block) = self.blocks.remove(hash) {
                        self.order.remove(&block.order);
                    }
                }
            }
            KvCacheEventData::Cleared => *self = Self::default(),
        }
    }

    /// Number of blocks held.
    pub(crate) fn len(&self) -> usize {
        self.blocks.len()
    }

    /// The state as stores that rebuild it from nothing: chains of consecutive blocks, each
    /// block after its parent; a block whose parent was evicted starts a chain of its own.
    pub(crate) fn full_state(&self) -> Vec<KvCacheStoreData> {
        let mut chains: Vec<KvCacheStoreData> = Vec::new();
        let mut emitted: HashSet<SequenceHash> = HashSet::with_capacity(self.blocks.len());
        let mut lineage = Vec::new();
        for &hash in self.order.values() {
            // Collect the not yet emitted ancestors, then emit them oldest first.
            let mut cursor = Some(hash);
            while let Some(current) = cursor.filter(|h| self.blocks.contains_key(h)) {
                if !emitted.insert(current) {
                    break;
                }
                lineage.push(current);
                cursor = self.blocks.get(&current).and_then(|b| b.parent);
            }
            while let Some(current) = lineage.pop() {
                let Some(block) = self.blocks.get(&current) else {
                    continue;
                };
                let data = KvCacheStoredBlockData {
                    block_hash: current,
                    tokens_hash: block.tokens_hash,
                    mm_extra_info: block.mm_extra_info.clone(),
                };
                let parent = block.parent.filter(|p| self.blocks.contains_key(p));
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
                    mm_extra_info: None,
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
}
