//! The block map, split into shards by hash so that growing it rehashes one small table at a
//! time (a 1M-entry table rehashed at once thrashes the cache: it was a quarter of apply time).

use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::mem::size_of;

const SHARD_BITS: u32 = 6;

/// A hash map from 64-bit hashes, sharded by the key's mixed high bits.
#[derive(Debug)]
pub(crate) struct ShardedMap<K, V> {
    shards: Vec<FxHashMap<K, V>>,
}

impl<K: Copy + Eq + Hash + Into<u64>, V> ShardedMap<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..1 << SHARD_BITS).map(|_| FxHashMap::default()).collect(),
        }
    }

    #[inline]
    fn shard(&self, key: K) -> usize {
        // Mixed, so that small or patterned keys still spread over the shards.
        (key.into().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize
    }

    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard(*key)].get(key)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let shard = self.shard(*key);
        self.shards[shard].get_mut(key)
    }

    /// The shard of `key`, with room for one more entry. A full shard grows fourfold rather
    /// than twofold: a third of the rehashing while the index fills, for some capacity slack.
    #[inline]
    fn shard_for_insert(&mut self, key: K) -> &mut FxHashMap<K, V> {
        let index = self.shard(key);
        let shard = &mut self.shards[index];
        if shard.len() == shard.capacity() {
            shard.reserve(3 * shard.len().max(4));
        }
        shard
    }

    #[inline]
    pub(crate) fn entry(&mut self, key: K) -> Entry<'_, K, V> {
        self.shard_for_insert(key).entry(key)
    }

    pub(crate) fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.shard_for_insert(key).insert(key, value)
    }

    pub(crate) fn remove(&mut self, key: &K) -> Option<V> {
        let shard = self.shard(*key);
        self.shards[shard].remove(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(FxHashMap::len).sum()
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.shards.iter_mut().for_each(FxHashMap::shrink_to_fit);
    }

    /// Heap bytes, counting hashbrown's control byte per bucket.
    pub(crate) fn bytes(&self) -> usize {
        self.shards.capacity() * size_of::<FxHashMap<K, V>>()
            + self
                .shards
                .iter()
                .map(|s| s.capacity() * (size_of::<(K, V)>() + 1))
                .sum::<usize>()
    }
}
