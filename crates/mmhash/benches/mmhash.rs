//! Media id throughput and header-read latency.
//!
//! ```text
//! cargo bench -p kvroute-mmhash
//! ```
//!
//! * `media_id/*`: PNGs of random RGB noise (incompressible, so the encoded size is what is
//!   asked: about 100 KB, 1 MB and 10 MB), through [`MediaProcessor::prepare`] in `bytes` mode
//!   (header checks + blake3 of the file; default single-threaded, and with rayon from 0 bytes)
//!   and `pixels` mode (header checks + full decode + blake3 of RGB8), next to raw blake3 over
//!   the same bytes, single-threaded (`blake3::hash`) and multi-threaded (`update_rayon`).
//! * `header/*`: [`probe`] (format, dimensions, EXIF orientation, completeness checks) on every
//!   fixture image of tests/fixtures/images, the bad ones included, and on the noise PNGs above
//!   (the whole cost `bytes` mode adds to the raw hash).

#![allow(missing_docs, clippy::expect_used)] // bench harness over constant inputs

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use kvroute_mmhash::{probe, IdMode, MediaConfig, MediaProcessor};
use std::hint::black_box;
use std::time::Duration;

/// Sides giving about 100 KB, 1 MB and 10 MB of incompressible PNG.
const NOISE_SIDES: [(&str, u32); 3] = [("100KB", 183), ("1MB", 578), ("10MB", 1826)];

/// A PNG of `side` x `side` random RGB pixels (about 3 bytes per pixel encoded).
fn noise_png(side: u32) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    let pixels: Vec<u8> = (0..side as usize * side as usize * 3)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 32) as u8
        })
        .collect();
    let image = image::RgbImage::from_raw(side, side, pixels).expect("buffer size");
    let mut out = std::io::Cursor::new(Vec::new());
    image
        .write_to(&mut out, image::ImageFormat::Png)
        .expect("encode PNG");
    out.into_inner()
}

fn media_id(c: &mut Criterion) {
    let bytes_mode = MediaProcessor::new(MediaConfig::default());
    let pixels_mode = MediaProcessor::new(MediaConfig::default().with_id_mode(IdMode::Pixels));
    // rayon for every size, to show what it does at each one.
    let bytes_rayon = MediaProcessor::new(MediaConfig::default().with_parallel_hash_from(Some(0)));
    let mut group = c.benchmark_group("media_id");
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(3));
    group.sample_size(20);
    for (label, side) in NOISE_SIDES {
        let png = noise_png(side);
        group.throughput(Throughput::Bytes(png.len() as u64));
        // Each mode next to the raw hash it should match, so load drift between them is small.
        group.bench_with_input(BenchmarkId::new("raw_blake3", label), &png, |b, png| {
            b.iter(|| blake3::hash(black_box(png)))
        });
        group.bench_with_input(BenchmarkId::new("bytes_mode", label), &png, |b, png| {
            b.iter(|| {
                bytes_mode
                    .prepare(black_box(png), None, None)
                    .expect("valid PNG")
                    .id
            })
        });
        group.bench_with_input(
            BenchmarkId::new("raw_blake3_rayon", label),
            &png,
            |b, png| {
                b.iter(|| {
                    blake3::Hasher::new()
                        .update_rayon(black_box(png))
                        .finalize()
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("bytes_mode_rayon", label),
            &png,
            |b, png| {
                b.iter(|| {
                    bytes_rayon
                        .prepare(black_box(png), None, None)
                        .expect("valid PNG")
                        .id
                })
            },
        );
        group.bench_with_input(BenchmarkId::new("pixels_mode", label), &png, |b, png| {
            b.iter(|| {
                pixels_mode
                    .prepare(black_box(png), None, None)
                    .expect("valid PNG")
                    .id
            })
        });
    }
    group.finish();
}

fn header(c: &mut Criterion) {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/images");
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .expect("fixture dir")
        .map(|entry| entry.expect("dir entry").path())
        .filter(|path| {
            path.extension()
                .is_some_and(|ext| ext != "json" && ext != "md")
        })
        .collect();
    files.sort();
    let mut inputs: Vec<(String, Vec<u8>)> = files
        .iter()
        .map(|path| {
            let name = path
                .file_name()
                .expect("file name")
                .to_string_lossy()
                .into_owned();
            (name, std::fs::read(path).expect("fixture"))
        })
        .collect();
    // The media_id inputs too: the whole cost bytes mode adds to the raw hash.
    for (label, side) in NOISE_SIDES {
        inputs.push((format!("noise_{label}.png"), noise_png(side)));
    }
    let mut group = c.benchmark_group("header");
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(1));
    for (name, bytes) in &inputs {
        group.bench_with_input(BenchmarkId::from_parameter(name), bytes, |b, bytes| {
            b.iter(|| probe(black_box(bytes), None).is_ok())
        });
    }
    group.finish();
}

criterion_group!(benches, media_id, header);
criterion_main!(benches);
