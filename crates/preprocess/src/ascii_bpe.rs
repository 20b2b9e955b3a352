//! An exact fast path for byte-level BPE tokenizers of the GPT-4 family (Qwen2, Llama 3) on
//! ASCII text.
//!
//! Hugging Face's pipeline spends most of a short prompt's time around the model: a regex
//! engine splits the text into pre-tokens, a normalizer copies it, and every step tracks
//! offsets and alignments the router never reads. For these tokenizers every stage before the
//! BPE model is fully determined on ASCII input:
//!
//! - special tokens split the text first (leftmost-longest, as `AddedVocabulary` does), and no
//!   token straddles such a split, so each piece between them is tokenized on its own;
//! - Unicode normalization (NFC, NFD, NFKC, NFKD) leaves ASCII unchanged;
//! - the split regex, on ASCII, is a handful of byte classes ([`next_piece`] replays its
//!   alternatives in onig's leftmost-first, greedy-with-backtracking order);
//! - the byte-level step maps each byte to one fixed character.
//!
//! The BPE model itself is the tokenizer's own, called on the same strings the pipeline would
//! give it, so merges and vocabulary are shared; the ids of each pre-token are cached (the
//! model returns owned token strings, whose allocation costs more than looking up a word seen
//! before: natural text repeats its words). A piece that is not ASCII goes
//! through the full Hugging Face pipeline. [`AsciiFastPath::detect`] enables the path only for a
//! configuration it reproduces exactly; the property tests compare it with Hugging Face's
//! output on random text.

use crate::error::PreprocessError;
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use quick_cache::sync::Cache;
use serde_json::{json, Value};
use smallvec::SmallVec;
use tokenizers::{Model, Tokenizer};

/// Qwen2's split pattern (one digit per piece).
const QWEN2_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Llama 3's (and tiktoken cl100k's) split pattern: up to three digits per piece.
const LLAMA3_PATTERN: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// Pre-tokens whose ids are kept (a few MB at most). English prose uses a few thousand
/// distinct words; code and number-heavy text more.
const CACHED_WORDS: usize = 65_536;
/// Longer pre-tokens (runs of spaces, long identifiers) rarely repeat: not cached.
const MAX_CACHED_WORD_BYTES: usize = 32;

/// The ids of one pre-token: almost always one or two.
type WordIds = SmallVec<[u32; 4]>;

/// Tokenizes ASCII text exactly as the wrapped Hugging Face tokenizer does, faster.
pub(crate) struct AsciiFastPath {
    /// Every added token, matched on the raw text the way `AddedVocabulary` matches them.
    added_tokens: AhoCorasick,
    /// The id of each pattern of `added_tokens`.
    added_ids: Vec<u32>,
    /// Digits per piece: 1 (Qwen2) or 3 (Llama 3).
    max_digits: usize,
    /// Ids of pre-tokens seen before, by their ASCII bytes.
    words: Cache<Box<[u8]>, WordIds>,
}

impl AsciiFastPath {
    /// The fast path for `tokenizer`, or `None` when its configuration is one this module does
    /// not reproduce exactly (it then keeps using the full pipeline).
    pub(crate) fn detect(tokenizer: &Tokenizer) -> Option<Self> {
        let max_digits = split_digits(tokenizer.get_pre_tokenizer()?)?;
        let ascii_invariant_normalizer = match tokenizer.get_normalizer() {
            None => true,
            Some(normalizer) => matches!(
                serde_json::to_value(normalizer)
                    .ok()?
                    .get("type")?
                    .as_str()?,
                "NFC" | "NFD" | "NFKC" | "NFKD"
            ),
        };
        // The post-processor runs with `add_special_tokens` false on chat prompts; ByteLevel's
        // only changes offsets, others could add tokens, so only ByteLevel or none is accepted.
        let ids_only_post_processor = match tokenizer.get_post_processor() {
            None => true,
            Some(processor) => {
                serde_json::to_value(processor).ok()?.get("type")? == &json!("ByteLevel")
            }
        };
        if !ascii_invariant_normalizer
            || !ids_only_post_processor
            || tokenizer.get_truncation().is_some()
            || tokenizer.get_padding().is_some()
            || tokenizer.get_encode_special_tokens()
        {
            return None;
        }
        let mut contents = Vec::new();
        let mut added_ids = Vec::new();
        for (id, token) in tokenizer.get_added_tokens_decoder() {
            // Normalized added tokens are matched in a second pass and the flags move the
            // match's edges: neither is modelled here.
            if token.normalized || token.lstrip || token.rstrip || token.single_word {
                return None;
            }
            contents.push(token.content);
            added_ids.push(id);
        }
        let added_tokens = AhoCorasickBuilder::new()
            .match_kind(MatchKind::LeftmostLongest)
            .build(&contents)
            .ok()?;
        Some(Self {
            added_tokens,
            added_ids,
            max_digits,
            words: Cache::new(CACHED_WORDS),
        })
    }

    /// Appends the ids of `text` (no special tokens added) to `out`. `tokenizer` must be the
    /// one this path was detected on.
    pub(crate) fn encode_into(
        &self,
        tokenizer: &Tokenizer,
        text: &str,
        out: &mut Vec<u32>,
    ) -> Result<(), PreprocessError> {
        let mut word = String::new();
        let mut start = 0;
        for found in self.added_tokens.find_iter(text) {
            self.encode_piece(tokenizer, &text[start..found.start()], &mut word, out)?;
            out.push(self.added_ids[found.pattern().as_usize()]);
            start = found.end();
        }
        self.encode_piece(tokenizer, &text[start..], &mut word, out)
    }

    /// Encodes text that holds no added token.
    fn encode_piece(
        &self,
        tokenizer: &Tokenizer,
        piece: &str,
        word: &mut String,
        out: &mut Vec<u32>,
    ) -> Result<(), PreprocessError> {
        if piece.is_empty() {
            return Ok(());
        }
        if !piece.is_ascii() {
            let encoding = tokenizer.encode_fast(piece, false).map_err(model_error)?;
            out.extend_from_slice(encoding.get_ids());
            return Ok(());
        }
        let bytes = piece.as_bytes();
        let mut start = 0;
        while start < bytes.len() {
            let end = next_piece(bytes, start, self.max_digits);
            let raw = &bytes[start..end];
            start = end;
            if let Some(ids) = self.words.get(raw) {
                out.extend_from_slice(&ids);
                continue;
            }
            word.clear();
            word.extend(raw.iter().map(|&b| BYTE_LEVEL[usize::from(b)]));
            let tokens = tokenizer.get_model().tokenize(word).map_err(model_error)?;
            let ids: WordIds = tokens.iter().map(|token| token.id).collect();
            out.extend_from_slice(&ids);
            if raw.len() <= MAX_CACHED_WORD_BYTES {
                self.words.insert(raw.into(), ids);
            }
        }
        Ok(())
    }
}

fn model_error(error: tokenizers::Error) -> PreprocessError {
    PreprocessError::Model(format!("tokenizer: {error}"))
}

/// The digits per piece of a `Sequence[Split(pattern, Isolated), ByteLevel(no prefix space,
/// no regex)]` pre-tokenizer with one of the known patterns; `None` for anything else.
fn split_digits<T: serde::Serialize>(pre_tokenizer: &T) -> Option<usize> {
    let config = serde_json::to_value(pre_tokenizer).ok()?;
    let [split, byte_level] = config
        .get("pretokenizers")
        .and_then(Value::as_array)?
        .as_slice()
    else {
        return None;
    };
    let is = |value: &Value, key: &str, expected: Value| value.get(key) == Some(&expected);
    if !is(&config, "type", json!("Sequence"))
        || !is(split, "type", json!("Split"))
        || !is(split, "behavior", json!("Isolated"))
        || !is(split, "invert", json!(false))
        || !is(byte_level, "type", json!("ByteLevel"))
        || !is(byte_level, "add_prefix_space", json!(false))
        || !is(byte_level, "use_regex", json!(false))
    {
        return None;
    }
    match split.get("pattern")?.get("Regex")?.as_str()? {
        QWEN2_PATTERN => Some(1),
        LLAMA3_PATTERN => Some(3),
        _ => None,
    }
}

/// GPT-2's byte-to-character map for ASCII: printable characters stand for themselves; the
/// others (controls, space, DEL) take the characters from U+0100 on, in byte order.
const BYTE_LEVEL: [char; 128] = {
    let mut map = ['\0'; 128];
    let mut next = 0x100;
    let mut byte = 0;
    while byte < 128 {
        map[byte] = if byte >= 0x21 && byte <= 0x7e {
            byte as u8 as char
        } else {
            let c = match char::from_u32(next) {
                Some(c) => c,
                None => panic!("U+0100.. are characters"),
            };
            next += 1;
            c
        };
        byte += 1;
    }
    map
};

/// `\s` on ASCII: tab, line feed, vertical tab, form feed, carriage return, space.
fn is_space(b: u8) -> bool {
    matches!(b, b'\t' | b'\n' | 0x0b | 0x0c | b'\r' | b' ')
}

fn is_newline(b: u8) -> bool {
    matches!(b, b'\r' | b'\n')
}

/// `[^\s\p{L}\p{N}]` on ASCII: punctuation, symbols and the control characters that are not
/// whitespace.
fn is_other(b: u8) -> bool {
    !is_space(b) && !b.is_ascii_alphanumeric()
}

fn run_end(bytes: &[u8], from: usize, class: fn(u8) -> bool) -> usize {
    bytes[from..]
        .iter()
        .position(|&b| !class(b))
        .map_or(bytes.len(), |length| from + length)
}

/// The end of the pre-token that starts at `start` (`start < bytes.len()`, ASCII), as the
/// split pattern finds it. Each branch below is one alternative of the pattern, tried in order.
fn next_piece(bytes: &[u8], start: usize, max_digits: usize) -> usize {
    let at = |i: usize| bytes.get(i).copied();
    let c = bytes[start];
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c == b'\'' {
        let lower = |i: usize| at(i).map(|b| b.to_ascii_lowercase());
        match (lower(start + 1), lower(start + 2)) {
            (Some(b's' | b't' | b'm' | b'd'), _) => return start + 2,
            (Some(b'r' | b'v'), Some(b'e')) | (Some(b'l'), Some(b'l')) => return start + 3,
            _ => {}
        }
    }
    // [^\r\n\p{L}\p{N}]?\p{L}+
    if !is_newline(c)
        && !c.is_ascii_alphanumeric()
        && at(start + 1).is_some_and(|b| b.is_ascii_alphabetic())
    {
        return run_end(bytes, start + 1, |b| b.is_ascii_alphabetic());
    }
    if c.is_ascii_alphabetic() {
        return run_end(bytes, start, |b| b.is_ascii_alphabetic());
    }
    // \p{N} or \p{N}{1,3}
    if c.is_ascii_digit() {
        return run_end(bytes, start, |b| b.is_ascii_digit()).min(start + max_digits);
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let symbols = if c == b' ' && at(start + 1).is_some_and(is_other) {
        start + 1
    } else {
        start
    };
    if is_other(bytes[symbols]) {
        let end = run_end(bytes, symbols, is_other);
        return run_end(bytes, end, is_newline);
    }
    // What is left starts with whitespace.
    let spaces_end = run_end(bytes, start, is_space);
    // \s*[\r\n]+ : backtracking stops at the run's last line break.
    if let Some(last) = bytes[start..spaces_end]
        .iter()
        .rposition(|&b| is_newline(b))
    {
        return start + last + 1;
    }
    // \s+(?!\S) : the whole run at the end of the text, else all but its last character.
    if spaces_end == bytes.len() {
        return spaces_end;
    }
    if spaces_end - start >= 2 {
        return spaces_end - 1;
    }
    // \s+
    spaces_end
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::ModelFiles;
    use proptest::prelude::*;
    use std::sync::OnceLock;

    fn qwen() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            let model = ModelFiles::bundled_qwen2_vl().unwrap();
            Tokenizer::from_bytes(&model.tokenizer_json).unwrap()
        })
    }

    /// The Qwen2 tokenizer with its split pattern replaced by Llama 3's.
    fn qwen_with_llama3_split() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| {
            let model = ModelFiles::bundled_qwen2_vl().unwrap();
            let mut config: Value = serde_json::from_slice(&model.tokenizer_json).unwrap();
            config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(LLAMA3_PATTERN);
            Tokenizer::from_bytes(serde_json::to_vec(&config).unwrap()).unwrap()
        })
    }

    fn reference(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    /// Through one path per tokenizer, so its word cache fills up across cases as in service.
    fn fast(tokenizer: &'static Tokenizer, text: &str) -> Vec<u32> {
        static PATHS: OnceLock<[AsciiFastPath; 2]> = OnceLock::new();
        let paths = PATHS.get_or_init(|| {
            [qwen(), qwen_with_llama3_split()].map(|t| AsciiFastPath::detect(t).expect("applies"))
        });
        let path = if std::ptr::eq(tokenizer, qwen()) {
            &paths[0]
        } else {
            &paths[1]
        };
        let mut ids = Vec::new();
        path.encode_into(tokenizer, text, &mut ids).unwrap();
        ids
    }

    /// The pre-tokens Hugging Face's pre-tokenizer makes of `text`, as byte ranges' ends.
    fn reference_piece_ends(tokenizer: &Tokenizer, text: &str) -> Vec<usize> {
        use tokenizers::PreTokenizer;
        let mut pretokenized = tokenizers::PreTokenizedString::from(text);
        tokenizer
            .get_pre_tokenizer()
            .unwrap()
            .pre_tokenize(&mut pretokenized)
            .unwrap();
        pretokenized
            .get_splits(
                tokenizers::OffsetReferential::Original,
                tokenizers::OffsetType::Byte,
            )
            .into_iter()
            .map(|(_, (_, end), _)| end)
            .collect()
    }

    fn piece_ends(text: &str, max_digits: usize) -> Vec<usize> {
        let mut ends = Vec::new();
        let mut start = 0;
        while start < text.len() {
            start = next_piece(text.as_bytes(), start, max_digits);
            ends.push(start);
        }
        ends
    }

    /// ASCII drawn mostly from the characters the pattern treats specially.
    fn ascii_text() -> impl Strategy<Value = String> {
        let interesting = prop::sample::select(vec![
            "'",
            "s",
            "S",
            "t",
            "T",
            "r",
            "R",
            "e",
            "E",
            "v",
            "V",
            "m",
            "l",
            "L",
            "d",
            "D",
            "a",
            "Z",
            "0",
            "7",
            "12345",
            " ",
            "  ",
            "\t",
            "\n",
            "\r",
            "\r\n",
            "\x0b",
            "\x0c",
            "\x1c",
            "\x1f",
            "\x00",
            "\x7f",
            ".",
            "!?",
            "-",
            "_",
            "(",
            "\"",
            "<|im_end|>",
            "<|im_start|>",
            "<|vision_start|>",
            "<|image_pad|>",
            "<|",
            "|>",
            "'re",
            "'LL",
        ]);
        prop::collection::vec(
            prop_oneof![3 => interesting.prop_map(str::to_owned), 1 => "[\\x00-\\x7f]{1,4}"],
            0..40,
        )
        .prop_map(|parts| parts.concat())
    }

    #[test]
    fn detects_qwen2_and_llama3_patterns_only() {
        assert_eq!(AsciiFastPath::detect(qwen()).map(|p| p.max_digits), Some(1));
        assert_eq!(
            AsciiFastPath::detect(qwen_with_llama3_split()).map(|p| p.max_digits),
            Some(3)
        );
        let model = ModelFiles::bundled_qwen2_vl().unwrap();
        let mut config: Value = serde_json::from_slice(&model.tokenizer_json).unwrap();
        config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(r"\s+|\S+");
        let other = Tokenizer::from_bytes(serde_json::to_vec(&config).unwrap()).unwrap();
        assert!(AsciiFastPath::detect(&other).is_none());
        config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(QWEN2_PATTERN);
        config["normalizer"] = json!({"type": "Lowercase"});
        let lowercasing = Tokenizer::from_bytes(serde_json::to_vec(&config).unwrap()).unwrap();
        assert!(AsciiFastPath::detect(&lowercasing).is_none());
    }

    #[test]
    fn byte_level_map_matches_gpt2() {
        assert_eq!(BYTE_LEVEL[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_LEVEL[usize::from(b'\n')], 'Ċ');
        assert_eq!(BYTE_LEVEL[usize::from(b'\t')], 'ĉ');
        assert_eq!(BYTE_LEVEL[0], 'Ā');
        assert_eq!(BYTE_LEVEL[0x7f], '\u{121}');
        assert_eq!(BYTE_LEVEL[usize::from(b'A')], 'A');
    }

    #[test]
    fn known_prompts_match_hugging_face() {
        let texts = [
            "",
            "Hello, world! It's 2026; we'RE here   \n\n  and    there.\n",
            "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What's in this image?<|im_end|>\n<|im_start|>assistant\n",
            "def f(x):\r\n\treturn x**2  # 12345\n\n\n",
            "mixed ASCII and caf\u{e9} and \u{4f60}\u{597d} <|im_end|> then ASCII",
            "trailing spaces   ",
            " 'll 'LL 's'S''t",
        ];
        for text in texts {
            assert_eq!(fast(qwen(), text), reference(qwen(), text), "{text:?}");
            // With the post-processor's special tokens (ByteLevel adds none).
            let with_special = qwen().encode_fast(text, true).unwrap();
            assert_eq!(fast(qwen(), text), with_special.get_ids(), "{text:?}");
            assert_eq!(
                fast(qwen_with_llama3_split(), text),
                reference(qwen_with_llama3_split(), text),
                "{text:?}"
            );
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn pieces_match_the_regex(text in ascii_text()) {
            prop_assert_eq!(piece_ends(&text, 1), reference_piece_ends(qwen(), &text));
            prop_assert_eq!(piece_ends(&text, 3), reference_piece_ends(qwen_with_llama3_split(), &text));
        }

        #[test]
        fn ids_match_hugging_face(text in ascii_text()) {
            prop_assert_eq!(fast(qwen(), &text), reference(qwen(), &text));
            prop_assert_eq!(fast(qwen_with_llama3_split(), &text), reference(qwen_with_llama3_split(), &text));
        }

        #[test]
        fn any_text_matches_hugging_face(text in "\\PC{0,60}") {
            prop_assert_eq!(fast(qwen(), &text), reference(qwen(), &text));
        }
    }
}
