//! vLLM's and SGLang's ZeroMQ KV events: a `KVEventBatch` payload as any process that can
//! reach a worker's event port could publish it, decoded, then each event converted into
//! kvroute's events (re-hashing the blocks' tokens) as the engine source does. Decoding must
//! refuse malformed input with a typed error, whatever lengths it claims, and what decodes
//! must encode to bytes that decode and encode to themselves.

#![no_main]

use kvroute_events::{decode_engine_batch, encode_engine_batch, EngineCache, EngineCacheConfig};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|payload: &[u8]| {
    let Ok(batch) = decode_engine_batch(payload) else {
        return;
    };
    let encoded = encode_engine_batch(&batch);
    let again = decode_engine_batch(&encoded).expect("an encoded batch decodes");
    assert_eq!(encode_engine_batch(&again), encoded);

    let mut cache = EngineCache::new(EngineCacheConfig::new(16)).expect("block size 16 hashes");
    for event in &batch.events {
        let _ = cache.convert(event);
    }
});
