//! A standalone KV indexer: consumes workers' KV events (kvroute's JetStream stream, or a
//! Dynamo 1.6 deployment's own NATS event plane through the adapter in kvroute-events) and
//! answers overlap queries over HTTP, for routers written in other languages.
//!
//! ```sh
//! nats-server -js &
//! cargo run -p kvroute-examples --example standalone_indexer -- --listen 127.0.0.1:9100
//! curl -s 127.0.0.1:9100/query -d '{"token_ids": [1, 2, 3, 4]}'
//! ```
//!
//! `POST /query` takes one of
//! `{"token_ids": [..], "media": [{"start": 5, "len": 64, "id": 1234}], "lora_name": ".."}`
//! (hashed here, media and LoRA optional), `{"block_hashes": [..]}` (Dynamo's per-block
//! `tokens_hash`, chained here) or `{"sequence_hashes": [..]}`, and answers
//! `{"query_blocks": 3, "workers": [{"worker_id": 7, "dp_rank": 0, "overlap_blocks": 2,
//! "cached_blocks": 40}]}`, best overlap first. `GET /health` says whether the index has
//! caught up with the stream; `GET /stats` gives the index's and the ingestion's counters.

use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use kvroute_blockhash::{sequence_hashes_into, BlockHasher, MediaSpan};
use kvroute_events::{
    connect, DynamoSource, IngestConfig, Ingestor, NatsSource, NatsSourceConfig, StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{BlockHash, ErrorBody, SequenceHash};
use serde::Deserialize;
use serde_json::json;
use std::convert::Infallible;
use std::error::Error;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::TcpListener;

/// A KV indexer answering overlap queries over HTTP.
#[derive(Parser, Debug)]
pub struct Args {
    /// Where it listens.
    #[arg(long, default_value = "127.0.0.1:9100")]
    listen: SocketAddr,
    /// The NATS server.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
    /// The deployment's namespace.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// The component (worker pool) inside the namespace.
    #[arg(long, default_value = "trtllm")]
    component: String,
    /// kvroute's JetStream stream, or Dynamo 1.6 workers' NATS core subjects
    /// `namespace.{ns}.component.{comp}.endpoint.{endpoint}.kv-events`.
    #[arg(long, value_enum, default_value_t = Wire::Kvroute)]
    wire: Wire,
    /// The workers' endpoint (with --wire dynamo; every endpoint when absent).
    #[arg(long)]
    endpoint: Option<String>,
    /// Tokens per KV block, for `token_ids` queries (the workers' block size).
    #[arg(long, default_value_t = 32)]
    block_size: u32,
}

/// How the workers publish.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Wire {
    Kvroute,
    Dynamo,
}

/// One overlap query: exactly one of the three inputs.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Query {
    token_ids: Option<Vec<u32>>,
    #[serde(default)]
    media: Vec<MediaSpan>,
    lora_name: Option<String>,
    block_hashes: Option<Vec<BlockHash>>,
    sequence_hashes: Option<Vec<SequenceHash>>,
}

struct Indexer {
    index: SharedIndex,
    ingestor: Ingestor,
    block_size: u32,
}

type BoxError = Box<dyn Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), BoxError> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen).await?;
    run(args, listener, async {
        let _ = tokio::signal::ctrl_c().await;
    })
    .await
}

/// Ingests events and serves queries on `listener` until `shutdown`.
pub async fn run(
    args: Args,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), BoxError> {
    let client = connect(&args.nats_url).await?;
    let index = SharedIndex::new(Index::new(IndexConfig::default()));
    let config = IngestConfig::default();
    let ingestor = match args.wire {
        // The whole stream from its first message (no snapshots: a restart replays it).
        Wire::Kvroute => {
            let stream = StreamSettings::default().for_component(&args.namespace, &args.component);
            let source =
                NatsSource::new(client, NatsSourceConfig::new(stream).with_snapshots(None));
            Ingestor::spawn(source, index.clone(), config)
        }
        Wire::Dynamo => {
            let source = DynamoSource::new(
                client,
                &args.namespace,
                &args.component,
                args.endpoint.as_deref(),
            );
            Ingestor::spawn(source, index.clone(), config)
        }
    };
    BlockHasher::new(args.block_size)?; // refuse a block size of 0 at start, not per query
    let indexer = Arc::new(Indexer {
        index,
        ingestor,
        block_size: args.block_size,
    });
    println!("standalone indexer on http://{}", listener.local_addr()?);

    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            () = &mut shutdown => break,
        };
        let indexer = Arc::clone(&indexer);
        let service = service_fn(move |request| {
            let indexer = Arc::clone(&indexer);
            async move { Ok::<_, Infallible>(indexer.handle(request).await) }
        });
        tokio::spawn(http1::Builder::new().serve_connection(TokioIo::new(stream), service));
    }
    // Dropping the last handle stops ingestion.
    Ok(())
}

impl Indexer {
    async fn handle(&self, request: Request<Incoming>) -> Response<Full<Bytes>> {
        match (request.method(), request.uri().path()) {
            (&Method::POST, "/query") => {
                match Limited::new(request.into_body(), 16 << 20).collect().await {
                    Ok(body) => self.query(&body.to_bytes()),
                    Err(error) => bad_request(format!("could not read the body: {error}")),
                }
            }
            (&Method::GET, "/health") => {
                let caught_up = self.ingestor.is_caught_up();
                let status = if caught_up {
                    StatusCode::OK
                } else {
                    StatusCode::SERVICE_UNAVAILABLE
                };
                reply(status, &json!({"caught_up": caught_up}))
            }
            (&Method::GET, "/stats") => {
                let (index, ingest) = (self.index.stats(), self.ingestor.stats());
                reply(
                    StatusCode::OK,
                    &json!({
                        "workers": index.workers, "blocks": index.blocks, "bytes": index.bytes,
                        "events_applied": ingest.events_applied, "gaps": ingest.gaps,
                        "malformed": ingest.malformed,
                    }),
                )
            }
            (_, path) => reply(
                StatusCode::NOT_FOUND,
                &ErrorBody::invalid_request(format!("no route for {path}"), None, "not_found"),
            ),
        }
    }

    fn query(&self, body: &[u8]) -> Response<Full<Bytes>> {
        let query: Query = match serde_json::from_slice(body) {
            Ok(query) => query,
            Err(error) => return bad_request(format!("invalid query: {error}")),
        };
        let mut sequence = Vec::new();
        match (query.token_ids, query.block_hashes, query.sequence_hashes) {
            (Some(tokens), None, None) => {
                let builder = BlockHasher::builder(self.block_size);
                let hasher = match builder
                    .lora_name(query.lora_name.as_deref().unwrap_or(""))
                    .build()
                {
                    Ok(hasher) => hasher,
                    Err(error) => return bad_request(error.to_string()),
                };
                hasher.sequence_hashes_into(&tokens, query.media.as_slice(), &mut sequence);
            }
            (None, Some(blocks), None) => sequence_hashes_into(None, &blocks, &mut sequence),
            (None, None, Some(hashes)) => sequence = hashes,
            _ => {
                return bad_request(
                    "give exactly one of token_ids, block_hashes, sequence_hashes".into(),
                )
            }
        }
        let overlap = self.index.find_matches(&sequence);
        let mut workers: Vec<_> = overlap.workers.iter().collect();
        workers.sort_by_key(|w| std::cmp::Reverse(w.matched_blocks));
        let workers: Vec<_> = workers
            .iter()
            .map(|w| {
                json!({
                    "worker_id": w.worker.worker_id, "dp_rank": w.worker.dp_rank,
                    "overlap_blocks": w.matched_blocks, "cached_blocks": w.cached_blocks,
                })
            })
            .collect();
        reply(
            StatusCode::OK,
            &json!({"query_blocks": overlap.query_blocks, "workers": workers}),
        )
    }
}

fn bad_request(message: String) -> Response<Full<Bytes>> {
    reply(
        StatusCode::BAD_REQUEST,
        &ErrorBody::invalid_request(message, None, "invalid_query"),
    )
}

fn reply(status: StatusCode, body: &impl serde::Serialize) -> Response<Full<Bytes>> {
    let bytes = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(bytes)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}
