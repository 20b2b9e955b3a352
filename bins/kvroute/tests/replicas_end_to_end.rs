//! Two `kvroute serve` replicas sharing their load (replica sync) over a 3-node NATS cluster
//! whose stream, registration bucket and snapshot store keep 3 replicas, with three
//! `kvroute worker-sim` workers, all separate processes. Traffic flows through both replicas
//! while the NATS node leading the registration bucket is SIGKILLed and restarted, then while
//! one replica is SIGKILLed. No request fails but those in flight on the killed replica, both
//! indexes (then the survivor's) hold exactly what the workers hold, and no registration is
//! lost.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_testsupport::{free_port, kvroute_command, NatsCluster, Processes, Router};
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WORKERS: u64 = 3;
/// Distinct prompts; each is sent again and again, so the workers' caches matter.
const PROMPTS: usize = 16;
/// Concurrent clients per replica.
const LANES: usize = 3;
const REGISTRATION_TTL_SECS: &str = "3";

fn kvroute() -> Command {
    kvroute_command(env!("CARGO_BIN_EXE_kvroute"))
}

/// Prompt `n`: its number opens the first block, so no two prompts share a block.
fn prompt(n: usize) -> Value {
    let text = format!(
        "{n} {}",
        "tell me about the weather in the mountains ".repeat(12)
    );
    json!({"model": "m", "max_tokens": 6, "messages": [{"role": "user", "content": text}]})
}

/// One request of the traffic.
struct Sent {
    replica: usize,
    prompt: usize,
    started: Instant,
    /// The worker that answered, or why the request failed.
    outcome: Result<u64, String>,
}

/// Requests sent so far, and the switches of the clients sending them.
#[derive(Default)]
struct Traffic {
    sent: Mutex<Vec<Sent>>,
    stop: AtomicBool,
    /// Replica 1 is gone: its clients send nothing more (as a load balancer would).
    second_dead: AtomicBool,
    /// Fewest workers either replica reported ready, in 1000ths (u64 for an atomic).
    min_ready: AtomicU64,
}

impl Traffic {
    /// Which workers served each prompt, leaving out the prompts of failed requests (they may
    /// or may not have reached a worker).
    fn served(&self) -> BTreeMap<usize, BTreeSet<u64>> {
        let sent = self.sent.lock().unwrap();
        let failed: BTreeSet<usize> = sent
            .iter()
            .filter(|s| s.outcome.is_err())
            .map(|s| s.prompt)
            .collect();
        let mut served: BTreeMap<usize, BTreeSet<u64>> = BTreeMap::new();
        for s in sent.iter().filter(|s| !failed.contains(&s.prompt)) {
            if let Ok(worker) = s.outcome {
                served.entry(s.prompt).or_default().insert(worker);
            }
        }
        served
    }

    fn count(&self) -> usize {
        self.sent.lock().unwrap().len()
    }
}

/// Sends requests through `router` (replica `replica`) until told to stop.
async fn client(traffic: Arc<Traffic>, router: Router, replica: usize, lane: usize) {
    let url = format!("{}/v1/chat/completions", router.base);
    for i in 0.. {
        if traffic.stop.load(Ordering::Relaxed)
            || (replica == 1 && traffic.second_dead.load(Ordering::Relaxed))
        {
            return;
        }
        let n = (lane * 5 + replica * 3 + i) % PROMPTS;
        let started = Instant::now();
        let outcome = match router.http.try_post(&url, &prompt(n)).await {
            Ok(reply) if reply.status == 200 => {
                Ok(reply.header("x-kvroute-worker").parse().unwrap())
            }
            Ok(reply) => Err(format!("{} {}", reply.status, reply.body)),
            Err(error) => Err(error),
        };
        traffic.sent.lock().unwrap().push(Sent {
            replica,
            prompt: n,
            started,
            outcome,
        });
    }
}

/// Polls both replicas' readiness, keeping the fewest available workers seen.
async fn watch_ready(traffic: Arc<Traffic>, routers: Vec<Router>) {
    while !traffic.stop.load(Ordering::Relaxed) {
        for (replica, router) in routers.iter().enumerate() {
            if replica == 1 && traffic.second_dead.load(Ordering::Relaxed) {
                continue;
            }
            let url = format!("{}/ready", router.base);
            if let Ok(ready) = router.http.try_get(&url).await {
                let workers = ready.body["available_workers"].as_u64().unwrap_or(0);
                traffic.min_ready.fetch_min(workers, Ordering::Relaxed);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Starts `LANES` clients per replica and the readiness watch.
fn start_traffic(
    traffic: &Arc<Traffic>,
    routers: &[Router],
) -> (
    Vec<tokio::task::JoinHandle<()>>,
    tokio::task::JoinHandle<()>,
) {
    let mut clients = Vec::new();
    for (replica, router) in routers.iter().enumerate() {
        for lane in 0..LANES {
            let client = client(traffic.clone(), router.clone(), replica, lane);
            clients.push(tokio::spawn(client));
        }
    }
    let ready_watch = tokio::spawn(watch_ready(traffic.clone(), routers.to_vec()));
    (clients, ready_watch)
}

/// Waits until `router`'s index holds exactly what the workers hold: every prompt served, in
/// full on each worker that served it and nowhere else.
async fn assert_index_matches(router: &Router, served: &BTreeMap<usize, BTreeSet<u64>>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut mismatch = None;
        for (&n, workers) in served {
            let table = router.route(&prompt(n)).await;
            let blocks = table["prompt_blocks"].as_u64().unwrap();
            let rows = table["workers"].as_array().unwrap();
            let held: BTreeMap<u64, u64> = rows
                .iter()
                .map(|row| {
                    (
                        row["worker"].as_u64().unwrap(),
                        row["overlap_blocks"].as_u64().unwrap(),
                    )
                })
                .collect();
            let expected: BTreeMap<u64, u64> = (1..=WORKERS)
                .map(|w| (w, if workers.contains(&w) { blocks } else { 0 }))
                .collect();
            if held != expected {
                mismatch = Some(format!("prompt {n}: index {held:?}, workers {expected:?}"));
                break;
            }
        }
        let Some(mismatch) = mismatch else {
            return;
        };
        assert!(
            Instant::now() < deadline,
            "{}: the index differs from the workers' caches: {mismatch}",
            router.base
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .find(|line| line.starts_with(name) && line[name.len()..].starts_with(' '))
        .and_then(|line| line[name.len()..].trim().parse().ok())
}

async fn metrics(router: &Router) -> String {
    router
        .get("/metrics")
        .await
        .body
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// Lets traffic flow until `more` further requests have been sent.
async fn traffic_for(traffic: &Traffic, more: usize, processes: &mut Processes) {
    let target = traffic.count() + more;
    let deadline = Instant::now() + Duration::from_secs(20);
    while traffic.count() < target {
        processes.check_alive();
        assert!(Instant::now() < deadline, "traffic stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_route_as_one_through_a_nats_node_and_a_replica_dying() {
    let started = Instant::now();
    let mut cluster = NatsCluster::start().await;
    let nats_url = cluster.url();
    let mut processes = Processes::new();
    let nats = |command: &mut Command| {
        command
            .args(["--nats-url", &nats_url, "--nats-replicas", "3"])
            .args(["--model", "m", "--block-size", "32"])
            .args(["--registration-ttl-secs", REGISTRATION_TTL_SECS]);
    };

    // The replicas first: they provision the stream and the bucket before listening.
    let mut routers = Vec::new();
    for replica in 0..2 {
        let port = free_port();
        let mut serve = kvroute();
        serve.arg("serve");
        nats(&mut serve);
        serve
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--replica-sync", "--replica-name", &format!("gw-{replica}")]);
        processes.spawn(&format!("serve-{replica}"), &mut serve);
        processes.wait_for_port(port, "kvroute serve").await;
        routers.push(Router::new(format!("http://127.0.0.1:{port}")));
    }
    let worker_ports: Vec<u16> = (0..WORKERS).map(|_| free_port()).collect();
    for (n, port) in worker_ports.iter().enumerate() {
        let mut worker = kvroute();
        worker
            .arg("worker-sim")
            .args(["--worker-id", &(n + 1).to_string()])
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--prefill-tokens-per-second", "1000000"])
            .args(["--decode-tokens-per-second", "300"]);
        nats(&mut worker);
        processes.spawn(&format!("worker-{}", n + 1), &mut worker);
    }
    for (n, port) in worker_ports.iter().enumerate() {
        processes
            .wait_for_port(*port, &format!("worker-sim {}", n + 1))
            .await;
    }
    for router in &routers {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let ready = router.get("/ready").await;
            if ready.status == 200 && ready.body["available_workers"] == WORKERS {
                break;
            }
            processes.check_alive();
            assert!(Instant::now() < deadline, "never ready: {:?}", ready.body);
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    eprintln!("{:?} up", started.elapsed());

    let traffic = Arc::new(Traffic {
        min_ready: AtomicU64::new(WORKERS),
        ..Traffic::default()
    });
    let (clients, ready_watch) = start_traffic(&traffic, &routers);
    traffic_for(&traffic, 100, &mut processes).await;

    // The node leading the registration bucket dies: the bucket elects another leader while
    // the workers' heartbeats fail; events and routing go on. Then it comes back.
    let leader = cluster.leader_of("KV_kvroute-workers").await;
    cluster.nodes[leader].kill().await;
    let killed = Instant::now();
    eprintln!("{:?} NATS node {leader} killed", started.elapsed());
    traffic_for(&traffic, 100, &mut processes).await;
    // Past the registration TTL, and past the bucket's new leader's election.
    while killed.elapsed() < Duration::from_secs(8) {
        traffic_for(&traffic, 10, &mut processes).await;
    }
    cluster.nodes[leader].restart().await;
    cluster.wait_for_jetstream().await;
    eprintln!("{:?} NATS node {leader} back", started.elapsed());
    traffic_for(&traffic, 100, &mut processes).await;

    // A pause: both indexes agree with what the workers hold.
    traffic.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    ready_watch.await.unwrap();
    let served = traffic.served();
    for router in &routers {
        assert_index_matches(router, &served).await;
    }
    eprintln!(
        "{:?} both indexes match the workers ({} prompts)",
        started.elapsed(),
        served.len()
    );

    // Traffic again, and replica 1 is SIGKILLed under it.
    traffic.stop.store(false, Ordering::Relaxed);
    let (clients, ready_watch) = start_traffic(&traffic, &routers);
    traffic_for(&traffic, 60, &mut processes).await;
    // Its clients start nothing more (as a load balancer would, once it notices); what they
    // have in flight, at most one request each, dies with it.
    traffic.second_dead.store(true, Ordering::Relaxed);
    let replica_killed = Instant::now();
    processes.kill("serve-1");
    eprintln!("{:?} replica 1 killed", started.elapsed());
    traffic_for(&traffic, 100, &mut processes).await;
    traffic.stop.store(true, Ordering::Relaxed);
    for client in clients {
        client.await.unwrap();
    }
    ready_watch.await.unwrap();

    // Only requests in flight on the killed replica failed.
    {
        let sent = traffic.sent.lock().unwrap();
        for s in sent.iter().filter(|s| s.outcome.is_err()) {
            assert!(
                s.replica == 1 && s.started < replica_killed,
                "a request failed on replica {} (prompt {}): {:?}",
                s.replica,
                s.prompt,
                s.outcome
            );
        }
        let failed = sent.iter().filter(|s| s.outcome.is_err()).count();
        assert!(failed <= LANES, "{failed} requests failed");
        eprintln!(
            "{} requests, {failed} failed (in flight on the killed replica)",
            sent.len()
        );
    }
    // Registration survived: every worker stayed available on both replicas throughout.
    assert_eq!(traffic.min_ready.load(Ordering::Relaxed), WORKERS);
    let survivor = &routers[0];
    let text = metrics(survivor).await;
    for change in ["expired", "deregistered"] {
        let name = format!("kvroute_membership_changes_total{{change=\"{change}\"}}");
        assert_eq!(metric(&text, &name), None, "{text}");
    }
    // The survivor's index still matches the workers.
    assert_index_matches(survivor, &traffic.served()).await;
    // And the dead replica's load stops counting once it expires.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric(&metrics(survivor).await, "kvroute_replicas") != Some(0.0) {
        assert!(Instant::now() < deadline, "the dead replica never expired");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("{:?} done", started.elapsed());
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "took {:?}",
        started.elapsed()
    );
}
