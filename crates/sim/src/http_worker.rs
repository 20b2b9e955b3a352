//! A simulated inference worker: an OpenAI-compatible server that preprocesses and hashes
//! requests exactly as the router does, keeps a KV block pool with LRU eviction, publishes
//! stored/removed events, takes time for prefill (uncached tokens only) and decode, and reports
//! `cached_tokens` from its real pool.

use crate::block_pool::{BlockPool, PoolChanges};
use crate::model::{InvalidModel, WorkerModel};
use bytes::Bytes;
use futures_util::stream;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited, StreamBody};
use hyper::body::{Frame, Incoming};
use kvroute_blockhash::{BlockHasher, HashedBlock};
use kvroute_events::{
    EngineEvent, EngineHash, EnginePublisher, EngineRemoved, EngineStored, ExtraKey, Publisher,
};
use kvroute_gateway::{error_response, json_response, serve_http, BoxError, GatewayBody};
use kvroute_mmhash::{block_media_info, forward_uuid, BlockExtraInfo};
use kvroute_preprocess::{ChatRequest, CompletionRequest, Preprocessor, Prompt};
use kvroute_protocol::{DpRank, ErrorBody, KvCacheStoredBlockData, SequenceHash, WorkerId};
use serde_json::json;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::net::TcpListener;
use tokio::sync::{OwnedMutexGuard, OwnedSemaphorePermit, Semaphore};

/// Most tokens one simulated answer has, whatever `max_tokens` asks.
pub const MAX_COMPLETION_TOKENS: u64 = 32_768;

/// Who a simulated worker is and how it behaves.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct SimConfig {
    /// The id its events carry.
    pub worker_id: WorkerId,
    /// The model name it reports.
    pub model: String,
    /// Tokens per KV block.
    pub block_size: u32,
    /// Its pool, speeds and concurrency.
    pub engine: WorkerModel,
    /// Tokens generated when the request sets no limit.
    pub default_max_tokens: u64,
}

impl SimConfig {
    /// A worker with [`WorkerModel::default`]'s speeds and concurrency, a 4096-block pool (a
    /// long-running server must bound its memory) and 16 tokens per answer.
    pub fn new(worker_id: WorkerId, model: impl Into<String>, block_size: u32) -> Self {
        Self {
            worker_id,
            model: model.into(),
            block_size,
            engine: WorkerModel::default().with_capacity_blocks(Some(4096)),
            default_max_tokens: 16,
        }
    }

    /// Sets its pool, speeds and concurrency.
    pub fn with_engine(mut self, engine: WorkerModel) -> Self {
        self.engine = engine;
        self
    }
}

/// A simulated worker that cannot be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// The block size cannot be hashed with.
    #[error(transparent)]
    BlockSize(#[from] kvroute_blockhash::HashError),
    /// The engine model cannot be simulated.
    #[error(transparent)]
    Model(#[from] InvalidModel),
}

/// A simulated worker. Cheap to clone.
#[derive(Clone)]
pub struct SimWorker {
    inner: Arc<SimInner>,
}

struct SimInner {
    config: SimConfig,
    preprocessor: Arc<Preprocessor>,
    hasher: BlockHasher,
    pool: Mutex<BlockPool>,
    /// One permit per request the engine runs at once.
    slots: Arc<Semaphore>,
    /// Held while a request prefills: prefills run one at a time.
    prefill: Arc<tokio::sync::Mutex<()>>,
    events: Events,
    killed: tokio::sync::watch::Sender<bool>,
    running: Arc<AtomicU64>,
}

/// Where a simulated worker's KV events go.
#[derive(Debug)]
#[non_exhaustive]
pub enum SimEvents {
    /// kvroute's own events (its JetStream stream, or the in-process bus).
    Kvroute(Publisher),
    /// vLLM's ZeroMQ wire: `BlockStored` with the blocks' tokens and images (as
    /// `[identifier, offset]`) under the engine's own block hashes, one `BlockRemoved` per
    /// evicted block, as a vLLM engine publishes them.
    Vllm(Box<EnginePublisher>),
}

impl From<Publisher> for SimEvents {
    fn from(publisher: Publisher) -> Self {
        Self::Kvroute(publisher)
    }
}

impl From<EnginePublisher> for SimEvents {
    fn from(publisher: EnginePublisher) -> Self {
        Self::Vllm(Box::new(publisher))
    }
}

enum Events {
    Kvroute(Publisher),
    Vllm(Box<tokio::sync::Mutex<EnginePublisher>>),
}

/// The simulated engine's own hash of a block: not the router's (as a real engine's is not),
/// but one for one with it.
fn engine_hash(key: SequenceHash) -> EngineHash {
    EngineHash(key.get().rotate_left(29) ^ 0x6a09_e667_f3bc_c908)
}

/// The events vLLM publishes for `changes`: removals first (vLLM evicts while allocating, before
/// the request's blocks are stored), then one `BlockStored` per run of new blocks.
fn vllm_events(
    changes: &PoolChanges,
    hashed: &[HashedBlock],
    prompt: &Prompt,
    block_size: usize,
) -> Vec<EngineEvent> {
    let removed = changes.removed.iter().map(|&key| {
        EngineEvent::Removed(EngineRemoved {
            block_hashes: vec![engine_hash(key)],
            medium: Some("GPU".into()),
            group_idx: Some(0),
        })
    });
    let stored = changes.stored.iter().map(|run| {
        let extra_keys = run
            .blocks
            .clone()
            .map(|i| {
                let start = i * block_size;
                let items: Vec<ExtraKey> = prompt
                    .media
                    .iter()
                    .filter(|span| span.touches(start..start + block_size))
                    .map(|span| {
                        let offset = span.start as i64 - start as i64;
                        ExtraKey::Media(forward_uuid(span.id), offset)
                    })
                    .collect();
                (!items.is_empty()).then_some(items)
            })
            .collect();
        EngineEvent::Stored(EngineStored {
            block_hashes: run
                .blocks
                .clone()
                .map(|i| engine_hash(hashed[i].sequence))
                .collect(),
            parent: run.parent.map(engine_hash),
            token_ids: prompt.tokens[run.blocks.start * block_size..run.blocks.end * block_size]
                .to_vec(),
            block_size: block_size as u32,
            medium: Some("GPU".into()),
            extra_keys: Some(extra_keys),
            group_idx: Some(0),
            kv_cache_spec_kind: Some("full_attention".into()),
            ..EngineStored::default()
        })
    });
    removed.chain(stored).collect()
}

/// Counts a request as running and holds its engine slot until dropped (with the response
/// body, for a stream: a client that goes away cancels it).
struct Running {
    counter: Arc<AtomicU64>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Running {
    fn start(counter: &Arc<AtomicU64>) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Self {
            counter: Arc::clone(counter),
            _slot: None,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.counter.fetch_sub(1, Ordering::Relaxed);
    }
}

impl SimWorker {
    /// A worker that publishes its KV events through `events` (a kvroute [`Publisher`] or a
    /// vLLM-wire [`EnginePublisher`]).
    pub fn new(
        config: SimConfig,
        preprocessor: Arc<Preprocessor>,
        events: impl Into<SimEvents>,
    ) -> Result<Self, SimError> {
        let events = match events.into() {
            SimEvents::Kvroute(publisher) => Events::Kvroute(publisher),
            SimEvents::Vllm(publisher) => {
                Events::Vllm(Box::new(tokio::sync::Mutex::new(*publisher)))
            }
        };
        config.engine.validate()?;
        let hasher = BlockHasher::new(config.block_size)?;
        let pool = Mutex::new(BlockPool::new(config.engine.capacity_blocks));
        let slots = config.engine.max_concurrency.min(Semaphore::MAX_PERMITS);
        Ok(Self {
            inner: Arc::new(SimInner {
                config,
                preprocessor,
                hasher,
                pool,
                slots: Arc::new(Semaphore::new(slots)),
                prefill: Arc::default(),
                events,
                killed: tokio::sync::watch::channel(false).0,
                running: Arc::default(),
            }),
        })
    }

    /// Simulates a crash: every open connection is dropped at once, mid-stream included, and
    /// no new request is answered (new connections are closed as soon as they are accepted).
    pub fn kill(&self) {
        self.inner.killed.send_replace(true);
    }

    /// Requests being answered now, streams still generating and requests waiting for a slot
    /// included.
    pub fn running_requests(&self) -> u64 {
        self.inner.running.load(Ordering::Relaxed)
    }

    /// Blocks currently in the pool.
    pub fn cached_blocks(&self) -> usize {
        self.inner
            .pool
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Serves on `listener` until `shutdown` completes, then drains in-flight requests.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        let kill = self.inner.killed.subscribe();
        serve_http(listener, shutdown, Some(kill), move |request| {
            let worker = self.clone();
            async move { worker.handle(request).await }
        })
        .await
    }

    /// Handles one request.
    pub async fn handle(&self, request: Request<Incoming>) -> Response<GatewayBody> {
        let path = request.uri().path().to_owned();
        match (request.method(), path.as_str()) {
            (&Method::POST, "/v1/chat/completions" | "/v1/completions") => {
                let chat = path == "/v1/chat/completions";
                match self.generate(request, chat).await {
                    Ok(response) => response,
                    Err(response) => response,
                }
            }
            (&Method::GET, "/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/v1/models") => json_response(
                StatusCode::OK,
                &json!({"object": "list", "data": [{"id": self.inner.config.model, "object": "model"}]}),
            ),
            _ => error_response(
                StatusCode::NOT_FOUND,
                &ErrorBody::invalid_request(format!("no route for {path}"), None, "not_found"),
            ),
        }
    }

    async fn generate(
        &self,
        request: Request<Incoming>,
        chat: bool,
    ) -> Result<Response<GatewayBody>, Response<GatewayBody>> {
        let mut running = Running::start(&self.inner.running);
        let bad = |error: kvroute_preprocess::PreprocessError| {
            error_response(StatusCode::BAD_REQUEST, &error.to_error_body())
        };
        let body = Limited::new(request.into_body(), 64 << 20)
            .collect()
            .await
            .map_err(|error| {
                error_response(
                    StatusCode::BAD_REQUEST,
                    &ErrorBody::invalid_request(error.to_string(), None, "bad_body"),
                )
            })?
            .to_bytes();
        let (prompt, stream, max_tokens, include_usage) = if chat {
            let request = ChatRequest::from_json(&body).map_err(bad)?;
            let include_usage = request
                .field("stream_options")
                .and_then(|o| o.get("include_usage"))
                .and_then(serde_json::Value::as_bool)
                .unwrap_or(false);
            let prompt = self.inner.preprocessor.chat(&request).await.map_err(bad)?;
            (prompt, request.stream, request.max_tokens, include_usage)
        } else {
            let request = CompletionRequest::from_json(&body).map_err(bad)?;
            let prompt = self.inner.preprocessor.completion(&request).map_err(bad)?;
            (prompt, request.stream, request.max_tokens, false)
        };
        // The semaphore is never closed; a closed one would only mean no limit.
        running._slot = Arc::clone(&self.inner.slots).acquire_owned().await.ok();
        let cached_blocks = self.admit(&prompt).await;
        let config = &self.inner.config;
        let cached_tokens = cached_blocks * config.block_size as usize;
        // An engine computes at least the last prompt token even when all of it is cached.
        let uncached = prompt.tokens.len().saturating_sub(cached_tokens).max(1);
        let prefill = seconds(uncached as f64 / config.engine.prefill_tokens_per_second);
        let per_token = seconds(1.0 / config.engine.decode_tokens_per_second);
        // Clamped like an engine clamps to its context: a client asking for 10^12 tokens must
        // not make the simulator allocate or stream forever.
        let completion_tokens = max_tokens
            .unwrap_or(config.default_max_tokens)
            .clamp(1, MAX_COMPLETION_TOKENS);
        let usage = json!({
            "prompt_tokens": prompt.tokens.len(),
            "completion_tokens": completion_tokens,
            "total_tokens": prompt.tokens.len() as u64 + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens},
        });
        let id = format!("cmpl-{}-{}", config.worker_id, now_ms());
        let model = config.model.clone();
        if stream {
            Ok(sse_response(Stream {
                id,
                model,
                chat,
                tokens: completion_tokens,
                prefill,
                prefill_lock: Arc::clone(&self.inner.prefill),
                per_token,
                usage: include_usage.then_some(usage),
                _running: running,
            }))
        } else {
            prefill_one_at_a_time(&self.inner.prefill, prefill).await;
            pause(per_token.saturating_mul(completion_tokens as u32)).await;
            let text = words(completion_tokens);
            let choice = if chat {
                json!({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "length"})
            } else {
                json!({"index": 0, "text": text, "finish_reason": "length"})
            };
            let object = if chat {
                "chat.completion"
            } else {
                "text_completion"
            };
            Ok(json_response(
                StatusCode::OK,
                &json!({"id": id, "object": object, "created": now_ms() / 1000, "model": model,
                        "choices": [choice], "usage": usage}),
            ))
        }
    }

    /// Puts the prompt's blocks in the pool, publishes what changed, returns the cached prefix.
    async fn admit(&self, prompt: &Prompt) -> usize {
        let hashed = self
            .inner
            .hasher
            .hash_sequence(&prompt.tokens, prompt.media.as_slice());
        let keys: Vec<SequenceHash> = hashed.iter().map(|block| block.sequence).collect();
        let (cached_blocks, changes) = {
            let mut pool = self.inner.pool.lock().unwrap_or_else(|e| e.into_inner());
            (pool.lookup(&keys), pool.store(&keys, &keys))
        };
        let infos = if changes.stored.is_empty() {
            Vec::new()
        } else {
            // Spans come from our own expansion, so they always fit; no info is the safe fallback.
            block_media_info(
                &prompt.media,
                self.inner.config.block_size as usize,
                prompt.tokens.len(),
            )
            .unwrap_or_default()
        };
        let worker = self.inner.config.worker_id;
        match &self.inner.events {
            Events::Kvroute(publisher) => {
                let events = changes.into_events(|i| engine_block(&hashed, &infos, i));
                if !events.is_empty() {
                    if let Err(error) = publisher.publish(DpRank(0), events).await {
                        tracing::warn!(%error, %worker, "could not publish KV events");
                    }
                }
            }
            Events::Vllm(publisher) => {
                let block_size = self.inner.config.block_size as usize;
                let events = vllm_events(&changes, &hashed, prompt, block_size);
                if !events.is_empty() {
                    if let Err(error) = publisher.lock().await.publish(events).await {
                        tracing::warn!(%error, %worker, "could not publish KV events");
                    }
                }
            }
        }
        cached_blocks
    }
}

/// Block `i` of a hashed prompt as an engine describes it in a stored event: both hashes and
/// its media (`infos`, one per block).
fn engine_block(
    hashed: &[HashedBlock],
    infos: &[Option<BlockExtraInfo>],
    i: usize,
) -> Option<KvCacheStoredBlockData> {
    let block = hashed.get(i)?;
    Some(KvCacheStoredBlockData {
        block_hash: block.sequence,
        tokens_hash: block.block,
        mm_extra_info: infos.get(i).cloned().flatten(),
    })
}

/// A streamed answer in progress.
struct Stream {
    id: String,
    model: String,
    chat: bool,
    tokens: u64,
    prefill: Duration,
    prefill_lock: Arc<tokio::sync::Mutex<()>>,
    per_token: Duration,
    usage: Option<serde_json::Value>,
    _running: Running,
}

fn sse_response(answer: Stream) -> Response<GatewayBody> {
    let chunks = stream::unfold((answer, 0u64), |(answer, sent)| async move {
        if sent > answer.tokens + 1 {
            return None;
        }
        let data = if sent == 0 {
            prefill_one_at_a_time(&answer.prefill_lock, answer.prefill).await;
            chunk(&answer, Some("role"), None)
        } else if sent <= answer.tokens {
            pause(answer.per_token).await;
            let last = sent == answer.tokens;
            chunk(&answer, Some("content"), last.then_some("length"))
        } else {
            let usage = answer.usage.as_ref().map(|usage| {
                json!({"id": answer.id, "object": "chat.completion.chunk", "model": answer.model,
                       "choices": [], "usage": usage})
            });
            let mut tail = String::new();
            if let Some(usage) = usage {
                tail.push_str(&format!("data: {usage}\n\n"));
            }
            tail.push_str("data: [DONE]\n\n");
            tail
        };
        Some((
            Ok::<_, BoxError>(Frame::data(Bytes::from(data))),
            (answer, sent + 1),
        ))
    });
    let mut response = Response::new(StreamBody::new(chunks).boxed_unsync());
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    response.headers_mut().insert(
        http::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    response
}

fn chunk(answer: &Stream, kind: Option<&str>, finish: Option<&str>) -> String {
    let body = if answer.chat {
        let delta = match kind {
            Some("role") => json!({"role": "assistant", "content": ""}),
            _ => json!({"content": "tok "}),
        };
        json!({"id": answer.id, "object": "chat.completion.chunk", "created": now_ms() / 1000,
               "model": answer.model, "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    } else {
        let text = if kind == Some("role") { "" } else { "tok " };
        json!({"id": answer.id, "object": "text_completion", "created": now_ms() / 1000,
               "model": answer.model, "choices": [{"index": 0, "text": text, "finish_reason": finish}]})
    };
    format!("data: {body}\n\n")
}

/// Waits `prefill` holding the worker's prefill lock, as an engine prefills one request at a
/// time. Zero returns at once, without the lock.
async fn prefill_one_at_a_time(lock: &Arc<tokio::sync::Mutex<()>>, prefill: Duration) {
    if !prefill.is_zero() {
        let _prefilling: OwnedMutexGuard<()> = Arc::clone(lock).lock_owned().await;
        pause(prefill).await;
    }
}

/// `seconds` as a duration; past what a `Duration` holds (a tiny speed), the longest one.
fn seconds(seconds: f64) -> Duration {
    Duration::try_from_secs_f64(seconds).unwrap_or(Duration::MAX)
}

/// Waits `duration`. Zero returns at once: Tokio rounds every timer up to its next millisecond
/// tick, so a worker configured to take no time would otherwise take up to 1 ms per step.
async fn pause(duration: Duration) {
    if !duration.is_zero() {
        tokio::time::sleep(duration).await;
    }
}

fn words(tokens: u64) -> String {
    "tok ".repeat(tokens as usize)
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvroute_protocol::{BlockHash, KvCacheEventData, KvCacheRemoveData};

    fn blocks(hashes: &[u64]) -> Vec<HashedBlock> {
        hashes
            .iter()
            .map(|&h| HashedBlock {
                block: BlockHash(h + 100),
                sequence: SequenceHash(h),
            })
            .collect()
    }

    fn stored(event: &KvCacheEventData) -> (Option<SequenceHash>, Vec<(u64, u64)>) {
        let KvCacheEventData::Stored(data) = event else {
            panic!("not a store: {event:?}");
        };
        let blocks = data
            .blocks
            .iter()
            .map(|b| (b.block_hash.get(), b.tokens_hash.get()))
            .collect();
        (data.parent_hash, blocks)
    }

    /// The events describe the pool's changes in the engine's terms: each new run of blocks
    /// under its parent with both hashes, then the evicted blocks.
    #[test]
    fn events_follow_the_pool() {
        let mut pool = BlockPool::new(Some(4));
        let first = blocks(&[1, 2, 3]);
        let keys: Vec<SequenceHash> = first.iter().map(|b| b.sequence).collect();
        let events = pool
            .store(&keys, &keys)
            .into_events(|i| engine_block(&first, &[], i));
        assert_eq!(events.len(), 1);
        assert_eq!(
            stored(&events[0]),
            (None, vec![(1, 101), (2, 102), (3, 103)])
        );

        // 1 and 2 are held, 9 is new; 4 blocks fit, so nothing leaves yet.
        let second = blocks(&[1, 2, 9]);
        let keys: Vec<SequenceHash> = second.iter().map(|b| b.sequence).collect();
        assert_eq!(pool.lookup(&keys), 2);
        let events = pool
            .store(&keys, &keys)
            .into_events(|i| engine_block(&second, &[], i));
        assert_eq!(events.len(), 1);
        assert_eq!(stored(&events[0]), (Some(SequenceHash(2)), vec![(9, 109)]));

        // A fifth block evicts the least recently used one: 3, the other continuation.
        let third = blocks(&[5]);
        let keys: Vec<SequenceHash> = third.iter().map(|b| b.sequence).collect();
        let events = pool
            .store(&keys, &keys)
            .into_events(|i| engine_block(&third, &[], i));
        assert_eq!(stored(&events[0]), (None, vec![(5, 105)]));
        assert_eq!(
            events[1],
            KvCacheEventData::Removed(KvCacheRemoveData {
                block_hashes: vec![SequenceHash(3)],
            })
        );
    }
}
