//! Publishing batches to JetStream: coalescing, bounded in-flight acks, dedup ids, retries.

use super::{backoff, ensure_stream, NatsError, StreamSettings};
use crate::publisher::{Publisher, PublisherConfig, Transport};
use crate::wire::MessageBuilder;
use crate::{EventBatch, PublishError, ResyncRequest};
use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage};
use bytes::Bytes;
use futures_util::StreamExt;
use std::collections::VecDeque;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How a NATS publisher batches and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct NatsPublishConfig {
    /// Batches queued for the sending task before [`Publisher::publish`] waits.
    pub queue: usize,
    /// Queued batches are merged into messages of at most this many bytes (a single event
    /// larger than this goes alone). Keep it under the server's `max_payload` (1 MiB by
    /// default) and under consumers' `NatsSourceConfig::max_message_bytes`.
    pub max_message_bytes: usize,
    /// Messages sent and not yet acknowledged before the sender waits for the oldest ack.
    pub max_in_flight: usize,
    /// How long to wait for one acknowledgement before sending again (same message id, so
    /// the server drops the copy if the first one arrived).
    pub ack_timeout: Duration,
    /// First retry delay; doubles up to [`NatsPublishConfig::max_backoff`].
    pub min_backoff: Duration,
    /// Longest retry delay.
    pub max_backoff: Duration,
}

impl Default for NatsPublishConfig {
    fn default() -> Self {
        Self {
            queue: 256,
            max_message_bytes: 256 << 10,
            max_in_flight: 64,
            ack_timeout: Duration::from_secs(5),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
        }
    }
}

impl NatsPublishConfig {
    /// This configuration with acknowledgements awaited for `timeout`.
    pub fn with_ack_timeout(mut self, timeout: Duration) -> Self {
        self.ack_timeout = timeout;
        self
    }
}

/// Makes [`Publisher`]s that publish to JetStream.
#[derive(Debug)]
#[non_exhaustive]
pub struct NatsPublisher;

impl NatsPublisher {
    /// A publisher for `config.worker_id` on `client`: makes sure the stream exists, listens
    /// for full-state requests on the worker's control subjects, and starts the sending task.
    ///
    /// Messages carry a `Nats-Msg-Id` of `{worker}.{incarnation}.{n}` (n counts messages of
    /// this publisher), so a resend after a lost acknowledgement is dropped by the server
    /// within the stream's duplicate window.
    pub async fn connect(
        client: async_nats::Client,
        settings: StreamSettings,
        transport: NatsPublishConfig,
        config: PublisherConfig,
    ) -> Result<Publisher, NatsError> {
        let js = jetstream::ContextBuilder::new()
            .ack_timeout(transport.ack_timeout)
            .timeout(transport.ack_timeout)
            .build(client.clone());
        ensure_stream(&js, &settings).await?;
        let (resyncs, resync_rx) = mpsc::unbounded_channel();
        for subject in [
            settings.control_subject(Some(config.worker_id)),
            settings.control_subject(None),
        ] {
            let subscriber =
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| NatsError::Subscribe {
                        subject,
                        source: e.into(),
                    })?;
            tokio::spawn(forward_requests(subscriber, resyncs.clone()));
        }
        let (commands, command_rx) = mpsc::channel(transport.queue.max(1));
        let sender = Sender {
            js,
            subject: settings.event_subject(config.worker_id),
            id_prefix: format!("{}.{}", config.worker_id, config.incarnation),
            messages: MessageBuilder::new(
                config.worker_id,
                config.incarnation,
                transport.max_message_bytes,
            ),
            next_message: 0,
            in_flight: VecDeque::new(),
            config: transport,
        };
        tokio::spawn(sender.run(command_rx));
        Ok(Publisher::start(
            config,
            Transport::Nats(NatsSender { commands }),
            resync_rx,
        ))
    }
}

/// Passes full-state requests from a control subject to the publisher.
async fn forward_requests(
    mut subscriber: async_nats::Subscriber,
    requests: mpsc::UnboundedSender<ResyncRequest>,
) {
    while let Some(message) = subscriber.next().await {
        match serde_json::from_slice::<ResyncRequest>(&message.payload) {
            Ok(request) => {
                if requests.send(request).is_err() {
                    return;
                }
            }
            Err(error) => tracing::warn!(%error, "ignoring a malformed full-state request"),
        }
    }
}

enum Command {
    Batch(EventBatch),
    Flush(oneshot::Sender<()>),
}

/// A publisher's handle on its sending task.
#[derive(Debug)]
pub(crate) struct NatsSender {
    commands: mpsc::Sender<Command>,
}

impl NatsSender {
    pub(crate) async fn send(&self, batch: EventBatch) -> Result<(), PublishError> {
        self.commands
            .send(Command::Batch(batch))
            .await
            .map_err(|_| PublishError::Closed)
    }

    pub(crate) async fn flush(&self) -> Result<(), PublishError> {
        let (done, wait) = oneshot::channel();
        self.commands
            .send(Command::Flush(done))
            .await
            .map_err(|_| PublishError::Closed)?;
        wait.await.map_err(|_| PublishError::Closed)
    }
}

struct InFlight {
    id: String,
    payload: Bytes,
    ack: Option<PublishAckFuture>,
}

struct Sender {
    js: jetstream::Context,
    subject: String,
    id_prefix: String,
    messages: MessageBuilder,
    next_message: u64,
    in_flight: VecDeque<InFlight>,
    config: NatsPublishConfig,
}

impl Sender {
    async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        while let Some(command) = commands.recv().await {
            let mut next = Some(command);
            // Take what is already queued into the same messages, then send the last one.
            while let Some(command) = next.take() {
                match command {
                    Command::Batch(batch) => self.append(batch).await,
                    Command::Flush(done) => {
                        self.finish().await;
                        self.settle_all().await;
                        // The caller may have stopped waiting.
                        let _ = done.send(());
                    }
                }
                next = commands.try_recv().ok();
            }
            self.finish().await;
        }
        self.settle_all().await;
    }

    /// Adds a batch's events to the message being built, sending it whenever the next event
    /// would take it over the size limit.
    async fn append(&mut self, batch: EventBatch) {
        for event in &batch.events {
            if let Some(full) = self.messages.push(event) {
                self.send(full).await;
            }
        }
    }

    /// Sends the message being built, if any.
    async fn finish(&mut self) {
        if let Some(payload) = self.messages.take() {
            self.send(payload).await;
        }
    }

    async fn send(&mut self, payload: Vec<u8>) {
        while self.in_flight.len() >= self.config.max_in_flight.max(1) {
            self.settle_oldest().await;
        }
        let id = format!("{}.{}", self.id_prefix, self.next_message);
        self.next_message += 1;
        let mut message = InFlight {
            id,
            payload: Bytes::from(payload),
            ack: None,
        };
        self.transmit(&mut message).await;
        self.in_flight.push_back(message);
    }

    /// Sends one message until the client takes it.
    async fn transmit(&self, message: &mut InFlight) {
        let mut delay = self.config.min_backoff;
        loop {
            let publish = PublishMessage::build()
                .payload(message.payload.clone())
                .message_id(&message.id);
            match self.js.send_publish(self.subject.clone(), publish).await {
                Ok(ack) => {
                    message.ack = Some(ack);
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, id = %message.id, "publish failed; retrying");
                    delay = backoff(delay, self.config.max_backoff).await;
                }
            }
        }
    }

    /// Waits for the oldest message's acknowledgement. Without one, every message in flight
    /// is sent again, in order, with its id: copies that did arrive are dropped by the server.
    async fn settle_oldest(&mut self) {
        let mut delay = self.config.min_backoff;
        loop {
            let Some(oldest) = self.in_flight.front_mut() else {
                return;
            };
            let result = match oldest.ack.take() {
                Some(ack) => ack.await.map_err(async_nats::Error::from),
                None => Err("never sent".into()),
            };
            match result {
                Ok(_) => {
                    self.in_flight.pop_front();
                    return;
                }
                Err(error) => {
                    tracing::warn!(%error, id = %oldest.id, "no acknowledgement; sending again");
                    delay = backoff(delay, self.config.max_backoff).await;
                    let mut messages = std::mem::take(&mut self.in_flight);
                    for message in &mut messages {
                        self.transmit(message).await;
                    }
                    self.in_flight = messages;
                }
            }
        }
    }

    async fn settle_all(&mut self) {
        while !self.in_flight.is_empty() {
            self.settle_oldest().await;
        }
    }
}
