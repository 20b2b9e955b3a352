//! A trace turned into what the router and the workers see: KV block keys per request.

use crate::trace::{check_media, TraceError, TraceRequest};
use kvroute_blockhash::{sequence_hash, BlockHasher, MediaId, SequenceHash};
use kvroute_dispatch::PrefixKeys;
use std::collections::HashSet;

/// One request, keyed.
#[derive(Clone, Debug)]
pub(crate) struct KeyedRequest {
    /// Arrival in virtual microseconds (before any speed-up).
    pub arrival_us: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    /// Sequence hashes of the prompt's full KV blocks over tokens and media: what the engine
    /// caches.
    pub media_keys: Vec<SequenceHash>,
    /// The same blocks hashed over tokens only; `None` when the request has no media (the keys
    /// are then the same).
    pub text_keys: Option<Vec<SequenceHash>>,
}

impl KeyedRequest {
    pub fn keys(&self, keys: PrefixKeys) -> &[SequenceHash] {
        match (keys, &self.text_keys) {
            (PrefixKeys::TextOnly, Some(text)) => text,
            _ => &self.media_keys,
        }
    }
}

/// A trace ready to be replayed any number of times: requests in arrival order with the KV
/// block keys of their prompts, and the ideal reuse of one infinite cache.
///
/// Each full KV block of a prompt is hashed with kvroute's own block hasher from its trace
/// block's id, its position inside that block (when the KV block size is smaller than the
/// trace's) and, for the media-aware keys, the media ids of that trace block; the sequence
/// hashes chain as Dynamo's do. A trailing partial block has no key, as in an engine.
///
/// ```
/// use kvroute_replay::{TraceRequest, Workload};
///
/// let request = |t, len, ids: &[u64]| TraceRequest {
///     timestamp: t, input_length: len, output_length: 8, hash_ids: ids.to_vec(), media_ids: vec![],
/// };
/// // Blocks of 4 tokens; the second request repeats the first one's 2 full blocks.
/// let trace = [request(0, 9, &[1, 2, 3]), request(10, 12, &[1, 2, 4])];
/// let workload = Workload::from_trace(&trace, 4, 4)?;
/// assert_eq!(workload.prompt_blocks(), 5);
/// assert_eq!(workload.ideal().hit_rate(), 2.0 / 5.0);
/// # Ok::<(), kvroute_replay::TraceError>(())
/// ```
#[derive(Clone, Debug)]
pub struct Workload {
    pub(crate) requests: Vec<KeyedRequest>,
    pub(crate) block_size: u32,
    ideal: IdealReuse,
    has_media: bool,
}

/// What a single cache of unbounded size, seeing every request in arrival order, would reuse:
/// the upper bound of any routing.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct IdealReuse {
    /// Full prompt blocks of every request.
    pub prompt_blocks: u64,
    /// Leading blocks found in the cache.
    pub reused_blocks: u64,
    /// Prompt tokens of every request.
    pub prompt_tokens: u64,
    /// Tokens of the reused blocks.
    pub reused_tokens: u64,
}

impl IdealReuse {
    /// Reused blocks over prompt blocks (0 for an empty workload).
    pub fn hit_rate(&self) -> f64 {
        ratio(self.reused_blocks, self.prompt_blocks)
    }

    /// Reused tokens over prompt tokens.
    pub fn token_hit_rate(&self) -> f64 {
        ratio(self.reused_tokens, self.prompt_tokens)
    }
}

pub(crate) fn ratio(numerator: u64, denominator: u64) -> f64 {
    if denominator == 0 {
        0.0
    } else {
        numerator as f64 / denominator as f64
    }
}

impl Workload {
    /// Keys `trace` (in any order; requests are replayed by timestamp, ties in file order) for
    /// KV blocks of `kv_block_size` tokens, its hash ids naming blocks of `trace_block_size`
    /// tokens. `kv_block_size` must divide `trace_block_size`.
    pub fn from_trace(
        trace: &[TraceRequest],
        trace_block_size: u32,
        kv_block_size: u32,
    ) -> Result<Self, TraceError> {
        if kv_block_size == 0 || !trace_block_size.is_multiple_of(kv_block_size) {
            return Err(TraceError::BlockSize {
                kv: kv_block_size,
                trace: trace_block_size,
            });
        }
        if trace.is_empty() {
            return Err(TraceError::Empty);
        }
        let hasher = BlockHasher::new(kv_block_size).map_err(|_| TraceError::BlockSize {
            kv: kv_block_size,
            trace: trace_block_size,
        })?;
        let per_trace_block = (trace_block_size / kv_block_size) as usize;
        let mut order: Vec<usize> = (0..trace.len()).collect();
        order.sort_by_key(|&i| trace[i].timestamp);
        let mut requests = Vec::with_capacity(trace.len());
        let mut has_media = false;
        for i in order {
            let request = &trace[i];
            check_media(request, i + 1)?;
            let blocks = (request.input_length / u64::from(kv_block_size)) as usize;
            let needed = blocks.div_ceil(per_trace_block);
            if request.hash_ids.len() < needed {
                return Err(TraceError::ShortHashIds {
                    line: i + 1,
                    input_length: request.input_length,
                    needed,
                    given: request.hash_ids.len(),
                });
            }
            let with_media = request.media_ids.iter().any(|m| !m.is_empty());
            has_media |= with_media;
            let media_keys = chain(&hasher, request, blocks, per_trace_block, true);
            let text_keys =
                with_media.then(|| chain(&hasher, request, blocks, per_trace_block, false));
            requests.push(KeyedRequest {
                arrival_us: request.timestamp.saturating_mul(1000),
                input_tokens: request.input_length,
                output_tokens: request.output_length,
                media_keys,
                text_keys,
            });
        }
        let ideal = ideal_reuse(&requests, kv_block_size);
        Ok(Self {
            requests,
            block_size: kv_block_size,
            ideal,
            has_media,
        })
    }

    /// Requests.
    pub fn len(&self) -> usize {
        self.requests.len()
    }

    /// Whether there is no request (never true for a workload built from a trace).
    pub fn is_empty(&self) -> bool {
        self.requests.is_empty()
    }

    /// Tokens per KV block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether some request carries media (text-only and media-aware keys then differ).
    pub fn has_media(&self) -> bool {
        self.has_media
    }

    /// Full prompt blocks of every request.
    pub fn prompt_blocks(&self) -> u64 {
        self.ideal.prompt_blocks
    }

    /// The reuse of one infinite cache.
    pub fn ideal(&self) -> IdealReuse {
        self.ideal
    }
}

/// Sequence hashes of the first `blocks` KV blocks of `request`.
fn chain(
    hasher: &BlockHasher,
    request: &TraceRequest,
    blocks: usize,
    per_trace_block: usize,
    with_media: bool,
) -> Vec<SequenceHash> {
    let mut keys = Vec::with_capacity(blocks);
    let mut parent = None;
    let mut media: Vec<MediaId> = Vec::new();
    for block in 0..blocks {
        let trace_block = block / per_trace_block;
        let id = request.hash_ids[trace_block];
        // Stand-in tokens: the trace block's id and the KV block's place inside it.
        let window = [
            id as u32,
            (id >> 32) as u32,
            (block % per_trace_block) as u32,
        ];
        media.clear();
        if with_media {
            if let Some(ids) = request.media_ids.get(trace_block) {
                media.extend(ids.iter().map(|&m| MediaId(m)));
            }
        }
        let sequence = sequence_hash(parent, hasher.hash_block(&window, &media));
        keys.push(sequence);
        parent = Some(sequence);
    }
    keys
}

fn ideal_reuse(requests: &[KeyedRequest], block_size: u32) -> IdealReuse {
    let mut seen: HashSet<SequenceHash> = HashSet::new();
    let mut ideal = IdealReuse::default();
    for request in requests {
        let reused = request
            .media_keys
            .iter()
            .take_while(|k| seen.contains(k))
            .count() as u64;
        ideal.prompt_blocks += request.media_keys.len() as u64;
        ideal.reused_blocks += reused;
        ideal.prompt_tokens += request.input_tokens;
        ideal.reused_tokens += reused * u64::from(block_size);
        seen.extend(request.media_keys.iter().copied());
    }
    ideal
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(t: u64, len: u64, ids: &[u64], media: &[&[u64]]) -> TraceRequest {
        TraceRequest {
            timestamp: t,
            input_length: len,
            output_length: 4,
            hash_ids: ids.to_vec(),
            media_ids: media.iter().map(|m| m.to_vec()).collect(),
        }
    }

    #[test]
    fn smaller_kv_blocks_split_trace_blocks_and_keep_prefixes() {
        let trace = [request(0, 16, &[5, 6], &[]), request(1, 16, &[5, 7], &[])];
        let workload = Workload::from_trace(&trace, 8, 4).unwrap();
        let [a, b] = [&workload.requests[0], &workload.requests[1]];
        assert_eq!(a.media_keys.len(), 4);
        assert_eq!(a.media_keys[..2], b.media_keys[..2]);
        assert_ne!(a.media_keys[2], b.media_keys[2]);
        assert_ne!(a.media_keys[0], a.media_keys[1]);
        assert_eq!(workload.ideal().reused_blocks, 2);
    }

    #[test]
    fn media_change_the_keys_only_where_they_sit() {
        let trace = [
            request(0, 12, &[1, 2, 3], &[&[], &[10], &[]]),
            request(1, 12, &[1, 2, 3], &[&[], &[11], &[]]),
        ];
        let workload = Workload::from_trace(&trace, 4, 4).unwrap();
        let [a, b] = [&workload.requests[0], &workload.requests[1]];
        assert!(workload.has_media());
        assert_eq!(a.media_keys[0], b.media_keys[0]);
        assert_ne!(a.media_keys[1], b.media_keys[1]);
        assert_ne!(a.media_keys[2], b.media_keys[2]);
        assert_eq!(a.keys(PrefixKeys::TextOnly), b.keys(PrefixKeys::TextOnly));
        assert_eq!(a.keys(PrefixKeys::TextOnly)[0], a.media_keys[0]);
        assert_eq!(workload.ideal().reused_blocks, 1);
    }

    #[test]
    fn bad_traces_are_refused() {
        assert!(matches!(
            Workload::from_trace(&[request(0, 12, &[1, 2], &[])], 4, 4),
            Err(TraceError::ShortHashIds {
                needed: 3,
                given: 2,
                ..
            })
        ));
        assert!(matches!(
            Workload::from_trace(&[request(0, 4, &[1], &[])], 512, 100),
            Err(TraceError::BlockSize { .. })
        ));
        assert!(matches!(
            Workload::from_trace(&[request(0, 4, &[1], &[&[], &[]])], 4, 4),
            Err(TraceError::MediaLength { .. })
        ));
        assert!(matches!(
            Workload::from_trace(&[], 4, 4),
            Err(TraceError::Empty)
        ));
    }

    #[test]
    fn requests_are_replayed_by_timestamp() {
        let trace = [request(9, 4, &[1], &[]), request(3, 8, &[2, 3], &[])];
        let workload = Workload::from_trace(&trace, 4, 4).unwrap();
        assert_eq!(workload.requests[0].arrival_us, 3000);
        assert_eq!(workload.requests[0].input_tokens, 8);
    }
}
