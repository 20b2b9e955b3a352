//! The memory bound, approximate mode, snapshot format errors and the shared index.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_index::{Index, IndexConfig, SharedIndex, SnapshotError, WorkerKey, SNAPSHOT_VERSION};
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData,
    RouterEvent, SequenceHash, WorkerId,
};
use proptest::prelude::*;
use std::time::{Duration, Instant};

fn key(worker: u64) -> WorkerKey {
    WorkerKey::new(WorkerId(worker), DpRank(0))
}

fn hashes(range: std::ops::Range<u64>) -> Vec<SequenceHash> {
    range.map(SequenceHash).collect()
}

fn store(worker: u64, parent: Option<u64>, blocks: std::ops::Range<u64>) -> RouterEvent {
    RouterEvent::new(
        WorkerId(worker),
        KvCacheEvent {
            event_id: 0,
            dp_rank: DpRank(0),
            data: KvCacheEventData::Stored(KvCacheStoreData {
                parent_hash: parent.map(SequenceHash),
                start_position: None,
                blocks: blocks
                    .map(|h| KvCacheStoredBlockData {
                        block_hash: SequenceHash(h),
                        tokens_hash: BlockHash(h),
                        mm_extra_info: None,
                    })
                    .collect(),
            }),
        },
    )
}

fn matched(index: &Index, query: &[SequenceHash], worker: u64) -> usize {
    index
        .find_matches(query)
        .workers
        .iter()
        .find(|w| w.worker == key(worker))
        .map_or(0, |w| w.matched_blocks)
}

#[test]
fn memory_bound_drops_least_recently_matched_runs() {
    let mut index = Index::new(IndexConfig::default().with_max_entries(100));
    index.apply_event(&store(1, None, 0..60)).unwrap();
    index.apply_event(&store(2, None, 1000..1060)).unwrap();
    // Over the bound: the older run goes, the newer stays.
    assert_eq!(index.stats().blocks, 60);
    assert_eq!(index.stats().evicted_entries, 60);
    assert_eq!(matched(&index, &hashes(0..60), 1), 0);
    assert_eq!(matched(&index, &hashes(1000..1060), 2), 60);

    index.apply_event(&store(3, None, 2000..2030)).unwrap();
    // A lookup makes the older run the most recently matched one.
    assert_eq!(matched(&index, &hashes(1000..1060), 2), 60);
    index.apply_event(&store(4, None, 3000..3030)).unwrap();
    assert_eq!(index.stats().blocks, 90);
    assert_eq!(matched(&index, &hashes(1000..1060), 2), 60);
    assert_eq!(matched(&index, &hashes(2000..2030), 3), 0);
    assert_eq!(matched(&index, &hashes(3000..3030), 4), 30);
    assert_eq!(index.stats().evicted_entries, 90);
}

#[test]
fn memory_bound_holds_under_a_long_stream() {
    let max = 5_000;
    let mut index = Index::new(IndexConfig::default().with_max_entries(max));
    for i in 0..400u64 {
        let start = i * 100;
        index
            .apply_event(&store(i % 7, None, start..start + 64))
            .unwrap();
        assert!(index.stats().blocks <= max);
    }
    let stats = index.stats();
    assert_eq!(stats.blocks + stats.evicted_entries, 400 * 64);
}

#[test]
fn routed_blocks_expire_after_their_ttl_unless_routed_again() {
    let t0 = Instant::now();
    let ttl = Duration::from_secs(10);
    let mut index = Index::new(IndexConfig::default().with_routed_ttl(ttl));
    index.apply_event(&store(1, None, 0..3)).unwrap();
    index.record_routed(key(9), &hashes(0..3), t0);
    assert_eq!(matched(&index, &hashes(0..3), 9), 3);
    index.record_routed(key(9), &hashes(0..2), t0 + Duration::from_secs(5));

    assert_eq!(index.expire_routed(t0 + Duration::from_secs(9)), 0);
    assert_eq!(index.expire_routed(t0 + Duration::from_secs(11)), 1);
    assert_eq!(matched(&index, &hashes(0..3), 9), 2);
    assert_eq!(index.expire_routed(t0 + Duration::from_secs(16)), 2);
    assert_eq!(matched(&index, &hashes(0..3), 9), 0);
    let stats = index.stats();
    assert_eq!(stats.expired_entries, 3);
    assert_eq!(stats.blocks, 3, "the event-fed worker is untouched");
    assert_eq!(matched(&index, &hashes(0..3), 1), 3);
}

#[test]
fn snapshots_leave_out_approximate_workers() {
    let mut index = Index::default();
    index.apply_event(&store(1, None, 0..8)).unwrap();
    index.record_routed(key(9), &hashes(0..4), Instant::now());
    let restored = Index::restore(&index.snapshot(), IndexConfig::default()).unwrap();
    assert_eq!(restored.stats().blocks, 8);
    assert_eq!(restored.workers().collect::<Vec<_>>(), vec![key(1)]);
    assert_eq!(matched(&restored, &hashes(0..8), 1), 8);
}

#[test]
fn snapshot_format_errors_are_typed() {
    let mut index = Index::default();
    index.apply_event(&store(1, None, 0..8)).unwrap();
    let bytes = index.snapshot();

    let mut newer = bytes.clone();
    newer[6..8].copy_from_slice(&(SNAPSHOT_VERSION + 1).to_le_bytes());
    let error = Index::restore(&newer, IndexConfig::default()).unwrap_err();
    assert_eq!(
        error,
        SnapshotError::UnsupportedVersion {
            found: SNAPSHOT_VERSION + 1,
            supported: SNAPSHOT_VERSION
        }
    );
    assert!(error.to_string().contains("not supported"));
    assert_eq!(
        Index::restore(b"{\"json\":1}", IndexConfig::default()).unwrap_err(),
        SnapshotError::NotASnapshot
    );
    assert_eq!(
        Index::restore(&bytes[..bytes.len() - 1], IndexConfig::default()).unwrap_err(),
        SnapshotError::Truncated
    );
    let mut trailing = bytes.clone();
    trailing.push(0);
    assert!(matches!(
        Index::restore(&trailing, IndexConfig::default()),
        Err(SnapshotError::Corrupt(_))
    ));
}

proptest! {
    #[test]
    fn damaged_snapshots_never_panic(cut in 0usize..200, flips in prop::collection::vec((0usize..200, any::<u8>()), 0..4)) {
        let mut index = Index::default();
        index.apply_event(&store(1, None, 0..8)).unwrap();
        index.apply_event(&store(2, Some(3), 4..12)).ok();
        index.apply_event(&store(2, None, 0..5)).unwrap();
        let mut bytes = index.snapshot();
        for (at, value) in flips {
            if let Some(b) = bytes.get_mut(at) {
                *b = value;
            }
        }
        bytes.truncate(cut);
        if let Ok(restored) = Index::restore(&bytes, IndexConfig::default()) {
            // Whatever decodes is a consistent index.
            let stats = restored.stats();
            prop_assert!(stats.unique_blocks <= stats.blocks);
            let _ = restored.find_matches(&hashes(0..12));
        }
    }
}

#[test]
fn lookups_run_while_a_writer_applies_a_batch() {
    let shared = SharedIndex::new(Index::default());
    shared.apply_events(&[store(1, None, 0..64)]);
    let events: Vec<RouterEvent> = (0..200u64)
        .map(|i| store(2 + i % 3, None, 10_000 + i * 100..10_000 + i * 100 + 50))
        .collect();
    std::thread::scope(|scope| {
        for _ in 0..2 {
            let shared = shared.clone();
            scope.spawn(move || {
                for _ in 0..200 {
                    let overlap = shared.find_matches(&hashes(0..64));
                    assert_eq!(overlap.workers.len(), 1);
                    assert_eq!(overlap.workers[0].matched_blocks, 64);
                }
            });
        }
        assert!(shared.apply_events(&events).is_empty());
    });
    assert_eq!(shared.stats().blocks, 64 + 200 * 50);
    shared.remove_worker(WorkerId(1));
    assert_eq!(shared.stats().blocks, 200 * 50);
}
