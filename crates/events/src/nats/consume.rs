//! Consuming the event stream: an ordered consumer from the right sequence, recreated after
//! failures, and snapshots to a JetStream object store.

use super::{backoff, ensure_stream, NatsError, StreamSettings};
use crate::checkpoint;
use crate::ingest::{EventSource, IngestState, MalformedKind, SourceItem};
use crate::stats::Counter;
use crate::{EventBatch, ResyncReason, ResyncRequest};
use async_nats::jetstream::{self, consumer, object_store, stream};
use futures_util::StreamExt;
use kvroute_protocol::RouterEvent;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::io::AsyncReadExt;

/// Where and how often an ingestor keeps snapshots.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SnapshotSettings {
    /// The object store bucket (created when missing).
    pub bucket: String,
    /// The object's name; replicas of one gateway share it (any replica's snapshot is valid
    /// for every replica: they consume the same stream).
    pub object: String,
    /// How often a snapshot is written while new events arrive; one is also written on
    /// [`Ingestor::shutdown`](crate::Ingestor::shutdown).
    pub interval: Duration,
}

impl Default for SnapshotSettings {
    fn default() -> Self {
        Self {
            bucket: "kvroute-snapshots".into(),
            object: "index".into(),
            interval: Duration::from_secs(60),
        }
    }
}

/// What the stream's messages are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum StreamWire {
    /// kvroute's: one [`EventBatch`] (JSON) per message, in a stream kvroute provisions.
    Kvroute,
    /// Older Dynamo workers': one `RouterEvent` (JSON) per message, in Dynamo's own stream
    /// (never created or changed by kvroute).
    DynamoJson,
}

/// How a [`NatsSource`] consumes.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsSourceConfig {
    /// What the messages are.
    pub wire: StreamWire,
    /// The stream and the (namespace, component) whose events to consume.
    pub stream: StreamSettings,
    /// Snapshots, or `None` to always start from the stream's first message.
    pub snapshots: Option<SnapshotSettings>,
    /// Messages larger than this are skipped unread (counted as malformed).
    pub max_message_bytes: usize,
    /// First delay before recreating a failed consumer; doubles up to 2 s.
    pub min_backoff: Duration,
}

impl NatsSourceConfig {
    /// Consuming `stream`, with snapshots at the default place and interval.
    pub fn new(stream: StreamSettings) -> Self {
        Self {
            wire: StreamWire::Kvroute,
            stream,
            snapshots: Some(SnapshotSettings::default()),
            max_message_bytes: 8 << 20,
            min_backoff: Duration::from_millis(50),
        }
    }

    /// Consuming older Dynamo workers' JetStream stream
    /// `namespace-{namespace}-component-{component}-kv-events` (slugged as Dynamo does:
    /// lowercase, anything but `[a-z0-9_-]` becomes `_`), without snapshots.
    pub fn dynamo_legacy(namespace: &str, component: &str) -> Self {
        let name: String = format!("namespace-{namespace}-component-{component}-kv-events")
            .to_lowercase()
            .chars()
            .map(|c| match c {
                'a'..='z' | '0'..='9' | '-' | '_' => c,
                _ => '_',
            })
            .collect();
        let stream = StreamSettings {
            stream: name,
            ..StreamSettings::default()
        };
        Self {
            wire: StreamWire::DynamoJson,
            snapshots: None,
            ..Self::new(stream)
        }
    }

    /// This configuration with other snapshot settings (`None`: no snapshots).
    pub fn with_snapshots(mut self, snapshots: Option<SnapshotSettings>) -> Self {
        self.snapshots = snapshots;
        self
    }
}

const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// How long the consumer may stay silent before the connection count is checked.
const RECONNECT_CHECK: Duration = Duration::from_millis(250);
/// After this long without a message, the stream's leader is asked whether ours has events we
/// were not given: an ordered consumer lives on one NATS node, and when that node dies while
/// this client stays connected elsewhere, the client only notices after missing heartbeats
/// (15 s each), if at all.
const STALL_CHECK: Duration = Duration::from_secs(2);

/// Events from the JetStream stream, for [`Ingestor::spawn`](crate::Ingestor::spawn).
///
/// Every consumer reads the whole stream (an ordered consumer of its own: nothing is shared
/// or acknowledged between gateway replicas). When the connection or the server fails, the
/// consumer is recreated from the next sequence, indefinitely.
pub struct NatsSource {
    client: async_nats::Client,
    js: jetstream::Context,
    config: NatsSourceConfig,
    messages: Option<consumer::pull::Ordered>,
    /// The last stream sequence handed to the ingestor.
    delivered: u64,
    /// Whether the consumer reported nothing pending (after the message just delivered).
    drained: bool,
    /// Whether caught up was announced.
    announced: bool,
    retry_at: Option<Instant>,
    delay: Duration,
    opened: bool,
    /// The client's connection count when the consumer was opened: a reconnection means the
    /// server may have lost the consumer, so it is recreated at once rather than after
    /// missed heartbeats.
    connects: u64,
    store: Option<object_store::ObjectStore>,
    saved: u64,
    saved_at: Instant,
    /// When a message last arrived, or the stream was last asked about a stall.
    heard_at: Instant,
}

impl std::fmt::Debug for NatsSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsSource")
            .field("config", &self.config)
            .field("delivered", &self.delivered)
            .finish_non_exhaustive()
    }
}

impl EventSource for NatsSource {
    /// Provisions the stream, loads the newest snapshot if usable, and sets where to start.
    async fn start(&mut self, ingest: &mut IngestState) {
        let mut delay = self.config.min_backoff;
        let mut stream = loop {
            let stream = match self.config.wire {
                StreamWire::Kvroute => ensure_stream(&self.js, &self.config.stream).await,
                StreamWire::DynamoJson => self
                    .js
                    .get_stream(&self.config.stream.stream)
                    .await
                    .map_err(|e| NatsError::Stream {
                        stream: self.config.stream.stream.clone(),
                        source: e.into(),
                    }),
            };
            match stream {
                Ok(stream) => break stream,
                Err(error) => {
                    tracing::warn!(%error, "event stream unavailable; retrying");
                    delay = backoff(delay, MAX_BACKOFF).await;
                }
            }
        };
        let state = match stream.info().await {
            Ok(info) => info.state.clone(),
            Err(_) => stream.cached_info().state.clone(),
        };
        let Some(settings) = self.config.snapshots.clone() else {
            return;
        };
        let store = self.open_store(&settings).await;
        self.store = store;
        let Some(bytes) = self.load(&settings).await else {
            tracing::info!("no snapshot: consuming the stream from its first message");
            return;
        };
        match self.restore(ingest, &bytes, &state) {
            Ok(sequence) => {
                ingest.counters.inc(Counter::snapshots_restored);
                tracing::info!(
                    sequence,
                    "restored the index snapshot; replaying the stream's tail"
                );
                self.delivered = sequence;
                self.saved = sequence;
            }
            Err(problem) => {
                ingest.counters.inc(Counter::snapshots_unusable);
                tracing::warn!(
                    problem,
                    "snapshot unusable: starting empty and asking every worker for its full state"
                );
                EventSource::request(
                    self,
                    &ResyncRequest::everyone(ResyncReason::SnapshotUnusable),
                )
                .await;
            }
        }
    }

    /// Writes a snapshot if new events arrived and the interval passed (or `now_anyway`).
    async fn checkpoint(&mut self, ingest: &IngestState, now_anyway: bool) {
        let (Some(store), Some(settings)) = (&self.store, &self.config.snapshots) else {
            return;
        };
        let due = now_anyway || self.saved_at.elapsed() >= settings.interval;
        if !due || self.delivered <= self.saved {
            return;
        }
        let bytes = checkpoint::encode(self.delivered, &ingest.sequencer, &ingest.index.snapshot());
        match store
            .put(settings.object.as_str(), &mut bytes.as_slice())
            .await
        {
            Ok(_) => {
                ingest.counters.inc(Counter::snapshots_saved);
                tracing::debug!(
                    sequence = self.delivered,
                    bytes = bytes.len(),
                    "snapshot written"
                );
                self.saved = self.delivered;
            }
            Err(error) => {
                ingest.counters.inc(Counter::snapshot_failures);
                tracing::warn!(%error, "snapshot write failed; ingestion goes on");
            }
        }
        self.saved_at = Instant::now();
    }

    /// Sends a full-state request on the control subject (NATS core, fire and forget: the
    /// ingestor repeats it if nothing comes).
    async fn request(&mut self, request: &ResyncRequest) {
        let subject = self.config.stream.control_subject(request.worker_id);
        let payload = serde_json::to_vec(request).unwrap_or_default();
        if let Err(error) = self.client.publish(subject, payload.into()).await {
            tracing::warn!(%error, "could not send a full-state request");
        }
    }

    /// The next item; reopens the consumer as long as it takes.
    async fn next(&mut self, ingest: &IngestState) -> SourceItem {
        loop {
            if !self.announced && self.drained {
                self.announced = true;
                return SourceItem::CaughtUp;
            }
            if let Some(at) = self.retry_at.take() {
                tokio::time::sleep_until(at.into()).await;
                return SourceItem::Idle;
            }
            let Some(messages) = self.messages.as_mut() else {
                match self.open().await {
                    Ok(messages) => {
                        if self.opened {
                            ingest.counters.inc(Counter::consumer_restarts);
                        }
                        self.opened = true;
                        self.connects = self.connects_now();
                        self.messages = Some(messages);
                        self.delay = self.config.min_backoff;
                    }
                    Err(error) => {
                        tracing::warn!(%error, "could not open the stream consumer; retrying");
                        self.fail();
                    }
                }
                continue;
            };
            let message = match tokio::time::timeout(RECONNECT_CHECK, messages.next()).await {
                Err(_) => {
                    if self.connects_now() != self.connects {
                        tracing::info!("reconnected to NATS: recreating the stream consumer");
                        self.messages = None;
                    } else if self.heard_at.elapsed() >= STALL_CHECK {
                        self.heard_at = Instant::now();
                        let filter = match self.config.wire {
                            StreamWire::Kvroute => Some(self.config.stream.event_filter()),
                            StreamWire::DynamoJson => None,
                        };
                        let stream = self.config.stream.stream.clone();
                        if stalled(self.js.clone(), stream, filter, self.delivered).await {
                            tracing::warn!("the stream holds events the consumer did not deliver (its NATS node died?): recreating it");
                            self.messages = None;
                        }
                    }
                    return SourceItem::Idle;
                }
                Ok(Some(Ok(message))) => message,
                Ok(Some(Err(error))) => {
                    tracing::warn!(%error, "stream consumer failed; recreating it");
                    self.fail();
                    continue;
                }
                Ok(None) => {
                    self.fail();
                    continue;
                }
            };
            let Ok((sequence, pending)) = message.info().map(|i| (i.stream_sequence, i.pending))
            else {
                return SourceItem::malformed(MalformedKind::Delivery, "no delivery metadata");
            };
            self.drained |= pending == 0;
            self.heard_at = Instant::now();
            if sequence <= self.delivered {
                continue; // replayed by a recreated consumer
            }
            self.delivered = sequence;
            return self.decode(&message.payload);
        }
    }
}

impl NatsSource {
    /// A source on `client`; nothing happens until the ingestor starts it.
    pub fn new(client: async_nats::Client, config: NatsSourceConfig) -> Self {
        let delay = config.min_backoff;
        Self {
            js: jetstream::new(client.clone()),
            client,
            config,
            messages: None,
            delivered: 0,
            drained: false,
            announced: false,
            retry_at: None,
            delay,
            opened: false,
            connects: 0,
            store: None,
            saved: 0,
            saved_at: Instant::now(),
            heard_at: Instant::now(),
        }
    }

    async fn open_store(
        &mut self,
        settings: &SnapshotSettings,
    ) -> Option<object_store::ObjectStore> {
        if let Ok(store) = self.js.get_object_store(&settings.bucket).await {
            return Some(store);
        }
        let config = object_store::Config {
            bucket: settings.bucket.clone(),
            storage: stream::StorageType::File,
            num_replicas: self.config.stream.replicas,
            ..Default::default()
        };
        match self.js.create_object_store(config).await {
            Ok(store) => Some(store),
            Err(error) => {
                tracing::warn!(%error, "snapshot store unavailable: no snapshots this run");
                None
            }
        }
    }

    async fn load(&mut self, settings: &SnapshotSettings) -> Option<Vec<u8>> {
        let store = self.store.as_ref()?;
        let mut object = match store.get(&settings.object).await {
            Ok(object) => object,
            Err(error) if error.kind() == object_store::GetErrorKind::NotFound => return None,
            Err(error) => {
                tracing::warn!(%error, "could not read the snapshot");
                return None;
            }
        };
        // async-nats 0.49 panics inside the read when it cannot create the object's consumer
        // (while the store's JetStream leader is being elected): in a task of its own, that
        // panic is one more failed read, after which the stream is replayed instead.
        let read = tokio::spawn(async move {
            let mut bytes = Vec::new();
            object.read_to_end(&mut bytes).await.map(|_| bytes)
        });
        match read.await {
            Ok(Ok(bytes)) => Some(bytes),
            Ok(Err(error)) => {
                tracing::warn!(%error, "could not read the snapshot");
                None
            }
            Err(error) => {
                tracing::warn!(%error, "could not read the snapshot (the NATS client panicked)");
                None
            }
        }
    }

    /// Restores `bytes` into the ingestor if the stream still holds what follows it.
    fn restore(
        &self,
        ingest: &mut IngestState,
        bytes: &[u8],
        state: &stream::State,
    ) -> Result<u64, String> {
        let checkpoint = checkpoint::decode(bytes).map_err(|e| e.to_string())?;
        let next = checkpoint.stream_sequence + 1;
        if next < state.first_sequence || next > state.last_sequence + 1 {
            return Err(format!(
                "it covers the stream up to {} but the stream holds {}..={}",
                checkpoint.stream_sequence, state.first_sequence, state.last_sequence
            ));
        }
        ingest
            .index
            .restore(checkpoint.index)
            .map_err(|e| e.to_string())?;
        ingest.sequencer = checkpoint.sequencer;
        Ok(checkpoint.stream_sequence)
    }

    /// Opens an ordered consumer from the next sequence; notes whether it has nothing pending.
    async fn open(&mut self) -> Result<consumer::pull::Ordered, async_nats::Error> {
        let stream = self.js.get_stream(&self.config.stream.stream).await?;
        let deliver_policy = match self.delivered {
            0 => consumer::DeliverPolicy::All,
            last => consumer::DeliverPolicy::ByStartSequence {
                start_sequence: last + 1,
            },
        };
        let consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: match self.config.wire {
                    StreamWire::Kvroute => self.config.stream.event_filter(),
                    StreamWire::DynamoJson => String::new(),
                },
                deliver_policy,
                ..Default::default()
            })
            .await?;
        self.drained |= consumer.cached_info().num_pending == 0;
        Ok(consumer.messages().await?)
    }

    fn decode(&self, payload: &[u8]) -> SourceItem {
        if payload.len() > self.config.max_message_bytes {
            return SourceItem::malformed(
                MalformedKind::TooLarge,
                format!("{} bytes", payload.len()),
            );
        }
        match self.config.wire {
            StreamWire::Kvroute => match EventBatch::from_json(payload) {
                Ok(batch) => batch.into_item(),
                Err(error) => SourceItem::malformed(MalformedKind::Batch, error.to_string()),
            },
            StreamWire::DynamoJson => match RouterEvent::from_json(payload) {
                Ok(event) => SourceItem::Batch {
                    worker_id: event.worker_id,
                    incarnation: None,
                    events: vec![event],
                },
                Err(error) => SourceItem::malformed(MalformedKind::Dynamo, error.to_string()),
            },
        }
    }

    fn connects_now(&self) -> u64 {
        self.client.statistics().connects.load(Ordering::Relaxed)
    }

    fn fail(&mut self) {
        self.messages = None;
        self.retry_at = Some(Instant::now() + self.delay);
        self.delay = (self.delay * 2).min(MAX_BACKOFF);
    }
}

/// Whether the leader of `stream` holds a message on `filter` (`None`: any) past `delivered`.
/// Unknown (no answer) counts as no. (A free function: the source itself is not `Sync`.)
async fn stalled(
    js: jetstream::Context,
    stream: String,
    filter: Option<String>,
    delivered: u64,
) -> bool {
    let Ok(stream) = js.get_stream(&stream).await else {
        return false;
    };
    let last = match filter {
        Some(filter) => stream
            .get_last_raw_message_by_subject(&filter)
            .await
            .map(|message| message.sequence)
            .ok(),
        None => Some(stream.cached_info().state.last_sequence),
    };
    last.is_some_and(|last| last > delivered)
}
