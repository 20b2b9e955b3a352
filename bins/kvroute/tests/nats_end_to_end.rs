//! `kvroute serve` and three `kvroute worker-sim` processes over a real `nats-server -js` of the
//! test's own (free port, temporary store): the flows of demo_end_to_end.rs,
//! with KV events travelling through JetStream between processes.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use http_body_util::BodyExt;
use kvroute_testsupport::{
    assert_cut_stream, free_port, image_chat_request as image_request, kvroute_command,
    nats_server_binary, Processes, Router,
};
use serde_json::json;
use std::collections::HashSet;
use std::process::Command;
use std::time::{Duration, Instant};

const BLOCK_SIZE: u64 = 32;
const WORKERS: u64 = 3;
const REGISTRATION_TTL_SECS: &str = "2";

fn kvroute() -> Command {
    kvroute_command(env!("CARGO_BIN_EXE_kvroute"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serve_and_worker_sims_over_nats() {
    let Some(nats_server) = nats_server_binary() else {
        eprintln!(
            "SKIPPED: nats-server is not installed (scripts/test installs it; or set KVROUTE_NATS_SERVER)"
        );
        return;
    };
    let started = Instant::now();
    let mut processes = Processes::new();

    let nats_port = free_port();
    let store = processes.dir().join("jetstream");
    processes.spawn(
        "nats-server",
        Command::new(&nats_server)
            .args(["-js", "-a", "127.0.0.1", "-p"])
            .arg(nats_port.to_string())
            .arg("-sd")
            .arg(&store),
    );
    processes.wait_for_port(nats_port, "nats-server").await;
    let nats_url = format!("nats://127.0.0.1:{nats_port}");

    // The gateway first: it provisions the stream before listening, so the workers starting
    // together afterwards find it.
    let worker_ports: Vec<u16> = (0..WORKERS).map(|_| free_port()).collect();
    let gateway_port = free_port();
    let mut serve = kvroute();
    serve
        .arg("serve")
        .args([
            "--nats-url",
            &nats_url,
            "--model",
            "m",
            "--block-size",
            "32",
        ])
        .args(["--listen", &format!("127.0.0.1:{gateway_port}")])
        .arg("--routing-headers")
        .args(["--breaker-failures", "1", "--breaker-cooldown-secs", "60"])
        .args(["--registration-ttl-secs", REGISTRATION_TTL_SECS]);
    // Worker 1 is listed; the others are found through their registrations.
    serve.args([
        "--worker",
        &format!("1=http://127.0.0.1:{}", worker_ports[0]),
    ]);
    processes.spawn("serve", &mut serve);
    processes.wait_for_port(gateway_port, "kvroute serve").await;

    for (n, port) in worker_ports.iter().enumerate() {
        processes.spawn(
            &format!("worker-{}", n + 1),
            kvroute()
                .arg("worker-sim")
                .args(["--worker-id", &(n + 1).to_string()])
                .args(["--listen", &format!("127.0.0.1:{port}")])
                .args([
                    "--nats-url",
                    &nats_url,
                    "--model",
                    "m",
                    "--block-size",
                    "32",
                ])
                .args(["--prefill-tokens-per-second", "10000000"])
                .args(["--decode-tokens-per-second", "40"])
                .args(["--registration-ttl-secs", REGISTRATION_TTL_SECS]),
        );
    }
    for (n, port) in worker_ports.iter().enumerate() {
        processes
            .wait_for_port(*port, &format!("worker-sim {}", n + 1))
            .await;
    }

    let gateway = Router::new(format!("http://127.0.0.1:{gateway_port}"));
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // Ready as soon as one worker is; the workers register one by one.
        let ready = gateway.get("/ready").await;
        if ready.status == 200 && ready.body["available_workers"] == WORKERS {
            break;
        }
        processes.check_alive();
        assert!(
            Instant::now() < deadline,
            "never ready with {WORKERS} workers: {:?}",
            ready.body
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A repeated image request returns to its worker, with the predicted cache.
    let request = image_request("chelsea.png", "What is in this image?");
    let repeat = gateway
        .assert_repeat_is_cache_hit(&request, BLOCK_SIZE)
        .await;
    let blocks: u64 = repeat.header("x-kvroute-prompt-blocks").parse().unwrap();
    assert!(blocks >= 5);
    // Same text, another image: no phantom overlap anywhere.
    let other = image_request("coffee.png", "What is in this image?");
    gateway.until_workers(&other, WORKERS).await;
    gateway.assert_cold(&other).await;

    // Requests without overlap spread across workers.
    let mut chosen = HashSet::new();
    for n in 0..24 {
        let body = json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": format!("{n} unrelated question {n}")}]});
        let reply = gateway.chat(&body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        chosen.insert(reply.header("x-kvroute-worker"));
    }
    assert_eq!(chosen.len() as u64, WORKERS, "{chosen:?}");

    // A worker process SIGKILLed mid-stream: a clean SSE error for that client, and later
    // requests avoid it.
    let body = json!({"model": "m", "stream": true, "max_tokens": 40, "messages": [{"role": "user", "content": "stream please"}]});
    let (victim, stream) = gateway.open_stream(&body).await;
    let victim_process = processes.child(&format!("worker-{victim}"));
    victim_process.kill().unwrap(); // SIGKILL
    victim_process.wait().unwrap();
    let rest = stream.collect().await.unwrap().to_bytes();
    assert_cut_stream(&rest);
    gateway.assert_avoids(victim, 8).await;
    let ready = gateway.get("/ready").await;
    assert_eq!(
        ready.body["available_workers"],
        WORKERS - 1,
        "{:?}",
        ready.body
    );

    // Its registration expires: it leaves the routing table. A worker stopped cleanly
    // deregisters and leaves at once.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let metrics = gateway.get("/metrics").await.body;
        let metrics = metrics.as_str().unwrap_or_default();
        if metrics.contains("kvroute_membership_changes_total{change=\"expired\"} 1") {
            break;
        }
        assert!(Instant::now() < deadline, "no expiry: {metrics}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let probe = json!({"model": "m", "messages": [{"role": "user", "content": "who is there?"}]});
    let leaver = (1..=WORKERS).find(|&n| n != victim && n != 1).unwrap();
    let leaver_process = processes.child(&format!("worker-{leaver}"));
    let term = Command::new("kill")
        .args(["-TERM", &leaver_process.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    gateway.until_workers(&probe, WORKERS - 2).await;

    // The ingestion counters made it to /metrics.
    let metrics = gateway.get("/metrics").await;
    let metrics = metrics.body.as_str().unwrap_or_default().to_owned();
    assert!(
        metrics.contains("kvroute_events_applied_total"),
        "{metrics}"
    );
    // The repeated image request's prediction was checked against what its worker reported.
    assert!(
        metrics.contains("kvroute_cache_prediction_checks_total{outcome=\"exact\"}"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("kvroute_cache_prediction_checks_total{outcome=\"over\"}"),
        "{metrics}"
    );

    // SIGTERM: the gateway drains and exits cleanly (writing its final snapshot).
    let serve = processes.child("serve");
    let term = Command::new("kill")
        .args(["-TERM", &serve.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = serve.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "serve did not stop on SIGTERM");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(status.success(), "serve exited with {status}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
