//! The index alone on the generated chat-trace workload (benches/support/workload.rs).
//!
//! ```text
//! cargo bench -p kvroute-index
//! ```
//!
//! The side-by-side comparison with NVIDIA Dynamo's indexers (percentiles, memory, 1024
//! workers) is `cargo run --release -p kvroute-index --features peer --example peer_compare`.

#![allow(missing_docs, clippy::expect_used)] // bench harness over constant inputs

#[path = "support/workload.rs"]
mod workload;

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use kvroute_index::{
    Index, IndexConfig, KvCacheEventData, Overlap, SequenceHash, WorkerId, WorkerKey,
};
use std::hint::black_box;
use std::time::Duration;

fn build(w: &workload::Workload) -> Index {
    let mut index = Index::new(IndexConfig::default());
    for event in &w.events {
        index
            .apply_event(event)
            .expect("generated events are consistent");
    }
    index
}

fn bench_apply(c: &mut Criterion) {
    let mut group = c.benchmark_group("apply");
    for workers in [16, 1024] {
        let w = workload::generate(workers, 200_000, 7);
        group.throughput(Throughput::Elements(w.entries));
        group.bench_function(format!("{workers}w/200k"), |b| {
            b.iter(|| black_box(build(&w).entries()))
        });
        let per_step = workload::Workload {
            events: workload::per_block(&w.events),
            ..w
        };
        group.bench_function(format!("{workers}w/200k/per-step"), |b| {
            b.iter(|| black_box(build(&per_step).entries()))
        });
    }
    group.finish();
}

fn bench_find_matches(c: &mut Criterion) {
    let w = workload::generate(16, 1_000_000, 7);
    let index = build(&w);
    let mut group = c.benchmark_group("find_matches");
    for len in [512usize, 4096] {
        let queries = workload::queries(&w, len, 256, 11);
        let mut next = 0;
        group.throughput(Throughput::Elements(len as u64));
        group.bench_with_input(BenchmarkId::new("16w/1M", len), &queries, |b, queries| {
            b.iter(|| {
                next = (next + 1) % queries.len();
                black_box(index.find_matches(&queries[next].hashes).workers.len())
            })
        });
    }
    group.finish();
}

/// The embedder APIs against the ones they stand beside: borrowed raw hashes against built
/// events, a reused lookup buffer against a fresh answer, the O(1) count against `stats`.
fn bench_embedder_api(c: &mut Criterion) {
    let w = workload::generate(16, 200_000, 7);
    // What an embedder holding its own hashes has: (worker, parent, raw u64 hashes) per store.
    let raw: Vec<(WorkerKey, Option<SequenceHash>, Vec<u64>)> = w
        .events
        .iter()
        .filter_map(|e| match &e.event.data {
            KvCacheEventData::Stored(s) => Some((
                WorkerKey::new(e.worker_id, e.event.dp_rank),
                s.parent_hash,
                s.blocks.iter().map(|b| b.block_hash.get()).collect(),
            )),
            _ => None,
        })
        .collect();
    let mut group = c.benchmark_group("embedder");
    group.throughput(Throughput::Elements(w.entries));
    group.bench_function("apply_event/16w/200k", |b| {
        b.iter(|| black_box(build(&w).entries()))
    });
    group.bench_function("apply_stored/16w/200k", |b| {
        b.iter(|| {
            let mut index = Index::new(IndexConfig::default());
            for (worker, parent, hashes) in &raw {
                let blocks = SequenceHash::from_raw_slice(hashes);
                index
                    .apply_stored(*worker, *parent, blocks)
                    .expect("consistent");
            }
            black_box(index.entries())
        })
    });
    let index = build(&w);
    let queries = workload::queries(&w, 512, 256, 11);
    group.throughput(Throughput::Elements(512));
    let mut next = 0;
    group.bench_function("find_matches/16w/200k/512", |b| {
        b.iter(|| {
            next = (next + 1) % queries.len();
            black_box(index.find_matches(&queries[next].hashes).workers.len())
        })
    });
    let mut out = Overlap::default();
    group.bench_function("find_matches_into/16w/200k/512", |b| {
        b.iter(|| {
            next = (next + 1) % queries.len();
            index.find_matches_into(&queries[next].hashes, &mut out);
            black_box(out.workers.len())
        })
    });
    group.throughput(Throughput::Elements(1));
    group.bench_function("entries/16w/200k", |b| {
        b.iter(|| black_box(index.entries()))
    });
    group.bench_function("stats/16w/200k", |b| {
        b.iter(|| black_box(index.stats().blocks))
    });
    group.finish();
}

fn bench_remove_and_snapshot(c: &mut Criterion) {
    let w = workload::generate(16, 1_000_000, 7);
    let index = build(&w);
    let snapshot = index.snapshot();
    let mut group = c.benchmark_group("whole_index");
    group.sample_size(10);
    group.bench_function("remove_worker/16w/1M", |b| {
        b.iter_batched(
            || Index::restore(&snapshot, IndexConfig::default()).expect("own snapshot"),
            |mut index| {
                index.remove_worker(WorkerId(3 % w.workers));
                index
            },
            BatchSize::PerIteration,
        )
    });
    group.throughput(Throughput::Elements(w.entries));
    group.bench_function("snapshot/16w/1M", |b| {
        b.iter(|| black_box(index.snapshot().len()))
    });
    group.bench_function("restore/16w/1M", |b| {
        b.iter(|| {
            let index = Index::restore(&snapshot, IndexConfig::default()).expect("own snapshot");
            black_box(index.stats().blocks)
        })
    });
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(20)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_apply, bench_find_matches, bench_embedder_api, bench_remove_and_snapshot
}
criterion_main!(benches);
