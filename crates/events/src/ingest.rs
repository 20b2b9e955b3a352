//! The ingestion task: takes batches from a source, checks their order, applies them to the
//! index, asks workers for full state after gaps, and (NATS) keeps snapshots.

use crate::bus::InProcessSource;
use crate::sequencer::Sequencer;
use crate::stats::{Counter, Counters, IngestStats};
use crate::{IngestError, ResyncRequest};
use kvroute_index::SharedIndex;
use kvroute_protocol::{RouterEvent, WorkerId};
use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::error::TryRecvError;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::JoinHandle;

/// How an [`Ingestor`] behaves.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct IngestConfig {
    /// How long a (worker, dp rank) waits for the full state it asked for before it asks again.
    pub resync_retry: Duration,
    /// How often the task looks at timers (resync retries, snapshot interval).
    pub tick: Duration,
}

impl Default for IngestConfig {
    fn default() -> Self {
        Self {
            resync_retry: Duration::from_secs(5),
            tick: Duration::from_millis(250),
        }
    }
}

impl IngestConfig {
    /// This configuration with full-state requests repeated after `retry`.
    pub fn with_resync_retry(mut self, retry: Duration) -> Self {
        self.resync_retry = retry;
        self
    }
}

/// Where an [`Ingestor`] reads events from: one implementation per transport and wire.
///
/// kvroute ships [`NatsSource`](crate::NatsSource) (its JetStream stream, with snapshots),
/// [`DynamoSource`](crate::DynamoSource) (Dynamo 1.6 workers' NATS core subjects) and
/// [`InProcessSource`](crate::InProcessSource) (the in-process bus). A source only delivers;
/// the ingestor checks order (gaps, duplicates, incarnations), applies events to the index and
/// asks workers for their full state through [`EventSource::request`].
///
/// Methods are called from one task, one at a time: `start` once, then `next` in a loop with
/// `request` and `checkpoint` in between, and `checkpoint(.., true)` once at the end.
///
/// # Example
///
/// A source that replays a fixed list of batches:
///
/// ```
/// use kvroute_events::{EventSource, IngestConfig, IngestState, Ingestor, SourceItem};
/// use kvroute_index::{Index, IndexConfig, SharedIndex};
/// use kvroute_protocol::{KvCacheEvent, KvCacheEventData, DpRank, RouterEvent, WorkerId};
///
/// struct Replay(Vec<RouterEvent>);
///
/// impl EventSource for Replay {
///     async fn next(&mut self, _state: &IngestState) -> SourceItem {
///         match self.0.pop() {
///             Some(event) => SourceItem::Batch {
///                 worker_id: event.worker_id,
///                 incarnation: None,
///                 events: vec![event],
///             },
///             None => SourceItem::Ended,
///         }
///     }
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(async {
/// let clear = RouterEvent::new(
///     WorkerId(1),
///     KvCacheEvent { event_id: 0, dp_rank: DpRank(0), data: KvCacheEventData::Cleared },
/// );
/// let index = SharedIndex::new(Index::new(IndexConfig::default()));
/// let ingestor = Ingestor::spawn(Replay(vec![clear]), index, IngestConfig::default());
/// ingestor.shutdown().await?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// # })?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub trait EventSource: Send + 'static {
    /// Runs once before the first [`next`](EventSource::next): provision the transport,
    /// restore a snapshot into `state`. Nothing by default.
    fn start(&mut self, state: &mut IngestState) -> impl Future<Output = ()> + Send {
        let _ = state;
        async {}
    }

    /// The next thing the source produced. Return [`SourceItem::Idle`] when nothing arrived
    /// for about [`IngestState::tick`], so the ingestor can look at its timers.
    fn next(&mut self, state: &IngestState) -> impl Future<Output = SourceItem> + Send;

    /// Asks the workers `request` names for their full state. Sources whose workers take no
    /// requests ignore it (the default); the ingestor repeats unanswered requests.
    fn request(&mut self, request: &ResyncRequest) -> impl Future<Output = ()> + Send {
        let _ = request;
        async {}
    }

    /// Called on every tick, and once with `last` when ingestion stops: a chance to persist
    /// `state` (a snapshot). Nothing by default.
    fn checkpoint(&mut self, state: &IngestState, last: bool) -> impl Future<Output = ()> + Send {
        let _ = (state, last);
        async {}
    }
}

/// Why a message was skipped; each kind is logged once per ingestor, then only counted (in
/// `kvroute_events_malformed_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MalformedKind {
    /// Not a batch: bad JSON, wrong types, missing fields.
    Batch,
    /// An event names another worker than its batch.
    WorkerMismatch,
    /// Larger than the configured limit; not read.
    TooLarge,
    /// A stream message without JetStream delivery metadata.
    Delivery,
    /// Not a Dynamo envelope of `RouterEvent`s, or not a Dynamo `RouterEvent` JSON.
    Dynamo,
    /// Not an engine's (vLLM, SGLang) ZeroMQ message or `KVEventBatch`, or an inconsistent
    /// engine event.
    Engine,
}

/// One thing an [`EventSource`] produced.
#[derive(Debug)]
#[non_exhaustive]
pub enum SourceItem {
    /// Events of one worker, in order; `incarnation` is `None` for sources without one.
    Batch {
        /// The worker every event belongs to.
        worker_id: WorkerId,
        /// The worker's process start, when the wire carries one.
        incarnation: Option<u64>,
        /// The events.
        events: Vec<RouterEvent>,
    },
    /// A message that was skipped.
    Malformed {
        /// What was wrong.
        kind: MalformedKind,
        /// Details for the log.
        detail: String,
    },
    /// Everything the source held at start has been delivered (the ingestor turns ready).
    CaughtUp,
    /// Nothing arrived for a while (time to look at timers).
    Idle,
    /// The source is closed for good.
    Ended,
}

impl SourceItem {
    pub(crate) fn malformed(kind: MalformedKind, detail: impl Into<String>) -> Self {
        Self::Malformed {
            kind,
            detail: detail.into(),
        }
    }
}

impl EventSource for InProcessSource {
    async fn next(&mut self, state: &IngestState) -> SourceItem {
        match self.events.try_recv() {
            Ok(batch) => batch.into_item(),
            Err(TryRecvError::Empty) if !self.drained => {
                self.drained = true;
                SourceItem::CaughtUp
            }
            Err(TryRecvError::Empty) => {
                match tokio::time::timeout(state.tick(), self.events.recv()).await {
                    Ok(Some(batch)) => batch.into_item(),
                    Ok(None) => SourceItem::Ended,
                    Err(_) => SourceItem::Idle,
                }
            }
            Err(TryRecvError::Disconnected) => SourceItem::Ended,
        }
    }

    async fn request(&mut self, request: &ResyncRequest) {
        InProcessSource::request(self, request);
    }
}

/// What an ingestion task owns besides its source: the index it writes, the order of every
/// worker's events, its counters. Sources see it in [`EventSource`]'s methods.
#[derive(Debug)]
pub struct IngestState {
    pub(crate) index: SharedIndex,
    pub(crate) sequencer: Sequencer,
    pub(crate) counters: Arc<Counters>,
    logged: HashSet<MalformedKind>,
    config: IngestConfig,
}

impl IngestState {
    /// The index events are applied to.
    pub fn index(&self) -> &SharedIndex {
        &self.index
    }

    /// How often the ingestor looks at its timers; [`EventSource::next`] should return
    /// [`SourceItem::Idle`] after about this long without a message.
    pub fn tick(&self) -> Duration {
        self.config.tick
    }

    async fn handle<S: EventSource>(
        &mut self,
        source: &mut S,
        item: SourceItem,
        ready: &watch::Sender<bool>,
    ) -> bool {
        match item {
            SourceItem::Batch {
                worker_id,
                incarnation,
                events,
            } => {
                if let Some(stray) = events.iter().find(|e| e.worker_id != worker_id) {
                    let detail =
                        format!("batch of {worker_id} holds an event of {}", stray.worker_id);
                    self.malformed(MalformedKind::WorkerMismatch, &detail);
                    return true;
                }
                self.counters.inc(Counter::batches);
                let requests = self.sequencer.process(
                    worker_id,
                    incarnation,
                    &events,
                    &self.index,
                    &self.counters,
                    Instant::now(),
                );
                for request in &requests {
                    source.request(request).await;
                }
            }
            SourceItem::Malformed { kind, detail } => self.malformed(kind, &detail),
            SourceItem::CaughtUp => {
                ready.send_replace(true);
            }
            SourceItem::Idle => {}
            SourceItem::Ended => return false,
        }
        true
    }

    fn command(&mut self, command: Command) {
        match command {
            Command::Forget(worker_id) => {
                tracing::info!(%worker_id, "forgetting a worker that left");
                self.sequencer.forget(worker_id);
                self.index.remove_worker(worker_id);
                self.counters.inc(Counter::workers_forgotten);
            }
        }
    }

    fn malformed(&mut self, kind: MalformedKind, detail: &str) {
        self.counters.inc(Counter::malformed);
        if self.logged.insert(kind) {
            tracing::warn!(
                ?kind,
                detail,
                "skipping a malformed message (logged once per kind)"
            );
        }
    }

    async fn on_tick<S: EventSource>(&mut self, source: &mut S) {
        let requests = self
            .sequencer
            .due_resyncs(Instant::now(), self.config.resync_retry);
        self.counters
            .add(Counter::resyncs_requested, requests.len() as u64);
        for request in &requests {
            source.request(request).await;
        }
        source.checkpoint(self, false).await;
    }
}

/// A running ingestion task: applies one source's events to a [`SharedIndex`].
///
/// The task runs until [`Ingestor::shutdown`] or until the source ends (an in-process bus
/// whose every publisher and bus handle is dropped). Dropping the `Ingestor` stops the task.
#[derive(Debug)]
pub struct Ingestor {
    counters: Arc<Counters>,
    control: IngestControl,
    ready: watch::Receiver<bool>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Result<(), IngestError>>>,
}

impl Ingestor {
    /// Starts ingesting `source` into `index` on a new Tokio task. Must be called inside a
    /// Tokio runtime.
    pub fn spawn(source: impl EventSource, index: SharedIndex, config: IngestConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let ingest = IngestState {
            index,
            sequencer: Sequencer::default(),
            counters: Arc::clone(&counters),
            logged: HashSet::new(),
            config,
        };
        let task = tokio::spawn(run(source, ingest, ready_tx, stop_rx, commands_rx));
        Self {
            counters,
            control: IngestControl { commands },
            ready,
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// A handle that changes what the task knows about workers, for the code that follows
    /// the fleet's membership.
    pub fn control(&self) -> IngestControl {
        self.control.clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> IngestStats {
        self.counters.snapshot()
    }

    /// Whether everything the source held when ingestion started has been applied (for
    /// NATS: the stream's last message at start; in process: the bus was once drained).
    pub fn is_caught_up(&self) -> bool {
        *self.ready.borrow()
    }

    /// Waits until [`Ingestor::is_caught_up`]; returns at once if the task ended before.
    pub async fn caught_up(&self) {
        let mut ready = self.ready.clone();
        // An error means the task ended: nothing more to wait for.
        let _ = ready.wait_for(|&ready| ready).await;
    }

    /// A receiver that turns `true` once caught up, for readiness probes.
    pub fn readiness(&self) -> watch::Receiver<bool> {
        self.ready.clone()
    }

    /// Stops the task after the message in hand (NATS: writes a final snapshot) and returns
    /// how it ended.
    pub async fn shutdown(mut self) -> Result<(), IngestError> {
        if let Some(stop) = self.stop.take() {
            // The task may have ended already; its result tells.
            let _ = stop.send(());
        }
        match self.task.take() {
            Some(task) => task.await.map_err(|e| IngestError::Task(e.to_string()))?,
            None => Ok(()),
        }
    }
}

/// Changes what a running [`Ingestor`] knows about workers; cheap to clone. Commands are
/// applied by the ingestion task between two messages, so they take their place in the
/// stream's order; a command sent after the task ended does nothing.
#[derive(Clone, Debug)]
pub struct IngestControl {
    commands: mpsc::UnboundedSender<Command>,
}

#[derive(Debug)]
enum Command {
    Forget(WorkerId),
}

impl IngestControl {
    /// For a worker that left the fleet: drops its entries from the index and everything known
    /// about the order of its events. If it comes back without restarting (a partition, an
    /// expired heartbeat), its next event is not the start of a cache, so it is asked for its
    /// full state (counted in `resyncs_requested`) instead of being applied to an index that no
    /// longer holds what came before; a restarted worker starts a new cache anyway.
    pub fn forget_worker(&self, worker_id: WorkerId) {
        // An error means the task ended: there is nothing left to forget.
        let _ = self.commands.send(Command::Forget(worker_id));
    }
}

impl Drop for Ingestor {
    fn drop(&mut self) {
        if let Some(task) = &self.task {
            task.abort();
        }
    }
}

async fn run<S: EventSource>(
    mut source: S,
    mut ingest: IngestState,
    ready: watch::Sender<bool>,
    mut stop: oneshot::Receiver<()>,
    mut commands: mpsc::UnboundedReceiver<Command>,
) -> Result<(), IngestError> {
    source.start(&mut ingest).await;
    // Timers are looked at between items, never by interrupting the source (which may be
    // halfway through recreating a consumer); sources return `Idle` when nothing arrives.
    let mut last_tick = Instant::now();
    loop {
        tokio::select! {
            biased;
            _ = &mut stop => break,
            item = source.next(&ingest) => {
                if !ingest.handle(&mut source, item, &ready).await {
                    break;
                }
                while let Ok(command) = commands.try_recv() {
                    ingest.command(command);
                }
            }
        }
        if last_tick.elapsed() >= ingest.config.tick {
            ingest.on_tick(&mut source).await;
            last_tick = Instant::now();
        }
    }
    source.checkpoint(&ingest, true).await;
    Ok(())
}
