//! vLLM's own KV event payloads (tests/fixtures/vllm, made by vLLM's KV cache manager) decode,
//! re-encode byte for byte, and become index entries equal to kvroute's hashes of the same
//! tokens and media.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::{media_id_from_identifier, BlockHasher, MediaSpan};
use kvroute_events::{
    decode_engine_batch, encode_engine_batch, EngineCache, EngineCacheConfig, EngineEvent,
    EngineHash, EngineSkip, ExtraKey, CACHE_SALT_PREFIX,
};
use kvroute_index::{Index, IndexConfig};
use kvroute_protocol::{
    DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, SequenceHash, WorkerId,
};
use serde_json::Value;
use std::collections::HashMap;
use std::path::PathBuf;

/// Every main fixture, in the order vLLM's publisher sent them (seq 0..11).
const STREAM: [&str; 12] = [
    "a_text_70",
    "b_shared_prefix",
    "b2_reuse_full_report",
    "c_mm_one_image",
    "d_mm_two_images",
    "e_lora",
    "e_cache_salt",
    "e_lora_mm_salt",
    "f1_eviction_setup",
    "f2_eviction",
    "f3_all_cleared",
    "g_decode_fills_block",
];

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vllm")
}

fn payload(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(format!("{name}.msgpack"))).unwrap()
}

fn json(name: &str) -> Value {
    serde_json::from_slice(&std::fs::read(dir().join(format!("{name}.json"))).unwrap()).unwrap()
}

/// kvroute's sequence hash of each engine block of a fixture's requests, computed from the
/// request (tokens, images at their placeholder spans, LoRA), never from the event.
fn expected_hashes(fixture: &Value) -> HashMap<u64, SequenceHash> {
    let mut out = HashMap::new();
    for request in fixture["requests"].as_array().unwrap() {
        let mut tokens: Vec<u32> = Vec::new();
        for key in ["prompt_token_ids", "output_token_ids"] {
            tokens.extend(
                request[key]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|t| t.as_u64().unwrap() as u32),
            );
        }
        let media: Vec<MediaSpan> = request["mm_features"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| {
                MediaSpan::new(
                    f["offset"].as_u64().unwrap() as usize,
                    f["length"].as_u64().unwrap() as usize,
                    // The uuid the client gave (and kvroute forwarded) is the media id.
                    media_id_from_identifier(f["user_uuid"].as_str().unwrap()).unwrap(),
                )
            })
            .collect();
        let mut builder = BlockHasher::builder(16);
        if let Some(lora) = request["lora_request"]["lora_name"].as_str() {
            builder = builder.lora_name(lora);
        }
        // A bare vLLM cache salt names no namespace (Dynamo 1.7's rule): only the
        // `dynamo-cache-salt:` form a router forwards does.
        if let Some(ns) = request["cache_salt"]
            .as_str()
            .and_then(|s| s.strip_prefix("dynamo-cache-salt:"))
        {
            builder = builder.cache_namespace(ns);
        }
        let hashed = builder.build().unwrap().hash_sequence(&tokens, &media[..]);
        for block in request["block_hashes"].as_array().unwrap() {
            let index = block["index"].as_u64().unwrap() as usize;
            let external = block["external_hash"].as_u64().unwrap();
            out.insert(external, hashed[index].sequence);
        }
    }
    out
}

fn router_event(id: u64, data: KvCacheEventData) -> RouterEvent {
    RouterEvent::new(
        WorkerId(1),
        KvCacheEvent {
            event_id: id,
            data,
            dp_rank: DpRank(0),
        },
    )
}

#[test]
fn every_payload_decodes_as_vllm_decoded_it_and_re_encodes_byte_for_byte() {
    for name in STREAM {
        let bytes = payload(name);
        let batch = decode_engine_batch(&bytes).unwrap();
        assert_eq!(encode_engine_batch(&batch), bytes, "{name}");
        let decoded = &json(name)["decoded"];
        assert_eq!(batch.ts, decoded["ts"].as_f64().unwrap());
        assert_eq!(batch.dp_rank, Some(0));
        let events = decoded["events"].as_array().unwrap();
        assert_eq!(batch.events.len(), events.len(), "{name}");
        for (event, want) in batch.events.iter().zip(events) {
            let hashes = |v: &Value| -> Vec<EngineHash> {
                v.as_array()
                    .unwrap()
                    .iter()
                    .map(|h| EngineHash(h.as_u64().unwrap()))
                    .collect()
            };
            match event {
                EngineEvent::Stored(s) => {
                    assert_eq!(want["type"], "BlockStored");
                    assert_eq!(s.block_hashes, hashes(&want["block_hashes"]));
                    assert_eq!(s.parent.map(|h| h.0), want["parent_block_hash"].as_u64());
                    let tokens: Vec<u32> = want["token_ids"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|t| t.as_u64().unwrap() as u32)
                        .collect();
                    assert_eq!(s.token_ids, tokens);
                    assert_eq!(s.block_size, 16);
                    assert_eq!(s.lora_name.as_deref(), want["lora_name"].as_str());
                    assert_eq!(s.medium.as_deref(), Some("GPU"));
                    assert_eq!(s.group_idx, Some(0));
                    assert_eq!(s.kv_cache_spec_kind.as_deref(), Some("full_attention"));
                    let keys = s.extra_keys.as_ref().unwrap();
                    let want_keys = want["extra_keys"].as_array().unwrap();
                    assert_eq!(keys.len(), want_keys.len());
                    for (block, want_block) in keys.iter().zip(want_keys) {
                        let Some(block) = block else {
                            assert!(want_block.is_null());
                            continue;
                        };
                        let want_block = want_block.as_array().unwrap();
                        assert_eq!(block.len(), want_block.len());
                        for (key, want_key) in block.iter().zip(want_block) {
                            match key {
                                ExtraKey::Str(s) => assert_eq!(want_key.as_str(), Some(s.as_str())),
                                ExtraKey::Media(id, offset) => {
                                    assert_eq!(want_key[0].as_str(), Some(id.as_str()));
                                    assert_eq!(want_key[1].as_i64(), Some(*offset));
                                }
                                other => panic!("{name}: unexpected key {other:?}"),
                            }
                        }
                    }
                }
                EngineEvent::Removed(r) => {
                    assert_eq!(want["type"], "BlockRemoved");
                    assert_eq!(r.block_hashes, hashes(&want["block_hashes"]));
                    assert_eq!(r.medium.as_deref(), Some("GPU"));
                }
                EngineEvent::Cleared => assert_eq!(want["type"], "AllBlocksCleared"),
            }
        }
    }
}

#[test]
fn the_stream_becomes_kvroute_hashes_of_the_same_tokens_and_media() {
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let mut index = Index::new(IndexConfig::default());
    let mut next_id = 0;
    let mut stored_blocks = 0;
    let mut media_blocks = 0;
    for name in STREAM {
        let fixture = json(name);
        let expected = expected_hashes(&fixture);
        for event in decode_engine_batch(&payload(name)).unwrap().events {
            let data = match cache.convert(&event) {
                Ok(data) => data,
                // g's prefill was taken by an earlier batch of its own manager, never sent:
                // its decode block continues a block this stream cleared (f3).
                Err(EngineSkip::UnknownParent) if name == "g_decode_fills_block" => continue,
                Err(skip) => panic!("{name}: {skip}"),
            };
            if let (EngineEvent::Stored(engine), KvCacheEventData::Stored(ours)) = (&event, &data) {
                for (engine_hash, block) in engine.block_hashes.iter().zip(&ours.blocks) {
                    assert_eq!(block.block_hash, expected[&engine_hash.0], "{name}");
                    stored_blocks += 1;
                    media_blocks += usize::from(block.mm_extra_info.is_some());
                }
                if let Some(parent) = engine.parent {
                    assert_eq!(ours.parent_hash, Some(expected[&parent.0]), "{name}");
                }
            }
            if let (EngineEvent::Removed(engine), KvCacheEventData::Removed(ours)) = (&event, &data)
            {
                let want: Vec<SequenceHash> =
                    engine.block_hashes.iter().map(|h| expected[&h.0]).collect();
                assert_eq!(ours.block_hashes, want, "{name}");
            }
            index.apply_event(&router_event(next_id, data)).unwrap();
            next_id += 1;
        }
        // What the index holds for this fixture's requests after its batch.
        if name == "f2_eviction" {
            // req-x's 4 blocks: 3 evicted (its last three), block 0 kept; req-y's 3 stored.
            let x = &fixture["requests"][0]["block_hashes"];
            let x0 = expected[&x[0]["external_hash"].as_u64().unwrap()];
            let x1 = expected[&x[1]["external_hash"].as_u64().unwrap()];
            assert_eq!(index.find_matches(&[x0, x1]).workers[0].matched_blocks, 1);
        }
    }
    // f3 cleared the pool; g's block was skipped.
    assert_eq!(index.stats().blocks, 0);
    assert!(cache.is_empty());
    assert_eq!(stored_blocks, 41);
    assert_eq!(media_blocks, 13);
}

#[test]
fn a_block_stored_during_decode_continues_its_prompt() {
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let expected = expected_hashes(&json("g_decode_fills_block"));
    for name in ["a_text_70", "g_decode_fills_block"] {
        for event in decode_engine_batch(&payload(name)).unwrap().events {
            let data = cache.convert(&event).unwrap();
            if name == "g_decode_fills_block" {
                let (EngineEvent::Stored(engine), KvCacheEventData::Stored(ours)) = (&event, data)
                else {
                    panic!("g stores one block");
                };
                assert_eq!(
                    ours.blocks[0].block_hash,
                    expected[&engine.block_hashes[0].0]
                );
            }
        }
    }
}

#[test]
fn byte_hashes_name_the_same_blocks_as_integer_hashes() {
    for name in [
        "a_text_70",
        "b_shared_prefix",
        "c_mm_one_image",
        "f2_eviction",
    ] {
        let ints = decode_engine_batch(&payload(name)).unwrap();
        let bytes =
            std::fs::read(dir().join(format!("variants/bytes_hashes/{name}.msgpack"))).unwrap();
        let from_bytes = decode_engine_batch(&bytes).unwrap();
        assert_eq!(from_bytes.events, ints.events, "{name}");
    }
}

/// A fixture made with the engines' own event classes (tests/fixtures/gen_class_fixtures.py).
fn class_fixture(path: &str) -> (Vec<u8>, Value) {
    let base = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let bytes = std::fs::read(base.join(format!("{path}.msgpack"))).unwrap();
    let doc =
        serde_json::from_slice(&std::fs::read(base.join(format!("{path}.json"))).unwrap()).unwrap();
    (bytes, doc)
}

fn ids(doc: &Value, key: &str) -> Vec<u32> {
    doc["inputs"][key]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_u64().unwrap() as u32)
        .collect()
}

fn sequence(builder: kvroute_blockhash::BlockHasherBuilder, tokens: &[u32]) -> Vec<SequenceHash> {
    builder
        .build()
        .unwrap()
        .hash_sequence(tokens, &kvroute_blockhash::NoMedia)
        .iter()
        .map(|b| b.sequence)
        .collect()
}

#[test]
fn vllm_class_fixtures_re_encode_and_follow_dynamos_rules() {
    // A tagged salt is the namespace of the sequence, continuation included.
    let (bytes, doc) = class_fixture("vllm/classes/tagged_cache_salt");
    let batch = decode_engine_batch(&bytes).unwrap();
    assert_eq!(encode_engine_batch(&batch), bytes);
    let want = sequence(
        BlockHasher::builder(16).cache_namespace("tenant-1"),
        &ids(&doc, "token_ids"),
    );
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let mut got = Vec::new();
    for event in &batch.events {
        let KvCacheEventData::Stored(stored) = cache.convert(event).unwrap() else {
            panic!("stores only");
        };
        got.extend(stored.blocks.iter().map(|b| b.block_hash));
    }
    assert_eq!(got, want);

    // vLLM 0.18's bare 64-hex identifier names an image; the LoRA name beside it does not.
    let (bytes, doc) = class_fixture("vllm/classes/bare_identifier");
    let batch = decode_engine_batch(&bytes).unwrap();
    assert_eq!(encode_engine_batch(&batch), bytes);
    let identifier = doc["inputs"]["identifier"].as_str().unwrap();
    let image = [MediaSpan::new(
        0,
        16,
        media_id_from_identifier(identifier).unwrap(),
    )];
    let want: Vec<SequenceHash> = BlockHasher::builder(16)
        .lora_name("adapter-a")
        .build()
        .unwrap()
        .hash_sequence(&ids(&doc, "token_ids"), &image[..])
        .iter()
        .map(|b| b.sequence)
        .collect();
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let KvCacheEventData::Stored(stored) = cache.convert(&batch.events[0]).unwrap() else {
        panic!("a store");
    };
    let got: Vec<SequenceHash> = stored.blocks.iter().map(|b| b.block_hash).collect();
    assert_eq!(got, want);
    assert!(stored.blocks[1].mm_extra_info.is_none());

    // A sliding-window group's store and removal are skipped; full attention's store is not.
    let (bytes, _) = class_fixture("vllm/classes/sliding_window_group");
    let batch = decode_engine_batch(&bytes).unwrap();
    assert_eq!(encode_engine_batch(&batch), bytes);
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let outcomes: Vec<bool> = batch
        .events
        .iter()
        .map(|e| cache.convert(e).is_ok())
        .collect();
    assert_eq!(outcomes, [false, true, false]);
    assert_eq!(cache.convert(&batch.events[0]), Err(EngineSkip::OtherGroup));
}

#[test]
fn sglang_payloads_decode_and_index_like_vllms() {
    let (bytes, doc) = class_fixture("sglang/text_signed_hashes");
    let batch = decode_engine_batch(&bytes).unwrap();
    let hashes: Vec<u64> = doc["inputs"]["block_hashes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h.as_i64().unwrap() as u64)
        .collect();
    let EngineEvent::Stored(first) = &batch.events[0] else {
        panic!("a store")
    };
    // SGLang leaves the GPU pool's medium out and sends signed hashes.
    assert_eq!(first.medium, None);
    assert_eq!(
        first.block_hashes,
        [EngineHash(hashes[0]), EngineHash(hashes[1])]
    );
    let want = sequence(BlockHasher::builder(16), &ids(&doc, "token_ids"));
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let mut index = Index::new(IndexConfig::default());
    for (id, event) in batch.events.iter().enumerate() {
        let data = cache.convert(event).unwrap();
        index.apply_event(&router_event(id as u64, data)).unwrap();
    }
    // Three blocks stored, the third removed.
    assert_eq!(index.find_matches(&want).workers[0].matched_blocks, 2);

    // Its cache_salt field is the namespace; lora_name the LoRA.
    let (bytes, doc) = class_fixture("sglang/salt_and_lora");
    let batch = decode_engine_batch(&bytes).unwrap();
    let want = sequence(
        BlockHasher::builder(16)
            .lora_name("adapter-a")
            .cache_namespace("tenant-1"),
        &ids(&doc, "token_ids"),
    );
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let KvCacheEventData::Stored(stored) = cache.convert(&batch.events[0]).unwrap() else {
        panic!("a store");
    };
    let got: Vec<SequenceHash> = stored.blocks.iter().map(|b| b.block_hash).collect();
    assert_eq!(got, want);
    // The same salt in the tagged form kvroute's gateway forwards for a tenant: the same
    // namespace.
    let EngineEvent::Stored(mut tagged) = batch.events[0].clone() else {
        panic!("a store");
    };
    tagged.cache_salt = Some(format!("{CACHE_SALT_PREFIX}tenant-1"));
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    let KvCacheEventData::Stored(stored) = cache.convert(&EngineEvent::Stored(tagged)).unwrap()
    else {
        panic!("a store");
    };
    let got: Vec<SequenceHash> = stored.blocks.iter().map(|b| b.block_hash).collect();
    assert_eq!(got, want);

    // Its host tier is skipped; AllBlocksCleared clears; the rank is the attention-DP rank.
    let (bytes, _) = class_fixture("sglang/host_tier_and_clear");
    let batch = decode_engine_batch(&bytes).unwrap();
    assert_eq!(batch.dp_rank, Some(1));
    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
    assert_eq!(
        cache.convert(&batch.events[0]),
        Err(EngineSkip::OtherMedium("CPU_PINNED".into()))
    );
    assert_eq!(
        cache.convert(&batch.events[1]),
        Ok(KvCacheEventData::Cleared)
    );
}
