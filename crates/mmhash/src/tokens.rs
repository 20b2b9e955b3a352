//! Visual token counts per model family, ported from the Hugging Face processors.
//!
//! Sources (transformers; see docs/multimodal.md for the formulas and their traps):
//! * Qwen2-VL, Qwen2.5-VL, Qwen3-VL: `smart_resize` in
//!   `models/qwen2_vl/image_processing_qwen2_vl.py` (Qwen3-VL's image processor is the Qwen2-VL
//!   one with patch size 16); tokens = `(h'/factor) * (w'/factor)`.
//! * LLaVA-1.5: `LlavaProcessor`: `(crop/patch)^2 + num_additional_image_tokens`, minus one for
//!   the `default` feature select strategy.
//! * LLaVA-NeXT: `LlavaNextProcessor._get_number_of_features` with `select_best_resolution`
//!   (`image_processing_utils.py`) over `image_grid_pinpoints`.
//! * LLaVA-OneVision: `LlavaOnevisionProcessor._get_number_of_features`: the LLaVA-NeXT grid
//!   without CLS, shrunk when it exceeds `anyres_max_9` tiles' worth of features.
//! * Gemma 3: `Gemma3Processor`: `mm_tokens_per_image` soft tokens per image (pan and scan off).
//! * InternVL3: `GotOcr2ImageProcessor.get_number_of_image_patches` (tiles of the best aspect
//!   ratio plus a thumbnail) times `InternVLProcessor.image_seq_length`.
//! * Pixtral, Mistral 3: `PixtralProcessor`: the image scaled into `longest_edge`, a grid of
//!   `patch_size * spatial_merge_size` cells, one break token per row.
//! * Llama 4: `Llama4ImageProcessor` (`find_supported_resolutions`, `get_best_fit`, in
//!   float32 as torch computes them) and `Llama4Processor._prompt_split_image`.
//! * Phi-4-multimodal: `Phi4MultimodalImageProcessor` (`_get_crop_layout`, the padding mask,
//!   `_get_num_image_tokens`), which vLLM's `phi4mm` repeats.
//!
//! Every rule is checked case by case against the processors themselves
//! (`tests/fixtures/processors`).

use crate::error::TokenError;
use crate::expand::PadLayout;

/// Qwen's `smart_resize`: scale to multiples of `factor` keeping the aspect ratio, within
/// `[min_pixels, max_pixels]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct SmartResize {
    /// `patch_size * merge_size`: 28 for Qwen2-VL and Qwen2.5-VL, 32 for Qwen3-VL.
    pub factor: u32,
    /// `size["shortest_edge"]` (`min_pixels`) of the checkpoint's preprocessor config.
    pub min_pixels: u64,
    /// `size["longest_edge"]` (`max_pixels`) of the checkpoint's preprocessor config.
    pub max_pixels: u64,
}

/// A size after resizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Resized {
    /// Width in pixels.
    pub width: u32,
    /// Height in pixels.
    pub height: u32,
}

/// The largest aspect ratio Qwen's `smart_resize` accepts.
pub const QWEN_MAX_ASPECT_RATIO: u32 = 200;

impl SmartResize {
    /// Qwen2-VL and Qwen2.5-VL checkpoints (`preprocessor_config.json`: `min_pixels` 3136,
    /// `max_pixels` 12845056). transformers' class default `max_pixels` is 1003520
    /// (`28*28*1280`): an engine that loads the checkpoint's config uses the larger value.
    pub const QWEN2_VL: SmartResize = SmartResize {
        factor: 28,
        min_pixels: 56 * 56,
        max_pixels: 28 * 28 * 16384,
    };

    /// Qwen3-VL checkpoints: patch 16, merge 2, `shortest_edge` 65536, `longest_edge`
    /// 16777216.
    pub const QWEN3_VL: SmartResize = SmartResize {
        factor: 32,
        min_pixels: 65_536,
        max_pixels: 16_777_216,
    };

    /// The size the processor resizes a `width` x `height` image to.
    ///
    /// Bit-exact with transformers: f64 arithmetic in Python's order, Python's round half to
    /// even, no clamp before the branch test, and aspect ratios above 200 refused.
    ///
    /// ```
    /// use kvroute_mmhash::{Resized, SmartResize};
    ///
    /// // 126/28 = 4.5 and 70/28 = 2.5 round to even: 112 x 56, not 140 x 84.
    /// assert_eq!(SmartResize::QWEN2_VL.resize(126, 70)?, Resized { width: 112, height: 56 });
    /// assert_eq!(SmartResize::QWEN2_VL.tokens(126, 70)?, 8);
    /// assert!(SmartResize::QWEN2_VL.tokens(1000, 4).is_err()); // aspect ratio 250
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn resize(&self, width: u32, height: u32) -> Result<Resized, TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.factor == 0 {
            return Err(TokenError::Degenerate("zero resize factor"));
        }
        let (h, w) = (f64::from(height), f64::from(width));
        if h.max(w) / h.min(w) > f64::from(QWEN_MAX_ASPECT_RATIO) {
            return Err(TokenError::AspectRatio {
                width,
                height,
                max: QWEN_MAX_ASPECT_RATIO,
            });
        }
        let factor = f64::from(self.factor);
        let mut h_bar = (h / factor).round_ties_even() * factor;
        let mut w_bar = (w / factor).round_ties_even() * factor;
        // Python compares integers here; u128 keeps that exact for any u32 size.
        let area = u128::from(f64_to_u64(h_bar)?) * u128::from(f64_to_u64(w_bar)?);
        if area > u128::from(self.max_pixels) {
            let beta = ((h * w) / self.max_pixels as f64).sqrt();
            h_bar = factor.max((h / beta / factor).floor() * factor);
            w_bar = factor.max((w / beta / factor).floor() * factor);
        } else if area < u128::from(self.min_pixels) {
            let beta = (self.min_pixels as f64 / (h * w)).sqrt();
            h_bar = (h * beta / factor).ceil() * factor;
            w_bar = (w * beta / factor).ceil() * factor;
        }
        let to_u32 = |v: f64| u32::try_from(f64_to_u64(v)?).map_err(|_| TokenError::Overflow);
        Ok(Resized {
            width: to_u32(w_bar)?,
            height: to_u32(h_bar)?,
        })
    }

    /// Visual tokens for one image: `(h'/factor) * (w'/factor)` (the processor's
    /// `grid_h * grid_w / merge_size^2`).
    pub fn tokens(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        let resized = self.resize(width, height)?;
        (resized.height / self.factor)
            .checked_mul(resized.width / self.factor)
            .ok_or(TokenError::Overflow)
    }
}

fn f64_to_u64(value: f64) -> Result<u64, TokenError> {
    if value.is_finite() && (0.0..=u64::MAX as f64).contains(&value) {
        Ok(value as u64)
    } else {
        Err(TokenError::Overflow)
    }
}

/// LLaVA-NeXT's "anyres": a base tile plus a grid of tiles chosen among `grid_pinpoints`,
/// with padding rows and columns removed and one newline feature per row.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct AnyRes {
    /// Vision tower patch size (14).
    pub patch_size: u32,
    /// Tile side (`crop_size`, 336).
    pub tile_size: u32,
    /// Candidate resolutions as `(height, width)`, in the config's order (ties keep the first).
    pub grid_pinpoints: Vec<(u32, u32)>,
    /// Extra tokens of the vision tower per tile (1: CLIP's CLS).
    pub num_additional_image_tokens: u32,
    /// `vision_feature_select_strategy == "default"`, which drops the CLS feature.
    pub drop_cls: bool,
    /// LLaVA-OneVision's `vision_aspect_ratio` `anyres_max_N`: a grid larger than N tiles'
    /// worth of features (by more than 10%) is scaled down to about that; `None` for LLaVA-NeXT.
    pub max_num_patches: Option<u32>,
}

impl AnyRes {
    /// The llava-hf LLaVA-NeXT (v1.6) checkpoints' processor config.
    pub fn llava_v1_6() -> Self {
        Self {
            patch_size: 14,
            tile_size: 336,
            grid_pinpoints: vec![(336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008)],
            num_additional_image_tokens: 1,
            drop_cls: true,
            max_num_patches: None,
        }
    }

    /// The llava-hf LLaVA-OneVision checkpoints (`llava-onevision-qwen2-*-ov-hf`): SigLIP at 384
    /// px with patch 14 (27x27 = 729 features per tile, no CLS, strategy `full`), pinpoints of
    /// 1x1 to 6x6 tiles, `anyres_max_9`.
    pub fn llava_onevision() -> Self {
        Self {
            patch_size: 14,
            tile_size: 384,
            grid_pinpoints: (1..=6)
                .flat_map(|h| (1..=6).map(move |w| (384 * h, 384 * w)))
                .collect(),
            num_additional_image_tokens: 0,
            drop_cls: false,
            max_num_patches: Some(9),
        }
    }

    /// Visual tokens for a `width` x `height` image.
    ///
    /// ```
    /// use kvroute_mmhash::AnyRes;
    ///
    /// assert_eq!(AnyRes::llava_v1_6().tokens(640, 480)?, 2340);
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn tokens(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.patch_size == 0 || self.tile_size == 0 {
            return Err(TokenError::Degenerate("zero patch or tile size"));
        }
        let (best_h, best_w) = self
            .best_resolution(width, height)
            .ok_or(TokenError::Degenerate("no usable grid pinpoint"))?;
        let patches = i64::from(self.tile_size / self.patch_size);
        let mut current_h = patches * i64::from(best_h / self.tile_size);
        let mut current_w = patches * i64::from(best_w / self.tile_size);
        if current_h == 0 || current_w == 0 {
            return Err(TokenError::Degenerate("grid pinpoint smaller than a tile"));
        }
        let (h, w) = (f64::from(height), f64::from(width));
        if w / h > current_w as f64 / current_h as f64 {
            let new_h = python_int_round7(h * (current_w as f64 / w));
            current_h -= (current_h - new_h).div_euclid(2) * 2;
        } else {
            let new_w = python_int_round7(w * (current_h as f64 / h));
            current_w -= (current_w - new_w).div_euclid(2) * 2;
        }
        let mut unpadded = current_h * current_w;
        let mut newlines = current_h;
        if let Some(max) = self.max_num_patches {
            let ratio = (unpadded as f64 / (f64::from(max) * (patches * patches) as f64)).sqrt();
            if ratio > 1.1 {
                let rows = python_floordiv(current_h as f64, ratio) as i64;
                unpadded = rows * python_floordiv(current_w as f64, ratio) as i64;
                newlines = rows;
            }
        }
        let base = patches * patches + i64::from(self.num_additional_image_tokens);
        let total = unpadded + newlines + base - i64::from(self.drop_cls);
        u32::try_from(total).map_err(|_| TokenError::Overflow)
    }

    /// transformers' `select_best_resolution`: the pinpoint keeping the most original pixels,
    /// then wasting the fewest.
    fn best_resolution(&self, width: u32, height: u32) -> Option<(u32, u32)> {
        let (ow, oh) = (f64::from(width), f64::from(height));
        let original = u64::from(width) * u64::from(height);
        let mut best = None;
        let (mut max_effective, mut min_wasted) = (0u64, u64::MAX);
        for &(ph, pw) in &self.grid_pinpoints {
            let scale = (f64::from(pw) / ow).min(f64::from(ph) / oh);
            // Python's int() truncates toward zero; the values are non-negative.
            let down_w = (ow * scale) as u64;
            let down_h = (oh * scale) as u64;
            let effective = (down_w * down_h).min(original);
            let wasted = (u64::from(pw) * u64::from(ph)).saturating_sub(effective);
            if effective > max_effective || (effective == max_effective && wasted < min_wasted) {
                max_effective = effective;
                min_wasted = wasted;
                best = Some((ph, pw));
            }
        }
        best
    }
}

/// Python's `int(round(x, 7))` for a non-negative `x`: the integer part after rounding to
/// seven decimals, i.e. `floor(x)` plus one when `x` is within half of 1e-7 below the next
/// integer (ties go to the even seventh decimal, which is the integer).
fn python_int_round7(x: f64) -> i64 {
    let floor = x.floor();
    let next = floor + 1.0;
    if next - x <= 0.5e-7 {
        next as i64
    } else {
        floor as i64
    }
}

/// Python's float floor division `a // b` for finite positive operands: CPython computes it
/// from `fmod`, which can differ from `floor(a / b)` when the quotient rounds up to an integer.
fn python_floordiv(a: f64, b: f64) -> f64 {
    let rem = a % b;
    let div = (a - rem) / b;
    let floor = div.floor();
    if div - floor > 0.5 {
        floor + 1.0
    } else {
        floor
    }
}

/// InternVL's dynamic tiling (`GotOcr2ImageProcessor` with `crop_to_patches`): the grid of
/// `min_tiles..=max_tiles` tiles whose aspect ratio is closest to the image's, plus a thumbnail
/// tile when there is more than one, each tile `tokens_per_tile` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Tiles {
    /// Tile side (`size`, 448).
    pub tile_size: u32,
    /// `min_patches` (1).
    pub min_tiles: u32,
    /// `max_patches` (12).
    pub max_tiles: u32,
    /// `image_seq_length` of the processor (256).
    pub tokens_per_tile: u32,
}

impl Tiles {
    /// The InternVL3 `-hf` checkpoints.
    pub const INTERNVL3: Tiles = Tiles {
        tile_size: 448,
        min_tiles: 1,
        max_tiles: 12,
        tokens_per_tile: 256,
    };

    /// Tiles the image is cut into, thumbnail included.
    ///
    /// ```
    /// use kvroute_mmhash::Tiles;
    ///
    /// assert_eq!(Tiles::INTERNVL3.tiles(448, 448)?, 1);
    /// assert_eq!(Tiles::INTERNVL3.tiles(896, 448)?, 3); // 2x1 and the thumbnail
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn tiles(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.max_tiles <= 1 {
            return Ok(1);
        }
        // get_all_supported_aspect_ratios: (columns, rows) by width then height, stably sorted
        // by tile count.
        let mut grids: Vec<(u32, u32)> = (1..=self.max_tiles)
            .flat_map(|w| (1..=self.max_tiles).map(move |h| (w, h)))
            .filter(|&(w, h)| (self.min_tiles..=self.max_tiles).contains(&(w * h)))
            .collect();
        grids.sort_by_key(|&(w, h)| w * h);
        let aspect = f64::from(width) / f64::from(height);
        let area = u64::from(width) * u64::from(height);
        let tile_area = 0.5 * f64::from(self.tile_size) * f64::from(self.tile_size);
        let (mut best, mut best_diff) = ((1, 1), f64::INFINITY);
        for (w, h) in grids {
            let diff = (aspect - f64::from(w) / f64::from(h)).abs();
            if diff < best_diff {
                (best, best_diff) = ((w, h), diff);
            } else if diff == best_diff && area as f64 > tile_area * f64::from(w * h) {
                best = (w, h);
            }
        }
        let count = best.0 * best.1;
        Ok(if count > 1 { count + 1 } else { 1 })
    }

    /// Visual tokens: tiles times tokens per tile.
    pub fn tokens(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        self.tiles(width, height)?
            .checked_mul(self.tokens_per_tile)
            .ok_or(TokenError::Overflow)
    }
}

/// Pixtral and Mistral 3 (`PixtralProcessor`): the image scaled down (never up) to fit a
/// `longest_edge` square, floor-rounded, then covered by `cell`-pixel cells (`patch_size *
/// spatial_merge_size`); one token per cell, rows ended by a break token.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PatchGrid {
    /// `size.longest_edge`: 1024 (Pixtral 12B), 1540 (Mistral Small 3.1).
    pub longest_edge: u32,
    /// `patch_size * spatial_merge_size`: 16 (Pixtral 12B), 28 (Mistral Small 3.1).
    pub cell: u32,
}

impl PatchGrid {
    /// `mistral-community/pixtral-12b`.
    pub const PIXTRAL_12B: PatchGrid = PatchGrid {
        longest_edge: 1024,
        cell: 16,
    };

    /// `mistralai/Mistral-Small-3.1-24B-Instruct-2503` (patch 14, spatial merge 2).
    pub const MISTRAL3: PatchGrid = PatchGrid {
        longest_edge: 1540,
        cell: 28,
    };

    /// Rows and columns of cells.
    ///
    /// ```
    /// use kvroute_mmhash::{PatchGrid, TokenGrid};
    ///
    /// assert_eq!(PatchGrid::PIXTRAL_12B.grid(640, 480)?, TokenGrid { rows: 30, cols: 40 });
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn grid(&self, width: u32, height: u32) -> Result<TokenGrid, TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.cell == 0 || self.longest_edge == 0 {
            return Err(TokenError::Degenerate("zero cell or longest edge"));
        }
        let (mut h, mut w) = (f64::from(height), f64::from(width));
        let edge = f64::from(self.longest_edge);
        let ratio = (h / edge).max(w / edge);
        if ratio > 1.0 {
            h = (h / ratio).floor();
            w = (w / ratio).floor();
        }
        // A side scaled below one pixel: the processor would resize to zero and fail.
        if h < 1.0 || w < 1.0 {
            return Err(TokenError::Degenerate("a side scales to zero pixels"));
        }
        let cells = |side: f64| (side as u32 - 1) / self.cell + 1;
        Ok(TokenGrid {
            rows: cells(h),
            cols: cells(w),
        })
    }
}

/// Llama 4's tiling (`Llama4ImageProcessor`, `resize_to_max_canvas` false): the canvas of at
/// most `max_tiles` square tiles that needs the least downscaling, or the least upscaling
/// when the image fits one, smallest area on ties; each tile, and the global tile added when
/// there is more than one, is `tokens_per_tile` tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Llama4Tiles {
    /// Tile side (`size`, 336).
    pub tile_size: u32,
    /// `max_patches` (16).
    pub max_tiles: u32,
    /// `resize_to_max_canvas` (false): true picks the largest upscaling instead.
    pub resize_to_max_canvas: bool,
    /// `(tile_size / patch_size)^2 / downsample_ratio`: 144 for 336 px, patch 14 and pixel
    /// shuffle ratio 0.5 (`Llama4Processor`'s `num_patches_per_chunk`).
    pub tokens_per_tile: u32,
}

impl Llama4Tiles {
    /// Llama 4 Scout and Maverick (`preprocessor_config.json`: 336 px, `max_patches` 16,
    /// `resize_to_max_canvas` false; patch 14, `pixel_shuffle_ratio` 0.5).
    pub const LLAMA4: Llama4Tiles = Llama4Tiles {
        tile_size: 336,
        max_tiles: 16,
        resize_to_max_canvas: false,
        tokens_per_tile: 144,
    };

    /// The canvases are enumerated in quadratic time: a configuration asking for more tiles
    /// than this is refused.
    const MAX_TILES: u32 = 1024;

    /// The canvas in tiles, `(rows, columns)`.
    ///
    /// ```
    /// use kvroute_mmhash::Llama4Tiles;
    ///
    /// assert_eq!(Llama4Tiles::LLAMA4.tiles(336, 336)?, (1, 1));
    /// assert_eq!(Llama4Tiles::LLAMA4.tiles(640, 480)?, (2, 2));
    /// assert_eq!(Llama4Tiles::LLAMA4.tiles(4000, 20)?, (1, 12)); // 12 x 336 = 4032 px wide
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn tiles(&self, width: u32, height: u32) -> Result<(u32, u32), TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.tile_size == 0 || !(1..=Self::MAX_TILES).contains(&self.max_tiles) {
            return Err(TokenError::Degenerate(
                "zero tile size, or tile limit not in 1..=1024",
            ));
        }
        let canvases = Self::canvases(self.max_tiles);
        // torch divides the int64 canvas by the int size in float32.
        let (w, h) = (width as f32, height as f32);
        let side = self.tile_size as f32;
        let scales: Vec<f32> = canvases
            .iter()
            .map(|&(rows, cols)| {
                let (scale_w, scale_h) = ((cols as f32 * side) / w, (rows as f32 * side) / h);
                if scale_h > scale_w {
                    scale_w
                } else {
                    scale_h
                }
            })
            .collect();
        let up = scales.iter().copied().filter(|&s| s >= 1.0);
        let selected = if scales.iter().any(|&s| s >= 1.0) {
            if self.resize_to_max_canvas {
                up.fold(f32::NEG_INFINITY, f32::max)
            } else {
                up.fold(f32::INFINITY, f32::min)
            }
        } else {
            scales.iter().copied().fold(f32::NEG_INFINITY, f32::max)
        };
        // Among the canvases of the selected scale, the first of the smallest area
        // (torch.argmin).
        canvases
            .iter()
            .zip(&scales)
            .filter(|(_, &scale)| scale == selected)
            .map(|(&canvas, _)| canvas)
            .min_by_key(|&(rows, cols)| rows * cols)
            .ok_or(TokenError::Degenerate("no canvas"))
    }

    /// `find_supported_resolutions` in tiles, `(rows, columns)`, in its order: tile counts
    /// from `max_tiles` down, each count's factorizations grouped by aspect ratio in order of
    /// the ratio's first appearance.
    fn canvases(max_tiles: u32) -> Vec<(u32, u32)> {
        // An aspect ratio in lowest terms, and its canvases.
        type Group = ((u32, u32), Vec<(u32, u32)>);
        let mut groups: Vec<Group> = Vec::new();
        for count in (1..=max_tiles).rev() {
            for rows in (1..=count).filter(|r| count % r == 0) {
                let cols = count / rows;
                // Python keys a dict by the float rows / cols: equal ratios share a key.
                let ratio = (rows / gcd(rows, cols), cols / gcd(rows, cols));
                match groups.iter_mut().find(|(key, _)| *key == ratio) {
                    Some((_, group)) => group.push((rows, cols)),
                    None => groups.push((ratio, vec![(rows, cols)])),
                }
            }
        }
        groups.into_iter().flat_map(|(_, group)| group).collect()
    }

    /// The pads of one image: its local tiles (none when it is one tile) and the global tile.
    pub fn layout(&self, width: u32, height: u32) -> Result<PadLayout, TokenError> {
        let (rows, cols) = self.tiles(width, height)?;
        Ok(PadLayout::Tiles {
            rows: rows as usize,
            cols: cols as usize,
            per_tile: self.tokens_per_tile as usize,
        })
    }
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Phi-4-multimodal's dynamic HD crops (`Phi4MultimodalImageProcessor`, and vLLM's `phi4mm`
/// alike): the image cut into 448-px crops (as many as it covers, or, past `max_crops`, the
/// grid of at most `max_crops` closest in aspect ratio), scaled into them and padded; the
/// count is the global image's 256 tokens and 16 row ends, a separator, and the crops'
/// features pooled 2x2 that are not all padding, with one row end per feature row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct DynamicHd {
    /// `dynamic_hd` (36 in the checkpoint's `preprocessor_config.json`; the vLLM fallback
    /// and older processors say 16).
    pub max_crops: u32,
}

impl DynamicHd {
    /// `microsoft/Phi-4-multimodal-instruct`.
    pub const PHI4_MULTIMODAL: DynamicHd = DynamicHd { max_crops: 36 };

    /// Crop side (the SigLIP tower's 448 px; fixed in transformers and vLLM).
    const CROP: u32 = 448;
    /// Vision patch side (14): a crop is 32 x 32 features.
    const PATCH: u32 = 14;
    /// The processor refuses an image whose scaled side would be shorter.
    const MIN_SIDE: u32 = 10;

    /// Visual tokens for one image.
    ///
    /// ```
    /// use kvroute_mmhash::DynamicHd;
    ///
    /// // One crop, no padding: 256 + 1 + 16 + 16 rows of (16 + 1).
    /// assert_eq!(DynamicHd::PHI4_MULTIMODAL.tokens(448, 448)?, 545);
    /// assert!(DynamicHd::PHI4_MULTIMODAL.tokens(5000, 3).is_err());
    /// # Ok::<(), kvroute_mmhash::TokenError>(())
    /// ```
    pub fn tokens(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        if width == 0 || height == 0 {
            return Err(TokenError::Degenerate("zero width or height"));
        }
        if self.max_crops == 0 {
            return Err(TokenError::Degenerate("zero crops"));
        }
        let (cols, rows) = self.crops(width, height);
        let crop = u64::from(Self::CROP);
        let (target_w, target_h) = (crop * u64::from(cols), crop * u64::from(rows));
        let (w, h) = (f64::from(width), f64::from(height));
        let (ratio_w, ratio_h) = (target_w as f64 / w, target_h as f64 / h);
        // Python's int() truncates; the products are non-negative.
        let (new_w, new_h, pad_w, pad_h) = if ratio_w < ratio_h {
            let new_h = (h * ratio_w) as u64;
            (target_w, new_h, 0, target_h.saturating_sub(new_h))
        } else {
            let new_w = (w * ratio_h) as u64;
            (new_w, target_h, target_w.saturating_sub(new_w), 0)
        };
        let min = u64::from(Self::MIN_SIDE);
        if new_h.min(target_h) < min || new_w.min(target_w) < min {
            return Err(TokenError::TooThin {
                width,
                height,
                min: Self::MIN_SIDE,
            });
        }
        // The attention mask: 32 features per crop side, the columns and rows that are
        // padding (whole patches of it) masked; pooling keeps every other feature from the
        // first, so a side of n unmasked features gives ceil(n / 2).
        let features = u64::from(Self::CROP / Self::PATCH);
        let patch = u64::from(Self::PATCH);
        let unmasked = |side: u64, pad: u64| side - if pad >= patch { pad / patch } else { 0 };
        let feat_cols = unmasked(features * u64::from(cols), pad_w).div_ceil(2);
        let feat_rows = unmasked(features * u64::from(rows), pad_h).div_ceil(2);
        let global = (features / 2) * (features / 2) + features / 2;
        let total = global + 1 + feat_rows * (feat_cols + 1);
        u32::try_from(total).map_err(|_| TokenError::Overflow)
    }

    /// The crop grid, `(columns, rows)`.
    fn crops(&self, width: u32, height: u32) -> (u32, u32) {
        let (cols, rows) = (width.div_ceil(Self::CROP), height.div_ceil(Self::CROP));
        if u64::from(cols) * u64::from(rows) <= u64::from(self.max_crops) {
            return (cols, rows);
        }
        // find_closest_aspect_ratio over every grid of at most max_crops, by crop count: the
        // closest ratio, a later (larger) grid on a tie when the image is larger than half
        // its area. Grids of one count never tie (checked for every count up to 36), so the
        // order within a count, a Python set's, does not matter.
        let aspect = f64::from(width) / f64::from(height);
        let area = f64::from(width) * f64::from(height);
        let max = self.max_crops;
        let mut grids: Vec<(u32, u32)> = (1..=max)
            .flat_map(|i| (1..=max / i).map(move |j| (i, j)))
            .collect();
        grids.sort_by_key(|&(i, j)| i * j);
        let half_crop = 0.5 * f64::from(Self::CROP) * f64::from(Self::CROP);
        let (mut best, mut best_diff) = ((1, 1), f64::INFINITY);
        for (i, j) in grids {
            let diff = (aspect - f64::from(i) / f64::from(j)).abs();
            if diff < best_diff {
                (best, best_diff) = ((i, j), diff);
            } else if diff == best_diff && area > half_crop * f64::from(i) * f64::from(j) {
                best = (i, j);
            }
        }
        best
    }
}

/// Where one image's visual tokens go: `rows` rows of `cols` tokens. Families without a row
/// structure have a single row.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TokenGrid {
    /// Rows.
    pub rows: u32,
    /// Tokens per row.
    pub cols: u32,
}

impl TokenGrid {
    /// One row of `count` tokens.
    pub fn flat(count: u32) -> Self {
        Self {
            rows: 1,
            cols: count,
        }
    }

    /// All visual tokens (`rows * cols`).
    pub fn tokens(&self) -> Result<u32, TokenError> {
        self.rows.checked_mul(self.cols).ok_or(TokenError::Overflow)
    }
}

/// A model family's visual token rule.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum VisionTokenRule {
    /// Qwen2-VL, Qwen2.5-VL (factor 28), Qwen3-VL (factor 32).
    SmartResize(SmartResize),
    /// LLaVA-NeXT anyres.
    AnyRes(AnyRes),
    /// A fixed count whatever the size: LLaVA-1.5 (576), Gemma 3 (256).
    Fixed(u32),
    /// InternVL dynamic tiles.
    Tiles(Tiles),
    /// Pixtral and Mistral 3: a grid of cells with row breaks.
    PatchGrid(PatchGrid),
    /// Llama 4: tiles and a global tile.
    Llama4(Llama4Tiles),
    /// Phi-4-multimodal: dynamic HD crops.
    DynamicHd(DynamicHd),
}

/// LLaVA-1.5 (CLIP ViT-L/14 at 336 px): `(336/14)^2 + 1 - 1` tokens per image.
pub const LLAVA_1_5_TOKENS: u32 = 576;

/// Gemma 3: `mm_tokens_per_image` soft tokens per image.
pub const GEMMA3_TOKENS: u32 = 256;

impl VisionTokenRule {
    /// The rule for a Hugging Face `model_type` (`config.json`), with the public checkpoints'
    /// processor settings: `qwen2_vl`, `qwen2_5_vl`, `qwen3_vl`, `qwen3_vl_moe`, `llava`
    /// (LLaVA-1.5), `llava_next`, `llava_onevision`, `gemma3`, `internvl` (InternVL3 `-hf`),
    /// `mistral3`, `pixtral` (Pixtral 12B, whose `config.json` says `llava` with a `pixtral`
    /// vision tower: pass `pixtral`), `llama4`, `phi4_multimodal` and `phi4mm` (Phi-4-multimodal,
    /// transformers and remote-code checkpoints). The remote-code InternVL (`internvl_chat`)
    /// is [`TokenError::Unsupported`]; any other type is [`TokenError::UnknownModel`], never a
    /// guess.
    ///
    /// ```
    /// use kvroute_mmhash::{TokenError, VisionTokenRule};
    ///
    /// assert_eq!(VisionTokenRule::for_model_type("qwen2_vl")?.tokens(512, 512)?, 324);
    /// assert_eq!(VisionTokenRule::for_model_type("gemma3")?.tokens(512, 512)?, 256);
    /// assert!(matches!(VisionTokenRule::for_model_type("idefics3"), Err(TokenError::UnknownModel(_))));
    /// # Ok::<(), TokenError>(())
    /// ```
    pub fn for_model_type(model_type: &str) -> Result<Self, TokenError> {
        match model_type.to_ascii_lowercase().as_str() {
            "qwen2_vl" | "qwen2_5_vl" => Ok(Self::SmartResize(SmartResize::QWEN2_VL)),
            "qwen3_vl" | "qwen3_vl_moe" => Ok(Self::SmartResize(SmartResize::QWEN3_VL)),
            "llava" => Ok(Self::Fixed(LLAVA_1_5_TOKENS)),
            "llava_next" => Ok(Self::AnyRes(AnyRes::llava_v1_6())),
            "llava_onevision" => Ok(Self::AnyRes(AnyRes::llava_onevision())),
            "gemma3" => Ok(Self::Fixed(GEMMA3_TOKENS)),
            "internvl" => Ok(Self::Tiles(Tiles::INTERNVL3)),
            "mistral3" => Ok(Self::PatchGrid(PatchGrid::MISTRAL3)),
            "pixtral" => Ok(Self::PatchGrid(PatchGrid::PIXTRAL_12B)),
            "llama4" => Ok(Self::Llama4(Llama4Tiles::LLAMA4)),
            "phi4_multimodal" | "phi4mm" => Ok(Self::DynamicHd(DynamicHd::PHI4_MULTIMODAL)),
            "internvl_chat" => Err(TokenError::Unsupported {
                model_type: model_type.to_owned(),
                reason:
                    "the remote-code InternVL processor is not ported; serve the -hf checkpoint",
            }),
            _ => Err(TokenError::UnknownModel(model_type.to_owned())),
        }
    }

    /// How the visual tokens of one `width` x `height` image are laid out: rows of tokens
    /// for Pixtral and Mistral 3, tiles for Llama 4, a single row for every other family.
    pub fn layout(&self, width: u32, height: u32) -> Result<PadLayout, TokenError> {
        let rows = |grid: TokenGrid| PadLayout::Rows {
            rows: grid.rows as usize,
            cols: grid.cols as usize,
        };
        match self {
            Self::PatchGrid(rule) => rule.grid(width, height).map(rows),
            Self::Llama4(rule) => rule.layout(width, height),
            _ => self.tokens(width, height).map(TokenGrid::flat).map(rows),
        }
    }

    /// Visual tokens the engine inserts for one `width` x `height` image (dimensions after
    /// EXIF orientation, as [`ImageInfo`](crate::ImageInfo) gives them).
    pub fn tokens(&self, width: u32, height: u32) -> Result<u32, TokenError> {
        match self {
            Self::SmartResize(rule) => rule.tokens(width, height),
            Self::AnyRes(rule) => rule.tokens(width, height),
            Self::Fixed(count) => Ok(*count),
            Self::Tiles(rule) => rule.tokens(width, height),
            Self::PatchGrid(rule) => rule.grid(width, height)?.tokens(),
            Self::Llama4(rule) => {
                let tokens = rule.layout(width, height)?.tokens();
                tokens
                    .and_then(|t| u32::try_from(t).ok())
                    .ok_or(TokenError::Overflow)
            }
            Self::DynamicHd(rule) => rule.tokens(width, height),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn qwen_branches() {
        let rule = SmartResize::QWEN2_VL;
        // min_pixels branch, a side of 14 px or less (no clamp before the test), max branch.
        assert_eq!(
            rule.resize(40, 30).unwrap(),
            Resized {
                width: 84,
                height: 56
            }
        );
        assert_eq!(
            rule.resize(1000, 10).unwrap(),
            Resized {
                width: 560,
                height: 28
            }
        );
        assert_eq!(
            rule.resize(4624, 3472).unwrap(),
            Resized {
                width: 4116,
                height: 3080
            }
        );
        assert_eq!(rule.tokens(20000, 20000).unwrap(), 16129);
        let class_default = SmartResize {
            max_pixels: 28 * 28 * 1280,
            ..rule
        };
        assert_eq!(class_default.tokens(1411, 1411).unwrap(), 1225);
        assert_eq!(
            rule.tokens(1000, 4),
            Err(TokenError::AspectRatio {
                width: 1000,
                height: 4,
                max: 200
            })
        );
        // Exactly 200 is accepted.
        assert!(rule.tokens(2000, 10).is_ok());
        assert!(rule.tokens(0, 10).is_err());
        assert!(SmartResize { factor: 0, ..rule }.tokens(10, 10).is_err());
    }

    #[test]
    fn qwen3_uses_factor_32() {
        let rule = SmartResize::QWEN3_VL;
        // 512x512: round(16) * 32 = 512, area 262144 within [65536, 16777216].
        assert_eq!(rule.tokens(512, 512).unwrap(), 256);
        // 100x100 is below min_pixels: scaled up to 256x256.
        assert_eq!(
            rule.resize(100, 100).unwrap(),
            Resized {
                width: 256,
                height: 256
            }
        );
    }

    #[test]
    fn llava_next_grid() {
        let rule = AnyRes::llava_v1_6();
        // Square image: best fit (336, 672) wastes least; the padded half is removed.
        assert_eq!(rule.tokens(336, 336).unwrap(), 1176);
        assert_eq!(rule.tokens(640, 480).unwrap(), 2340);
        assert_eq!(rule.tokens(480, 640).unwrap(), 2352);
        assert!(rule.tokens(0, 1).is_err());
        let empty = AnyRes {
            grid_pinpoints: vec![],
            ..rule
        };
        assert!(empty.tokens(10, 10).is_err());
    }

    #[test]
    fn python_round7() {
        assert_eq!(python_int_round7(35.99999999), 36);
        assert_eq!(python_int_round7(35.9999), 35);
        assert_eq!(python_int_round7(36.0), 36);
    }

    #[test]
    fn python_floor_division() {
        assert_eq!(python_floordiv(7.0, 2.0), 3.0);
        assert_eq!(python_floordiv(1.0, 0.1), 9.0); // floor(1 / 0.1) is 10
        assert_eq!(python_floordiv(10.0, 0.1), 99.0);
        assert_eq!(python_floordiv(48.0, 1.2), 40.0);
        assert_eq!(python_floordiv(0.0, 1.5), 0.0);
    }

    #[test]
    fn unknown_model_is_an_error() {
        assert_eq!(
            VisionTokenRule::for_model_type("mllama"),
            Err(TokenError::UnknownModel("mllama".to_owned()))
        );
        assert_eq!(
            VisionTokenRule::for_model_type("llava")
                .unwrap()
                .tokens(1, 1)
                .unwrap(),
            576
        );
    }
}
