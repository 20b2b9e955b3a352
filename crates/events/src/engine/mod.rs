//! vLLM's and SGLang's own KV events: ZeroMQ PUB frames carrying msgpack `KVEventBatch`es,
//! with a ROUTER socket that replays recent batches.
//!
//! [`decode_engine_batch`] reads the wire, [`EngineCache`] turns each engine cache's events
//! into kvroute events (re-hashing the blocks' tokens, since the engines' hashes are their
//! own), [`EngineSource`] subscribes to workers and heals gaps through the replay socket, and
//! [`EnginePublisher`] speaks the same wire for simulated workers.

mod convert;
mod msgpack;
mod publisher;
mod sequence;
mod source;
mod wire;

pub use convert::{EngineCache, EngineCacheConfig, EngineSkip, CACHE_SALT_PREFIX};
pub use publisher::{EnginePublishError, EnginePublisher, EnginePublisherConfig};
pub use source::{EngineEndpoint, EngineSource, EngineSourceConfig};
pub use wire::{
    decode_engine_batch, encode_engine_batch, EngineBatch, EngineEvent, EngineFrames, EngineHash,
    EngineRemoved, EngineStored, ExtraKey, REPLAY_END,
};

/// Why an engine's message could not be read.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineWireError {
    /// A PUB message is `[topic, seq, payload]`.
    #[error("expected 3 frames (topic, seq, payload), got {0}")]
    Frames(usize),
    /// The sequence number frame is 8 bytes.
    #[error("sequence number frame of {0} bytes, expected 8")]
    Seq(usize),
    /// Not msgpack, or not the types expected.
    #[error("msgpack at byte {offset}: {what}")]
    Msgpack {
        /// Where in the payload.
        offset: usize,
        /// What was wrong.
        what: &'static str,
    },
    /// An event type this version does not know.
    #[error("unknown event type {0:?}")]
    UnknownTag(String),
    /// Valid msgpack of the wrong shape.
    #[error("not a KVEventBatch: {0}")]
    Shape(&'static str),
}
