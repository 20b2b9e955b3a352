//! The JetStream transport end to end against a real nats-server started by each test:
//! server kills, snapshots, gaps healed over the control subject, malformed messages.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{converge, SimWorker};
use kvroute_events::{
    connect, EventBatch, IngestConfig, Ingestor, NatsPublishConfig, NatsPublisher, NatsSource,
    NatsSourceConfig, Publisher, PublisherConfig, SnapshotSettings, StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, WorkerId};
use kvroute_testsupport::NatsServer;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn new_index() -> SharedIndex {
    SharedIndex::new(Index::new(IndexConfig::default()))
}

fn settings() -> StreamSettings {
    StreamSettings::default().for_component("test", "sim")
}

async fn publisher(server: &NatsServer, worker: u64, incarnation: u64) -> Publisher {
    let client = connect(&server.url()).await.unwrap();
    NatsPublisher::connect(
        client,
        settings(),
        NatsPublishConfig::default().with_ack_timeout(Duration::from_millis(800)),
        PublisherConfig::new(WorkerId(worker)).with_incarnation(incarnation),
    )
    .await
    .unwrap()
}

async fn ingestor(
    server: &NatsServer,
    index: &SharedIndex,
    snapshots: Option<SnapshotSettings>,
) -> Ingestor {
    let client = connect(&server.url()).await.unwrap();
    let mut config = NatsSourceConfig::new(settings()).with_snapshots(snapshots);
    config.max_message_bytes = 256 << 10;
    let source = NatsSource::new(client, config);
    let config = IngestConfig::default().with_resync_retry(Duration::from_millis(500));
    Ingestor::spawn(source, index.clone(), config)
}

fn snapshot_settings() -> SnapshotSettings {
    let mut settings = SnapshotSettings::default();
    settings.interval = Duration::from_secs(3600);
    settings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publishers_survive_two_server_kills() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let mut server = NatsServer::start().await;
    let index = new_index();
    let ingest = ingestor(&server, &index, None).await;
    let progress = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for w in 0..3 {
        let publisher = publisher(&server, w, 1).await;
        let progress = Arc::clone(&progress);
        tasks.push(tokio::spawn(async move {
            let mut worker = SimWorker::new(WorkerId(w), w + 11);
            for _ in 0..1000 {
                worker.run(&publisher, 10, 10).await;
                progress.fetch_add(10, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_micros(200)).await;
            }
            publisher.flush().await.unwrap();
            (worker, publisher) // workers live on: they answer full-state requests
        }));
    }
    for threshold in [8_000, 18_000] {
        while progress.load(Ordering::Relaxed) < threshold {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        server.kill().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        server.restart().await;
    }
    let mut workers = Vec::new();
    let mut publishers = Vec::new();
    for task in tasks {
        let (worker, publisher) = task.await.unwrap();
        workers.push(worker);
        publishers.push(publisher);
    }
    converge(&index, &workers, 60).await;
    let stats = ingest.stats();
    eprintln!("{stats:?}");
    assert!(stats.consumer_restarts >= 1, "{stats:?}");
    assert_eq!(stats.malformed, 0);
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_restore_and_consumers_converge_to_identical_indexes() {
    let server = NatsServer::start().await;
    let first = new_index();
    let ingest = ingestor(&server, &first, Some(snapshot_settings())).await;
    let p1 = publisher(&server, 1, 1).await;
    let p2 = publisher(&server, 2, 1).await;
    let mut w1 = SimWorker::new(WorkerId(1), 5);
    let mut w2 = SimWorker::new(WorkerId(2), 6);
    w1.run(&p1, 2000, 20).await;
    w2.run(&p2, 2000, 20).await;
    p1.flush().await.unwrap();
    p2.flush().await.unwrap();
    converge(&first, &[w1.clone(), w2.clone()], 30).await;
    ingest.shutdown().await.unwrap(); // writes the snapshot

    // More events while no consumer runs; the restarted one replays only the tail.
    w1.run(&p1, 500, 20).await;
    p1.flush().await.unwrap();
    let restored = new_index();
    let ingest = ingestor(&server, &restored, Some(snapshot_settings())).await;
    ingest.caught_up().await;
    converge(&restored, &[w1.clone(), w2.clone()], 30).await;
    let stats = ingest.stats();
    assert_eq!(stats.snapshots_restored, 1);
    assert!(
        stats.events_applied <= 500,
        "replayed more than the tail: {stats:?}"
    );

    // A consumer started later, from the stream's start, converges to identical bytes.
    let again = new_index();
    let from_scratch = ingestor(&server, &again, None).await;
    let later = new_index();
    from_scratch.caught_up().await;
    let from_scratch_later = ingestor(&server, &later, None).await;
    from_scratch_later.caught_up().await;
    converge(&later, &[w1.clone(), w2.clone()], 30).await;
    assert!(again.snapshot() == later.snapshot(), "dumps differ");
    ingest.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unusable_snapshot_starts_empty_and_asks_everyone_for_full_state() {
    let server = NatsServer::start().await;
    let index = new_index();
    let ingest = ingestor(&server, &index, Some(snapshot_settings())).await;
    let p1 = publisher(&server, 1, 1).await;
    let mut w1 = SimWorker::new(WorkerId(1), 8);
    w1.run(&p1, 300, 10).await;
    p1.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&w1), 30).await;
    ingest.shutdown().await.unwrap();

    // The stream loses what follows the snapshot.
    w1.run(&p1, 100, 10).await;
    p1.flush().await.unwrap();
    let client = connect(&server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    js.get_stream(&settings().stream)
        .await
        .unwrap()
        .purge()
        .await
        .unwrap();

    let fresh = new_index();
    let ingest = ingestor(&server, &fresh, Some(snapshot_settings())).await;
    converge(&fresh, std::slice::from_ref(&w1), 30).await;
    let stats = ingest.stats();
    assert_eq!(stats.snapshots_unusable, 1);
    assert_eq!(stats.snapshots_restored, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gaps_heal_over_the_control_subject_and_malformed_messages_are_skipped() {
    let server = NatsServer::start().await;
    let index = new_index();
    let ingest = ingestor(&server, &index, None).await;
    let p1 = publisher(&server, 1, 3).await;
    let mut w1 = SimWorker::new(WorkerId(1), 4);
    w1.run(&p1, 200, 10).await;
    p1.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&w1), 30).await;

    let client = connect(&server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let subject = settings().event_subject(WorkerId(1));
    let skipped = EventBatch {
        worker_id: WorkerId(1),
        incarnation: 3,
        events: vec![RouterEvent::new(
            WorkerId(1),
            KvCacheEvent {
                event_id: 201, // 200 never arrives
                dp_rank: DpRank(0),
                data: KvCacheEventData::Cleared,
            },
        )],
    };
    let valid = serde_json::to_vec(&skipped).unwrap();
    let garbage: Vec<Vec<u8>> = vec![
        b"\x00\x01garbage".to_vec(),
        valid[..valid.len() / 2].to_vec(),
        br#"{"worker_id":"one","incarnation":3,"events":[]}"#.to_vec(),
        vec![b'['; 600 << 10], // over the source's 256 KiB limit, under NATS's 1 MiB
    ];
    for body in &garbage {
        js.publish(subject.clone(), body.clone().into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    // A gap that ends in `cleared` needs no resend; one in a store does.
    let mut gap = skipped.clone();
    gap.events[0].event.data = w1.clone().step();
    js.publish(subject.clone(), serde_json::to_vec(&gap).unwrap().into())
        .await
        .unwrap()
        .await
        .unwrap();
    w1.run(&p1, 100, 10).await;
    p1.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&w1), 30).await;
    let stats = ingest.stats();
    assert_eq!(stats.malformed, 4, "{stats:?}");
    assert_eq!(stats.gaps, 1, "{stats:?}");
    assert!(stats.resyncs_completed >= 1, "{stats:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn caught_up_while_other_components_keep_publishing() {
    let server = NatsServer::start().await;
    let p1 = publisher(&server, 1, 1).await;
    let mut w1 = SimWorker::new(WorkerId(1), 2);
    w1.run(&p1, 50, 10).await;
    p1.flush().await.unwrap();
    // The stream's last message belongs to another component.
    let other = NatsPublisher::connect(
        connect(&server.url()).await.unwrap(),
        StreamSettings::default().for_component("test", "other"),
        NatsPublishConfig::default(),
        PublisherConfig::new(WorkerId(9)),
    )
    .await
    .unwrap();
    SimWorker::new(WorkerId(9), 3).run(&other, 20, 10).await;
    other.flush().await.unwrap();

    let index = new_index();
    let ingest = ingestor(&server, &index, None).await;
    tokio::time::timeout(Duration::from_secs(10), ingest.caught_up())
        .await
        .unwrap();
    converge(&index, std::slice::from_ref(&w1), 10).await;
    assert_eq!(ingest.stats().events_applied, 50);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_publisher_replaces_its_old_entries() {
    let server = NatsServer::start().await;
    let index = new_index();
    let ingest = ingestor(&server, &index, None).await;
    let old = publisher(&server, 4, 10).await;
    let mut before = SimWorker::new(WorkerId(4), 1);
    before.run(&old, 300, 10).await;
    old.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&before), 20).await;

    let new = publisher(&server, 4, 11).await;
    let mut after = SimWorker::new(WorkerId(4), 2);
    after.run(&new, 1, 1).await;
    new.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&after), 20).await;
    // The old process, still talking, is fenced off.
    before.run(&old, 30, 10).await;
    old.flush().await.unwrap();
    after.run(&new, 50, 10).await;
    new.flush().await.unwrap();
    converge(&index, std::slice::from_ref(&after), 20).await;
    let stats = ingest.stats();
    assert_eq!(stats.incarnation_changes, 1, "{stats:?}");
    assert_eq!(stats.stale_incarnation, 30, "{stats:?}");
}
