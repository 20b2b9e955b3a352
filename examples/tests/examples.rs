//! Runs every example: each one's source is compiled here as a module and its `run` (or
//! `start`/`serve`) called with the arguments a user would pass, against a real nats-server
//! of the test's own (free port, temporary store).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

#[path = "../custom_server.rs"]
#[allow(dead_code)] // its `main`
mod custom_server;
#[path = "../embed_router.rs"]
#[allow(dead_code)] // its `main`
mod embed_router;
#[path = "../hash_tokens.rs"]
#[allow(dead_code)]
mod hash_tokens;
#[path = "../mock_worker.rs"]
#[allow(dead_code)]
mod mock_worker;
#[path = "../soak.rs"]
#[allow(dead_code)] // its `main`
mod soak;
#[path = "../standalone_indexer.rs"]
#[allow(dead_code)]
mod standalone_indexer;

use clap::Parser;
use kvroute_blockhash::{BlockHasher, NoMedia};
use kvroute_events::{
    connect, dynamo_event_subject, encode_dynamo_envelope, IngestConfig, Ingestor,
    NatsPublishConfig, NatsPublisher, NatsSource, NatsSourceConfig, PublisherConfig,
    StreamSettings,
};
use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{
    DpRank, KvCacheEvent, KvCacheEventData, KvCacheStoreData, KvCacheStoredBlockData, RouterEvent,
    WorkerId,
};
use kvroute_testsupport::{free_port, image_chat_request, wait_for_port, HttpClient, NatsServer};
use serde_json::{json, Value};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::oneshot;

const BLOCK_SIZE: u32 = 32;

/// A future that completes when the returned sender is used or dropped.
fn stopper() -> (oneshot::Sender<()>, impl std::future::Future<Output = ()>) {
    let (stop, stopped) = oneshot::channel::<()>();
    (stop, async move {
        let _ = stopped.await;
    })
}

/// Polls `check` every 20 ms for up to 10 s.
async fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[test]
fn hash_tokens_prints_what_the_blockhash_readme_shows() {
    let mut out = Vec::new();
    hash_tokens::print_hashes(&mut out).unwrap();
    let readme = include_str!("../../crates/blockhash/README.md");
    let shown = readme
        .split("```text\n")
        .nth(1)
        .and_then(|rest| rest.split("```").next())
        .expect("a ```text block in crates/blockhash/README.md");
    assert_eq!(String::from_utf8(out).unwrap(), shown);
}

/// Starts `mock_worker` `id` on a free port; returns its base URL.
async fn mock_worker(nats: &NatsServer, id: u64) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let args = mock_worker::Args::parse_from([
        "mock_worker",
        "--worker-id",
        &id.to_string(),
        "--nats-url",
        &nats.url(),
        "--namespace",
        "examples",
        "--block-size",
        &BLOCK_SIZE.to_string(),
    ]);
    tokio::spawn(async move {
        mock_worker::run(args, listener, std::future::pending())
            .await
            .unwrap()
    });
    url
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mock_worker_publishes_its_cache_to_nats() {
    let nats = NatsServer::start().await;
    let url = mock_worker(&nats, 5).await;
    // A consumer of the stream, as a router runs one.
    let index = SharedIndex::new(Index::new(IndexConfig::default()));
    let stream = StreamSettings::default().for_component("examples", "trtllm");
    let source = NatsSource::new(
        connect(&nats.url()).await.unwrap(),
        NatsSourceConfig::new(stream).with_snapshots(None),
    );
    let _ingestor = Ingestor::spawn(source, index.clone(), IngestConfig::default());

    let client = HttpClient::new();
    let request = image_chat_request("chelsea.png", "What is in this image?");
    let first = client
        .post(&format!("{url}/v1/chat/completions"), &request)
        .await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let prompt_tokens = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let blocks = prompt_tokens / u64::from(BLOCK_SIZE);
    assert!(blocks > 2, "{prompt_tokens} prompt tokens");
    eventually("the worker's blocks in the index", || {
        index.stats().blocks == blocks
    })
    .await;
    let second = client
        .post(&format!("{url}/v1/chat/completions"), &request)
        .await;
    assert_eq!(
        second.body["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(blocks * u64::from(BLOCK_SIZE))
    );
}

/// Starts the standalone indexer with `extra` flags; returns its base URL.
async fn standalone_indexer(nats: &NatsServer, extra: &[&str]) -> String {
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let nats_url = nats.url();
    let mut argv = vec![
        "standalone_indexer",
        "--listen",
        &listen,
        "--nats-url",
        &nats_url,
        "--namespace",
        "examples",
        "--block-size",
        "4",
    ];
    argv.extend_from_slice(extra);
    let args = standalone_indexer::Args::parse_from(argv);
    let listener = TcpListener::bind(&listen).await.unwrap();
    tokio::spawn(async move {
        standalone_indexer::run(args, listener, std::future::pending())
            .await
            .unwrap()
    });
    wait_for_port(port).await;
    format!("http://{listen}")
}

/// A store of the full blocks of `tokens` (block size 4), as a worker publishes it.
fn stored(tokens: &[u32]) -> KvCacheEventData {
    let hasher = BlockHasher::new(4).unwrap();
    KvCacheEventData::Stored(KvCacheStoreData {
        parent_hash: None,
        start_position: None,
        blocks: hasher
            .hash_sequence(tokens, &NoMedia)
            .iter()
            .map(|b| KvCacheStoredBlockData {
                block_hash: b.sequence,
                tokens_hash: b.block,
                mm_extra_info: None,
            })
            .collect(),
    })
}

/// Queries until the answer's first worker has `blocks` blocks of overlap.
async fn query_until(client: &HttpClient, base: &str, query: &Value, blocks: u64) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let reply = client.post(&format!("{base}/query"), query).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        if reply.body["workers"][0]["overlap_blocks"] == json!(blocks) {
            return reply.body;
        }
        assert!(Instant::now() < deadline, "last answer: {}", reply.body);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_indexer_answers_overlap_queries_from_jetstream() {
    let nats = NatsServer::start().await;
    let base = standalone_indexer(&nats, &[]).await;
    let client = HttpClient::new();
    // Healthy once caught up with the (empty) stream.
    let deadline = Instant::now() + Duration::from_secs(10);
    while client.get(&format!("{base}/health")).await.status != 200 {
        assert!(Instant::now() < deadline, "never caught up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    let stream = StreamSettings::default().for_component("examples", "trtllm");
    let publisher = NatsPublisher::connect(
        connect(&nats.url()).await.unwrap(),
        stream,
        NatsPublishConfig::default(),
        PublisherConfig::new(WorkerId(7)),
    )
    .await
    .unwrap();
    // Worker 7 holds the 3 full blocks of tokens 0..14.
    let tokens: Vec<u32> = (0..14).collect();
    publisher
        .publish(DpRank(0), [stored(&tokens)])
        .await
        .unwrap();
    publisher.flush().await.unwrap();

    // Tokens in: the first two blocks match, the third differs.
    let query = json!({"token_ids": [0, 1, 2, 3, 4, 5, 6, 7, 99, 9, 10, 11]});
    let answer = query_until(&client, &base, &query, 2).await;
    assert_eq!(answer["query_blocks"], 3);
    assert_eq!(
        answer["workers"],
        json!([{"worker_id": 7, "dp_rank": 0, "overlap_blocks": 2, "cached_blocks": 3}])
    );

    // Block hashes in (Dynamo's tokens_hash values), chained by the indexer.
    let hasher = BlockHasher::new(4).unwrap();
    let blocks: Vec<u64> = hasher
        .block_hashes(&tokens, &NoMedia)
        .iter()
        .map(|b| b.get())
        .collect();
    query_until(&client, &base, &json!({"block_hashes": blocks}), 3).await;

    // An image in the first block: no overlap (the cached blocks were text only).
    let with_image = json!({"token_ids": tokens, "media": [{"start": 1, "len": 2, "id": 5}]});
    let reply = client.post(&format!("{base}/query"), &with_image).await;
    assert_eq!(reply.body["workers"], json!([]));

    // Bad input: a 400 with an OpenAI error body.
    let reply = client
        .post(
            &format!("{base}/query"),
            &json!({"token_ids": [1], "block_hashes": [2]}),
        )
        .await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.body["error"]["code"], "invalid_query");
    let stats = client.get(&format!("{base}/stats")).await.body;
    assert_eq!(stats["blocks"], 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn standalone_indexer_reads_a_dynamo_deployment() {
    let nats = NatsServer::start().await;
    let base = standalone_indexer(&nats, &["--wire", "dynamo", "--component", "backend"]).await;
    let client = HttpClient::new();
    let nats_client = connect(&nats.url()).await.unwrap();
    let event = RouterEvent::new(
        WorkerId(3),
        KvCacheEvent {
            event_id: 0,
            data: stored(&(0..8).collect::<Vec<u32>>()),
            dp_rank: DpRank(1),
        },
    );
    let subject = dynamo_event_subject("examples", "backend", Some("generate"));
    let query = json!({"token_ids": [0, 1, 2, 3, 4, 5, 6, 7]});
    // NATS core keeps no history: publish until the indexer, subscribed by now, has it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let envelope = encode_dynamo_envelope(3, 0, 0, std::slice::from_ref(&event));
        nats_client
            .publish(subject.clone(), envelope.into())
            .await
            .unwrap();
        nats_client.flush().await.unwrap();
        let reply = client.post(&format!("{base}/query"), &query).await;
        if reply.body["workers"][0]["overlap_blocks"] == json!(2) {
            assert_eq!(reply.body["workers"][0]["worker_id"], 3);
            assert_eq!(reply.body["workers"][0]["dp_rank"], 1);
            break;
        }
        assert!(Instant::now() < deadline, "last answer: {}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embed_router_sends_a_repeated_image_request_to_the_same_worker() {
    let nats = NatsServer::start().await;
    let workers = [mock_worker(&nats, 1).await, mock_worker(&nats, 2).await];
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let nats_url = nats.url();
    let (w1, w2) = (format!("1={}", workers[0]), format!("2={}", workers[1]));
    let args = embed_router::Args::parse_from([
        "embed_router",
        "--worker",
        &w1,
        "--worker",
        &w2,
        "--nats-url",
        &nats_url,
        "--namespace",
        "examples",
    ]);
    let router = embed_router::Router::start(args).await.unwrap();
    let index = router.index.clone();
    let (_stop, stopped) = stopper();
    tokio::spawn(router.serve(listener, stopped));
    for worker in &workers {
        let port = worker.rsplit(':').next().unwrap().parse().unwrap();
        wait_for_port(port).await;
    }

    let client = HttpClient::new();
    let chat = format!("{base}/v1/chat/completions");
    let request = image_chat_request("chelsea.png", "Describe this image.");
    let first = client.post(&chat, &request).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("x-kvroute-overlap-blocks"), "0");
    let prompt_tokens = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let blocks = prompt_tokens / u64::from(BLOCK_SIZE);
    eventually("the first request's blocks in the router's index", || {
        index.stats().blocks == blocks
    })
    .await;

    let second = client.post(&chat, &request).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.header("x-kvroute-worker"),
        first.header("x-kvroute-worker")
    );
    assert_eq!(
        second.header("x-kvroute-overlap-blocks"),
        blocks.to_string()
    );
    assert_eq!(
        second.body["usage"]["prompt_tokens_details"]["cached_tokens"],
        json!(blocks * u64::from(BLOCK_SIZE))
    );

    // The same prompt with another image shares no block with it (the image comes first).
    let other = client
        .post(
            &chat,
            &image_chat_request("coffee.png", "Describe this image."),
        )
        .await;
    assert_eq!(other.status, 200, "{:?}", other.body);
    assert_eq!(other.header("x-kvroute-overlap-blocks"), "0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_server_routes_with_its_own_policy_behind_its_own_middleware() {
    use kvroute_gateway::{EventsSource, ServerConfig};
    use kvroute_sim::{SimConfig, SimWorker};

    let mut config = ServerConfig::default();
    config.model.name = "m".into();
    config.model.block_size = BLOCK_SIZE;
    config.events.source = EventsSource::InProcess;
    config.nats.discovery = false;
    config.auth.routing_headers = true;
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = custom_server::builder(config, "secret")
        .listener(listener)
        .start()
        .await
        .unwrap();
    let bus = server.in_process_bus().unwrap();
    for id in 1..=2 {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let worker = SimWorker::new(
            SimConfig::new(WorkerId(id), "m", BLOCK_SIZE),
            server.preprocessor().clone(),
            bus.publisher(PublisherConfig::new(WorkerId(id))),
        )
        .unwrap();
        tokio::spawn(worker.serve(listener, std::future::pending()));
        server
            .registry()
            .upsert(kvroute_dispatch::Worker::new(WorkerId(id), url).unwrap());
    }
    let base = format!("http://{}", server.local_addr());
    let client = HttpClient::new();
    let request = image_chat_request("chelsea.png", "Describe this image.");

    let refused = client
        .post(&format!("{base}/v1/chat/completions"), &request)
        .await;
    assert_eq!(refused.status, 401, "{:?}", refused.body);
    assert_eq!(refused.body["error"]["code"], "invalid_api_key");
    assert_eq!(client.get(&format!("{base}/health")).await.status, 200);

    let chat = format!("{base}/v1/chat/completions");
    let authorized = |request: &Value| {
        client.post_with_headers(
            &chat,
            request.to_string(),
            &[("authorization", "Bearer secret")],
        )
    };
    let first = authorized(&request).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("x-routing-policy"), "cache-first");
    assert_eq!(first.header("x-request-number"), "1");
    let prompt_tokens = first.body["usage"]["prompt_tokens"].as_u64().unwrap();
    let blocks = prompt_tokens / u64::from(BLOCK_SIZE);
    eventually("the first request's blocks in the index", || {
        server.index().stats().blocks == blocks
    })
    .await;
    let second = authorized(&request).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(
        second.header("x-kvroute-worker"),
        first.header("x-kvroute-worker")
    );
    assert_eq!(
        second.header("x-kvroute-overlap-blocks"),
        blocks.to_string()
    );
    // The dry run lists the workers in the policy's order: the cache holder first.
    let table = client
        .post_with_headers(
            &format!("{base}/v1/route"),
            request.to_string(),
            &[("authorization", "Bearer secret")],
        )
        .await
        .body;
    assert_eq!(
        table["workers"][0]["overlap_blocks"],
        json!(blocks),
        "{table}"
    );
    assert_eq!(table["workers"][1]["overlap_blocks"], json!(0), "{table}");
    server.shutdown().await.unwrap();
}

/// The soak program, for a few seconds: every exchange gets the outcome a correct server
/// gives (docs/operations.md has a 10-minute run).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn soak_runs_a_few_seconds_of_mixed_traffic_without_an_unexpected_outcome() {
    let args = soak::Args::try_parse_from(["soak", "--duration", "3s", "--clients", "8"]).unwrap();
    let summary = soak::run(&args, None).await.unwrap();
    assert!(summary.requests >= 8, "{summary:?}");
    assert_eq!(summary.unexpected, 0, "{summary:?}");
    assert_eq!(summary.panics, 0, "{summary:?}");
    assert!(summary.healthy_after, "{summary:?}");
}
