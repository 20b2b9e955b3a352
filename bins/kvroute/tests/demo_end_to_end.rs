//! The gateway in front of simulated workers (kvroute-sim) over real sockets, with the
//! in-process event bus: what `kvroute demo` runs.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use http_body_util::BodyExt;
use kvroute_dispatch::Worker;
use kvroute_events::{in_process_bus, PublisherConfig};
use kvroute_gateway::{EventsSource, Server, ServerConfig};
use kvroute_protocol::WorkerId;
use kvroute_sim::{SimConfig, SimWorker, WorkerModel};
use kvroute_testsupport::{assert_cut_stream, image_data_url, Router};
use serde_json::{json, Value};
use std::collections::HashSet;
use std::ops::Deref;
use std::time::Duration;
use tokio::net::TcpListener;

const BLOCK_SIZE: u32 = 32;

/// A server as `kvroute demo` runs it (built by `Server::builder`) with simulated workers.
struct Cluster {
    router: Router,
    server: Server,
    sims: Vec<SimWorker>,
}

impl Deref for Cluster {
    type Target = Router;

    fn deref(&self) -> &Router {
        &self.router
    }
}

async fn cluster(workers: u64, decode_tokens_per_second: f64) -> Cluster {
    cluster_with(workers, decode_tokens_per_second, false).await
}

/// `approximate`: the gateway reads no KV events and predicts caches from its own routing.
async fn cluster_with(workers: u64, decode_tokens_per_second: f64, approximate: bool) -> Cluster {
    let mut config = ServerConfig::default();
    config.model.name = "m".into();
    config.model.block_size = BLOCK_SIZE;
    config.breaker.failures = 1;
    config.breaker.cooldown_secs = 60;
    config.nats.discovery = false;
    config.auth.routing_headers = true;
    config.events.source = if approximate {
        EventsSource::None
    } else {
        EventsSource::InProcess
    };
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = Server::builder(config)
        .listener(listener)
        .start()
        .await
        .unwrap();
    // Without events the workers' publications go nowhere the router reads.
    let (unread, _source) = in_process_bus(1024);
    let bus = server.in_process_bus().cloned().unwrap_or(unread);
    let mut sims = Vec::new();
    for n in 1..=workers {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let config = SimConfig::new(WorkerId(n), "m", BLOCK_SIZE)
            .with_engine(WorkerModel::default().with_speeds(1e7, decode_tokens_per_second));
        let sim = SimWorker::new(
            config,
            server.preprocessor().clone(),
            bus.publisher(PublisherConfig::new(WorkerId(n))),
        )
        .unwrap();
        tokio::spawn(sim.clone().serve(listener, std::future::pending()));
        server
            .registry()
            .upsert(Worker::new(WorkerId(n), url).unwrap());
        sims.push(sim);
    }
    Cluster {
        router: Router::new(format!("http://{}", server.local_addr())),
        server,
        sims,
    }
}

fn image_request(image: &str, text: &str) -> Value {
    json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
        {"type": "text", "text": text}]}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_image_request_returns_to_its_worker_with_the_predicted_cache() {
    let cluster = cluster(3, 10_000.0).await;
    let request = image_request("chelsea.png", "What is in this image?");
    let repeat = cluster
        .assert_repeat_is_cache_hit(&request, u64::from(BLOCK_SIZE))
        .await;
    let blocks: u64 = repeat.header("x-kvroute-prompt-blocks").parse().unwrap();
    assert!(blocks >= 5);
    // Same text, another image: no phantom overlap anywhere.
    cluster
        .assert_cold(&image_request("coffee.png", "What is in this image?"))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_without_overlap_spread_across_workers() {
    let cluster = cluster(3, 10_000.0).await;
    let mut chosen = HashSet::new();
    for n in 0..24 {
        let body = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": format!("{n} unrelated question {n}")}]});
        let reply = cluster.chat(&body).await;
        assert_eq!(reply.status, 200);
        chosen.insert(reply.header("x-kvroute-worker"));
    }
    assert_eq!(chosen.len(), 3, "{chosen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_stream_gives_a_clean_error_and_is_avoided() {
    let cluster = cluster(3, 40.0).await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "stream please"}]});
    let (victim, body) = cluster.open_stream(&body).await;
    cluster.sims[(victim - 1) as usize].kill();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_cut_stream(&rest);

    // Later requests succeed on the others (retried before the first byte), and the dead
    // worker's circuit opens.
    cluster.assert_avoids(victim, 8).await;
    let ready = cluster.get("/ready").await.body;
    assert_eq!(ready["available_workers"], 2, "{ready}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_openai_errors() {
    let cluster = cluster(1, 10_000.0).await;
    for (body, status, param) in [
        (json!({"model": "m"}).to_string(), 400, Some("messages")),
        ("{not json".to_owned(), 400, None),
        (json!({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,aGVsbG8="}}]}]}).to_string(), 400, Some("messages[0].content[0]")),
        // Over the default 32 MiB body limit.
        ("x".repeat(33 << 20), 413, None),
    ] {
        let reply = cluster.post_bytes("/v1/chat/completions", body).await;
        assert_eq!(reply.status, status, "{:?}", reply.body);
        assert!(reply.body["error"]["message"].is_string(), "{:?}", reply.body);
        assert_eq!(reply.body["error"]["param"].as_str(), param);
    }
    let missing = cluster.post_bytes("/v1/nothing", "{}").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.body["error"]["code"], "not_found");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streaming_follows_the_openai_sse_format() {
    let cluster = cluster(2, 10_000.0).await;
    let body = json!({"model": "m", "stream": true, "max_tokens": 5, "stream_options": {"include_usage": true},
                      "messages": [{"role": "user", "content": "count"}]});
    let reply = cluster.chat(&body).await;
    assert_eq!(reply.status, 200);
    assert_eq!(reply.header("content-type"), "text/event-stream");
    let text = reply.body.as_str().unwrap().to_owned();
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(*events.last().unwrap(), "data: [DONE]");
    let chunks: Vec<Value> = events[..events.len() - 1]
        .iter()
        .map(|e| serde_json::from_str(e.strip_prefix("data: ").unwrap()).unwrap())
        .collect();
    let content: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(content, "tok ".repeat(5));
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_cancels_the_upstream_request() {
    let cluster = cluster(1, 5.0).await;
    // 50 tokens at 5 tokens/s: 10 s if nobody cancels.
    let body = json!({"model": "m", "stream": true, "max_tokens": 50, "messages": [{"role": "user", "content": "a long answer"}]});
    let (_, body) = cluster.open_stream(&body).await;
    let load = |cluster: &Cluster| {
        let status = &cluster.server.registry().status(std::time::Instant::now())[0];
        (status.active_requests, cluster.sims[0].running_requests())
    };
    assert_eq!(load(&cluster), (1, 1));

    drop(body); // the client goes away mid-stream
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while load(&cluster) != (0, 0) {
        assert!(
            std::time::Instant::now() < deadline,
            "still running (gateway, worker): {:?}",
            load(&cluster)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_kv_events_the_cache_is_predicted_from_routing() {
    let cluster = cluster_with(3, 1000.0, true).await;
    let request = image_request("chelsea.png", "What is in this image?");
    let first = cluster.chat(&request).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    assert_eq!(first.header("x-kvroute-overlap-blocks"), "0");
    let blocks = first.header("x-kvroute-prompt-blocks");
    // The second goes where the first went, predicted fully cached, and the worker agrees.
    let second = cluster.chat(&request).await;
    assert_eq!(
        second.header("x-kvroute-worker"),
        first.header("x-kvroute-worker")
    );
    assert_eq!(second.header("x-kvroute-overlap-blocks"), blocks);
    assert_eq!(
        second.body["usage"]["prompt_tokens_details"]["cached_tokens"].to_string(),
        second.header("x-kvroute-predicted-cached-tokens")
    );
    // Another image with the same text: no phantom overlap.
    let other = cluster
        .route(&image_request("coffee.png", "What is in this image?"))
        .await;
    for row in other["workers"].as_array().unwrap() {
        assert_eq!(row["overlap_blocks"], 0, "{other}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_changes_workers_and_routing_and_reports_the_rest() {
    let cluster = cluster(1, 10_000.0).await;
    let mut config = cluster.server.config();
    assert_eq!(cluster.server.policy().name(), "kv-aware");
    config.routing.policy = kvroute_gateway::PolicyName::RoundRobin;
    config
        .workers
        .push(kvroute_gateway::WorkerConfig::new(9, "http://127.0.0.1:1"));
    config.model.block_size = 16;
    let report = cluster.server.reload(config.clone()).unwrap();
    assert_eq!(report.applied, ["workers", "routing"]);
    assert_eq!(report.needs_restart, ["model"]);
    assert_eq!(cluster.server.policy().name(), "round-robin");
    assert_eq!(cluster.server.registry().len(), 2);
    // The running block size is still the started one.
    assert_eq!(cluster.server.config().model.block_size, BLOCK_SIZE);

    // A listed worker that disappears from the file leaves; simulated workers, which the file
    // never listed, stay.
    config.workers.clear();
    let report = cluster.server.reload(config.clone()).unwrap();
    assert_eq!(report.applied, ["workers"]);
    assert_eq!(cluster.server.registry().len(), 1);

    // An invalid configuration changes nothing.
    config.routing.prefill_weight = -1.0;
    assert!(cluster.server.reload(config).is_err());
    assert_eq!(cluster.server.policy().name(), "round-robin");
    let reply = cluster
        .chat(&json!({"model": "m", "messages": [{"role": "user", "content": "hi"}]}))
        .await;
    assert_eq!(reply.status, 200, "{:?}", reply.body);
}
