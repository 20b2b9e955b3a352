//! Identifiers, hashes and KV cache events shared by every kvroute crate.
//!
//! It owns the vocabulary: newtypes for workers, data-parallel ranks, block and sequence
//! hashes and media ids, the KV event model that reads and writes NVIDIA Dynamo's
//! `RouterEvent` JSON exactly (through serde, plus a fast writer and [`JsonReader`] for the
//! event pipeline's hot path), the record a worker registers itself with, the load report
//! router replicas share ([`ReplicaLoad`]), and OpenAI's error body. It does no I/O and no hashing.
//!
//! ```
//! use kvroute_protocol::{RouterEvent, WorkerId};
//!
//! let line = r#"{"worker_id":7,"storage_tier":"device","residency_domain":"worker","event":{"event_id":44,"data":"cleared","dp_rank":0}}"#;
//! let event = RouterEvent::from_json(line.as_bytes())?;
//! assert_eq!(event.worker_id, WorkerId(7));
//! assert_eq!(event.to_json(), line);
//! # Ok::<(), kvroute_protocol::ProtocolError>(())
//! ```

mod event;
mod ids;
mod json;
mod openai;
mod replica;
mod worker;

pub use event::*;
pub use ids::{BlockHash, DpRank, MediaId, MediaSpan, SequenceHash, WorkerId};
pub use json::JsonReader;
pub use openai::{ErrorBody, ErrorDetail};
pub use replica::{ReplicaLoad, WorkerLoad};
pub use worker::WorkerRecord;
