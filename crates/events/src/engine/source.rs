//! Subscribing to engines' ZeroMQ publishers: one task per publisher (a worker's data-parallel
//! rank) that orders its batches, heals gaps through the replay socket and converts events.

use super::convert::{EngineCache, EngineCacheConfig, EngineSkip};
use super::sequence::{Arrival, RankOrder};
use super::wire::{decode_engine_batch, seq_of, EngineFrames, REPLAY_END};
use crate::ingest::{EventSource, IngestState, MalformedKind, SourceItem};
use crate::stats::{Counter, Counters};
use bytes::Bytes;
use futures_util::StreamExt;
use kvroute_protocol::{DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, WorkerId};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

/// How long one connection attempt to an engine's socket may take.
const CONNECT_TIMEOUT: Duration = Duration::from_millis(500);
/// How long a subscription may stay silent before it is renewed.
const IDLE_RESUBSCRIBE: Duration = Duration::from_secs(2);
/// The pause between connection attempts to an engine that is not (yet) listening.
const RECONNECT_INTERVAL: Duration = Duration::from_millis(250);

/// One worker's event endpoints, as its engine was started with them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineEndpoint {
    /// The worker the events belong to.
    pub worker_id: WorkerId,
    /// The PUB endpoint of rank 0 (`tcp://host:5557`); rank `r` publishes on its port + `r`.
    pub endpoint: String,
    /// The replay (ROUTER) endpoint of rank 0, ranks offset the same way; `None`: the engine
    /// has none, and a gap drops the rank's entries.
    pub replay_endpoint: Option<String>,
    /// How many data-parallel ranks the worker runs.
    pub dp_ranks: u32,
}

impl EngineEndpoint {
    /// A single-rank worker publishing on `endpoint`, replaying on the next port (vLLM's and
    /// SGLang's usual `5557`/`5558` pairing).
    pub fn new(worker_id: WorkerId, endpoint: impl Into<String>) -> Self {
        let endpoint = endpoint.into();
        let replay_endpoint = offset_port(&endpoint, 1);
        Self {
            worker_id,
            endpoint,
            replay_endpoint,
            dp_ranks: 1,
        }
    }

    /// This worker with its replay socket at `endpoint` (`None`: no replay).
    pub fn with_replay(mut self, endpoint: Option<String>) -> Self {
        self.replay_endpoint = endpoint;
        self
    }

    /// This worker with `dp_ranks` data-parallel ranks.
    pub fn with_dp_ranks(mut self, dp_ranks: u32) -> Self {
        self.dp_ranks = dp_ranks.max(1);
        self
    }
}

/// `endpoint` with its TCP port moved by `by` (the engines' per-rank layout); `None` if it
/// has no port.
fn offset_port(endpoint: &str, by: u32) -> Option<String> {
    let (head, port) = endpoint.rsplit_once(':')?;
    let port: u32 = port.parse().ok()?;
    let port = port.checked_add(by).filter(|&p| p <= u32::from(u16::MAX))?;
    Some(format!("{head}:{port}"))
}

/// How an [`EngineSource`] reads its workers.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineSourceConfig {
    /// The workers.
    pub workers: Vec<EngineEndpoint>,
    /// kvroute's block size and the bound on remembered blocks per rank.
    pub cache: EngineCacheConfig,
    /// The topic subscribed to (vLLM's default: empty, which is every topic).
    pub topic: String,
    /// How long a replay may take before the gap counts as unhealable.
    pub replay_timeout: Duration,
}

impl EngineSourceConfig {
    /// Subscribing to `workers`, hashing blocks of `block_size` tokens.
    pub fn new(workers: Vec<EngineEndpoint>, block_size: u32) -> Self {
        Self {
            workers,
            cache: EngineCacheConfig::new(block_size),
            topic: String::new(),
            replay_timeout: Duration::from_secs(2),
        }
    }
}

/// KV events of vLLM and SGLang workers, read from their own ZeroMQ publishers, for
/// [`Ingestor::spawn`](crate::Ingestor::spawn).
///
/// Each publisher (worker, dp rank) gets a task of its own: it orders batches by sequence
/// number, asks the replay socket for missed ones, drops the rank's entries when a gap cannot
/// be filled or the engine restarted, and converts events with an [`EngineCache`]. ZeroMQ
/// keeps no history beyond the engine's replay buffer: the ingestor is caught up at once.
///
/// ```no_run
/// use kvroute_events::{EngineEndpoint, EngineSource, EngineSourceConfig, IngestConfig, Ingestor};
/// use kvroute_index::{Index, IndexConfig, SharedIndex};
/// use kvroute_protocol::WorkerId;
///
/// # async fn run() {
/// let workers = vec![EngineEndpoint::new(WorkerId(1), "tcp://10.0.0.7:5557")];
/// let source = EngineSource::new(EngineSourceConfig::new(workers, 16));
/// let index = SharedIndex::new(Index::new(IndexConfig::default()));
/// let ingestor = Ingestor::spawn(source, index, IngestConfig::default());
/// # }
/// ```
#[derive(Debug)]
pub struct EngineSource {
    config: EngineSourceConfig,
    items: Option<mpsc::Receiver<SourceItem>>,
    tasks: Vec<JoinHandle<()>>,
    announced: bool,
}

impl EngineSource {
    /// Subscribes to every worker's ranks when the ingestor starts.
    pub fn new(config: EngineSourceConfig) -> Self {
        Self {
            config,
            items: None,
            tasks: Vec::new(),
            announced: false,
        }
    }

    fn spawn_tasks(&mut self, state: &IngestState) {
        let (tx, rx) = mpsc::channel(1024);
        for worker in &self.config.workers {
            for rank in 0..worker.dp_ranks {
                let endpoint = offset_port(&worker.endpoint, rank);
                let replay = worker
                    .replay_endpoint
                    .as_deref()
                    .and_then(|e| offset_port(e, rank));
                let cache = EngineCache::new(self.config.cache);
                let (Some(endpoint), Ok(cache)) = (endpoint, cache) else {
                    let detail = format!(
                        "worker {}: unusable endpoint or block size",
                        worker.worker_id
                    );
                    let _ = tx.try_send(SourceItem::malformed(MalformedKind::Engine, detail));
                    continue;
                };
                let task = RankTask {
                    worker_id: worker.worker_id,
                    dp_rank: DpRank(rank),
                    endpoint,
                    replay,
                    topic: self.config.topic.clone(),
                    replay_timeout: self.config.replay_timeout,
                    order: RankOrder::default(),
                    cache,
                    next_event_id: 0,
                    events: Vec::new(),
                    refused_logged: false,
                    last_applied: None,
                    out: tx.clone(),
                    counters: Arc::clone(&state.counters),
                };
                self.tasks.push(tokio::spawn(task.run()));
            }
        }
        self.items = Some(rx);
    }
}

impl EventSource for EngineSource {
    async fn start(&mut self, state: &mut IngestState) {
        self.spawn_tasks(state);
    }

    async fn next(&mut self, state: &IngestState) -> SourceItem {
        if !self.announced {
            self.announced = true;
            return SourceItem::CaughtUp;
        }
        let Some(items) = self.items.as_mut() else {
            return SourceItem::Ended;
        };
        match tokio::time::timeout(state.tick(), items.recv()).await {
            Ok(Some(item)) => item,
            Ok(None) => SourceItem::Ended,
            Err(_) => SourceItem::Idle,
        }
    }
}

impl Drop for EngineSource {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// One publisher's subscription.
struct RankTask {
    worker_id: WorkerId,
    dp_rank: DpRank,
    endpoint: String,
    replay: Option<String>,
    topic: String,
    replay_timeout: Duration,
    order: RankOrder,
    cache: EngineCache,
    next_event_id: u64,
    /// Converted events not yet handed to the ingestor.
    events: Vec<RouterEvent>,
    refused_logged: bool,
    /// The last batch applied and a hash of its bytes, to recognize its publisher again.
    last_applied: Option<(u64, u64)>,
    out: mpsc::Sender<SourceItem>,
    counters: Arc<Counters>,
}

impl RankTask {
    async fn run(mut self) {
        loop {
            let Some((mut socket, mut monitor)) = self.subscribe().await else {
                return;
            };
            if self.order.is_reconnected() {
                self.check_continuity().await;
                if !self.flush().await {
                    return;
                }
            }
            loop {
                tokio::select! {
                    message = socket.recv() => match message {
                        Ok(message) => {
                            self.live(message.into_vec()).await;
                            if !self.flush().await {
                                return;
                            }
                        }
                        // The connection failed (a killed engine may show only this).
                        Err(error) => {
                            tracing::debug!(%error, "engine subscription error");
                            break;
                        }
                    },
                    event = monitor.next() => match event {
                        Some(SocketEvent::Disconnected(_)) | None => {
                            tracing::info!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, "engine publisher disconnected: reconnecting");
                            break;
                        }
                        Some(_) => {}
                    },
                    // zmq.rs 0.6 does not notice a peer whose process died (the stream just
                    // ends: no error, no monitor event, no reconnection), so a silent
                    // subscription is renewed: a restarted engine is heard within this.
                    () = tokio::time::sleep(IDLE_RESUBSCRIBE) => break,
                }
            }
            // A new socket rather than zmq.rs's own reconnection, whose backoff grows to 30 s.
            // Whatever was published meanwhile comes back through replay. Dropping a socket
            // whose peer died can block on zmq.rs's peer map: off the runtime's threads.
            tokio::task::spawn_blocking(move || drop((socket, monitor)));
            self.order.reconnected();
        }
    }

    /// A SUB socket connected to the engine (retried until it is), with its event monitor;
    /// `None` if the topic cannot be subscribed.
    async fn subscribe(
        &mut self,
    ) -> Option<(
        SubSocket,
        impl futures_util::Stream<Item = SocketEvent> + Unpin,
    )> {
        loop {
            let mut options = SocketOptions::default();
            options.connect_timeout(CONNECT_TIMEOUT);
            let mut socket = SubSocket::with_options(options);
            let monitor = socket.monitor();
            if socket.subscribe(&self.topic).await.is_err() {
                return None;
            }
            // zmq.rs keeps retrying a refused connection with a growing backoff inside
            // `connect`: bound each attempt and start over with a fresh socket instead.
            let attempt = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(&self.endpoint));
            match attempt.await.unwrap_or(Err(zeromq::ZmqError::NoMessage)) {
                Ok(()) => {
                    tracing::debug!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, endpoint = %self.endpoint, "subscribed to engine KV events");
                    return Some((socket, monitor));
                }
                Err(error) => {
                    tracing::info!(%error, endpoint = %self.endpoint, "engine publisher not reachable yet");
                    tokio::time::sleep(RECONNECT_INTERVAL).await;
                }
            }
        }
    }

    /// Hands converted events to the ingestor; false once it is gone.
    async fn flush(&mut self) -> bool {
        if self.events.is_empty() {
            return true;
        }
        let item = SourceItem::Batch {
            worker_id: self.worker_id,
            incarnation: None,
            events: std::mem::take(&mut self.events),
        };
        self.out.send(item).await.is_ok()
    }

    async fn malformed(&mut self, detail: String) {
        let _ = self
            .out
            .send(SourceItem::malformed(MalformedKind::Engine, detail))
            .await;
    }

    async fn live(&mut self, frames: Vec<Bytes>) {
        let refs: Vec<&[u8]> = frames.iter().map(Bytes::as_ref).collect();
        let frames = match EngineFrames::from_pub(&refs) {
            Ok(frames) => frames,
            Err(error) => return self.malformed(error.to_string()).await,
        };
        let seq = frames.seq;
        match self.order.classify(seq) {
            Arrival::Next => {}
            Arrival::Duplicate => {
                self.counters.inc(Counter::duplicates);
                return;
            }
            Arrival::First => {
                if seq > 0 {
                    // Joined a running engine: fetch what it still buffers.
                    self.replay(0, seq).await;
                }
            }
            Arrival::Gap { from } => {
                self.counters.inc(Counter::gaps);
                tracing::warn!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, expected = from, got = seq, "engine event gap: replaying");
                let healed = self.replay(from, seq).await;
                if healed && self.order.classify(seq) == Arrival::Next {
                    self.counters.inc(Counter::resyncs_completed);
                }
            }
            Arrival::Restart => {
                self.counters.inc(Counter::incarnation_changes);
                tracing::info!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, "engine restarted: dropping its entries");
                self.drop_entries();
                self.replay(0, seq).await;
            }
        }
        match self.order.classify(seq) {
            Arrival::Next | Arrival::First => {}
            Arrival::Duplicate => return,
            Arrival::Gap { .. } | Arrival::Restart => self.unhealed(),
        }
        self.apply(seq, frames.payload).await;
    }

    /// After a renewed subscription: asks the replay socket for the last batch applied. The
    /// same bytes mean the same publisher process (whatever it published meanwhile is applied);
    /// anything else means the engine restarted (entries dropped, its buffer replayed from 0).
    /// Without an answer the next live batch decides.
    async fn check_continuity(&mut self) {
        let (Some(endpoint), Some((last_seq, last_hash))) =
            (self.replay.clone(), self.last_applied)
        else {
            return;
        };
        let fetched = tokio::time::timeout(self.replay_timeout, fetch_replay(&endpoint, last_seq));
        let Ok(Ok(batches)) = fetched.await else {
            return;
        };
        let same = batches
            .first()
            .is_some_and(|(seq, payload)| *seq == last_seq && payload_hash(payload) == last_hash);
        if same {
            self.order.continued();
            for (seq, payload) in batches.into_iter().skip(1) {
                if self.order.classify(seq) != Arrival::Next {
                    // The buffer has a hole: the next live batch reveals the gap.
                    break;
                }
                self.apply(seq, &payload).await;
            }
            return;
        }
        self.counters.inc(Counter::incarnation_changes);
        tracing::info!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, "engine restarted: dropping its entries");
        self.drop_entries();
        self.replay(0, u64::MAX).await;
    }

    /// A gap nothing can fill: the rank's entries go and are rebuilt from new events.
    fn unhealed(&mut self) {
        self.counters.inc(Counter::gaps_unhealed);
        tracing::warn!(worker_id = %self.worker_id, dp_rank = %self.dp_rank, "missed engine events are no longer buffered: dropping the rank's entries");
        self.drop_entries();
    }

    fn drop_entries(&mut self) {
        self.order.reset();
        self.cache.clear();
        self.push(KvCacheEventData::Cleared);
    }

    fn push(&mut self, data: KvCacheEventData) {
        let event = KvCacheEvent {
            event_id: self.next_event_id,
            data,
            dp_rank: self.dp_rank,
        };
        self.next_event_id += 1;
        self.events.push(RouterEvent::new(self.worker_id, event));
    }

    /// Asks the replay socket for batches `from..until` and applies them; true if every one
    /// arrived in order.
    async fn replay(&mut self, from: u64, until: u64) -> bool {
        let Some(endpoint) = self.replay.clone() else {
            return false;
        };
        self.counters.inc(Counter::resyncs_requested);
        let batches =
            match tokio::time::timeout(self.replay_timeout, fetch_replay(&endpoint, from)).await {
                Ok(Ok(batches)) => batches,
                Ok(Err(error)) => {
                    tracing::warn!(%error, %endpoint, "engine replay failed");
                    return false;
                }
                Err(_) => {
                    tracing::warn!(%endpoint, "engine replay timed out");
                    return false;
                }
            };
        let mut in_order = true;
        for (seq, payload) in batches {
            if seq >= until {
                break;
            }
            match self.order.classify(seq) {
                Arrival::First | Arrival::Next => {}
                Arrival::Duplicate => continue,
                Arrival::Gap { .. } | Arrival::Restart => {
                    in_order = false;
                    self.unhealed();
                }
            }
            self.apply(seq, &payload).await;
        }
        in_order
    }

    async fn apply(&mut self, seq: u64, payload: &[u8]) {
        self.order.applied(seq);
        self.last_applied = Some((seq, payload_hash(payload)));
        let batch = match decode_engine_batch(payload) {
            Ok(batch) => batch,
            Err(error) => return self.malformed(format!("seq {seq}: {error}")).await,
        };
        for event in &batch.events {
            match self.cache.convert(event) {
                Ok(KvCacheEventData::Removed(removed)) if removed.block_hashes.is_empty() => {}
                Ok(KvCacheEventData::Removed(removed)) => {
                    // vLLM sends one BlockRemoved per evicted block: one index event for a run.
                    if let Some(KvCacheEventData::Removed(last)) =
                        self.events.last_mut().map(|e| &mut e.event.data)
                    {
                        last.block_hashes.extend(removed.block_hashes);
                    } else {
                        self.push(KvCacheEventData::Removed(removed));
                    }
                }
                Ok(data) => self.push(data),
                Err(skip) => self.skipped(skip).await,
            }
        }
    }

    async fn skipped(&mut self, skip: EngineSkip) {
        let counter = match skip {
            EngineSkip::OtherGroup => Counter::engine_other_group,
            EngineSkip::OtherMedium(_) => Counter::engine_other_tier,
            EngineSkip::UnknownParent => Counter::engine_unknown_parent,
            EngineSkip::BlockSize { .. } => {
                if !self.refused_logged {
                    self.refused_logged = true;
                    tracing::error!(worker_id = %self.worker_id, %skip, "refusing the worker's events: start kvroute with the engine's --block-size");
                }
                Counter::engine_block_size_refused
            }
            EngineSkip::Overflow => {
                self.push(KvCacheEventData::Cleared);
                Counter::engine_overflows
            }
            EngineSkip::Inconsistent(_) => return self.malformed(skip.to_string()).await,
        };
        self.counters.inc(counter);
    }
}

fn payload_hash(payload: &[u8]) -> u64 {
    use std::hash::Hasher;
    let mut hasher = rustc_hash::FxHasher::default();
    hasher.write(payload);
    hasher.finish()
}

/// One replay conversation: `["", start]` to the ROUTER, batches back until the end marker.
/// Engines before vLLM 0.26 send no topic frame; both layouts are read.
async fn fetch_replay(endpoint: &str, from: u64) -> Result<Vec<(u64, Bytes)>, String> {
    let mut dealer = DealerSocket::new();
    dealer.connect(endpoint).await.map_err(|e| e.to_string())?;
    let request = ZmqMessage::try_from(vec![
        Bytes::new(),
        Bytes::copy_from_slice(&from.to_be_bytes()),
    ])
    .map_err(|e| e.to_string())?;
    dealer.send(request).await.map_err(|e| e.to_string())?;
    let mut batches = Vec::new();
    loop {
        let frames = dealer.recv().await.map_err(|e| e.to_string())?.into_vec();
        let (seq, payload) = match frames.as_slice() {
            [_, _, seq, payload] | [_, seq, payload] => (seq, payload),
            other => return Err(format!("replay reply of {} frames", other.len())),
        };
        let seq = seq_of(seq).map_err(|e| e.to_string())?;
        if seq == REPLAY_END {
            return Ok(batches);
        }
        batches.push((seq, payload.clone()));
    }
}
