//! The JSON of an [`EventBatch`] message on kvroute's stream, written and read on the fast
//! path of `kvroute_protocol`'s event codec.
//!
//! A message is `{"worker_id":W,"incarnation":I,"events":[E,E,...]}`, each `E` a `RouterEvent`
//! in Dynamo's JSON: exactly what serde writes for an [`EventBatch`]. Writers append events to
//! an open message ([`MessageBuilder`]); [`EventBatch::from_json`] reads that layout without
//! serde's generic machinery and hands anything else to serde, which decides.

use crate::EventBatch;
use kvroute_protocol::{JsonReader, RouterEvent, WorkerId};

impl EventBatch {
    /// Parses one message of kvroute's stream (the JSON of an `EventBatch`).
    ///
    /// The layout publishers write is read on a fast path; any other valid JSON of the same
    /// batch (whitespace, field order, unknown fields) parses through serde to the same value.
    ///
    /// ```
    /// use kvroute_events::EventBatch;
    /// use kvroute_protocol::WorkerId;
    ///
    /// let json = br#"{"worker_id":7,"incarnation":3,"events":[{"worker_id":7,"storage_tier":"device","event":{"event_id":0,"data":"cleared","dp_rank":0}}]}"#;
    /// let batch = EventBatch::from_json(json)?;
    /// assert_eq!((batch.worker_id, batch.incarnation, batch.events.len()), (WorkerId(7), 3, 1));
    /// # Ok::<(), serde_json::Error>(())
    /// ```
    pub fn from_json(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        match read_batch(&mut JsonReader::new(bytes)) {
            Some(batch) => Ok(batch),
            None => serde_json::from_slice(bytes),
        }
    }
}

/// The fast path: the canonical layout, to the last byte, or `None`.
fn read_batch(reader: &mut JsonReader<'_>) -> Option<EventBatch> {
    reader.literal(b"{\"worker_id\":")?;
    let worker_id = reader.u64()?.into();
    reader.literal(b",\"incarnation\":")?;
    let incarnation = reader.u64()?;
    reader.literal(b",\"events\":[")?;
    let mut events = Vec::new();
    if !reader.eat(b']') {
        loop {
            events.push(reader.router_event()?);
            if !reader.eat(b',') {
                break;
            }
        }
        reader.literal(b"]")?;
    }
    reader.literal(b"}")?;
    reader.is_at_end().then_some(EventBatch {
        worker_id,
        incarnation,
        events,
    })
}

/// Builds `EventBatch` messages of bounded size from one publisher's events, writing each
/// event's JSON straight into the message.
pub(crate) struct MessageBuilder {
    /// `{"worker_id":..,"incarnation":..,"events":[`: every message starts with it.
    prefix: Vec<u8>,
    /// The open message: the prefix and `events` events, comma-separated (empty when none).
    message: Vec<u8>,
    events: usize,
    limit: usize,
}

impl MessageBuilder {
    /// A builder of the messages of `worker_id`'s `incarnation`, of at most `limit` bytes
    /// each (a single event larger than that goes alone).
    pub(crate) fn new(worker_id: WorkerId, incarnation: u64, limit: usize) -> Self {
        Self {
            prefix: format!(r#"{{"worker_id":{worker_id},"incarnation":{incarnation},"events":["#)
                .into_bytes(),
            message: Vec::new(),
            events: 0,
            limit,
        }
    }

    /// Adds `event`; returns the message built so far if the event did not fit in it (the
    /// event then opens the next message).
    pub(crate) fn push(&mut self, event: &RouterEvent) -> Option<Vec<u8>> {
        if self.events == 0 {
            self.open();
        }
        let start = self.message.len();
        if self.events > 0 {
            self.message.push(b',');
        }
        event.write_json(&mut self.message);
        // Two more bytes close the message.
        if self.events == 0 || self.message.len() + 2 <= self.limit {
            self.events += 1;
            return None;
        }
        let event_json = start + 1..self.message.len();
        let mut next = self.fresh();
        next.extend_from_slice(&self.message[event_json]);
        self.message.truncate(start);
        let full = std::mem::replace(&mut self.message, next);
        self.events = 1;
        Some(close(full))
    }

    /// The message built so far, if it holds any event.
    pub(crate) fn take(&mut self) -> Option<Vec<u8>> {
        if self.events == 0 {
            return None;
        }
        self.events = 0;
        Some(close(std::mem::take(&mut self.message)))
    }

    fn open(&mut self) {
        self.message = self.fresh();
    }

    /// An empty message with its prefix, sized for a full one (up to 1 MiB, NATS's default
    /// largest payload) so it is not copied while it grows.
    fn fresh(&self) -> Vec<u8> {
        let mut message = Vec::with_capacity(self.limit.clamp(self.prefix.len() + 2, 1 << 20));
        message.extend_from_slice(&self.prefix);
        message
    }
}

/// Ends a message; one that filled less than half its buffer (a quiet publisher's) gives the
/// rest back, as it may wait in flight for an acknowledgement.
fn close(mut message: Vec<u8>) -> Vec<u8> {
    message.extend_from_slice(b"]}");
    if message.capacity() > 2 * message.len() {
        message.shrink_to_fit();
    }
    message
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

    use super::*;
    use kvroute_protocol::{
        BlockHash, DpRank, KvCacheEvent, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
        KvCacheStoredBlockData, SequenceHash,
    };
    use proptest::prelude::*;

    fn event(worker: u64) -> impl Strategy<Value = RouterEvent> {
        let hash = prop_oneof![0..10u64, any::<u64>()];
        let data = prop_oneof![
            (
                proptest::option::of(hash.clone()),
                proptest::collection::vec(hash.clone(), 0..20)
            )
                .prop_map(|(parent, blocks)| KvCacheEventData::Stored(
                    KvCacheStoreData {
                        parent_hash: parent.map(SequenceHash),
                        start_position: None,
                        blocks: blocks
                            .into_iter()
                            .map(|h| KvCacheStoredBlockData {
                                block_hash: SequenceHash(h),
                                tokens_hash: BlockHash(h ^ 1),
                                mm_extra_info: None,
                            })
                            .collect(),
                    }
                )),
            proptest::collection::vec(hash, 0..5).prop_map(|hashes| KvCacheEventData::Removed(
                KvCacheRemoveData {
                    block_hashes: hashes.into_iter().map(SequenceHash).collect()
                }
            )),
            Just(KvCacheEventData::Cleared),
        ];
        (any::<u64>(), data, 0..4u32).prop_map(move |(event_id, data, rank)| {
            RouterEvent::new(
                WorkerId(worker),
                KvCacheEvent {
                    event_id,
                    data,
                    dp_rank: DpRank(rank),
                },
            )
        })
    }

    fn batch() -> impl Strategy<Value = EventBatch> {
        (any::<u64>(), any::<u64>()).prop_flat_map(|(worker, incarnation)| {
            proptest::collection::vec(event(worker), 0..12).prop_map(move |events| EventBatch {
                worker_id: WorkerId(worker),
                incarnation,
                events,
            })
        })
    }

    /// The messages a builder makes of `batch`'s events.
    fn messages(batch: &EventBatch, limit: usize) -> Vec<Vec<u8>> {
        let mut builder = MessageBuilder::new(batch.worker_id, batch.incarnation, limit);
        let mut messages: Vec<Vec<u8>> = batch
            .events
            .iter()
            .filter_map(|e| builder.push(e))
            .collect();
        messages.extend(builder.take());
        assert!(builder.take().is_none());
        messages
    }

    proptest! {
        #[test]
        fn messages_are_serdes_batches_under_the_limit(batch in batch(), limit in 0..3000usize) {
            let mut decoded = Vec::new();
            for message in messages(&batch, limit) {
                let fast = EventBatch::from_json(&message).unwrap();
                let reference: EventBatch = serde_json::from_slice(&message).unwrap();
                prop_assert_eq!(&fast, &reference);
                prop_assert!(message.len() <= limit || fast.events.len() == 1);
                prop_assert!(message.capacity() <= 2 * message.len());
                prop_assert_eq!((fast.worker_id, fast.incarnation), (batch.worker_id, batch.incarnation));
                let whole = EventBatch { events: fast.events.clone(), ..batch.clone() };
                prop_assert_eq!(&message, &serde_json::to_vec(&whole).unwrap());
                decoded.extend(fast.events);
            }
            prop_assert_eq!(decoded, batch.events);
        }

        #[test]
        fn reads_any_bytes_as_serde_does(
            batch in batch(),
            at in any::<usize>(),
            how in 0..4u8,
            byte in prop_oneof![Just(b','), Just(b' '), Just(b'1'), Just(b']'), Just(b'}'), any::<u8>()],
        ) {
            let mut bytes = serde_json::to_vec(&batch).unwrap();
            let at = at % bytes.len();
            match how {
                0 => bytes[at] = byte,
                1 => bytes.insert(at, byte),
                2 => { bytes.remove(at); }
                _ => bytes.truncate(at),
            }
            let reference = serde_json::from_slice::<EventBatch>(&bytes).ok();
            prop_assert_eq!(EventBatch::from_json(&bytes).ok(), reference);
        }
    }

    #[test]
    fn other_layouts_go_through_serde() {
        let pretty = r#"{ "incarnation": 3, "worker_id": 7, "extra": [1],
            "events": [ {"worker_id":7,"event":{"event_id":0,"data":"cleared"}} ] }"#;
        let batch = EventBatch::from_json(pretty.as_bytes()).unwrap();
        assert_eq!((batch.worker_id, batch.incarnation), (WorkerId(7), 3));
        assert_eq!(batch.events[0].event.data, KvCacheEventData::Cleared);
        assert!(EventBatch::from_json(b"{\"worker_id\":7}").is_err());
    }
}
