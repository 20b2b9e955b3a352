//! What the worker says it had cached, read from its response as it streams by.

use memchr::memmem;

const KEY: &[u8] = b"\"cached_tokens\"";

/// The `usage.prompt_tokens_details.cached_tokens` value in a chunk of a worker's JSON or SSE
/// response, if the chunk holds it (the last one when several do).
///
/// Only the key followed by `:` and an integer counts. Generated text cannot fake it: inside a
/// JSON string the quotes around the key would be escaped. A key split across two chunks is
/// missed, which leaves the request out of the prediction check rather than miscounting it.
pub(crate) fn cached_tokens(chunk: &[u8]) -> Option<u64> {
    let mut found = None;
    for at in memmem::find_iter(chunk, KEY) {
        let rest = &chunk[at + KEY.len()..];
        let rest = skip_whitespace(rest);
        let Some(rest) = rest.strip_prefix(b":") else {
            continue;
        };
        let rest = skip_whitespace(rest);
        let digits = rest.iter().take_while(|b| b.is_ascii_digit()).count();
        if digits == 0 {
            continue;
        }
        // At most 20 ASCII digits; anything that does not fit a u64 is not a token count.
        if let Some(value) = std::str::from_utf8(&rest[..digits])
            .ok()
            .and_then(|d| d.parse().ok())
        {
            found = Some(value);
        }
    }
    found
}

fn skip_whitespace(bytes: &[u8]) -> &[u8] {
    let start = bytes
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(bytes.len());
    &bytes[start..]
}

/// How a request's predicted cache compares with what its worker reported.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PredictionOutcome {
    /// As predicted.
    Exact,
    /// The worker had less than predicted: a phantom hit (stale index, hash mismatch, or an
    /// eviction the events have not told yet).
    Over,
    /// The worker had more than predicted (events not applied yet, or blocks another
    /// request stored meanwhile).
    Under,
}

impl PredictionOutcome {
    pub(crate) fn of(predicted: u64, reported: u64) -> Self {
        match predicted.cmp(&reported) {
            std::cmp::Ordering::Equal => Self::Exact,
            std::cmp::Ordering::Greater => Self::Over,
            std::cmp::Ordering::Less => Self::Under,
        }
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Exact => "exact",
            Self::Over => "over",
            Self::Under => "under",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_count_in_json_and_sse_usage() {
        let json = br#"{"choices":[],"usage":{"prompt_tokens":90,"prompt_tokens_details":{"cached_tokens":64}}}"#;
        assert_eq!(cached_tokens(json), Some(64));
        let sse = b"data: {\"usage\": {\"prompt_tokens_details\": {\"cached_tokens\" : 1024}}}\n\ndata: [DONE]\n\n";
        assert_eq!(cached_tokens(sse), Some(1024));
        let pretty = b"{\n  \"cached_tokens\":\n    0\n}";
        assert_eq!(cached_tokens(pretty), Some(0));
    }

    #[test]
    fn text_and_malformed_values_do_not_count() {
        let text = br#"data: {"choices":[{"delta":{"content":"say \"cached_tokens\": 5"}}]}"#;
        assert_eq!(cached_tokens(text), None);
        assert_eq!(cached_tokens(br#"{"cached_tokens":null}"#), None);
        assert_eq!(cached_tokens(br#"{"cached_tokens":-3}"#), None);
        assert_eq!(
            cached_tokens(br#"{"cached_tokens":99999999999999999999999}"#),
            None
        );
        assert_eq!(cached_tokens(br#"{"cached_tokens""#), None);
        assert_eq!(cached_tokens(b""), None);
    }

    #[test]
    fn outcomes() {
        assert_eq!(PredictionOutcome::of(64, 64), PredictionOutcome::Exact);
        assert_eq!(PredictionOutcome::of(64, 0), PredictionOutcome::Over);
        assert_eq!(PredictionOutcome::of(0, 64), PredictionOutcome::Under);
    }
}
