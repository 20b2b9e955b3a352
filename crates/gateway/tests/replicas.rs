//! Router replicas sharing their load over a real nats-server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_dispatch::{CostConfig, Registry, TieBreaker, Worker};
use kvroute_events::{connect, join_replicas, ReplicaSyncSettings};
use kvroute_gateway::sync_replicas;
use kvroute_protocol::WorkerId;
use kvroute_testsupport::NatsServer;
use std::time::{Duration, Instant};

fn registry() -> Registry {
    let registry = Registry::default();
    for id in 1..=2 {
        registry.upsert(Worker::new(WorkerId(id), format!("http://10.0.0.{id}:8000")).unwrap());
    }
    registry
}

/// (active requests, pending prefill blocks) of `worker` as `registry` sees it.
fn load(registry: &Registry, worker: u64) -> (u64, u64) {
    let eligible = registry.eligible(Instant::now());
    let w = eligible
        .iter()
        .find(|w| w.worker().id == WorkerId(worker))
        .unwrap();
    (w.active_requests(), w.pending_prefill_blocks())
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_see_each_others_load_and_forget_a_silent_one() {
    let server = NatsServer::start().await;
    let settings = ReplicaSyncSettings::default()
        .for_component("test", "replicas")
        .with_timing(
            Duration::from_millis(10),
            Duration::from_millis(100),
            Duration::from_millis(400),
        );
    let (a, b, c) = (registry(), registry(), registry());
    let mut tasks = Vec::new();
    for (registry, name) in [(&a, "a"), (&b, "b"), (&c, "c")] {
        let (sender, receiver) =
            join_replicas(connect(&server.url()).await.unwrap(), &settings, name)
                .await
                .unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(sync_replicas(
            registry.clone(),
            sender,
            receiver,
            settings.clone(),
            async {
                let _ = stopped.await;
            },
        ));
        tasks.push((stop, task));
    }
    until("every replica sees the two others", || {
        [&a, &b, &c].iter().all(|r| r.replica_count() == 2)
    })
    .await;

    // Replica a sends a request of 8 blocks to worker 1; b and c count it, a counts it once.
    let eligible = a.eligible(Instant::now());
    let worker = eligible
        .iter()
        .find(|w| w.worker().id == WorkerId(1))
        .unwrap();
    let row = kvroute_dispatch::decide(
        8,
        [worker.candidate(0)],
        &CostConfig::default(),
        &mut TieBreaker::with_seed(1),
    )
    .unwrap()
    .table[0];
    let mut guard = worker.start_request(&row);
    until("b and c see a's request", || {
        load(&b, 1) == (1, 8) && load(&c, 1) == (1, 8)
    })
    .await;
    assert_eq!(load(&a, 1), (1, 8));
    assert_eq!(load(&b, 2), (0, 0));
    guard.prefill_done();
    until("b sees the prefill done", || load(&b, 1) == (1, 0)).await;

    // c stops gracefully: the others forget it at once (its leaving report), long before expiry.
    let (stop_c, task_c) = tasks.pop().unwrap();
    stop_c.send(()).unwrap();
    task_c.await.unwrap();
    let left = Instant::now();
    until("a and b forget c", || {
        a.replica_count() == 1 && b.replica_count() == 1
    })
    .await;
    assert!(
        left.elapsed() < Duration::from_millis(400),
        "{:?}",
        left.elapsed()
    );

    // a crashes with its request in flight (no leaving report): b drops a's load at expiry.
    let (_stop_a, task_a) = tasks.remove(0);
    task_a.abort();
    assert_eq!(load(&b, 1), (1, 0));
    until("b forgets a", || {
        b.replica_count() == 0 && load(&b, 1) == (0, 0)
    })
    .await;
    drop(guard);
}
