//! Placeholder expansion: from the token ids a chat template renders (one placeholder per
//! image) to the ids the engine sees, the media spans inside them, and per-block media info.

use crate::error::ExpandError;
use kvroute_protocol::{BlockExtraInfo, BlockMmObjectInfo, MediaId, MediaSpan};

/// How a model's prompt marks an image and what its processor turns the mark into:
/// `placeholder` becomes `prefix`, then `pad` once per visual token, then `suffix`. The media
/// span covers that whole replacement, as vLLM's `PlaceholderRange` does (for the Qwen and
/// LLaVA presets, which have no prefix or suffix, that is exactly the pads).
///
/// For a model whose processor wraps the pads in text (Gemma 3: `"\n\n<start_of_image>"`, 256
/// `<image_soft_token>`, `"<end_of_image>\n\n"`), take the prefix and suffix ids from its
/// tokenizer.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PlaceholderSpec {
    /// The one token the chat template renders per image.
    pub placeholder: u32,
    /// Tokens inserted before the pads.
    pub prefix: Vec<u32>,
    /// The token repeated once per visual token.
    pub pad: u32,
    /// Tokens inserted after the pads.
    pub suffix: Vec<u32>,
}

/// `<|image_pad|>` in the Qwen2-VL, Qwen2.5-VL and Qwen3-VL tokenizers.
pub const QWEN_IMAGE_PAD: u32 = 151_655;

/// `<image>` in the llava-hf LLaVA-1.5 and LLaVA-NeXT (Vicuna, Mistral) tokenizers.
pub const LLAVA_IMAGE_TOKEN: u32 = 32_000;

impl PlaceholderSpec {
    /// Qwen-VL: the template renders `<|vision_start|><|image_pad|><|vision_end|>`; the
    /// processor repeats `<|image_pad|>` once per visual token.
    pub fn qwen_vl() -> Self {
        Self::repeat(QWEN_IMAGE_PAD)
    }

    /// LLaVA-1.5 and LLaVA-NeXT (llava-hf): `<image>` repeated once per visual token.
    pub fn llava() -> Self {
        Self::repeat(LLAVA_IMAGE_TOKEN)
    }

    /// A placeholder that the processor repeats, with nothing around it.
    pub fn repeat(token: u32) -> Self {
        Self {
            placeholder: token,
            prefix: Vec::new(),
            pad: token,
            suffix: Vec::new(),
        }
    }
}

/// One image to expand: its id and its visual token count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageTokens {
    /// The media id.
    pub id: MediaId,
    /// Visual tokens (pads) the image occupies.
    pub tokens: usize,
}

/// The engine's view of a prompt.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Expanded {
    /// Token ids with every placeholder expanded.
    pub tokens: Vec<u32>,
    /// One span per image, in prompt order: offset and length of its replacement tokens, and
    /// the media id.
    pub spans: Vec<MediaSpan>,
}

/// Expands each occurrence of `spec.placeholder` in `tokens`, in order, into the tokens of the
/// matching entry of `images`.
///
/// ```
/// use kvroute_mmhash::{expand, ImageTokens, PlaceholderSpec, QWEN_IMAGE_PAD};
/// use kvroute_protocol::{MediaId, MediaSpan};
///
/// const START: u32 = 151_652;
/// const END: u32 = 151_653;
/// let prompt = [1, START, QWEN_IMAGE_PAD, END, 2];
/// let out = expand(&prompt, &PlaceholderSpec::qwen_vl(), &[ImageTokens { id: MediaId(9), tokens: 3 }])?;
/// assert_eq!(out.tokens, [1, START, QWEN_IMAGE_PAD, QWEN_IMAGE_PAD, QWEN_IMAGE_PAD, END, 2]);
/// assert_eq!(out.spans, [MediaSpan::new(2, 3, MediaId(9))]);
/// # Ok::<(), kvroute_mmhash::ExpandError>(())
/// ```
pub fn expand(
    tokens: &[u32],
    spec: &PlaceholderSpec,
    images: &[ImageTokens],
) -> Result<Expanded, ExpandError> {
    let placeholders = tokens.iter().filter(|&&t| t == spec.placeholder).count();
    if placeholders != images.len() {
        return Err(ExpandError::PlaceholderCount {
            placeholders,
            images: images.len(),
        });
    }
    let around = spec.prefix.len() + spec.suffix.len();
    let len = images
        .iter()
        .try_fold(tokens.len() - placeholders, |len, image| {
            len.checked_add(around)?.checked_add(image.tokens)
        });
    let len = len.ok_or(ExpandError::Overflow)?;
    let mut out = Expanded {
        tokens: Vec::new(),
        spans: Vec::with_capacity(images.len()),
    };
    out.tokens
        .try_reserve_exact(len)
        .map_err(|_| ExpandError::Overflow)?;
    let mut images = images.iter();
    let mut rest = tokens;
    while let Some(at) = rest.iter().position(|&t| t == spec.placeholder) {
        out.tokens.extend_from_slice(&rest[..at]);
        rest = &rest[at + 1..];
        // As many images as placeholders: counted above.
        let Some(image) = images.next() else { break };
        let start = out.tokens.len();
        out.tokens.extend_from_slice(&spec.prefix);
        out.tokens.resize(out.tokens.len() + image.tokens, spec.pad);
        out.tokens.extend_from_slice(&spec.suffix);
        out.spans
            .push(MediaSpan::new(start, out.tokens.len() - start, image.id));
    }
    out.tokens.extend_from_slice(rest);
    Ok(out)
}

/// Per-block media info from request-level spans, in Dynamo's form (what
/// `RequestExtraInfo::to_block_level` builds, and what KV events carry): entry `i` describes
/// block `i`, the half-open token range `[i*B, min((i+1)*B, total_tokens))`; it lists every
/// media id whose span intersects the block once, in order of first appearance, with the
/// intersections as block-relative half-open `(start, end)` offsets, appended in span order
/// when an id appears more than once. Blocks without media are `None`. Spans past
/// `total_tokens` are cut off there.
///
/// ```
/// use kvroute_mmhash::block_media_info;
/// use kvroute_protocol::{MediaId, MediaSpan};
///
/// let info = block_media_info(&[MediaSpan::new(2, 6, MediaId(9))], 4, 10)?;
/// assert_eq!(info.len(), 3);
/// assert_eq!(info[0].as_ref().unwrap().mm_objects[0].offsets, [(2, 4)]);
/// assert_eq!(info[1].as_ref().unwrap().mm_objects[0].offsets, [(0, 4)]);
/// assert!(info[2].is_none());
/// # Ok::<(), kvroute_mmhash::ExpandError>(())
/// ```
pub fn block_media_info(
    spans: &[MediaSpan],
    block_size: usize,
    total_tokens: usize,
) -> Result<Vec<Option<BlockExtraInfo>>, ExpandError> {
    if block_size == 0 {
        return Err(ExpandError::ZeroBlockSize);
    }
    let mut blocks: Vec<Option<BlockExtraInfo>> = vec![None; total_tokens.div_ceil(block_size)];
    for span in spans {
        let end = span.end().min(total_tokens);
        if span.start >= end {
            continue;
        }
        for block in span.start / block_size..=(end - 1) / block_size {
            let block_start = block * block_size;
            let local = (
                span.start.max(block_start) - block_start,
                end.min(block_start.saturating_add(block_size)) - block_start,
            );
            let Some(slot) = blocks.get_mut(block) else {
                break;
            };
            let info = slot.get_or_insert_with(BlockExtraInfo::default);
            match info
                .mm_objects
                .iter_mut()
                .find(|object| object.mm_hash == span.id)
            {
                Some(object) => object.offsets.push(local),
                None => info.mm_objects.push(BlockMmObjectInfo {
                    mm_hash: span.id,
                    offsets: vec![local],
                }),
            }
        }
    }
    Ok(blocks)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn span_covers_prefix_pads_and_suffix() {
        let spec = PlaceholderSpec {
            placeholder: 7,
            prefix: vec![1, 7],
            pad: 9,
            suffix: vec![8, 1],
        };
        let images = [ImageTokens {
            id: MediaId(5),
            tokens: 3,
        }];
        let out = expand(&[0, 7, 0], &spec, &images).unwrap();
        assert_eq!(out.tokens, [0, 1, 7, 9, 9, 9, 8, 1, 0]);
        assert_eq!(out.spans, [MediaSpan::new(1, 7, MediaId(5))]);
    }

    #[test]
    fn repeated_id_in_one_block_is_listed_once_with_both_ranges() {
        let spans = [
            MediaSpan::new(1, 2, MediaId(5)),
            MediaSpan::new(3, 1, MediaId(6)),
            MediaSpan::new(5, 4, MediaId(5)),
        ];
        let info = block_media_info(&spans, 8, 10).unwrap();
        let block0 = info[0].as_ref().unwrap();
        assert_eq!(block0.mm_objects.len(), 2);
        assert_eq!(block0.mm_objects[0].mm_hash, MediaId(5));
        assert_eq!(block0.mm_objects[0].offsets, [(1, 3), (5, 8)]);
        assert_eq!(block0.mm_objects[1].offsets, [(3, 4)]);
        // The partial last block ends at total_tokens.
        assert_eq!(info[1].as_ref().unwrap().mm_objects[0].offsets, [(0, 1)]);
    }
}
