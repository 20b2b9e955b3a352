//! The event stream, the registration bucket and the snapshot store with 3 replicas on a
//! 3-node NATS cluster, through a node's SIGKILL and restart.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{converge, SimWorker};
use kvroute_events::{
    connect, ensure_bucket, watch_members, IngestConfig, Ingestor, MembershipChange,
    MembershipSettings, NatsPublishConfig, NatsPublisher, NatsSource, NatsSourceConfig, Publisher,
    PublisherConfig, Registration, SnapshotSettings, StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{WorkerId, WorkerRecord};
use kvroute_testsupport::NatsCluster;
use std::time::Duration;

fn stream() -> StreamSettings {
    let mut settings = StreamSettings::default().for_component("test", "cluster");
    settings.replicas = 3;
    settings
}

fn new_index() -> SharedIndex {
    SharedIndex::new(Index::new(IndexConfig::default()))
}

async fn publisher(cluster: &NatsCluster, worker: u64) -> Publisher {
    NatsPublisher::connect(
        connect(&cluster.url()).await.unwrap(),
        stream(),
        NatsPublishConfig::default().with_ack_timeout(Duration::from_millis(800)),
        PublisherConfig::new(WorkerId(worker)).with_incarnation(1),
    )
    .await
    .unwrap()
}

async fn ingestor(cluster: &NatsCluster, index: &SharedIndex) -> Ingestor {
    let mut snapshots = SnapshotSettings::default();
    snapshots.interval = Duration::from_secs(3600);
    let config = NatsSourceConfig::new(stream()).with_snapshots(Some(snapshots));
    let source = NatsSource::new(connect(&cluster.url()).await.unwrap(), config);
    let config = IngestConfig::default().with_resync_retry(Duration::from_millis(500));
    Ingestor::spawn(source, index.clone(), config)
}

/// Events keep flowing and a registration stays while the node leading the registration
/// bucket (and maybe the stream) is SIGKILLed and restarted: the bucket takes seconds to elect
/// another leader, longer than the registration TTL, and no router may expire a worker whose
/// heartbeats fail because of it. After it, a new consumer restores the replicated snapshot
/// and converges.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_bucket_and_snapshots_survive_a_node_kill_with_three_replicas() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let started = std::time::Instant::now();
    let mut cluster = NatsCluster::start().await;
    let index = new_index();
    let ingest = ingestor(&cluster, &index).await;
    let p1 = publisher(&cluster, 1).await;
    let p2 = publisher(&cluster, 2).await;
    let mut w1 = SimWorker::new(WorkerId(1), 3);
    let mut w2 = SimWorker::new(WorkerId(2), 4);

    let ttl = Duration::from_secs(2);
    let membership = {
        let mut settings = MembershipSettings::default()
            .for_component("test", "cluster")
            .with_ttl(ttl);
        settings.replicas = 3;
        settings
    };
    let client = connect(&cluster.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let bucket = ensure_bucket(&js, &membership).await.unwrap();
    let registration = Registration::start(
        bucket.clone(),
        &membership,
        &WorkerRecord::new(WorkerId(1), "http://127.0.0.1:9"),
    )
    .await
    .unwrap();
    let mut members = watch_members(client.clone(), bucket, &membership);
    let joined = tokio::time::timeout(Duration::from_secs(10), members.recv())
        .await
        .unwrap();
    assert!(matches!(joined, Some(MembershipChange::Joined(r)) if r.worker_id == WorkerId(1)));

    w1.run(&p1, 400, 10).await;
    w2.run(&p2, 400, 10).await;
    p1.flush().await.unwrap();
    p2.flush().await.unwrap();
    converge(&index, &[w1.clone(), w2.clone()], 30).await;

    // The bucket's leader is killed with events flowing.
    let leader = cluster.leader_of("KV_kvroute-workers").await;
    cluster.nodes[leader].kill().await;
    let killed = std::time::Instant::now();
    w1.run(&p1, 300, 10).await;
    w2.run(&p2, 300, 10).await;
    // Acknowledged by the stream's remaining two replicas: a quorum.
    p1.flush().await.unwrap();
    p2.flush().await.unwrap();
    converge(&index, &[w1.clone(), w2.clone()], 60).await;
    // The bucket has a new leader (seconds, several TTLs); the worker's heartbeat resumes.
    let elected = cluster.leader_of("KV_kvroute-workers").await;
    eprintln!(
        "{:?}: node {leader} killed, node {elected} leads the bucket after {:?}",
        started.elapsed(),
        killed.elapsed()
    );
    tokio::time::sleep(ttl * 2).await;
    cluster.nodes[leader].restart().await;
    cluster.wait_for_jetstream().await;
    // The registration outlived the election: no departure was seen, past several TTLs.
    tokio::time::sleep(ttl).await;
    while let Ok(change) = members.try_recv() {
        assert!(
            !matches!(change, MembershipChange::Left { .. }),
            "registration lost: {change:?}"
        );
    }
    p1.flush().await.unwrap();
    p2.flush().await.unwrap();
    ingest.shutdown().await.unwrap(); // writes the snapshot (3 replicas)

    // A new consumer restores that snapshot and catches up. (Not with a node down: Debian's
    // nats-server 2.9 may place the reader's ephemeral consumer on the dead node, and the read
    // times out; the source then replays the whole stream instead.)
    cluster
        .wait_until_current(&["OBJ_kvroute-snapshots", "KVROUTE_KV_EVENTS"])
        .await;
    let restored = new_index();
    let again = ingestor(&cluster, &restored).await;
    again.caught_up().await;
    converge(&restored, &[w1.clone(), w2.clone()], 60).await;
    assert_eq!(again.stats().snapshots_restored, 1, "{:?}", again.stats());
    again.shutdown().await.unwrap();
    registration.deregister().await;
    eprintln!("{:?}: done", started.elapsed());
}
