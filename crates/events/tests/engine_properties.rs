//! Engine events through encode → decode → EngineCache → index equal a reference model of
//! the engine's cache; malformed frames are refused with typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::{BlockHasher, NoMedia};
use kvroute_events::{
    decode_engine_batch, encode_engine_batch, EngineBatch, EngineCache, EngineCacheConfig,
    EngineEvent, EngineFrames, EngineHash, EngineRemoved, EngineSkip, EngineStored,
    EngineWireError,
};
use kvroute_index::{Index, IndexConfig};
use kvroute_protocol::{DpRank, KvCacheEvent, RouterEvent, SequenceHash, WorkerId};
use proptest::prelude::*;
use std::collections::BTreeSet;

const BLOCK: u32 = 4;
const PROMPTS: usize = 4;
const BLOCKS: usize = 6;

/// Prompt `p`'s tokens: prompts 0 and 1 share their first two blocks, 2 and 3 their first.
fn tokens(p: usize) -> Vec<u32> {
    let shared = match p {
        0 | 1 => 2,
        _ => 1,
    };
    (0..BLOCKS as u32 * BLOCK)
        .map(|t| {
            if t < shared * BLOCK {
                (p as u32 / 2) * 1000 + t
            } else {
                p as u32 * 1000 + t + 100
            }
        })
        .collect()
}

/// Prompts 2 and 3 run under a LoRA adapter.
fn lora(p: usize) -> Option<&'static str> {
    (p >= 2).then_some("adapter-a")
}

/// kvroute's sequence hashes of prompt `p`.
fn ours(p: usize) -> Vec<SequenceHash> {
    let mut builder = BlockHasher::builder(BLOCK);
    if let Some(name) = lora(p) {
        builder = builder.lora_name(name);
    }
    builder
        .build()
        .unwrap()
        .hash_sequence(&tokens(p), &NoMedia)
        .iter()
        .map(|b| b.sequence)
        .collect()
}

/// The engine's (opaque) hash of block `i` of prompt `p`: any function of the prefix.
fn engine(p: usize, i: usize) -> EngineHash {
    EngineHash(ours(p)[i].0.rotate_left(17) ^ 0x5555)
}

#[derive(Clone, Debug)]
enum Op {
    /// Store blocks `from..to` of a prompt (the engine has blocks `..from`, or `from` is 0).
    Store {
        prompt: usize,
        from: usize,
        len: usize,
    },
    /// Evict one block.
    Remove {
        prompt: usize,
        block: usize,
    },
    Clear,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (0..PROMPTS, 0..BLOCKS, 1..=3usize).prop_map(|(prompt, from, len)| Op::Store { prompt, from, len }),
        3 => (0..PROMPTS, 0..BLOCKS).prop_map(|(prompt, block)| Op::Remove { prompt, block }),
        1 => Just(Op::Clear),
    ]
}

/// The engine's cache as a set of (prompt-prefix) blocks, by engine hash.
#[derive(Default)]
struct Model {
    held: BTreeSet<u64>,
}

impl Model {
    /// The engine event for `op`, or `None` for an op the engine could not produce (storing
    /// after a block it does not hold).
    fn event(&mut self, op: &Op) -> Option<EngineEvent> {
        match *op {
            Op::Store { prompt, from, len } => {
                let to = (from + len).min(BLOCKS);
                let parent = (from > 0).then(|| engine(prompt, from - 1));
                if parent.is_some_and(|p| !self.held.contains(&p.0)) {
                    return None;
                }
                let hashes: Vec<EngineHash> = (from..to).map(|i| engine(prompt, i)).collect();
                self.held.extend(hashes.iter().map(|h| h.0));
                let block = BLOCK as usize;
                Some(EngineEvent::Stored(EngineStored {
                    block_hashes: hashes,
                    parent,
                    token_ids: tokens(prompt)[from * block..to * block].to_vec(),
                    block_size: BLOCK,
                    medium: Some("GPU".into()),
                    lora_name: lora(prompt).map(str::to_owned),
                    extra_keys: Some(vec![
                        lora(prompt).map(|n| vec![
                            kvroute_events::ExtraKey::Str(n.into())
                        ]);
                        to - from
                    ]),
                    group_idx: Some(0),
                    kv_cache_spec_kind: Some("full_attention".into()),
                    ..EngineStored::default()
                }))
            }
            Op::Remove { prompt, block } => {
                let hash = engine(prompt, block);
                self.held.remove(&hash.0);
                Some(EngineEvent::Removed(EngineRemoved {
                    block_hashes: vec![hash],
                    medium: Some("GPU".into()),
                    group_idx: Some(0),
                }))
            }
            Op::Clear => {
                self.held.clear();
                Some(EngineEvent::Cleared)
            }
        }
    }

    /// How many leading blocks of prompt `p` the engine holds.
    fn leading(&self, p: usize) -> usize {
        (0..BLOCKS)
            .take_while(|&i| self.held.contains(&engine(p, i).0))
            .count()
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn ingested_engine_events_match_the_engine(ops in prop::collection::vec(op(), 1..60)) {
        let mut model = Model::default();
        let mut cache = EngineCache::new(EngineCacheConfig::new(BLOCK)).unwrap();
        let mut index = Index::new(IndexConfig::default());
        let mut id = 0;
        for op in &ops {
            let Some(event) = model.event(op) else { continue };
            let batch = EngineBatch { ts: 1.5, events: vec![event], dp_rank: Some(0) };
            let decoded = decode_engine_batch(&encode_engine_batch(&batch)).unwrap();
            prop_assert_eq!(&decoded, &batch);
            for event in &decoded.events {
                let data = cache.convert(event).unwrap();
                let event = KvCacheEvent { event_id: id, data, dp_rank: DpRank(0) };
                id += 1;
                index.apply_event(&RouterEvent::new(WorkerId(1), event)).unwrap();
            }
        }
        for p in 0..PROMPTS {
            let matched = index
                .find_matches(&ours(p))
                .workers
                .first()
                .map_or(0, |w| w.matched_blocks);
            prop_assert_eq!(matched, model.leading(p), "prompt {}", p);
        }
        prop_assert_eq!(cache.len(), model.held.len());
    }

    /// Any bytes: a typed error or a batch, never a panic.
    #[test]
    fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = decode_engine_batch(&bytes);
    }

    /// Truncating or corrupting a real payload anywhere gives an error or a batch.
    #[test]
    fn corrupted_payloads_never_panic(cut in 0usize..600, at in 0usize..600, byte in any::<u8>()) {
        let mut bytes = payload();
        bytes.truncate(cut.max(1).min(bytes.len()));
        let at = at % bytes.len();
        bytes[at] = byte;
        let _ = decode_engine_batch(&bytes);
    }
}

fn payload() -> Vec<u8> {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm");
    std::fs::read(dir.join("c_mm_one_image.msgpack")).unwrap()
}

#[test]
fn malformed_frames_are_typed_errors() {
    let seq = 7u64.to_be_bytes();
    let body = payload();
    assert_eq!(
        EngineFrames::from_pub(&[b"", &seq]),
        Err(EngineWireError::Frames(2))
    );
    assert_eq!(
        EngineFrames::from_pub(&[b"", &seq, &body, b""]),
        Err(EngineWireError::Frames(4))
    );
    assert_eq!(
        EngineFrames::from_pub(&[b"", b"\x01", &body]),
        Err(EngineWireError::Seq(1))
    );
    assert_eq!(
        EngineFrames::from_pub(&[b"kv", &seq, &body]).unwrap().seq,
        7
    );

    // Not msgpack at all; a map where the batch array belongs; trailing bytes.
    assert!(matches!(
        decode_engine_batch(b"\xc1"),
        Err(EngineWireError::Msgpack { .. })
    ));
    assert!(matches!(
        decode_engine_batch(b"\x80"),
        Err(EngineWireError::Msgpack { .. })
    ));
    let mut trailing = body.clone();
    trailing.push(0);
    assert!(matches!(
        decode_engine_batch(&trailing),
        Err(EngineWireError::Shape(_))
    ));

    // An unknown event type.
    let unknown = b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\x91\x81\xa4type\xa8Reshaped\x00";
    assert_eq!(
        decode_engine_batch(unknown),
        Err(EngineWireError::UnknownTag("Reshaped".into()))
    );

    // Arrays claiming 4 billion events, block hashes, tokens: refused before any reserve.
    let huge_events = b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\xdd\xff\xff\xff\xff";
    assert!(matches!(
        decode_engine_batch(huge_events),
        Err(EngineWireError::Msgpack { .. })
    ));
    let mut huge_tokens = b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\x91\x82\xa4type\xabBlockStored\xa9token_ids\xdd\xff\xff\xff\xf0".to_vec();
    huge_tokens.extend_from_slice(&[1; 64]);
    assert!(matches!(
        decode_engine_batch(&huge_tokens),
        Err(EngineWireError::Msgpack { .. })
    ));

    // Nested past the depth limit inside a field that is skipped.
    let mut deep =
        b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\x91\x82\xa4type\xb0AllBlocksCleared\xa5extra"
            .to_vec();
    deep.extend(std::iter::repeat_n(0x91u8, 100_000));
    deep.push(0xc0);
    deep.push(0x00);
    assert!(matches!(
        decode_engine_batch(&deep),
        Err(EngineWireError::Msgpack { .. })
    ));
}

#[test]
fn events_that_contradict_themselves_are_skipped() {
    let mut cache = EngineCache::new(EngineCacheConfig::new(BLOCK)).unwrap();
    let stored = |hashes: usize, tokens: usize, block_size: u32| {
        EngineEvent::Stored(EngineStored {
            block_hashes: (0..hashes as u64).map(EngineHash).collect(),
            token_ids: (0..tokens as u32).collect(),
            block_size,
            ..EngineStored::default()
        })
    };
    // Block count mismatch: 2 hashes, 3 blocks of tokens.
    assert!(matches!(
        cache.convert(&stored(2, 12, BLOCK)),
        Err(EngineSkip::Inconsistent(_))
    ));
    // Another block size than kvroute's.
    assert_eq!(
        cache.convert(&stored(1, 16, 16)),
        Err(EngineSkip::BlockSize {
            expected: BLOCK,
            got: 16
        })
    );
    // extra_keys not one per block.
    let EngineEvent::Stored(mut event) = stored(2, 8, BLOCK) else {
        unreachable!()
    };
    event.extra_keys = Some(vec![None]);
    assert!(matches!(
        cache.convert(&EngineEvent::Stored(event.clone())),
        Err(EngineSkip::Inconsistent(_))
    ));
    // A sliding-window group and a CPU tier are skipped, the GPU full-attention one is not.
    event.extra_keys = None;
    event.kv_cache_spec_kind = Some("sliding_window".into());
    assert_eq!(
        cache.convert(&EngineEvent::Stored(event.clone())),
        Err(EngineSkip::OtherGroup)
    );
    event.kv_cache_spec_kind = None;
    event.medium = Some("CPU".into());
    assert_eq!(
        cache.convert(&EngineEvent::Stored(event.clone())),
        Err(EngineSkip::OtherMedium("CPU".into()))
    );
    event.medium = Some("GPU".into());
    assert!(cache.convert(&EngineEvent::Stored(event.clone())).is_ok());
    // A continuation of a block never seen.
    event.parent = Some(EngineHash(99));
    assert_eq!(
        cache.convert(&EngineEvent::Stored(event)),
        Err(EngineSkip::UnknownParent)
    );
    assert_eq!(cache.len(), 2);
}

#[test]
fn the_remembered_blocks_are_bounded() {
    let mut cache = EngineCache::new(EngineCacheConfig::new(BLOCK).with_max_blocks(3)).unwrap();
    let stored = |first: u64| {
        EngineEvent::Stored(EngineStored {
            block_hashes: vec![EngineHash(first), EngineHash(first + 1)],
            token_ids: (0..8).collect(),
            block_size: BLOCK,
            ..EngineStored::default()
        })
    };
    assert!(cache.convert(&stored(10)).is_ok());
    assert_eq!(cache.convert(&stored(20)), Err(EngineSkip::Overflow));
    assert!(cache.is_empty());
    assert!(cache.convert(&stored(20)).is_ok());
}
