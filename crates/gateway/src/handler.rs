//! The HTTP server: OpenAI endpoints, routing, health, metrics.

use crate::accept::serve_http;
use crate::auth::{ApiKeys, Caller, Refusal};
use crate::body::{error_response, full, json_response, GatewayBody, Passthrough};
use crate::config::{ApiKeyConfig, LimitsConfig};
use crate::cpu::{CpuError, CpuPool};
use crate::forward_body::with_image_uuids;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use kvroute_blockhash::BlockHasher;
use kvroute_dispatch::{
    Candidate, CandidateInput, CostConfig, Decision, Eligible, ForwardBody, ForwardConfig,
    ForwardError, Forwarded, Forwarder, KvAware, Registry, SharedPolicy,
};
use kvroute_index::{SharedIndex, WorkerKey};
use kvroute_preprocess::{ChatRequest, CompletionRequest, PreprocessError, Preprocessor, Prompt};
use kvroute_protocol::{DpRank, ErrorBody, SequenceHash, WorkerId};
use metrics::{counter, histogram};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Renders the Prometheus text exposition for `/metrics`.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Gateway settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The model name `/v1/models` lists; requests naming another get 404 `model_not_found`.
    pub model: String,
    /// Tokens per KV block (must match the workers').
    pub block_size: u32,
    /// Largest request body accepted (base64 images make bodies large).
    pub max_body_bytes: usize,
    /// Time a client has to send a whole request body.
    pub body_read_timeout: Duration,
    /// Threads that parse, render, tokenize and process images, off the async runtime.
    pub preprocess_threads: usize,
    /// Requests that may wait for a preprocessing thread; more get 503 with `retry-after`.
    pub preprocess_queue: usize,
    /// API keys (none: an open gateway).
    pub api_keys: Vec<ApiKeyConfig>,
    /// Send `x-kvroute-overlap-blocks` and `x-kvroute-predicted-cached-tokens`.
    pub routing_headers: bool,
    /// The routing policy (kvroute's cost by default); shared, so a reload can replace it.
    pub policy: SharedPolicy,
    /// Forwarding timeouts and retries.
    pub forward: ForwardConfig,
    /// `/metrics` output; `None` serves an empty page.
    pub metrics: Option<MetricsRender>,
    /// Workers publish no KV events: predict their caches from routing instead. Each request's
    /// blocks count as cached on the worker that answered it for the index's
    /// [`routed_ttl`](kvroute_index::IndexConfig::routed_ttl) (Dynamo's approximate mode).
    pub approximate: bool,
}

impl GatewayConfig {
    /// Defaults for `model` with `block_size`-token blocks.
    pub fn new(model: impl Into<String>, block_size: u32) -> Self {
        let limits = LimitsConfig::default();
        Self {
            model: model.into(),
            block_size,
            max_body_bytes: limits.max_body_bytes,
            body_read_timeout: Duration::from_secs(limits.body_read_timeout_secs),
            preprocess_threads: limits.preprocess_threads(),
            preprocess_queue: limits.preprocess_queue,
            api_keys: Vec::new(),
            routing_headers: false,
            policy: SharedPolicy::new(KvAware::unseeded(CostConfig::default())),
            forward: ForwardConfig::default(),
            metrics: None,
            approximate: false,
        }
    }

    /// Sets the `/metrics` renderer.
    pub fn with_metrics(mut self, render: MetricsRender) -> Self {
        self.metrics = Some(render);
        self
    }

    /// Routes by kvroute's cost with these weights.
    pub fn with_cost(mut self, cost: CostConfig) -> Self {
        self.policy = SharedPolicy::new(KvAware::unseeded(cost));
        self
    }

    /// Routes by `policy`.
    pub fn with_policy(mut self, policy: SharedPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// Sets the body size limit.
    pub fn with_max_body_bytes(mut self, limit: usize) -> Self {
        self.max_body_bytes = limit;
        self
    }

    /// Applies the body and preprocessing limits of `limits`.
    pub fn with_limits(mut self, limits: &LimitsConfig) -> Self {
        self.max_body_bytes = limits.max_body_bytes;
        self.body_read_timeout = Duration::from_secs(limits.body_read_timeout_secs);
        self.preprocess_threads = limits.preprocess_threads();
        self.preprocess_queue = limits.preprocess_queue;
        self
    }

    /// Requires these API keys.
    pub fn with_api_keys(mut self, keys: Vec<ApiKeyConfig>) -> Self {
        self.api_keys = keys;
        self
    }

    /// Sends (or not) the headers that reveal cache overlap.
    pub fn with_routing_headers(mut self, on: bool) -> Self {
        self.routing_headers = on;
        self
    }

    /// Predicts workers' caches from routing decisions (for workers without KV events).
    pub fn with_approximate(mut self, approximate: bool) -> Self {
        self.approximate = approximate;
        self
    }

    /// Sets forwarding timeouts and retries.
    pub fn with_forward(mut self, forward: ForwardConfig) -> Self {
        self.forward = forward;
        self
    }
}

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum GatewayError {
    /// The block size is unusable.
    #[error("block size: {0}")]
    BlockSize(#[from] kvroute_blockhash::HashError),
}

/// What a prompt looks like to the router: its blocks and each worker's overlap.
struct Routed {
    prompt: Prompt,
    sequence: Vec<SequenceHash>,
    decision: Decision,
    eligible: Vec<Eligible>,
}

/// A request made ready on the preprocessing pool: its prompt and the body for the engine.
struct Prepared {
    prompt: Prompt,
    body: ForwardBody,
    stream: bool,
}

/// The router: an HTTP service over a preprocessor, an index kept current by KV events, and a
/// registry of workers. Cheap to clone.
#[derive(Clone)]
pub struct Gateway {
    inner: Arc<Inner>,
}

struct Inner {
    config: GatewayConfig,
    preprocessor: Arc<Preprocessor>,
    hasher: BlockHasher,
    index: SharedIndex,
    registry: Registry,
    forwarder: Forwarder,
    cpu: CpuPool,
    keys: RwLock<Arc<ApiKeys>>,
    ready: Box<dyn Fn() -> bool + Send + Sync>,
    /// When approximate-mode blocks were last expired.
    routed_expired_at: Mutex<Instant>,
}

impl Gateway {
    /// A gateway. `ready` tells `/ready` whether the index has caught up with the event stream.
    pub fn new(
        config: GatewayConfig,
        preprocessor: Arc<Preprocessor>,
        index: SharedIndex,
        registry: Registry,
        ready: impl Fn() -> bool + Send + Sync + 'static,
    ) -> Result<Self, GatewayError> {
        let hasher = BlockHasher::new(config.block_size)?;
        let forwarder = Forwarder::new(config.forward);
        let keys = ApiKeys::new(&config.api_keys, config.block_size)?;
        let cpu = CpuPool::new(config.preprocess_threads, config.preprocess_queue);
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                preprocessor,
                hasher,
                index,
                registry,
                forwarder,
                cpu,
                keys: RwLock::new(Arc::new(keys)),
                ready: Box::new(ready),
                routed_expired_at: Mutex::new(Instant::now()),
            }),
        })
    }

    /// Replaces the API keys (a reload). Requests in flight keep the key they came with.
    pub fn set_api_keys(&self, keys: &[ApiKeyConfig]) -> Result<(), GatewayError> {
        let keys = Arc::new(ApiKeys::new(keys, self.inner.config.block_size)?);
        *self.inner.keys.write().unwrap_or_else(|e| e.into_inner()) = keys;
        Ok(())
    }

    /// Serves HTTP/1.1 and HTTP/2 on `listener` until `shutdown` completes, then stops
    /// accepting and waits for in-flight requests to finish.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> std::io::Result<()> {
        serve_http(listener, shutdown, None, move |request| {
            let gateway = self.clone();
            async move { gateway.handle(request).await }
        })
        .await
    }

    /// Handles one request (for embedding the gateway in another server).
    pub async fn handle(&self, request: Request<Incoming>) -> Response<GatewayBody> {
        let started = Instant::now();
        let path = request.uri().path().to_owned();
        let endpoint = endpoint_label(&path);
        let response = self.dispatch(request, endpoint).await;
        let status = response.status().as_u16().to_string();
        counter!("kvroute_requests_total", "endpoint" => endpoint, "status" => status).increment(1);
        histogram!("kvroute_request_duration_seconds", "endpoint" => endpoint)
            .record(started.elapsed().as_secs_f64());
        response
    }

    async fn dispatch(
        &self,
        request: Request<Incoming>,
        endpoint: &'static str,
    ) -> Response<GatewayBody> {
        let method = request.method().clone();
        let expected = match endpoint {
            "chat" | "completions" | "route" => Method::POST,
            "other" => {
                let path = request.uri().path();
                return refuse(
                    StatusCode::NOT_FOUND,
                    ErrorBody::invalid_request(format!("no route for {path}"), None, "not_found"),
                );
            }
            _ => Method::GET,
        };
        if method != expected {
            let path = request.uri().path();
            return refuse(
                StatusCode::METHOD_NOT_ALLOWED,
                ErrorBody::invalid_request(
                    format!("{method} is not allowed on {path}"),
                    None,
                    "method_not_allowed",
                ),
            );
        }
        // Probes answer without a key (and without touching the preprocessing pool).
        match endpoint {
            "health" => return json_response(StatusCode::OK, &json!({"status": "ok"})),
            "ready" => return self.ready(),
            _ => {}
        }
        let admin_only = matches!(endpoint, "metrics" | "route");
        let caller = match self.keys().authenticate(request.headers(), admin_only) {
            Ok(caller) => caller,
            Err(refusal) => return refused(&refusal),
        };
        match endpoint {
            "chat" => self.chat(request, caller, false).await,
            "route" => self.chat(request, caller, true).await,
            "completions" => self.completion(request, caller).await,
            "models" => self.models(),
            _ => self.metrics(),
        }
    }

    fn keys(&self) -> Arc<ApiKeys> {
        Arc::clone(&self.inner.keys.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Checks the content type, then reads the whole body up to the configured size and
    /// time. A larger body is refused with 413 after reading (and discarding) the rest, up to
    /// four times the limit, so the client receives the error instead of a connection reset
    /// mid-upload.
    async fn read_body(
        &self,
        request: Request<Incoming>,
    ) -> Result<(HeaderMap, Bytes), Response<GatewayBody>> {
        let json = request
            .headers()
            .get(http::header::CONTENT_TYPE)
            .is_none_or(|value| is_json(value.as_bytes()));
        if !json {
            return Err(refuse(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorBody::invalid_request(
                    "the request body must be JSON (content-type: application/json)",
                    None,
                    "unsupported_media_type",
                ),
            ));
        }
        let limit = self.inner.config.max_body_bytes;
        let (parts, body) = request.into_parts();
        let read = tokio::time::timeout(
            self.inner.config.body_read_timeout,
            read_limited(body, limit),
        )
        .await;
        let refusal = match read {
            Ok(Ok(Some(bytes))) => return Ok((parts.headers, bytes)),
            Ok(Ok(None)) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the request body exceeds {limit} bytes"),
                "body_too_large",
            ),
            Ok(Err(error)) => (
                StatusCode::BAD_REQUEST,
                format!("could not read the request body: {error}"),
                "bad_body",
            ),
            Err(_) => (
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body took longer than {:?} to arrive",
                    self.inner.config.body_read_timeout
                ),
                "body_timeout",
            ),
        };
        let (status, message, code) = refusal;
        Err(refuse(
            status,
            ErrorBody::invalid_request(message, None, code),
        ))
    }

    async fn chat(
        &self,
        request: Request<Incoming>,
        caller: Caller,
        dry_run: bool,
    ) -> Response<GatewayBody> {
        let (headers, body) = match self.read_body(request).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        let inner = Arc::clone(&self.inner);
        let salt = caller
            .tenant
            .as_ref()
            .map(|tenant| Arc::clone(&tenant.salt));
        let runtime = tokio::runtime::Handle::current();
        let job = move || -> Result<Prepared, Refused> {
            let chat = ChatRequest::from_json(&body).map_err(|e| Box::new(preprocess_error(&e)))?;
            inner.check_model(&chat.model)?;
            let started = Instant::now();
            // Image URLs are fetched from this thread too: their decoding is the CPU work.
            let prompt = runtime
                .block_on(inner.preprocessor.chat(&chat))
                .map_err(|e| Box::new(preprocess_error(&e)))?;
            histogram!("kvroute_preprocess_duration_seconds")
                .record(started.elapsed().as_secs_f64());
            // Tell the engine the media ids we hashed, so its blocks carry the same identity,
            // and the tenant, so its cache keeps tenants apart as the router's hashes do.
            let body = with_image_uuids(&body, &chat, &prompt, salt.as_deref());
            Ok(Prepared {
                prompt,
                body,
                stream: chat.stream,
            })
        };
        let prepared = match self.inner.cpu.run(job).await {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(response)) => return *response,
            Err(error) => return cpu_error(&error),
        };
        let routed = self.route(prepared.prompt, &caller);
        if dry_run {
            return self.explain(&routed);
        }
        let path = "/v1/chat/completions";
        self.forward(routed, path, &headers, prepared.body, prepared.stream)
            .await
    }

    async fn completion(
        &self,
        request: Request<Incoming>,
        caller: Caller,
    ) -> Response<GatewayBody> {
        let (headers, body) = match self.read_body(request).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        let inner = Arc::clone(&self.inner);
        let salt = caller
            .tenant
            .as_ref()
            .map(|tenant| Arc::clone(&tenant.salt));
        let job = move || -> Result<Prepared, Refused> {
            let completion =
                CompletionRequest::from_json(&body).map_err(|e| Box::new(preprocess_error(&e)))?;
            inner.check_model(&completion.model)?;
            let prompt = inner
                .preprocessor
                .completion(&completion)
                .map_err(|e| Box::new(preprocess_error(&e)))?;
            let body = match salt {
                None => ForwardBody::from(body),
                Some(salt) => {
                    let mut fields = completion.body;
                    fields.insert("cache_salt".to_owned(), json!(&*salt));
                    ForwardBody::from(Bytes::from(serde_json::to_vec(&fields).unwrap_or_default()))
                }
            };
            Ok(Prepared {
                prompt,
                body,
                stream: completion.stream,
            })
        };
        let prepared = match self.inner.cpu.run(job).await {
            Ok(Ok(prepared)) => prepared,
            Ok(Err(response)) => return *response,
            Err(error) => return cpu_error(&error),
        };
        let routed = self.route(prepared.prompt, &caller);
        let path = "/v1/completions";
        self.forward(routed, path, &headers, prepared.body, prepared.stream)
            .await
    }

    /// Hashes the prompt (in the caller's tenant namespace), looks up every worker's overlap
    /// and decides.
    fn route(&self, prompt: Prompt, caller: &Caller) -> Routed {
        let hasher = caller
            .tenant
            .as_ref()
            .map_or(&self.inner.hasher, |tenant| &tenant.hasher);
        let mut sequence: Vec<SequenceHash> = Vec::new();
        hasher.sequence_hashes_into(&prompt.tokens, prompt.media.as_slice(), &mut sequence);
        if self.inner.config.approximate {
            self.expire_routed();
        }
        let overlap = self.inner.index.find_matches(&sequence);
        let mut by_worker: HashMap<WorkerId, usize> = HashMap::with_capacity(overlap.workers.len());
        for matched in &overlap.workers {
            let entry = by_worker.entry(matched.worker.worker_id).or_default();
            *entry = (*entry).max(matched.matched_blocks);
        }
        let eligible = self.inner.registry.eligible(Instant::now());
        let inputs: Vec<CandidateInput> = eligible
            .iter()
            .map(|w| w.candidate(by_worker.get(&w.worker().id).copied().unwrap_or(0)))
            .collect();
        let decision = self.inner.config.policy.decide(sequence.len(), &inputs);
        Routed {
            prompt,
            sequence,
            decision,
            eligible,
        }
    }

    /// Drops predicted blocks whose time ran out, at most once a second (it takes the index's
    /// write lock).
    fn expire_routed(&self) {
        let now = Instant::now();
        {
            let mut last = self
                .inner
                .routed_expired_at
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            if now.duration_since(*last) < Duration::from_secs(1) {
                return;
            }
            *last = now;
        }
        self.inner.index.expire_routed(now);
    }

    fn explain(&self, routed: &Routed) -> Response<GatewayBody> {
        json_response(
            StatusCode::OK,
            &json!({
                "block_size": self.inner.config.block_size,
                "prompt_tokens": routed.prompt.tokens.len(),
                "prompt_blocks": routed.decision.prompt_blocks,
                "images": routed.prompt.images.iter().map(|image| json!({
                    "media_id": image.id,
                    "uuid": image.forward_uuid,
                    "tokens": image.tokens,
                    "width": image.info.width,
                    "height": image.info.height,
                })).collect::<Vec<_>>(),
                "media_spans": routed.prompt.media,
                "chosen": routed.decision.chosen().map(|c| c.worker),
                "workers": routed.decision.table,
            }),
        )
    }

    /// Sends the request to the chosen worker (then the next ones in the decision table) and
    /// streams its response back.
    async fn forward(
        &self,
        routed: Routed,
        path: &str,
        headers: &HeaderMap,
        body: ForwardBody,
        stream: bool,
    ) -> Response<GatewayBody> {
        let Routed {
            prompt,
            sequence,
            decision,
            mut eligible,
        } = routed;
        let Some(chosen) = decision.chosen().copied() else {
            return refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new("server_error", "no worker is available", None, "no_workers"),
            );
        };
        self.record_prediction(&decision, &chosen);
        // The decision table's order, each row with its worker's load handle.
        let candidates: Vec<_> = decision
            .table
            .iter()
            .filter_map(|row| {
                let position = eligible.iter().position(|w| w.worker().id == row.worker)?;
                Some((eligible.swap_remove(position), *row))
            })
            .collect();
        let sent = Instant::now();
        let forwarded = self
            .inner
            .forwarder
            .post(&self.inner.registry, candidates, path, headers, body)
            .await;
        match forwarded {
            Ok(forwarded) => {
                let row = decision
                    .table
                    .iter()
                    .find(|row| row.worker == forwarded.worker.id)
                    .copied()
                    .unwrap_or(chosen);
                let facts = RoutingFacts {
                    prompt_tokens: prompt.tokens.len(),
                    prompt_blocks: decision.prompt_blocks,
                    overlap_blocks: row.overlap_blocks,
                };
                self.respond(forwarded, &sequence, facts, stream, sent)
            }
            Err(error) => forward_error(error),
        }
    }

    fn record_prediction(&self, decision: &Decision, chosen: &Candidate) {
        histogram!("kvroute_routing_overlap_ratio").record(if decision.prompt_blocks == 0 {
            0.0
        } else {
            chosen.overlap_blocks as f64 / decision.prompt_blocks as f64
        });
        counter!("kvroute_predicted_cached_tokens_total")
            .increment((chosen.overlap_blocks * self.inner.config.block_size as usize) as u64);
    }

    /// The worker's response, passed through with the routing headers.
    fn respond(
        &self,
        forwarded: Forwarded,
        sequence: &[SequenceHash],
        facts: RoutingFacts,
        stream: bool,
        sent: Instant,
    ) -> Response<GatewayBody> {
        if forwarded.attempts > 1 {
            counter!("kvroute_retries_total").increment((forwarded.attempts - 1) as u64);
        }
        let worker_id = forwarded.worker.id;
        if self.inner.config.approximate {
            self.inner.index.record_routed(
                WorkerKey::new(worker_id, DpRank(0)),
                sequence,
                Instant::now(),
            );
        }
        let registry = self.inner.registry.clone();
        let on_error = Box::new(move |error: &hyper::Error| {
            tracing::warn!(worker = %worker_id, %error, "worker failed mid-stream");
            counter!("kvroute_upstream_stream_errors_total").increment(1);
            registry.record_failure(worker_id, Instant::now());
        });
        let block_size = self.inner.config.block_size as usize;
        let predicted = (facts.overlap_blocks * block_size) as u64;
        let forward = &self.inner.config.forward;
        let (mut parts, upstream) = forwarded.response.into_parts();
        let body = Passthrough::new(upstream, forwarded.guard, stream, on_error, predicted)
            .with_timeouts(
                forward.stream_idle_timeout,
                forward.total_timeout.map(|total| sent + total),
            );
        let headers = &mut parts.headers;
        insert_header(headers, "x-kvroute-worker", worker_id.to_string());
        insert_header(
            headers,
            "x-kvroute-prompt-tokens",
            facts.prompt_tokens.to_string(),
        );
        insert_header(
            headers,
            "x-kvroute-prompt-blocks",
            facts.prompt_blocks.to_string(),
        );
        if self.inner.config.routing_headers {
            insert_header(
                headers,
                "x-kvroute-overlap-blocks",
                facts.overlap_blocks.to_string(),
            );
            insert_header(
                headers,
                "x-kvroute-predicted-cached-tokens",
                predicted.to_string(),
            );
        }
        Response::from_parts(parts, body.into())
    }

    fn models(&self) -> Response<GatewayBody> {
        json_response(
            StatusCode::OK,
            &json!({"object": "list", "data": [{
                "id": self.inner.config.model,
                "object": "model",
                "owned_by": "kvroute",
            }]}),
        )
    }

    fn ready(&self) -> Response<GatewayBody> {
        let caught_up = (self.inner.ready)();
        let workers = self.inner.registry.eligible(Instant::now()).len();
        let ready = caught_up && workers > 0;
        let status = if ready {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        };
        json_response(
            status,
            &json!({"ready": ready, "index_caught_up": caught_up, "available_workers": workers}),
        )
    }

    fn metrics(&self) -> Response<GatewayBody> {
        let stats = self.inner.index.stats();
        metrics::gauge!("kvroute_index_blocks").set(stats.blocks as f64);
        let workers = self.inner.registry.status(Instant::now());
        metrics::gauge!("kvroute_workers_available")
            .set(workers.iter().filter(|w| w.available).count() as f64);
        for status in &workers {
            let worker = status.worker.id.to_string();
            metrics::gauge!("kvroute_worker_active_requests", "worker" => worker.clone())
                .set(status.active_requests as f64);
            metrics::gauge!("kvroute_worker_pending_prefill_blocks", "worker" => worker.clone())
                .set(status.pending_prefill_blocks as f64);
            metrics::gauge!("kvroute_worker_active_blocks", "worker" => worker)
                .set(status.active_blocks as f64);
        }
        let text = self
            .inner
            .config
            .metrics
            .as_ref()
            .map(|render| render())
            .unwrap_or_default();
        let mut response = Response::new(full(text));
        response.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4"),
        );
        response
    }

    /// The worker registry (to add or remove workers at run time).
    pub fn registry(&self) -> &Registry {
        &self.inner.registry
    }

    /// The address-independent configuration.
    pub fn config(&self) -> &GatewayConfig {
        &self.inner.config
    }
}

impl Inner {
    /// 404 `model_not_found` (as OpenAI answers) for a model this gateway does not serve.
    fn check_model(&self, model: &str) -> Result<(), Refused> {
        if model == self.config.model {
            return Ok(());
        }
        Err(Box::new(refuse(
            StatusCode::NOT_FOUND,
            ErrorBody::invalid_request(
                format!("The model `{model}` does not exist or you do not have access to it."),
                Some("model"),
                "model_not_found",
            ),
        )))
    }
}

/// A refusal made on the preprocessing pool (boxed: responses are large).
type Refused = Box<Response<GatewayBody>>;

/// The numbers the routing headers report.
struct RoutingFacts {
    prompt_tokens: usize,
    prompt_blocks: usize,
    overlap_blocks: usize,
}

/// Reads `body` whole; `None` past `limit` bytes (the rest read and discarded up to four
/// times the limit).
async fn read_limited(mut body: Incoming, limit: usize) -> Result<Option<Bytes>, hyper::Error> {
    // Sized once from Content-Length (within the limit): growing by doubling would copy
    // a large body about once more.
    let expected = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
    let mut buffer = Vec::with_capacity(expected.min(limit));
    let mut total = 0usize;
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            total = total.saturating_add(data.len());
            if total <= limit {
                buffer.extend_from_slice(&data);
            } else if total > limit.saturating_mul(4) {
                break;
            }
        }
    }
    Ok((total <= limit).then(|| Bytes::from(buffer)))
}

/// `application/json`, with or without parameters (`; charset=utf-8`).
fn is_json(content_type: &[u8]) -> bool {
    let essence = content_type
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    essence.eq_ignore_ascii_case(b"application/json")
}

/// A refusal: counted by its code in `kvroute_request_errors_total`, answered with OpenAI's
/// error body.
fn refuse(status: StatusCode, body: ErrorBody) -> Response<GatewayBody> {
    let code = body.error.code.clone().unwrap_or_default();
    counter!("kvroute_request_errors_total", "code" => code).increment(1);
    error_response(status, &body)
}

/// A request refused by its API key: 401 (as OpenAI answers a missing or wrong key), 403, or
/// 429 with `retry-after`.
fn refused(refusal: &Refusal) -> Response<GatewayBody> {
    let (status, kind, message) = match refusal {
        Refusal::Missing => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "You didn't provide an API key. You need to provide your API key in an Authorization header using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
        ),
        Refusal::Wrong => (
            StatusCode::UNAUTHORIZED,
            "invalid_request_error",
            "Incorrect API key provided.",
        ),
        Refusal::NotAdmin => (
            StatusCode::FORBIDDEN,
            "invalid_request_error",
            "This endpoint needs an admin API key.",
        ),
        Refusal::Concurrency | Refusal::Rate(_) => (
            StatusCode::TOO_MANY_REQUESTS,
            "requests",
            "Rate limit reached for this API key.",
        ),
    };
    let code = match refusal {
        Refusal::Missing | Refusal::Wrong => "invalid_api_key",
        _ => refusal.reason(),
    };
    let body = ErrorBody::new(kind, message, None, code);
    counter!("kvroute_request_errors_total", "code" => refusal.reason()).increment(1);
    let mut response = error_response(status, &body);
    let retry_after = match refusal {
        Refusal::Rate(seconds) => Some(*seconds),
        Refusal::Concurrency => Some(1),
        _ => None,
    };
    if let Some(seconds) = retry_after {
        response
            .headers_mut()
            .insert(http::header::RETRY_AFTER, HeaderValue::from(seconds));
    }
    response
}

/// The preprocessing pool could not take the request: 503 with `retry-after`.
fn cpu_error(error: &CpuError) -> Response<GatewayBody> {
    match error {
        CpuError::Overloaded => {
            let mut response = refuse(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new(
                    "server_error",
                    "the router is overloaded; retry shortly",
                    None,
                    "overloaded",
                ),
            );
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from_static("1"));
            response
        }
        CpuError::Panicked => refuse(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::new(
                "server_error",
                "preprocessing failed",
                None,
                "internal_error",
            ),
        ),
    }
}

/// No worker answered: 502, or 504 when the chosen one took longer than the first-byte
/// timeout.
fn forward_error(error: ForwardError) -> Response<GatewayBody> {
    let (status, code) = match error {
        ForwardError::NoWorkers => (StatusCode::BAD_GATEWAY, "no_workers"),
        ForwardError::Timeout { .. } => (StatusCode::GATEWAY_TIMEOUT, "worker_timeout"),
        _ => (StatusCode::BAD_GATEWAY, "workers_failed"),
    };
    refuse(
        status,
        ErrorBody::new("server_error", error.to_string(), None, code),
    )
}

fn preprocess_error(error: &PreprocessError) -> Response<GatewayBody> {
    let status = if error.is_client_error() {
        StatusCode::BAD_REQUEST
    } else {
        tracing::error!(%error, "preprocessing failed");
        StatusCode::INTERNAL_SERVER_ERROR
    };
    refuse(status, error.to_error_body())
}

fn insert_header(headers: &mut HeaderMap, name: &'static str, value: String) {
    if let Ok(value) = HeaderValue::from_str(&value) {
        headers.insert(name, value);
    }
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/v1/chat/completions" => "chat",
        "/v1/completions" => "completions",
        "/v1/route" => "route",
        "/v1/models" => "models",
        "/health" => "health",
        "/ready" => "ready",
        "/metrics" => "metrics",
        _ => "other",
    }
}

/// Binds `addr` (port 0 picks a free port).
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}
