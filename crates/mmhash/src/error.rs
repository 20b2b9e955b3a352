//! Typed errors. Bad input is always one of these, never a panic.

use crate::format::ImageFormat;
use std::net::IpAddr;

/// Why image bytes were refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ImageError {
    /// No supported signature (PNG, JPEG, GIF, WebP, BMP) at the start of the data.
    #[error("unknown image format: no PNG, JPEG, GIF, WebP or BMP signature")]
    UnknownFormat,
    /// The declared content type names another format than the bytes are.
    #[error("declared content type {declared:?} does not match the {detected} content")]
    FormatMismatch {
        /// The declared type, as given.
        declared: String,
        /// The format the bytes are.
        detected: ImageFormat,
    },
    /// The file ends before a structure it starts (a header, a segment, the end marker).
    #[error("truncated {format} file: {what}")]
    Truncated {
        /// The file's format.
        format: ImageFormat,
        /// What is missing.
        what: &'static str,
    },
    /// The file's structure is invalid.
    #[error("corrupt {format} file: {what}")]
    Corrupt {
        /// The file's format.
        format: ImageFormat,
        /// What is wrong.
        what: &'static str,
    },
    /// The header declares more pixels than the configured cap (a decompression bomb or an
    /// image too large to serve). Nothing was decoded.
    #[error("image of {width}x{height} pixels exceeds the cap of {max_pixels} pixels")]
    TooManyPixels {
        /// Declared width.
        width: u32,
        /// Declared height.
        height: u32,
        /// The configured cap.
        max_pixels: u64,
    },
    /// The encoded file is larger than the configured byte cap.
    #[error("image of {len} bytes exceeds the cap of {max_bytes} bytes")]
    TooManyBytes {
        /// Size of the input (or a lower bound of it).
        len: u64,
        /// The configured cap.
        max_bytes: u64,
    },
    /// The pixel decoder refused the data (only in `pixels` id mode).
    #[error("cannot decode {format} pixels: {message}")]
    Decode {
        /// The file's format.
        format: ImageFormat,
        /// The decoder's message.
        message: String,
    },
}

/// Why an image URL was not fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    /// URL fetching is disabled by configuration (the default).
    #[error("fetching image URLs is disabled")]
    Disabled,
    /// The URL is not a valid absolute http(s) URL.
    #[error("invalid image URL: {0}")]
    InvalidUrl(String),
    /// The URL's scheme is neither `http` nor `https` (nor `data`).
    #[error("unsupported URL scheme {0:?}")]
    UnsupportedScheme(String),
    /// The host is not on the configured allow-list.
    #[error("host {0:?} is not on the allow-list")]
    HostNotAllowed(String),
    /// The host resolves to a loopback, private, link-local, metadata or otherwise non-public
    /// address and is not trusted to.
    #[error("host {host:?} resolves to the non-public address {addr}")]
    ForbiddenAddress {
        /// The host name of the refused request.
        host: String,
        /// The offending address.
        addr: IpAddr,
    },
    /// DNS resolution failed or returned nothing.
    #[error("cannot resolve {host:?}: {message}")]
    Resolve {
        /// The host name.
        host: String,
        /// What went wrong.
        message: String,
    },
    /// More redirects than allowed.
    #[error("more than {0} redirects")]
    TooManyRedirects(u8),
    /// A redirect without a usable `Location`.
    #[error("redirect without a valid Location header")]
    BadRedirect,
    /// The server answered with a non-success status.
    #[error("server answered HTTP {0}")]
    Status(u16),
    /// The body is larger than the byte cap; it was cut off while streaming.
    #[error("response body exceeds the cap of {max_bytes} bytes")]
    BodyTooLarge {
        /// The configured cap.
        max_bytes: u64,
    },
    /// The whole fetch (all redirects included) took longer than the timeout.
    #[error("fetch timed out")]
    Timeout,
    /// Connection or protocol failure.
    #[error("HTTP failure: {0}")]
    Http(String),
}

/// Why a visual token count cannot be given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// No token rule is known for this model type.
    #[error("no visual token rule for model type {0:?}")]
    UnknownModel(String),
    /// The family is known, but its count depends on something kvroute cannot see or has
    /// not verified against the family's processor; refused rather than guessed.
    #[error("visual tokens of model type {model_type:?} are not counted: {reason}")]
    Unsupported {
        /// The model type.
        model_type: String,
        /// Why it is refused.
        reason: &'static str,
    },
    /// The HF processor rejects this aspect ratio (Qwen: `absolute aspect ratio must be
    /// smaller than 200`).
    #[error("absolute aspect ratio must be smaller than {max}, got {width}x{height}")]
    AspectRatio {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The processor's limit.
        max: u32,
    },
    /// The processor refuses the image because one side would be scaled below `min` pixels
    /// (Phi-4-multimodal: `the aspect ratio is very extreme`).
    #[error("the processor refuses {width}x{height}: a side would be scaled below {min} pixels")]
    TooThin {
        /// Image width.
        width: u32,
        /// Image height.
        height: u32,
        /// The processor's smallest side.
        min: u32,
    },
    /// A zero width or height, or a rule configured with a zero factor, patch or tile size.
    #[error("degenerate size: {0}")]
    Degenerate(&'static str),
    /// The count does not fit the integer types involved.
    #[error("visual token count overflows")]
    Overflow,
}

/// Why placeholder expansion or per-block media info failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ExpandError {
    /// The placeholder at this token offset is not the next item's kind (an image where a
    /// video was expected, or the reverse).
    #[error("placeholder at token {at} is not of the next media item's kind")]
    PlaceholderOrder {
        /// Offset in the unexpanded prompt.
        at: usize,
    },
    /// An image's pads are laid out in tiles for a family without tiles, or the reverse.
    #[error("an image's visual token layout does not fit the model's placeholder")]
    Layout,
    /// The rendered prompt holds a different number of placeholders than images were given.
    #[error("prompt has {placeholders} image placeholders but {images} images were given")]
    PlaceholderCount {
        /// Placeholders found in the token ids.
        placeholders: usize,
        /// Images supplied.
        images: usize,
    },
    /// A block size of zero tokens.
    #[error("block size must be at least 1 token")]
    ZeroBlockSize,
    /// The expanded sequence would not fit in memory.
    #[error("expanded sequence length overflows")]
    Overflow,
}

/// Any failure of the media pipeline.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The `image_url` is neither a data URL nor an http(s) URL, or a data URL is malformed.
    #[error("invalid image source: {0}")]
    InvalidSource(String),
    /// The image bytes were refused.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The URL could not be fetched.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// The video bytes were refused.
    #[error(transparent)]
    Video(#[from] VideoError),
}

/// Why a video's header was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum VideoError {
    /// Not an MP4 (ISO base media) file: no `ftyp` box.
    #[error("not an MP4 file (the only video container whose header is read)")]
    NotMp4,
    /// The box structure is broken.
    #[error("corrupt MP4 file: {0}")]
    Malformed(&'static str),
    /// A valid file whose frame count or size the engine's decoder may see differently.
    #[error("unsupported MP4 file: {0}")]
    Unsupported(&'static str),
}
