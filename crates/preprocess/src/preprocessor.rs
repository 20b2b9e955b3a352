//! Requests to prompts: template, tokenize, load images, expand placeholders.

use crate::error::PreprocessError;
use crate::model::ModelFiles;
use crate::request::{ChatRequest, CompletionPrompt, CompletionRequest, ImagePart};
use crate::template::ChatTemplate;
use crate::tokenize::{SegmentCacheConfig, SegmentCacheStats, TextTokenizer};
use kvroute_mmhash::{
    expand_mixed, FrameSampling, ImageInfo, ImageTokens, MediaConfig, MediaProcessor,
    PlaceholderSpec, PlaceholderTokens, QwenVideo, SmartResize, TokenError, VideoInfo,
    VisionTokenRule,
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
    /// How the engine samples video frames (vLLM's default: 32 frames spread evenly).
    pub video_sampling: FrameSampling,
}

impl Default for PreprocessConfig {
    fn default() -> Self {
        Self {
            media: MediaConfig::default(),
            max_prompt_tokens: None,
            segment_cache: Some(SegmentCacheConfig::default()),
            video_sampling: FrameSampling::VLLM_DEFAULT,
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

    /// Sets how the engine samples video frames: what vLLM's `--media-io-kwargs '{"video":
    /// {"num_frames": N}}'` says ([`FrameSampling::Uniform`]), or, with `num_frames` -1 and the
    /// processor sampling, [`FrameSampling::Fps`].
    pub fn with_video_sampling(mut self, sampling: FrameSampling) -> Self {
        self.video_sampling = sampling;
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

/// One video of a prompt.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct PromptVideo {
    /// The media id hashed into the blocks (of the file's bytes, or of the client's `uuid`).
    pub id: MediaId,
    /// The identity to forward to the engine as the part's `uuid`, as for images.
    pub forward_uuid: String,
    /// Visual tokens the engine gives the video.
    pub tokens: usize,
    /// Frames the engine samples (before pairing them into temporal patches).
    pub frames: u64,
    /// What the file's header says.
    pub info: VideoInfo,
}

/// A request as the engine will see it.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Prompt {
    /// Token ids, every image and video placeholder expanded to its visual tokens.
    pub tokens: Vec<u32>,
    /// Where each image's and video's tokens are, in prompt order.
    pub media: Vec<MediaSpan>,
    /// The images, in prompt order.
    pub images: Vec<PromptImage>,
    /// The videos, in prompt order.
    pub videos: Vec<PromptVideo>,
}

impl Prompt {
    fn text(tokens: Vec<u32>) -> Self {
        Self {
            tokens,
            media: Vec::new(),
            images: Vec::new(),
            videos: Vec::new(),
        }
    }
}

/// Turns OpenAI requests into [`Prompt`]s for one model. Build once, share (`Sync`).
#[derive(Debug)]
pub struct Preprocessor {
    template: ChatTemplate,
    tokenizer: TextTokenizer,
    media: MediaProcessor,
    vision: Result<VisionTokenRule, TokenError>,
    placeholder: Option<PlaceholderSpec>,
    /// Gemma 3: the placeholder's text and what replaces it before tokenizing (the
    /// processor's `"\n\n"` around the image).
    text_around: Option<(String, String)>,
    video: Result<(QwenVideo, PlaceholderSpec), TokenError>,
    max_prompt_tokens: Option<usize>,
    /// Text longer than this cannot fit `max_prompt_tokens` tokens, however it tokenizes.
    max_prompt_bytes: Option<usize>,
}

impl Preprocessor {
    /// A preprocessor for the model in `files`.
    ///
    /// A model whose type has no visual token rule still serves text-only requests; requests
    /// with images (or videos) are then refused with a clear error rather than routed on a
    /// guess.
    pub fn new(files: &ModelFiles, config: PreprocessConfig) -> Result<Self, PreprocessError> {
        let tokenizer = TextTokenizer::from_bytes(
            &files.tokenizer_json,
            files.end_of_turn.as_deref(),
            config.segment_cache,
        )?;
        let template = ChatTemplate::new(&files.chat_template, files.special_tokens.clone())?;
        let model_type = files.model_type.as_deref().unwrap_or("");
        let vision = VisionTokenRule::for_model_type(model_type)
            .map(|rule| with_checkpoint_config(rule, files.preprocessor_config.as_ref()))
            .and_then(|rule| placed_by_template(model_type, rule));
        let tokens = PlaceholderTokens::for_model_type(model_type);
        let placeholder = tokens.and_then(|tokens| tokens.resolve(|t| tokenizer.token_id(t)));
        let text_around = tokens.and_then(|tokens| {
            let around = tokens.text_around?;
            let placeholder = tokens.placeholder;
            Some((
                placeholder.to_owned(),
                format!("{around}{placeholder}{around}"),
            ))
        });
        let video = video_rule(model_type, files, config.video_sampling, &tokenizer);
        // A token's vocabulary entry is at least as long as the bytes it stands for (byte-level
        // BPE maps each byte to one character of one or two UTF-8 bytes), so this bound never
        // refuses a prompt that would fit.
        let longest_token = tokenizer
            .inner()
            .get_vocab(true)
            .keys()
            .map(String::len)
            .max()
            .unwrap_or(1)
            .max(1);
        let max_prompt_bytes = config
            .max_prompt_tokens
            .map(|tokens| tokens.saturating_mul(longest_token));
        Ok(Self {
            template,
            tokenizer,
            media: MediaProcessor::new(config.media),
            vision,
            placeholder,
            text_around,
            video,
            max_prompt_tokens: config.max_prompt_tokens,
            max_prompt_bytes,
        })
    }

    /// Renders, tokenizes and expands a chat request.
    pub async fn chat(&self, request: &ChatRequest<'_>) -> Result<Prompt, PreprocessError> {
        let text = self.template.render(
            &request.template_messages,
            request.add_generation_prompt,
            &request.template_kwargs,
        )?;
        self.check_bytes(&text)?;
        let prompt = if request.images.is_empty() && request.videos.is_empty() {
            Prompt::text(self.tokenizer.encode_chat(&text)?)
        } else {
            let text = match &self.text_around {
                Some((placeholder, replacement)) if !request.images.is_empty() => {
                    text.replace(placeholder.as_str(), replacement)
                }
                _ => text,
            };
            let tokens = self.tokenizer.encode_chat(&text)?;
            self.expand_media(tokens, request).await?
        };
        self.check_length(prompt)
    }

    /// Tokenizes a completion request (text gets the tokenizer's special tokens, as engines
    /// do for plain prompts; token ids are used as given).
    pub fn completion(&self, request: &CompletionRequest) -> Result<Prompt, PreprocessError> {
        let tokens = match &request.prompt {
            CompletionPrompt::Text(text) => {
                self.check_bytes(text)?;
                self.tokenizer.encode_with_special_tokens(text)?
            }
            CompletionPrompt::Tokens(ids) => ids.clone(),
        };
        self.check_length(Prompt::text(tokens))
    }

    /// The tokenizer (and its cache statistics).
    pub fn tokenizer(&self) -> &TextTokenizer {
        &self.tokenizer
    }

    /// Statistics of the segment cache.
    pub fn cache_stats(&self) -> SegmentCacheStats {
        self.tokenizer.cache_stats()
    }

    async fn expand_media(
        &self,
        tokens: Vec<u32>,
        request: &ChatRequest<'_>,
    ) -> Result<Prompt, PreprocessError> {
        let (images, image_tokens) = self.load_images(&request.images).await?;
        let (videos, video_tokens) = self.load_videos(request).await?;
        // Images and videos in conversation order (message, part), as the template renders
        // their placeholders.
        type At = (usize, usize);
        let mut items: Vec<(At, (&PlaceholderSpec, ImageTokens))> =
            Vec::with_capacity(images.len() + videos.len());
        if let Some(spec) = &self.placeholder {
            let at = request.images.iter().map(|p| (p.message, p.part));
            items.extend(at.zip(image_tokens.into_iter().map(|t| (spec, t))));
        }
        if let Ok((_, spec)) = &self.video {
            let at = request.videos.iter().map(|p| (p.message, p.part));
            items.extend(at.zip(video_tokens.into_iter().map(|t| (spec, t))));
        }
        items.sort_by_key(|(at, _)| *at);
        let items: Vec<_> = items.into_iter().map(|(_, item)| item).collect();
        let expanded = expand_mixed(&tokens, &items).map_err(PreprocessError::Placeholders)?;
        Ok(Prompt {
            tokens: expanded.tokens,
            media: expanded.spans,
            images,
            videos,
        })
    }

    async fn load_images(
        &self,
        parts: &[ImagePart<'_>],
    ) -> Result<(Vec<PromptImage>, Vec<ImageTokens>), PreprocessError> {
        let Some(first) = parts.first() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let vision = match (&self.vision, &self.placeholder) {
            (Ok(vision), Some(_)) => vision,
            (Err(source @ TokenError::Unsupported { .. }), _) => {
                return Err(PreprocessError::VisualTokens {
                    param: first.param(),
                    source: source.clone(),
                })
            }
            _ => {
                return Err(PreprocessError::InvalidRequest {
                    message: "this model takes no images (no visual token rule for its model type)"
                        .to_owned(),
                    param: Some(first.param()),
                })
            }
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
            let (layout, count) = vision
                .layout(image.info.width, image.info.height)
                .and_then(|layout| Ok((layout, layout.tokens().ok_or(TokenError::Overflow)?)))
                .map_err(|source| PreprocessError::VisualTokens {
                    param: part.param(),
                    source,
                })?;
            let id = image.id;
            counts.push(ImageTokens { id, layout });
            images.push(PromptImage {
                id,
                forward_uuid: forward_uuid(part, id),
                tokens: count,
                info: image.info,
            });
        }
        Ok((images, counts))
    }

    async fn load_videos(
        &self,
        request: &ChatRequest<'_>,
    ) -> Result<(Vec<PromptVideo>, Vec<ImageTokens>), PreprocessError> {
        let parts = &request.videos;
        let Some(first) = parts.first() else {
            return Ok((Vec::new(), Vec::new()));
        };
        let (rule, _) = self
            .video
            .as_ref()
            .map_err(|source| PreprocessError::VisualTokens {
                param: first.param(),
                source: source.clone(),
            })?;
        let rule = with_request_sampling(*rule, request.field("mm_processor_kwargs")).map_err(
            |message| PreprocessError::InvalidRequest {
                message: message.to_owned(),
                param: Some("mm_processor_kwargs".to_owned()),
            },
        )?;
        let loads = parts.iter().map(|part| async move {
            self.media
                .load_video(&part.url, part.uuid.as_deref())
                .await
                .map_err(|source| PreprocessError::Image {
                    param: part.param(),
                    source,
                })
        });
        let loaded = futures_util::future::try_join_all(loads).await?;
        let mut videos = Vec::with_capacity(parts.len());
        let mut counts = Vec::with_capacity(parts.len());
        for (part, video) in parts.iter().zip(loaded) {
            let count = |info: &VideoInfo| {
                let frames = rule.sampling.frames(info, rule.temporal_patch)?;
                let tokens =
                    usize::try_from(rule.tokens(info)?).map_err(|_| TokenError::Overflow)?;
                Ok((frames, tokens))
            };
            let (frames, tokens) =
                count(&video.info).map_err(|source| PreprocessError::VisualTokens {
                    param: part.param(),
                    source,
                })?;
            counts.push(ImageTokens::new(video.id, tokens));
            videos.push(PromptVideo {
                id: video.id,
                forward_uuid: forward_uuid(part, video.id),
                tokens,
                frames,
                info: video.info,
            });
        }
        Ok((videos, counts))
    }

    /// The cheap bound, before tokenizing: tens of megabytes of text would otherwise be
    /// tokenized in full only to be refused.
    fn check_bytes(&self, text: &str) -> Result<(), PreprocessError> {
        match (self.max_prompt_bytes, self.max_prompt_tokens) {
            (Some(bytes), Some(limit)) if text.len() > bytes => {
                Err(PreprocessError::PromptTooLarge {
                    bytes: text.len(),
                    limit,
                })
            }
            _ => Ok(()),
        }
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

/// The client's own `uuid` when it sent one, else the content id's marker form.
fn forward_uuid(part: &ImagePart<'_>, id: MediaId) -> String {
    part.uuid
        .clone()
        .unwrap_or_else(|| kvroute_mmhash::forward_uuid(id))
}

/// Families whose image placeholder the engine writes itself rather than the chat template:
/// vLLM's remote-code Phi-4-multimodal (`phi4mm`) inserts `<|image_N|>` text into the message
/// (its template takes strings only) and replaces that, which kvroute does not emulate.
fn placed_by_template(
    model_type: &str,
    rule: VisionTokenRule,
) -> Result<VisionTokenRule, TokenError> {
    if model_type.eq_ignore_ascii_case("phi4mm") {
        return Err(TokenError::Unsupported {
            model_type: model_type.to_owned(),
            reason: "vLLM writes its <|image_N|> placeholders into the text itself, which kvroute \
                     does not emulate; serve the transformers checkpoint (phi4_multimodal)",
        });
    }
    Ok(rule)
}

/// The checkpoint's own processor settings override the family defaults, as the engine loads
/// them: Qwen's pixel limits (`min_pixels`/`max_pixels`, or `size.shortest_edge` /
/// `size.longest_edge` in newer configs), LLaVA-NeXT's and LLaVA-OneVision's
/// `image_grid_pinpoints`, Llama 4's `max_patches` and `resize_to_max_canvas`,
/// Phi-4-multimodal's `dynamic_hd`.
fn with_checkpoint_config(rule: VisionTokenRule, config: Option<&Value>) -> VisionTokenRule {
    let Some(config) = config else {
        return rule;
    };
    let number = |key: &str| {
        config
            .get(key)
            .and_then(Value::as_u64)
            .and_then(|n| u32::try_from(n).ok())
    };
    match rule {
        VisionTokenRule::SmartResize(resize) => {
            VisionTokenRule::SmartResize(with_pixel_limits(resize, config))
        }
        VisionTokenRule::AnyRes(mut anyres) => {
            let pinpoints = config
                .get("image_grid_pinpoints")
                .and_then(Value::as_array)
                .and_then(|points| {
                    points
                        .iter()
                        .map(|point| {
                            let side = |i: usize| u32::try_from(point.get(i)?.as_u64()?).ok();
                            Some((side(0)?, side(1)?))
                        })
                        .collect::<Option<Vec<_>>>()
                });
            if let Some(pinpoints) = pinpoints.filter(|p| !p.is_empty()) {
                anyres.grid_pinpoints = pinpoints;
            }
            VisionTokenRule::AnyRes(anyres)
        }
        VisionTokenRule::Llama4(mut tiles) => {
            if let Some(max) = number("max_patches") {
                tiles.max_tiles = max;
            }
            if let Some(max_canvas) = config.get("resize_to_max_canvas").and_then(Value::as_bool) {
                tiles.resize_to_max_canvas = max_canvas;
            }
            VisionTokenRule::Llama4(tiles)
        }
        VisionTokenRule::DynamicHd(mut crops) => {
            if let Some(max) = number("dynamic_hd") {
                crops.max_crops = max;
            }
            VisionTokenRule::DynamicHd(crops)
        }
        other => other,
    }
}

fn with_pixel_limits(mut resize: SmartResize, config: &Value) -> SmartResize {
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
    resize
}

/// The video rule of a model: Qwen2-VL and Qwen2.5-VL, with the pixel limits transformers'
/// video processor loads (`video_preprocessor_config.json`, else `preprocessor_config.json`).
fn video_rule(
    model_type: &str,
    files: &ModelFiles,
    sampling: FrameSampling,
    tokenizer: &TextTokenizer,
) -> Result<(QwenVideo, PlaceholderSpec), TokenError> {
    match model_type.to_ascii_lowercase().as_str() {
        "qwen2_vl" | "qwen2_5_vl" => {
            let pad = tokenizer
                .token_id("<|video_pad|>")
                .ok_or(TokenError::Unsupported {
                    model_type: model_type.to_owned(),
                    reason: "its tokenizer has no <|video_pad|> token",
                })?;
            let mut rule = QwenVideo {
                sampling,
                ..QwenVideo::QWEN2_VL
            };
            let config = files
                .video_preprocessor_config
                .as_ref()
                .or(files.preprocessor_config.as_ref());
            if let Some(config) = config {
                rule.resize = with_pixel_limits(rule.resize, config);
                if let Some(t) = config.get("temporal_patch_size").and_then(Value::as_u64) {
                    rule.temporal_patch = t;
                }
            }
            Ok((rule, PlaceholderSpec::repeat(pad)))
        }
        "qwen3_vl" | "qwen3_vl_moe" => Err(TokenError::Unsupported {
            model_type: model_type.to_owned(),
            reason: "Qwen3-VL writes each frame's timestamp into the prompt, which depends on the \
                     engine's frame times; not ported",
        }),
        _ => Err(TokenError::Unsupported {
            model_type: model_type.to_owned(),
            reason: "videos are counted for Qwen2-VL and Qwen2.5-VL only",
        }),
    }
}

/// A request's own frame sampling (`mm_processor_kwargs`: `fps`, `min_frames`, `max_frames`)
/// applies where the processor samples frames ([`FrameSampling::Fps`]); with vLLM's loader
/// sampling (the default) the engine's count of such a request is not known, so it is refused.
fn with_request_sampling(
    mut rule: QwenVideo,
    kwargs: Option<&Value>,
) -> Result<QwenVideo, &'static str> {
    const KEYS: [&str; 5] = [
        "fps",
        "min_frames",
        "max_frames",
        "num_frames",
        "do_sample_frames",
    ];
    let Some(kwargs) = kwargs.and_then(Value::as_object) else {
        return Ok(rule);
    };
    if !KEYS.iter().any(|key| kwargs.contains_key(*key)) {
        return Ok(rule);
    }
    let FrameSampling::Fps {
        fps,
        min_frames,
        max_frames,
    } = rule.sampling
    else {
        return Err(
            "frame sampling in mm_processor_kwargs is not supported: the deployment's \
                    video loader picks the frames",
        );
    };
    let number = |key: &str| kwargs.get(key).filter(|v| !v.is_null());
    if number("num_frames").is_some() || number("do_sample_frames") == Some(&Value::Bool(false)) {
        return Err(
            "num_frames and do_sample_frames=false in mm_processor_kwargs are not supported",
        );
    }
    let fps = match number("fps") {
        Some(value) => value
            .as_f64()
            .filter(|fps| fps.is_finite() && *fps > 0.0)
            .ok_or("mm_processor_kwargs.fps must be a positive number")?,
        None => fps,
    };
    let frames = |key: &str, default: u64| match number(key) {
        Some(value) => value
            .as_u64()
            .ok_or("mm_processor_kwargs frame counts must be non-negative integers"),
        None => Ok(default),
    };
    rule.sampling = FrameSampling::Fps {
        fps,
        min_frames: frames("min_frames", min_frames)?,
        max_frames: frames("max_frames", max_frames)?,
    };
    Ok(rule)
}
