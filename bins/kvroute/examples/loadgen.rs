//! A bounded, closed-loop load generator for OpenAI-compatible chat endpoints on this machine.
//!
//! Each of `--concurrency` virtual users keeps one HTTP/1.1 connection per target for the whole
//! run and sends its next request as soon as the previous answer's last byte arrived. Every
//! target (`--target NAME=URL`, the first is the baseline) gets the same requests, in
//! `--rounds` interleaved rounds so that a noisy machine slows all targets alike (as many
//! rounds as requests alternates the targets request by request). It prints a markdown table:
//! requests/s, latency to the last byte (p50/p90/p99/max), time to the first byte for streams,
//! and the latency each target adds to the baseline (its percentile minus the baseline's).
//!
//! Requests are chat completions with a text prompt, or with an image sent as a base64 data URL
//! (default: the 528 KB `hubble_deep_field.jpg` fixture). Unless `--identical`, every request is
//! distinct, also from those of earlier runs: the text carries a run and request number and the
//! JPEG a comment segment with them (a different file, so a different media id, same pixels),
//! so no cache answers for the router.
//!
//! Bounded: at most `--requests` per target and round set, and `--max-seconds` overall; only
//! loopback targets (127.0.0.0/8, ::1, localhost) are accepted.
//!
//! ```sh
//! cargo run --release -p kvroute --example loadgen -- \
//!     --target direct=http://127.0.0.1:8101 --target kvroute=http://127.0.0.1:8000 \
//!     --kind image --stream --concurrency 1 --requests 500
//! ```

use anyhow::{bail, Context, Result};
use base64::Engine as _;
use bytes::Bytes;
use clap::{Parser, ValueEnum};
use http::{header, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Largest request count per target (the generator is bounded).
const MAX_REQUESTS: usize = 1_000_000;
/// Largest number of virtual users.
const MAX_CONCURRENCY: usize = 1024;

#[derive(Parser)]
#[command(about = "Closed-loop load generator for OpenAI chat endpoints on loopback")]
struct Args {
    /// A target as NAME=URL (its OpenAI base URL, loopback only); repeatable, the first is the
    /// baseline the others' added latency is measured against.
    #[arg(long = "target", value_name = "NAME=URL", required = true, value_parser = parse_target)]
    targets: Vec<Target>,
    /// What each request carries.
    #[arg(long, value_enum, default_value_t = Kind::Text)]
    kind: Kind,
    /// Ask for a streamed (SSE) answer.
    #[arg(long)]
    stream: bool,
    /// Virtual users, each with its own connection and one request in flight.
    #[arg(long, default_value_t = 1)]
    concurrency: usize,
    /// Measured requests per target (split evenly over the rounds).
    #[arg(long, default_value_t = 1000)]
    requests: usize,
    /// Unmeasured requests per target before the first round.
    #[arg(long, default_value_t = 50)]
    warmup: usize,
    /// Interleaved rounds: each round runs every target in turn. Up to `--requests`: at
    /// concurrency 1 that many rounds alternate the targets request by request, so that bursts
    /// of noise on a shared machine fall on every target alike.
    #[arg(long, default_value_t = 5)]
    rounds: usize,
    /// `max_tokens` of every request.
    #[arg(long, default_value_t = 4)]
    max_tokens: u32,
    /// The model name sent.
    #[arg(long, default_value = "Qwen/Qwen2-VL-2B-Instruct")]
    model: String,
    /// The image of `--kind image` (a JPEG unless --identical).
    #[arg(long, default_value = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images/hubble_deep_field.jpg"))]
    image: PathBuf,
    /// Send the very same request every time (caches in the path then answer).
    #[arg(long)]
    identical: bool,
    /// Stop everything after this many seconds, whatever is left.
    #[arg(long, default_value_t = 600)]
    max_seconds: u64,
    /// Runtime worker threads of the generator itself.
    #[arg(long, default_value_t = 1)]
    threads: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Kind {
    Text,
    Image,
}

#[derive(Clone, Debug)]
struct Target {
    name: String,
    addr: SocketAddr,
    authority: String,
}

fn parse_target(spec: &str) -> Result<Target, String> {
    let (name, url) = spec
        .split_once('=')
        .ok_or_else(|| format!("{spec:?} is not NAME=URL"))?;
    let uri: Uri = url
        .parse()
        .map_err(|e| format!("{url:?} is not a URL: {e}"))?;
    if uri.scheme_str() != Some("http") {
        return Err(format!("{url:?}: only http:// targets are supported"));
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err(format!("{url:?}: give the base URL without a path"));
    }
    let host = uri.host().unwrap_or_default();
    let ip: IpAddr = if host.eq_ignore_ascii_case("localhost") {
        IpAddr::V4(Ipv4Addr::LOCALHOST)
    } else {
        host.trim_start_matches('[')
            .trim_end_matches(']')
            .parse()
            .map_err(|_| format!("{url:?}: the host must be a loopback IP address or localhost"))?
    };
    if !ip.is_loopback() {
        return Err(format!(
            "{url:?}: refusing a non-loopback target (this generator only loads this machine)"
        ));
    }
    let port = uri.port_u16().unwrap_or(80);
    Ok(Target {
        name: name.to_owned(),
        addr: SocketAddr::new(ip, port),
        authority: uri.authority().map(|a| a.to_string()).unwrap_or_default(),
    })
}

/// Makes the body of request number `n`.
struct Bodies {
    /// JSON up to where the request number goes (text) or the image's base64 (image).
    head: Vec<u8>,
    /// Image only: the base64 of the file after the inserted comment segment.
    image_tail: Vec<u8>,
    /// The rest of the JSON.
    tail: Vec<u8>,
    kind: Kind,
    identical: bool,
    /// Differs between runs, so a server that outlives one run sees new requests in the next.
    run: u64,
}

/// One paragraph of ordinary English (the request number is appended).
const PROMPT: &str = include_str!("../../../tests/fixtures/text/paragraph_en.txt");

/// A number for this run: the clock's nanoseconds, below 10^10.
fn run_id() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| (d.as_nanos() % 10_000_000_000) as u64)
        .unwrap_or_default()
}

/// Digits of the run and request number in the JPEG comment segment inserted after SOI. SOI (2) +
/// COM marker (2) + length (2) + digits (20) + one space = 27 bytes, a multiple of 3, so the
/// base64 of the rest of the file is the same for every request number and encoded once.
const COMMENT_DIGITS: usize = 20;

impl Bodies {
    fn new(args: &Args) -> Result<Self> {
        let stream = if args.stream {
            r#","stream":true,"stream_options":{"include_usage":true}"#
        } else {
            ""
        };
        let settings = format!(
            r#"],"max_tokens":{},"temperature":0{stream}}}"#,
            args.max_tokens
        );
        let model = serde_json::to_string(&args.model)?;
        match args.kind {
            Kind::Text => Ok(Self {
                head: format!(
                    r#"{{"model":{model},"messages":[{{"role":"user","content":"{PROMPT} Request "#
                )
                .into_bytes(),
                image_tail: Vec::new(),
                tail: format!(r#"."}}{settings}"#).into_bytes(),
                kind: Kind::Text,
                identical: args.identical,
                run: run_id(),
            }),
            Kind::Image => {
                let file = std::fs::read(&args.image)
                    .with_context(|| format!("reading {}", args.image.display()))?;
                let mime = match file.get(..4) {
                    Some([0xFF, 0xD8, 0xFF, _]) => "image/jpeg",
                    Some([0x89, b'P', b'N', b'G']) => "image/png",
                    _ => bail!("{}: not a JPEG or PNG", args.image.display()),
                };
                let engine = base64::engine::general_purpose::STANDARD;
                let image_tail = if args.identical {
                    engine.encode(&file)
                } else {
                    if mime != "image/jpeg" {
                        bail!(
                            "distinct images are made by a JPEG comment: use a JPEG or --identical"
                        );
                    }
                    engine.encode(&file[2..])
                };
                Ok(Self {
                    head: format!(
                        r#"{{"model":{model},"messages":[{{"role":"user","content":[{{"type":"image_url","image_url":{{"url":"data:{mime};base64,"#
                    )
                    .into_bytes(),
                    image_tail: image_tail.into_bytes(),
                    tail: format!(
                        r#""}}}},{{"type":"text","text":"Describe this image in one sentence."}}]}}{settings}"#
                    )
                    .into_bytes(),
                    kind: Kind::Image,
                    identical: args.identical,
                    run: run_id(),
                })
            }
        }
    }

    fn body(&self, n: usize) -> Bytes {
        let mut body =
            Vec::with_capacity(self.head.len() + self.image_tail.len() + self.tail.len() + 48);
        body.extend_from_slice(&self.head);
        match (self.kind, self.identical) {
            (Kind::Text, false) => body.extend_from_slice(format!("{}-{n}", self.run).as_bytes()),
            (Kind::Text, true) => body.push(b'0'),
            (Kind::Image, true) => {}
            (Kind::Image, false) => {
                // SOI, then a COM segment whose payload is the zero-padded request number, then
                // one more padding byte; then the file after its own SOI, encoded in advance.
                let mut prefix = vec![0xFF, 0xD8, 0xFF, 0xFE];
                prefix.extend_from_slice(&((2 + COMMENT_DIGITS + 1) as u16).to_be_bytes());
                let comment = format!("{:010}{:010} ", self.run, n % 10_000_000_000);
                debug_assert_eq!(comment.len(), COMMENT_DIGITS + 1);
                prefix.extend_from_slice(comment.as_bytes());
                let encoded = base64::engine::general_purpose::STANDARD.encode(&prefix);
                body.extend_from_slice(encoded.as_bytes());
            }
        }
        body.extend_from_slice(&self.image_tail);
        body.extend_from_slice(&self.tail);
        Bytes::from(body)
    }
}

/// What one request measured.
#[derive(Default)]
struct Samples {
    latency: Vec<Duration>,
    first_byte: Vec<Duration>,
    errors: usize,
    first_error: Option<String>,
    busy: Duration,
}

impl Samples {
    fn merge(&mut self, other: Samples) {
        self.latency.extend(other.latency);
        self.first_byte.extend(other.first_byte);
        self.errors += other.errors;
        self.first_error = self.first_error.take().or(other.first_error);
        self.busy += other.busy;
    }
}

/// One HTTP/1.1 connection of a virtual user, kept open across rounds.
type Connection = Option<SendRequest<Full<Bytes>>>;

struct Run<'a> {
    target: &'a Target,
    bodies: &'a Arc<Bodies>,
    stream: bool,
    /// One slot per virtual user: connections outlive rounds, so that fine interleaving
    /// (`--rounds` up to `--requests`) measures requests, not connection setup.
    connections: Arc<Vec<Mutex<Connection>>>,
    deadline: Instant,
}

impl Run<'_> {
    /// Sends `count` requests numbered from `first` with `concurrency` virtual users.
    async fn go(&self, first: usize, count: usize) -> Samples {
        let next = Arc::new(AtomicUsize::new(0));
        let collected = Arc::new(Mutex::new(Samples::default()));
        let started = Instant::now();
        let users_needed = self.connections.len().min(count);
        let mut users = Vec::with_capacity(users_needed);
        for user in 0..users_needed {
            let next = next.clone();
            let collected = collected.clone();
            let connections = self.connections.clone();
            let target = self.target.clone();
            let bodies = self.bodies.clone();
            let (stream, deadline) = (self.stream, self.deadline);
            users.push(tokio::spawn(async move {
                let mut mine = Samples::default();
                let slot = &connections[user];
                let mut connection = slot.lock().unwrap_or_else(|e| e.into_inner()).take();
                loop {
                    let ticket = next.fetch_add(1, Ordering::Relaxed);
                    if ticket >= count || Instant::now() >= deadline {
                        break;
                    }
                    let body = bodies.body(first + ticket);
                    match one(&target, &mut connection, body, stream).await {
                        Ok((latency, first_byte)) => {
                            mine.latency.push(latency);
                            if stream {
                                mine.first_byte.push(first_byte);
                            }
                        }
                        Err(error) => {
                            connection = None;
                            mine.errors += 1;
                            mine.first_error.get_or_insert(format!("{error:#}"));
                        }
                    }
                }
                *slot.lock().unwrap_or_else(|e| e.into_inner()) = connection;
                collected
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .merge(mine);
            }));
        }
        for user in users {
            let _ = user.await;
        }
        let mut samples = std::mem::take(&mut *collected.lock().unwrap_or_else(|e| e.into_inner()));
        samples.busy = started.elapsed();
        samples
    }
}

/// Sends one request on `connection` (opening one if needed), reads the whole answer, returns
/// (latency to the last byte, latency to the first body byte).
async fn one(
    target: &Target,
    connection: &mut Connection,
    body: Bytes,
    stream: bool,
) -> Result<(Duration, Duration)> {
    if let Some(sender) = connection {
        if sender.ready().await.is_err() {
            *connection = None;
        }
    }
    let sender = match connection {
        Some(sender) => sender,
        None => {
            let socket = TcpStream::connect(target.addr)
                .await
                .with_context(|| format!("connecting to {}", target.addr))?;
            socket.set_nodelay(true)?;
            let (sender, driver) =
                hyper::client::conn::http1::handshake(TokioIo::new(socket)).await?;
            tokio::spawn(driver);
            connection.insert(sender)
        }
    };
    let request = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header(header::HOST, &target.authority)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(body))?;
    let started = Instant::now();
    let response = sender.send_request(request).await?;
    let status = response.status();
    let mut body = response.into_body();
    let mut first_byte = None;
    let mut received = 0usize;
    let mut tail: Vec<u8> = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            if data.is_empty() {
                continue;
            }
            first_byte.get_or_insert_with(|| started.elapsed());
            received += data.len();
            if status != StatusCode::OK || stream {
                tail.extend_from_slice(&data);
                let keep = if status == StatusCode::OK { 16 } else { 512 };
                if tail.len() > keep {
                    tail.drain(..tail.len() - keep);
                }
            }
        }
    }
    let latency = started.elapsed();
    if status != StatusCode::OK {
        bail!("HTTP {status}: {}", String::from_utf8_lossy(&tail));
    }
    if received == 0 {
        bail!("empty answer");
    }
    if stream && !tail.ends_with(b"data: [DONE]\n\n") {
        bail!("the stream did not end with data: [DONE]");
    }
    Ok((latency, first_byte.unwrap_or(latency)))
}

/// The nearest-rank percentile of sorted samples.
fn percentile(sorted: &[Duration], p: f64) -> Option<Duration> {
    if sorted.is_empty() {
        return None;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted.get(rank.clamp(1, sorted.len()) - 1).copied()
}

fn ms(d: Option<Duration>) -> String {
    d.map(|d| format!("{:.3}", d.as_secs_f64() * 1e3))
        .unwrap_or_else(|| "—".to_owned())
}

fn added(ours: Option<Duration>, base: Option<Duration>) -> String {
    match (ours, base) {
        (Some(ours), Some(base)) => {
            format!("{:+.3}", (ours.as_secs_f64() - base.as_secs_f64()) * 1e3)
        }
        _ => "—".to_owned(),
    }
}

fn main() -> Result<()> {
    let args = Args::parse();
    if !(1..=MAX_CONCURRENCY).contains(&args.concurrency) {
        bail!("--concurrency must be 1..={MAX_CONCURRENCY}");
    }
    if !(1..=MAX_REQUESTS).contains(&args.requests) || args.warmup > MAX_REQUESTS {
        bail!("--requests must be 1..={MAX_REQUESTS}, --warmup at most {MAX_REQUESTS}");
    }
    if args.rounds == 0 || args.rounds > args.requests {
        bail!("--rounds must be 1..=--requests");
    }
    // One thread: no hand-offs between the thread that starts a round and the one that sends.
    let runtime = match args.threads {
        0 | 1 => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?,
        threads => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()?,
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> Result<()> {
    let bodies = Arc::new(Bodies::new(&args)?);
    let deadline = Instant::now() + Duration::from_secs(args.max_seconds);
    let runs: Vec<Run> = args
        .targets
        .iter()
        .map(|target| Run {
            target,
            bodies: &bodies,
            stream: args.stream,
            connections: Arc::new((0..args.concurrency).map(|_| Mutex::new(None)).collect()),
            deadline,
        })
        .collect();
    // Request numbers never repeat across targets, rounds or the warm-up.
    let mut number = 0usize;
    for run in &runs {
        let warm = run.go(number, args.warmup).await;
        number += args.warmup;
        if warm.errors > 0 && warm.latency.is_empty() && args.warmup > 0 {
            bail!(
                "{}: every warm-up request failed: {}",
                run.target.name,
                warm.first_error.unwrap_or_default()
            );
        }
    }
    let mut results: Vec<Samples> = runs.iter().map(|_| Samples::default()).collect();
    for round in 0..args.rounds {
        let count = args.requests / args.rounds + usize::from(round < args.requests % args.rounds);
        for (run, result) in runs.iter().zip(results.iter_mut()) {
            result.merge(run.go(number, count).await);
            number += count;
        }
    }
    let timed_out = Instant::now() >= deadline;
    for result in &mut results {
        result.latency.sort_unstable();
        result.first_byte.sort_unstable();
    }

    let body_bytes = bodies.body(0).len();
    println!(
        "{} chat request ({} bytes), {}, concurrency {}, max_tokens {}, {} requests per target in {} interleaved rounds after {} warm-up{}{}",
        match args.kind {
            Kind::Text => "text",
            Kind::Image => "image",
        },
        body_bytes,
        if args.stream { "streamed" } else { "not streamed" },
        args.concurrency,
        args.max_tokens,
        args.requests,
        args.rounds,
        args.warmup,
        if args.identical { ", identical requests" } else { ", every request distinct" },
        if timed_out { " (STOPPED AT --max-seconds)" } else { "" },
    );
    println!();
    let stream_columns = if args.stream {
        " TTFB p50 | TTFB p99 |"
    } else {
        ""
    };
    println!(
        "| target | ok | errors | req/s | p50 ms | p90 ms | p99 ms | max ms |{stream_columns} added p50 ms | added p99 ms |"
    );
    println!(
        "|---|---:|---:|---:|---:|---:|---:|---:|{}---:|---:|",
        if args.stream { "---:|---:|" } else { "" }
    );
    let base = &results[0];
    for (target, result) in args.targets.iter().zip(&results) {
        let lat = |p| percentile(&result.latency, p);
        let rate = result.latency.len() as f64 / result.busy.as_secs_f64().max(1e-9);
        let ttfb = if args.stream {
            format!(
                " {} | {} |",
                ms(percentile(&result.first_byte, 0.5)),
                ms(percentile(&result.first_byte, 0.99))
            )
        } else {
            String::new()
        };
        let (added50, added99) = if std::ptr::eq(result, base) {
            ("baseline".to_owned(), "baseline".to_owned())
        } else {
            (
                added(lat(0.5), percentile(&base.latency, 0.5)),
                added(lat(0.99), percentile(&base.latency, 0.99)),
            )
        };
        println!(
            "| {} | {} | {} | {:.0} | {} | {} | {} | {} |{ttfb} {added50} | {added99} |",
            target.name,
            result.latency.len(),
            result.errors,
            rate,
            ms(lat(0.5)),
            ms(lat(0.9)),
            ms(lat(0.99)),
            ms(lat(1.0)),
        );
    }
    for (target, result) in args.targets.iter().zip(&results) {
        if let Some(error) = &result.first_error {
            eprintln!("{}: {} errors, first: {error}", target.name, result.errors);
        }
    }
    Ok(())
}
