//! `kvroute serve` in front of two `kvroute worker-sim --event-wire vllm` processes, which
//! publish their KV events exactly as vLLM engines do (ZeroMQ PUB + replay ROUTER, msgpack
//! `KVEventBatch`es, their own block hashes): no NATS anywhere. A repeated image request
//! returns to its worker with the cache kvroute predicted; a lost PUB message is healed
//! through the replay socket; a worker killed and restarted is cleaned and rebuilt; a router
//! started with another block size than the engines' refuses their events.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_testsupport::{free_port, image_chat_request, kvroute_command, Processes, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::process::Command;
use std::time::{Duration, Instant};

const BLOCK_SIZE: u64 = 32;

fn kvroute() -> Command {
    kvroute_command(env!("CARGO_BIN_EXE_kvroute"))
}

/// A free port whose successor is free too (the replay socket's).
fn free_port_pair() -> u16 {
    loop {
        let port = free_port();
        if port < u16::MAX && std::net::TcpListener::bind(("127.0.0.1", port + 1)).is_ok() {
            return port;
        }
    }
}

/// A simulated vLLM worker; `lose` are the sequence numbers of the KV event batches the
/// network "drops" (sent only through replay).
fn worker(id: u64, http: u16, events: u16, lose: &str) -> Command {
    let mut command = kvroute();
    command
        .arg("worker-sim")
        .args(["--event-wire", "vllm", "--worker-id", &id.to_string()])
        .args(["--listen", &format!("127.0.0.1:{http}")])
        .args(["--kv-events-endpoint", &format!("tcp://127.0.0.1:{events}")])
        .args([
            "--kv-events-replay-endpoint",
            &format!("tcp://127.0.0.1:{}", events + 1),
        ])
        .args(["--model", "m", "--block-size", "32"])
        .args(["--prefill-tokens-per-second", "10000000"]);
    if !lose.is_empty() {
        command.args(["--lose-kv-batches", lose]);
    }
    command
}

/// The overlap (blocks) the router sees for `body` on each worker.
async fn overlaps(gateway: &Router, body: &Value) -> HashMap<u64, u64> {
    gateway.route(body).await["workers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| {
            (
                w["worker"].as_u64().unwrap(),
                w["overlap_blocks"].as_u64().unwrap(),
            )
        })
        .collect()
}

/// Waits until the router sees `blocks` blocks of `body` on `worker`.
async fn until_overlap_on(gateway: &Router, body: &Value, worker: u64, blocks: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let seen = overlaps(gateway, body).await;
        if seen.get(&worker) == Some(&blocks) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "worker {worker} never showed {blocks} blocks of {body}: {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// A counter's value on the gateway's /metrics (0 when absent).
async fn metric(gateway: &Router, name: &str) -> u64 {
    let metrics = gateway.get("/metrics").await.body;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until a counter on the gateway's /metrics reaches `at_least`.
async fn until_metric(gateway: &Router, name: &str, at_least: u64) {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let value = metric(gateway, name).await;
        if value >= at_least {
            return;
        }
        assert!(Instant::now() < deadline, "{name} stayed at {value}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// `kvroute serve` reading both workers' engine events, hashing with `block_size`.
fn serve(port: u16, block_size: u64, http_ports: [u16; 2], event_ports: [u16; 2]) -> Command {
    let mut serve = kvroute();
    serve
        .arg("serve")
        .args(["--model", "m"])
        .args(["--block-size", &block_size.to_string()])
        .args(["--breaker-cooldown-secs", "1", "--routing-headers"])
        .args(["--listen", &format!("127.0.0.1:{port}")]);
    for id in 1..=2u64 {
        let i = id as usize - 1;
        serve.args([
            "--worker",
            &format!("{id}=http://127.0.0.1:{}", http_ports[i]),
        ]);
        serve.args([
            "--worker-events",
            &format!("{id}=tcp://127.0.0.1:{}", event_ports[i]),
        ]);
    }
    serve
}

fn text(n: u64) -> Value {
    json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user",
        "content": format!("question {n}: {}", "how do caches work? ".repeat(12))}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_in_front_of_vllm_wire_workers() {
    let mut processes = Processes::new();
    let http_ports = [free_port(), free_port()];
    let event_ports = [free_port_pair(), free_port_pair()];
    // Each worker's second batch (seq 1) is lost on the way: only replay brings it.
    for id in 1..=2u64 {
        let i = id as usize - 1;
        processes.spawn(
            &format!("worker-{id}"),
            &mut worker(id, http_ports[i], event_ports[i], "1"),
        );
    }
    for (i, port) in http_ports.iter().enumerate() {
        processes
            .wait_for_port(*port, &format!("worker-sim {}", i + 1))
            .await;
    }
    let gateway_port = free_port();
    processes.spawn(
        "serve",
        &mut serve(gateway_port, BLOCK_SIZE, http_ports, event_ports),
    );
    // A second router, misconfigured with another block size than the engines'.
    let mismatched_port = free_port();
    processes.spawn(
        "serve-block-size-16",
        &mut serve(mismatched_port, 16, http_ports, event_ports),
    );
    processes.wait_for_port(gateway_port, "kvroute serve").await;
    processes
        .wait_for_port(mismatched_port, "kvroute serve --block-size 16")
        .await;
    let gateway = Router::new(format!("http://127.0.0.1:{gateway_port}"));

    // A repeated image request returns to its worker, with the cache kvroute predicted.
    let image = image_chat_request("chelsea.png", "What is in this image?");
    let first = gateway.chat(&image).await;
    assert_eq!(first.status, 200, "{:?}", first.body);
    let owner: u64 = first.header("x-kvroute-worker").parse().unwrap();
    let blocks: u64 = first.header("x-kvroute-prompt-blocks").parse().unwrap();
    assert!(blocks >= 5);
    until_overlap_on(&gateway, &image, owner, blocks).await;
    let second = gateway.chat(&image).await;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(second.header("x-kvroute-worker"), owner.to_string());
    let predicted: u64 = second
        .header("x-kvroute-predicted-cached-tokens")
        .parse()
        .unwrap();
    assert_eq!(predicted, blocks * BLOCK_SIZE);
    assert_eq!(
        second.body["usage"]["prompt_tokens_details"]["cached_tokens"],
        predicted
    );

    // Unrelated requests until each worker has published at least three batches: each one's
    // lost seq 1 must have been healed through its replay socket, so every request's blocks
    // are in the index on the worker that served it.
    let mut served: HashMap<u64, Vec<(Value, u64)>> = HashMap::new();
    served
        .entry(owner)
        .or_default()
        .push((image.clone(), blocks));
    let mut n = 0;
    while served.len() < 2 || served.values().any(|r| r.len() < 3) {
        assert!(n < 60, "requests never reached both workers: {served:?}");
        let body = text(n);
        n += 1;
        let reply = gateway.chat(&body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        let worker: u64 = reply.header("x-kvroute-worker").parse().unwrap();
        let blocks: u64 = reply.header("x-kvroute-prompt-blocks").parse().unwrap();
        served.entry(worker).or_default().push((body, blocks));
    }
    for (worker, requests) in &served {
        for (body, blocks) in requests {
            until_overlap_on(&gateway, body, *worker, *blocks).await;
        }
    }
    assert!(metric(&gateway, "kvroute_events_gaps_total").await >= 2);
    assert!(metric(&gateway, "kvroute_events_resyncs_completed_total").await >= 2);
    assert_eq!(
        metric(&gateway, "kvroute_events_gaps_unhealed_total").await,
        0
    );

    // The misconfigured router refused every worker's events rather than index wrong hashes.
    let mismatched = Router::new(format!("http://127.0.0.1:{mismatched_port}"));
    until_metric(
        &mismatched,
        "kvroute_events_engine_block_size_refused_total",
        1,
    )
    .await;
    let image16 = overlaps(&mismatched, &image).await;
    assert!(image16.values().all(|&blocks| blocks == 0), "{image16:?}");

    // The image's worker is killed and restarted on the same ports: once it publishes again,
    // its old entries are gone and its new ones are indexed.
    processes.kill(&format!("worker-{owner}"));
    let i = owner as usize - 1;
    processes.spawn(
        &format!("worker-{owner}-restarted"),
        &mut worker(owner, http_ports[i], event_ports[i], ""),
    );
    processes
        .wait_for_port(http_ports[i], "the restarted worker-sim")
        .await;
    let mut fresh = None;
    for m in 100..160 {
        let body = text(m);
        let reply = gateway.chat(&body).await;
        if reply.status == 200 && reply.header("x-kvroute-worker") == owner.to_string() {
            let blocks: u64 = reply.header("x-kvroute-prompt-blocks").parse().unwrap();
            fresh = Some((body, blocks));
            break;
        }
    }
    let (body, fresh_blocks) = fresh.expect("no request reached the restarted worker");
    until_overlap_on(&gateway, &body, owner, fresh_blocks).await;
    assert_eq!(overlaps(&gateway, &image).await.get(&owner), Some(&0));
    assert!(metric(&gateway, "kvroute_events_incarnation_changes_total").await >= 1);
}

/// `kvroute demo --engine vllm`: the same path in one process (workers on loopback
/// ZeroMQ sockets, the engine source reading them).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn demo_over_the_vllm_wire() {
    let mut processes = Processes::new();
    let port = free_port();
    processes.spawn(
        "demo",
        kvroute()
            .args([
                "demo",
                "--engine",
                "vllm",
                "--model",
                "m",
                "--block-size",
                "32",
            ])
            .args(["--listen", &format!("127.0.0.1:{port}")]),
    );
    processes.wait_for_port(port, "kvroute demo").await;
    let gateway = Router::new(format!("http://127.0.0.1:{port}"));
    let image = image_chat_request("chelsea.png", "What is in this image?");
    gateway.assert_repeat_is_cache_hit(&image, BLOCK_SIZE).await;
    assert!(metric(&gateway, "kvroute_events_applied_total").await >= 1);
}
