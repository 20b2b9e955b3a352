//! The ingestion task: takes batches from a source, checks their order, applies them to the
//! index, asks workers for full state after gaps, and (NATS) keeps snapshots.

use crate::bus::InProcessSource;
use crate::dynamo::DynamoSource;
use crate::nats::NatsSource;
use crate::sequencer::Sequencer;
use crate::stats::{Counter, Counters, IngestStats};
use crate::{IngestError, ResyncRequest};
use kvroute_index::SharedIndex;
use kvroute_protocol::{RouterEvent, WorkerId};
use std::collections::HashSet;
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

/// Where an [`Ingestor`] reads events from.
#[derive(Debug)]
#[non_exhaustive]
pub enum EventSource {
    /// An in-process bus ([`in_process_bus`](crate::in_process_bus)).
    InProcess(InProcessSource),
    /// The JetStream stream ([`NatsSource`]).
    Nats(Box<NatsSource>),
    /// Dynamo 1.6 workers' own event plane on NATS core ([`DynamoSource`]).
    Dynamo(Box<DynamoSource>),
}

impl From<DynamoSource> for EventSource {
    fn from(source: DynamoSource) -> Self {
        Self::Dynamo(Box::new(source))
    }
}

impl From<NatsSource> for EventSource {
    fn from(source: NatsSource) -> Self {
        Self::Nats(Box::new(source))
    }
}

impl From<InProcessSource> for EventSource {
    fn from(source: InProcessSource) -> Self {
        Self::InProcess(source)
    }
}

/// Why a message was skipped; each kind is logged once per ingestor, then only counted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum MalformedKind {
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
}

/// One thing a source produced.
pub(crate) enum Item {
    /// Events of one worker, in order; `incarnation` is `None` for sources without one.
    Batch {
        worker_id: WorkerId,
        incarnation: Option<u64>,
        events: Vec<RouterEvent>,
    },
    /// A message that was skipped.
    Malformed(MalformedKind, String),
    /// Everything the source held at start has been delivered.
    CaughtUp,
    /// Nothing arrived for a while (time to look at timers).
    Idle,
    /// The source is closed for good.
    Ended,
}

impl EventSource {
    async fn start(&mut self, ingest: &mut Ingest) {
        match self {
            Self::InProcess(_) | Self::Dynamo(_) => {}
            Self::Nats(source) => source.start(ingest).await,
        }
    }

    async fn checkpoint(&mut self, ingest: &Ingest, now_anyway: bool) {
        match self {
            Self::InProcess(_) | Self::Dynamo(_) => {}
            Self::Nats(source) => source.checkpoint(ingest, now_anyway).await,
        }
    }

    async fn next(&mut self, ingest: &Ingest) -> Item {
        match self {
            Self::Nats(source) => source.next(ingest).await,
            Self::Dynamo(source) => source.next().await,
            Self::InProcess(source) => match source.events.try_recv() {
                Ok(batch) => batch.into_item(),
                Err(TryRecvError::Empty) if !source.drained => {
                    source.drained = true;
                    Item::CaughtUp
                }
                Err(TryRecvError::Empty) => {
                    match tokio::time::timeout(ingest.config.tick, source.events.recv()).await {
                        Ok(Some(batch)) => batch.into_item(),
                        Ok(None) => Item::Ended,
                        Err(_) => Item::Idle,
                    }
                }
                Err(TryRecvError::Disconnected) => Item::Ended,
            },
        }
    }

    async fn request(&mut self, request: &ResyncRequest) {
        match self {
            Self::InProcess(source) => source.request(request),
            Self::Nats(source) => source.request(request).await,
            // Dynamo workers take no requests; their batches never cause one.
            Self::Dynamo(_) => {}
        }
    }
}

/// State the ingestion loop owns.
pub(crate) struct Ingest {
    pub(crate) index: SharedIndex,
    pub(crate) sequencer: Sequencer,
    pub(crate) counters: Arc<Counters>,
    logged: HashSet<MalformedKind>,
    config: IngestConfig,
}

impl Ingest {
    async fn handle(
        &mut self,
        source: &mut EventSource,
        item: Item,
        ready: &watch::Sender<bool>,
    ) -> bool {
        match item {
            Item::Batch {
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
            Item::Malformed(kind, detail) => self.malformed(kind, &detail),
            Item::CaughtUp => {
                ready.send_replace(true);
            }
            Item::Idle => {}
            Item::Ended => return false,
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

    async fn tick(&mut self, source: &mut EventSource) {
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
    pub fn spawn(source: impl Into<EventSource>, index: SharedIndex, config: IngestConfig) -> Self {
        let counters = Arc::new(Counters::default());
        let (ready_tx, ready) = watch::channel(false);
        let (stop, stop_rx) = oneshot::channel();
        let (commands, commands_rx) = mpsc::unbounded_channel();
        let ingest = Ingest {
            index,
            sequencer: Sequencer::default(),
            counters: Arc::clone(&counters),
            logged: HashSet::new(),
            config,
        };
        let task = tokio::spawn(run(source.into(), ingest, ready_tx, stop_rx, commands_rx));
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

async fn run(
    mut source: EventSource,
    mut ingest: Ingest,
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
            ingest.tick(&mut source).await;
            last_tick = Instant::now();
        }
    }
    source.checkpoint(&ingest, true).await;
    Ok(())
}
