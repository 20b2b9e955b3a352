//! The whole media path for one image part: source, limits, header, identity.

use crate::error::{ImageError, MediaError};
use crate::fetch::{fetch, FetchPolicy};
use crate::header::{probe, ImageInfo};
use crate::id::{
    blake3_digest_from, media_id_from_digest, media_id_from_uuid, pixel_digest, IdMode, IdSource,
    PixelDigest,
};
use crate::source::ImageSource;
use crate::video::{probe_video, VideoInfo};
use kvroute_protocol::MediaId;

/// Pillow's `DecompressionBombError` threshold (twice `Image.MAX_IMAGE_PIXELS`): HF
/// transformers loads images with Pillow, so an engine refuses anything larger anyway.
pub const DEFAULT_MAX_PIXELS: u64 = 2 * 89_478_485;

/// Default cap on an encoded image, from a data URL or a fetch: 20 MiB.
pub const DEFAULT_MAX_BYTES: u64 = 20 << 20;

/// Limits and identity settings for [`MediaProcessor`].
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct MediaConfig {
    /// What computed media ids digest.
    pub id_mode: IdMode,
    /// Refuse images whose header declares more pixels (decompression bombs), before any
    /// pixel is decoded, in every id mode.
    pub max_pixels: u64,
    /// Refuse encoded images larger than this many bytes.
    pub max_bytes: u64,
    /// Whether and how http(s) image URLs are fetched (disabled by default).
    pub fetch: FetchPolicy,
    /// Hash inputs of at least this many bytes with blake3's multi-threaded (rayon) update.
    /// `None` (the default) always hashes on the calling thread: a busy gateway gains no
    /// throughput from it, and on 2 loaded cores it was slower (docs/benchmarks.md). On idle
    /// cores `Some(4 << 20)` cuts the latency of large images.
    pub parallel_hash_from: Option<u64>,
}

impl Default for MediaConfig {
    fn default() -> Self {
        Self {
            id_mode: IdMode::default(),
            max_pixels: DEFAULT_MAX_PIXELS,
            max_bytes: DEFAULT_MAX_BYTES,
            fetch: FetchPolicy::default(),
            parallel_hash_from: None,
        }
    }
}

impl MediaConfig {
    /// This configuration with another id mode.
    pub fn with_id_mode(mut self, id_mode: IdMode) -> Self {
        self.id_mode = id_mode;
        self
    }

    /// This configuration with another pixel cap.
    pub fn with_max_pixels(mut self, max_pixels: u64) -> Self {
        self.max_pixels = max_pixels;
        self
    }

    /// This configuration with another byte cap.
    pub fn with_max_bytes(mut self, max_bytes: u64) -> Self {
        self.max_bytes = max_bytes;
        self
    }

    /// This configuration hashing inputs from `parallel_hash_from` bytes on with rayon.
    pub fn with_parallel_hash_from(mut self, parallel_hash_from: Option<u64>) -> Self {
        self.parallel_hash_from = parallel_hash_from;
        self
    }

    /// This configuration with another fetch policy.
    pub fn with_fetch(mut self, fetch: FetchPolicy) -> Self {
        self.fetch = fetch;
        self
    }
}

/// One image, ready for routing: what it is, how large it is served, and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PreparedImage {
    /// Format, dimensions after EXIF orientation, orientation.
    pub info: ImageInfo,
    /// The media id to hash into blocks.
    pub id: MediaId,
    /// Where the id came from; a client id is to be forwarded to the engine unchanged.
    pub id_source: IdSource,
}

/// A prepared image with the bytes it was prepared from (decoded from a data URL or fetched),
/// for a gateway that forwards them.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LoadedImage {
    /// The encoded image, exactly as received.
    pub bytes: Vec<u8>,
    /// What was learnt from it.
    pub image: PreparedImage,
}

/// Turns image parts into [`PreparedImage`]s under one [`MediaConfig`]. Cheap to share.
#[derive(Clone, Debug, Default)]
pub struct MediaProcessor {
    config: MediaConfig,
}

impl MediaProcessor {
    /// A processor with this configuration.
    pub fn new(config: MediaConfig) -> Self {
        Self { config }
    }

    /// The configuration.
    pub fn config(&self) -> &MediaConfig {
        &self.config
    }

    /// Checks an encoded image already in memory without hashing it: byte cap, header
    /// (format, declared type, dimensions, orientation, completeness), pixel cap.
    pub fn inspect(&self, bytes: &[u8], declared: Option<&str>) -> Result<ImageInfo, ImageError> {
        let max_bytes = self.config.max_bytes;
        if bytes.len() as u64 > max_bytes {
            return Err(ImageError::TooManyBytes {
                len: bytes.len() as u64,
                max_bytes,
            });
        }
        let info = probe(bytes, declared)?;
        if info.pixels() > self.config.max_pixels {
            return Err(ImageError::TooManyPixels {
                width: info.width,
                height: info.height,
                max_pixels: self.config.max_pixels,
            });
        }
        Ok(info)
    }

    /// [`inspect`](Self::inspect)s an image, then decodes it to canonical RGB8 and digests it
    /// (what [`IdMode::Pixels`] ids are made of). A file over the pixel cap is refused before
    /// any pixel buffer exists.
    pub fn pixel_digest(
        &self,
        bytes: &[u8],
        declared: Option<&str>,
    ) -> Result<PixelDigest, ImageError> {
        pixel_digest(
            bytes,
            &self.inspect(bytes, declared)?,
            self.config.parallel_hash_from,
        )
    }

    /// Prepares an encoded image already in memory: [`inspect`](Self::inspect), then the id.
    /// A client `uuid` wins over the content id (the image is still inspected: routing needs
    /// its dimensions, and a broken file should fail here rather than in the engine).
    pub fn prepare(
        &self,
        bytes: &[u8],
        declared: Option<&str>,
        uuid: Option<&str>,
    ) -> Result<PreparedImage, ImageError> {
        let info = self.inspect(bytes, declared)?;
        let (id, id_source) = match (uuid, self.config.id_mode) {
            (Some(uuid), _) => (media_id_from_uuid(uuid), IdSource::Client(uuid.to_owned())),
            (None, IdMode::Bytes) => (
                media_id_from_digest(&blake3_digest_from(bytes, self.config.parallel_hash_from)),
                IdSource::Content(IdMode::Bytes),
            ),
            (None, IdMode::Pixels) => (
                pixel_digest(bytes, &info, self.config.parallel_hash_from)?.media_id(),
                IdSource::Content(IdMode::Pixels),
            ),
        };
        Ok(PreparedImage {
            info,
            id,
            id_source,
        })
    }

    /// Prepares an OpenAI `image_url.url` value: a base64 `data:` URL, or an http(s) URL when
    /// the fetch policy enables fetching (it is off by default).
    pub async fn load(&self, url: &str, uuid: Option<&str>) -> Result<LoadedImage, MediaError> {
        let (bytes, declared) = self.bytes_of(url).await?;
        let image = self.prepare(&bytes, declared.as_deref(), uuid)?;
        Ok(LoadedImage { bytes, image })
    }

    /// Prepares an OpenAI `video_url.url` value (sources as for [`load`](Self::load)): the
    /// MP4 header read by [`probe_video`], the id from the file's bytes (whatever the
    /// [`IdMode`]: no frame is decoded) or the client's `uuid`.
    pub async fn load_video(
        &self,
        url: &str,
        uuid: Option<&str>,
    ) -> Result<LoadedVideo, MediaError> {
        let (bytes, _) = self.bytes_of(url).await?;
        let info = probe_video(&bytes)?;
        let (id, id_source) = match uuid {
            Some(uuid) => (media_id_from_uuid(uuid), IdSource::Client(uuid.to_owned())),
            None => (
                media_id_from_digest(&blake3_digest_from(&bytes, self.config.parallel_hash_from)),
                IdSource::Content(IdMode::Bytes),
            ),
        };
        Ok(LoadedVideo {
            bytes,
            info,
            id,
            id_source,
        })
    }

    /// The bytes of a `data:` or http(s) URL and their declared type.
    async fn bytes_of(&self, url: &str) -> Result<(Vec<u8>, Option<String>), MediaError> {
        Ok(match ImageSource::parse(url, self.config.max_bytes)? {
            ImageSource::Data { mime, bytes } => (bytes, mime.map(str::to_owned)),
            ImageSource::Remote(url) => {
                let fetched = fetch(url, &self.config.fetch, self.config.max_bytes).await?;
                (fetched.bytes, fetched.content_type)
            }
        })
    }
}

/// A video loaded from a URL: its bytes, header and identity.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct LoadedVideo {
    /// The file as received.
    pub bytes: Vec<u8>,
    /// What its header says.
    pub info: VideoInfo,
    /// The media id hashed into the blocks.
    pub id: MediaId,
    /// Where the id comes from.
    pub id_source: IdSource,
}
