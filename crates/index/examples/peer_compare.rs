//! kvroute-index side by side with NVIDIA Dynamo's indexers (dynamo-kv-router 1.6.1), same
//! generated workload, same process, one run:
//!
//! ```text
//! cargo run --release -p kvroute-index --features peer --example peer_compare [-- ENTRIES]
//! ```
//!
//! For 16 and 1024 workers holding ENTRIES (default 1,000,000) (worker, block) entries of the
//! chat-trace workload (benches/support/workload.rs), it measures: apply throughput from
//! empty (median of 5 builds), find_matches latency percentiles for 512- and 4096-block
//! requests (1000 and 300 requests, 3 passes), remove_worker latency on a full index (median
//! of 4), and heap bytes per (worker, block) entry with a counting allocator. Every
//! implementation is checked to give the same overlap scores as kvroute first.
//!
//! Dynamo's variants: `RadixTree` (single-threaded), `ConcurrentRadixTreeCompressed` and
//! `PositionalIndexer` behind its `ThreadPoolIndexer` (2 event threads, as many as cores here).
//! Dynamo's lookups take content hashes (`LocalBlockHash`) and walk from the root; ours take
//! sequence hashes: each gets the input it expects for the same request.

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)] // benchmark harness

#[path = "../benches/support/workload.rs"]
mod workload;

use dynamo_kv_router::indexer::{KvIndexerInterface, SyncIndexer, ThreadPoolIndexer};
use dynamo_kv_router::protocols as dy;
use dynamo_kv_router::{ConcurrentRadixTreeCompressed, PositionalIndexer, RadixTree};
use kvroute_index::{Index, IndexConfig};
use kvroute_protocol::{KvCacheEventData, RouterEvent, WorkerId};
use peak_alloc::PeakAlloc;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use workload::{Sequence, Workload};

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Builds after the first, each timed and then measured removing one worker: apply time is
/// the median of `REBUILDS + 1` builds, remove_worker the median of `REBUILDS` removals.
const REBUILDS: usize = 4;

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

/// The implementations under test, built from the same events.
enum Subject {
    Kvroute(Box<Index>),
    RadixTree(RadixTree),
    Pool(Box<dyn PoolIndexer>),
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
    }
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Kvroute,
    RadixTree,
    Crtc,
    Positional,
}

impl Kind {
    const ALL: [Kind; 4] = [Kind::Kvroute, Kind::RadixTree, Kind::Crtc, Kind::Positional];

    fn name(self) -> &'static str {
        match self {
            Kind::Kvroute => "kvroute Index",
            Kind::RadixTree => "Dynamo RadixTree",
            Kind::Crtc => "Dynamo ThreadPool<ConcurrentRadixTreeCompressed>",
            Kind::Positional => "Dynamo ThreadPool<PositionalIndexer(32)>",
        }
    }
}

/// Builds `kind` from the events; returns it, the build time and the heap it holds.
fn build(kind: Kind, w: &Workload, rt: &tokio::runtime::Runtime) -> (Subject, Duration, usize) {
    // Dynamo's indexers consume their events (freed once applied), so heap growth across
    // conversion and application is what the structure holds.
    let before = heap();
    let dynamo_events: Vec<dy::RouterEvent> = match kind {
        Kind::Kvroute => Vec::new(),
        _ => w.events.iter().map(to_dynamo).collect(),
    };
    let start = Instant::now();
    let subject = match kind {
        Kind::Kvroute => {
            let mut index = Index::new(IndexConfig::default());
            for event in &w.events {
                index.apply_event(event).expect("consistent workload");
            }
            Subject::Kvroute(Box::new(index))
        }
        Kind::RadixTree => {
            let mut tree = RadixTree::new();
            for event in dynamo_events {
                tree.apply_event(event).expect("consistent workload");
            }
            Subject::RadixTree(tree)
        }
        Kind::Crtc | Kind::Positional => {
            let pool: Box<dyn PoolIndexer> = if kind == Kind::Crtc {
                Box::new(ThreadPoolIndexer::new(
                    ConcurrentRadixTreeCompressed::new(),
                    2,
                    16,
                ))
            } else {
                Box::new(ThreadPoolIndexer::new(PositionalIndexer::new(32), 2, 16))
            };
            for event in dynamo_events {
                pool.enqueue(event);
            }
            pool.flush(rt);
            Subject::Pool(pool)
        }
    };
    let elapsed = start.elapsed();
    (subject, elapsed, heap().saturating_sub(before))
}

impl Subject {
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

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

struct Row {
    kind: Kind,
    apply_blocks_per_s: f64,
    find: Vec<(usize, Duration, Duration)>,
    remove: Duration,
    bytes_per_entry: f64,
}

fn measure(
    kind: Kind,
    w: &Workload,
    queries: &[(usize, Vec<Sequence>)],
    expected: &mut Vec<Vec<Scores>>,
    rt: &tokio::runtime::Runtime,
) -> Row {
    let (subject, apply, bytes) = build(kind, w, rt);
    let mut find = Vec::new();
    for (qi, (len, qs)) in queries.iter().enumerate() {
        // Warm up and check agreement with the first implementation.
        let scores: Vec<Scores> = qs.iter().map(|q| subject.find(q).1).collect();
        if expected.len() <= qi {
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
                "{} disagrees with kvroute on {disagree} of {} {len}-block queries",
                kind.name(),
                qs.len()
            );
        }
        let mut times: Vec<Duration> = Vec::with_capacity(qs.len() * 3);
        for _ in 0..3 {
            times.extend(qs.iter().map(|q| subject.find(q).0));
        }
        times.sort();
        find.push((*len, percentile(&times, 0.5), percentile(&times, 0.99)));
    }
    drop(subject);
    let mut applies = vec![apply];
    let mut removes = Vec::new();
    for run in 0..REBUILDS {
        let (mut subject, apply, _) = build(kind, w, rt);
        applies.push(apply);
        removes.push(subject.remove(rt, run as u64 % w.workers));
    }
    Row {
        kind,
        apply_blocks_per_s: w.entries as f64 / median(applies).as_secs_f64(),
        find,
        remove: median(removes),
        bytes_per_entry: bytes as f64 / w.entries as f64,
    }
}

fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

fn main() {
    let entries: u64 = std::env::args()
        .nth(1)
        .map_or(1_000_000, |a| a.parse().expect("ENTRIES"));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    for workers in [16u64, 1024] {
        let w = workload::generate(workers, entries, 0x5EED ^ workers);
        let queries = vec![
            (512, workload::queries(&w, 512, 1000, 1)),
            (4096, workload::queries(&w, 4096, 300, 2)),
        ];
        let mut expected = Vec::new();
        let (index, _, _) = build(Kind::Kvroute, &w, &rt);
        if let Subject::Kvroute(index) = index {
            let stats = index.stats();
            println!(
                "\nkvroute index: {} unique blocks in {} runs ({:.1} blocks per run), \
                 snapshot {} bytes ({:.2} per entry)",
                stats.unique_blocks,
                stats.nodes,
                stats.unique_blocks as f64 / stats.nodes as f64,
                index.snapshot().len(),
                index.snapshot().len() as f64 / w.entries as f64
            );
        }
        let rows: Vec<Row> = Kind::ALL
            .iter()
            .map(|&k| measure(k, &w, &queries, &mut expected, &rt))
            .collect();
        println!(
            "\n### {workers} workers, {} (worker, block) entries, {} events\n",
            w.entries,
            w.events.len()
        );
        println!("| implementation | apply (M blocks/s) | find 512 p50 / p99 (µs) | find 4096 p50 / p99 (µs) | remove_worker (ms) | bytes / entry |");
        println!("|---|---|---|---|---|---|");
        for r in &rows {
            println!(
                "| {} | {:.2} | {} / {} | {} / {} | {:.3} | {:.1} |",
                r.kind.name(),
                r.apply_blocks_per_s / 1e6,
                us(r.find[0].1),
                us(r.find[0].2),
                us(r.find[1].1),
                us(r.find[1].2),
                r.remove.as_secs_f64() * 1e3,
                r.bytes_per_entry
            );
        }
        let ours = &rows[0];
        let tree = &rows[1];
        let best_p99 = |i: usize| rows[1..].iter().map(|r| r.find[i].2).min().unwrap();
        let best_remove = rows[1..].iter().map(|r| r.remove).min().unwrap();
        let best_bytes = rows[1..]
            .iter()
            .map(|r| r.bytes_per_entry)
            .fold(f64::INFINITY, f64::min);
        println!(
            "| **ratio kvroute / Dynamo** | {:.2}x RadixTree | p99 {:.2}x best | p99 {:.2}x best | {:.3}x best | {:.2}x best |",
            ours.apply_blocks_per_s / tree.apply_blocks_per_s,
            ours.find[0].2.as_secs_f64() / best_p99(0).as_secs_f64(),
            ours.find[1].2.as_secs_f64() / best_p99(1).as_secs_f64(),
            ours.remove.as_secs_f64() / best_remove.as_secs_f64(),
            ours.bytes_per_entry / best_bytes,
        );
    }
}
