//! The publishing side: event ids, the mirror for full-state resends, and the transport.

use crate::bus::BusSender;
use crate::mirror::Mirror;
use crate::{EventBatch, PublishError, ResyncRequest};
use kvroute_protocol::{DpRank, KvCacheEvent, KvCacheEventData, RouterEvent, WorkerId};
use std::collections::BTreeMap;
use std::sync::{Arc, Weak};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, Mutex};

/// Who publishes: the worker and the incarnation of its process.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PublisherConfig {
    /// The worker whose cache the events describe.
    pub worker_id: WorkerId,
    /// This process start of the worker. Must grow from one start to the next: consumers drop
    /// the entries of an older incarnation at the first event of a newer one and ignore late
    /// events of older ones. [`PublisherConfig::new`] takes the wall clock in nanoseconds.
    pub incarnation: u64,
}

impl PublisherConfig {
    /// Publishing for `worker_id`, with the current wall-clock time (ns since the Unix epoch)
    /// as incarnation.
    pub fn new(worker_id: WorkerId) -> Self {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        Self {
            worker_id,
            incarnation: now,
        }
    }

    /// This configuration with an explicit incarnation.
    pub fn with_incarnation(mut self, incarnation: u64) -> Self {
        self.incarnation = incarnation;
        self
    }
}

/// Where a publisher's batches go.
#[derive(Debug)]
pub(crate) enum Transport {
    InProcess(BusSender),
    Nats(crate::nats::NatsSender),
}

impl Transport {
    async fn send(&self, batch: EventBatch) -> Result<(), PublishError> {
        match self {
            Self::InProcess(sender) => sender.send(batch).await,
            Self::Nats(sender) => sender.send(batch).await,
        }
    }

    async fn flush(&self) -> Result<(), PublishError> {
        match self {
            Self::InProcess(_) => Ok(()),
            Self::Nats(sender) => sender.flush().await,
        }
    }
}

#[derive(Debug, Default)]
struct RankState {
    next_id: u64,
    mirror: Mirror,
}

#[derive(Debug)]
struct Inner {
    config: PublisherConfig,
    ranks: Mutex<BTreeMap<DpRank, RankState>>,
    transport: Transport,
}

/// Publishes one worker's KV events: numbers them contiguously per dp rank (from 0 in each
/// incarnation), keeps a copy of the cache state they describe, and resends that state in
/// full (a `cleared` followed by stores) whenever a consumer asks, which it does after a gap.
///
/// Cheap to clone; clones share numbering and state. Made by
/// [`InProcessBus::publisher`](crate::InProcessBus::publisher) or
/// [`NatsPublisher::connect`](crate::NatsPublisher::connect).
#[derive(Clone, Debug)]
pub struct Publisher {
    inner: Arc<Inner>,
}

impl Publisher {
    /// A publisher over `transport` that answers the requests arriving on `resyncs`. Must be
    /// called inside a Tokio runtime (it spawns the task answering requests).
    pub(crate) fn start(
        config: PublisherConfig,
        transport: Transport,
        resyncs: mpsc::UnboundedReceiver<ResyncRequest>,
    ) -> Self {
        let inner = Arc::new(Inner {
            config,
            ranks: Mutex::new(BTreeMap::new()),
            transport,
        });
        tokio::spawn(answer_resyncs(Arc::downgrade(&inner), resyncs));
        Self { inner }
    }

    /// The worker this publisher speaks for.
    pub fn worker_id(&self) -> WorkerId {
        self.inner.config.worker_id
    }

    /// The incarnation stamped on every batch.
    pub fn incarnation(&self) -> u64 {
        self.inner.config.incarnation
    }

    /// Publishes `events` of `dp_rank`'s cache, in order, as one batch with the next ids.
    ///
    /// Returns once the transport took the batch (NATS: once it is queued; bounded, so a slow
    /// server slows publishers down). [`Publisher::flush`] waits for acknowledgements.
    pub async fn publish(
        &self,
        dp_rank: DpRank,
        events: impl IntoIterator<Item = KvCacheEventData>,
    ) -> Result<(), PublishError> {
        let mut ranks = self.inner.ranks.lock().await;
        let rank = ranks.entry(dp_rank).or_default();
        let events: Vec<RouterEvent> = events
            .into_iter()
            .map(|data| {
                rank.mirror.apply(&data);
                self.stamp(dp_rank, &mut rank.next_id, data)
            })
            .collect();
        self.send(events).await
    }

    /// Resends the full state of `dp_rank` (every rank when `None`): a `cleared` event, then
    /// the blocks held, as stores with the next ids. Consumers that were in order rebuild the
    /// same state; consumers waiting after a gap are back in order.
    pub async fn resend_full_state(&self, dp_rank: Option<DpRank>) -> Result<(), PublishError> {
        let mut ranks = self.inner.ranks.lock().await;
        for (&rank_id, rank) in ranks.iter_mut() {
            if dp_rank.is_some_and(|wanted| wanted != rank_id) {
                continue;
            }
            let state = rank.mirror.full_state();
            tracing::info!(
                worker_id = %self.inner.config.worker_id,
                dp_rank = %rank_id,
                blocks = rank.mirror.len(),
                "resending full state"
            );
            let events = std::iter::once(KvCacheEventData::Cleared)
                .chain(state.into_iter().map(KvCacheEventData::Stored))
                .map(|data| self.stamp(rank_id, &mut rank.next_id, data))
                .collect();
            self.send(events).await?;
        }
        Ok(())
    }

    /// Waits until every batch published so far is acknowledged by the transport.
    pub async fn flush(&self) -> Result<(), PublishError> {
        self.inner.transport.flush().await
    }

    fn stamp(&self, dp_rank: DpRank, next_id: &mut u64, data: KvCacheEventData) -> RouterEvent {
        let event_id = *next_id;
        *next_id += 1;
        RouterEvent::new(
            self.inner.config.worker_id,
            KvCacheEvent {
                event_id,
                data,
                dp_rank,
            },
        )
    }

    async fn send(&self, events: Vec<RouterEvent>) -> Result<(), PublishError> {
        if events.is_empty() {
            return Ok(());
        }
        let batch = EventBatch {
            worker_id: self.inner.config.worker_id,
            incarnation: self.inner.config.incarnation,
            events,
        };
        self.inner.transport.send(batch).await
    }
}

/// Answers full-state requests until the publisher is dropped or the requests end. Requests
/// that queued up meanwhile are answered by one resend.
async fn answer_resyncs(inner: Weak<Inner>, mut requests: mpsc::UnboundedReceiver<ResyncRequest>) {
    while let Some(first) = requests.recv().await {
        let mut ranks = first.dp_rank.map(|r| vec![r]);
        while let Ok(more) = requests.try_recv() {
            match (&mut ranks, more.dp_rank) {
                (Some(list), Some(rank)) if !list.contains(&rank) => list.push(rank),
                (_, None) => ranks = None,
                _ => {}
            }
        }
        let Some(inner) = inner.upgrade() else {
            return;
        };
        let publisher = Publisher { inner };
        let result = match ranks {
            None => publisher.resend_full_state(None).await,
            Some(list) => {
                let mut result = Ok(());
                for rank in list {
                    result = result.and(publisher.resend_full_state(Some(rank)).await);
                }
                result
            }
        };
        if let Err(error) = result {
            tracing::warn!(%error, "full-state resend failed; the consumer will ask again");
        }
    }
}
