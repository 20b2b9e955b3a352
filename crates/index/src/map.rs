//! The block map, split into shards by hash so that growing it rehashes one small table at a
//! time (a 1M-entry table rehashed at once thrashes the cache).
//!
//! Keys are spread evenly, so shards that grew at the same fill would all double at the same
//! moment, and memory per entry would step at that size. Instead each shard doubles at its own
//! fill, from half full to full, spaced evenly on a log scale over the shards: at any size a
//! few shards have just doubled, so the map's bytes per key do not depend on where the size
//! falls between powers of two (about 28 with 16-byte entries; curves in docs/benchmarks.md).

use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::hash::Hash;
use std::mem::size_of;

const SHARD_BITS: u32 = 6;
const SHARDS: usize = 1 << SHARD_BITS;

/// A hash map from 64-bit hashes, sharded by the key's mixed high bits.
#[derive(Debug)]
pub(crate) struct ShardedMap<K, V> {
    shards: Vec<Shard<K, V>>,
}

#[derive(Debug)]
struct Shard<K, V> {
    map: FxHashMap<K, V>,
    /// The shard doubles once it holds this fraction of its capacity, in 1/65536ths.
    grow_at: u64,
}

impl<K: Copy + Eq + Hash + Into<u64>, V> ShardedMap<K, V> {
    pub(crate) fn new() -> Self {
        Self {
            shards: (0..SHARDS)
                .map(|i| Shard {
                    map: FxHashMap::default(),
                    grow_at: (65536.0 * (-(i as f64) / SHARDS as f64).exp2()) as u64,
                })
                .collect(),
        }
    }

    #[inline]
    fn shard(&self, key: K) -> usize {
        // Mixed, so that small or patterned keys still spread over the shards.
        (key.into().wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - SHARD_BITS)) as usize
    }

    #[inline]
    pub(crate) fn get(&self, key: &K) -> Option<&V> {
        self.shards[self.shard(*key)].map.get(key)
    }

    #[inline]
    pub(crate) fn get_mut(&mut self, key: &K) -> Option<&mut V> {
        let shard = self.shard(*key);
        self.shards[shard].map.get_mut(key)
    }

    /// The shard of `key`, with room for one more entry: doubled first if it reached its fill.
    #[inline]
    fn shard_for_insert(&mut self, key: K) -> &mut FxHashMap<K, V> {
        let index = self.shard(key);
        let Shard { map, grow_at } = &mut self.shards[index];
        let (len, capacity) = (map.len(), map.capacity());
        if ((len as u64) << 16) >= capacity as u64 * *grow_at {
            // Asks for one more than the capacity: hashbrown doubles its buckets.
            map.reserve(capacity + 1 - len);
        }
        map
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
        self.shards[shard].map.remove(key)
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.map.len()).sum()
    }

    pub(crate) fn shrink_to_fit(&mut self) {
        self.shards.iter_mut().for_each(|s| s.map.shrink_to_fit());
    }

    /// Heap bytes, as the allocator counts them.
    pub(crate) fn bytes(&self) -> usize {
        self.shards.capacity() * size_of::<Shard<K, V>>()
            + self
                .shards
                .iter()
                .map(|s| table_bytes::<(K, V)>(s.map.capacity()))
                .sum::<usize>()
    }
}

/// Bytes a std (hashbrown) hash table of `capacity` usable slots of `T` allocates: its buckets
/// (a power of two, 8/7 of the capacity from 8 buckets on), a control byte per bucket and one
/// extra group of control bytes (16 with SSE2, 8 elsewhere; 16 counted).
pub(crate) fn table_bytes<T>(capacity: usize) -> usize {
    const GROUP: usize = 16;
    let buckets = match capacity {
        0 => return 0,
        1..=7 => (capacity + 1).next_power_of_two(),
        _ => (capacity / 7 * 8).next_power_of_two(),
    };
    let data = (buckets * size_of::<T>()).next_multiple_of(GROUP.max(align_of::<T>()));
    data + buckets + GROUP
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_protocol::SequenceHash;

    #[test]
    fn table_bytes_follows_hashbrown_bucket_counts() {
        for (capacity, buckets) in [(3, 4), (7, 8), (14, 16), (28, 32), (917_504, 1 << 20)] {
            assert_eq!(
                table_bytes::<(u64, u64)>(capacity),
                buckets * 16 + buckets + 16
            );
        }
    }

    #[test]
    fn shards_double_one_at_a_time() {
        let mut map = ShardedMap::<SequenceHash, u64>::new();
        let mut previous = map.bytes();
        for key in 0..200_000u64 {
            map.insert(SequenceHash(key.wrapping_mul(0x2545_F491_4F6C_DD1D)), key);
            let bytes = map.bytes();
            // One shard at a time, not the whole map: a small step above the 4096-key warm-up.
            assert!(
                key < 4096 || bytes < previous + previous / 8,
                "{key}: {previous} -> {bytes}"
            );
            previous = bytes;
        }
        assert_eq!(map.len(), 200_000);
    }
}
