//! Requests to prompts: template, tokenize, load images, expand placeholders.

use crate::error::PreprocessError;
use crate::model::ModelFiles;
use crate::request::{ChatRequest, CompletionPrompt, CompletionRequest, ImagePart};
use crate::template::ChatTemplate;
use crate::tokenize::{SegmentCacheConfig, SegmentCacheStats, TextTokenizer};
use kvroute_mmhash::{
    expand, ImageInfo, ImageTokens, MediaConfig, MediaProcessor, PlaceholderSpec, VisionTokenRule,
};
use kvroute_protocol::{MediaId, MediaSpan};
use serde_json::Value;

/// Preprocessing settings.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct PreprocessConfig {
    /// How images are loaded and identified (id mode, pixel and byte caps, URL fetching).
    pub media: MediaConfig,
    /// Refuse prompts longer than this many tokens (visual tokens included).
    pub max_prompt_tokens: Option<usize>,
    /// The tokenization cache for conversation segments; `None` turns it off.
    pub segment_cache: Option<SegmentCacheConfig>,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            media: MediaConfig::default(),
            max_prompt_tokens: None,
            segment_cache: Some(SegmentCacheConfig::default()),
        }
    }
}

impl PreprocessConfig {
    /// Sets how images are loaded and identified.
    pub fn with_media(mut self, media: MediaConfig) -> Self {
        self.media = media;
        self
    }

    /// Sets the prompt length limit.
    pub fn with_max_prompt_tokens(mut self, limit: usize) -> Self {
        self.max_prompt_tokens = Some(limit);
        self
    }

    /// Sets (or with `None` turns off) the segment cache.
    pub fn with_segment_cache(mut self, cache: Option<SegmentCacheConfig>) -> Self {
        self.segment_cache = cache;
        self
    }
}

/// One image of a prompt.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PromptImage {
    /// The media id hashed into the blocks.
    pub id: MediaId,
    /// The identity to forward to the engine as the image part's `uuid` (vLLM
    /// `multi_modal_uuids`), so engine and router hash the same image the same way: the
    /// client's own `uuid` when it sent one.
    pub forward_uuid: String,
    /// Visual tokens the engine gives the image.
    pub tokens: usize,
    /// Format and dimensions.
    pub info: ImageInfo,
}

/// A request as the engine will see it.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Prompt {
    /// Token ids, every image placeholder expanded to its visual tokens.
    pub tokens: Vec<u32>,
    /// Where each image's tokens are, in prompt order.
    pub media: Vec<MediaSpan>,
    /// The images, in prompt order.
    pub images: Vec<PromptImage>,
}

/// Turns OpenAI requests into [`Prompt`]s for one model. Build once, share (`Sync`).
#[derive(Debug)]
pub struct Preprocessor {
    template: ChatTemplate,
    tokenizer: TextTokenizer,
    media: MediaProcessor,
    vision: Option<VisionTokenRule>,
    placeholder: Option<PlaceholderSpec>,
    max_prompt_tokens: Option<usize>,
}

impl Preprocessor {
    /// A preprocessor for the model in `files`.
    ///
    /// A model whose type has no visual token rule still serves text-only requests; requests
    /// with images are then refused with a clear error rather than routed on a guess.
    pub fn new(files: &ModelFiles, config: PreprocessConfig) -> Result<Self, PreprocessError> {
        let tokenizer = TextTokenizer::from_bytes(
            &files.tokenizer_json,
            files.end_of_turn.as_deref(),
            config.segment_cache,
        )?;
        let template = ChatTemplate::new(&files.chat_template, files.special_tokens.clone())?;
        let vision = files
            .model_type
            .as_deref()
            .and_then(|model_type| VisionTokenRule::for_model_type(model_type).ok())
            .map(|rule| with_checkpoint_pixels(rule, files.preprocessor_config.as_ref()));
        let placeholder = placeholder_for(files.model_type.as_deref(), &tokenizer);
        Ok(Self {
            template,
            tokenizer,
            media: MediaProcessor::new(config.media),
            vision,
            placeholder,
            max_prompt_tokens: config.max_prompt_tokens,
        })
    }

    /// Renders, tokenizes and expands a chat request.
    pub async fn chat(&self, request: &ChatRequest<'_>) -> Result<Prompt, PreprocessError> {
        let text = self.template.render(
            &request.template_messages,
            request.add_generation_prompt,
            &request.template_kwargs,
        )?;
        let tokens = self.tokenizer.encode_chat(&text)?;
        let prompt = if request.images.is_empty() {
            Prompt {
                tokens,
                media: Vec::new(),
                images: Vec::new(),
            }
        } else {
            self.expand_images(tokens, &request.images).await?
        };
        self.check_length(prompt)
    }

    /// Tokenizes a completion request (text gets the tokenizer's special tokens, as engines
    /// do for plain prompts; token ids are used as given).
    pub fn completion(&self, request: &CompletionRequest) -> Result<Prompt, PreprocessError> {
        let tokens = match &request.prompt {
            CompletionPrompt::Text(text) => self.tokenizer.encode_with_special_tokens(text)?,
            CompletionPrompt::Tokens(ids) => ids.clone(),
        };
        self.check_length(Prompt {
            tokens,
            media: Vec::new(),
            images: Vec::new(),
        })
    }

    /// The tokenizer (and its cache statistics).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Statistics of the segment cache.
    pub fn cache_stats(&self) -> SegmentCacheStats {
        self.tokenizer.cache_stats()
    }

    async fn expand_images(
        &self,
        tokens: Vec<u32>,
        parts: &[ImagePart<'_>],
    ) -> Result<Prompt, PreprocessError> {
        let (Some(vision), Some(placeholder)) = (&self.vision, &self.placeholder) else {
            return Err(PreprocessError::InvalidRequest {
                message: "this model takes no images (no visual token rule for its model type)"
                    .to_owned(),
                param: parts.first().map(ImagePart::param),
            });
        };
        let loads = parts.iter().map(|part| async move {
            self.media
                .load(&part.url, part.uuid.as_deref())
                .await
                .map_err(|source| PreprocessError::Image {
                    param: part.param(),
                    source,
                })
        });
        let loaded = futures_util::future::try_join_all(loads).await?;

        let mut images = Vec::with_capacity(parts.len());
        let mut counts = Vec::with_capacity(parts.len());
        for (part, loaded) in parts.iter().zip(loaded) {
            let image = loaded.image;
            let count = vision
                .tokens(image.info.width, image.info.height)
                .map_err(|source| PreprocessError::VisualTokens {
                    param: part.param(),
                    source,
                })? as usize;
            counts.push(ImageTokens {
                id: image.id,
                tokens: count,
            });
            images.push(PromptImage {
                id: image.id,
                forward_uuid: part
                    .uuid
                    .clone()
                    .unwrap_or_else(|| kvroute_mmhash::forward_uuid(image.id)),
                tokens: count,
                info: image.info,
            });
        }
        let expanded =
            expand(&tokens, placeholder, &counts).map_err(PreprocessError::Placeholders)?;
        Ok(Prompt {
            tokens: expanded.tokens,
            media: expanded.spans,
            images,
        })
    }

    fn check_length(&self, prompt: Prompt) -> Result<Prompt, PreprocessError> {
        match self.max_prompt_tokens {
            Some(limit) if prompt.tokens.len() > limit => Err(PreprocessError::PromptTooLong {
                tokens: prompt.tokens.len(),
                limit,
            }),
            _ => Ok(prompt),
        }
    }
}

/// The checkpoint's own pixel limits (`min_pixels`/`max_pixels`, or `size.shortest_edge` /
/// `size.longest_edge` in newer configs) override the family defaults, as the engine loads them.
fn with_checkpoint_pixels(rule: VisionTokenRule, config: Option<&Value>) -> VisionTokenRule {
    let (VisionTokenRule::SmartResize(mut resize), Some(config)) = (&rule, config) else {
        return rule;
    };
    let get = |flat: &str, nested: &str| {
        config
            .get(flat)
            .or_else(|| config.get("size")?.get(nested))
            .and_then(Value::as_u64)
    };
    if let Some(min) = get("min_pixels", "shortest_edge") {
        resize.min_pixels = min;
    }
    if let Some(max) = get("max_pixels", "longest_edge") {
        resize.max_pixels = max;
    }
    VisionTokenRule::SmartResize(resize)
}

/// The token the template renders once per image and the processor repeats once per visual
/// token: Qwen-VL's `<|image_pad|>`, LLaVA's `<image>`. Families whose processor inserts more
/// than repeated pads (Gemma 3 wraps them in text) have none yet, so their images are refused
/// rather than routed on a wrong expansion.
fn placeholder_for(model_type: Option<&str>, tokenizer: &TextTokenizer) -> Option<PlaceholderSpec> {
    let model_type = model_type?.to_ascii_lowercase();
    let token = if model_type.starts_with("qwen") {
        "<|image_pad|>"
    } else if model_type.starts_with("llava") {
        "<image>"
    } else {
        return None;
    };
    tokenizer.token_id(token).map(PlaceholderSpec::repeat)
}
