//! Families beyond the bundled Qwen2-VL: Gemma 3's text-wrapped images (against the tokenizer
//! run on the processor's own textual expansion), Llama 4's tiles (against the ids
//! transformers' Llama4Processor gave the same conversation), Qwen2-VL videos, and the typed
//! refusals of what is not counted.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use base64::Engine;
use kvroute_preprocess::*;
use serde_json::{json, Value};
use std::path::{Path, PathBuf};

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn data_url(path: &Path, mime: &str) -> String {
    let bytes = std::fs::read(path).unwrap();
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn image_url(name: &str) -> String {
    data_url(&fixtures().join("images").join(name), "image/png")
}

fn video_url(name: &str) -> String {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mmhash/tests/fixtures/videos");
    data_url(&dir.join(name), "video/mp4")
}

fn run(preprocessor: &Preprocessor, body: &Value) -> Result<Prompt, PreprocessError> {
    let body = body.to_string();
    let request = ChatRequest::from_json(body.as_bytes())?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap();
    runtime.block_on(preprocessor.chat(&request))
}

fn gemma3() -> (ModelFiles, Preprocessor) {
    let files = ModelFiles::from_dir(&fixtures().join("models/gemma3-shaped")).unwrap();
    let preprocessor = Preprocessor::new(&files, PreprocessConfig::default()).unwrap();
    (files, preprocessor)
}

#[test]
fn gemma3_images_expand_as_the_processor_writes_them() {
    let (files, preprocessor) = gemma3();
    let body = json!({"model": "m", "messages": [
        {"role": "user", "content": [
            {"type": "text", "text": "Look:"},
            {"type": "image_url", "image_url": {"url": image_url("chelsea.png")}},
            {"type": "image_url", "image_url": {"url": image_url("coffee.png")}},
            {"type": "text", "text": "Which is brighter?"}]}]});
    let prompt = run(&preprocessor, &body).unwrap();

    // The processor's text: each <start_of_image> becomes "\n\n<start_of_image>", 256 soft
    // tokens, "<end_of_image>\n\n"; the whole text is then tokenized.
    let tokenizer = tokenizers::Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
    let soft = "<image_soft_token>".repeat(256);
    let image = format!("\n\n<start_of_image>{soft}<end_of_image>\n\n");
    let text = format!(
        "<bos><start_of_turn>user\nLook:{image}{image}Which is brighter?<end_of_turn>\n<start_of_turn>model\n"
    );
    let expected = tokenizer.encode(text.as_str(), false).unwrap();
    assert_eq!(prompt.tokens, expected.get_ids());

    // vLLM's placeholder range: from the token holding the leading "\n\n" (here merged with
    // nothing: "Look:" then "\n\n"; between the images "\n\n\n\n" is one token shared by both
    // spans), 260 tokens.
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    assert_eq!(prompt.media.len(), 2);
    for span in &prompt.media {
        assert_eq!(span.len, 260);
        assert_eq!(prompt.tokens[span.start + 1], id("<start_of_image>"));
        assert_eq!(prompt.tokens[span.start + 258], id("<end_of_image>"));
    }
    assert_eq!(prompt.tokens[prompt.media[0].start], id("\n\n"));
    assert_eq!(prompt.tokens[prompt.media[1].start], id("\n\n\n\n"));
    assert_eq!(prompt.media[0].end() - 1, prompt.media[1].start);
    assert_eq!(prompt.images[0].tokens, 256);
}

#[test]
fn gemma3_newlines_merge_with_the_template_text() {
    let (files, preprocessor) = gemma3();
    // The template renders "user\n" right before the image: "\n" + "\n\n" is one token.
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url("coffee_tiny_40x30.png")}}]}]});
    let prompt = run(&preprocessor, &body).unwrap();
    let tokenizer = tokenizers::Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
    let start = prompt.media[0].start;
    assert_eq!(
        prompt.tokens[start],
        tokenizer.token_to_id("\n\n\n").unwrap()
    );
    assert_eq!(prompt.media[0].len, 260);
}

#[test]
fn qwen2_vl_videos_expand_between_vision_start_and_end() {
    let preprocessor = Preprocessor::new(
        &ModelFiles::bundled_qwen2_vl().unwrap(),
        PreprocessConfig::default(),
    )
    .unwrap();
    let body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url("coffee_tiny_40x30.png")}},
        {"type": "video_url", "video_url": {"url": video_url("bars_640x360_100f_25fps.mp4")}},
        {"type": "text", "text": "What moves?"}]}]});
    let prompt = run(&preprocessor, &body).unwrap();
    assert_eq!(prompt.images.len(), 1);
    assert_eq!(prompt.videos.len(), 1);
    let video = &prompt.videos[0];
    // vLLM keeps 32 of the 100 frames: 16 pairs of 23x13 merged patches (644x364).
    assert_eq!((video.frames, video.tokens), (32, 16 * 23 * 13));
    assert_eq!(prompt.media.len(), 2);
    let span = prompt.media[1];
    assert_eq!(span.len, video.tokens);
    assert_eq!(span.id, video.id);
    assert_eq!(prompt.tokens[span.start - 1], 151652); // <|vision_start|>
    assert_eq!(prompt.tokens[span.end()], 151653); // <|vision_end|>
    assert!(prompt.tokens[span.start..span.end()]
        .iter()
        .all(|&t| t == 151656)); // <|video_pad|>
    assert!(prompt.media[0].end() < span.start);

    // The same bytes are the same id; a client uuid wins and is forwarded.
    let again = run(&preprocessor, &body).unwrap();
    assert_eq!(again.videos[0].id, video.id);
    let mut with_uuid = body.clone();
    with_uuid["messages"][0]["content"][1]["uuid"] = json!("clip-7");
    let prompt = run(&preprocessor, &with_uuid).unwrap();
    assert_eq!(prompt.videos[0].forward_uuid, "clip-7");
    assert_ne!(prompt.videos[0].id, video.id);
}

#[test]
fn what_is_not_counted_is_refused_with_a_reason() {
    let video = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url("bars_320x240_30f.mp4")}}]}]});
    // Gemma 3 takes no videos.
    let (_, gemma) = gemma3();
    let error = run(&gemma, &video).unwrap_err();
    assert_eq!(error.code(), "unsupported_media");
    assert_eq!(error.param(), Some("messages[0].content[0]"));

    let qwen = Preprocessor::new(
        &ModelFiles::bundled_qwen2_vl().unwrap(),
        PreprocessConfig::default(),
    )
    .unwrap();
    // A Matroska file: only MP4 headers are read.
    let mut mkv = video.clone();
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../mmhash/tests/fixtures/videos");
    mkv["messages"][0]["content"][0]["video_url"]["url"] = json!(data_url(
        &dir.join("bars_320x240_30f.mkv"),
        "video/x-matroska"
    ));
    let error = run(&qwen, &mkv).unwrap_err();
    assert!(error.to_string().contains("not an MP4"), "{error}");
    // Per-request frame sampling under the loader's sampling: the engine's count is unknown.
    let mut fps = video.clone();
    fps["mm_processor_kwargs"] = json!({"fps": 1.0});
    let error = run(&qwen, &fps).unwrap_err();
    assert_eq!(error.param(), Some("mm_processor_kwargs"));

    // vLLM writes remote-code Phi-4-multimodal's placeholders into the text itself.
    let dir = tempfile::tempdir().unwrap();
    let bundled = ModelFiles::bundled_qwen2_vl().unwrap();
    std::fs::write(dir.path().join("tokenizer.json"), &bundled.tokenizer_json).unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        &bundled.chat_template,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("config.json"),
        r#"{"model_type": "phi4mm"}"#,
    )
    .unwrap();
    let phi4mm = Preprocessor::new(
        &ModelFiles::from_dir(dir.path()).unwrap(),
        PreprocessConfig::default(),
    )
    .unwrap();
    let image = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_url("coffee.png")}}]}]});
    let error = run(&phi4mm, &image).unwrap_err();
    assert_eq!(error.code(), "unsupported_media");
    assert!(error.to_string().contains("phi4_multimodal"), "{error}");
}

#[test]
fn fps_sampling_takes_the_request_fps() {
    let config =
        PreprocessConfig::default().with_video_sampling(kvroute_mmhash::FrameSampling::Fps {
            fps: 2.0,
            min_frames: 4,
            max_frames: 768,
        });
    let qwen = Preprocessor::new(&ModelFiles::bundled_qwen2_vl().unwrap(), config).unwrap();
    let mut body = json!({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "video_url", "video_url": {"url": video_url("bars_640x360_100f_25fps.mp4")}}]}]});
    // 4 s at 2 fps: 8 frames.
    assert_eq!(run(&qwen, &body).unwrap().videos[0].frames, 8);
    body["mm_processor_kwargs"] = json!({"fps": 4});
    assert_eq!(run(&qwen, &body).unwrap().videos[0].frames, 16);
}

fn llama4_dir() -> PathBuf {
    fixtures().join("models/llama4-shaped")
}

#[test]
fn llama4_images_expand_into_tiles_as_its_processor_does() {
    let files = ModelFiles::from_dir(&llama4_dir()).unwrap();
    let preprocessor = Preprocessor::new(&files, PreprocessConfig::default()).unwrap();
    // make_llama4_shaped.py ran Llama4Processor on this conversation.
    let expected: Value =
        serde_json::from_slice(&std::fs::read(llama4_dir().join("expected.json")).unwrap())
            .unwrap();
    let mut messages = expected["messages"].clone();
    let images = expected["images"].as_array().unwrap();
    let mut next = images.iter();
    for part in messages[0]["content"].as_array_mut().unwrap() {
        if part["type"] == "image" {
            let name = next.next().unwrap().as_str().unwrap();
            *part = json!({"type": "image_url", "image_url": {"url": image_url(name)}});
        }
    }
    let prompt = run(&preprocessor, &json!({"model": "m", "messages": messages})).unwrap();
    let ids: Vec<u32> = serde_json::from_value(expected["input_ids"].clone()).unwrap();
    assert_eq!(prompt.tokens, ids);

    // chelsea.png (451x300) is two tiles side by side and the global tile; the 40x30 coffee
    // one tile. Each span runs from <|image_start|> to <|image_end|>, as vLLM reports it.
    assert_eq!(prompt.images[0].tokens, 3 * 144);
    assert_eq!(prompt.images[1].tokens, 144);
    let tokenizer = tokenizers::Tokenizer::from_bytes(&files.tokenizer_json).unwrap();
    let id = |t: &str| tokenizer.token_to_id(t).unwrap();
    for span in &prompt.media {
        assert_eq!(prompt.tokens[span.start], id("<|image_start|>"));
        assert_eq!(prompt.tokens[span.end() - 1], id("<|image_end|>"));
    }
    assert_eq!(prompt.media[0].len, 1 + 2 * 144 + 2 + 1 + 144 + 1);
    assert_eq!(prompt.media[1].len, 1 + 1 + 144 + 1);

    // The checkpoint's max_patches is the engine's: with one tile allowed, no local tiles.
    let dir = tempfile::tempdir().unwrap();
    for file in std::fs::read_dir(llama4_dir()).unwrap() {
        let file = file.unwrap().path();
        std::fs::copy(&file, dir.path().join(file.file_name().unwrap())).unwrap();
    }
    std::fs::write(
        dir.path().join("preprocessor_config.json"),
        r#"{"max_patches": 1, "size": {"height": 336, "width": 336}}"#,
    )
    .unwrap();
    let one_tile = Preprocessor::new(
        &ModelFiles::from_dir(dir.path()).unwrap(),
        PreprocessConfig::default(),
    )
    .unwrap();
    let prompt = run(&one_tile, &json!({"model": "m", "messages": messages})).unwrap();
    assert_eq!(prompt.images[0].tokens, 144);
}
