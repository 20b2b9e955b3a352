//! Tokenization with a cache of conversation segments.
//!
//! Chat clients resend the whole history every turn, so the router would tokenize the same
//! text again and again (the known bottleneck of routers that tokenize). The rendered prompt is
//! cut right after every end-of-turn special token (`<|im_end|>` for Qwen) and each complete
//! segment's ids are cached by its text. This is exact, not approximate: the tokenizer itself
//! splits its input at special tokens before normalizing and pre-tokenizing, so no token can
//! straddle such a cut, and tokenizing the segments one by one gives the ids of the whole.
//! The cut token is only used when its definition guarantees this (a special token that is not
//! normalized and strips no whitespace); otherwise the cache stays off.

use crate::error::PreprocessError;
use crate::fast_path::FastPath;
use quick_cache::sync::Cache;
use quick_cache::Weighter;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokenizers::Tokenizer;

/// Cache sizing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentCacheConfig {
    /// Upper bound of the cache, counting segment text bytes plus 4 bytes per cached id.
    pub max_bytes: u64,
}

impl Default for SegmentCacheConfig {
    fn default() -> Self {
        Self {
            max_bytes: 64 << 20,
        }
    }
}

impl SegmentCacheConfig {
    /// A cache of at most `max_bytes` (text plus ids).
    pub fn with_max_bytes(max_bytes: u64) -> Self {
        Self { max_bytes }
    }
}

#[derive(Clone)]
struct SegmentWeighter;

impl Weighter<Box<str>, Arc<[u32]>> for SegmentWeighter {
    fn weight(&self, text: &Box<str>, ids: &Arc<[u32]>) -> u64 {
        (text.len() + 4 * ids.len()) as u64
    }
}

/// Cache statistics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SegmentCacheStats {
    /// Segments found in the cache.
    pub hits: u64,
    /// Segments tokenized.
    pub misses: u64,
    /// Bytes held (text plus ids).
    pub bytes: u64,
}

/// Where chat prompts may be cut, and the ids of segments seen before.
struct SegmentCache {
    cut_after: String,
    entries: Cache<Box<str>, Arc<[u32]>, SegmentWeighter>,
    hits: AtomicU64,
    misses: AtomicU64,
}

/// A Hugging Face tokenizer plus the segment cache for chat prompts.
pub struct TextTokenizer {
    tokenizer: Tokenizer,
    /// Present when the tokenizer's pipeline is one the ASCII fast path reproduces exactly.
    fast_path: Option<FastPath>,
    /// Present when configured and the tokenizer allows exact cuts.
    segments: Option<SegmentCache>,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("cut_after", &self.segments.as_ref().map(|s| &s.cut_after))
            .field("fast_path", &self.fast_path.is_some())
            .finish_non_exhaustive()
    }
}

impl TextTokenizer {
    /// Loads `tokenizer.json` bytes. `end_of_turn` is the special token after which chat
    /// prompts may be cut (`<|im_end|>`); `cache` sizes the segment cache (`None`: no cache).
    pub fn from_bytes(
        tokenizer_json: &[u8],
        end_of_turn: Option<&str>,
        cache: Option<SegmentCacheConfig>,
    ) -> Result<Self, PreprocessError> {
        let tokenizer = Tokenizer::from_bytes(tokenizer_json)
            .map_err(|error| PreprocessError::Model(format!("tokenizer.json: {error}")))?;
        let segments = match (end_of_turn, cache) {
            (Some(token), Some(cache)) if is_safe_cut(&tokenizer, token) => Some(SegmentCache {
                cut_after: token.to_owned(),
                entries: Cache::with_weighter(
                    // quick_cache sizes its shards from an item estimate; segments average a
                    // few hundred bytes of text plus ids.
                    (cache.max_bytes / 512).max(16) as usize,
                    cache.max_bytes,
                    SegmentWeighter,
                ),
                hits: AtomicU64::new(0),
                misses: AtomicU64::new(0),
            }),
            _ => None,
        };
        Ok(Self {
            fast_path: FastPath::detect(&tokenizer),
            tokenizer,
            segments,
        })
    }

    /// The wrapped tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The id of a token given by its text, if the vocabulary has it.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Tokenizes `text` as is (no special tokens added), appending the ids to `out`.
    pub fn encode_into(&self, text: &str, out: &mut Vec<u32>) -> Result<(), PreprocessError> {
        if let Some(fast_path) = &self.fast_path {
            return fast_path.encode_into(&self.tokenizer, text, out);
        }
        let encoding = self
            .tokenizer
            .encode_fast(text, false)
            .map_err(|error| PreprocessError::Model(format!("tokenizer: {error}")))?;
        out.extend_from_slice(encoding.get_ids());
        Ok(())
    }

    /// Tokenizes `text` with the tokenizer's special tokens (a BOS where the model has one),
    /// as engines tokenize plain completion prompts.
    pub fn encode_with_special_tokens(&self, text: &str) -> Result<Vec<u32>, PreprocessError> {
        if let Some(fast_path) = self
            .fast_path
            .as_ref()
            .filter(|path| path.adds_no_special_tokens())
        {
            let mut ids = Vec::with_capacity(text.len() / 3);
            fast_path.encode_into(&self.tokenizer, text, &mut ids)?;
            return Ok(ids);
        }
        self.tokenizer
            .encode_fast(text, true)
            .map(|encoding| encoding.get_ids().to_vec())
            .map_err(|error| PreprocessError::Model(format!("tokenizer: {error}")))
    }

    /// Tokenizes a rendered chat prompt (no special tokens added: the template wrote them),
    /// through the segment cache when there is one.
    pub fn encode_chat(&self, prompt: &str) -> Result<Vec<u32>, PreprocessError> {
        let mut ids = Vec::with_capacity(prompt.len() / 3);
        let Some(cache) = &self.segments else {
            self.encode_into(prompt, &mut ids)?;
            return Ok(ids);
        };
        let cut = cache.cut_after.as_str();
        let mut rest = prompt;
        while let Some(position) = rest.find(cut) {
            let (segment, tail) = rest.split_at(position + cut.len());
            match cache.entries.get(segment) {
                Some(cached) => {
                    cache.hits.fetch_add(1, Ordering::Relaxed);
                    ids.extend_from_slice(&cached);
                }
                None => {
                    cache.misses.fetch_add(1, Ordering::Relaxed);
                    let start = ids.len();
                    self.encode_into(segment, &mut ids)?;
                    cache.entries.insert(segment.into(), ids[start..].into());
                }
            }
            rest = tail;
        }
        self.encode_into(rest, &mut ids)?;
        Ok(ids)
    }

    /// Statistics of the segment cache (zero without one).
    pub fn cache_stats(&self) -> SegmentCacheStats {
        self.segments
            .as_ref()
            .map(|cache| SegmentCacheStats {
                hits: cache.hits.load(Ordering::Relaxed),
                misses: cache.misses.load(Ordering::Relaxed),
                bytes: cache.entries.weight(),
            })
            .unwrap_or_default()
    }
}

/// A cut right after `token` is exact when the tokenizer splits on it before anything else:
/// a special added token, matched on the raw text, that strips no whitespace around it.
fn is_safe_cut(tokenizer: &Tokenizer, token: &str) -> bool {
    tokenizer.get_added_tokens_decoder().values().any(|added| {
        added.content == token
            && added.special
            && !added.normalized
            && !added.lstrip
            && !added.rstrip
            && !added.single_word
    })
}
