//! Placeholder expansion: from the token ids a chat template renders (one placeholder per
//! image) to the ids the engine sees, the media spans inside them, and per-block media info.

use crate::error::ExpandError;
use kvroute_protocol::{BlockExtraInfo, BlockMmObjectInfo, MediaId, MediaSpan};

/// How a model's prompt marks an image and what its processor turns the mark into:
/// `placeholder` becomes `prefix`, then `pad` once per visual token (rows separated by
/// `row_break` when the family has one; Llama 4's tiles laid out with `tiles`), then `suffix`.
/// The media span covers that whole
/// replacement, as vLLM's `PlaceholderRange` does (for the Qwen and LLaVA presets, which have
/// no prefix or suffix, that is exactly the pads), widened by `span_extend` tokens on each side.
///
/// Gemma 3's processor also wraps the replacement in `"\n\n"` text, which the tokenizer merges
/// with neighbouring newlines; the caller inserts that text before tokenizing, and
/// `span_extend` `(1, 1)` makes the span start at the token holding the leading `"\n\n"` and end
/// after the one holding the trailing one, as vLLM's Gemma 3 processor reports it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct PlaceholderSpec {
    /// The one token the chat template renders per image.
    pub placeholder: u32,
    /// Tokens inserted before the pads.
    pub prefix: Vec<u32>,
    /// The token repeated once per visual token.
    pub pad: u32,
    /// The token between two rows of pads (Pixtral's `[IMG_BREAK]`).
    pub row_break: Option<u32>,
    /// Tokens inserted after the pads.
    pub suffix: Vec<u32>,
    /// Tokens before and after the replacement that its span also covers.
    pub span_extend: (usize, usize),
    /// Llama 4's tile separators: images then have a [`PadLayout::Tiles`] layout, every other
    /// family's a [`PadLayout::Rows`] one.
    pub tiles: Option<TileTokens<u32>>,
}

/// Llama 4's tile separators (`Llama4Processor._prompt_split_image`): `column` between two
/// tiles of a row, `row` after each row of tiles, `global` before the global tile's pads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TileTokens<T> {
    /// `<|tile_x_separator|>`.
    pub column: T,
    /// `<|tile_y_separator|>`.
    pub row: T,
    /// `<|image|>`, the template's placeholder itself, which the processor writes again.
    pub global: T,
}

/// How one image's pads are arranged, which decides where the family's separators go.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PadLayout {
    /// `rows` rows of `cols` pads, the spec's `row_break` (if any) between rows: Pixtral and
    /// Mistral 3 have rows, every other family one row.
    Rows {
        /// Rows of pads.
        rows: usize,
        /// Pads per row.
        cols: usize,
    },
    /// Llama 4: `rows` x `cols` local tiles of `per_tile` pads, then the global tile's
    /// `per_tile` pads; an image of a single tile has the global tile only.
    Tiles {
        /// Rows of local tiles.
        rows: usize,
        /// Local tiles per row.
        cols: usize,
        /// Pads per tile.
        per_tile: usize,
    },
}

impl PadLayout {
    /// All pads (visual tokens) of the image; `None` on overflow.
    pub fn tokens(&self) -> Option<usize> {
        match *self {
            Self::Rows { rows, cols } => rows.checked_mul(cols),
            Self::Tiles {
                rows,
                cols,
                per_tile,
            } => per_tile.checked_mul(Self::local_tiles(rows, cols)?.checked_add(1)?),
        }
    }

    /// Local tiles written before the global one: none when the image is a single tile.
    fn local_tiles(rows: usize, cols: usize) -> Option<usize> {
        let tiles = rows.checked_mul(cols)?;
        Some(if tiles > 1 { tiles } else { 0 })
    }
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
        Self::wrapped(token, Vec::new(), token, Vec::new())
    }

    /// `placeholder` replaced by `prefix`, the pads, `suffix`; no row breaks, no wider span.
    pub fn wrapped(placeholder: u32, prefix: Vec<u32>, pad: u32, suffix: Vec<u32>) -> Self {
        Self {
            placeholder,
            prefix,
            pad,
            row_break: None,
            suffix,
            span_extend: (0, 0),
            tiles: None,
        }
    }

    /// Tokens that replace the placeholder of `image`; `None` on overflow.
    fn replacement_len(&self, image: &ImageTokens) -> Option<usize> {
        let separators = match image.layout {
            PadLayout::Rows { rows, .. } if self.row_break.is_some() => rows.saturating_sub(1),
            PadLayout::Rows { .. } => 0,
            // A column separator between tiles and a row separator after each row (one per
            // tile in all), then the global marker.
            PadLayout::Tiles { rows, cols, .. } => {
                PadLayout::local_tiles(rows, cols)?.checked_add(1)?
            }
        };
        (self.prefix.len() + self.suffix.len())
            .checked_add(separators)?
            .checked_add(image.layout.tokens()?)
    }

    /// Writes `image`'s prefix, pads with their separators, and suffix.
    fn write(&self, image: &ImageTokens, out: &mut Vec<u32>) {
        out.extend_from_slice(&self.prefix);
        let pads = |out: &mut Vec<u32>, n: usize| out.resize(out.len() + n, self.pad);
        match (image.layout, self.tiles) {
            (PadLayout::Rows { rows, cols }, _) => {
                for row in 0..rows {
                    if let (Some(row_break), true) = (self.row_break, row > 0) {
                        out.push(row_break);
                    }
                    pads(out, cols);
                }
            }
            (
                PadLayout::Tiles {
                    rows,
                    cols,
                    per_tile,
                },
                Some(tiles),
            ) => {
                if rows.saturating_mul(cols) > 1 {
                    for _ in 0..rows {
                        for col in 0..cols {
                            if col > 0 {
                                out.push(tiles.column);
                            }
                            pads(out, per_tile);
                        }
                        out.push(tiles.row);
                    }
                }
                out.push(tiles.global);
                pads(out, per_tile);
            }
            // Refused by expand_mixed before anything is written.
            (PadLayout::Tiles { .. }, None) => {}
        }
        out.extend_from_slice(&self.suffix);
    }
}

/// A family's image placeholder by the text of its tokens, to be looked up in the checkpoint's
/// tokenizer ([`PlaceholderTokens::resolve`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PlaceholderTokens {
    /// What the chat template renders once per image.
    pub placeholder: &'static str,
    /// Tokens the processor puts before the pads.
    pub prefix: &'static [&'static str],
    /// The visual token.
    pub pad: &'static str,
    /// Between rows of pads.
    pub row_break: Option<&'static str>,
    /// Tokens the processor puts after the pads.
    pub suffix: &'static [&'static str],
    /// Llama 4's tile separators.
    pub tiles: Option<TileTokens<&'static str>>,
    /// Text the processor puts around the whole replacement (Gemma 3: `"\n\n"`), which the
    /// caller inserts around the placeholder's text before tokenizing: it merges with
    /// neighbouring text.
    pub text_around: Option<&'static str>,
}

impl PlaceholderTokens {
    /// The placeholder of a `model_type` that [`VisionTokenRule::for_model_type`] counts
    /// (`pixtral` for Pixtral 12B), as its Hugging Face processor expands it.
    ///
    /// [`VisionTokenRule::for_model_type`]: crate::VisionTokenRule::for_model_type
    ///
    /// ```
    /// use kvroute_mmhash::PlaceholderTokens;
    ///
    /// let gemma = PlaceholderTokens::for_model_type("gemma3").unwrap();
    /// assert_eq!(gemma.pad, "<image_soft_token>");
    /// assert_eq!(gemma.text_around, Some("\n\n"));
    /// assert!(PlaceholderTokens::for_model_type("bert").is_none());
    /// ```
    pub fn for_model_type(model_type: &str) -> Option<Self> {
        const fn repeat(token: &'static str) -> PlaceholderTokens {
            PlaceholderTokens {
                placeholder: token,
                prefix: &[],
                pad: token,
                row_break: None,
                suffix: &[],
                tiles: None,
                text_around: None,
            }
        }
        Some(match model_type.to_ascii_lowercase().as_str() {
            "qwen2_vl" | "qwen2_5_vl" | "qwen3_vl" | "qwen3_vl_moe" => repeat("<|image_pad|>"),
            "llava" | "llava_next" | "llava_onevision" => repeat("<image>"),
            "gemma3" => Self {
                placeholder: "<start_of_image>",
                prefix: &["<start_of_image>"],
                pad: "<image_soft_token>",
                row_break: None,
                suffix: &["<end_of_image>"],
                tiles: None,
                text_around: Some("\n\n"),
            },
            "internvl" => Self {
                placeholder: "<IMG_CONTEXT>",
                prefix: &["<img>"],
                pad: "<IMG_CONTEXT>",
                row_break: None,
                suffix: &["</img>"],
                tiles: None,
                text_around: None,
            },
            "mistral3" | "pixtral" => Self {
                placeholder: "[IMG]",
                prefix: &[],
                pad: "[IMG]",
                row_break: Some("[IMG_BREAK]"),
                suffix: &["[IMG_END]"],
                tiles: None,
                text_around: None,
            },
            "llama4" => Self {
                placeholder: "<|image|>",
                prefix: &["<|image_start|>"],
                pad: "<|patch|>",
                row_break: None,
                suffix: &["<|image_end|>"],
                tiles: Some(TileTokens {
                    column: "<|tile_x_separator|>",
                    row: "<|tile_y_separator|>",
                    global: "<|image|>",
                }),
                text_around: None,
            },
            // The transformers checkpoint's image token (id 200010); vLLM's remote-code
            // `phi4mm` writes the same id, but from `<|image_N|>` text it inserts itself.
            "phi4_multimodal" => repeat("<|endoftext10|>"),
            _ => return None,
        })
    }

    /// The spec with each token's id from `token_id`; `None` when one is missing.
    pub fn resolve(&self, token_id: impl Fn(&str) -> Option<u32>) -> Option<PlaceholderSpec> {
        let ids = |texts: &[&str]| {
            texts
                .iter()
                .map(|&t| token_id(t))
                .collect::<Option<Vec<_>>>()
        };
        let around = usize::from(self.text_around.is_some());
        Some(PlaceholderSpec {
            placeholder: token_id(self.placeholder)?,
            prefix: ids(self.prefix)?,
            pad: token_id(self.pad)?,
            row_break: match self.row_break {
                Some(text) => Some(token_id(text)?),
                None => None,
            },
            suffix: ids(self.suffix)?,
            span_extend: (around, around),
            tiles: match self.tiles {
                Some(tiles) => Some(TileTokens {
                    column: token_id(tiles.column)?,
                    row: token_id(tiles.row)?,
                    global: token_id(tiles.global)?,
                }),
                None => None,
            },
        })
    }
}

/// One image (or video) to expand: its id and how its visual tokens are laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ImageTokens {
    /// The media id.
    pub id: MediaId,
    /// Its pads ([`VisionTokenRule::layout`](crate::VisionTokenRule::layout)).
    pub layout: PadLayout,
}

impl ImageTokens {
    /// `tokens` pads in one row.
    pub fn new(id: MediaId, tokens: usize) -> Self {
        Self {
            id,
            layout: PadLayout::Rows {
                rows: 1,
                cols: tokens,
            },
        }
    }
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
/// let out = expand(&prompt, &PlaceholderSpec::qwen_vl(), &[ImageTokens::new(MediaId(9), 3)])?;
/// assert_eq!(out.tokens, [1, START, QWEN_IMAGE_PAD, QWEN_IMAGE_PAD, QWEN_IMAGE_PAD, END, 2]);
/// assert_eq!(out.spans, [MediaSpan::new(2, 3, MediaId(9))]);
/// # Ok::<(), kvroute_mmhash::ExpandError>(())
/// ```
pub fn expand(
    tokens: &[u32],
    spec: &PlaceholderSpec,
    images: &[ImageTokens],
) -> Result<Expanded, ExpandError> {
    let items: Vec<(&PlaceholderSpec, ImageTokens)> =
        images.iter().map(|&image| (spec, image)).collect();
    expand_mixed(tokens, &items)
}

/// [`expand`] for media of several kinds in one prompt (images and videos), each with its own
/// spec, in prompt order: the `i`-th placeholder found must be the `i`-th item's.
///
/// ```
/// use kvroute_mmhash::{expand_mixed, ImageTokens, PlaceholderSpec};
/// use kvroute_protocol::{MediaId, MediaSpan};
///
/// let (image, video) = (PlaceholderSpec::repeat(7), PlaceholderSpec::repeat(8));
/// let items = [(&video, ImageTokens::new(MediaId(1), 2)), (&image, ImageTokens::new(MediaId(2), 1))];
/// let out = expand_mixed(&[8, 0, 7], &items)?;
/// assert_eq!(out.tokens, [8, 8, 0, 7]);
/// assert_eq!(out.spans, [MediaSpan::new(0, 2, MediaId(1)), MediaSpan::new(3, 1, MediaId(2))]);
/// # Ok::<(), kvroute_mmhash::ExpandError>(())
/// ```
pub fn expand_mixed(
    tokens: &[u32],
    items: &[(&PlaceholderSpec, ImageTokens)],
) -> Result<Expanded, ExpandError> {
    let mut kinds: Vec<u32> = items.iter().map(|(spec, _)| spec.placeholder).collect();
    kinds.sort_unstable();
    kinds.dedup();
    let is_placeholder = |token: &u32| kinds.binary_search(token).is_ok();
    let placeholders = tokens.iter().filter(|t| is_placeholder(t)).count();
    if placeholders != items.len() {
        return Err(ExpandError::PlaceholderCount {
            placeholders,
            images: items.len(),
        });
    }
    if items.iter().any(|(spec, image)| {
        matches!(image.layout, PadLayout::Tiles { .. }) != spec.tiles.is_some()
    }) {
        return Err(ExpandError::Layout);
    }
    let len = items
        .iter()
        .try_fold(tokens.len() - placeholders, |len, (spec, image)| {
            len.checked_add(spec.replacement_len(image)?)
        });
    let len = len.ok_or(ExpandError::Overflow)?;
    let mut out = Expanded {
        tokens: Vec::new(),
        spans: Vec::with_capacity(items.len()),
    };
    out.tokens
        .try_reserve_exact(len)
        .map_err(|_| ExpandError::Overflow)?;
    let mut rest = tokens;
    for (spec, image) in items {
        // As many placeholders as items: counted above.
        let Some(at) = rest.iter().position(is_placeholder) else {
            break;
        };
        if rest[at] != spec.placeholder {
            return Err(ExpandError::PlaceholderOrder {
                at: tokens.len() - rest.len() + at,
            });
        }
        out.tokens.extend_from_slice(&rest[..at]);
        rest = &rest[at + 1..];
        let start = out.tokens.len();
        spec.write(image, &mut out.tokens);
        let end = out.tokens.len();
        out.spans.push(MediaSpan::new(start, end - start, image.id));
    }
    out.tokens.extend_from_slice(rest);
    let total = out.tokens.len();
    for (span, (spec, _)) in out.spans.iter_mut().zip(items) {
        let (before, after) = spec.span_extend;
        if (before, after) != (0, 0) {
            let start = span.start.saturating_sub(before);
            let end = span.end().saturating_add(after).min(total);
            *span = MediaSpan::new(start, end - start, span.id);
        }
    }
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
        let spec = PlaceholderSpec::wrapped(7, vec![1, 7], 9, vec![8, 1]);
        let images = [ImageTokens::new(MediaId(5), 3)];
        let out = expand(&[0, 7, 0], &spec, &images).unwrap();
        assert_eq!(out.tokens, [0, 1, 7, 9, 9, 9, 8, 1, 0]);
        assert_eq!(out.spans, [MediaSpan::new(1, 7, MediaId(5))]);
    }

    #[test]
    fn rows_are_separated_and_the_span_widened() {
        let spec = PlaceholderSpec {
            row_break: Some(4),
            span_extend: (1, 1),
            ..PlaceholderSpec::wrapped(7, vec![], 9, vec![5])
        };
        let images = [ImageTokens {
            id: MediaId(5),
            layout: PadLayout::Rows { rows: 3, cols: 2 },
        }];
        let out = expand(&[0, 7, 0], &spec, &images).unwrap();
        assert_eq!(out.tokens, [0, 9, 9, 4, 9, 9, 4, 9, 9, 5, 0]);
        assert_eq!(out.spans, [MediaSpan::new(0, 11, MediaId(5))]);
    }

    #[test]
    fn tiles_are_separated_and_followed_by_the_global_tile() {
        // Llama 4: start 1, end 2, patch 9, column 5, row 6, global (the placeholder) 7.
        let spec = PlaceholderSpec {
            tiles: Some(TileTokens {
                column: 5,
                row: 6,
                global: 7,
            }),
            ..PlaceholderSpec::wrapped(7, vec![1], 9, vec![2])
        };
        let image = |rows, cols| ImageTokens {
            id: MediaId(3),
            layout: PadLayout::Tiles {
                rows,
                cols,
                per_tile: 2,
            },
        };
        let out = expand(&[0, 7, 0], &spec, &[image(2, 3)]).unwrap();
        let row = [9, 9, 5, 9, 9, 5, 9, 9, 6];
        let expected: Vec<u32> = [&[0, 1][..], &row, &row, &[7, 9, 9, 2, 0]].concat();
        assert_eq!(out.tokens, expected);
        assert_eq!(
            out.spans,
            [MediaSpan::new(1, expected.len() - 2, MediaId(3))]
        );
        // One tile: the global tile only.
        let out = expand(&[7], &spec, &[image(1, 1)]).unwrap();
        assert_eq!(out.tokens, [1, 7, 9, 9, 2]);
        // A tile layout for a family without tiles, and the reverse, are refused.
        let flat = PlaceholderSpec::repeat(7);
        assert_eq!(
            expand(&[7], &flat, &[image(1, 1)]),
            Err(ExpandError::Layout)
        );
        let rows = [ImageTokens::new(MediaId(3), 4)];
        assert_eq!(expand(&[7], &spec, &rows), Err(ExpandError::Layout));
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
