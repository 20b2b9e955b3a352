//! The KV cache event model, wire-compatible with NVIDIA Dynamo 1.6's `RouterEvent`.
//!
//! Type and field names follow Dynamo's `dynamo_kv_router::protocols` so that anyone who knows
//! one knows the other. Serialization reproduces Dynamo's JSON byte for byte (field order,
//! `null`s it writes, fields it omits); parsing tolerates unknown fields and reads every hash as
//! an exact `u64`.

use crate::ids::{BlockHash, DpRank, MediaId, SequenceHash, WorkerId};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use std::fmt;

/// Errors reading or writing events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// The bytes are not a valid event: bad JSON, a missing field, a wrong type, a negative or
    /// out-of-range number.
    #[error("malformed KV event: {0}")]
    Json(#[source] serde_json::Error),
    /// The bytes are not a valid [`WorkerRecord`](crate::WorkerRecord).
    #[error("malformed worker record: {0}")]
    WorkerRecord(#[source] serde_json::Error),
    /// The bytes are not a valid [`ReplicaLoad`](crate::ReplicaLoad).
    #[error("malformed replica load report: {0}")]
    ReplicaLoad(#[source] serde_json::Error),
}

/// A KV cache event of one worker: what the router's index is built from.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RouterEvent {
    /// The worker that emitted the event.
    pub worker_id: WorkerId,
    /// Which cache tier the blocks live in.
    #[serde(default)]
    pub storage_tier: StorageTier,
    /// The logical owner of the residency; absent on the legacy worker-only wire.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present_residency_domain"
    )]
    pub residency_domain: Option<ResidencyDomain>,
    /// The event itself.
    pub event: KvCacheEvent,
    /// Dynamo's stable cache-owner identity, kept verbatim so events can be relayed unchanged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_source: Option<StateSource>,
    /// The session that triggered a store, if the engine reported one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
}

impl RouterEvent {
    /// An event of `worker_id` on the device tier of the worker residency domain, as Dynamo's
    /// `RouterEvent::new` builds it.
    pub fn new(worker_id: WorkerId, event: KvCacheEvent) -> Self {
        Self {
            worker_id,
            storage_tier: StorageTier::Device,
            residency_domain: Some(ResidencyDomain::Worker),
            event,
            state_source: None,
            session_id: None,
        }
    }

    /// Parses one event from JSON: [`JsonReader`](crate::JsonReader)'s fast path for the
    /// layout [`RouterEvent::write_json`] writes, serde for anything else (same result).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ProtocolError> {
        let mut reader = crate::JsonReader::new(bytes);
        match reader.router_event() {
            Some(event) if reader.is_at_end() => Ok(event),
            _ => serde_json::from_slice(bytes).map_err(ProtocolError::Json),
        }
    }

    /// Serializes the event as Dynamo's JSON.
    pub fn to_json(&self) -> String {
        // Serializing these types cannot fail: every map key is a string and no custom
        // serializer returns an error.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// One event with its id, contiguous per (worker, dp rank).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheEvent {
    /// Sequence number of the event within its (worker, dp rank).
    pub event_id: u64,
    /// What happened.
    pub data: KvCacheEventData,
    /// The data-parallel rank whose cache changed (0 without data parallelism).
    #[serde(default)]
    pub dp_rank: DpRank,
}

/// What happened to a worker's cache.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KvCacheEventData {
    /// Blocks were stored, as a chain continuing `parent_hash`.
    Stored(KvCacheStoreData),
    /// Blocks were evicted.
    Removed(KvCacheRemoveData),
    /// Every block of this (worker, dp rank) was dropped.
    Cleared,
}

/// Stored blocks: a chain of consecutive blocks whose first block follows `parent_hash`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoreData {
    /// Sequence hash of the block before the first stored one; `None` at the sequence start.
    pub parent_hash: Option<SequenceHash>,
    /// Absolute block position of the first stored block, when the engine reports it.
    pub start_position: Option<u32>,
    /// The stored blocks, in sequence order.
    pub blocks: Vec<KvCacheStoredBlockData>,
}

/// One stored block.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheStoredBlockData {
    /// The block's sequence hash (the radix key; Dynamo's wire name is `block_hash`).
    pub block_hash: SequenceHash,
    /// The block's content hash (Dynamo's wire name is `tokens_hash`).
    pub tokens_hash: BlockHash,
    /// The media objects the block contains; always written, as `null` when there are none.
    pub mm_extra_info: Option<BlockExtraInfo>,
}

/// Removed blocks.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct KvCacheRemoveData {
    /// Sequence hashes of the removed blocks.
    pub block_hashes: Vec<SequenceHash>,
}

/// The media objects inside one block.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockExtraInfo {
    /// Every media object whose tokens intersect the block.
    pub mm_objects: Vec<BlockMmObjectInfo>,
}

/// One media object's part of a block.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMmObjectInfo {
    /// The media object's identity.
    pub mm_hash: MediaId,
    /// Token ranges `(start, end)` relative to the block where the object's tokens sit.
    pub offsets: Vec<(usize, usize)>,
}

/// The cache tier an event refers to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum StorageTier {
    /// Accelerator memory: what routing on prefix overlap is about.
    #[default]
    Device,
    /// Pinned host memory.
    HostPinned,
    /// Local disk.
    Disk,
    /// An external store.
    External,
}

/// Who owns a residency: a serving worker, or a cache owner that outlives workers.
///
/// Values Dynamo does not define are kept (not rejected) so a relay can pass them through;
/// consumers decide whether to apply such events.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ResidencyDomain {
    /// Tied to one serving worker.
    Worker,
    /// Tied to a stable cache owner (see [`RouterEvent::state_source`]).
    CacheOwner,
    /// A name this version does not know.
    Unknown(String),
    /// Present but not a string (Dynamo treats explicit `null` as malformed, not as absent).
    Invalid,
}

impl Serialize for ResidencyDomain {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            Self::Worker => serializer.serialize_str("worker"),
            Self::CacheOwner => serializer.serialize_str("cache_owner"),
            Self::Unknown(name) => serializer.serialize_str(name),
            Self::Invalid => serializer.serialize_none(),
        }
    }
}

impl<'de> Deserialize<'de> for ResidencyDomain {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ResidencyDomainVisitor)
    }
}

/// Reads a present `residency_domain`, keeping an explicit `null` as [`ResidencyDomain::Invalid`]
/// (the default `Option` handling would turn it into "absent").
fn present_residency_domain<'de, D: Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<ResidencyDomain>, D::Error> {
    ResidencyDomain::deserialize(deserializer).map(Some)
}

struct ResidencyDomainVisitor;

impl ResidencyDomainVisitor {
    fn invalid<E>(self) -> Result<ResidencyDomain, E> {
        Ok(ResidencyDomain::Invalid)
    }
}

impl<'de> Visitor<'de> for ResidencyDomainVisitor {
    type Value = ResidencyDomain;

    fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        formatter.write_str("a residency-domain string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        Ok(match value {
            "worker" => ResidencyDomain::Worker,
            "cache_owner" => ResidencyDomain::CacheOwner,
            other => ResidencyDomain::Unknown(other.to_owned()),
        })
    }

    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_bytes<E: de::Error>(self, _: &[u8]) -> Result<Self::Value, E> {
        self.invalid()
    }

    fn visit_seq<A: de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<de::IgnoredAny>()?.is_some() {}
        self.invalid()
    }

    fn visit_map<A: de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map
            .next_entry::<de::IgnoredAny, de::IgnoredAny>()?
            .is_some()
        {}
        self.invalid()
    }
}

/// Dynamo's `CacheOwnerId` (a pool and a stable data-parallel slot), carried verbatim.
///
/// kvroute routes per worker and does not interpret it; keeping the value lets events be
/// relayed without loss.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct StateSource(serde_json::Value);

#[cfg(test)]
mod tests {
    use super::*;

    const STORED: &str = r#"{"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":42,"data":{"stored":{"parent_hash":4178317394779010145,"start_position":null,"blocks":[{"block_hash":18446744073709551615,"tokens_hash":9007199254740993,"mm_extra_info":{"mm_objects":[{"mm_hash":81985529216486895,"offsets":[[0,16]]}]}}]}},"dp_rank":3}}"#;

    #[test]
    fn hashes_above_2_pow_53_are_exact() {
        let event = RouterEvent::from_json(STORED.as_bytes()).unwrap();
        let KvCacheEventData::Stored(stored) = &event.event.data else {
            panic!("not a stored event")
        };
        assert_eq!(stored.blocks[0].block_hash, SequenceHash(u64::MAX));
        assert_eq!(stored.blocks[0].tokens_hash, BlockHash((1 << 53) + 1));
        assert_eq!(event.event.dp_rank, DpRank(3));
        assert_eq!(event.to_json(), STORED);
    }

    #[test]
    fn unknown_fields_are_tolerated_and_defaults_apply() {
        let line = r#"{"worker_id":1,"future":{"x":[1,2]},"event":{"event_id":0,"data":"cleared","extra":true}}"#;
        let event = RouterEvent::from_json(line.as_bytes()).unwrap();
        assert_eq!(event.storage_tier, StorageTier::Device);
        assert_eq!(event.residency_domain, None);
        assert_eq!(event.event.dp_rank, DpRank(0));
        assert_eq!(
            event.to_json(),
            r#"{"worker_id":1,"storage_tier":"device","event":{"event_id":0,"data":"cleared","dp_rank":0}}"#
        );
    }

    #[test]
    fn residency_domain_null_is_invalid_not_absent() {
        let line = r#"{"worker_id":1,"residency_domain":null,"event":{"event_id":0,"data":"cleared","dp_rank":0}}"#;
        let event = RouterEvent::from_json(line.as_bytes()).unwrap();
        assert_eq!(event.residency_domain, Some(ResidencyDomain::Invalid));
        let line = r#"{"worker_id":1,"residency_domain":"elsewhere","event":{"event_id":0,"data":"cleared","dp_rank":0}}"#;
        let event = RouterEvent::from_json(line.as_bytes()).unwrap();
        assert_eq!(
            event.residency_domain,
            Some(ResidencyDomain::Unknown("elsewhere".into()))
        );
    }

    #[test]
    fn malformed_events_are_typed_errors() {
        for bad in [
            "",
            "{",
            "[]",
            r#"{"worker_id":-1,"event":{"event_id":0,"data":"cleared"}}"#,
            r#"{"worker_id":18446744073709551616,"event":{"event_id":0,"data":"cleared"}}"#,
            r#"{"worker_id":1.5,"event":{"event_id":0,"data":"cleared"}}"#,
            r#"{"worker_id":1,"event":{"event_id":0,"data":"exploded"}}"#,
            r#"{"worker_id":1,"event":{"event_id":0,"data":{"removed":{}}}}"#,
            r#"{"worker_id":1,"storage_tier":"tape","event":{"event_id":0,"data":"cleared"}}"#,
            r#"{"worker_id":1,"event":{"event_id":0,"data":{"stored":{"parent_hash":null,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":{"mm_objects":[{"mm_hash":1}]}}]}}}}"#,
            r#"{"worker_id":1,"event":{"event_id":0,"data":{"stored":{"parent_hash":null,"blocks":[{"block_hash":1,"tokens_hash":2,"mm_extra_info":{"mm_objects":[{"mm_hash":1,"offsets":[[0,1,2]]}]}}]}}}}"#,
        ] {
            assert!(
                matches!(
                    RouterEvent::from_json(bad.as_bytes()),
                    Err(ProtocolError::Json(_))
                ),
                "accepted {bad:?}"
            );
        }
    }
}
