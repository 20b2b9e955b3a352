//! `kvroute tokens`: the prompt of a chat request with an image and a video, its media spans
//! and counts, and its `--format hash` output accepted by `kvroute hash`.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use base64::Engine;
use serde_json::{json, Value};
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn kvroute(args: &[&str], stdin: &[u8]) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn data_url(path: &str, mime: &str) -> String {
    let bytes = std::fs::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../..")
            .join(path),
    );
    let payload = base64::engine::general_purpose::STANDARD.encode(bytes.unwrap());
    format!("data:{mime};base64,{payload}")
}

#[test]
fn prints_tokens_spans_and_counts() {
    let request = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url("tests/fixtures/images/coffee_tiny_40x30.png", "image/png")}},
        {"type": "video_url", "video_url": {"url": data_url("crates/mmhash/tests/fixtures/videos/bars_176x144_7f.mp4", "video/mp4")}},
        {"type": "text", "text": "Compare."}]}]})
    .to_string();
    let out = kvroute(&["tokens"], request.as_bytes());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let prompt: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(prompt["images"][0]["tokens"], 6);
    assert_eq!(prompt["videos"][0]["tokens"], 120);
    assert_eq!(prompt["videos"][0]["frames_sampled"], 7);
    let spans = prompt["media_spans"].as_array().unwrap();
    assert_eq!(
        (spans[0]["len"].as_u64(), spans[1]["len"].as_u64()),
        (Some(6), Some(120))
    );
    let tokens = prompt["tokens"].as_array().unwrap();
    assert_eq!(
        prompt["prompt_tokens"].as_u64().unwrap(),
        tokens.len() as u64
    );

    let hash_input = kvroute(&["tokens", "--format", "hash", "-"], request.as_bytes());
    assert!(hash_input.status.success());
    let hashed = kvroute(&["hash", "--block-size", "16"], &hash_input.stdout);
    assert!(
        hashed.status.success(),
        "{}",
        String::from_utf8_lossy(&hashed.stderr)
    );
    let blocks: Value = serde_json::from_slice(&hashed.stdout).unwrap();
    assert_eq!(blocks["token_count"].as_u64().unwrap(), tokens.len() as u64);
}

#[test]
fn a_refused_video_is_a_clear_error() {
    let request = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": data_url("crates/mmhash/tests/fixtures/videos/bars_320x240_30f.mkv", "video/x-matroska")}}]}]})
    .to_string();
    let out = kvroute(&["tokens"], request.as_bytes());
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("messages[0].content[0]") && stderr.contains("not an MP4"),
        "{stderr}"
    );
}
