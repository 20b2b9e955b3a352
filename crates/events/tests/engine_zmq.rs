//! The engine source against the vLLM-wire publisher over real ZeroMQ TCP sockets: ordered
//! batches reach the index, a lost PUB message is healed through the replay socket, a
//! restarted engine's entries are dropped and rebuilt.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::{BlockHasher, NoMedia};
use kvroute_events::{
    EngineEndpoint, EngineEvent, EngineHash, EnginePublisher, EnginePublisherConfig, EngineSource,
    EngineSourceConfig, EngineStored, IngestConfig, Ingestor,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{SequenceHash, WorkerId};
use std::time::{Duration, Instant};

const BLOCK: u32 = 4;

/// A prompt of `blocks` blocks whose tokens start at `first`, stored after `parent`.
fn stored(first: u32, blocks: u32, parent: Option<u64>) -> (EngineEvent, Vec<SequenceHash>) {
    let tokens: Vec<u32> = (first..first + blocks * BLOCK).collect();
    let hashes: Vec<EngineHash> = (0..blocks)
        .map(|i| EngineHash(u64::from(first) << 16 | u64::from(i)))
        .collect();
    let ours = BlockHasher::new(BLOCK)
        .unwrap()
        .hash_sequence(&tokens, &NoMedia)
        .iter()
        .map(|b| b.sequence)
        .collect();
    let event = EngineEvent::Stored(EngineStored {
        block_hashes: hashes,
        parent: parent.map(EngineHash),
        token_ids: tokens,
        block_size: BLOCK,
        medium: Some("GPU".into()),
        ..EngineStored::default()
    });
    (event, ours)
}

async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn matched(index: &SharedIndex, query: &[SequenceHash]) -> usize {
    index
        .find_matches(query)
        .workers
        .first()
        .map_or(0, |w| w.matched_blocks)
}

async fn publisher(port: u16, replay: u16) -> EnginePublisher {
    let config = EnginePublisherConfig::new(format!("tcp://127.0.0.1:{port}"))
        .with_replay(format!("tcp://127.0.0.1:{replay}"));
    EnginePublisher::bind(config).await.unwrap()
}

fn port_of(endpoint: &str) -> u16 {
    endpoint.rsplit(':').next().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_heal_through_replay_and_restarts_rebuild() {
    let mut engine = publisher(0, 0).await;
    let (port, replay) = (
        port_of(engine.endpoint()),
        port_of(engine.replay_endpoint().unwrap()),
    );
    let worker = EngineEndpoint::new(WorkerId(3), engine.endpoint())
        .with_replay(engine.replay_endpoint().map(str::to_owned));
    let index = SharedIndex::new(Index::new(IndexConfig::default()));
    let ingestor = Ingestor::spawn(
        EngineSource::new(EngineSourceConfig::new(vec![worker], BLOCK)),
        index.clone(),
        IngestConfig::default(),
    );

    // Until the subscription is up, PUB drops what it sends: the first batch that arrives
    // makes the source fetch the earlier ones from the replay socket.
    let (first, first_ours) = stored(100, 3, None);
    engine.publish(vec![first]).await.unwrap();
    let mut probes = 0;
    while matched(&index, &first_ours) < 3 {
        let (probe, _) = stored(10_000 + probes, 1, None);
        engine.publish(vec![probe]).await.unwrap();
        probes += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(probes < 200, "the subscription never delivered");
    }

    // A batch lost on the way: the next one reveals the gap, replay brings it back.
    let (lost, lost_ours) = stored(200, 2, None);
    engine.publish_lost(vec![lost]);
    let (after, after_ours) = stored(300, 2, None);
    engine.publish(vec![after]).await.unwrap();
    eventually("the lost batch healed", || {
        matched(&index, &lost_ours) == 2 && matched(&index, &after_ours) == 2
    })
    .await;
    let stats = ingestor.stats();
    assert!(stats.gaps >= 1 && stats.resyncs_completed >= 1, "{stats:?}");
    assert_eq!(stats.gaps_unhealed, 0);

    // The engine restarts on the same ports: its numbering starts over, its cache is empty.
    drop(engine);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut engine = publisher(port, replay).await;
    let (fresh, fresh_ours) = stored(400, 2, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    engine.publish(vec![fresh.clone()]).await.unwrap();
    while matched(&index, &fresh_ours) < 2 {
        assert!(
            Instant::now() < deadline,
            "the restarted engine was never heard"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        engine
            .publish(vec![EngineEvent::Cleared, fresh.clone()])
            .await
            .unwrap();
    }
    assert_eq!(
        matched(&index, &first_ours),
        0,
        "old entries survived the restart"
    );
    assert_eq!(matched(&index, &lost_ours), 0);
    assert!(ingestor.stats().incarnation_changes >= 1);
    ingestor.shutdown().await.unwrap();
}
