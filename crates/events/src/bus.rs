//! The in-process bus: publishers and one ingestor in the same process, over Tokio channels.

use crate::publisher::{Publisher, PublisherConfig, Transport};
use crate::{EventBatch, PublishError, ResyncRequest};
use kvroute_protocol::WorkerId;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::mpsc;

type ControlRegistry = Arc<Mutex<HashMap<WorkerId, mpsc::UnboundedSender<ResyncRequest>>>>;

/// The publishing end of an in-process bus (see [`in_process_bus`]). Cheap to clone.
#[derive(Clone, Debug)]
pub struct InProcessBus {
    events: BusSender,
    control: ControlRegistry,
}

/// The consuming end of an in-process bus: hand it to [`Ingestor::spawn`](crate::Ingestor::spawn).
#[derive(Debug)]
pub struct InProcessSource {
    pub(crate) events: mpsc::Receiver<EventBatch>,
    /// Whether the bus was found empty once (the ingestor is caught up).
    pub(crate) drained: bool,
    control: ControlRegistry,
}

/// A bus carrying at most `capacity` batches not yet ingested (publishers wait beyond that),
/// with the same semantics as the NATS transport: ids, incarnations, gap healing.
pub fn in_process_bus(capacity: usize) -> (InProcessBus, InProcessSource) {
    let (events, receiver) = mpsc::channel(capacity.max(1));
    let control = ControlRegistry::default();
    let bus = InProcessBus {
        events: BusSender { events },
        control: Arc::clone(&control),
    };
    (
        bus,
        InProcessSource {
            events: receiver,
            drained: false,
            control,
        },
    )
}

impl InProcessBus {
    /// A publisher for `config.worker_id` on this bus. A second publisher for the same worker
    /// (a restarted worker) takes over its full-state requests. Must be called inside a Tokio
    /// runtime.
    pub fn publisher(&self, config: PublisherConfig) -> Publisher {
        let (requests, receiver) = mpsc::unbounded_channel();
        self.control.lock().insert(config.worker_id, requests);
        Publisher::start(config, Transport::InProcess(self.events.clone()), receiver)
    }

    /// Puts a batch on the bus as it is, without numbering: for relays that carry events
    /// numbered elsewhere, and for tests that inject gaps or stale incarnations.
    pub async fn send_batch(&self, batch: EventBatch) -> Result<(), PublishError> {
        self.events.send(batch).await
    }
}

impl InProcessSource {
    /// Delivers a full-state request to the worker's publisher, if one is on the bus.
    pub(crate) fn request(&self, request: &ResyncRequest) {
        let control = self.control.lock();
        let targets = control
            .iter()
            .filter(|(worker, _)| request.worker_id.is_none_or(|w| w == **worker));
        for (_, sender) in targets {
            // A publisher that is gone needs no resend.
            let _ = sender.send(request.clone());
        }
    }
}

/// A publisher's handle on the bus.
#[derive(Clone, Debug)]
pub(crate) struct BusSender {
    events: mpsc::Sender<EventBatch>,
}

impl BusSender {
    pub(crate) async fn send(&self, batch: EventBatch) -> Result<(), PublishError> {
        self.events
            .send(batch)
            .await
            .map_err(|_| PublishError::Closed)
    }
}
