//! RouterEvent JSON written by Dynamo's own Rust crate (dynamo-kv-router 1.6.1) must read and
//! write back byte for byte, and any event we build must survive a round trip.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_protocol::*;
use proptest::prelude::*;
use std::path::Path;

#[test]
fn dynamo_router_events_round_trip_exactly() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/vectors/dynamo_router_events.jsonl");
    let text = std::fs::read_to_string(&path).unwrap();
    let mut kinds = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let event = RouterEvent::from_json(line.as_bytes()).unwrap();
        assert_eq!(event.to_json(), line);
        assert_eq!(event.worker_id, WorkerId(7));
        kinds.push(match event.event.data {
            KvCacheEventData::Stored(stored) => {
                assert_eq!(stored.parent_hash, Some(SequenceHash(4178317394779010145)));
                assert_eq!(stored.blocks.len(), 3);
                // Same content, different position: equal tokens_hash, different block_hash.
                assert_eq!(stored.blocks[0].tokens_hash, stored.blocks[1].tokens_hash);
                assert_ne!(stored.blocks[0].block_hash, stored.blocks[1].block_hash);
                "stored"
            }
            KvCacheEventData::Removed(_) => "removed",
            KvCacheEventData::Cleared => "cleared",
        });
    }
    assert_eq!(kinds, ["stored", "removed", "cleared"]);
}

fn block() -> impl Strategy<Value = KvCacheStoredBlockData> {
    let object = (
        any::<u64>(),
        prop::collection::vec((0usize..64, 0usize..64), 0..3),
    )
        .prop_map(|(hash, offsets)| BlockMmObjectInfo {
            mm_hash: MediaId(hash),
            offsets,
        });
    let info = prop::option::of(
        prop::collection::vec(object, 0..3).prop_map(|mm_objects| BlockExtraInfo { mm_objects }),
    );
    (any::<u64>(), any::<u64>(), info).prop_map(|(seq, content, mm_extra_info)| {
        KvCacheStoredBlockData {
            block_hash: SequenceHash(seq),
            tokens_hash: BlockHash(content),
            mm_extra_info,
        }
    })
}

fn event() -> impl Strategy<Value = RouterEvent> {
    let data = prop_oneof![
        (
            prop::option::of(any::<u64>()),
            prop::option::of(any::<u32>()),
            prop::collection::vec(block(), 0..4)
        )
            .prop_map(|(parent, start_position, blocks)| {
                KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: parent.map(SequenceHash),
                    start_position,
                    blocks,
                })
            }),
        prop::collection::vec(any::<u64>(), 0..4).prop_map(|hashes| {
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: hashes.into_iter().map(SequenceHash).collect(),
            })
        }),
        Just(KvCacheEventData::Cleared),
    ];
    let tier = prop_oneof![
        Just(StorageTier::Device),
        Just(StorageTier::HostPinned),
        Just(StorageTier::Disk),
        Just(StorageTier::External),
    ];
    let domain = prop_oneof![
        Just(None),
        Just(Some(ResidencyDomain::Worker)),
        Just(Some(ResidencyDomain::CacheOwner)),
        Just(Some(ResidencyDomain::Invalid)),
        "[a-z]{1,8}".prop_map(|s| Some(ResidencyDomain::Unknown(format!("x{s}")))),
    ];
    (
        any::<u64>(),
        tier,
        domain,
        any::<u64>(),
        data,
        any::<u32>(),
        prop::option::of("[ -~]{0,12}"),
    )
        .prop_map(
            |(worker, storage_tier, residency_domain, event_id, data, dp_rank, session_id)| {
                RouterEvent {
                    worker_id: WorkerId(worker),
                    storage_tier,
                    residency_domain,
                    event: KvCacheEvent {
                        event_id,
                        data,
                        dp_rank: DpRank(dp_rank),
                    },
                    state_source: None,
                    session_id,
                }
            },
        )
}

proptest! {
    #[test]
    fn any_event_round_trips(event in event()) {
        let json = event.to_json();
        let back = RouterEvent::from_json(json.as_bytes()).unwrap();
        prop_assert_eq!(&back, &event);
        prop_assert_eq!(back.to_json(), json);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        let _ = RouterEvent::from_json(&bytes);
    }
}
