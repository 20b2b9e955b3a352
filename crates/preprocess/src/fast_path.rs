//! An exact fast path for byte-level BPE tokenizers of the GPT-4 family (Qwen2, Llama 3).
//!
//! Hugging Face's pipeline spends most of a short prompt's time around the model: a regex
//! engine splits the text into pre-tokens, the normalizer copies it, and every step tracks
//! offsets and alignments the router never reads. For these tokenizers each stage before the
//! BPE model can be replayed directly:
//!
//! - special tokens split the text first (leftmost-longest, as `AddedVocabulary` does), and no
//!   token straddles such a split, so each piece between them is tokenized on its own;
//! - the normalizer (NFC, NFD, NFKC or NFKD) leaves ASCII unchanged, and text the Unicode
//!   quick check finds in its form already, so it runs, as the tokenizer's own, only on the
//!   other pieces;
//! - the split pattern is a handful of character classes ([`next_piece`] replays its
//!   alternatives in Oniguruma's leftmost-first, greedy-with-backtracking order; the classes
//!   beyond ASCII are Oniguruma's own tables, checked code point by code point in
//!   `unicode_classes`);
//! - the byte-level step maps each byte to one fixed character.
//!
//! The BPE model itself is the tokenizer's own, called on the same strings the pipeline would
//! give it, so merges and vocabulary are shared; the ids of each pre-token are cached (the
//! model returns owned token strings, whose allocation costs more than looking up a word seen
//! before: natural text repeats its words). [`FastPath::detect`] enables the path only for a
//! configuration it reproduces exactly; the property tests compare it with Hugging Face's
//! output on random text.

use crate::error::PreprocessError;
use crate::unicode_classes::{class, CharClass};
use aho_corasick::{AhoCorasick, AhoCorasickBuilder, MatchKind};
use quick_cache::sync::Cache;
use serde_json::{json, Value};
use smallvec::SmallVec;
use tokenizers::models::ModelWrapper;
use tokenizers::{Model, NormalizedString, Normalizer, Tokenizer};

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

/// Tokenizes text exactly as the wrapped Hugging Face tokenizer does, faster.
pub(crate) struct FastPath {
    /// Every added token, matched on the raw text the way `AddedVocabulary` matches them.
    added_tokens: AhoCorasick,
    /// The id of each pattern of `added_tokens`.
    added_ids: Vec<u32>,
    /// Digits per piece: 1 (Qwen2) or 3 (Llama 3).
    max_digits: usize,
    /// The tokenizer's normalizer.
    normalization: Normalization,
    /// Ids of pre-tokens seen before, by their (normalized) bytes.
    words: Cache<Box<[u8]>, WordIds>,
    /// Whether the post-processor adds no token even when asked for special tokens.
    adds_no_special_tokens: bool,
}

impl FastPath {
    /// The fast path for `tokenizer`, or `None` when its configuration is one this module does
    /// not reproduce exactly (it then keeps using the full pipeline).
    pub(crate) fn detect(tokenizer: &Tokenizer) -> Option<Self> {
        let max_digits = split_digits(tokenizer.get_pre_tokenizer()?)?;
        // Unicode normalizers leave ASCII unchanged; anything else is not modelled.
        let normalization = match tokenizer.get_normalizer() {
            None => Some(Normalization::None),
            Some(normalizer) => match serde_json::to_value(normalizer)
                .ok()?
                .get("type")?
                .as_str()?
            {
                "NFC" => Some(Normalization::Nfc),
                "NFD" => Some(Normalization::Nfd),
                "NFKC" => Some(Normalization::Nfkc),
                "NFKD" => Some(Normalization::Nfkd),
                _ => None,
            },
        };
        // Without special tokens (chat prompts) a post-processor adds nothing; with them, only
        // ByteLevel's (offsets only) or none is known to add nothing (a template adds a BOS).
        let adds_no_special_tokens = match tokenizer.get_post_processor() {
            None => true,
            Some(processor) => {
                serde_json::to_value(processor).ok()?.get("type")? == &json!("ByteLevel")
            }
        };
        // The word cache assumes a word always gets the same ids: no BPE dropout.
        let deterministic_bpe = matches!(
            tokenizer.get_model(),
            ModelWrapper::BPE(bpe) if bpe.dropout.is_none_or(|p| p == 0.0)
        );
        let normalization = normalization?;
        if !deterministic_bpe
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
            normalization,
            words: Cache::new(CACHED_WORDS),
            adds_no_special_tokens,
        })
    }

    /// Whether [`FastPath::encode_into`] also gives the ids of an encoding *with* special
    /// tokens (the post-processor adds none).
    pub(crate) fn adds_no_special_tokens(&self) -> bool {
        self.adds_no_special_tokens
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
        let normalized;
        let text = match tokenizer.get_normalizer() {
            Some(normalizer) if !piece.is_ascii() && !self.normalization.leaves(piece) => {
                let mut string = NormalizedString::from(piece);
                normalizer.normalize(&mut string).map_err(model_error)?;
                normalized = string;
                normalized.get()
            }
            _ => piece,
        };
        let mut start = 0;
        while start < text.len() {
            let end = next_piece(text, start, self.max_digits);
            let raw = &text.as_bytes()[start..end];
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

/// A tokenizer's normalizer, among those the fast path reproduces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Normalization {
    None,
    Nfc,
    Nfd,
    Nfkc,
    Nfkd,
}

impl Normalization {
    /// Whether `text` is known to be in this form already, so that normalizing would not
    /// change it: the Unicode quick check says "yes" (it says "maybe" or "no" for text that
    /// has to be normalized to know). Most text that is not ASCII (CJK, accented letters as
    /// keyboards produce them) is NFC already; the normalizer then is skipped, not run.
    ///
    /// The quick check uses the Unicode data of `unicode-normalization`, newer than that of the
    /// tokenizer's normalizer (`unicode-normalization-alignments`). Unicode's stability policy
    /// keeps the normalization of an assigned character from changing between versions, and a
    /// character the older data does not know is left as it is there: "yes" under the newer
    /// data still means the normalizer returns the text unchanged.
    fn leaves(self, text: &str) -> bool {
        use unicode_normalization::{
            is_nfc_quick, is_nfd_quick, is_nfkc_quick, is_nfkd_quick, IsNormalized,
        };
        let verdict = match self {
            Self::None => return true,
            Self::Nfc if text.chars().all(plainly_nfc) => return true,
            Self::Nfc => is_nfc_quick(text.chars()),
            Self::Nfd => is_nfd_quick(text.chars()),
            Self::Nfkc => is_nfkc_quick(text.chars()),
            Self::Nfkd => is_nfkd_quick(text.chars()),
        };
        verdict == IsNormalized::Yes
    }
}

/// Characters the NFC quick check answers "yes" for, with canonical combining class 0, so that
/// text made of them alone is NFC without looking each up: all below U+0300, CJK symbols and
/// punctuation but the tone marks, kana but the two combining sound marks, CJK unified
/// ideographs, Hangul syllables, halfwidth and fullwidth forms (the bulk of Chinese, Japanese
/// and Korean text).
fn plainly_nfc(c: char) -> bool {
    matches!(
        c,
        '\0'..='\u{2ff}'
            | '\u{3000}'..='\u{3029}'
            | '\u{3030}'..='\u{3098}'
            | '\u{309b}'..='\u{30ff}'
            | '\u{4e00}'..='\u{9fff}'
            | '\u{ac00}'..='\u{d7a3}'
            | '\u{ff00}'..='\u{ffef}'
    )
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

/// GPT-2's byte-to-character map: printable Latin-1 bytes stand for themselves; the others
/// (controls, space, DEL, 0x80-0xa0, the soft hyphen) take the characters from U+0100 on, in
/// byte order.
const BYTE_LEVEL: [char; 256] = {
    let mut map = ['\0'; 256];
    let mut next = 0x100;
    let mut byte = 0;
    while byte < 256 {
        let printable = (byte >= 0x21 && byte <= 0x7e)
            || (byte >= 0xa1 && byte <= 0xac)
            || (byte >= 0xae && byte <= 0xff);
        let code = if printable {
            byte
        } else {
            next += 1;
            next - 1
        };
        map[byte as usize] = match char::from_u32(code) {
            Some(c) => c,
            None => panic!("U+0000..U+0143 are all characters"),
        };
        byte += 1;
    }
    map
};

/// The end of the run of characters of `in_run` classes that starts at `from`, stopping after
/// `max_chars` of them.
fn run_end(text: &str, from: usize, in_run: fn(CharClass) -> bool, max_chars: usize) -> usize {
    let mut end = from;
    for c in text[from..].chars().take(max_chars) {
        if !in_run(class(c)) {
            break;
        }
        end += c.len_utf8();
    }
    end
}

/// `c` as the case-insensitive contractions compare it: ASCII case and the long s (U+017F),
/// the only non-ASCII character whose simple case folding is one of their letters.
fn fold(c: char) -> char {
    match c {
        '\u{17f}' => 's',
        c => c.to_ascii_lowercase(),
    }
}

/// The end of the pre-token that starts at `start`, a character boundary before the end of
/// `text`, as the split pattern finds it. Each step below is one alternative of the pattern,
/// tried in order.
fn next_piece(text: &str, start: usize, max_digits: usize) -> usize {
    use CharClass::{Letter, LineBreak, Number, Other, Space};
    let char_at = |i: usize| text.get(i..).and_then(|rest| rest.chars().next());
    let Some(first) = char_at(start) else {
        return text.len();
    };
    let after_first = start + first.len_utf8();
    let class_at = |i: usize| char_at(i).map(class);
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if first == '\'' {
        if let Some(second) = char_at(after_first) {
            let after_second = after_first + second.len_utf8();
            let third = char_at(after_second);
            match (fold(second), third.map(fold)) {
                ('s' | 't' | 'm' | 'd', _) => return after_second,
                ('r' | 'v', Some('e')) | ('l', Some('l')) => {
                    return after_second + third.map_or(0, char::len_utf8)
                }
                _ => {}
            }
        }
    }
    let letters = |c: CharClass| c == Letter;
    // [^\r\n\p{L}\p{N}]?\p{L}+
    let first_class = class(first);
    if matches!(first_class, Space | Other) && class_at(after_first) == Some(Letter) {
        return run_end(text, after_first, letters, usize::MAX);
    }
    match first_class {
        Letter => return run_end(text, start, letters, usize::MAX),
        // \p{N} or \p{N}{1,3}
        Number => return run_end(text, start, |c| c == Number, max_digits),
        _ => {}
    }
    // ' '?[^\s\p{L}\p{N}]+[\r\n]*
    let symbols = if first == ' ' && class_at(after_first) == Some(Other) {
        after_first
    } else {
        start
    };
    if class_at(symbols) == Some(Other) {
        let end = run_end(text, symbols, |c| c == Other, usize::MAX);
        return run_end(text, end, |c| c == LineBreak, usize::MAX);
    }
    // What is left starts with whitespace.
    let spaces_end = run_end(text, start, |c| matches!(c, Space | LineBreak), usize::MAX);
    let spaces = &text[start..spaces_end];
    // \s*[\r\n]+ : backtracking stops at the run's last line break.
    if let Some(last) = spaces.rfind(['\r', '\n']) {
        return start + last + 1;
    }
    // \s+(?!\S) : the whole run at the end of the text, else all but its last character.
    if spaces_end == text.len() {
        return spaces_end;
    }
    match spaces.char_indices().next_back() {
        Some((last, _)) if last > 0 => start + last,
        // \s+
        _ => spaces_end,
    }
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

    /// The Qwen2 tokenizer with `edit` applied to its tokenizer.json.
    fn qwen_with(edit: impl FnOnce(&mut Value)) -> Tokenizer {
        let model = ModelFiles::bundled_qwen2_vl().unwrap();
        let mut config: Value = serde_json::from_slice(&model.tokenizer_json).unwrap();
        edit(&mut config);
        Tokenizer::from_bytes(serde_json::to_vec(&config).unwrap()).unwrap()
    }

    fn set_split_pattern(config: &mut Value, pattern: &str) {
        config["pre_tokenizer"]["pretokenizers"][0]["pattern"]["Regex"] = json!(pattern);
    }

    /// The Qwen2 tokenizer with its split pattern replaced by Llama 3's.
    fn qwen_with_llama3_split() -> &'static Tokenizer {
        static TOKENIZER: OnceLock<Tokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| qwen_with(|config| set_split_pattern(config, LLAMA3_PATTERN)))
    }

    fn reference(tokenizer: &Tokenizer, text: &str) -> Vec<u32> {
        tokenizer
            .encode_fast(text, false)
            .unwrap()
            .get_ids()
            .to_vec()
    }

    /// Qwen2 with NFD, NFKC and NFKD normalizers instead of NFC, with their fast paths.
    fn other_normalizers() -> &'static [(Tokenizer, FastPath); 3] {
        static TOKENIZERS: OnceLock<[(Tokenizer, FastPath); 3]> = OnceLock::new();
        TOKENIZERS.get_or_init(|| {
            ["NFD", "NFKC", "NFKD"].map(|form| {
                let tokenizer = qwen_with(|config| config["normalizer"] = json!({"type": form}));
                let path = FastPath::detect(&tokenizer).expect("applies");
                (tokenizer, path)
            })
        })
    }

    #[test]
    fn plainly_nfc_characters_are_nfc_quick_yes_with_combining_class_0() {
        use unicode_normalization::char::canonical_combining_class;
        use unicode_normalization::{is_nfc_quick, IsNormalized};
        let plain = (0..=0x10ffff)
            .filter_map(char::from_u32)
            .filter(|&c| plainly_nfc(c));
        let mut count = 0;
        for c in plain {
            assert_eq!(canonical_combining_class(c), 0, "U+{:04X}", u32::from(c));
            assert_eq!(
                is_nfc_quick(std::iter::once(c)),
                IsNormalized::Yes,
                "U+{:04X}",
                u32::from(c)
            );
            count += 1;
        }
        assert!(count > 30_000, "{count}");
        assert!(!plainly_nfc('\u{301}') && !plainly_nfc('\u{3099}') && !plainly_nfc('\u{f900}'));
    }

    #[test]
    fn text_already_normalized_skips_the_normalizer() {
        use Normalization::*;
        for (form, text, leaves) in [
            (Nfc, "你好，世界", true),
            (Nfc, "caf\u{e9}", true),
            (Nfc, "cafe\u{301}", false),
            (Nfd, "cafe\u{301}", true),
            (Nfd, "caf\u{e9}", false),
            (Nfkc, "caf\u{e9} ½", false),
            (Nfkc, "你好", true),
            (Nfkd, "\u{fb05}", false),
            (None, "\u{fb05}", true),
        ] {
            assert_eq!(form.leaves(text), leaves, "{form:?} {text:?}");
        }
    }

    /// Through one path per tokenizer, so its word cache fills up across cases as in service.
    fn fast(tokenizer: &'static Tokenizer, text: &str) -> Vec<u32> {
        static PATHS: OnceLock<[FastPath; 2]> = OnceLock::new();
        let paths = PATHS.get_or_init(|| {
            [qwen(), qwen_with_llama3_split()].map(|t| FastPath::detect(t).expect("applies"))
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
            start = next_piece(text, start, max_digits);
            ends.push(start);
        }
        ends
    }

    /// Text drawn mostly from the characters the pattern and the normalizer treat specially.
    fn text() -> impl Strategy<Value = String> {
        #[rustfmt::skip]
        let interesting = prop::sample::select(vec![
            "'", "s", "S", "t", "T", "r", "R", "e", "E", "v", "V", "m", "l", "L", "d", "D", "a",
            "Z", "0", "7", "12345", " ", "  ", "\t", "\n", "\r", "\r\n", "\x0b", "\x0c", "\x1c",
            "\x1f", "\x00", "\x7f", ".", "!?", "-", "_", "(", "\"", "<|im_end|>", "<|im_start|>",
            "<|vision_start|>", "<|image_pad|>", "<|", "|>", "'re", "'LL",
            // Beyond ASCII: letters of other scripts, title case, numbers that are not digits,
            // the spaces Oniguruma's \s includes (NEL, NBSP, ideographic, line separator) and
            // some it does not (zero width, BOM), combining marks (NFC composes e + U+0301),
            // case-folding oddities for the contractions, emoji.
            "é", "e\u{301}", "\u{301}", "你好", "日本語", "ǅ", "٣", "Ⅻ", "½", "\u{85}", "\u{a0}",
            "\u{3000}", "\u{2028}", "\u{1680}", "\u{200b}", "\u{feff}", "ſ", "'ſ", "ﬅ", "\u{212a}",
            "ß", "İ", "😀", "Å", "\u{ad}",
        ]);
        prop::collection::vec(
            prop_oneof![
                4 => interesting.prop_map(str::to_owned),
                1 => "[\\x00-\\x7f]{1,4}",
                1 => "\\PC{1,3}",
            ],
            0..40,
        )
        .prop_map(|parts| parts.concat())
    }

    #[test]
    fn detects_qwen2_and_llama3_patterns_only() {
        assert_eq!(FastPath::detect(qwen()).map(|p| p.max_digits), Some(1));
        assert_eq!(
            FastPath::detect(qwen_with_llama3_split()).map(|p| p.max_digits),
            Some(3)
        );
        let other = qwen_with(|config| set_split_pattern(config, r"\s+|\S+"));
        assert!(FastPath::detect(&other).is_none());
        let dropping = qwen_with(|config| config["model"]["dropout"] = json!(0.1));
        assert!(FastPath::detect(&dropping).is_none());
        let lowercasing = qwen_with(|config| config["normalizer"] = json!({"type": "Lowercase"}));
        assert!(FastPath::detect(&lowercasing).is_none());
        // A template post-processor (a BOS, as Llama 3's): the path serves encodings without
        // special tokens only.
        let with_bos = qwen_with(|config| {
            config["post_processor"] = json!({"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [151643], "tokens": ["<|endoftext|>"]}}})
        });
        let path = FastPath::detect(&with_bos).unwrap();
        assert!(!path.adds_no_special_tokens());
        assert!(FastPath::detect(qwen()).unwrap().adds_no_special_tokens());
        let text = "Hello <|im_end|> world, 12 'll";
        let mut ids = Vec::new();
        path.encode_into(&with_bos, text, &mut ids).unwrap();
        assert_eq!(ids, reference(&with_bos, text));
        let bos = with_bos.encode_fast(text, true).unwrap().get_ids().to_vec();
        assert_eq!(bos[0], 151643);
        assert_eq!(bos[1..], ids[..]);
    }

    #[test]
    fn byte_level_map_matches_gpt2() {
        assert_eq!(BYTE_LEVEL[usize::from(b' ')], 'Ġ');
        assert_eq!(BYTE_LEVEL[usize::from(b'\n')], 'Ċ');
        assert_eq!(BYTE_LEVEL[usize::from(b'\t')], 'ĉ');
        assert_eq!(BYTE_LEVEL[0], 'Ā');
        assert_eq!(BYTE_LEVEL[0x7f], '\u{121}');
        assert_eq!(BYTE_LEVEL[0xa0], '\u{142}');
        assert_eq!(BYTE_LEVEL[0xad], '\u{143}');
        assert_eq!(BYTE_LEVEL[0xe4], 'ä');
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
            "<|im_start|>user\n这张图片里有什么？请用三句话描述。\u{3000}Qwen2-VL 能读 caf\u{e9} 和 cafe\u{301}。<|im_end|>\n",
            "\u{a0}\u{a0}x \u{85}\u{2028}y 'ſ Ⅻ ½ ٣٤٥٦ 😀😀 ﬅ",
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
        fn pieces_match_the_regex(text in text()) {
            prop_assert_eq!(piece_ends(&text, 1), reference_piece_ends(qwen(), &text));
            prop_assert_eq!(piece_ends(&text, 3), reference_piece_ends(qwen_with_llama3_split(), &text));
        }

        #[test]
        fn ids_match_hugging_face(text in text()) {
            prop_assert_eq!(fast(qwen(), &text), reference(qwen(), &text));
            prop_assert_eq!(fast(qwen_with_llama3_split(), &text), reference(qwen_with_llama3_split(), &text));
        }

        /// The normalizers other than Qwen's NFC, each skipped on text already in its form.
        #[test]
        fn other_normalizers_match_hugging_face(text in text()) {
            for (tokenizer, path) in other_normalizers() {
                let mut ids = Vec::new();
                path.encode_into(tokenizer, &text, &mut ids).unwrap();
                prop_assert_eq!(ids, reference(tokenizer, &text));
            }
        }

        #[test]
        fn any_text_matches_hugging_face(text in "\\PC{0,60}") {
            prop_assert_eq!(fast(qwen(), &text), reference(qwen(), &text));
        }
    }
}
