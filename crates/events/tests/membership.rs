//! Worker registration in a NATS KV bucket against a real nats-server: joins, clean leaves,
//! crashes that expire, changed records, garbage, and a NATS restart that must not empty the
//! registry.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_events::{
    connect, ensure_bucket, watch_members, LeftReason, MembershipChange, MembershipSettings,
    Registration,
};
use kvroute_protocol::{WorkerId, WorkerRecord};
use kvroute_testsupport::NatsServer;
use std::time::Duration;
use tokio::sync::mpsc::Receiver;

async fn next(changes: &mut Receiver<MembershipChange>, within: Duration) -> MembershipChange {
    tokio::time::timeout(within, changes.recv())
        .await
        .expect("no membership change in time")
        .expect("the watcher stopped")
}

async fn quiet(changes: &mut Receiver<MembershipChange>, for_: Duration) {
    if let Ok(change) = tokio::time::timeout(for_, changes.recv()).await {
        panic!("unexpected change {change:?}");
    }
}

fn left(id: u64, reason: LeftReason) -> MembershipChange {
    MembershipChange::Left {
        worker_id: WorkerId(id),
        reason,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn workers_join_leave_expire_and_survive_a_nats_restart() {
    let mut server = NatsServer::start().await;
    let settings = MembershipSettings::default()
        .for_component("test", "vl")
        .with_ttl(Duration::from_secs(2));
    let client = connect(&server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let store = ensure_bucket(&js, &settings).await.unwrap();

    // One worker registered before the router starts watching, one after.
    let one = WorkerRecord::new(WorkerId(1), "http://127.0.0.1:9001").with_block_size(32);
    let first = Registration::start(store.clone(), &settings, &one)
        .await
        .unwrap();
    let mut changes = watch_members(client.clone(), store.clone(), &settings);
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        MembershipChange::Joined(one.clone())
    );
    let two = WorkerRecord::new(WorkerId(2), "http://127.0.0.1:9002");
    let second = Registration::start(store.clone(), &settings, &two)
        .await
        .unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        MembershipChange::Joined(two.clone())
    );

    // Garbage under the prefix and other components' workers are ignored; heartbeats are silent.
    store
        .put("test.vl.99", "not a record".into())
        .await
        .unwrap();
    let other = MembershipSettings::default().for_component("test", "other");
    let elsewhere = Registration::start(
        store.clone(),
        &other,
        &WorkerRecord::new(WorkerId(5), "http://h:1"),
    )
    .await
    .unwrap();
    quiet(&mut changes, Duration::from_secs(3)).await;

    // A clean shutdown is seen at once.
    first.deregister().await;
    assert_eq!(
        next(&mut changes, Duration::from_secs(2)).await,
        left(1, LeftReason::Deregistered)
    );

    // NATS down for longer than the TTL: nobody expires; the heartbeat resumes after.
    server.kill().await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    server.restart().await;
    quiet(&mut changes, Duration::from_secs(5)).await;

    // A restarted worker with a new URL re-joins with it.
    drop(second);
    let moved = WorkerRecord::new(WorkerId(2), "http://127.0.0.1:9102");
    let second = Registration::start(store.clone(), &settings, &moved)
        .await
        .unwrap();
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        MembershipChange::Joined(moved)
    );

    // A crash (no deregistration) expires after the TTL.
    drop(second);
    assert_eq!(
        next(&mut changes, Duration::from_secs(5)).await,
        left(2, LeftReason::Expired)
    );
    elsewhere.deregister().await;
}
