//! Media input for kvroute: what an image part of a request means for routing.
//!
//! It owns, for one image (and the MP4 header and Qwen-VL token count of a video, [`probe_video`],
//! [`QwenVideo`]): where the bytes come from (base64 `data:` URLs, raw bytes, and
//! http(s) URLs fetched under an SSRF-safe [`FetchPolicy`], off by default), what they are
//! (format from magic bytes, dimensions and EXIF orientation from the header alone, cheap
//! completeness checks, a pixel cap that refuses decompression bombs before any pixel is
//! decoded), its identity (a 64-bit [`MediaId`] from a blake3 digest of the file or of its
//! canonical pixels, or the client's own `uuid`), how many visual tokens the engine gives it
//! ([`VisionTokenRule`], ported from the Hugging Face processors), and where those tokens sit
//! in the prompt ([`expand`], [`block_media_info`]).
//!
//! It does not own tokenization or chat templates (`kvroute-preprocess`), block hashing
//! (`kvroute-blockhash` consumes the [`MediaSpan`]s or per-block info made here), nor any
//! network policy beyond the fetch itself. It never prints, reads the environment or exits.
//!
//! # Example
//!
//! ```
//! use kvroute_mmhash::{expand, ImageTokens, MediaConfig, MediaProcessor, PlaceholderSpec,
//!     VisionTokenRule, QWEN_IMAGE_PAD};
//!
//! // A 1x1 GIF as a client would send it.
//! let url = "data:image/gif;base64,R0lGODlhAQABAAAAACwAAAAAAQABAAACAkQBADs=";
//! let processor = MediaProcessor::new(MediaConfig::default());
//! let runtime = tokio::runtime::Builder::new_current_thread().build()?;
//! let loaded = runtime.block_on(processor.load(url, None))?;
//! assert_eq!((loaded.image.info.width, loaded.image.info.height), (1, 1));
//!
//! let rule = VisionTokenRule::for_model_type("qwen2_vl")?;
//! let tokens = rule.tokens(loaded.image.info.width, loaded.image.info.height)? as usize;
//! assert_eq!(tokens, 4); // scaled up to 56x56 by min_pixels
//!
//! let prompt = [151_652, QWEN_IMAGE_PAD, 151_653];
//! let images = [ImageTokens::new(loaded.image.id, tokens)];
//! let expanded = expand(&prompt, &PlaceholderSpec::qwen_vl(), &images)?;
//! assert_eq!(expanded.tokens.len(), 6);
//! assert_eq!(expanded.spans[0].start, 1);
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod error;
mod exif;
mod expand;
mod fetch;
mod format;
mod header;
mod id;
mod pipeline;
mod source;
mod tokens;
mod video;

pub use error::{ExpandError, FetchError, ImageError, MediaError, TokenError, VideoError};
pub use exif::Orientation;
pub use expand::{
    block_media_info, expand, expand_mixed, Expanded, ImageTokens, PadLayout, PlaceholderSpec,
    PlaceholderTokens, TileTokens, LLAVA_IMAGE_TOKEN, QWEN_IMAGE_PAD,
};
pub use fetch::{fetch, is_public, FetchPolicy, Fetched};
pub use format::ImageFormat;
pub use header::{probe, ImageInfo};
pub use id::{
    blake3_digest, blake3_digest_from, bytes_media_id, forward_uuid, media_id_from_digest,
    media_id_from_uuid, IdMode, IdSource, PixelDigest,
};
pub use kvroute_protocol::{BlockExtraInfo, BlockMmObjectInfo, MediaId, MediaSpan};
pub use pipeline::{
    LoadedImage, LoadedVideo, MediaConfig, MediaProcessor, PreparedImage, DEFAULT_MAX_BYTES,
    DEFAULT_MAX_PIXELS,
};
pub use source::ImageSource;
pub use tokens::{
    AnyRes, DynamicHd, Llama4Tiles, PatchGrid, Resized, SmartResize, Tiles, TokenGrid,
    VisionTokenRule, GEMMA3_TOKENS, LLAVA_1_5_TOKENS, QWEN_MAX_ASPECT_RATIO,
};
pub use video::{probe_video, FrameSampling, QwenVideo, VideoInfo};
