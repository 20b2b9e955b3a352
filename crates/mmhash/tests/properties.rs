//! Properties against deliberately naive references written from the specification, and
//! robustness of every entry point that input reaches: random and mutated bytes never panic.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::BlockHasher;
use kvroute_mmhash::{
    block_media_info, expand, probe, BlockExtraInfo, BlockMmObjectInfo, ExpandError, IdMode,
    ImageSource, ImageTokens, MediaConfig, MediaId, MediaProcessor, MediaSpan, PadLayout,
    PlaceholderSpec, TileTokens, VisionTokenRule,
};
use proptest::prelude::*;

const PLACEHOLDER: u32 = 3;

/// Pixel cap for the fuzz cases: a mutated header may declare any size, and decoding a large
/// one in a debug build would only slow the test down.
const SMALL_CAP: u64 = 1 << 20;

/// Token by token: copy, or expand a placeholder.
fn naive_expand(
    tokens: &[u32],
    spec: &PlaceholderSpec,
    images: &[ImageTokens],
) -> (Vec<u32>, Vec<MediaSpan>) {
    let (mut out, mut spans, mut next) = (Vec::new(), Vec::new(), 0);
    for &token in tokens {
        if token != spec.placeholder {
            out.push(token);
            continue;
        }
        let image = images[next];
        next += 1;
        let start = out.len();
        out.extend(&spec.prefix);
        match (image.layout, spec.tiles) {
            (PadLayout::Rows { rows, cols }, _) => {
                for row in 0..rows {
                    match spec.row_break {
                        Some(row_break) if row > 0 => out.push(row_break),
                        _ => {}
                    }
                    for _ in 0..cols {
                        out.push(spec.pad);
                    }
                }
            }
            // Llama4Processor._prompt_split_image, with the tokens for its strings.
            (
                PadLayout::Tiles {
                    rows,
                    cols,
                    per_tile,
                },
                Some(tiles),
            ) => {
                if rows * cols > 1 {
                    for _ in 0..rows {
                        for x in 0..cols {
                            out.extend(std::iter::repeat_n(spec.pad, per_tile));
                            if x < cols - 1 {
                                out.push(tiles.column);
                            }
                        }
                        out.push(tiles.row);
                    }
                }
                out.push(tiles.global);
                out.extend(std::iter::repeat_n(spec.pad, per_tile));
            }
            (PadLayout::Tiles { .. }, None) => unreachable!("the strategies pair tiles with tiles"),
        }
        out.extend(&spec.suffix);
        spans.push((start, out.len(), image.id));
    }
    let (before, after) = spec.span_extend;
    let spans = spans
        .into_iter()
        .map(|(start, end, id)| {
            let start = start.saturating_sub(before);
            MediaSpan::new(start, (end + after).min(out.len()) - start, id)
        })
        .collect();
    (out, spans)
}

/// Block by block, token by token: which span covers which tokens of the block.
fn naive_block_info(
    spans: &[MediaSpan],
    block: usize,
    total: usize,
) -> Vec<Option<BlockExtraInfo>> {
    (0..total.div_ceil(block))
        .map(|b| {
            let range = b * block..((b + 1) * block).min(total);
            let mut objects: Vec<BlockMmObjectInfo> = Vec::new();
            for span in spans {
                let covered: Vec<usize> = range
                    .clone()
                    .filter(|&t| t >= span.start && t < span.start + span.len)
                    .collect();
                let (Some(first), Some(last)) = (covered.first(), covered.last()) else {
                    continue;
                };
                let offsets = (first - range.start, last + 1 - range.start);
                match objects.iter_mut().find(|o| o.mm_hash == span.id) {
                    Some(object) => object.offsets.push(offsets),
                    None => objects.push(BlockMmObjectInfo {
                        mm_hash: span.id,
                        offsets: vec![offsets],
                    }),
                }
            }
            (!objects.is_empty()).then_some(BlockExtraInfo {
                mm_objects: objects,
            })
        })
        .collect()
}

fn media_id(small: u64) -> MediaId {
    MediaId(small.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// A prompt and its images, laid out in rows or (Llama 4) in tiles.
fn prompt_and_images(tiled: bool) -> impl Strategy<Value = (Vec<u32>, Vec<ImageTokens>)> {
    prop::collection::vec(
        prop_oneof![4 => 0u32..3, 1 => Just(PLACEHOLDER), 4 => 4u32..9],
        0..120,
    )
    .prop_flat_map(move |tokens| {
        let count = tokens.iter().filter(|&&t| t == PLACEHOLDER).count();
        let image = (0u64..4, 0usize..14, 0usize..4, 1usize..4).prop_map(
            move |(id, pads, rows, tile_cols)| ImageTokens {
                id: media_id(id),
                layout: if tiled {
                    PadLayout::Tiles {
                        rows: rows + 1,
                        cols: tile_cols,
                        per_tile: pads,
                    }
                } else {
                    PadLayout::Rows { rows, cols: pads }
                },
            },
        );
        (Just(tokens), prop::collection::vec(image, count))
    })
}

/// A prompt, its images and the spec to expand them with.
fn case() -> impl Strategy<Value = ((Vec<u32>, Vec<ImageTokens>), PlaceholderSpec)> {
    any::<bool>().prop_flat_map(|tiled| (prompt_and_images(tiled), spec(tiled)))
}

fn spec(tiled: bool) -> impl Strategy<Value = PlaceholderSpec> {
    let tiles = if tiled {
        Just(Some(TileTokens {
            column: 40,
            row: 41,
            global: PLACEHOLDER,
        }))
    } else {
        Just(None)
    };
    (base_spec(), tiles).prop_map(|(spec, tiles)| PlaceholderSpec { tiles, ..spec })
}

fn base_spec() -> impl Strategy<Value = PlaceholderSpec> {
    prop_oneof![
        Just(PlaceholderSpec::repeat(PLACEHOLDER)),
        (
            prop::collection::vec(10u32..12, 0..3),
            20u32..22,
            prop::collection::vec(12u32..14, 0..3),
            prop::option::of(30u32..32),
            (0usize..3, 0usize..3),
        )
            .prop_map(
                |(prefix, pad, suffix, row_break, span_extend)| PlaceholderSpec {
                    row_break,
                    span_extend,
                    ..PlaceholderSpec::wrapped(PLACEHOLDER, prefix, pad, suffix)
                }
            ),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn expansion_and_block_info_match_naive(((tokens, images), spec) in case(), block in 1usize..40) {
        let expanded = expand(&tokens, &spec, &images).unwrap();
        let (naive_tokens, naive_spans) = naive_expand(&tokens, &spec, &images);
        prop_assert_eq!(&expanded.tokens, &naive_tokens);
        prop_assert_eq!(&expanded.spans, &naive_spans);
        let total = expanded.tokens.len();
        let info = block_media_info(&expanded.spans, block, total).unwrap();
        prop_assert_eq!(&info, &naive_block_info(&naive_spans, block, total));

        // kvroute-blockhash hashes the per-block form exactly like the spans it came from.
        let hasher = BlockHasher::new(u32::try_from(block).unwrap()).unwrap();
        prop_assert_eq!(
            hasher.hash_sequence(&expanded.tokens, &expanded.spans),
            hasher.hash_sequence(&expanded.tokens, &info)
        );
    }

    #[test]
    fn block_info_matches_naive_for_arbitrary_spans(
        spans in prop::collection::vec((0usize..300, 0usize..120, 0u64..5), 0..6),
        block in 1usize..64,
        total in 0usize..320,
    ) {
        let spans: Vec<MediaSpan> =
            spans.into_iter().map(|(start, len, id)| MediaSpan::new(start, len, media_id(id))).collect();
        prop_assert_eq!(block_media_info(&spans, block, total).unwrap(), naive_block_info(&spans, block, total));
    }

    #[test]
    fn wrong_image_count_is_an_error((tokens, mut images) in prompt_and_images(false), extra in 0u64..4) {
        images.push(ImageTokens::new(media_id(extra), 1));
        let is_count_error = matches!(
            expand(&tokens, &PlaceholderSpec::repeat(PLACEHOLDER), &images),
            Err(ExpandError::PlaceholderCount { .. })
        );
        prop_assert!(is_count_error);
    }

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..256), magic in 0usize..6) {
        let prefixes: [&[u8]; 6] = [b"", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\0\0\0\0WEBP", b"BM"];
        let mut input = prefixes[magic].to_vec();
        input.extend_from_slice(&bytes);
        let _ = probe(&input, None);
        for mode in [IdMode::Bytes, IdMode::Pixels] {
            let config = MediaConfig::default().with_id_mode(mode).with_max_pixels(SMALL_CAP);
            let _ = MediaProcessor::new(config).prepare(&input, None, None);
        }
        let text = String::from_utf8_lossy(&bytes);
        let _ = ImageSource::parse(&text, 1 << 20);
        let _ = ImageSource::parse(&format!("data:image/png;base64,{text}"), 1 << 20);
    }

    #[test]
    fn mutated_fixtures_never_panic(
        file in 0usize..4,
        cut in any::<prop::sample::Index>(),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
    ) {
        let names = ["coffee_tiny_40x30.png", "chelsea.gif", "rocket_truncated_header.jpg", "astronaut_tie_126x70.png"];
        let path = format!("{}/../../tests/fixtures/images/{}", env!("CARGO_MANIFEST_DIR"), names[file]);
        let mut bytes = std::fs::read(path).unwrap();
        for (at, value) in flips {
            let at = at.index(bytes.len());
            bytes[at] = value;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let config = MediaConfig::default().with_id_mode(IdMode::Pixels).with_max_pixels(SMALL_CAP);
        let _ = MediaProcessor::new(config).prepare(&bytes, None, None);
    }

    #[test]
    fn token_rules_never_panic(width in any::<u32>(), height in any::<u32>()) {
        for family in [
            "qwen2_vl", "qwen3_vl", "llava", "llava_next", "llava_onevision", "gemma3",
            "internvl", "mistral3", "pixtral", "llama4", "phi4_multimodal",
        ] {
            let rule = VisionTokenRule::for_model_type(family).unwrap();
            let _ = rule.tokens(width, height);
            let _ = rule.layout(width, height);
        }
    }
}

#[test]
fn zero_block_size_is_an_error() {
    assert_eq!(
        block_media_info(&[], 0, 10),
        Err(ExpandError::ZeroBlockSize)
    );
    assert_eq!(block_media_info(&[], 16, 0), Ok(vec![]));
}
