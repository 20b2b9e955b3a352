//! NVIDIA Dynamo 1.6's own KV event wire: msgpack envelopes on NATS core subjects.
//!
//! A Dynamo worker (with `DYN_EVENT_PLANE=nats`) publishes each batch of events as an
//! `EventEnvelope` (msgpack map: `publisher_id`, `sequence`, `published_at` in Unix ms,
//! `topic` = `kv-events`, `payload` as msgpack bin) whose payload is a msgpack array of
//! `RouterEvent` maps, on `namespace.{ns}.component.{comp}.endpoint.{ep}.kv-events` (each name
//! percent-encoded into one token). Dynamo workers have no incarnations and take no
//! full-state requests: their gaps and duplicates are counted and every event is applied, as
//! Dynamo's own router does.

use crate::ingest::{EventSource, IngestState, MalformedKind, SourceItem};
use crate::nats::subject_token;
use futures_util::StreamExt;
use kvroute_protocol::RouterEvent;
use serde::{Deserialize, Serialize};
use std::collections::VecDeque;
use std::time::Duration;

/// Dynamo's `EventEnvelope`, field for field.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct DynamoEnvelope {
    /// The publishing instance (Dynamo's discovery instance id).
    pub publisher_id: u64,
    /// Per-publisher envelope counter.
    pub sequence: u64,
    /// Unix time of publication in milliseconds.
    pub published_at: u64,
    /// The topic (`kv-events`).
    pub topic: String,
    /// The msgpack-encoded events.
    #[serde(with = "bin")]
    pub payload: Vec<u8>,
}

/// Dynamo writes the payload as msgpack bin and reads it back as a byte sequence.
mod bin {
    use serde::de::{self, Deserializer, SeqAccess, Visitor};
    use serde::Serializer;
    use std::fmt;

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut out = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 20));
            while let Some(byte) = seq.next_element::<u8>()? {
                out.push(byte);
            }
            Ok(out)
        }
    }
}

/// Errors decoding Dynamo's wire.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DynamoWireError {
    /// The message is not an envelope.
    #[error("not a Dynamo event envelope: {0}")]
    Envelope(#[source] MsgpackError),
    /// The envelope's payload is not a msgpack array of `RouterEvent`s.
    #[error("Dynamo envelope payload is not a list of RouterEvents: {0}")]
    Payload(#[source] MsgpackError),
}

/// A msgpack decoding failure. Opaque: which msgpack library decodes is not part of the API.
#[derive(Debug)]
pub struct MsgpackError(rmp_serde::decode::Error);

impl std::fmt::Display for MsgpackError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(&self.0, f)
    }
}

impl std::error::Error for MsgpackError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// Encodes events as a Dynamo worker does (used by relays and tests).
pub fn encode_dynamo_envelope(
    publisher_id: u64,
    sequence: u64,
    published_at: u64,
    events: &[RouterEvent],
) -> Vec<u8> {
    // Encoding plain structs into a Vec cannot fail.
    let payload = rmp_serde::to_vec_named(events).unwrap_or_default();
    let envelope = DynamoEnvelope {
        publisher_id,
        sequence,
        published_at,
        topic: "kv-events".into(),
        payload,
    };
    rmp_serde::to_vec_named(&envelope).unwrap_or_default()
}

/// Decodes one message of Dynamo's event plane into its envelope and events.
pub fn decode_dynamo_envelope(
    bytes: &[u8],
) -> Result<(DynamoEnvelope, Vec<RouterEvent>), DynamoWireError> {
    let envelope: DynamoEnvelope =
        rmp_serde::from_slice(bytes).map_err(|e| DynamoWireError::Envelope(MsgpackError(e)))?;
    let events = rmp_serde::from_slice(&envelope.payload)
        .map_err(|e| DynamoWireError::Payload(MsgpackError(e)))?;
    Ok((envelope, events))
}

/// The subject Dynamo 1.6 workers publish KV events to; `endpoint` `None` matches every
/// endpoint of the component.
pub fn dynamo_event_subject(namespace: &str, component: &str, endpoint: Option<&str>) -> String {
    let endpoint = endpoint.map_or_else(|| "*".to_owned(), subject_token);
    format!(
        "namespace.{}.component.{}.endpoint.{endpoint}.kv-events",
        subject_token(namespace),
        subject_token(component)
    )
}

/// Splits events into per-worker batches, keeping their order.
pub(crate) fn per_worker(events: Vec<RouterEvent>, out: &mut VecDeque<SourceItem>) {
    for event in events {
        match out.back_mut() {
            Some(SourceItem::Batch {
                worker_id, events, ..
            }) if *worker_id == event.worker_id => events.push(event),
            _ => out.push_back(SourceItem::Batch {
                worker_id: event.worker_id,
                incarnation: None,
                events: vec![event],
            }),
        }
    }
}

/// Events of Dynamo 1.6 workers from NATS core (their event plane with `DYN_EVENT_PLANE=nats`),
/// for [`Ingestor::spawn`](crate::Ingestor::spawn). NATS core keeps no history: the ingestor is
/// caught up as soon as it is subscribed.
pub struct DynamoSource {
    client: async_nats::Client,
    subject: String,
    subscriber: Option<async_nats::Subscriber>,
    pending: VecDeque<SourceItem>,
    announced: bool,
    idle: Duration,
}

impl std::fmt::Debug for DynamoSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DynamoSource")
            .field("subject", &self.subject)
            .finish_non_exhaustive()
    }
}

impl DynamoSource {
    /// Subscribes (when the ingestor starts) to the events of `namespace`/`component`,
    /// `endpoint` (or every endpoint).
    pub fn new(
        client: async_nats::Client,
        namespace: &str,
        component: &str,
        endpoint: Option<&str>,
    ) -> Self {
        Self {
            client,
            subject: dynamo_event_subject(namespace, component, endpoint),
            subscriber: None,
            pending: VecDeque::new(),
            announced: false,
            idle: Duration::from_millis(250),
        }
    }
}

impl EventSource for DynamoSource {
    async fn next(&mut self, _state: &IngestState) -> SourceItem {
        if let Some(item) = self.pending.pop_front() {
            return item;
        }
        let Some(subscriber) = self.subscriber.as_mut() else {
            match self.client.subscribe(self.subject.clone()).await {
                Ok(subscriber) => self.subscriber = Some(subscriber),
                Err(error) => {
                    tracing::warn!(%error, subject = %self.subject, "subscribing failed; retrying");
                    tokio::time::sleep(self.idle).await;
                }
            }
            return SourceItem::Idle;
        };
        if !self.announced {
            self.announced = true;
            return SourceItem::CaughtUp;
        }
        match tokio::time::timeout(self.idle, subscriber.next()).await {
            Err(_) => SourceItem::Idle,
            Ok(None) => {
                self.subscriber = None;
                SourceItem::Idle
            }
            Ok(Some(message)) => match decode_dynamo_envelope(&message.payload) {
                Ok((_, events)) => {
                    per_worker(events, &mut self.pending);
                    self.pending.pop_front().unwrap_or(SourceItem::Idle)
                }
                Err(error) => SourceItem::malformed(MalformedKind::Dynamo, error.to_string()),
            },
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use kvroute_protocol::{
        BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoreData,
        KvCacheStoredBlockData, SequenceHash, WorkerId,
    };

    #[test]
    fn envelopes_round_trip_and_subjects_match_dynamo() {
        let event = RouterEvent::new(
            WorkerId(u64::MAX - 1),
            KvCacheEvent {
                event_id: 3,
                dp_rank: DpRank(1),
                data: KvCacheEventData::Stored(KvCacheStoreData {
                    parent_hash: Some(SequenceHash(1 << 60)),
                    start_position: None,
                    blocks: vec![KvCacheStoredBlockData {
                        block_hash: SequenceHash(u64::MAX),
                        tokens_hash: BlockHash(7),
                        mm_extra_info: None,
                    }],
                }),
            },
        );
        let bytes =
            encode_dynamo_envelope(9, 2, 1_700_000_000_000, &[event.clone(), event.clone()]);
        let (envelope, events) = decode_dynamo_envelope(&bytes).unwrap();
        assert_eq!(
            (
                envelope.publisher_id,
                envelope.sequence,
                envelope.topic.as_str()
            ),
            (9, 2, "kv-events")
        );
        assert_eq!(events, vec![event.clone(), event]);
        assert!(matches!(
            decode_dynamo_envelope(b"\xc1"),
            Err(DynamoWireError::Envelope(_))
        ));
        assert_eq!(
            dynamo_event_subject("ns.one", "worker/*", Some("generate")),
            "namespace.ns%2Eone.component.worker%2F%2A.endpoint.generate.kv-events"
        );
    }
}
