//! The HTTP server: OpenAI endpoints, routing, health, metrics.

use crate::accept::serve_http;
use crate::body::{error_response, full, json_response, GatewayBody, Passthrough};
use crate::forward_body::with_image_uuids;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::{Body as _, Incoming};
use kvroute_blockhash::BlockHasher;
use kvroute_dispatch::{
    CandidateInput, CostConfig, Decision, Eligible, ForwardBody, ForwardConfig, ForwardError,
    Forwarder, KvAware, Registry, SharedPolicy,
};
use kvroute_index::{SharedIndex, WorkerKey};
use kvroute_preprocess::{ChatRequest, CompletionRequest, PreprocessError, Preprocessor, Prompt};
use kvroute_protocol::{DpRank, ErrorBody, SequenceHash, WorkerId};
use metrics::{counter, histogram};
use serde_json::json;
use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Renders the Prometheus text exposition for `/metrics`.
pub type MetricsRender = Arc<dyn Fn() -> String + Send + Sync>;

/// Gateway settings.
#[derive(Clone)]
#[non_exhaustive]
pub struct GatewayConfig {
    /// The model name `/v1/models` lists.
    pub model: String,
    /// Tokens per KV block (must match the workers').
    pub block_size: u32,
    /// Largest request body accepted (base64 images make bodies large).
    pub max_body_bytes: usize,
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
        Self {
            model: model.into(),
            block_size,
            max_body_bytes: 32 << 20,
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
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                preprocessor,
                hasher,
                index,
                registry,
                forwarder,
                ready: Box::new(ready),
                routed_expired_at: Mutex::new(Instant::now()),
            }),
        })
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
        let method = request.method().clone();
        let response = match (&method, path.as_str()) {
            (&Method::POST, "/v1/chat/completions") => self.chat(request, false).await,
            (&Method::POST, "/v1/completions") => self.completion(request).await,
            (&Method::POST, "/v1/route") => self.chat(request, true).await,
            (&Method::GET, "/v1/models") => self.models(),
            (&Method::GET, "/health") => json_response(StatusCode::OK, &json!({"status": "ok"})),
            (&Method::GET, "/ready") => self.ready(),
            (&Method::GET, "/metrics") => self.metrics(),
            (
                _,
                "/v1/chat/completions"
                | "/v1/completions"
                | "/v1/route"
                | "/v1/models"
                | "/health"
                | "/ready"
                | "/metrics",
            ) => error_response(
                StatusCode::METHOD_NOT_ALLOWED,
                &ErrorBody::invalid_request(
                    format!("{method} is not allowed on {path}"),
                    None,
                    "method_not_allowed",
                ),
            ),
            _ => error_response(
                StatusCode::NOT_FOUND,
                &ErrorBody::invalid_request(format!("no route for {path}"), None, "not_found"),
            ),
        };
        let status = response.status().as_u16().to_string();
        let endpoint = endpoint_label(&path);
        counter!("kvroute_requests_total", "endpoint" => endpoint, "status" => status).increment(1);
        histogram!("kvroute_request_duration_seconds", "endpoint" => endpoint)
            .record(started.elapsed().as_secs_f64());
        response
    }

    /// Reads the whole body up to the configured limit. A larger body is refused with 413
    /// after reading (and discarding) the rest, up to four times the limit, so the client
    /// receives the error instead of a connection reset mid-upload.
    async fn read_body(
        &self,
        request: Request<Incoming>,
    ) -> Result<(HeaderMap, Bytes), Response<GatewayBody>> {
        let limit = self.inner.config.max_body_bytes;
        let (parts, mut body) = request.into_parts();
        // Sized once from Content-Length (within the limit): growing by doubling would copy
        // a large body about once more.
        let expected = usize::try_from(body.size_hint().lower()).unwrap_or(usize::MAX);
        let mut buffer = Vec::with_capacity(expected.min(limit));
        let mut total = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = match frame {
                Ok(frame) => frame,
                Err(error) => {
                    return Err(error_response(
                        StatusCode::BAD_REQUEST,
                        &ErrorBody::invalid_request(
                            format!("could not read the request body: {error}"),
                            None,
                            "bad_body",
                        ),
                    ))
                }
            };
            if let Ok(data) = frame.into_data() {
                total = total.saturating_add(data.len());
                if total <= limit {
                    buffer.extend_from_slice(&data);
                } else if total > limit.saturating_mul(4) {
                    break;
                }
            }
        }
        if total > limit {
            counter!("kvroute_request_errors_total", "code" => "body_too_large").increment(1);
            return Err(error_response(
                StatusCode::PAYLOAD_TOO_LARGE,
                &ErrorBody::invalid_request(
                    format!("the request body exceeds {limit} bytes"),
                    None,
                    "body_too_large",
                ),
            ));
        }
        Ok((parts.headers, Bytes::from(buffer)))
    }

    async fn chat(&self, request: Request<Incoming>, dry_run: bool) -> Response<GatewayBody> {
        let (headers, body) = match self.read_body(request).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        let chat = match ChatRequest::from_json(&body) {
            Ok(chat) => chat,
            Err(error) => return preprocess_error(&error),
        };
        let started = Instant::now();
        let prompt = match self.inner.preprocessor.chat(&chat).await {
            Ok(prompt) => prompt,
            Err(error) => return preprocess_error(&error),
        };
        histogram!("kvroute_preprocess_duration_seconds").record(started.elapsed().as_secs_f64());
        let routed = self.route(prompt);
        if dry_run {
            return self.explain(&routed);
        }
        // Tell the engine the media ids we hashed, so its blocks carry the same identity.
        let forward_body = with_image_uuids(&body, &chat, &routed.prompt);
        self.forward(
            routed,
            "/v1/chat/completions",
            &headers,
            forward_body,
            chat.stream,
        )
        .await
    }

    async fn completion(&self, request: Request<Incoming>) -> Response<GatewayBody> {
        let (headers, body) = match self.read_body(request).await {
            Ok(read) => read,
            Err(response) => return response,
        };
        let completion = match CompletionRequest::from_json(&body) {
            Ok(completion) => completion,
            Err(error) => return preprocess_error(&error),
        };
        let prompt = match self.inner.preprocessor.completion(&completion) {
            Ok(prompt) => prompt,
            Err(error) => return preprocess_error(&error),
        };
        let routed = self.route(prompt);
        self.forward(routed, "/v1/completions", &headers, body, completion.stream)
            .await
    }

    /// Hashes the prompt, looks up every worker's overlap and decides.
    fn route(&self, prompt: Prompt) -> Routed {
        let mut sequence: Vec<SequenceHash> = Vec::new();
        self.inner.hasher.sequence_hashes_into(
            &prompt.tokens,
            prompt.media.as_slice(),
            &mut sequence,
        );
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

    async fn forward(
        &self,
        routed: Routed,
        path: &str,
        headers: &HeaderMap,
        body: impl Into<ForwardBody>,
        stream: bool,
    ) -> Response<GatewayBody> {
        let Routed {
            prompt,
            sequence,
            decision,
            mut eligible,
        } = routed;
        let Some(chosen) = decision.chosen().copied() else {
            counter!("kvroute_request_errors_total", "code" => "no_workers").increment(1);
            return error_response(
                StatusCode::SERVICE_UNAVAILABLE,
                &ErrorBody::new("server_error", "no worker is available", None, "no_workers"),
            );
        };
        histogram!("kvroute_routing_overlap_ratio").record(if decision.prompt_blocks == 0 {
            0.0
        } else {
            chosen.overlap_blocks as f64 / decision.prompt_blocks as f64
        });
        counter!("kvroute_predicted_cached_tokens_total")
            .increment((chosen.overlap_blocks * self.inner.config.block_size as usize) as u64);
        let candidates = decision.table.iter().filter_map(|row| {
            let position = eligible.iter().position(|w| w.worker().id == row.worker)?;
            Some((eligible.swap_remove(position), *row))
        });
        let candidates: Vec<_> = candidates.collect();
        match self
            .inner
            .forwarder
            .post(&self.inner.registry, candidates, path, headers, body)
            .await
        {
            Ok(forwarded) => {
                if forwarded.attempts > 1 {
                    counter!("kvroute_retries_total").increment((forwarded.attempts - 1) as u64);
                }
                let row = decision
                    .table
                    .iter()
                    .find(|row| row.worker == forwarded.worker.id)
                    .copied()
                    .unwrap_or(chosen);
                let (mut parts, upstream) = forwarded.response.into_parts();
                let worker_id = forwarded.worker.id;
                if self.inner.config.approximate {
                    self.inner.index.record_routed(
                        WorkerKey::new(worker_id, DpRank(0)),
                        &sequence,
                        Instant::now(),
                    );
                }
                let registry = self.inner.registry.clone();
                let on_error = Box::new(move |error: &hyper::Error| {
                    tracing::warn!(worker = %worker_id, %error, "worker failed mid-stream");
                    counter!("kvroute_upstream_stream_errors_total").increment(1);
                    registry.record_failure(worker_id, Instant::now());
                });
                let predicted = (row.overlap_blocks * self.inner.config.block_size as usize) as u64;
                let body = Passthrough::new(upstream, forwarded.guard, stream, on_error, predicted);
                let headers = &mut parts.headers;
                insert_header(headers, "x-kvroute-worker", worker_id.to_string());
                insert_header(
                    headers,
                    "x-kvroute-prompt-tokens",
                    prompt.tokens.len().to_string(),
                );
                insert_header(
                    headers,
                    "x-kvroute-prompt-blocks",
                    decision.prompt_blocks.to_string(),
                );
                insert_header(
                    headers,
                    "x-kvroute-overlap-blocks",
                    row.overlap_blocks.to_string(),
                );
                insert_header(
                    headers,
                    "x-kvroute-predicted-cached-tokens",
                    predicted.to_string(),
                );
                Response::from_parts(parts, body.into())
            }
            Err(error) => {
                let code = match error {
                    ForwardError::NoWorkers => "no_workers",
                    _ => "workers_failed",
                };
                counter!("kvroute_request_errors_total", "code" => code).increment(1);
                error_response(
                    StatusCode::BAD_GATEWAY,
                    &ErrorBody::new("server_error", error.to_string(), None, code),
                )
            }
        }
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

fn preprocess_error(error: &PreprocessError) -> Response<GatewayBody> {
    counter!("kvroute_request_errors_total", "code" => error.code()).increment(1);
    let status = if error.is_client_error() {
        StatusCode::BAD_REQUEST
    } else {
        tracing::error!(%error, "preprocessing failed");
        StatusCode::INTERNAL_SERVER_ERROR
    };
    error_response(status, &error.to_error_body())
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
