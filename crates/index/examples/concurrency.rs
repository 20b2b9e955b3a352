//! Lookup latency while one writer applies a long batch of events: the measurement behind
//! [`kvroute_index::SharedIndex`]'s design.
//!
//! ```text
//! cargo run --release -p kvroute-index --example concurrency
//! ```
//!
//! A 16-worker index of 1M (worker, block) entries (benches/support/workload.rs) takes a
//! batch of 1M more entries from 16 new workers while a lookup thread runs 512-block
//! find_matches back to back. Modes: no writer; a reader-writer lock the writer holds for the
//! whole batch; `SharedIndex` (the lock handed over fairly every 256 blocks, long events cut).

#![allow(missing_docs, clippy::expect_used, clippy::unwrap_used)] // benchmark harness

#[path = "../benches/support/workload.rs"]
mod workload;

use kvroute_index::{Index, IndexConfig, SharedIndex};
use kvroute_protocol::{KvCacheEventData, RouterEvent, WorkerId};
use parking_lot::RwLock;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use workload::Sequence;

fn build(events: &[RouterEvent]) -> Index {
    let mut index = Index::new(IndexConfig::default());
    for event in events {
        index.apply_event(event).expect("consistent workload");
    }
    index
}

/// Runs `lookup` over `queries` until `write` returns; returns lookup latencies and write time.
fn race(
    queries: &[Sequence],
    lookup: &(dyn Fn(&Sequence) + Sync),
    write: &dyn Fn(),
) -> (Vec<Duration>, Duration) {
    let done = AtomicBool::new(false);
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| {
            let mut times = Vec::new();
            for q in queries.iter().cycle() {
                if done.load(Ordering::Relaxed) {
                    break;
                }
                let start = Instant::now();
                lookup(q);
                times.push(start.elapsed());
            }
            times
        });
        std::thread::sleep(Duration::from_millis(20));
        let start = Instant::now();
        write();
        let took = start.elapsed();
        std::thread::sleep(Duration::from_millis(20));
        done.store(true, Ordering::Relaxed);
        (reader.join().unwrap(), took)
    })
}

fn report(name: &str, mut times: Vec<Duration>, write: Option<Duration>) {
    times.sort();
    let at = |p: f64| times[((times.len() - 1) as f64 * p) as usize].as_secs_f64() * 1e6;
    let slow = times
        .iter()
        .filter(|t| **t > Duration::from_micros(200))
        .count();
    println!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} | {:.1} | {slow} | {} |",
        times.len(),
        at(0.5),
        at(0.99),
        at(0.999),
        at(1.0),
        write.map_or("-".into(), |d| format!("{:.1}", d.as_secs_f64() * 1e3)),
    );
}

fn main() {
    let base = workload::generate(16, 1_000_000, 0x5EED ^ 16);
    let mut batch = workload::generate(16, 1_000_000, 99).events;
    for event in &mut batch {
        event.worker_id = WorkerId(event.worker_id.get() + 100);
    }
    let queries = workload::queries(&base, 512, 1000, 1);
    println!(
        "{} workers, {} entries; batch: {} events, {} entries\n",
        base.workers,
        base.entries,
        batch.len(),
        batch
            .iter()
            .map(|e| match &e.event.data {
                KvCacheEventData::Stored(s) => s.blocks.len(),
                _ => 0,
            })
            .sum::<usize>()
    );
    println!("| mode | lookups | p50 (µs) | p99 (µs) | p99.9 (µs) | max (µs) | lookups > 200 µs | batch apply (ms) |");
    println!("|---|---|---|---|---|---|---|---|");

    let index = build(&base.events);
    let (times, _) = race(&queries, &|q| drop(index.find_matches(&q.hashes)), &|| {
        std::thread::sleep(Duration::from_millis(100))
    });
    report("no writer", times, None);

    let locked = RwLock::new(build(&base.events));
    let (times, took) = race(
        &queries,
        &|q| drop(locked.read().find_matches(&q.hashes)),
        &|| {
            let mut index = locked.write();
            for event in &batch {
                index.apply_event(event).expect("consistent workload");
            }
        },
    );
    report("RwLock held for the batch", times, Some(took));

    let shared = SharedIndex::new(build(&base.events));
    let (times, took) = race(&queries, &|q| drop(shared.find_matches(&q.hashes)), &|| {
        assert!(shared.apply_events(&batch).is_empty());
    });
    report(
        "SharedIndex (fair hand-over every 256 blocks)",
        times,
        Some(took),
    );
}
