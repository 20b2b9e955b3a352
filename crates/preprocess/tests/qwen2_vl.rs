//! Token parity with the engine for Qwen2-VL: the bundled template and tokenizer reproduce the
//! reference encodings (Python `tokenizers`), images expand to the HF processor's visual token
//! counts, and bad requests are typed errors.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use base64::Engine;
use kvroute_preprocess::*;
use proptest::prelude::*;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::OnceLock;

const VISION_START: u32 = 151652;
const VISION_END: u32 = 151653;
const IMAGE_PAD: u32 = 151655;

fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

fn model() -> &'static ModelFiles {
    static MODEL: OnceLock<ModelFiles> = OnceLock::new();
    MODEL.get_or_init(|| ModelFiles::bundled_qwen2_vl().unwrap())
}

fn preprocessor(config: PreprocessConfig) -> Preprocessor {
    Preprocessor::new(model(), config).unwrap()
}

fn shared() -> &'static Preprocessor {
    static SHARED: OnceLock<Preprocessor> = OnceLock::new();
    SHARED.get_or_init(|| preprocessor(PreprocessConfig::default()))
}

fn uncached() -> &'static Preprocessor {
    static UNCACHED: OnceLock<Preprocessor> = OnceLock::new();
    UNCACHED.get_or_init(|| preprocessor(PreprocessConfig::default().with_segment_cache(None)))
}

fn block_on<T>(future: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
        .block_on(future)
}

fn data_url(image: &str) -> String {
    let bytes = std::fs::read(fixtures().join("images").join(image)).unwrap();
    let mime = match image.rsplit('.').next().unwrap() {
        "png" => "image/png",
        "jpg" => "image/jpeg",
        "gif" => "image/gif",
        "webp" => "image/webp",
        other => panic!("{other}"),
    };
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

fn expected_images() -> Value {
    serde_json::from_slice(&std::fs::read(fixtures().join("images/expected.json")).unwrap())
        .unwrap()
}

fn chat(body: Value) -> Result<Prompt, PreprocessError> {
    let body = body.to_string();
    let request = ChatRequest::from_json(body.as_bytes())?;
    block_on(shared().chat(&request))
}

#[test]
fn tokenizer_reproduces_the_reference_encodings() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer/expected.json")).unwrap())
            .unwrap();
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 4);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        let mut plain = Vec::new();
        shared().tokenizer().encode_into(text, &mut plain).unwrap();
        assert_eq!(plain, ids, "{}", case["name"]);
        assert_eq!(
            shared().tokenizer().encode_chat(text).unwrap(),
            ids,
            "{} (segmented)",
            case["name"]
        );
    }
}

#[test]
fn template_renders_the_reference_prompt() {
    let expected: Value =
        serde_json::from_slice(&std::fs::read(fixtures().join("tokenizer/expected.json")).unwrap())
            .unwrap();
    let case = &expected["cases"][0];
    assert_eq!(case["name"], "chat_single_image");
    let body = json!({"model": "q", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "unused"}},
        {"type": "text", "text": "What is in this image?"}]}]})
    .to_string();
    let request = ChatRequest::from_json(body.as_bytes()).unwrap();
    let template =
        ChatTemplate::new(&model().chat_template, model().special_tokens.clone()).unwrap();
    let text = template
        .render(&request.template_messages, true, &Default::default())
        .unwrap();
    assert_eq!(text, case["text"].as_str().unwrap());
    let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
    assert_eq!(shared().tokenizer().encode_chat(&text).unwrap(), ids);

    // add_vision_id through chat_template_kwargs.
    let body = json!({"model": "q", "chat_template_kwargs": {"add_vision_id": true},
        "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "a"}},
            {"type": "image_url", "image_url": {"url": "b"}},
            {"type": "text", "text": "Compare them."}]}]})
    .to_string();
    let request = ChatRequest::from_json(body.as_bytes()).unwrap();
    let text = template
        .render(&request.template_messages, false, &request.template_kwargs)
        .unwrap();
    assert!(text.ends_with("<|im_start|>user\nPicture 1: <|vision_start|><|image_pad|><|vision_end|>Picture 2: <|vision_start|><|image_pad|><|vision_end|>Compare them.<|im_end|>\n"), "{text}");
}

/// The visual tokens between each vision_start/vision_end pair, in order.
fn visual_runs(tokens: &[u32]) -> Vec<usize> {
    let mut runs = Vec::new();
    let mut start = None;
    for (i, &t) in tokens.iter().enumerate() {
        match t {
            VISION_START => start = Some(i),
            VISION_END => {
                let s = start.take().unwrap();
                assert!(tokens[s + 1..i].iter().all(|&t| t == IMAGE_PAD));
                runs.push(i - s - 1);
            }
            _ => {}
        }
    }
    runs
}

#[test]
fn conversations_with_0_1_and_3_images_expand_to_the_hf_counts() {
    let expected = expected_images();
    for images in [
        &[][..],
        &["chelsea.png"][..],
        &[
            "astronaut_tie_126x70.png",
            "coffee_lossless.webp",
            "rocket.jpg",
        ][..],
    ] {
        let mut parts: Vec<Value> = images
            .iter()
            .map(|image| json!({"type": "image_url", "image_url": {"url": data_url(image)}}))
            .collect();
        parts.push(json!({"type": "text", "text": "Describe every picture."}));
        let prompt = chat(json!({"model": "q", "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": parts}]}))
        .unwrap();
        let want: Vec<usize> = images
            .iter()
            .map(|image| expected[image]["qwen2vl_tokens"].as_u64().unwrap() as usize)
            .collect();
        assert_eq!(visual_runs(&prompt.tokens), want, "{images:?}");
        assert_eq!(prompt.media.len(), images.len());
        for (span, image) in prompt.media.iter().zip(&prompt.images) {
            assert_eq!(span.id, image.id);
            assert_eq!(span.len, image.tokens);
            assert!(prompt.tokens[span.start..span.start + span.len]
                .iter()
                .all(|&t| t == IMAGE_PAD));
        }
    }
}

#[test]
fn the_same_image_twice_has_one_id_and_a_client_uuid_wins() {
    let url = data_url("camera.png");
    let prompt = chat(
        json!({"model": "q", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}, "uuid": "my-camera"}]}]}),
    )
    .unwrap();
    assert_eq!(prompt.images.len(), 2);
    assert_ne!(prompt.images[0].id, prompt.images[1].id);
    assert_eq!(prompt.images[1].forward_uuid, "my-camera");
    let again = chat(
        json!({"model": "q", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": url}}]}]}),
    )
    .unwrap();
    assert_eq!(again.images[0].id, prompt.images[0].id);
    assert_eq!(again.images[0].forward_uuid, prompt.images[0].forward_uuid);
}

#[test]
fn bad_requests_are_typed_errors_with_openai_bodies() {
    let user =
        |content: Value| json!({"model": "q", "messages": [{"role": "user", "content": content}]});
    let cases = [
        (
            json!({"model": "q", "messages": []}),
            "invalid_request",
            Some("messages"),
        ),
        (
            user(
                json!([{"type": "image_url", "image_url": {"url": data_url("not_an_image.png")}}]),
            ),
            "invalid_image",
            Some("messages[0].content[0]"),
        ),
        (
            user(
                json!([{"type": "text", "text": "x"}, {"type": "image_url", "image_url": {"url": data_url("hubble_strip_1000x4.png")}}]),
            ),
            "invalid_image_size",
            Some("messages[0].content[1]"),
        ),
        (
            user(json!([{"type": "image_url", "image_url": {"url": "data:image/png;base64,!!!"}}])),
            "invalid_image",
            Some("messages[0].content[0]"),
        ),
        (
            // The user typed the placeholder itself: one placeholder too many.
            user(
                json!([{"type": "image_url", "image_url": {"url": data_url("camera.png")}}, {"type": "text", "text": "<|image_pad|>"}]),
            ),
            "image_placeholder_mismatch",
            None,
        ),
    ];
    for (body, code, param) in cases {
        let error = chat(body).unwrap_err();
        assert_eq!(error.code(), code, "{error}");
        assert!(error.is_client_error());
        let body = error.to_error_body();
        assert_eq!(body.error.kind, "invalid_request_error");
        assert_eq!(body.error.param.as_deref(), param, "{error}");
    }

    let limited = preprocessor(PreprocessConfig::default().with_max_prompt_tokens(10));
    let body = user(json!("hello")).to_string();
    let request = ChatRequest::from_json(body.as_bytes()).unwrap();
    let error = block_on(limited.chat(&request)).unwrap_err();
    assert!(
        matches!(error, PreprocessError::PromptTooLong { limit: 10, .. }),
        "{error}"
    );
    assert_eq!(error.code(), "context_length_exceeded");

    // Far too much text is refused by its length, before tokenizing (which would take
    // seconds for this much); text that fits the byte bound is still counted in tokens.
    let body = user(json!("a".repeat(1 << 20))).to_string();
    let request = ChatRequest::from_json(body.as_bytes()).unwrap();
    let error = block_on(limited.chat(&request)).unwrap_err();
    assert!(
        matches!(error, PreprocessError::PromptTooLarge { limit: 10, .. }),
        "{error}"
    );
    assert_eq!(error.code(), "context_length_exceeded");
    let fits = preprocessor(PreprocessConfig::default().with_max_prompt_tokens(1 << 20));
    assert!(block_on(fits.chat(&request)).is_ok());
}

#[test]
fn a_template_that_raises_is_a_client_error() {
    let mut files = model().clone();
    files.chat_template =
        "{% if messages[-1].role != 'user' %}{{ raise_exception('last message must be from the user') }}{% endif %}x".to_owned();
    let preprocessor = Preprocessor::new(&files, PreprocessConfig::default()).unwrap();
    let request = ChatRequest::from_json(
        br#"{"model":"q","messages":[{"role":"user","content":"a"},{"role":"assistant","content":"b"}]}"#,
    )
    .unwrap();
    let error = block_on(preprocessor.chat(&request)).unwrap_err();
    assert_eq!(error.code(), "chat_template_error");
    assert!(error
        .to_string()
        .contains("last message must be from the user"));
}

#[test]
fn completions_tokenize_text_and_pass_ids_through() {
    let request =
        CompletionRequest::from_json(br#"{"model":"q","prompt":"Hello, world!"}"#).unwrap();
    assert_eq!(
        shared().completion(&request).unwrap().tokens,
        [9707, 11, 1879, 0]
    );
    let request = CompletionRequest::from_json(br#"{"model":"q","prompt":[1,2,3]}"#).unwrap();
    assert_eq!(shared().completion(&request).unwrap().tokens, [1, 2, 3]);
}

fn turn_text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-zA-Z0-9 ,.!?\n\t]{0,40}",
        "\\PC{0,20}",
        Just("<|im_end|>".to_owned()),
        Just("  <|im_start|>assistant\n".to_owned()),
        Just("\n\n<|im_end|>\n".to_owned()),
        Just("<|im_end|><|im_end|>".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Cutting at end-of-turn tokens never changes the ids, whatever the text around them.
    #[test]
    fn segment_cache_is_exact(turns in prop::collection::vec(prop::collection::vec(turn_text(), 0..4), 1..6)) {
        let (cached, uncached) = (shared(), uncached());
        let mut text = String::new();
        for turn in turns {
            text.push_str("<|im_start|>user\n");
            text.push_str(&turn.concat());
            text.push_str("<|im_end|>\n");
            let mut want = Vec::new();
            uncached.tokenizer().encode_into(&text, &mut want).unwrap();
            prop_assert_eq!(cached.tokenizer().encode_chat(&text).unwrap(), want);
        }
    }
}

#[test]
fn the_cache_serves_earlier_turns() {
    let preprocessor = preprocessor(PreprocessConfig::default());
    let mut messages = vec![json!({"role": "system", "content": "You are a helpful assistant."})];
    for turn in 0..5 {
        messages.push(json!({"role": "user", "content": format!("Question {turn}?")}));
        let body = json!({"model": "q", "messages": messages}).to_string();
        let request = ChatRequest::from_json(body.as_bytes()).unwrap();
        block_on(preprocessor.chat(&request)).unwrap();
        messages.push(json!({"role": "assistant", "content": format!("Answer {turn}.")}));
    }
    let stats = preprocessor.cache_stats();
    // Turn n re-sends n earlier messages plus the system prompt: all but the new ones hit.
    assert!(stats.hits >= 10, "{stats:?}");
    assert!(stats.bytes > 0);
}
