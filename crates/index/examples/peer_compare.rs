//! kvroute-index side by side with NVIDIA Dynamo's indexers (dynamo-kv-router 1.6.1) over a
//! sweep of index sizes: same generated workload, same process, implementations interleaved.
//!
//! ```text
//! cargo run --release -p kvroute-index --features peer --example peer_compare -- \
//!     [--sizes 100000,200000,...] [--workers 16,1024] [--csv FILE] [--impls kvroute,dynamo_radix_tree,...]
//! ```
//!
//! For each worker count and each size (default 100k, 200k, 400k, 1M, 2M, 4M (worker, block)
//! entries of the chat-trace workload, benches/support/workload.rs) it measures, for kvroute
//! and each Dynamo variant:
//!
//! * apply throughput from empty, median of 3 builds (up to 20 for small sizes), with
//!   per-turn events (one `stored` event per request) and per-step events (the same blocks,
//!   one event per block, as an engine publishes while decoding);
//! * find_matches p50/p99 for 512- and 4096-block requests (1000 and 300, 3 passes), after
//!   checking every implementation returns kvroute's overlap scores on every request;
//! * remove_worker of one worker on a full index, median over the builds;
//! * heap bytes per entry, counted by a global allocator, and for kvroute the ratio of
//!   `IndexStats::bytes` to that count.
//!
//! Then, built once up to the largest size, memory per entry at 24 points per doubling of
//! size (kvroute and Dynamo's RadixTree): the curve that shows a step if there is one.
//!
//! Dynamo's variants: `RadixTree` (single-threaded), `ConcurrentRadixTreeCompressed` and
//! `PositionalIndexer` behind its `ThreadPoolIndexer` with 2 event threads (as many as cores
//! here): events are enqueued and `flush_and_wait` ends the timing. Dynamo's lookups take
//! content hashes (`LocalBlockHash`) and walk from the root; ours take sequence hashes: each
//! gets the input it expects for the same request. Rows are also written as CSV (`--csv`) for
//! `scripts/index-curves`, which aggregates runs and draws the curves in docs/benchmarks.md.

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)] // benchmark harness

#[path = "../benches/support/workload.rs"]
mod workload;

use dynamo_kv_router::indexer::{KvIndexerInterface, SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::protocols as dy;
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, PositionalIndexer, RadixTree};
use kvroute_index::{Index, IndexConfig, KvCacheEventData, RouterEvent, WorkerId};
use peak_alloc::PeakAlloc;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};
use workload::{Sequence, Workload};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Builds per implementation, size and event granularity: at least 3, and more for small
/// sizes (a 100k-entry build takes milliseconds, within reach of one scheduling stall).
fn builds(entries: u64) -> usize {
    (2_000_000 / entries.max(1)).clamp(3, 20) as usize
}

fn heap() -> usize {
    ALLOC.current_usage()
}

fn to_dynamo(event: &RouterEvent) -> dy::RouterEvent {
    let data = match &event.event.data {
        KvCacheEventData::Stored(s) => dy::KvCacheEventData::Stored(dy::KvCacheStoreData {
            parent_hash: s
                .parent_hash
                .map(|p| dy::ExternalSequenceBlockHash(p.get())),
            start_position: None,
            blocks: s
                .blocks
                .iter()
                .map(|b| dy::KvCacheStoredBlockData {
                    block_hash: dy::ExternalSequenceBlockHash(b.block_hash.get()),
                    tokens_hash: dy::LocalBlockHash(b.tokens_hash.get()),
                    mm_extra_info: None,
                })
                .collect(),
        }),
        KvCacheEventData::Removed(r) => dy::KvCacheEventData::Removed(dy::KvCacheRemoveData {
            block_hashes: r
                .block_hashes
                .iter()
                .map(|h| dy::ExternalSequenceBlockHash(h.get()))
                .collect(),
        }),
        KvCacheEventData::Cleared => dy::KvCacheEventData::Cleared,
    };
    dy::RouterEvent::new(
        event.worker_id.get(),
        dy::KvCacheEvent {
            event_id: event.event.event_id,
            data,
            dp_rank: event.event.dp_rank.get(),
        },
    )
}

fn local(q: &Sequence) -> Vec<dy::LocalBlockHash> {
    q.blocks
        .iter()
        .map(|b| dy::LocalBlockHash(b.get()))
        .collect()
}

type Scores = BTreeMap<(u64, u32), u32>;

fn dynamo_scores(s: &dy::OverlapScores) -> Scores {
    s.scores
        .iter()
        .map(|(w, &n)| ((w.worker_id, w.dp_rank), n))
        .collect()
}

trait PoolIndexer {
    fn find(&self, q: &[dy::LocalBlockHash]) -> dy::OverlapScores;
    fn enqueue(&self, event: dy::RouterEvent);
    fn flush(&self, rt: &tokio::runtime::Runtime);
    fn remove(&self, rt: &tokio::runtime::Runtime, worker: u64);
}

impl<T: SyncIndexer> PoolIndexer for ThreadPoolIndexer<T> {
    fn find(&self, q: &[dy::LocalBlockHash]) -> dy::OverlapScores {
        self.backend().find_matches(q, false)
    }
    fn enqueue(&self, event: dy::RouterEvent) {
        self.enqueue_event(event).unwrap();
    }
    fn flush(&self, rt: &tokio::runtime::Runtime) {
        rt.block_on(self.flush_and_wait()).unwrap();
    }
    fn remove(&self, rt: &tokio::runtime::Runtime, worker: u64) {
        rt.block_on(KvIndexerInterface::remove_worker(self, worker));
        // The removal is queued on the worker's lane: wait for it to be done.
        PoolIndexer::flush(self, rt);
    }
}

/// One implementation under test, being built or built.
enum Subject {
    Kvroute(Box<Index>),
    RadixTree(Box<RadixTree>),
    Pool(Box<dyn PoolIndexer>),
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Kvroute,
    RadixTree,
    Crtc,
    Positional,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Kvroute => "kvroute",
            Kind::RadixTree => "dynamo_radix_tree",
            Kind::Crtc => "dynamo_threadpool_crtc",
            Kind::Positional => "dynamo_threadpool_positional",
        }
    }

    fn empty(self) -> Subject {
        match self {
            Kind::Kvroute => Subject::Kvroute(Box::new(Index::new(IndexConfig::default()))),
            Kind::RadixTree => Subject::RadixTree(Box::new(RadixTree::new())),
            Kind::Crtc => Subject::Pool(Box::new(ThreadPoolIndexer::new(
                ConcurrentRadixTreeCompressed::new(),
                2,
                16,
            ))),
            Kind::Positional => Subject::Pool(Box::new(ThreadPoolIndexer::new(
                PositionalIndexer::new(32),
                2,
                16,
            ))),
        }
    }
}

impl Subject {
    /// Applies `events` (the Dynamo form converted up front when `dynamo` is given, so
    /// conversion is not timed) and waits until they are applied.
    fn apply(
        &mut self,
        events: &[RouterEvent],
        dynamo: Option<Vec<dy::RouterEvent>>,
        rt: &tokio::runtime::Runtime,
    ) {
        match self {
            Subject::Kvroute(index) => {
                for event in events {
                    index.apply_event(event).expect("consistent workload");
                }
            }
            Subject::RadixTree(tree) => {
                for event in dynamo.expect("converted") {
                    tree.apply_event(event).expect("consistent workload");
                }
            }
            Subject::Pool(pool) => {
                for event in dynamo.expect("converted") {
                    pool.enqueue(event);
                }
                pool.flush(rt);
            }
        }
    }

    fn find(&self, q: &Sequence) -> (Duration, Scores) {
        match self {
            Subject::Kvroute(index) => {
                let start = Instant::now();
                let overlap = index.find_matches(&q.hashes);
                let t = start.elapsed();
                let scores = overlap
                    .workers
                    .iter()
                    .map(|w| {
                        (
                            (w.worker.worker_id.get(), w.worker.dp_rank.get()),
                            w.matched_blocks as u32,
                        )
                    })
                    .collect();
                (t, scores)
            }
            Subject::RadixTree(tree) => {
                let input = local(q);
                let start = Instant::now();
                let overlap = tree.find_matches(input, false);
                (start.elapsed(), dynamo_scores(&overlap))
            }
            Subject::Pool(pool) => {
                let input = local(q);
                let start = Instant::now();
                let overlap = pool.find(&input);
                (start.elapsed(), dynamo_scores(&overlap))
            }
        }
    }

    fn remove(&mut self, rt: &tokio::runtime::Runtime, worker: u64) -> Duration {
        let start = Instant::now();
        match self {
            Subject::Kvroute(index) => index.remove_worker(WorkerId(worker)),
            Subject::RadixTree(tree) => tree.remove_worker(worker),
            Subject::Pool(pool) => pool.remove(rt, worker),
        }
        start.elapsed()
    }
}

/// Builds `kind` from `events`; returns it, the build time and the heap it holds.
fn build(
    kind: Kind,
    events: &[RouterEvent],
    rt: &tokio::runtime::Runtime,
) -> (Subject, Duration, usize) {
    // Dynamo's indexers consume their events (freed once applied), so heap growth across
    // conversion and application is what the structure holds.
    let before = heap();
    let dynamo = (kind != Kind::Kvroute).then(|| events.iter().map(to_dynamo).collect());
    let mut subject = kind.empty();
    let start = Instant::now();
    subject.apply(events, dynamo, rt);
    let elapsed = start.elapsed();
    (subject, elapsed, heap().saturating_sub(before))
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median<T: PartialOrd + Copy>(mut v: Vec<T>) -> T {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// The measurements of one implementation at one size.
#[derive(Default)]
struct Row {
    apply_turn: Vec<f64>,
    apply_step: Vec<f64>,
    find: Vec<(usize, Duration, Duration)>,
    remove: Vec<Duration>,
    bytes_per_entry: f64,
    /// kvroute only: `IndexStats::bytes` over the allocator's count.
    stats_ratio: Option<f64>,
}

struct Args {
    sizes: Vec<u64>,
    workers: Vec<u64>,
    csv: Option<String>,
    kinds: Vec<Kind>,
}

fn parse_args() -> Args {
    let mut args = Args {
        sizes: vec![100_000, 200_000, 400_000, 1_000_000, 2_000_000, 4_000_000],
        workers: vec![16, 1024],
        csv: None,
        kinds: vec![Kind::Kvroute, Kind::RadixTree, Kind::Crtc, Kind::Positional],
    };
    let list = |s: String| s.split(',').map(|x| x.parse().expect("number")).collect();
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--sizes" => args.sizes = list(it.next().expect("--sizes LIST")),
            "--workers" => args.workers = list(it.next().expect("--workers LIST")),
            "--csv" => args.csv = Some(it.next().expect("--csv FILE")),
            "--impls" => {
                let names = it.next().expect("--impls LIST");
                args.kinds
                    .retain(|k| names.split(',').any(|n| n == k.name()));
            }
            other => panic!("unknown argument {other}"),
        }
    }
    args
}

/// Measures every implementation at one size, interleaving them build by build.
fn measure_size(kinds: &[Kind], w: &Workload, rt: &tokio::runtime::Runtime) -> Vec<Row> {
    let per_step = workload::per_block(&w.events);
    let queries = [
        (512, workload::queries(w, 512, 1000, 1)),
        (4096, workload::queries(w, 4096, 300, 2)),
    ];
    let mut rows: Vec<Row> = kinds.iter().map(|_| Row::default()).collect();
    let mut expected: Vec<Vec<Scores>> = Vec::new();
    for round in 0..builds(w.entries) {
        for (k, &kind) in kinds.iter().enumerate() {
            let row = &mut rows[k];
            let (step, t, _) = build(kind, &per_step, rt);
            drop(step);
            row.apply_step.push(w.entries as f64 / t.as_secs_f64());
            let (mut subject, t, bytes) = build(kind, &w.events, rt);
            row.apply_turn.push(w.entries as f64 / t.as_secs_f64());
            if round == 0 {
                row.bytes_per_entry = bytes as f64 / w.entries as f64;
                if let Subject::Kvroute(index) = &subject {
                    row.stats_ratio = Some(index.stats().bytes as f64 / bytes as f64);
                }
                for (qi, (len, qs)) in queries.iter().enumerate() {
                    let scores: Vec<Scores> = qs.iter().map(|q| subject.find(q).1).collect();
                    if k == 0 {
                        expected.push(scores);
                    } else {
                        let disagree = scores
                            .iter()
                            .zip(&expected[qi])
                            .filter(|(a, b)| a != b)
                            .count();
                        assert_eq!(
                            disagree,
                            0,
                            "{} disagrees with {} on {disagree} of {} {len}-block queries",
                            kind.name(),
                            kinds[0].name(),
                            qs.len()
                        );
                    }
                    let mut times: Vec<Duration> = Vec::with_capacity(qs.len() * 3);
                    for _ in 0..3 {
                        times.extend(qs.iter().map(|q| subject.find(q).0));
                    }
                    times.sort();
                    row.find
                        .push((*len, percentile(&times, 0.5), percentile(&times, 0.99)));
                }
            }
            row.remove
                .push(subject.remove(rt, round as u64 % w.workers));
        }
    }
    rows
}

/// Memory per entry of `kind` built once up to `w`'s size, at 24 points per doubling from
/// `from` entries: (entries, allocator bytes, `IndexStats::bytes` for kvroute).
fn memory_curve(
    kind: Kind,
    w: &Workload,
    from: u64,
    rt: &tokio::runtime::Runtime,
) -> Vec<(u64, usize, Option<usize>)> {
    let step = 2f64.powf(1.0 / 24.0);
    let mut next = from as f64;
    let mut points = Vec::new();
    let before = heap();
    let mut subject = kind.empty();
    let mut entries = 0;
    for event in &w.events {
        // Converted one at a time, so no event waiting to be applied is counted.
        let dynamo = (kind != Kind::Kvroute).then(|| vec![to_dynamo(event)]);
        subject.apply(std::slice::from_ref(event), dynamo, rt);
        if let KvCacheEventData::Stored(s) = &event.event.data {
            entries += s.blocks.len() as u64;
        }
        if entries as f64 >= next {
            if let Subject::Pool(pool) = &subject {
                pool.flush(rt);
            }
            let stats = match &subject {
                Subject::Kvroute(index) => Some(index.stats().bytes),
                _ => None,
            };
            points.push((entries, heap().saturating_sub(before), stats));
            while next <= entries as f64 {
                next *= step;
            }
        }
    }
    points
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

fn main() {
    let args = parse_args();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut csv = String::from("workers,entries,implementation,metric,value\n");
    for &workers in &args.workers {
        for &size in &args.sizes {
            let w = workload::generate(workers, size, 0x5EED ^ workers);
            let rows = measure_size(&args.kinds, &w, &rt);
            println!(
                "\n### {workers} workers, {} entries, {} per-turn events ({} per-step)\n",
                w.entries,
                w.events.len(),
                w.entries
            );
            println!("| implementation | apply per-turn (M blocks/s) | apply per-step (M blocks/s) | find 512 p50 / p99 (µs) | find 4096 p50 / p99 (µs) | remove_worker (ms) | bytes / entry |");
            println!("|---|---|---|---|---|---|---|");
            for (kind, r) in args.kinds.iter().zip(&rows) {
                let (turn, step) = (median(r.apply_turn.clone()), median(r.apply_step.clone()));
                let remove = median(r.remove.clone());
                println!(
                    "| {} | {:.2} | {:.2} | {:.1} / {:.1} | {:.1} / {:.1} | {:.4} | {:.1}{} |",
                    kind.name(),
                    turn / 1e6,
                    step / 1e6,
                    us(r.find[0].1),
                    us(r.find[0].2),
                    us(r.find[1].1),
                    us(r.find[1].2),
                    remove.as_secs_f64() * 1e3,
                    r.bytes_per_entry,
                    r.stats_ratio
                        .map(|x| format!(" (stats {x:.3}x)"))
                        .unwrap_or_default(),
                );
                let mut put = |metric: &str, value: f64| {
                    let _ = writeln!(
                        csv,
                        "{workers},{},{},{metric},{value}",
                        w.entries,
                        kind.name()
                    );
                };
                put("apply_turn_blocks_per_s", turn);
                put("apply_step_blocks_per_s", step);
                put("find512_p50_us", us(r.find[0].1));
                put("find512_p99_us", us(r.find[0].2));
                put("find4096_p50_us", us(r.find[1].1));
                put("find4096_p99_us", us(r.find[1].2));
                put("remove_worker_ms", remove.as_secs_f64() * 1e3);
                put("bytes_per_entry", r.bytes_per_entry);
                if let Some(ratio) = r.stats_ratio {
                    put("stats_bytes_ratio", ratio);
                }
            }
            let ours = &rows[0];
            for (kind, r) in args.kinds.iter().zip(&rows).skip(1) {
                println!(
                    "kvroute / {}: apply per-turn {:.2}x, per-step {:.2}x, remove_worker {:.3}x",
                    kind.name(),
                    median(ours.apply_turn.clone()) / median(r.apply_turn.clone()),
                    median(ours.apply_step.clone()) / median(r.apply_step.clone()),
                    median(ours.remove.clone()).as_secs_f64()
                        / median(r.remove.clone()).as_secs_f64(),
                );
            }
        }
        let largest = *args.sizes.iter().max().expect("a size");
        let w = workload::generate(workers, largest, 0x5EED ^ workers);
        for kind in [Kind::Kvroute, Kind::RadixTree] {
            let points = memory_curve(kind, &w, 100_000.min(largest), &rt);
            let worst = points
                .iter()
                .map(|&(e, b, _)| b as f64 / e as f64)
                .fold(0.0, f64::max);
            let steepest = points
                .windows(2)
                .map(|p| (p[1].1 as f64 / p[1].0 as f64) / (p[0].1 as f64 / p[0].0 as f64))
                .fold(0.0, f64::max);
            println!(
                "memory curve, {workers} workers, {}: {} points, at most {worst:.1} bytes/entry, \
                 steepest step between neighbouring points {steepest:.3}x",
                kind.name(),
                points.len()
            );
            for (entries, bytes, stats) in points {
                let _ = writeln!(
                    csv,
                    "{workers},{entries},{},curve_bytes_per_entry,{}",
                    kind.name(),
                    bytes as f64 / entries as f64
                );
                if let Some(stats) = stats {
                    let _ = writeln!(
                        csv,
                        "{workers},{entries},{},curve_stats_bytes_ratio,{}",
                        kind.name(),
                        stats as f64 / bytes as f64
                    );
                }
            }
        }
    }
    if let Some(path) = args.csv {
        std::fs::write(&path, csv).expect("write the CSV file");
    }
}
