//! Media identity: 64-bit ids from blake3 digests, and client-supplied ids.

use crate::error::ImageError;
use crate::header::ImageInfo;
use kvroute_protocol::MediaId;
use std::io::Cursor;

/// What a computed media id is a digest of.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdMode {
    /// The encoded file exactly as received: no decode, the fastest. Two encodings of the
    /// same picture get different ids. The default.
    #[default]
    Bytes,
    /// The decoded picture: canonical RGB8 (alpha dropped, EXIF orientation applied), with its
    /// width and height. The same picture in two lossless encodings shares an id; the pixels
    /// of lossy formats (JPEG) depend on the decoder. Costs a full decode.
    Pixels,
}

/// The 64-bit media id of a blake3 digest: its first 8 bytes, big-endian. That is the value
/// of the first 16 hex digits of the digest, as TensorRT-LLM and Dynamo read hex digests.
///
/// ```
/// use kvroute_mmhash::media_id_from_digest;
///
/// let digest = blake3::hash(b"hello");
/// let hex = digest.to_hex();
/// assert_eq!(
///     media_id_from_digest(digest.as_bytes()).get(),
///     u64::from_str_radix(&hex[..16], 16).unwrap()
/// );
/// ```
pub fn media_id_from_digest(digest: &[u8; 32]) -> MediaId {
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    MediaId(u64::from_be_bytes(first))
}

/// blake3 over `bytes`, single-threaded (exactly `blake3::hash`).
pub fn blake3_digest(bytes: &[u8]) -> [u8; 32] {
    *blake3::hash(bytes).as_bytes()
}

/// blake3 over `bytes`, with blake3's multi-threaded (rayon) update when `parallel_from` is
/// set and the input is at least that long. Same digest either way.
pub fn blake3_digest_from(bytes: &[u8], parallel_from: Option<u64>) -> [u8; 32] {
    match parallel_from {
        Some(from) if bytes.len() as u64 >= from => *blake3::Hasher::new()
            .update_rayon(bytes)
            .finalize()
            .as_bytes(),
        _ => blake3_digest(bytes),
    }
}

/// The media id of an encoded file in [`IdMode::Bytes`]: [`media_id_from_digest`] of the
/// blake3 digest of the file.
pub fn bytes_media_id(bytes: &[u8]) -> MediaId {
    media_id_from_digest(&blake3_digest(bytes))
}

/// The canonical decoded picture's identity ([`IdMode::Pixels`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub struct PixelDigest {
    /// Width after EXIF orientation.
    pub width: u32,
    /// Height after EXIF orientation.
    pub height: u32,
    /// blake3 of the RGB8 pixels, row-major, alpha dropped (not composited), no color
    /// management: the same bytes as Pillow's `Image.convert("RGB").tobytes()` for PNG, GIF
    /// and lossless WebP.
    pub rgb8: [u8; 32],
}

impl PixelDigest {
    /// The media id: [`media_id_from_digest`] of blake3 over width (u32 LE), height (u32 LE)
    /// and the RGB8 digest, so two pictures with the same pixel bytes in another shape differ.
    pub fn media_id(&self) -> MediaId {
        let mut hasher = blake3::Hasher::new();
        hasher.update(&self.width.to_le_bytes());
        hasher.update(&self.height.to_le_bytes());
        hasher.update(&self.rgb8);
        media_id_from_digest(hasher.finalize().as_bytes())
    }
}

/// Decodes `bytes` (already [`probe`](crate::probe)d into `info`, cap checked) to canonical RGB8
/// and digests it. The decoder gets allocation limits matching the header, so a file whose
/// data disagrees with its header cannot make it allocate more.
pub(crate) fn pixel_digest(
    bytes: &[u8],
    info: &ImageInfo,
    parallel_from: Option<u64>,
) -> Result<PixelDigest, ImageError> {
    let decode_error = |error: image::ImageError| ImageError::Decode {
        format: info.format,
        message: error.to_string(),
    };
    let (stored_width, stored_height) = info.stored_dimensions();
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(stored_width);
    limits.max_image_height = Some(stored_height);
    // Room for the widest decoded layout (RGBA16, 8 bytes per pixel) and decoder scratch.
    limits.max_alloc = Some(info.pixels().saturating_mul(11).saturating_add(1 << 20));
    let mut reader = image::ImageReader::with_format(Cursor::new(bytes), info.format.to_image_rs());
    reader.limits(limits);
    let mut decoded = reader.decode().map_err(decode_error)?;
    decoded.apply_orientation(info.orientation.to_image_rs());
    let rgb8 = decoded.into_rgb8();
    if (rgb8.width(), rgb8.height()) != (info.width, info.height) {
        return Err(ImageError::Corrupt {
            format: info.format,
            what: "decoded size differs from the header",
        });
    }
    Ok(PixelDigest {
        width: info.width,
        height: info.height,
        rgb8: blake3_digest_from(rgb8.as_raw(), parallel_from),
    })
}

/// Where a request's media id came from.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IdSource {
    /// Computed from the content in this mode.
    Content(IdMode),
    /// Supplied by the client (`uuid` on the image part); forward it to the engine unchanged.
    Client(String),
}

/// The media id for a client-supplied `uuid`, read exactly as the engine's events will name
/// it ([`kvroute_blockhash::media_id_from_identifier`], NVIDIA Dynamo 1.7's rule): vLLM keeps
/// the uuid verbatim as the item's identifier and publishes it in `extra_keys`.
///
/// * 64 hex digits (Dynamo's marker form, what [`forward_uuid`] writes, or a vLLM content
///   hash): the value of its first 16 hex digits, so a client echoing a kvroute or engine id
///   gets that very id.
/// * Anything else: XXH3-64 (seed 0) of its UTF-8 bytes. (An empty uuid, which names nothing
///   to an engine, gets blake3's id of the empty string.)
///
/// ```
/// use kvroute_mmhash::{forward_uuid, media_id_from_uuid};
/// use kvroute_protocol::MediaId;
///
/// let id = MediaId(0x0123_4567_89ab_cdef);
/// assert_eq!(media_id_from_uuid(&forward_uuid(id)), id);
/// assert_eq!(media_id_from_uuid("cat-photo-1"), MediaId(0x6971_6f48_83cc_ef84));
/// ```
pub fn media_id_from_uuid(uuid: &str) -> MediaId {
    kvroute_blockhash::media_id_from_identifier(uuid)
        .unwrap_or_else(|| media_id_from_digest(blake3::hash(uuid.as_bytes()).as_bytes()))
}

/// The `uuid` to forward to the engine for a content-derived id: Dynamo's marker form, 16
/// lowercase hex digits of the id followed by 48 zeros (64 characters, the length of a vLLM
/// multimodal hash), which Dynamo's vLLM event parser maps back to the same `u64`.
pub fn forward_uuid(id: MediaId) -> String {
    format!("{:016x}{}", id.get(), "0".repeat(48))
}
