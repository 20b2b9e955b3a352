//! A custom KV-cache-aware router in about a hundred lines: kvroute's crates wired behind an
//! HTTP front of its own (not kvroute-gateway). docs/embedding.md walks through it.
//!
//! Per request: the OpenAI chat body becomes the exact token ids and image spans the engine
//! will see (kvroute-preprocess), those become sequence hashes that carry each image's identity
//! (kvroute-blockhash), the index kept current by the workers' KV events says how many leading
//! blocks each worker holds (kvroute-index, kvroute-events), and the cheapest worker gets the
//! request, streamed through (kvroute-dispatch).
//!
//! ```sh
//! nats-server -js &
//! cargo run -p kvroute-examples --example mock_worker -- --worker-id 1 --listen 127.0.0.1:8001 &
//! cargo run -p kvroute-examples --example mock_worker -- --worker-id 2 --listen 127.0.0.1:8002 &
//! cargo run -p kvroute-examples --example embed_router -- \
//!     --worker 1=http://127.0.0.1:8001 --worker 2=http://127.0.0.1:8002
//! ```

use bytes::Bytes;
use clap::Parser;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full, Limited};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use kvroute_blockhash::BlockHasher;
use kvroute_dispatch::{
    decide, CostConfig, ForwardConfig, Forwarder, Registry, TieBreaker, Worker,
};
use kvroute_events::{
    connect, IngestConfig, Ingestor, NatsSource, NatsSourceConfig, StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_preprocess::{ChatRequest, ModelFiles, PreprocessConfig, Preprocessor};
use kvroute_protocol::{ErrorBody, WorkerId};
use std::{
    convert::Infallible,
    error::Error,
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Instant,
};
use tokio::net::TcpListener;

/// A KV-cache-aware router in front of OpenAI-compatible workers.
#[derive(Parser, Debug)]
pub struct Args {
    /// A worker as ID=URL: the id its KV events carry and its base URL (repeatable).
    #[arg(long = "worker", value_parser = parse_worker, required = true)]
    workers: Vec<Worker>,
    /// Where the router listens.
    #[arg(long, default_value = "127.0.0.1:8000")]
    listen: SocketAddr,
    /// The NATS server the workers publish their KV events to.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The workers' namespace and component (their events' subjects).
    #[arg(long, default_value = "default")]
    namespace: String,
    /// See --namespace.
    #[arg(long, default_value = "trtllm")]
    component: String,
    /// Tokens per KV block: the workers' block size.
    #[arg(long, default_value_t = 32)]
    block_size: u32,
}

fn parse_worker(spec: &str) -> Result<Worker, String> {
    let (id, url) = spec.split_once('=').ok_or("expected ID=URL")?;
    let id = id
        .parse()
        .map_err(|_| format!("worker id {id:?} is not a number"))?;
    Worker::new(WorkerId(id), url).map_err(|e| e.to_string())
}

type BoxError = Box<dyn Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// Everything a request needs, shared by all of them.
pub struct Router {
    preprocessor: Preprocessor,
    hasher: BlockHasher,
    /// The cached blocks of every worker, kept current by `ingestor`.
    pub index: SharedIndex,
    _ingestor: Ingestor, // consumes KV events until dropped
    registry: Registry,
    forwarder: Forwarder,
    ties: Mutex<TieBreaker>,
}

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    let router = Router::start(args).await?;
    router
        .serve(listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}

impl Router {
    /// Loads the model's tokenizer, starts consuming KV events and registers the workers.
    pub async fn start(args: Args) -> Result<Arc<Self>, BoxError> {
        let preprocessor = Preprocessor::new(
            &ModelFiles::bundled_qwen2_vl()?,
            PreprocessConfig::default(),
        )?;
        let index = SharedIndex::new(Index::new(IndexConfig::default()));
        let stream = StreamSettings::default().for_component(&args.namespace, &args.component);
        let source = NatsSource::new(
            connect(&args.nats_url).await?,
            NatsSourceConfig::new(stream).with_snapshots(None),
        );
        let ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());
        ingestor.caught_up().await; // the index holds everything the stream held at start
        let registry = Registry::default();
        args.workers
            .into_iter()
            .for_each(|worker| registry.upsert(worker));
        let hasher = BlockHasher::new(args.block_size)?;
        let forwarder = Forwarder::new(ForwardConfig::default());
        let ties = Mutex::new(TieBreaker::new());
        Ok(Arc::new(Self {
            preprocessor,
            hasher,
            index,
            _ingestor: ingestor,
            registry,
            forwarder,
            ties,
        }))
    }

    /// Serves HTTP/1.1 on `listener` until `shutdown`.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), BoxError> {
        tokio::pin!(shutdown);
        loop {
            let (stream, _) = tokio::select! { accepted = listener.accept() => accepted?, () = &mut shutdown => break };
            stream.set_nodelay(true)?; // streamed tokens must not wait for a delayed ACK
            let router = Arc::clone(&self);
            let service = service_fn(move |request| {
                let router = Arc::clone(&router);
                async move { Ok::<_, Infallible>(router.chat(request).await) }
            });
            tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
        }
        Ok(())
    }

    async fn chat(&self, request: Request<Incoming>) -> Response<Body> {
        if (request.method(), request.uri().path()) != (&Method::POST, "/v1/chat/completions") {
            return error(
                StatusCode::NOT_FOUND,
                ErrorBody::invalid_request("POST /v1/chat/completions only", None, "not_found"),
            );
        }
        let (parts, body) = request.into_parts();
        let Ok(body) = Limited::new(body, 32 << 20)
            .collect()
            .await
            .map(|b| b.to_bytes())
        else {
            return error(
                StatusCode::BAD_REQUEST,
                ErrorBody::invalid_request("unreadable or too large body", None, "bad_body"),
            );
        };
        // 1. The exact tokens and image spans the engine will see.
        let prompt = match ChatRequest::from_json(&body) {
            Ok(chat) => self.preprocessor.chat(&chat).await,
            Err(e) => Err(e),
        };
        let prompt = match prompt {
            Ok(prompt) => prompt,
            Err(e) if e.is_client_error() => {
                return error(StatusCode::BAD_REQUEST, e.to_error_body())
            }
            Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_error_body()),
        };
        // 2. Sequence hashes of its full blocks, each image's id inside the blocks it touches.
        let mut hashes = Vec::new();
        self.hasher
            .sequence_hashes_into(&prompt.tokens, prompt.media.as_slice(), &mut hashes);
        // 3. How many leading blocks each worker holds.
        let overlap = self.index.find_matches(&hashes);
        let overlap_of = |id| {
            overlap
                .workers
                .iter()
                .filter(|w| w.worker.worker_id == id)
                .map(|w| w.matched_blocks)
                .max()
                .unwrap_or(0)
        };
        // 4. The cheapest worker: blocks to prefill plus load; the rest of the table is the retry order.
        let eligible = self.registry.eligible(Instant::now());
        let inputs = eligible
            .iter()
            .map(|w| w.candidate(overlap_of(w.worker().id)));
        let decision = decide(
            hashes.len(),
            inputs,
            &CostConfig::default(),
            &mut self.ties.lock().unwrap_or_else(|e| e.into_inner()),
        );
        let Some(decision) = decision else {
            return error(
                StatusCode::SERVICE_UNAVAILABLE,
                ErrorBody::new("server_error", "no worker is available", None, "no_workers"),
            );
        };
        let candidates: Vec<_> = (decision.table.iter())
            .filter_map(|row| {
                let worker = eligible.iter().find(|w| w.worker().id == row.worker)?;
                Some((worker.clone(), *row))
            })
            .collect();
        // 5. Forward; the response streams through and counts in the worker's load until it ends.
        match self
            .forwarder
            .post(
                &self.registry,
                candidates,
                "/v1/chat/completions",
                &parts.headers,
                body,
            )
            .await
        {
            Ok(forwarded) => {
                let overlap = overlap_of(forwarded.worker.id);
                let mut guard = forwarded.guard;
                let mut response = forwarded.response.map(|body| {
                    body.map_frame(move |frame| {
                        guard.prefill_done();
                        frame
                    })
                    .boxed_unsync()
                });
                let headers = response.headers_mut();
                headers.insert(
                    "x-kvroute-worker",
                    HeaderValue::from(forwarded.worker.id.get()),
                );
                headers.insert("x-kvroute-overlap-blocks", HeaderValue::from(overlap));
                response
            }
            Err(e) => error(
                StatusCode::BAD_GATEWAY,
                ErrorBody::new("server_error", e.to_string(), None, "workers_failed"),
            ),
        }
    }
}

fn error(status: StatusCode, body: ErrorBody) -> Response<Body> {
    let json = serde_json::to_vec(&body).unwrap_or_default();
    let mut response = Response::new(
        Full::new(Bytes::from(json))
            .map_err(|never| match never {})
            .boxed_unsync(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}
