//! From an OpenAI request to the exact token ids and media spans the engine will see.
//!
//! It owns request parsing and validation ([`ChatRequest`], [`CompletionRequest`]), Hugging
//! Face chat templates ([`ChatTemplate`], rendered as transformers renders them), tokenization
//! with an exact cache of conversation segments ([`TextTokenizer`]), and image and video
//! expansion through `kvroute-mmhash` ([`Preprocessor`]) for every family it counts (Qwen2-VL,
//! Qwen2.5-VL, Qwen3-VL, LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Gemma 3, InternVL3,
//! Mistral 3, Pixtral, Llama 4, Phi-4-multimodal; videos for Qwen2-VL and Qwen2.5-VL). A default
//! model, Qwen2-VL, is built in
//! ([`ModelFiles::bundled_qwen2_vl`]) so nothing needs downloading.
//!
//! It does not hash blocks (`kvroute-blockhash` takes a [`Prompt`]'s tokens and media spans),
//! route, or speak HTTP; errors carry the OpenAI error body ([`PreprocessError::to_error_body`])
//! for the server to send.
//!
//! # Example
//!
//! ```
//! use kvroute_preprocess::{ChatRequest, ModelFiles, PreprocessConfig, Preprocessor};
//!
//! let model = ModelFiles::bundled_qwen2_vl()?;
//! let preprocessor = Preprocessor::new(&model, PreprocessConfig::default())?;
//! let request = ChatRequest::from_json(br#"{"model": "Qwen/Qwen2-VL-2B-Instruct",
//!     "messages": [{"role": "user", "content": [
//!         {"type": "image_url", "image_url": {"url": "data:image/gif;base64,R0lGODlhAQABAAAAACwAAAAAAQABAAACAkQBADs="}},
//!         {"type": "text", "text": "What is in this image?"}]}]}"#)?;
//! let runtime = tokio::runtime::Builder::new_current_thread().build()?;
//! let prompt = runtime.block_on(preprocessor.chat(&request))?;
//! // A 1x1 image is scaled up to 56x56 pixels: 4 visual tokens between vision start and end.
//! assert_eq!(prompt.media.len(), 1);
//! assert_eq!(prompt.media[0].len, 4);
//! assert_eq!(prompt.tokens[prompt.media[0].start - 1], 151652); // <|vision_start|>
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod fast_path;
mod model;
mod preprocessor;
mod request;
mod template;
mod tokenize;
mod unicode_classes;

pub use error::PreprocessError;
pub use model::ModelFiles;
pub use preprocessor::{PreprocessConfig, Preprocessor, Prompt, PromptImage, PromptVideo};
pub use request::{ChatRequest, CompletionPrompt, CompletionRequest, ImagePart, Role};
pub use template::ChatTemplate;
pub use tokenize::{SegmentCacheConfig, SegmentCacheStats, TextTokenizer};
