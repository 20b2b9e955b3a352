//! The in-process bus end to end: publishers, ingestor, gap healing, incarnations.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{converge, SimWorker};
use kvroute_events::{in_process_bus, EventBatch, IngestConfig, Ingestor, PublisherConfig};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, WorkerId};
use std::time::Duration;

fn new_index() -> SharedIndex {
    SharedIndex::new(Index::new(IndexConfig::default()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_publishers_converge() {
    let index = new_index();
    let (bus, source) = in_process_bus(64);
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
    let mut tasks = Vec::new();
    for w in 0..3 {
        let publisher = bus.publisher(PublisherConfig::new(WorkerId(w)).with_incarnation(1));
        tasks.push(tokio::spawn(async move {
            let mut worker = SimWorker::new(WorkerId(w), w + 1);
            worker.run(&publisher, 10_000, 16).await;
            worker
        }));
    }
    let mut workers = Vec::new();
    for task in tasks {
        workers.push(task.await.unwrap());
    }
    converge(&index, &workers, 20).await;
    assert!(ingestor.is_caught_up());
    let stats = ingestor.stats();
    assert_eq!(stats.events_applied, 30_000);
    assert_eq!((stats.gaps, stats.duplicates, stats.malformed), (0, 0, 0));
    ingestor.shutdown().await.unwrap();
}

#[tokio::test]
async fn an_injected_gap_is_healed_by_a_full_state_resend() {
    let index = new_index();
    let (bus, source) = in_process_bus(64);
    let config = IngestConfig::default().with_resync_retry(Duration::from_millis(200));
    let ingestor = Ingestor::spawn(source, index.clone(), config);
    let publisher = bus.publisher(PublisherConfig::new(WorkerId(1)).with_incarnation(5));
    let mut worker = SimWorker::new(WorkerId(1), 9);
    worker.run(&publisher, 500, 8).await;
    converge(&index, std::slice::from_ref(&worker), 10).await;

    // Ids 0..500 were published; an event with id 501 means 500 was lost.
    let ahead = RouterEvent::new(
        WorkerId(1),
        KvCacheEvent {
            event_id: 501,
            dp_rank: DpRank(0),
            data: worker.clone().step(),
        },
    );
    bus.send_batch(EventBatch {
        worker_id: WorkerId(1),
        incarnation: 5,
        events: vec![ahead],
    })
    .await
    .unwrap();
    // The publisher answers the request with its full state; later events apply in order.
    worker.run(&publisher, 200, 8).await;
    converge(&index, std::slice::from_ref(&worker), 10).await;
    let stats = ingestor.stats();
    assert_eq!(stats.gaps, 1);
    assert!(stats.resyncs_requested >= 1);
    assert_eq!(stats.resyncs_completed, 1);
}

#[tokio::test]
async fn a_forgotten_worker_that_comes_back_is_asked_for_its_full_state() {
    let index = new_index();
    let (bus, source) = in_process_bus(64);
    let config = IngestConfig::default().with_resync_retry(Duration::from_millis(200));
    let ingestor = Ingestor::spawn(source, index.clone(), config);
    let publisher = bus.publisher(PublisherConfig::new(WorkerId(4)).with_incarnation(1));
    let mut worker = SimWorker::new(WorkerId(4), 3);
    worker.run(&publisher, 300, 8).await;
    converge(&index, std::slice::from_ref(&worker), 10).await;

    // Its registration expired (say, a partition): the membership follower forgets it.
    ingestor.control().forget_worker(WorkerId(4));
    // Commands are applied between messages: one more batch lets the task see it.
    worker.run(&publisher, 1, 8).await;
    tokio::time::timeout(Duration::from_secs(10), async {
        while ingestor.stats().workers_forgotten == 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await
    .expect("the task forgets the worker");
    // Back with the same cache: its next events are no start of a cache, so instead of
    // building on an index that lost what came before, it is asked for its full state.
    worker.run(&publisher, 100, 8).await;
    converge(&index, std::slice::from_ref(&worker), 10).await;
    let stats = ingestor.stats();
    assert!(stats.resyncs_requested >= 1, "{stats:?}");
    assert_eq!(stats.resyncs_completed, 1, "{stats:?}");
}

#[tokio::test]
async fn a_restarted_worker_replaces_its_old_entries_and_stale_events_are_ignored() {
    let index = new_index();
    let (bus, source) = in_process_bus(64);
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
    let old = bus.publisher(PublisherConfig::new(WorkerId(3)).with_incarnation(1));
    let mut before = SimWorker::new(WorkerId(3), 1);
    before.run(&old, 300, 10).await;
    converge(&index, std::slice::from_ref(&before), 10).await;

    let new = bus.publisher(PublisherConfig::new(WorkerId(3)).with_incarnation(2));
    let mut after = SimWorker::new(WorkerId(3), 2);
    after.run(&new, 1, 1).await;
    converge(&index, std::slice::from_ref(&after), 10).await;
    // The old process is still talking: fenced off.
    before.run(&old, 50, 10).await;
    after.run(&new, 100, 10).await;
    converge(&index, std::slice::from_ref(&after), 10).await;
    let stats = ingestor.stats();
    assert_eq!(stats.incarnation_changes, 1);
    assert_eq!(stats.stale_incarnation, 50);
}

#[tokio::test]
async fn a_batch_naming_another_worker_is_malformed_and_skipped() {
    let index = new_index();
    let (bus, source) = in_process_bus(8);
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
    let event = RouterEvent::new(
        WorkerId(2),
        KvCacheEvent {
            event_id: 0,
            dp_rank: DpRank(0),
            data: KvCacheEventData::Cleared,
        },
    );
    for _ in 0..3 {
        bus.send_batch(EventBatch {
            worker_id: WorkerId(1),
            incarnation: 1,
            events: vec![event.clone()],
        })
        .await
        .unwrap();
    }
    drop(bus);
    ingestor.caught_up().await;
    while ingestor.stats().malformed < 3 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(ingestor.stats().events_applied, 0);
    assert_eq!(index.stats().workers, 0);
}
