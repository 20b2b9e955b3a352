//! Mooncake-format request traces (JSONL), extended with media ids per block.

use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};

/// One request of a trace: a line of Mooncake's JSONL format.
///
/// `hash_ids` name the prompt's blocks of the trace's block size (512 tokens in Mooncake's
/// traces, the last one usually partial): equal ids at the same position mean the same prefix.
/// `media_ids`, kvroute's extension, lists for each of those blocks the ids of the images whose
/// tokens touch it; absent (or empty) for text-only traffic. `hash_ids` are then what a router
/// that ignores media sees (an image's placeholder tokens are the same whatever the image).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TraceRequest {
    /// Arrival time in milliseconds from the start of the trace.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Generated tokens.
    pub output_length: u64,
    /// Prefix-block ids, one per trace block of the prompt.
    pub hash_ids: Vec<u64>,
    /// Media ids per trace block (parallel to `hash_ids`); empty for text-only traffic.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub media_ids: Vec<Vec<u64>>,
}

/// A trace that cannot be replayed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// Reading failed.
    #[error("reading the trace")]
    Io(#[from] std::io::Error),
    /// A line is not a trace request.
    #[error("line {line} is not a trace request")]
    Json {
        /// 1-based line number.
        line: usize,
        /// What was wrong.
        source: serde_json::Error,
    },
    /// `media_ids` is present but not one entry per hash id.
    #[error("line {line}: {media} media_ids entries for {blocks} hash_ids")]
    MediaLength {
        /// 1-based line number (0 for requests not read from a file).
        line: usize,
        /// Entries in `media_ids`.
        media: usize,
        /// Entries in `hash_ids`.
        blocks: usize,
    },
    /// The prompt has more full KV blocks than its hash ids cover.
    #[error(
        "line {line}: input_length {input_length} needs {needed} hash_ids, the line has {given}"
    )]
    ShortHashIds {
        /// 1-based line number (0 for requests not read from a file).
        line: usize,
        /// Prompt tokens.
        input_length: u64,
        /// Hash ids needed to cover every full KV block.
        needed: usize,
        /// Hash ids given.
        given: usize,
    },
    /// The KV block size does not divide the trace's block size.
    #[error("KV block size {kv} must be at least 1 and divide the trace block size {trace}")]
    BlockSize {
        /// KV block size in tokens.
        kv: u32,
        /// Trace block size in tokens.
        trace: u32,
    },
    /// The trace has no request.
    #[error("the trace has no request")]
    Empty,
}

/// Reads a JSONL trace; blank lines are skipped, unknown fields ignored.
///
/// ```
/// let jsonl = br#"{"timestamp": 0, "input_length": 600, "output_length": 10, "hash_ids": [0, 1]}
/// {"timestamp": 5, "input_length": 700, "output_length": 10, "hash_ids": [0, 2], "media_ids": [[], [77]]}
/// "#;
/// let trace = kvroute_replay::read_jsonl(&jsonl[..])?;
/// assert_eq!(trace.len(), 2);
/// assert_eq!(trace[1].media_ids[1], [77]);
/// # Ok::<(), kvroute_replay::TraceError>(())
/// ```
pub fn read_jsonl(reader: impl BufRead) -> Result<Vec<TraceRequest>, TraceError> {
    let mut requests = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let request: TraceRequest =
            serde_json::from_str(&line).map_err(|source| TraceError::Json {
                line: index + 1,
                source,
            })?;
        check_media(&request, index + 1)?;
        requests.push(request);
    }
    Ok(requests)
}

/// Writes a trace as JSONL, one request per line.
pub fn write_jsonl(requests: &[TraceRequest], mut writer: impl Write) -> std::io::Result<()> {
    for request in requests {
        serde_json::to_writer(&mut writer, request)?;
        writer.write_all(b"\n")?;
    }
    writer.flush()
}

pub(crate) fn check_media(request: &TraceRequest, line: usize) -> Result<(), TraceError> {
    if !request.media_ids.is_empty() && request.media_ids.len() != request.hash_ids.len() {
        return Err(TraceError::MediaLength {
            line,
            media: request.media_ids.len(),
            blocks: request.hash_ids.len(),
        });
    }
    Ok(())
}

/// Spreads requests that share a timestamp evenly over the `window_ms` after it, in their
/// order: request `i` of `k` sharing timestamp `t` arrives at `t + i * window_ms / k`.
/// Traces that quantize time (Mooncake's conversation trace counts in 3-second steps, up to
/// 28 requests at one instant) otherwise make every request of a step arrive at once, which no
/// load balancer in front of router replicas sees. Order is kept when `window_ms` is at most
/// the gap to the next distinct timestamp.
///
/// ```
/// use kvroute_replay::{spread_simultaneous, TraceRequest};
///
/// let at = |t| TraceRequest { timestamp: t, input_length: 1, output_length: 1, hash_ids: vec![0], media_ids: vec![] };
/// let mut trace = vec![at(0), at(0), at(0), at(0), at(3000)];
/// spread_simultaneous(&mut trace, 3000);
/// let times: Vec<u64> = trace.iter().map(|r| r.timestamp).collect();
/// assert_eq!(times, [0, 750, 1500, 2250, 3000]);
/// ```
pub fn spread_simultaneous(trace: &mut [TraceRequest], window_ms: u64) {
    let mut start = 0;
    while start < trace.len() {
        let at = trace[start].timestamp;
        let len = trace[start..]
            .iter()
            .take_while(|r| r.timestamp == at)
            .count();
        for (i, request) in trace[start..start + len].iter_mut().enumerate() {
            request.timestamp = at + window_ms * i as u64 / len as u64;
        }
        start += len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_name_the_line_and_traces_round_trip() {
        let bad = b"{\"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [1]}\n\n{\"timestamp\": 1}\n";
        match read_jsonl(&bad[..]) {
            Err(TraceError::Json { line: 3, .. }) => {}
            other => panic!("{other:?}"),
        }
        let media = b"{\"timestamp\": 0, \"input_length\": 4, \"output_length\": 1, \"hash_ids\": [1], \"media_ids\": [[], [2]]}";
        assert!(matches!(
            read_jsonl(&media[..]),
            Err(TraceError::MediaLength {
                line: 1,
                media: 2,
                blocks: 1
            })
        ));
        let trace = vec![TraceRequest {
            timestamp: 3,
            input_length: 9,
            output_length: 2,
            hash_ids: vec![u64::MAX, 0],
            media_ids: vec![vec![], vec![u64::MAX - 1]],
        }];
        let mut written = Vec::new();
        write_jsonl(&trace, &mut written).unwrap();
        assert_eq!(read_jsonl(&written[..]).unwrap(), trace);
    }
}
