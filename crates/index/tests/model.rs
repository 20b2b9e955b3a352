//! The index against a deliberately naive reference model (per cache: the set of stored
//! sequence hashes with their parents), over random event streams with duplicates, unknown
//! parents, removals of unknown blocks, clears and worker removal. Hashes chain consistently,
//! as real sequence hashes do (the index relies on it to skip through runs).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_index::{Index, IndexConfig, Overlap, WorkerKey};
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData, RouterEvent, SequenceHash, WorkerId,
};
use proptest::prelude::*;
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap, HashSet};

/// Per cache: sequence hash -> the parent it was stored under.
#[derive(Default)]
struct Model {
    caches: BTreeMap<WorkerKey, HashMap<u64, Option<u64>>>,
    unknown_parent: u64,
    invalid_stores: u64,
    duplicate_blocks: u64,
    unknown_removals: u64,
}

impl Model {
    fn apply(&mut self, op: &Op) {
        match op {
            Op::Event(event) => self.apply_event(event),
            Op::RemoveWorker(id) => self.caches.retain(|key, _| key.worker_id.get() != *id),
            Op::RemoveRank(key) => {
                self.caches.remove(key);
            }
            Op::Query(_) | Op::Roundtrip => {}
        }
    }

    fn apply_event(&mut self, event: &RouterEvent) {
        let key = WorkerKey::new(event.worker_id, event.event.dp_rank);
        let cache = self.caches.entry(key).or_default();
        match &event.event.data {
            KvCacheEventData::Stored(store) => {
                let hashes: Vec<u64> = store.blocks.iter().map(|b| b.block_hash.get()).collect();
                if let Some(parent) = store.parent_hash.map(|p| p.get()) {
                    if hashes.contains(&parent) {
                        self.invalid_stores += 1;
                        return;
                    }
                    if !cache.contains_key(&parent) {
                        self.unknown_parent += 1;
                        return;
                    }
                }
                let mut parent = store.parent_hash.map(|p| p.get());
                for hash in hashes {
                    match cache.entry(hash) {
                        Entry::Occupied(_) => self.duplicate_blocks += 1,
                        Entry::Vacant(slot) => {
                            slot.insert(parent);
                        }
                    }
                    parent = Some(hash);
                }
            }
            KvCacheEventData::Removed(removed) => {
                for hash in &removed.block_hashes {
                    if cache.remove(&hash.get()).is_none() {
                        self.unknown_removals += 1;
                    }
                }
            }
            KvCacheEventData::Cleared => cache.clear(),
        }
    }

    /// Per cache, the number of leading query blocks it holds (caches with none left out).
    fn find_matches(&self, query: &[u64]) -> BTreeMap<WorkerKey, usize> {
        self.caches
            .iter()
            .map(|(key, cache)| {
                (
                    *key,
                    query.iter().take_while(|h| cache.contains_key(h)).count(),
                )
            })
            .filter(|&(_, n)| n > 0)
            .collect()
    }
}

#[derive(Clone, Debug)]
enum Op {
    Event(RouterEvent),
    RemoveWorker(u64),
    RemoveRank(WorkerKey),
    Query(Vec<u64>),
    /// Replace the index by its snapshot, restored.
    Roundtrip,
}

fn event(worker: u64, rank: u32, data: KvCacheEventData) -> RouterEvent {
    RouterEvent::new(
        WorkerId(worker),
        KvCacheEvent {
            event_id: 0,
            data,
            dp_rank: DpRank(rank),
        },
    )
}

/// Sequence hashes of a 3-ary tree numbered like a heap: block content `c` (0..3) after hash
/// `h` hashes to `3h + c + 1` (the first block of a sequence to `c + 1`). Every chain is then
/// consistent, as real sequence hashes are, while a small alphabet makes stores, removals and
/// queries collide all the time.
fn path(parent: Option<u64>, contents: &[u64]) -> Vec<u64> {
    let mut h = parent.unwrap_or(0);
    contents
        .iter()
        .map(|&c| {
            h = 3 * h + c + 1;
            h
        })
        .collect()
}

fn contents(max: usize) -> impl Strategy<Value = Vec<u64>> {
    prop::collection::vec(0u64..3, 0..max)
}

/// Some block of the tree (its depth is 1 to 6).
fn node() -> impl Strategy<Value = u64> {
    prop::collection::vec(0u64..3, 1..7).prop_map(|c| *path(None, &c).last().unwrap())
}

/// A query: a sequence from its start.
fn query() -> impl Strategy<Value = Vec<u64>> {
    contents(14).prop_map(|c| path(None, &c))
}

/// Blocks named by a removal: a stretch of a sequence (in order or reversed) or loose blocks.
fn removal() -> impl Strategy<Value = Vec<u64>> {
    prop_oneof![
        2 => (prop::option::of(node()), contents(8)).prop_map(|(p, c)| path(p, &c)),
        1 => (prop::option::of(node()), contents(8)).prop_map(|(p, c)| {
            let mut v = path(p, &c);
            v.reverse();
            v
        }),
        1 => prop::collection::vec(node(), 0..5),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    let cache = (0u64..4, 0u32..2);
    prop_oneof![
        8 => (cache.clone(), prop::option::weighted(0.6, node()), contents(10)).prop_map(|((w, r), parent, contents)| {
            Op::Event(event(w, r, KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(SequenceHash),
                start_position: None,
                blocks: path(parent, &contents).into_iter().map(|h| KvCacheStoredBlockData {
                    block_hash: SequenceHash(h),
                    tokens_hash: BlockHash(h ^ 0xABCD),
                    mm_extra_info: None,
                }).collect(),
            })))
        }),
        4 => (cache.clone(), removal()).prop_map(|((w, r), hashes)| {
            Op::Event(event(w, r, KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: hashes.into_iter().map(SequenceHash).collect(),
            })))
        }),
        1 => cache.clone().prop_map(|(w, r)| Op::Event(event(w, r, KvCacheEventData::Cleared))),
        1 => (0u64..4).prop_map(Op::RemoveWorker),
        1 => cache.prop_map(|(w, r)| Op::RemoveRank(WorkerKey::new(WorkerId(w), DpRank(r)))),
        6 => query().prop_map(Op::Query),
        1 => Just(Op::Roundtrip),
    ]
}

fn matches(overlap: &Overlap) -> BTreeMap<WorkerKey, usize> {
    let out: BTreeMap<_, _> = overlap
        .workers
        .iter()
        .map(|w| (w.worker, w.matched_blocks))
        .collect();
    assert_eq!(out.len(), overlap.workers.len(), "a cache reported twice");
    out
}

/// Checks one query; with `buffer`, through `find_matches_into` reusing it (it holds the
/// previous answer, which must not leak into this one).
fn check(index: &Index, model: &Model, query: &[u64], buffer: Option<&mut Overlap>) {
    let fresh;
    let overlap = match buffer {
        Some(buffer) => {
            index.find_matches_into(SequenceHash::from_raw_slice(query), buffer);
            &*buffer
        }
        None => {
            let hashes: Vec<SequenceHash> = query.iter().copied().map(SequenceHash).collect();
            fresh = index.find_matches(&hashes);
            &fresh
        }
    };
    assert_eq!(overlap.query_blocks, query.len());
    assert_eq!(
        matches(overlap),
        model.find_matches(query),
        "query {query:?}"
    );
    for w in &overlap.workers {
        assert_eq!(w.cached_blocks, model.caches[&w.worker].len() as u64);
    }
}

fn check_stats(index: &Index, model: &Model) {
    let stats = index.stats();
    let unique: HashSet<u64> = model
        .caches
        .values()
        .flat_map(|c| c.keys().copied())
        .collect();
    assert_eq!(stats.workers, model.caches.len());
    assert_eq!(
        stats.blocks,
        model.caches.values().map(|c| c.len() as u64).sum::<u64>()
    );
    assert_eq!(index.entries(), stats.blocks);
    assert_eq!(stats.unique_blocks, unique.len() as u64);
    assert!(stats.nodes as u64 <= stats.unique_blocks);
    let mut workers: Vec<WorkerKey> = index.workers().collect();
    workers.sort();
    assert_eq!(workers, model.caches.keys().copied().collect::<Vec<_>>());
}

fn check_counters(index: &Index, model: &Model) {
    let stats = index.stats();
    assert_eq!(stats.unknown_parent, model.unknown_parent);
    assert_eq!(stats.invalid_stores, model.invalid_stores);
    assert_eq!(stats.duplicate_blocks, model.duplicate_blocks);
    assert_eq!(stats.unknown_removals, model.unknown_removals);
}

/// Fixed queries: every sequence starting with 4 of the 81 possible blocks, then 6 more.
fn probes() -> impl Iterator<Item = Vec<u64>> {
    (0..81u64).map(|i| {
        let mut c = vec![i % 3, i / 3 % 3, i / 9 % 3, i / 27 % 3];
        c.extend([0, 1, 2, 0, 1, 2]);
        path(None, &c)
    })
}

/// Applies a stored or removed event through the borrowed-slice API, as an embedder holding
/// raw `u64` hashes would.
fn apply_borrowed(index: &mut Index, event: &RouterEvent) {
    let worker = WorkerKey::new(event.worker_id, event.event.dp_rank);
    let _ = match &event.event.data {
        KvCacheEventData::Stored(store) => {
            let raw: Vec<u64> = store.blocks.iter().map(|b| b.block_hash.get()).collect();
            index.apply_stored(
                worker,
                store.parent_hash,
                SequenceHash::from_raw_slice(&raw),
            )
        }
        KvCacheEventData::Removed(removed) => index.apply_removed(worker, &removed.block_hashes),
        KvCacheEventData::Cleared => index.apply_event(event),
    };
}

/// Runs `ops` on the index and the model; `borrowed` uses the borrowed-slice and buffer APIs
/// (`apply_stored`, `apply_removed`, `find_matches_into` with one reused buffer).
fn run(ops: &[Op], borrowed: bool) {
    let mut index = Index::new(IndexConfig::default());
    let mut model = Model::default();
    let mut restored = false;
    let mut buffer = Overlap::default();
    for op in ops {
        model.apply(op);
        match op {
            Op::Event(event) if borrowed => apply_borrowed(&mut index, event),
            Op::Event(event) => {
                let _ = index.apply_event(event);
            }
            Op::RemoveWorker(id) => index.remove_worker(WorkerId(*id)),
            Op::RemoveRank(key) => index.remove_worker_dp_rank(*key),
            Op::Query(query) => check(&index, &model, query, borrowed.then_some(&mut buffer)),
            Op::Roundtrip => {
                let before = index.stats();
                let copy = Index::restore(&index.snapshot(), IndexConfig::default()).unwrap();
                let after = copy.stats();
                assert_eq!(
                    (after.workers, after.blocks, after.unique_blocks),
                    (before.workers, before.blocks, before.unique_blocks)
                );
                for start in 0..50 {
                    let query: Vec<u64> = (start..start + 12).collect();
                    let q: Vec<SequenceHash> = query.iter().copied().map(SequenceHash).collect();
                    assert_eq!(
                        matches(&copy.find_matches(&q)),
                        matches(&index.find_matches(&q))
                    );
                }
                index = copy;
                restored = true;
            }
        }
        check_stats(&index, &model);
    }
    if !restored {
        check_counters(&index, &model);
    }
    index.compact();
    check_stats(&index, &model);
    for query in probes() {
        check(&index, &model, &query, borrowed.then_some(&mut buffer));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 400, ..ProptestConfig::default() })]

    #[test]
    fn index_agrees_with_the_reference_model(ops in prop::collection::vec(op(), 1..80)) {
        run(&ops, false);
    }

    #[test]
    fn borrowed_slice_and_buffer_apis_agree_with_the_reference_model(
        ops in prop::collection::vec(op(), 1..80),
    ) {
        run(&ops, true);
    }
}

#[test]
fn unknown_parent_skips_the_store_and_is_counted() {
    let mut index = Index::default();
    let store = |parent: Option<u64>, hashes: &[u64]| {
        event(
            1,
            0,
            KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(SequenceHash),
                start_position: None,
                blocks: hashes
                    .iter()
                    .map(|&h| KvCacheStoredBlockData {
                        block_hash: SequenceHash(h),
                        tokens_hash: BlockHash(h),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        )
    };
    assert!(index.apply_event(&store(Some(5), &[6, 7])).is_err());
    assert_eq!(index.stats().blocks, 0);
    assert_eq!(index.stats().unknown_parent, 1);
    index.apply_event(&store(None, &[5])).unwrap();
    index.apply_event(&store(Some(5), &[6, 7])).unwrap();
    assert_eq!(index.stats().blocks, 3);
    assert!(index.apply_event(&store(Some(6), &[6])).is_err());
    assert_eq!(index.stats().invalid_stores, 1);
}
