//! Which media objects each block contains.

use kvroute_protocol::{BlockExtraInfo, MediaId, MediaSpan};
use std::ops::Range;

/// Tells the hasher which media objects a block contains.
///
/// Implemented for request-level [`MediaSpan`] lists, for Dynamo's per-block media info (as
/// found in KV events and in `compute_block_hash_for_seq`'s `block_mm_infos`), and for
/// [`NoMedia`]. Implement it for your own representation if you have one; ids may be appended
/// in any order (the hasher sorts them) and duplicates are significant.
pub trait BlockMedia {
    /// Appends to `out` the ids of the media objects in block number `index`, which covers the
    /// half-open token range `tokens` of the whole sequence.
    fn block_media(&self, index: usize, tokens: Range<usize>, out: &mut Vec<MediaId>);

    /// Whether no block contains media, which lets the hasher take its text-only fast path.
    /// Returning `false` is always correct.
    fn is_text_only(&self) -> bool {
        false
    }
}

/// A text-only sequence: every block hashes its tokens alone.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NoMedia;

impl BlockMedia for NoMedia {
    #[inline(always)]
    fn block_media(&self, _index: usize, _tokens: Range<usize>, _out: &mut Vec<MediaId>) {}

    fn is_text_only(&self) -> bool {
        true
    }
}

/// A block contains every media object whose span intersects it, once per id even when the
/// object appears twice in the block: exactly what Dynamo's `RequestExtraInfo::to_block_level`
/// builds from request-level spans.
impl BlockMedia for [MediaSpan] {
    #[inline]
    fn block_media(&self, _index: usize, tokens: Range<usize>, out: &mut Vec<MediaId>) {
        let first_of_block = out.len();
        for span in self {
            if span.touches(tokens.clone()) && !out[first_of_block..].contains(&span.id) {
                out.push(span.id);
            }
        }
    }

    fn is_text_only(&self) -> bool {
        self.iter().all(|span| span.len == 0)
    }
}

impl BlockMedia for Vec<MediaSpan> {
    #[inline]
    fn block_media(&self, index: usize, tokens: Range<usize>, out: &mut Vec<MediaId>) {
        self.as_slice().block_media(index, tokens, out);
    }

    fn is_text_only(&self) -> bool {
        self.as_slice().is_text_only()
    }
}

impl<T: BlockMedia + ?Sized> BlockMedia for &T {
    #[inline]
    fn block_media(&self, index: usize, tokens: Range<usize>, out: &mut Vec<MediaId>) {
        (**self).block_media(index, tokens, out);
    }

    fn is_text_only(&self) -> bool {
        (**self).is_text_only()
    }
}

/// Dynamo's per-block form: entry `i` describes block `i`; a missing entry, `None`, or an empty
/// object list means a text-only block. Every listed object counts, duplicates included.
impl BlockMedia for [Option<BlockExtraInfo>] {
    #[inline]
    fn block_media(&self, index: usize, _tokens: Range<usize>, out: &mut Vec<MediaId>) {
        if let Some(Some(info)) = self.get(index) {
            out.extend(info.mm_objects.iter().map(|object| object.mm_hash));
        }
    }

    fn is_text_only(&self) -> bool {
        self.iter().flatten().all(|info| info.mm_objects.is_empty())
    }
}

impl BlockMedia for Vec<Option<BlockExtraInfo>> {
    #[inline]
    fn block_media(&self, index: usize, tokens: Range<usize>, out: &mut Vec<MediaId>) {
        self.as_slice().block_media(index, tokens, out);
    }

    fn is_text_only(&self) -> bool {
        self.as_slice().is_text_only()
    }
}

/// The media id of an engine's multimodal identifier, as NVIDIA Dynamo 1.7 reads vLLM's
/// `extra_keys`: a 64-hex-digit identifier (vLLM's own content hash, or the marker form a
/// router forwarded as the item's uuid) is the value of its first 16 hex digits; any other
/// non-empty identifier (a client's own uuid, which vLLM keeps verbatim) is XXH3-64 (seed 0)
/// of its UTF-8 bytes. `None` for an empty identifier, which names nothing.
///
/// A router that gives a client-supplied uuid this id, and forwards the uuid unchanged, gets
/// back from the engine's events exactly the id it hashed the request with.
///
/// ```
/// use kvroute_blockhash::{media_id_from_identifier, MediaId};
///
/// let marker = format!("{:016x}{}", 0x0123_4567_89ab_cdef_u64, "0".repeat(48));
/// assert_eq!(media_id_from_identifier(&marker), Some(MediaId(0x0123_4567_89ab_cdef)));
/// assert_eq!(media_id_from_identifier("cat-photo-1"), Some(MediaId(0x6971_6f48_83cc_ef84)));
/// assert_eq!(media_id_from_identifier(""), None);
/// ```
pub fn media_id_from_identifier(identifier: &str) -> Option<MediaId> {
    if identifier.is_empty() {
        return None;
    }
    if identifier.len() == 64 && identifier.bytes().all(|b| b.is_ascii_hexdigit()) {
        if let Ok(value) = u64::from_str_radix(&identifier[..16], 16) {
            return Some(MediaId(value));
        }
    }
    Some(MediaId(xxhash_rust::xxh3::xxh3_64(identifier.as_bytes())))
}
