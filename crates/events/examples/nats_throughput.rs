//! Publishes and ingests KV events through a NATS server and reports end-to-end blocks/s, then
//! the cold start time of an ingestor restoring a snapshot of about 1M (worker, block) entries.
//!
//! ```text
//! nats-server -js -p 4333 -sd /tmp/nats-bench &
//! cargo run --release -p kvroute-events --example nats_throughput -- nats://127.0.0.1:4333
//! ```
//!
//! Optional further arguments: the publishers' `max_message_bytes` and `max_in_flight`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a benchmark fails loudly by design

use kvroute_events::{
    connect, IngestConfig, Ingestor, NatsPublishConfig, NatsPublisher, NatsSource,
    NatsSourceConfig, PublisherConfig, SnapshotSettings, StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{
    BlockHash, DpRank, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, SequenceHash,
    WorkerId,
};
use std::time::{Duration, Instant};

const PUBLISHERS: u64 = 4;
const EVENTS_PER_PUBLISHER: u64 = 25_600;
const BLOCKS_PER_EVENT: u64 = 16;

/// Distinct, full-width 64-bit values (splitmix64's finalizer is a bijection), so messages
/// carry as many bytes per block as real xxh3 hashes do.
fn full_width(x: u64) -> u64 {
    let x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn store(worker: u64, n: u64) -> KvCacheEventData {
    let base = (worker << 40) | (n * BLOCKS_PER_EVENT);
    KvCacheEventData::Stored(KvCacheStoreData {
        parent_hash: None,
        start_position: None,
        blocks: (0..BLOCKS_PER_EVENT)
            .map(|i| KvCacheStoredBlockData {
                block_hash: SequenceHash(full_width(base + i + 1)),
                tokens_hash: BlockHash(full_width(!(base + i))),
                mm_extra_info: None,
            })
            .collect(),
    })
}

fn new_index() -> SharedIndex {
    SharedIndex::new(Index::new(IndexConfig::default()))
}

#[tokio::main]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into());
    let run = std::process::id();
    let stream = StreamSettings::default()
        .with_names(
            &format!("KVBENCH_{run}"),
            &format!("kvbench.{run}.events"),
            &format!("kvbench.{run}.control"),
        )
        .for_component("bench", "sim");
    let mut snapshots = SnapshotSettings::default();
    snapshots.object = format!("bench-{run}");
    snapshots.interval = Duration::from_secs(3600);
    let source_config = NatsSourceConfig::new(stream.clone()).with_snapshots(Some(snapshots));

    let index = new_index();
    let client = connect(&url).await.unwrap();
    let ingestor = Ingestor::spawn(
        NatsSource::new(client.clone(), source_config.clone()),
        index.clone(),
        IngestConfig::default(),
    );
    ingestor.caught_up().await;

    let started = Instant::now();
    let mut publish_config = NatsPublishConfig::default();
    if let Some(bytes) = std::env::args().nth(2) {
        publish_config.max_message_bytes = bytes.parse().unwrap();
    }
    if let Some(in_flight) = std::env::args().nth(3) {
        publish_config.max_in_flight = in_flight.parse().unwrap();
    }
    let mut tasks = Vec::new();
    for w in 0..PUBLISHERS {
        let publisher = NatsPublisher::connect(
            connect(&url).await.unwrap(),
            stream.clone(),
            publish_config.clone(),
            PublisherConfig::new(WorkerId(w)),
        )
        .await
        .unwrap();
        tasks.push(tokio::spawn(async move {
            for chunk in 0..EVENTS_PER_PUBLISHER / 64 {
                let events = (0..64).map(|i| store(w, chunk * 64 + i));
                publisher.publish(DpRank(0), events).await.unwrap();
            }
            publisher.flush().await.unwrap();
            publisher
        }));
    }
    let mut publishers = Vec::new();
    for task in tasks {
        publishers.push(task.await.unwrap());
    }
    let published = started.elapsed();
    let expected = PUBLISHERS * (EVENTS_PER_PUBLISHER / 64 * 64);
    while ingestor.stats().events_applied < expected {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let elapsed = started.elapsed();
    let blocks = expected * BLOCKS_PER_EVENT;
    println!(
        "end to end: {blocks} blocks in {:.2} s (published in {:.2} s): {:.0} blocks/s",
        elapsed.as_secs_f64(),
        published.as_secs_f64(),
        blocks as f64 / elapsed.as_secs_f64()
    );
    println!("index: {:?}", index.stats().blocks);
    ingestor.shutdown().await.unwrap(); // writes the snapshot

    let started = Instant::now();
    let restored = new_index();
    let ingestor = Ingestor::spawn(
        NatsSource::new(client, source_config),
        restored.clone(),
        IngestConfig::default(),
    );
    ingestor.caught_up().await;
    println!(
        "cold start from a snapshot of {} entries: {:.3} s (restored: {})",
        restored.stats().blocks,
        started.elapsed().as_secs_f64(),
        ingestor.stats().snapshots_restored
    );
    drop(publishers);
}
