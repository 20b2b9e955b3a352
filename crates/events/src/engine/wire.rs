//! The engines' KV event wire: vLLM's `KVEventBatch` (and SGLang's, which shares it) as
//! msgpack, and the three ZeroMQ frames around it.

use super::msgpack::{Int, Reader, Writer};
use super::EngineWireError;

/// An engine's own block hash as events carry it: vLLM's `ExternalBlockHash` (the low 64 bits
/// of its SHA-256 digest), SGLang's signed 64-bit hash (its bits), or, from vLLM with
/// `VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0`, the last 8 bytes of the 32-byte digest read
/// big-endian (the same value the integer form would carry).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EngineHash(pub u64);

/// One message of an engine's event stream: `KVEventBatch` (`[ts, events, data_parallel_rank]`).
#[derive(Clone, Debug, PartialEq)]
pub struct EngineBatch {
    /// When the engine's scheduler made the batch (Unix seconds).
    pub ts: f64,
    /// The events, in order.
    pub events: Vec<EngineEvent>,
    /// The data-parallel rank (SGLang: attention-DP rank) the publisher belongs to.
    pub dp_rank: Option<u32>,
}

/// One KV cache event of an engine.
#[derive(Clone, Debug, PartialEq)]
pub enum EngineEvent {
    /// `BlockStored`.
    Stored(EngineStored),
    /// `BlockRemoved`.
    Removed(EngineRemoved),
    /// `AllBlocksCleared`.
    Cleared,
}

/// `BlockStored`: consecutive full blocks continuing `parent`.
///
/// Fields the engines add beyond these (locality, ownership, session, lookahead tokens) are
/// read past; `None` in an optional field means the engine left it out.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStored {
    /// The engine's hash of each block.
    pub block_hashes: Vec<EngineHash>,
    /// The engine's hash of the block before the first one; `None` at a sequence start.
    pub parent: Option<EngineHash>,
    /// The tokens of every block, concatenated (`block_size` per block).
    pub token_ids: Vec<u32>,
    /// Tokens per block.
    pub block_size: u32,
    /// vLLM's deprecated integer LoRA id.
    pub lora_id: Option<i64>,
    /// Where the blocks live (`GPU`; offloading connectors: `CPU`, `STORAGE`; SGLang:
    /// `CPU_PINNED`, `DISK`, ...). vLLM always writes it; SGLang leaves it out for its GPU pool.
    pub medium: Option<String>,
    /// The LoRA adapter's name.
    pub lora_name: Option<String>,
    /// vLLM: per block, what besides the tokens entered its hash (see [`ExtraKey`]).
    pub extra_keys: Option<Vec<Option<Vec<ExtraKey>>>>,
    /// The KV cache group (hybrid models have several).
    pub group_idx: Option<u32>,
    /// The group's attention kind (`full_attention`, `sliding_window`, `mamba`, ...).
    pub kv_cache_spec_kind: Option<String>,
    /// The sliding window of a sliding-window group.
    pub sliding_window: Option<u32>,
    /// SGLang: the request's cache salt (its hashes are already salted by it).
    pub cache_salt: Option<String>,
}

/// `BlockRemoved`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineRemoved {
    /// The engine's hashes of the evicted blocks.
    pub block_hashes: Vec<EngineHash>,
    /// Where they were evicted from (see [`EngineStored::medium`]).
    pub medium: Option<String>,
    /// The KV cache group.
    pub group_idx: Option<u32>,
}

/// One entry of a block's `extra_keys`, as vLLM publishes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtraKey {
    /// A bare string: the LoRA name, the cache salt (first block only), or, from vLLM 0.18,
    /// a multimodal identifier.
    Str(String),
    /// `[identifier, offset]` (vLLM 0.19 and later): a multimodal item and where it starts
    /// relative to the block (negative when it started in an earlier block).
    Media(String, i64),
    /// Binary data (a prompt-embedding digest).
    Bytes(Vec<u8>),
    /// Anything else (kept so the event re-encodes; it never enters a hash).
    Other,
}

/// The frames of one ZeroMQ message of an engine: `[topic, seq (8 bytes big-endian), payload]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EngineFrames<'a> {
    /// The topic (vLLM's default is empty).
    pub topic: &'a [u8],
    /// The publisher's sequence number of the batch.
    pub seq: u64,
    /// The msgpack `KVEventBatch`.
    pub payload: &'a [u8],
}

impl<'a> EngineFrames<'a> {
    /// Splits a PUB message (`[topic, seq, payload]`) into its parts.
    pub fn from_pub(frames: &[&'a [u8]]) -> Result<Self, EngineWireError> {
        match frames {
            [topic, seq, payload] => Ok(Self {
                topic,
                seq: seq_of(seq)?,
                payload,
            }),
            _ => Err(EngineWireError::Frames(frames.len())),
        }
    }
}

/// The sequence number a replay socket sends after its last batch.
pub const REPLAY_END: u64 = u64::MAX;

/// Reads an 8-byte big-endian sequence number.
pub(crate) fn seq_of(frame: &[u8]) -> Result<u64, EngineWireError> {
    <[u8; 8]>::try_from(frame)
        .map(u64::from_be_bytes)
        .map_err(|_| EngineWireError::Seq(frame.len()))
}

/// Decodes a `KVEventBatch` payload (vLLM 0.24+ tagged maps, and the tagged arrays of older
/// vLLM; SGLang's events have the same shape).
///
/// Nothing is allocated beyond the payload's own size, whatever lengths it claims.
///
/// ```
/// use kvroute_events::{decode_engine_batch, EngineEvent};
///
/// // [ts, [{"type": "AllBlocksCleared"}], 0], as vLLM encodes it.
/// let payload = b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\x91\x81\xa4type\xb0AllBlocksCleared\x00";
/// let batch = decode_engine_batch(payload)?;
/// assert_eq!(batch.events, vec![EngineEvent::Cleared]);
/// assert_eq!(batch.dp_rank, Some(0));
/// # Ok::<(), kvroute_events::EngineWireError>(())
/// ```
pub fn decode_engine_batch(payload: &[u8]) -> Result<EngineBatch, EngineWireError> {
    let mut r = Reader::new(payload);
    let len = r.array_len()?;
    if !(2..=3).contains(&len) {
        return Err(EngineWireError::Shape("a batch is [ts, events, dp_rank]"));
    }
    let ts = r.f64()?;
    let count = r.array_len()?;
    let mut events = Vec::with_capacity(count);
    for _ in 0..count {
        events.push(decode_event(&mut r)?);
    }
    let dp_rank = if len == 3 && !r.nil()? {
        Some(r.u32()?)
    } else {
        None
    };
    if !r.is_at_end() {
        return Err(EngineWireError::Shape("bytes after the batch"));
    }
    Ok(EngineBatch {
        ts,
        events,
        dp_rank,
    })
}

fn decode_event(r: &mut Reader<'_>) -> Result<EngineEvent, EngineWireError> {
    if r.at_array() {
        return decode_array_event(r);
    }
    let fields = r.map_len()?;
    let mut kind = None;
    let mut stored = EngineStored::default();
    let mut removed_medium = None;
    let mut have_hashes = false;
    let mut have_tokens = false;
    let mut have_block_size = false;
    for _ in 0..fields {
        match r.str()? {
            "type" => kind = Some(r.str()?),
            "block_hashes" => {
                stored.block_hashes = hashes(r)?;
                have_hashes = true;
            }
            "parent_block_hash" => stored.parent = opt(r, hash)?,
            "token_ids" => {
                stored.token_ids = tokens(r)?;
                have_tokens = true;
            }
            "block_size" => {
                stored.block_size = r.u32()?;
                have_block_size = true;
            }
            "lora_id" => stored.lora_id = opt(r, i64_of)?,
            "medium" => {
                removed_medium = opt(r, string)?;
                stored.medium.clone_from(&removed_medium);
            }
            "lora_name" => stored.lora_name = opt(r, string)?,
            "extra_keys" => stored.extra_keys = opt(r, extra_keys)?,
            "group_idx" => stored.group_idx = opt(r, |r| r.u32())?,
            "kv_cache_spec_kind" => stored.kv_cache_spec_kind = opt(r, string)?,
            "kv_cache_spec_sliding_window" => stored.sliding_window = opt(r, |r| r.u32())?,
            "cache_salt" => stored.cache_salt = opt(r, string)?,
            _ => r.skip()?,
        }
    }
    match kind {
        Some("BlockStored") if have_hashes && have_tokens && have_block_size => {
            Ok(EngineEvent::Stored(stored))
        }
        Some("BlockStored") => Err(EngineWireError::Shape(
            "BlockStored without block_hashes, token_ids or block_size",
        )),
        Some("BlockRemoved") if have_hashes => Ok(EngineEvent::Removed(EngineRemoved {
            block_hashes: stored.block_hashes,
            medium: removed_medium,
            group_idx: stored.group_idx,
        })),
        Some("BlockRemoved") => Err(EngineWireError::Shape("BlockRemoved without block_hashes")),
        Some("AllBlocksCleared") => Ok(EngineEvent::Cleared),
        Some(other) => Err(EngineWireError::UnknownTag(
            other.chars().take(64).collect(),
        )),
        None => Err(EngineWireError::Shape("event without a type")),
    }
}

/// vLLM 0.23 and older: `["BlockStored", hashes, parent, tokens, block_size, lora_id, medium,
/// lora_name?, extra_keys?, group_idx?, ...]`, trailing defaults dropped.
fn decode_array_event(r: &mut Reader<'_>) -> Result<EngineEvent, EngineWireError> {
    let len = r.array_len()?;
    if len == 0 {
        return Err(EngineWireError::Shape("event array without a tag"));
    }
    let tag = r.str()?;
    let mut left = len - 1;
    let mut next = |r: &mut Reader<'_>| {
        let has = left > 0;
        left = left.saturating_sub(1);
        has && !matches!(r.nil(), Ok(true))
    };
    let event = match tag {
        "BlockStored" if len >= 5 => {
            let block_hashes = if next(r) { hashes(r)? } else { Vec::new() };
            let parent = if next(r) { Some(hash(r)?) } else { None };
            let token_ids = if next(r) { tokens(r)? } else { Vec::new() };
            let block_size = if next(r) { r.u32()? } else { 0 };
            let lora_id = if next(r) { Some(i64_of(r)?) } else { None };
            let medium = if next(r) { Some(string(r)?) } else { None };
            let lora_name = if next(r) { Some(string(r)?) } else { None };
            let extra_keys = if next(r) { Some(extra_keys(r)?) } else { None };
            let group_idx = if next(r) { Some(r.u32()?) } else { None };
            EngineEvent::Stored(EngineStored {
                block_hashes,
                parent,
                token_ids,
                block_size,
                lora_id,
                medium,
                lora_name,
                extra_keys,
                group_idx,
                ..EngineStored::default()
            })
        }
        "BlockRemoved" if len >= 2 => {
            let block_hashes = if next(r) { hashes(r)? } else { Vec::new() };
            let medium = if next(r) { Some(string(r)?) } else { None };
            let group_idx = if next(r) { Some(r.u32()?) } else { None };
            EngineEvent::Removed(EngineRemoved {
                block_hashes,
                medium,
                group_idx,
            })
        }
        "AllBlocksCleared" => EngineEvent::Cleared,
        "BlockStored" | "BlockRemoved" => {
            return Err(EngineWireError::Shape("event array too short"));
        }
        other => {
            return Err(EngineWireError::UnknownTag(
                other.chars().take(64).collect(),
            ))
        }
    };
    for _ in 0..left {
        r.skip()?;
    }
    Ok(event)
}

fn opt<T>(
    r: &mut Reader<'_>,
    read: impl FnOnce(&mut Reader<'_>) -> Result<T, EngineWireError>,
) -> Result<Option<T>, EngineWireError> {
    if r.nil()? {
        Ok(None)
    } else {
        read(r).map(Some)
    }
}

fn string(r: &mut Reader<'_>) -> Result<String, EngineWireError> {
    r.str().map(str::to_owned)
}

fn i64_of(r: &mut Reader<'_>) -> Result<i64, EngineWireError> {
    match r.int()? {
        Int::Signed(v) => Ok(v),
        Int::Unsigned(v) => {
            i64::try_from(v).map_err(|_| EngineWireError::Shape("integer too large"))
        }
    }
}

fn hash(r: &mut Reader<'_>) -> Result<EngineHash, EngineWireError> {
    if let Some(value) = r.u64_fast() {
        return Ok(EngineHash(value));
    }
    if r.at_bin() {
        let bytes = r.bin()?;
        let tail = bytes
            .len()
            .checked_sub(8)
            .map(|start| &bytes[start..])
            .ok_or(EngineWireError::Shape(
                "a byte block hash shorter than 8 bytes",
            ))?;
        let mut last = [0u8; 8];
        last.copy_from_slice(tail);
        return Ok(EngineHash(u64::from_be_bytes(last)));
    }
    Ok(EngineHash(match r.int()? {
        Int::Unsigned(v) => v,
        // SGLang's hashes are signed 64-bit integers: keep their bits.
        Int::Signed(v) => v as u64,
    }))
}

fn hashes(r: &mut Reader<'_>) -> Result<Vec<EngineHash>, EngineWireError> {
    let len = r.array_len()?;
    let mut out = Vec::with_capacity(len);
    for _ in 0..len {
        out.push(hash(r)?);
    }
    Ok(out)
}

fn tokens(r: &mut Reader<'_>) -> Result<Vec<u32>, EngineWireError> {
    let mut out = Vec::new();
    r.u32_array(&mut out)?;
    Ok(out)
}

fn extra_keys(r: &mut Reader<'_>) -> Result<Vec<Option<Vec<ExtraKey>>>, EngineWireError> {
    let blocks = r.array_len()?;
    let mut out = Vec::with_capacity(blocks);
    for _ in 0..blocks {
        if r.nil()? {
            out.push(None);
            continue;
        }
        let keys = r.array_len()?;
        let mut block = Vec::with_capacity(keys);
        for _ in 0..keys {
            block.push(extra_key(r)?);
        }
        out.push(Some(block));
    }
    Ok(out)
}

fn extra_key(r: &mut Reader<'_>) -> Result<ExtraKey, EngineWireError> {
    if r.at_str() {
        return string(r).map(ExtraKey::Str);
    }
    if r.at_bin() {
        return r.bin().map(|b| ExtraKey::Bytes(b.to_vec()));
    }
    if r.at_array() {
        let len = r.array_len()?;
        if len == 2 && r.at_str() {
            let identifier = string(r)?;
            if let Ok(offset) = i64_of(r) {
                return Ok(ExtraKey::Media(identifier, offset));
            }
            // Not an offset after all: read past it.
            r.skip()?;
            return Ok(ExtraKey::Other);
        }
        for _ in 0..len {
            r.skip()?;
        }
        return Ok(ExtraKey::Other);
    }
    r.skip()?;
    Ok(ExtraKey::Other)
}

/// Encodes a batch exactly as vLLM (0.24 and later, msgspec) does: tagged maps, required
/// fields always written (nil when `None`), optional ones only when set.
///
/// ```
/// use kvroute_events::{decode_engine_batch, encode_engine_batch, EngineBatch, EngineEvent};
///
/// let batch = EngineBatch { ts: 1767225602.5, events: vec![EngineEvent::Cleared], dp_rank: Some(0) };
/// let bytes = encode_engine_batch(&batch);
/// assert_eq!(bytes.len(), 35);
/// assert_eq!(decode_engine_batch(&bytes)?, batch);
/// # Ok::<(), kvroute_events::EngineWireError>(())
/// ```
pub fn encode_engine_batch(batch: &EngineBatch) -> Vec<u8> {
    // Worst case per token (uint32) and hash (uint64), so the buffer never grows.
    let reserve: usize = batch
        .events
        .iter()
        .map(|event| match event {
            EngineEvent::Stored(s) => 256 + s.token_ids.len() * 5 + s.block_hashes.len() * 9,
            EngineEvent::Removed(r) => 64 + r.block_hashes.len() * 9,
            EngineEvent::Cleared => 32,
        })
        .sum();
    let mut out = Vec::with_capacity(16 + reserve);
    let mut w = Writer { out: &mut out };
    w.array(3);
    w.f64(batch.ts);
    w.array(batch.events.len());
    for event in &batch.events {
        encode_event(&mut w, event);
    }
    match batch.dp_rank {
        Some(rank) => w.uint(u64::from(rank)),
        None => w.nil(),
    }
    out
}

fn encode_event(w: &mut Writer<'_>, event: &EngineEvent) {
    match event {
        EngineEvent::Stored(s) => {
            let optional = [
                s.extra_keys.is_some(),
                s.group_idx.is_some(),
                s.kv_cache_spec_kind.is_some(),
                s.sliding_window.is_some(),
            ];
            // msgspec sizes a struct's map header by its field count (16 for vLLM's
            // BlockStored), not by the fields written.
            w.map16(8 + optional.iter().filter(|&&set| set).count());
            w.str("type");
            w.str("BlockStored");
            hash_list(w, &s.block_hashes);
            w.str("parent_block_hash");
            match s.parent {
                Some(h) => w.uint(h.0),
                None => w.nil(),
            }
            w.str("token_ids");
            w.array(s.token_ids.len());
            for &t in &s.token_ids {
                w.uint(u64::from(t));
            }
            w.str("block_size");
            w.uint(u64::from(s.block_size));
            w.str("lora_id");
            match s.lora_id {
                Some(id) => w.int(id),
                None => w.nil(),
            }
            w.str("medium");
            opt_str(w, s.medium.as_deref());
            w.str("lora_name");
            opt_str(w, s.lora_name.as_deref());
            if let Some(keys) = &s.extra_keys {
                w.str("extra_keys");
                w.array(keys.len());
                for block in keys {
                    match block {
                        None => w.nil(),
                        Some(block) => {
                            w.array(block.len());
                            for key in block {
                                encode_extra_key(w, key);
                            }
                        }
                    }
                }
            }
            if let Some(group) = s.group_idx {
                w.str("group_idx");
                w.uint(u64::from(group));
            }
            if let Some(kind) = &s.kv_cache_spec_kind {
                w.str("kv_cache_spec_kind");
                w.str(kind);
            }
            if let Some(window) = s.sliding_window {
                w.str("kv_cache_spec_sliding_window");
                w.uint(u64::from(window));
            }
        }
        EngineEvent::Removed(e) => {
            w.map(3 + usize::from(e.group_idx.is_some()));
            w.str("type");
            w.str("BlockRemoved");
            hash_list(w, &e.block_hashes);
            w.str("medium");
            opt_str(w, e.medium.as_deref());
            if let Some(group) = e.group_idx {
                w.str("group_idx");
                w.uint(u64::from(group));
            }
        }
        EngineEvent::Cleared => {
            w.map(1);
            w.str("type");
            w.str("AllBlocksCleared");
        }
    }
}

fn hash_list(w: &mut Writer<'_>, hashes: &[EngineHash]) {
    w.str("block_hashes");
    w.array(hashes.len());
    for h in hashes {
        w.uint(h.0);
    }
}

fn opt_str(w: &mut Writer<'_>, s: Option<&str>) {
    match s {
        Some(s) => w.str(s),
        None => w.nil(),
    }
}

fn encode_extra_key(w: &mut Writer<'_>, key: &ExtraKey) {
    match key {
        ExtraKey::Str(s) => w.str(s),
        ExtraKey::Media(identifier, offset) => {
            w.array(2);
            w.str(identifier);
            w.int(*offset);
        }
        ExtraKey::Bytes(b) => w.bin(b),
        ExtraKey::Other => w.nil(),
    }
}
