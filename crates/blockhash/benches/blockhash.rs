//! Block and sequence hashing throughput, optionally side by side with NVIDIA Dynamo's own
//! implementation on identical inputs.
//!
//! ```text
//! cargo bench -p kvroute-blockhash                  # kvroute only
//! cargo bench -p kvroute-blockhash --features peer  # plus dynamo-kv-router 1.6.1
//! ```
//!
//! Inputs: prompts of 1k, 8k and 64k random token ids at block sizes 16, 32, 64 and 128,
//! text-only or with images (a 256-token image every 512 tokens, in Dynamo's per-block form so
//! both implementations read the same media description).

#![allow(missing_docs, clippy::expect_used)] // bench harness over constant inputs

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvroute_blockhash::{BlockHasher, NoMedia};
use kvroute_protocol::{BlockExtraInfo, BlockMmObjectInfo, MediaId};
use std::hint::black_box;
use std::time::Duration;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const BLOCK_SIZES: [u32; 4] = [16, 32, 64, 128];
const PROMPT_TOKENS: [usize; 3] = [1 << 10, 8 << 10, 64 << 10];
const IMAGE_TOKENS: usize = 256;
const IMAGE_EVERY: usize = 512;
const IMAGE_PAD: u32 = 151655;

struct Workload {
    name: String,
    tokens: Vec<u32>,
    block_size: u32,
    media: Option<Vec<Option<BlockExtraInfo>>>,
}

fn tokens(count: usize, with_media: bool) -> Vec<u32> {
    // A fixed xorshift stream: reproducible without a dependency.
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    (0..count)
        .map(|i| {
            if with_media && i % IMAGE_EVERY < IMAGE_TOKENS {
                return IMAGE_PAD;
            }
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % 151_936) as u32
        })
        .collect()
}

/// Per-block media info as Dynamo's `RequestExtraInfo::to_block_level` would build it.
fn block_media(count: usize, block_size: u32) -> Vec<Option<BlockExtraInfo>> {
    let b = block_size as usize;
    (0..count.div_ceil(b))
        .map(|block| {
            let (start, end) = (block * b, (block + 1) * b);
            let mm_objects: Vec<BlockMmObjectInfo> = (0..count / IMAGE_EVERY + 1)
                .filter_map(|image| {
                    let (s, e) = (image * IMAGE_EVERY, image * IMAGE_EVERY + IMAGE_TOKENS);
                    (s.max(start) < e.min(end)).then(|| BlockMmObjectInfo {
                        mm_hash: MediaId((image as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15)),
                        offsets: vec![(s.max(start) - start, e.min(end) - start)],
                    })
                })
                .collect();
            (!mm_objects.is_empty()).then_some(BlockExtraInfo { mm_objects })
        })
        .collect()
}

fn workloads() -> Vec<Workload> {
    let mut out = Vec::new();
    for with_media in [false, true] {
        for &count in &PROMPT_TOKENS {
            for &block_size in &BLOCK_SIZES {
                out.push(Workload {
                    name: format!(
                        "{}k/bs{block_size}/{}",
                        count >> 10,
                        if with_media { "media" } else { "text" }
                    ),
                    tokens: tokens(count, with_media),
                    block_size,
                    media: with_media.then(|| block_media(count, block_size)),
                });
            }
        }
    }
    out
}

fn bench_block_hashes(c: &mut Criterion) {
    let mut group = c.benchmark_group("block_hashes");
    for w in workloads() {
        group.throughput(Throughput::Elements(w.tokens.len() as u64));
        let hasher = BlockHasher::new(w.block_size).expect("non-zero block size");
        let mut out = Vec::new();
        group.bench_with_input(BenchmarkId::new("kvroute", &w.name), &w, |b, w| {
            b.iter(|| {
                out.clear();
                match &w.media {
                    Some(media) => hasher.block_hashes_into(black_box(&w.tokens), media, &mut out),
                    None => hasher.block_hashes_into(black_box(&w.tokens), &NoMedia, &mut out),
                }
                black_box(out.len())
            })
        });
        if w.media.is_none() {
            // The floor: one seeded XXH3 call per block, no media, no output type.
            let bs = w.block_size as usize;
            let mut raw: Vec<u64> = Vec::new();
            group.bench_with_input(BenchmarkId::new("bare_xxh3", &w.name), &w, |b, w| {
                b.iter(|| {
                    raw.clear();
                    raw.extend(black_box(&w.tokens).chunks_exact(bs).map(|block| {
                        xxh3_64_with_seed(bytemuck::cast_slice(block), kvroute_blockhash::BASE_SEED)
                    }));
                    black_box(raw.len())
                })
            });
        }
        #[cfg(feature = "peer")]
        peer::block_hashes(&mut group, &hasher, &w);
    }
    group.finish();
}

fn bench_sequence_hashes(c: &mut Criterion) {
    let mut group = c.benchmark_group("sequence_hashes");
    for w in workloads() {
        group.throughput(Throughput::Elements(w.tokens.len() as u64));
        let hasher = BlockHasher::new(w.block_size).expect("non-zero block size");
        let mut out = Vec::new();
        group.bench_with_input(BenchmarkId::new("kvroute", &w.name), &w, |b, w| {
            b.iter(|| {
                out.clear();
                match &w.media {
                    Some(media) => {
                        hasher.sequence_hashes_into(black_box(&w.tokens), media, &mut out)
                    }
                    None => hasher.sequence_hashes_into(black_box(&w.tokens), &NoMedia, &mut out),
                }
                black_box(out.len())
            })
        });
        #[cfg(feature = "peer")]
        peer::sequence_hashes(&mut group, &hasher, &w);
    }
    group.finish();
}

/// NVIDIA Dynamo's implementation (crate dynamo-kv-router 1.6.1) on the same inputs.
#[cfg(feature = "peer")]
mod peer {
    use super::*;
    use criterion::measurement::WallTime;
    use criterion::BenchmarkGroup;
    use dynamo_kv_router::protocols::{
        compute_block_hash_for_seq, compute_seq_hash_for_block, BlockExtraInfo as DynamoInfo,
        BlockHashOptions, BlockMmObjectInfo as DynamoObject,
    };

    fn dynamo_media(w: &Workload) -> Option<Vec<Option<DynamoInfo>>> {
        w.media.as_ref().map(|blocks| {
            blocks
                .iter()
                .map(|info| {
                    info.as_ref().map(|info| DynamoInfo {
                        mm_objects: info
                            .mm_objects
                            .iter()
                            .map(|o| DynamoObject {
                                mm_hash: o.mm_hash.get(),
                                offsets: o.offsets.clone(),
                            })
                            .collect(),
                    })
                })
                .collect()
        })
    }

    fn kvroute_block_hashes(hasher: &BlockHasher, w: &Workload, out: &mut Vec<u64>) {
        let mut blocks = Vec::with_capacity(w.tokens.len() / w.block_size as usize);
        match &w.media {
            Some(media) => hasher.block_hashes_into(&w.tokens, media, &mut blocks),
            None => hasher.block_hashes_into(&w.tokens, &NoMedia, &mut blocks),
        }
        out.clear();
        out.extend(blocks.iter().map(|b| b.get()));
    }

    /// Both implementations must agree on the input before their speed is compared.
    fn check_agreement(hasher: &BlockHasher, w: &Workload, media: Option<&[Option<DynamoInfo>]>) {
        let options = BlockHashOptions {
            block_mm_infos: media,
            ..Default::default()
        };
        let theirs: Vec<u64> = compute_block_hash_for_seq(&w.tokens, w.block_size, options)
            .iter()
            .map(|h| h.0)
            .collect();
        let mut ours = Vec::new();
        kvroute_block_hashes(hasher, w, &mut ours);
        assert_eq!(ours, theirs, "{}: kvroute and Dynamo disagree", w.name);
    }

    pub fn block_hashes(
        group: &mut BenchmarkGroup<'_, WallTime>,
        hasher: &BlockHasher,
        w: &Workload,
    ) {
        let media = dynamo_media(w);
        check_agreement(hasher, w, media.as_deref());
        group.bench_with_input(BenchmarkId::new("dynamo", &w.name), w, |b, w| {
            b.iter(|| {
                let options = BlockHashOptions {
                    block_mm_infos: media.as_deref(),
                    ..Default::default()
                };
                black_box(compute_block_hash_for_seq(
                    black_box(&w.tokens),
                    w.block_size,
                    options,
                ))
            })
        });
    }

    pub fn sequence_hashes(
        group: &mut BenchmarkGroup<'_, WallTime>,
        hasher: &BlockHasher,
        w: &Workload,
    ) {
        let media = dynamo_media(w);
        check_agreement(hasher, w, media.as_deref());
        group.bench_with_input(BenchmarkId::new("dynamo", &w.name), w, |b, w| {
            b.iter(|| {
                let options = BlockHashOptions {
                    block_mm_infos: media.as_deref(),
                    ..Default::default()
                };
                let blocks =
                    compute_block_hash_for_seq(black_box(&w.tokens), w.block_size, options);
                black_box(compute_seq_hash_for_block(&blocks))
            })
        });
    }
}

fn config() -> Criterion {
    Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30)
}

criterion_group! {
    name = benches;
    config = config();
    targets = bench_block_hashes, bench_sequence_hashes
}
criterion_main!(benches);
