//! A bounded soak test of `kvroute serve`: the real server (kvroute-gateway's
//! [`Server::builder`], API keys and tight connection limits configured) with simulated
//! workers, all in this process on loopback, under a mix of valid, malformed and slow traffic
//! for a fixed time. It samples the process's resident set every second and counts every
//! outcome; anything but the expected status of each kind of request, and any panic, is an
//! error. docs/operations.md has the figures of a 10-minute run.
//!
//! ```sh
//! cargo run --release -p kvroute-examples --example soak -- --duration 10m
//! ```
//!
//! The resident set is the whole process's: the server, its workers and the clients (the
//! clients hold little: a request at a time each).

use base64::Engine as _;
use clap::Parser;
use kvroute_dispatch::Worker;
use kvroute_events::PublisherConfig;
use kvroute_gateway::{ApiKeyConfig, EventsSource, MetricsRender, Server, ServerConfig};
use kvroute_protocol::WorkerId;
use kvroute_sim::{SimConfig, SimWorker};
use std::collections::BTreeMap;
use std::error::Error;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// Runs the server under mixed traffic for a while and reports memory and outcomes.
#[derive(Parser, Debug, Clone)]
pub struct Args {
    /// How long clients send traffic: seconds, or a number with an `s`, `m` or `h` suffix.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub duration: Duration,
    /// Clients sending at once, each one request at a time through the traffic mix.
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// Simulated workers.
    #[arg(long, default_value_t = 2)]
    pub workers: u64,
    /// Fail if the resident set ever exceeds this many MiB (0: report only).
    #[arg(long, default_value_t = 0)]
    pub max_rss_mib: u64,
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(at) => text.split_at(at),
        None => (text, "s"),
    };
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration like 90, 90s, 10m or 1h"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number * 60,
        "h" => number * 3600,
        _ => return Err(format!("{text:?}: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

const MODEL: &str = "soak-model";
const BLOCK_SIZE: u32 = 16;
const TENANT_KEYS: [&str; 2] = ["soak-key-tenant-a", "soak-key-tenant-b"];
const ADMIN_KEY: &str = "soak-key-admin";
const MAX_BODY_BYTES: usize = 2 << 20;
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
const BODY_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a client waits for any one exchange; the slowest expected one (a slow body
/// refused at the body timeout) takes a few seconds.
const EXCHANGE_LIMIT: Duration = Duration::from_secs(30);
/// Pause between the bytes of a slow client: well inside the timeouts, so only the total
/// time limit can end the exchange.
const DRIP: Duration = Duration::from_millis(400);

const PARAGRAPH: &str = include_str!("../tests/fixtures/text/paragraph_en.txt");
const IMAGES: [(&str, &[u8]); 3] = [
    (
        "image/png",
        include_bytes!("../tests/fixtures/images/coffee_tiny_40x30.png"),
    ),
    (
        "image/png",
        include_bytes!("../tests/fixtures/images/astronaut_tie_126x70.png"),
    ),
    (
        "image/png",
        include_bytes!("../tests/fixtures/images/hubble_strip_1000x10.png"),
    ),
];
const TRUNCATED_JPEG: &[u8] =
    include_bytes!("../tests/fixtures/images/rocket_truncated_header.jpg");

/// What a client sends; each kind has the outcomes a correct server gives it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    Chat,
    Stream,
    Image,
    Completion,
    Health,
    AdminMetrics,
    AdminRoute,
    BadJson,
    BadImage,
    NoKey,
    WrongKey,
    NonAdminMetrics,
    UnknownModel,
    WrongContentType,
    Oversized,
    SlowHeaders,
    SlowBody,
    Idle,
}

/// The order each client goes through (valid requests weighted up); clients start at
/// different places.
const MIX: [Kind; 24] = [
    Kind::Chat,
    Kind::Stream,
    Kind::Image,
    Kind::BadJson,
    Kind::Completion,
    Kind::Chat,
    Kind::SlowHeaders,
    Kind::Stream,
    Kind::NoKey,
    Kind::Health,
    Kind::BadImage,
    Kind::Chat,
    Kind::WrongKey,
    Kind::Image,
    Kind::SlowBody,
    Kind::UnknownModel,
    Kind::Stream,
    Kind::AdminMetrics,
    Kind::WrongContentType,
    Kind::Oversized,
    Kind::Completion,
    Kind::NonAdminMetrics,
    Kind::AdminRoute,
    Kind::Idle,
];

/// How an exchange ended.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Outcome {
    /// A response with this status; `complete` is false for a stream cut before `[DONE]`.
    Status { code: u16, complete: bool },
    /// The server closed the connection without a response.
    Closed,
    /// The client gave up waiting ([`EXCHANGE_LIMIT`]).
    ClientTimeout,
    /// The connection could not be made or broke before any response.
    Io(String),
}

impl Outcome {
    fn label(&self) -> String {
        match self {
            Self::Status {
                code,
                complete: true,
            } => code.to_string(),
            Self::Status {
                code,
                complete: false,
            } => format!("{code} cut"),
            Self::Closed => "closed".into(),
            Self::ClientTimeout => "client timeout".into(),
            Self::Io(error) => format!("io: {error}"),
        }
    }

    fn status(&self) -> Option<u16> {
        match self {
            Self::Status {
                code,
                complete: true,
            } => Some(*code),
            _ => None,
        }
    }
}

impl Kind {
    fn expected(self, outcome: &Outcome) -> bool {
        let status = outcome.status();
        match self {
            Self::Chat
            | Self::Stream
            | Self::Image
            | Self::Completion
            | Self::Health
            | Self::AdminMetrics
            | Self::AdminRoute => status == Some(200),
            Self::BadJson | Self::BadImage => status == Some(400),
            Self::NoKey | Self::WrongKey => status == Some(401),
            Self::NonAdminMetrics => status == Some(403),
            Self::UnknownModel => status == Some(404),
            Self::WrongContentType => status == Some(415),
            // The body is read and discarded up to four times the limit, then refused.
            Self::Oversized => status == Some(413),
            // Headers never complete: the connection is closed at the header timeout.
            Self::SlowHeaders | Self::Idle => {
                matches!(outcome, Outcome::Closed) || status == Some(408)
            }
            Self::SlowBody => status == Some(408),
        }
    }
}

/// A request's bytes and how they are sent.
struct Exchange {
    head: String,
    body: Vec<u8>,
    pace: Pace,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Pace {
    /// All at once.
    Normal,
    /// The request line, then one header line per [`DRIP`], never finishing.
    SlowHeaders,
    /// The whole head, then one body byte per [`DRIP`].
    SlowBody,
    /// Nothing at all.
    Idle,
}

fn post(path: &str, key: Option<&str>, content_type: &str, body: Vec<u8>, pace: Pace) -> Exchange {
    let auth = key.map_or(String::new(), |key| {
        format!("authorization: Bearer {key}\r\n")
    });
    let head = format!(
        "POST {path} HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n{auth}content-type: {content_type}\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    Exchange { head, body, pace }
}

fn get(path: &str, key: Option<&str>) -> Exchange {
    let auth = key.map_or(String::new(), |key| {
        format!("authorization: Bearer {key}\r\n")
    });
    Exchange {
        head: format!("GET {path} HTTP/1.1\r\nhost: soak\r\nconnection: close\r\n{auth}\r\n"),
        body: Vec::new(),
        pace: Pace::Normal,
    }
}

fn data_url(mime: &str, bytes: &[u8]) -> String {
    let encoded = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{encoded}")
}

/// A chat body: one of 64 conversations (shared prefixes that get cached) with a question of
/// its own (so the index and the workers' caches keep growing and evicting).
fn chat_body(n: u64, stream: bool, image: Option<String>) -> Vec<u8> {
    let text = format!("Conversation {}. {PARAGRAPH} Question {n}?", n % 64);
    let content = match image {
        Some(url) => serde_json::json!([
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]),
        None => serde_json::json!(text),
    };
    serde_json::json!({
        "model": MODEL,
        "stream": stream,
        "max_tokens": 8,
        "messages": [{"role": "user", "content": content}],
    })
    .to_string()
    .into_bytes()
}

fn exchange_for(kind: Kind, n: u64) -> Exchange {
    let key = Some(TENANT_KEYS[(n % 2) as usize]);
    let json = "application/json";
    let chat = "/v1/chat/completions";
    match kind {
        Kind::Chat => post(chat, key, json, chat_body(n, false, None), Pace::Normal),
        Kind::Stream => post(chat, key, json, chat_body(n, true, None), Pace::Normal),
        Kind::Image => {
            let (mime, bytes) = IMAGES[(n % IMAGES.len() as u64) as usize];
            let body = chat_body(n, false, Some(data_url(mime, bytes)));
            post(chat, key, json, body, Pace::Normal)
        }
        Kind::Completion => {
            let body = serde_json::json!({"model": MODEL, "prompt": format!("{PARAGRAPH} {n}"), "max_tokens": 8});
            post(
                "/v1/completions",
                key,
                json,
                body.to_string().into_bytes(),
                Pace::Normal,
            )
        }
        Kind::Health if n.is_multiple_of(2) => get("/health", None),
        Kind::Health => get("/ready", None),
        Kind::AdminMetrics => get("/metrics", Some(ADMIN_KEY)),
        Kind::AdminRoute => post(
            "/v1/route",
            Some(ADMIN_KEY),
            json,
            chat_body(n, false, None),
            Pace::Normal,
        ),
        Kind::BadJson => {
            let mut body = chat_body(n, false, None);
            body.truncate(body.len() / 2);
            post(chat, key, json, body, Pace::Normal)
        }
        Kind::BadImage => {
            // A JPEG cut inside its header, then bytes that are no image at all.
            let url = if n.is_multiple_of(2) {
                data_url("image/jpeg", TRUNCATED_JPEG)
            } else {
                data_url("image/png", b"not an image at all")
            };
            post(
                chat,
                key,
                json,
                chat_body(n, false, Some(url)),
                Pace::Normal,
            )
        }
        Kind::NoKey => post(chat, None, json, chat_body(n, false, None), Pace::Normal),
        Kind::WrongKey => post(
            chat,
            Some("soak-key-wrong"),
            json,
            chat_body(n, false, None),
            Pace::Normal,
        ),
        Kind::NonAdminMetrics => get("/metrics", key),
        Kind::UnknownModel => {
            let body = serde_json::json!({"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]});
            post(chat, key, json, body.to_string().into_bytes(), Pace::Normal)
        }
        Kind::WrongContentType => post(
            chat,
            key,
            "text/plain",
            chat_body(n, false, None),
            Pace::Normal,
        ),
        Kind::Oversized => post(
            chat,
            key,
            json,
            vec![b' '; MAX_BODY_BYTES + (1 << 20)],
            Pace::Normal,
        ),
        Kind::SlowHeaders => Exchange {
            head: format!("POST {chat} HTTP/1.1\r\nhost: soak\r\n"),
            body: Vec::new(),
            pace: Pace::SlowHeaders,
        },
        Kind::SlowBody => post(chat, key, json, chat_body(n, false, None), Pace::SlowBody),
        Kind::Idle => Exchange {
            head: String::new(),
            body: Vec::new(),
            pace: Pace::Idle,
        },
    }
}

/// Sends `exchange` on a new connection and reads the response to the end (every request
/// says `connection: close`).
async fn run_exchange(addr: SocketAddr, exchange: Exchange, stream_expected: bool) -> Outcome {
    let stream = match TcpStream::connect(addr).await {
        Ok(stream) => stream,
        Err(error) => return Outcome::Io(error.kind().to_string()),
    };
    let (mut reader, mut writer) = stream.into_split();
    let write = async move {
        match exchange.pace {
            Pace::Normal => {
                let _ = writer.write_all(exchange.head.as_bytes()).await;
                let _ = writer.write_all(&exchange.body).await;
            }
            Pace::SlowHeaders => {
                if writer.write_all(exchange.head.as_bytes()).await.is_err() {
                    return;
                }
                for line in 0u64.. {
                    tokio::time::sleep(DRIP).await;
                    let header = format!("x-slow-{line}: soak\r\n");
                    if writer.write_all(header.as_bytes()).await.is_err() {
                        return;
                    }
                }
            }
            Pace::SlowBody => {
                if writer.write_all(exchange.head.as_bytes()).await.is_err() {
                    return;
                }
                for byte in &exchange.body {
                    tokio::time::sleep(DRIP).await;
                    if writer.write_all(&[*byte]).await.is_err() {
                        return;
                    }
                }
            }
            Pace::Idle => std::future::pending().await,
        }
        // The writer half stays open: some clients keep a connection open after a request.
        std::future::pending::<()>().await;
    };
    let read = async move {
        let mut response = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        let broken = loop {
            match reader.read(&mut chunk).await {
                Ok(0) => break None,
                Ok(n) => response.extend_from_slice(&chunk[..n]),
                Err(error) => break Some(error.kind().to_string()),
            }
        };
        parse_response(&response, broken, stream_expected)
    };
    let exchanged = async {
        tokio::select! {
            outcome = read => outcome,
            () = write => Outcome::Io("writer ended".into()),
        }
    };
    tokio::time::timeout(EXCHANGE_LIMIT, exchanged)
        .await
        .unwrap_or(Outcome::ClientTimeout)
}

fn parse_response(response: &[u8], broken: Option<String>, stream_expected: bool) -> Outcome {
    let code = response
        .strip_prefix(b"HTTP/1.1 ")
        .and_then(|rest| rest.get(..3))
        .and_then(|code| std::str::from_utf8(code).ok())
        .and_then(|code| code.parse().ok());
    match (code, broken) {
        (Some(code), _) => {
            let complete = !stream_expected
                || code != 200
                || memchr::memmem::find(response, b"data: [DONE]").is_some();
            Outcome::Status { code, complete }
        }
        (None, None) => Outcome::Closed,
        (None, Some(error)) if response.is_empty() && error.contains("reset") => Outcome::Closed,
        (None, Some(error)) => Outcome::Io(error),
    }
}

/// Outcomes per kind, and the first few unexpected ones in full.
#[derive(Default)]
struct Tally {
    by_kind: BTreeMap<Kind, BTreeMap<String, u64>>,
    unexpected: u64,
    examples: Vec<String>,
}

/// What a soak run saw.
#[derive(Debug)]
pub struct Summary {
    /// Requests (exchanges) made.
    pub requests: u64,
    /// Outcomes that were not what a correct server gives.
    pub unexpected: u64,
    /// Panics anywhere in the process (server, workers or clients).
    pub panics: u64,
    /// Resident set samples, MiB, one a second.
    pub rss_mib: Vec<f64>,
    /// The tokenizer's segment cache (bounded, 64 MiB of text and ids by default) at each
    /// sample, MiB: it fills with every new message, so it accounts for part of the growth.
    pub segment_cache_mib: Vec<f64>,
    /// Blocks in the router's index at each sample.
    pub index_blocks: Vec<u64>,
    /// The health check after the traffic stopped answered 200.
    pub healthy_after: bool,
}

impl Summary {
    /// No unexpected outcome, no panic, healthy at the end, and within `max_rss_mib` (0: any).
    pub fn passed(&self, max_rss_mib: u64) -> bool {
        let peak = self.rss_mib.iter().copied().fold(0.0, f64::max);
        self.unexpected == 0
            && self.panics == 0
            && self.healthy_after
            && (max_rss_mib == 0 || peak <= max_rss_mib as f64)
    }
}

/// The resident set of this process in MiB (Linux; `None` elsewhere).
fn rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|line| line.starts_with("VmRSS:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

fn server_config() -> ServerConfig {
    let mut config = ServerConfig::default();
    config.model.name = MODEL.into();
    config.model.block_size = BLOCK_SIZE;
    config.events.source = EventsSource::InProcess;
    config.nats.discovery = false;
    config.drain_timeout_secs = 5;
    config.limits.max_body_bytes = MAX_BODY_BYTES;
    config.limits.header_read_timeout_secs = HEADER_TIMEOUT.as_secs();
    config.limits.body_read_timeout_secs = BODY_TIMEOUT.as_secs();
    config.limits.idle_timeout_secs = 5;
    let mut keys: Vec<ApiKeyConfig> = TENANT_KEYS
        .iter()
        .zip(["tenant-a", "tenant-b"])
        .map(|(key, tenant)| ApiKeyConfig::new(*key).with_tenant(tenant))
        .collect();
    keys.push(ApiKeyConfig::new(ADMIN_KEY).admin());
    config.auth.keys = keys;
    config
}

/// Runs the soak and prints its summary; `metrics` renders the process's metrics as
/// `kvroute serve` does (the summary lists the server's refusal counters from it).
pub async fn run(args: &Args, metrics: Option<MetricsRender>) -> Result<Summary, Box<dyn Error>> {
    let panics = Arc::new(AtomicU64::new(0));
    let counted = Arc::clone(&panics);
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        counted.fetch_add(1, Ordering::Relaxed);
        previous(info);
    }));

    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut builder = Server::builder(server_config()).listener(listener);
    if let Some(render) = metrics.clone() {
        builder = builder.metrics(render);
    }
    let server = builder.start().await?;
    let bus = server
        .in_process_bus()
        .ok_or("the server has no in-process bus")?;
    let mut sims = Vec::new();
    for id in 1..=args.workers {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let worker = SimWorker::new(
            SimConfig::new(WorkerId(id), MODEL, BLOCK_SIZE),
            Arc::clone(server.preprocessor()),
            bus.publisher(PublisherConfig::new(WorkerId(id))),
        )?;
        sims.push(worker.clone());
        tokio::spawn(worker.serve(listener, std::future::pending()));
        server.registry().upsert(Worker::new(WorkerId(id), url)?);
    }
    let addr = server.local_addr();
    println!(
        "soak: {:?} of traffic from {} clients to {addr} ({} simulated workers)",
        args.duration, args.clients, args.workers
    );

    let started = Instant::now();
    let deadline = started + args.duration;
    let samples = Arc::new(Mutex::new(Vec::new()));
    let sampler = {
        let samples = Arc::clone(&samples);
        let (preprocessor, index) = (Arc::clone(server.preprocessor()), server.index().clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Some(mib) = rss_mib() {
                    let cache = preprocessor.cache_stats().bytes as f64 / f64::from(1 << 20);
                    let blocks = index.stats().blocks;
                    let mut samples = samples.lock().unwrap_or_else(|e| e.into_inner());
                    samples.push((mib, cache, blocks));
                }
            }
        })
    };

    let tally = Arc::new(Mutex::new(Tally::default()));
    let requests = Arc::new(AtomicU64::new(0));
    let mut clients = Vec::new();
    for client in 0..args.clients {
        let (tally, requests) = (Arc::clone(&tally), Arc::clone(&requests));
        clients.push(tokio::spawn(async move {
            let mut step = client * 7;
            while Instant::now() < deadline {
                let kind = MIX[step % MIX.len()];
                step += 1;
                let n = requests.fetch_add(1, Ordering::Relaxed);
                let outcome = run_exchange(addr, exchange_for(kind, n), kind == Kind::Stream).await;
                let mut tally = tally.lock().unwrap_or_else(|e| e.into_inner());
                *tally
                    .by_kind
                    .entry(kind)
                    .or_default()
                    .entry(outcome.label())
                    .or_default() += 1;
                if !kind.expected(&outcome) {
                    tally.unexpected += 1;
                    if tally.examples.len() < 10 {
                        let at = started.elapsed().as_secs_f64();
                        tally
                            .examples
                            .push(format!("{at:.1} s: {kind:?} -> {}", outcome.label()));
                    }
                }
            }
        }));
    }
    for client in clients {
        client.await?;
    }
    let elapsed = started.elapsed();
    let health = run_exchange(addr, get("/health", None), false).await;
    sampler.abort();
    server.shutdown().await?;
    for sim in &sims {
        sim.kill();
    }

    let samples = samples.lock().unwrap_or_else(|e| e.into_inner()).clone();
    let tally = std::mem::take(&mut *tally.lock().unwrap_or_else(|e| e.into_inner()));
    let summary = Summary {
        requests: requests.load(Ordering::Relaxed),
        unexpected: tally.unexpected,
        panics: panics.load(Ordering::Relaxed),
        rss_mib: samples.iter().map(|s| s.0).collect(),
        segment_cache_mib: samples.iter().map(|s| s.1).collect(),
        index_blocks: samples.iter().map(|s| s.2).collect(),
        healthy_after: health.status() == Some(200),
    };
    print_summary(&summary, &tally, elapsed);
    if let Some(render) = metrics {
        println!("the server's own counts:");
        for line in render().lines().filter(|line| {
            line.starts_with("kvroute_request_errors_total")
                || line.starts_with("kvroute_requests_total")
        }) {
            println!("  {line}");
        }
    }
    Ok(summary)
}

fn print_summary(summary: &Summary, tally: &Tally, elapsed: Duration) {
    let seconds = elapsed.as_secs_f64();
    println!(
        "\n{} requests in {seconds:.0} s ({:.1}/s)",
        summary.requests,
        summary.requests as f64 / seconds
    );
    println!("{:<18} {:>8}  outcomes", "kind", "sent");
    for (kind, outcomes) in &tally.by_kind {
        let sent: u64 = outcomes.values().sum();
        let outcomes: Vec<String> = outcomes
            .iter()
            .map(|(label, n)| format!("{label}: {n}"))
            .collect();
        println!(
            "{:<18} {sent:>8}  {}",
            format!("{kind:?}"),
            outcomes.join(", ")
        );
    }
    let samples = &summary.rss_mib;
    if let (Some(first), Some(last)) = (samples.first(), samples.last()) {
        let min = samples.iter().copied().fold(f64::INFINITY, f64::min);
        let max = samples.iter().copied().fold(0.0, f64::max);
        println!("\nRSS (MiB): first {first:.1}, min {min:.1}, max {max:.1}, final {last:.1}");
        let minutes: Vec<String> = samples
            .chunks(60)
            .enumerate()
            .map(|(minute, chunk)| {
                let peak = chunk.iter().copied().fold(0.0, f64::max);
                let end = chunk.last().copied().unwrap_or(peak);
                format!("{}: max {peak:.1} end {end:.1}", minute + 1)
            })
            .collect();
        println!("RSS per minute (MiB): {}", minutes.join(" | "));
        let minute_ends = |values: Vec<String>| {
            let ends: Vec<String> = values
                .chunks(60)
                .enumerate()
                .filter_map(|(minute, chunk)| Some(format!("{}: {}", minute + 1, chunk.last()?)))
                .collect();
            ends.join(" | ")
        };
        let cache = summary
            .segment_cache_mib
            .iter()
            .map(|mib| format!("{mib:.1}"));
        println!(
            "segment cache at each minute's end (MiB): {}",
            minute_ends(cache.collect())
        );
        let blocks = summary.index_blocks.iter().map(u64::to_string);
        println!(
            "index blocks at each minute's end: {}",
            minute_ends(blocks.collect())
        );
    }
    println!(
        "unexpected outcomes: {}, panics: {}, healthy after: {}",
        summary.unexpected, summary.panics, summary.healthy_after
    );
    for example in &tally.examples {
        println!("  {example}");
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let handle = metrics_exporter_prometheus::PrometheusBuilder::new().install_recorder()?;
    let render: MetricsRender = Arc::new(move || handle.render());
    let summary = run(&args, Some(render)).await?;
    if !summary.passed(args.max_rss_mib) {
        return Err("the soak failed: see the summary above".into());
    }
    Ok(())
}
