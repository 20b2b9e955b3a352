//! KV cache events from workers to the router's index, over NATS JetStream or in process.
//!
//! It owns the event transport: a [`Publisher`] that numbers a worker's events contiguously
//! per data-parallel rank, stamps them with the worker's incarnation (one per process start)
//! and resends the worker's full state when a consumer asks; an [`Ingestor`] task that applies
//! events to a [`kvroute_index::SharedIndex`] in order, detecting duplicates, gaps and stale
//! incarnations per (worker, dp rank, incarnation) and healing gaps by asking the worker for
//! its full state. It does not own the index itself (`kvroute-index`), the event model
//! (`kvroute-protocol`), or routing (`kvroute-dispatch`).
//!
//! Workers can also register themselves (URL, model, block size) in a NATS KV bucket with a
//! heartbeat ([`Registration`]); routers follow who joined and left with [`watch_members`].
//! Router replicas tell each other the load they put on workers ([`join_replicas`]; the
//! registry in `kvroute-dispatch` folds the reports in).
//!
//! It also reads vLLM's and SGLang's own KV events from their ZeroMQ publishers
//! ([`EngineSource`]), re-hashing each stored block's tokens with kvroute-blockhash and healing
//! gaps through the engines' replay sockets, and speaks that wire itself ([`EnginePublisher`]).
//!
//! The same publisher and ingestor run over an in-process bus ([`in_process_bus`], for
//! `kvroute demo` and tests) with the same semantics.
//!
//! # Example
//!
//! ```
//! use kvroute_events::{in_process_bus, IngestConfig, Ingestor, PublisherConfig};
//! use kvroute_index::{Index, IndexConfig, SharedIndex};
//! use kvroute_protocol::{
//!     BlockHash, DpRank, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData,
//!     SequenceHash, WorkerId,
//! };
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let index = SharedIndex::new(Index::new(IndexConfig::default()));
//! let (bus, source) = in_process_bus(1024);
//! let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
//!
//! let worker = bus.publisher(PublisherConfig::new(WorkerId(7)));
//! let block = |h| KvCacheStoredBlockData {
//!     block_hash: SequenceHash(h),
//!     tokens_hash: BlockHash(h),
//!     mm_extra_info: None,
//! };
//! let stored = KvCacheEventData::Stored(KvCacheStoreData {
//!     parent_hash: None,
//!     start_position: None,
//!     blocks: vec![block(11), block(12)],
//! });
//! worker.publish(DpRank(0), [stored]).await?;
//!
//! // Dropping every bus handle ends the source; shutdown waits for the task.
//! drop((bus, worker));
//! while ingestor.stats().events_applied < 1 {
//!     tokio::task::yield_now().await;
//! }
//! assert_eq!(index.find_matches(&[SequenceHash(11), SequenceHash(12)]).workers[0].matched_blocks, 2);
//! ingestor.shutdown().await?;
//! # Ok(())
//! # }
//! ```
//!
//! Over NATS JetStream the same two ends are made from a client:
//!
//! ```no_run
//! use kvroute_events::{
//!     connect, IngestConfig, Ingestor, NatsPublishConfig, NatsPublisher, NatsSource,
//!     NatsSourceConfig, PublisherConfig, StreamSettings,
//! };
//! use kvroute_index::{Index, IndexConfig, SharedIndex};
//! use kvroute_protocol::{DpRank, KvCacheEventData, WorkerId};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let stream = StreamSettings::default().for_component("prod", "llama");
//!
//! // Gateway side: consume the whole stream, restoring and writing snapshots.
//! let index = SharedIndex::new(Index::new(IndexConfig::default()));
//! let client = connect("nats://127.0.0.1:4222").await?;
//! let source = NatsSource::new(client, NatsSourceConfig::new(stream.clone()));
//! let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
//! ingestor.caught_up().await;
//!
//! // Worker side.
//! let publisher = NatsPublisher::connect(
//!     connect("nats://127.0.0.1:4222").await?,
//!     stream,
//!     NatsPublishConfig::default(),
//!     PublisherConfig::new(WorkerId(7)),
//! )
//! .await?;
//! publisher.publish(DpRank(0), [KvCacheEventData::Cleared]).await?;
//! publisher.flush().await?;
//! ingestor.shutdown().await?; // writes a final snapshot
//! # Ok(())
//! # }
//! ```
//!
//! docs/events.md describes the wire formats, subjects, stream settings and every counter.

mod bus;
mod checkpoint;
mod dynamo;
mod engine;
mod ingest;
mod mirror;
mod nats;
mod publisher;
mod sequencer;
mod stats;
mod wire;

pub use bus::{in_process_bus, InProcessBus, InProcessSource};
pub use dynamo::{
    decode_dynamo_envelope, dynamo_event_subject, encode_dynamo_envelope, DynamoEnvelope,
    DynamoSource, DynamoWireError, MsgpackError,
};
pub use engine::{
    decode_engine_batch, encode_engine_batch, EngineBatch, EngineCache, EngineCacheConfig,
    EngineEndpoint, EngineEvent, EngineFrames, EngineHash, EnginePublishError, EnginePublisher,
    EnginePublisherConfig, EngineRemoved, EngineSkip, EngineSource, EngineSourceConfig,
    EngineStored, EngineWireError, ExtraKey, CACHE_SALT_PREFIX, REPLAY_END,
};
pub use ingest::{
    EventSource, IngestConfig, IngestControl, IngestState, Ingestor, MalformedKind, SourceItem,
};
pub use nats::{
    connect, ensure_bucket, ensure_stream, subject_token, watch_members, LeftReason,
    MembershipChange, MembershipSettings, NatsError, NatsPublishConfig, NatsPublisher, NatsSource,
    NatsSourceConfig, Registration, SnapshotSettings, StreamSettings, StreamWire,
};
pub use nats::{
    join_replicas, ReplicaLoadReceiver, ReplicaLoadSender, ReplicaSendError, ReplicaSyncSettings,
};
pub use publisher::{Publisher, PublisherConfig};
pub use stats::IngestStats;

use kvroute_protocol::{DpRank, RouterEvent, WorkerId};
use serde::{Deserialize, Serialize};

/// Events of one worker as one message: the unit a publisher sends and an ingestor checks.
///
/// On NATS this is the JSON body of each message (each event in Dynamo's `RouterEvent` JSON).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EventBatch {
    /// The worker every event belongs to.
    pub worker_id: WorkerId,
    /// The worker's process start the events come from (see [`PublisherConfig::incarnation`]).
    pub incarnation: u64,
    /// The events, in order.
    pub events: Vec<RouterEvent>,
}

impl EventBatch {
    pub(crate) fn into_item(self) -> SourceItem {
        SourceItem::Batch {
            worker_id: self.worker_id,
            incarnation: Some(self.incarnation),
            events: self.events,
        }
    }
}

/// A consumer's request that a worker resend its full state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ResyncRequest {
    /// The worker asked; `None`: every worker.
    pub worker_id: Option<WorkerId>,
    /// The data-parallel rank; `None`: every rank.
    pub dp_rank: Option<DpRank>,
    /// Why.
    pub reason: ResyncReason,
}

impl ResyncRequest {
    /// A request for one (worker, dp rank).
    pub fn new(worker_id: WorkerId, dp_rank: DpRank, reason: ResyncReason) -> Self {
        Self {
            worker_id: Some(worker_id),
            dp_rank: Some(dp_rank),
            reason,
        }
    }

    /// A request for every rank of every worker.
    pub fn everyone(reason: ResyncReason) -> Self {
        Self {
            worker_id: None,
            dp_rank: None,
            reason,
        }
    }
}

/// Why a full state is requested.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum ResyncReason {
    /// Event ids skipped some; the cache's entries were dropped.
    Gap,
    /// The first event seen of a cache was not its first (the stream lost its beginning).
    MissedStart,
    /// A repeated request: the full state did not arrive in time.
    Retry,
    /// The consumer started without a usable snapshot and the stream lost older events.
    SnapshotUnusable,
}

/// Errors publishing events.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PublishError {
    /// The transport is closed (the bus's consumer is gone, or the publisher was shut down).
    #[error("event transport closed")]
    Closed,
}

/// Errors of an ingestion task.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum IngestError {
    /// The task panicked or was cancelled.
    #[error("ingestion task failed: {0}")]
    Task(String),
}
