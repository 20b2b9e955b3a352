//! Preprocessing cost: parsing `loadgen`'s 704 KB image request, a 2k-token chat with one
//! photo, the 10th turn of a growing conversation with and without the segment cache, and
//! tokenization alone through Hugging Face's pipeline and through the fast path that
//! `TextTokenizer` uses.
//!
//! ```text
//! cargo bench -p kvroute-preprocess
//! ```

#![allow(missing_docs, clippy::expect_used)] // bench harness over fixed inputs

use base64::Engine;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvroute_preprocess::{ChatRequest, ModelFiles, PreprocessConfig, Preprocessor};
use serde_json::{json, Value};
use std::hint::black_box;
use std::time::{Duration, Instant};

const WORDS: &[&str] = &[
    "the",
    "router",
    "predicts",
    "which",
    "worker",
    "holds",
    "cached",
    "blocks",
    "for",
    "every",
    "request",
    "image",
    "prefix",
    "tokens",
    "engine",
    "latency",
    "throughput",
    "memory",
    "policy",
    "conversation",
    "assistant",
    "question",
    "answer",
    "because",
    "network",
    "model",
    "vision",
];

/// One paragraph of ordinary English, as `loadgen` sends it (before its request number).
const PARAGRAPH: &str = include_str!("../../../tests/fixtures/text/paragraph_en.txt");

/// The same paragraph in Chinese (non-ASCII text takes the normalizer and Unicode classes).
const PARAGRAPH_ZH: &str = include_str!("../../../tests/fixtures/text/paragraph_zh.txt");

/// Roughly `tokens` tokens of English-like text, different for every `seed`.
fn text(tokens: usize, seed: usize) -> String {
    (0..tokens)
        .map(|i| WORDS[(i * 7 + seed * 13 + i / 5) % WORDS.len()])
        .collect::<Vec<_>>()
        .join(" ")
}

fn photo_url() -> String {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/hubble_deep_field.jpg"
    );
    let bytes = std::fs::read(path).expect("fixture image");
    format!(
        "data:image/jpeg;base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A conversation of `turns` user turns (about 200 tokens each, assistant answers of about 200),
/// ending with the user's `turns`-th question, whose text `unique` makes new.
fn conversation(turns: usize, unique: usize) -> Vec<u8> {
    let mut messages = vec![json!({"role": "system", "content": text(300, 0)})];
    for turn in 1..turns {
        messages.push(json!({"role": "user", "content": text(200, turn)}));
        messages.push(json!({"role": "assistant", "content": text(200, turn + 1000)}));
    }
    messages.push(json!({"role": "user", "content": format!("{} {unique}", text(200, turns))}));
    json!({"model": "qwen2-vl", "messages": messages})
        .to_string()
        .into_bytes()
}

fn bench(c: &mut Criterion) {
    let model = ModelFiles::bundled_qwen2_vl().expect("bundled model");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    let cached = Preprocessor::new(&model, PreprocessConfig::default()).expect("preprocessor");
    let uncached = Preprocessor::new(&model, PreprocessConfig::default().with_segment_cache(None))
        .expect("preprocessor");

    // `loadgen`'s image request: the photo as a 704 KB data URL and one short sentence. Parsing
    // alone (the URL is borrowed, scanned once).
    let image_request = json!({"model": "qwen2-vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": photo_url()}},
        {"type": "text", "text": "Describe this image in one sentence."}]}],
        "max_tokens": 4, "temperature": 0});
    let image_request = image_request.to_string().into_bytes();
    let mut parse = c.benchmark_group("parse");
    parse.throughput(Throughput::Bytes(image_request.len() as u64));
    parse.bench_function("image_request", |b| {
        b.iter(|| ChatRequest::from_json(black_box(&image_request)).expect("request"))
    });
    parse.finish();

    let mut group = c.benchmark_group("preprocess");
    let body: Value = json!({"model": "qwen2-vl", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": photo_url()}},
        {"type": "text", "text": text(2000, 1)}]}]});
    let body = body.to_string().into_bytes();
    let prompt = runtime
        .block_on(uncached.chat(&ChatRequest::from_json(&body).expect("request")))
        .expect("prompt");
    eprintln!(
        "chat_2k_text_1_photo: {} tokens, {} visual",
        prompt.tokens.len(),
        prompt.images[0].tokens
    );
    group.bench_function("chat_2k_text_1_photo/parse+render+tokenize+image", |b| {
        b.iter(|| {
            let request = ChatRequest::from_json(black_box(&body)).expect("request");
            runtime.block_on(uncached.chat(&request)).expect("prompt")
        })
    });

    // Warm the cache with turns 1..=9, as a live conversation would have.
    for turn in 1..10 {
        let body = conversation(turn, 0);
        let request = ChatRequest::from_json(&body).expect("request");
        runtime.block_on(cached.chat(&request)).expect("prompt");
    }
    let tenth = conversation(10, 0);
    let tenth = ChatRequest::from_json(&tenth).expect("request");
    let prompt = runtime.block_on(uncached.chat(&tenth)).expect("prompt");
    eprintln!("tenth_turn: {} tokens", prompt.tokens.len());
    let mut unique = 0;
    for (name, preprocessor) in [("segment_cache", &cached), ("no_cache", &uncached)] {
        group.bench_function(format!("tenth_turn/{name}"), |b| {
            // Only `chat` is timed: each request is new (built and parsed untimed).
            b.iter_custom(|iters| {
                let mut timed = Duration::ZERO;
                for _ in 0..iters {
                    unique += 1;
                    let body = conversation(10, unique);
                    let request = ChatRequest::from_json(&body).expect("request");
                    let started = Instant::now();
                    let prompt = runtime
                        .block_on(preprocessor.chat(&request))
                        .expect("prompt");
                    timed += started.elapsed();
                    black_box(prompt);
                }
                timed
            })
        });
    }
    group.finish();

    let mut group = c.benchmark_group("tokenize");
    let tokenizer = uncached.tokenizer();
    let prompt =
        format!("<|im_start|>user\n{PARAGRAPH} 1234567<|im_end|>\n<|im_start|>assistant\n");
    let chinese = format!("<|im_start|>user\n{}<|im_end|>\n", PARAGRAPH_ZH.repeat(4));
    for (name, text) in [
        ("paragraph", prompt),
        ("2k_words", text(2000, 1)),
        ("chinese", chinese),
    ] {
        let mut ids = Vec::new();
        tokenizer.encode_into(&text, &mut ids).expect("tokens");
        let pipeline = tokenizer
            .inner()
            .encode_fast(text.as_str(), false)
            .expect("tokens");
        assert_eq!(ids, pipeline.get_ids(), "the fast path is exact");
        eprintln!("{name}: {} bytes, {} tokens", text.len(), ids.len());
        group.bench_function(format!("{name}/hugging_face"), |b| {
            b.iter(|| {
                tokenizer
                    .inner()
                    .encode_fast(black_box(text.as_str()), false)
                    .expect("tokens")
            })
        });
        group.bench_function(format!("{name}/fast_path"), |b| {
            b.iter(|| {
                ids.clear();
                tokenizer
                    .encode_into(black_box(&text), &mut ids)
                    .expect("tokens");
                ids.len()
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(4)).sample_size(30);
    targets = bench
}
criterion_main!(benches);
