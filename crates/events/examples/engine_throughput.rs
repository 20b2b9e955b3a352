//! Measures the engine (vLLM/SGLang ZeroMQ) event path: the cost per block of re-hashing an
//! event's token ids, of decoding and converting whole events, and blocks/s ingested end to
//! end from one vLLM-wire publisher over TCP loopback into the index.
//!
//! ```text
//! cargo run --release -p kvroute-events --example engine_throughput [rehash|decode|e2e]
//! ```
//!
//! Without an argument it runs all three parts.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use kvroute_blockhash::{BlockHash, BlockHasher, NoMedia};
use kvroute_events::{
    decode_engine_batch, encode_engine_batch, EngineBatch, EngineCache, EngineCacheConfig,
    EngineEndpoint, EngineEvent, EngineHash, EnginePublisher, EnginePublisherConfig, EngineRemoved,
    EngineSource, EngineSourceConfig, EngineStored, ExtraKey, IngestConfig, Ingestor,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::WorkerId;
use std::hint::black_box;
use std::time::{Duration, Instant};

const RUNS: usize = 3;
const POOL_BLOCKS: usize = 1 << 16;

/// splitmix64: distinct full-width values.
fn mix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Token ids of a Qwen-sized vocabulary.
fn tokens(n: usize, seed: u64) -> Vec<u32> {
    (0..n as u64)
        .map(|i| (mix(seed ^ i) % 151_000) as u32)
        .collect()
}

/// An event storing `blocks` new blocks of a fresh sequence, as vLLM writes it.
fn event(seq: u64, blocks: usize, block_size: u32) -> EngineEvent {
    EngineEvent::Stored(EngineStored {
        block_hashes: (0..blocks as u64)
            .map(|i| EngineHash(mix(seq << 20 | i)))
            .collect(),
        parent: None,
        token_ids: tokens(blocks * block_size as usize, seq),
        block_size,
        medium: Some("GPU".into()),
        extra_keys: Some(vec![None::<Vec<ExtraKey>>; blocks]),
        group_idx: Some(0),
        kv_cache_spec_kind: Some("full_attention".into()),
        ..EngineStored::default()
    })
}

fn spread(mut samples: Vec<f64>) -> String {
    samples.sort_by(f64::total_cmp);
    format!(
        "{:.2} / {:.2} / {:.2}",
        samples[0],
        samples[samples.len() / 2],
        samples[samples.len() - 1]
    )
}

fn rehash() {
    println!("re-hashing token ids (ns per block, min / median / max of {RUNS} runs)");
    for block_size in [16u32, 32, 64, 128] {
        let blocks = 1 << 20;
        let tokens = tokens(blocks * block_size as usize, 7);
        let hasher = BlockHasher::new(block_size).unwrap();
        let mut out: Vec<BlockHash> = Vec::with_capacity(blocks);
        let samples = (0..RUNS)
            .map(|_| {
                out.clear();
                let start = Instant::now();
                hasher.block_hashes_into(black_box(&tokens), &NoMedia, &mut out);
                black_box(&out);
                start.elapsed().as_nanos() as f64 / blocks as f64
            })
            .collect();
        println!("  block size {block_size:>3}: {}", spread(samples));
    }
}

fn decode_and_convert() {
    println!("decode + convert (EngineCache: re-hash, chain, engine-hash map), ns per block");
    for blocks_per_event in [1usize, 16, 64] {
        let events = (1 << 18) / blocks_per_event;
        let payloads: Vec<Vec<u8>> = (0..events as u64)
            .map(|seq| {
                encode_engine_batch(&EngineBatch {
                    ts: 0.0,
                    events: vec![event(seq, blocks_per_event, 16)],
                    dp_rank: Some(0),
                })
            })
            .collect();
        let total = (events * blocks_per_event) as f64;
        let mut decode = Vec::new();
        let mut both = Vec::new();
        for _ in 0..RUNS {
            let start = Instant::now();
            for payload in &payloads {
                black_box(decode_engine_batch(payload).unwrap());
            }
            decode.push(start.elapsed().as_nanos() as f64 / total);
            let mut cache = EngineCache::new(EngineCacheConfig::new(16)).unwrap();
            let start = Instant::now();
            for payload in &payloads {
                for event in &decode_engine_batch(payload).unwrap().events {
                    black_box(cache.convert(event).unwrap());
                }
            }
            both.push(start.elapsed().as_nanos() as f64 / total);
        }
        println!(
            "  {blocks_per_event:>2} blocks/event: decode {}, decode + convert {}",
            spread(decode),
            spread(both)
        );
    }
}

/// This process's CPU time so far (user + system), in seconds, from /proc (Linux).
fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime and stime are 14 and 15.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    ticks / 100.0
}

async fn end_to_end(blocks_per_event: usize, total_blocks: usize) -> (f64, f64, u64) {
    let config = EnginePublisherConfig::new("tcp://127.0.0.1:0").with_replay("tcp://127.0.0.1:0");
    let mut publisher = EnginePublisher::bind(config).await.unwrap();
    let worker = EngineEndpoint::new(WorkerId(1), publisher.endpoint())
        .with_replay(publisher.replay_endpoint().map(str::to_owned));
    let index = SharedIndex::new(Index::new(IndexConfig::default()));
    let ingestor = Ingestor::spawn(
        EngineSource::new(EngineSourceConfig::new(vec![worker], 16)),
        index.clone(),
        IngestConfig::default(),
    );
    // Wait for the subscription: probes until one is applied.
    let mut seq = 1u64 << 40;
    while ingestor.stats().events_applied == 0 {
        publisher.publish(vec![event(seq, 1, 16)]).await.unwrap();
        seq += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every batch is encoded before the clock starts: the publisher side measures sending.
    // A GPU pool of 65,536 blocks (1M tokens): once full, every batch evicts as many blocks
    // as it stores, one BlockRemoved per block as vLLM sends them.
    let events = total_blocks / blocks_per_event;
    let pool_events = (POOL_BLOCKS / blocks_per_event) as u64;
    let batches: Vec<EngineBatch> = (0..events as u64)
        .map(|seq| {
            let mut batch = Vec::new();
            if let Some(old) = seq.checked_sub(pool_events) {
                let EngineEvent::Stored(old) = event(old, blocks_per_event, 16) else {
                    unreachable!()
                };
                batch.extend(old.block_hashes.into_iter().map(|hash| {
                    EngineEvent::Removed(EngineRemoved {
                        block_hashes: vec![hash],
                        medium: Some("GPU".into()),
                        group_idx: Some(0),
                    })
                }));
            }
            batch.push(event(seq, blocks_per_event, 16));
            EngineBatch {
                ts: 0.0,
                events: batch,
                dp_rank: Some(0),
            }
        })
        .collect();
    // One ingested batch per message (runs of removals become one index event).
    let before = ingestor.stats().batches;
    let start = Instant::now();
    let cpu = cpu_seconds();
    for batch in &batches {
        publisher.publish_batch(batch).await.unwrap();
    }
    while ingestor.stats().batches < before + events as u64 {
        tokio::time::sleep(Duration::from_micros(200)).await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu;
    let stats = ingestor.stats();
    ingestor.shutdown().await.unwrap();
    let blocks = (events * blocks_per_event) as f64;
    (blocks / elapsed, blocks / cpu, stats.gaps)
}

fn main() {
    let part = std::env::args().nth(1).unwrap_or_default();
    let all = part.is_empty();
    if all || part == "rehash" {
        rehash();
    }
    if all || part == "decode" {
        decode_and_convert();
    }
    if all || part == "e2e" {
        end_to_end_sweep();
    }
}

fn end_to_end_sweep() {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    println!(
        "end to end, one publisher over TCP loopback, block size 16, a pool of {POOL_BLOCKS} \
         blocks evicting as it stores (M blocks stored/s; gaps)"
    );
    for blocks_per_event in [16usize, 64, 256] {
        let mut rates = Vec::new();
        let mut per_cpu = Vec::new();
        let mut gaps = 0;
        for _ in 0..RUNS {
            let (rate, cpu_rate, g) = runtime.block_on(end_to_end(blocks_per_event, 1 << 20));
            rates.push(rate / 1e6);
            per_cpu.push(cpu_rate / 1e6);
            gaps += g;
        }
        println!(
            "  {blocks_per_event:>3} blocks/event: {} wall, {} per CPU-second of the process \
             (publisher and ingestor together; gaps healed through replay: {gaps})",
            spread(rates),
            spread(per_cpu)
        );
    }
}
