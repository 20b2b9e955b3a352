//! Request bodies as the gateway reads them: `/v1/chat/completions` and `/v1/completions`
//! parsed and validated, then what parses is preprocessed as the gateway would (template,
//! tokenizer, `data:` images and videos) with the bundled Qwen2-VL model. Every refusal must
//! be a typed error with an OpenAI error body, never a panic.

#![no_main]

use kvroute_preprocess::{
    ChatRequest, CompletionRequest, ModelFiles, PreprocessConfig, PreprocessError, Preprocessor,
};
use libfuzzer_sys::fuzz_target;
use std::sync::OnceLock;

struct Setup {
    preprocessor: Preprocessor,
    runtime: tokio::runtime::Runtime,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let model = ModelFiles::bundled_qwen2_vl().expect("the bundled model loads");
        // The gateway's default prompt bound keeps each input's work small.
        let config = PreprocessConfig::default().with_max_prompt_tokens(32_768);
        Setup {
            preprocessor: Preprocessor::new(&model, config).expect("the bundled model builds"),
            runtime: tokio::runtime::Builder::new_current_thread()
                .build()
                .expect("a runtime"),
        }
    })
}

/// What the gateway does with a refusal: its error body must be writable.
fn refused(error: &PreprocessError) {
    let _ = error.to_error_body();
}

fuzz_target!(|body: &[u8]| {
    let setup = setup();
    match ChatRequest::from_json(body) {
        Ok(request) => match setup.runtime.block_on(setup.preprocessor.chat(&request)) {
            Ok(prompt) => {
                for span in &prompt.media {
                    assert!(
                        span.start + span.len <= prompt.tokens.len(),
                        "media span past the prompt"
                    );
                }
            }
            Err(error) => refused(&error),
        },
        Err(error) => refused(&error),
    }
    match CompletionRequest::from_json(body) {
        Ok(request) => match setup.preprocessor.completion(&request) {
            Ok(_) => {}
            Err(error) => refused(&error),
        },
        Err(error) => refused(&error),
    }
});
