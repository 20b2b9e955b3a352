//! vLLM's KV event publisher, frame for frame: a PUB socket sending `[topic, seq, payload]`
//! and a ROUTER socket replaying buffered batches, for simulated workers and tests.

use super::wire::{encode_engine_batch, EngineBatch, EngineEvent, REPLAY_END};
use bytes::Bytes;
use parking_lot::Mutex;
use std::collections::VecDeque;
use std::sync::Arc;
use tokio::task::JoinHandle;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

/// Where an [`EnginePublisher`] binds and how much it keeps for replay.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EnginePublisherConfig {
    /// The PUB endpoint (`tcp://*:5557`; port 0 picks a free port).
    pub endpoint: String,
    /// The ROUTER endpoint answering replay requests; `None`: no replay.
    pub replay_endpoint: Option<String>,
    /// The topic frame (vLLM's default: empty).
    pub topic: String,
    /// Batches kept for replay (vLLM's `buffer_steps`, default 10,000).
    pub buffer_steps: usize,
    /// The data-parallel rank written into every batch.
    pub dp_rank: u32,
    /// Sequence numbers numbered and buffered for replay but never sent live, as if the
    /// network dropped them: for tests of gap healing.
    pub lost_batches: Vec<u64>,
}

impl EnginePublisherConfig {
    /// Publishing on `endpoint`, without replay, empty topic, rank 0, 10,000 batches kept.
    pub fn new(endpoint: impl Into<String>) -> Self {
        Self {
            endpoint: endpoint.into(),
            replay_endpoint: None,
            topic: String::new(),
            buffer_steps: 10_000,
            dp_rank: 0,
            lost_batches: Vec::new(),
        }
    }

    /// This configuration answering replay requests on `endpoint`.
    pub fn with_replay(mut self, endpoint: impl Into<String>) -> Self {
        self.replay_endpoint = Some(endpoint.into());
        self
    }

    /// This configuration dropping the live messages of `seqs` (see
    /// [`EnginePublisherConfig::lost_batches`]).
    pub fn with_lost_batches(mut self, seqs: Vec<u64>) -> Self {
        self.lost_batches = seqs;
        self
    }

    /// This configuration publishing for data-parallel rank `dp_rank`.
    pub fn with_dp_rank(mut self, dp_rank: u32) -> Self {
        self.dp_rank = dp_rank;
        self
    }
}

/// Errors binding or publishing.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EnginePublishError {
    /// A ZeroMQ socket failed.
    #[error("ZeroMQ: {0}")]
    Zmq(String),
}

type Buffer = Arc<Mutex<VecDeque<(u64, Bytes)>>>;

/// Publishes KV events exactly as a vLLM engine does (see docs/engines.md).
///
/// ```no_run
/// use kvroute_events::{EngineEvent, EnginePublisher, EnginePublisherConfig};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let config = EnginePublisherConfig::new("tcp://127.0.0.1:0").with_replay("tcp://127.0.0.1:0");
/// let mut publisher = EnginePublisher::bind(config).await?;
/// println!("events on {}", publisher.endpoint());
/// publisher.publish(vec![EngineEvent::Cleared]).await?;
/// # Ok(())
/// # }
/// ```
pub struct EnginePublisher {
    socket: PubSocket,
    topic: Bytes,
    dp_rank: u32,
    next_seq: u64,
    buffer: Buffer,
    buffer_steps: usize,
    endpoint: String,
    replay_endpoint: Option<String>,
    replay_task: Option<JoinHandle<()>>,
    lost_batches: Vec<u64>,
}

impl std::fmt::Debug for EnginePublisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EnginePublisher")
            .field("endpoint", &self.endpoint)
            .field("replay_endpoint", &self.replay_endpoint)
            .field("next_seq", &self.next_seq)
            .finish_non_exhaustive()
    }
}

/// zmq.rs takes no `*` host; vLLM's endpoints use it for "every interface".
fn bindable(endpoint: &str) -> String {
    endpoint.replacen("://*:", "://0.0.0.0:", 1)
}

fn zmq_error(error: impl std::fmt::Display) -> EnginePublishError {
    EnginePublishError::Zmq(error.to_string())
}

impl EnginePublisher {
    /// Binds the PUB socket (and the replay socket, if configured). Must be called inside a
    /// Tokio runtime: the replay socket is served by a task of its own.
    pub async fn bind(config: EnginePublisherConfig) -> Result<Self, EnginePublishError> {
        let mut socket = PubSocket::new();
        let endpoint = socket
            .bind(&bindable(&config.endpoint))
            .await
            .map_err(zmq_error)?
            .to_string();
        let buffer: Buffer = Arc::default();
        let topic = Bytes::from(config.topic.into_bytes());
        let (replay_endpoint, replay_task) = match &config.replay_endpoint {
            None => (None, None),
            Some(replay) => {
                let mut router = RouterSocket::new();
                let bound = router
                    .bind(&bindable(replay))
                    .await
                    .map_err(zmq_error)?
                    .to_string();
                let task = tokio::spawn(serve_replay(router, Arc::clone(&buffer), topic.clone()));
                (Some(bound), Some(task))
            }
        };
        Ok(Self {
            socket,
            topic,
            dp_rank: config.dp_rank,
            next_seq: 0,
            buffer,
            buffer_steps: config.buffer_steps.max(1),
            endpoint,
            replay_endpoint,
            replay_task,
            lost_batches: config.lost_batches,
        })
    }

    /// The PUB endpoint as bound (with the port chosen for port 0).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The replay endpoint as bound.
    pub fn replay_endpoint(&self) -> Option<&str> {
        self.replay_endpoint.as_deref()
    }

    /// The sequence number the next batch gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Publishes `events` as one batch stamped now; returns its sequence number.
    pub async fn publish(&mut self, events: Vec<EngineEvent>) -> Result<u64, EnginePublishError> {
        let batch = self.batch(events);
        self.publish_batch(&batch).await
    }

    /// Publishes a batch as given (its own timestamp and rank).
    pub async fn publish_batch(&mut self, batch: &EngineBatch) -> Result<u64, EnginePublishError> {
        let (seq, payload) = self.number(batch);
        if self.lost_batches.contains(&seq) {
            return Ok(seq);
        }
        let message = ZmqMessage::try_from(vec![
            self.topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ])
        .map_err(zmq_error)?;
        self.socket.send(message).await.map_err(zmq_error)?;
        Ok(seq)
    }

    /// Numbers and buffers a batch without sending it live: what a subscriber sees when the
    /// network drops a PUB message (it can only get the batch back through replay). For
    /// tests of gap healing.
    pub fn publish_lost(&mut self, events: Vec<EngineEvent>) -> u64 {
        let batch = self.batch(events);
        self.number(&batch).0
    }

    fn batch(&self, events: Vec<EngineEvent>) -> EngineBatch {
        let ts = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        EngineBatch {
            ts,
            events,
            dp_rank: Some(self.dp_rank),
        }
    }

    fn number(&mut self, batch: &EngineBatch) -> (u64, Bytes) {
        let seq = self.next_seq;
        self.next_seq += 1;
        let payload = Bytes::from(encode_engine_batch(batch));
        let mut buffer = self.buffer.lock();
        if buffer.len() == self.buffer_steps {
            buffer.pop_front();
        }
        buffer.push_back((seq, payload.clone()));
        (seq, payload)
    }
}

impl Drop for EnginePublisher {
    fn drop(&mut self) {
        if let Some(task) = &self.replay_task {
            task.abort();
        }
    }
}

/// Answers `[identity, "", start seq]` with `[identity, "", topic, seq, payload]` for every
/// buffered batch from `start`, then `[identity, "", "", -1, ""]`, as vLLM does.
async fn serve_replay(mut router: RouterSocket, buffer: Buffer, topic: Bytes) {
    loop {
        let Ok(request) = router.recv().await else {
            // No peer yet, or one that left mid-message: nothing to answer.
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            continue;
        };
        let frames = request.into_vec();
        let [identity, _, start] = frames.as_slice() else {
            continue;
        };
        let Ok(start) = super::wire::seq_of(start) else {
            continue;
        };
        let batches: Vec<(u64, Bytes)> = buffer
            .lock()
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect();
        let end = (REPLAY_END, Bytes::new());
        for (seq, payload) in batches.into_iter().chain([end]) {
            let topic = if seq == REPLAY_END {
                Bytes::new()
            } else {
                topic.clone()
            };
            let reply = ZmqMessage::try_from(vec![
                identity.clone(),
                Bytes::new(),
                topic,
                Bytes::copy_from_slice(&seq.to_be_bytes()),
                payload,
            ]);
            // A requester that went away takes no more replies.
            if let Ok(reply) = reply {
                if router.send(reply).await.is_err() {
                    break;
                }
            }
        }
    }
}
