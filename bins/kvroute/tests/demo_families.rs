//! `kvroute demo --model-dir` end to end for the families beyond the bundled model: a Gemma 3
//! image request (a Gemma-3-shaped model directory: Gemma 3's special and newline tokens and
//! turn format, not Google's files; see tests/fixtures/models) and a Qwen2-VL video request
//! (the bundled Qwen2-VL files as a model directory). Each is sent twice: the repeat goes to
//! the same worker, which the gateway predicted as a cache hit and the worker reports.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use base64::Engine;
use kvroute_testsupport::{free_port, kvroute_command, Processes, Router};
use serde_json::json;
use std::path::{Path, PathBuf};

const BLOCK_SIZE: u64 = 16;

/// `kvroute demo` on a free port with the model directory `model_dir`; the process is killed
/// when the returned `Processes` drops.
async fn demo(model_dir: &Path) -> (Processes, Router) {
    let port = free_port();
    let mut processes = Processes::new();
    processes.spawn(
        "demo",
        kvroute_command(env!("CARGO_BIN_EXE_kvroute"))
            .args(["demo", "--workers", "2", "--block-size"])
            .arg(BLOCK_SIZE.to_string())
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--model-dir")
            .arg(model_dir),
    );
    processes.wait_for_port(port, "kvroute demo").await;
    (processes, Router::new(format!("http://127.0.0.1:{port}")))
}

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .join(path)
}

fn data_url(path: &Path, mime: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    let payload = base64::engine::general_purpose::STANDARD.encode(bytes);
    format!("data:{mime};base64,{payload}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gemma3_image_request_repeats_as_a_cache_hit() {
    let (_demo, router) = demo(&repo("tests/fixtures/models/gemma3-shaped")).await;
    let image = data_url(&repo("tests/fixtures/images/chelsea.png"), "image/png");
    let request = json!({"model": "Qwen/Qwen2-VL-2B-Instruct", "max_tokens": 1, "messages": [
        {"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image}},
            {"type": "text", "text": "What is in this image?"}]}]});
    let route = router.route(&request).await;
    // 256 soft tokens, wrapped: the span covers the "\n\n" tokens around them.
    assert_eq!(route["images"][0]["tokens"], 256);
    assert_eq!(route["media_spans"][0]["len"], 260);
    router
        .assert_repeat_is_cache_hit(&request, BLOCK_SIZE)
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_qwen2_vl_video_request_repeats_as_a_cache_hit() {
    // The bundled Qwen2-VL files, as a model directory.
    let assets = repo("crates/preprocess/assets/qwen2-vl");
    let dir = tempfile::tempdir().unwrap();
    for name in [
        "chat_template.jinja",
        "tokenizer_config.json",
        "preprocessor_config.json",
        "tokenizer.json.gz",
    ] {
        std::fs::copy(assets.join(name), dir.path().join(name)).unwrap();
    }
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "qwen2_vl"}"#,
    )
    .unwrap();
    let (_demo, router) = demo(dir.path()).await;
    let video = repo("crates/mmhash/tests/fixtures/videos/bars_640x360_100f_25fps.mp4");
    let request = json!({"model": "Qwen/Qwen2-VL-2B-Instruct", "max_tokens": 1, "messages": [
        {"role": "user", "content": [
            {"type": "video_url", "video_url": {"url": data_url(&video, "video/mp4")}},
            {"type": "text", "text": "What moves?"}]}]});
    let route = router.route(&request).await;
    // 32 of 100 frames, 16 pairs of 23x13 merged patches.
    assert_eq!(route["media_spans"][0]["len"], 16 * 23 * 13);
    router
        .assert_repeat_is_cache_hit(&request, BLOCK_SIZE)
        .await;
}
