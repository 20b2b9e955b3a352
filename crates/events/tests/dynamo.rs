//! Ingesting NVIDIA Dynamo workers' own events: msgpack envelopes on NATS core, and the older
//! JSON `RouterEvent` per message on Dynamo's JetStream stream. Behind the `peer` feature, the
//! msgpack shape is checked against Dynamo's own types.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use common::{converge, SimWorker};
use kvroute_events::{
    connect, dynamo_event_subject, encode_dynamo_envelope, DynamoSource, IngestConfig, Ingestor,
    NatsSource, NatsSourceConfig,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{DpRank, KvCacheEvent, RouterEvent, WorkerId};
use kvroute_testsupport::NatsServer;

fn new_index() -> SharedIndex {
    SharedIndex::new(Index::new(IndexConfig::default()))
}

/// Waits up to 10 s until `ingestor` has counted `count` malformed messages, and checks it
/// counts no more.
async fn until_malformed(ingestor: &Ingestor, count: u64) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ingestor.stats().malformed < count {
        assert!(
            std::time::Instant::now() < deadline,
            "{:?}",
            ingestor.stats()
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(ingestor.stats().malformed, count);
}

/// `count` events of `worker`, numbered from `first_id`.
fn events(worker: &mut SimWorker, first_id: u64, count: u64) -> Vec<RouterEvent> {
    (first_id..first_id + count)
        .map(|event_id| {
            RouterEvent::new(
                worker.worker_id,
                KvCacheEvent {
                    event_id,
                    dp_rank: DpRank(0),
                    data: worker.step(),
                },
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn msgpack_envelopes_on_nats_core_are_ingested() {
    let server = NatsServer::start().await;
    let client = connect(&server.url()).await.unwrap();
    let index = new_index();
    let source = DynamoSource::new(client.clone(), "dynamo", "backend", None);
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
    ingestor.caught_up().await; // subscribed
    client.flush().await.unwrap();

    let subject = dynamo_event_subject("dynamo", "backend", Some("generate"));
    let mut a = SimWorker::new(WorkerId(0x7f3a_0000_0000_0001), 1);
    let mut b = SimWorker::new(WorkerId(0x7f3a_0000_0000_0002), 2);
    for round in 0..50u64 {
        // Two workers' events in one envelope, as a relay might send them.
        let mut batch = events(&mut a, round * 4, 4);
        batch.extend(events(&mut b, round * 4, 4));
        let envelope = encode_dynamo_envelope(42, round, 1_700_000_000_000 + round, &batch);
        client
            .publish(subject.clone(), envelope.into())
            .await
            .unwrap();
    }
    client
        .publish(subject.clone(), b"not msgpack"[..].into())
        .await
        .unwrap();
    client.flush().await.unwrap();
    converge(&index, &[a, b], 20).await;
    // The malformed message was published last: the index converging does not mean it has
    // been read yet.
    until_malformed(&ingestor, 1).await;
    assert_eq!(ingestor.stats().events_applied, 400);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_older_json_stream_is_ingested() {
    let server = NatsServer::start().await;
    let client = connect(&server.url()).await.unwrap();
    let js = async_nats::jetstream::new(client.clone());
    let name = "namespace-dynamo-component-backend-kv-events";
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.*")],
        ..Default::default()
    })
    .await
    .unwrap();
    let mut worker = SimWorker::new(WorkerId(5), 3);
    for event in events(&mut worker, 0, 300) {
        let ack = js
            .publish(format!("{name}.queue"), event.to_json().into())
            .await
            .unwrap();
        ack.await.unwrap();
    }
    js.publish(format!("{name}.queue"), "{\"worker_id\":".into())
        .await
        .unwrap()
        .await
        .unwrap();

    let index = new_index();
    let source = NatsSource::new(client, NatsSourceConfig::dynamo_legacy("dynamo", "backend"));
    let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
    ingestor.caught_up().await;
    converge(&index, std::slice::from_ref(&worker), 20).await;
    until_malformed(&ingestor, 1).await;
}

/// Dynamo's own `RouterEvent`s, encoded the way its publisher does, decode into kvroute's
/// events equal to those read from Dynamo's JSON.
#[cfg(feature = "peer")]
#[test]
fn msgpack_matches_dynamo_kv_router_types() {
    use dynamo_kv_router::protocols as dy;
    use kvroute_events::decode_dynamo_envelope;

    let stored = dy::RouterEvent::new(
        u64::MAX - 3,
        dy::KvCacheEvent {
            event_id: 17,
            data: dy::KvCacheEventData::Stored(dy::KvCacheStoreData {
                parent_hash: Some(dy::ExternalSequenceBlockHash(1 << 63)),
                start_position: Some(4),
                blocks: vec![dy::KvCacheStoredBlockData {
                    block_hash: dy::ExternalSequenceBlockHash(u64::MAX),
                    tokens_hash: dy::LocalBlockHash((1 << 53) + 1),
                    mm_extra_info: Some(dy::BlockExtraInfo {
                        mm_objects: vec![dy::BlockMmObjectInfo {
                            mm_hash: 0xdead_beef_dead_beef,
                            offsets: vec![(0, 16), (3, 9)],
                        }],
                    }),
                }],
            }),
            dp_rank: 3,
        },
    );
    let removed = dy::RouterEvent::new(
        2,
        dy::KvCacheEvent {
            event_id: 18,
            data: dy::KvCacheEventData::Removed(dy::KvCacheRemoveData {
                block_hashes: vec![dy::ExternalSequenceBlockHash(5)],
            }),
            dp_rank: 0,
        },
    );
    let cleared = dy::RouterEvent::new(
        2,
        dy::KvCacheEvent {
            event_id: 19,
            data: dy::KvCacheEventData::Cleared,
            dp_rank: 0,
        },
    );
    let theirs = vec![stored, removed, cleared];
    let payload = rmp_serde::to_vec_named(&theirs).unwrap();
    // The envelope as dynamo-runtime's codec writes it (a named map, payload as bin).
    #[derive(serde::Serialize)]
    struct Envelope<'a> {
        publisher_id: u64,
        sequence: u64,
        published_at: u64,
        topic: &'a str,
        #[serde(with = "serde_bytes_like")]
        payload: &'a [u8],
    }
    mod serde_bytes_like {
        pub fn serialize<S: serde::Serializer>(b: &&[u8], s: S) -> Result<S::Ok, S::Error> {
            s.serialize_bytes(b)
        }
    }
    let bytes = rmp_serde::to_vec_named(&Envelope {
        publisher_id: 1,
        sequence: 2,
        published_at: 3,
        topic: "kv-events",
        payload: &payload,
    })
    .unwrap();
    let (envelope, ours) = decode_dynamo_envelope(&bytes).unwrap();
    assert_eq!(envelope.payload, payload);
    let via_json: Vec<RouterEvent> = theirs
        .iter()
        .map(|e| RouterEvent::from_json(serde_json::to_string(e).unwrap().as_bytes()).unwrap())
        .collect();
    assert_eq!(ours, via_json);
    // And back: kvroute's encoding decodes with Dynamo's types.
    let ours_bytes = rmp_serde::to_vec_named(&ours).unwrap();
    let back: Vec<dy::RouterEvent> = rmp_serde::from_slice(&ours_bytes).unwrap();
    assert_eq!(back, theirs);
}
