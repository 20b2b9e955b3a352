//! Engine events to kvroute events: re-hashing each stored block's tokens with
//! kvroute-blockhash and remembering which kvroute sequence hash each engine hash became.

use super::wire::{EngineEvent, EngineHash, EngineRemoved, EngineStored, ExtraKey};
use kvroute_blockhash::{
    media_id_from_identifier, sequence_hash, BlockHash, BlockHasher, HashError, MediaId, NoMedia,
    SequenceHash,
};
use kvroute_protocol::{
    BlockExtraInfo, BlockMmObjectInfo, KvCacheEventData, KvCacheRemoveData, KvCacheStoreData,
    KvCacheStoredBlockData,
};
use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;

/// The prefix NVIDIA Dynamo puts before a cache salt it forwards to vLLM, which tells a salt
/// apart from a LoRA name or a legacy multimodal identifier in `extra_keys`.
pub const CACHE_SALT_PREFIX: &str = "dynamo-cache-salt:";

/// Distinct (LoRA, namespace) hashers one engine cache may use before its state is dropped
/// and rebuilt (each is a few hundred bytes; real fleets use a handful).
const MAX_HASHERS: usize = 4096;

/// How an [`EngineCache`] converts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct EngineCacheConfig {
    /// The block size kvroute hashes with; an event with another is refused.
    pub block_size: u32,
    /// The most engine blocks remembered; past it the cache's entries are dropped and rebuilt
    /// from new events. Size it above the engine's KV pool (in blocks).
    pub max_blocks: usize,
}

impl EngineCacheConfig {
    /// Blocks of `block_size` tokens, remembering at most 4M blocks (about 200 MB at worst).
    pub fn new(block_size: u32) -> Self {
        Self {
            block_size,
            max_blocks: 1 << 22,
        }
    }

    /// This configuration remembering at most `max_blocks` engine blocks.
    pub fn with_max_blocks(mut self, max_blocks: usize) -> Self {
        self.max_blocks = max_blocks;
        self
    }
}

/// Why an engine event was not turned into a kvroute event.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum EngineSkip {
    /// The event is about a KV cache group that is not full attention (sliding window,
    /// mamba, ...): prefix matching does not apply to it.
    #[error("event of a KV cache group that is not full attention")]
    OtherGroup,
    /// The event is about another tier than the GPU pool (an offloading connector's CPU or
    /// storage tier).
    #[error("event of the {0:?} tier, not the GPU pool")]
    OtherMedium(String),
    /// The stored blocks continue a block this cache does not know (lost, or stored before
    /// the router joined): their kvroute hashes cannot be computed.
    #[error("stored blocks continue an unknown block")]
    UnknownParent,
    /// The engine's block size is not kvroute's.
    #[error("engine block size {got}, kvroute hashes blocks of {expected}")]
    BlockSize {
        /// kvroute's block size.
        expected: u32,
        /// The event's.
        got: u32,
    },
    /// The event contradicts itself (token count or `extra_keys` length against the number
    /// of blocks).
    #[error("inconsistent event: {0}")]
    Inconsistent(&'static str),
    /// Remembering the event's blocks would pass [`EngineCacheConfig::max_blocks`]: the
    /// cache's state was dropped, and so must the index's entries of this cache be.
    #[error("more engine blocks than the configured bound: state dropped")]
    Overflow,
}

/// What kvroute knows of one engine block.
#[derive(Clone, Copy, Debug)]
struct Known {
    sequence: SequenceHash,
    /// Index into `EngineCache::hashers`: the LoRA and namespace continuations inherit.
    hasher: u32,
}

/// One engine KV cache (one publisher: a worker's data-parallel rank) as kvroute sees it:
/// converts its events in order into kvroute events.
///
/// ```
/// use kvroute_blockhash::{BlockHasher, NoMedia};
/// use kvroute_events::{EngineCache, EngineCacheConfig, EngineEvent, EngineHash, EngineStored};
/// use kvroute_protocol::KvCacheEventData;
///
/// let mut cache = EngineCache::new(EngineCacheConfig::new(4))?;
/// let stored = EngineEvent::Stored(EngineStored {
///     block_hashes: vec![EngineHash(0xa1), EngineHash(0xa2)],
///     token_ids: (0..8).collect(),
///     block_size: 4,
///     ..EngineStored::default()
/// });
/// let Ok(KvCacheEventData::Stored(data)) = cache.convert(&stored) else { panic!() };
/// let expected = BlockHasher::new(4)?.hash_sequence(&(0..8).collect::<Vec<u32>>(), &NoMedia);
/// assert_eq!(data.blocks[1].block_hash, expected[1].sequence);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct EngineCache {
    config: EngineCacheConfig,
    /// Hashers by (LoRA name, namespace); index 0 is the plain one.
    hashers: Vec<(Option<String>, Option<String>, BlockHasher)>,
    known: FxHashMap<EngineHash, Known>,
    /// Engine blocks per kvroute hash: two engine blocks can be one kvroute block (vLLM hashes
    /// a LoRA's path and a bare cache salt, kvroute neither), and it leaves the index only
    /// with the last of them.
    refs: FxHashMap<SequenceHash, u32>,
    /// The group the engine reports full attention in (0 until it says otherwise).
    full_group: u32,
    block_hashes: Vec<BlockHash>,
    media: Vec<MediaId>,
}

impl EngineCache {
    /// An empty cache.
    pub fn new(config: EngineCacheConfig) -> Result<Self, HashError> {
        Ok(Self {
            hashers: vec![(None, None, BlockHasher::new(config.block_size)?)],
            config,
            known: FxHashMap::default(),
            refs: FxHashMap::default(),
            full_group: 0,
            block_hashes: Vec::new(),
            media: Vec::new(),
        })
    }

    /// Engine blocks remembered.
    pub fn len(&self) -> usize {
        self.known.len()
    }

    /// Whether no engine block is remembered.
    pub fn is_empty(&self) -> bool {
        self.known.is_empty()
    }

    /// The kvroute sequence hash an engine block became, if known.
    pub fn sequence_hash(&self, engine: EngineHash) -> Option<SequenceHash> {
        self.known.get(&engine).map(|k| k.sequence)
    }

    /// Forgets everything (the engine restarted or its events were lost).
    pub fn clear(&mut self) {
        self.known.clear();
        self.refs.clear();
        self.hashers.truncate(1);
    }

    /// Converts one event, in the engine's order. `Cleared` forgets everything.
    pub fn convert(&mut self, event: &EngineEvent) -> Result<KvCacheEventData, EngineSkip> {
        match event {
            EngineEvent::Stored(stored) => self.stored(stored).map(KvCacheEventData::Stored),
            EngineEvent::Removed(removed) => self.removed(removed).map(KvCacheEventData::Removed),
            EngineEvent::Cleared => {
                self.clear();
                Ok(KvCacheEventData::Cleared)
            }
        }
    }

    fn check_tier(&mut self, medium: Option<&str>, group: Option<u32>) -> Result<(), EngineSkip> {
        if let Some(medium) = medium.filter(|m| *m != "GPU") {
            return Err(EngineSkip::OtherMedium(medium.to_owned()));
        }
        if group.is_some_and(|g| g != self.full_group) {
            return Err(EngineSkip::OtherGroup);
        }
        Ok(())
    }

    fn stored(&mut self, event: &EngineStored) -> Result<KvCacheStoreData, EngineSkip> {
        if let Some(kind) = event.kv_cache_spec_kind.as_deref() {
            if !matches!(kind, "full_attention" | "mla_attention") {
                return Err(EngineSkip::OtherGroup);
            }
            // The engine names its full-attention group: removals of others are skipped.
            if let Some(group) = event.group_idx {
                self.full_group = group;
            }
        }
        self.check_tier(event.medium.as_deref(), event.group_idx)?;
        if event.block_size != self.config.block_size {
            return Err(EngineSkip::BlockSize {
                expected: self.config.block_size,
                got: event.block_size,
            });
        }
        let blocks = event.block_hashes.len();
        let block_size = self.config.block_size as usize;
        if Some(event.token_ids.len()) != blocks.checked_mul(block_size) {
            return Err(EngineSkip::Inconsistent(
                "token_ids is not block_size tokens per block hash",
            ));
        }
        if event.extra_keys.as_ref().is_some_and(|k| k.len() != blocks) {
            return Err(EngineSkip::Inconsistent(
                "extra_keys is not one entry per block hash",
            ));
        }
        let parent = match event.parent {
            None => None,
            Some(engine) => Some(*self.known.get(&engine).ok_or(EngineSkip::UnknownParent)?),
        };
        let hasher = match parent {
            Some(parent) => parent.hasher,
            None => self.hasher_for(event)?,
        };
        if self.known.len() + blocks > self.config.max_blocks {
            self.clear();
            return Err(EngineSkip::Overflow);
        }
        let lora = event.lora_name.as_deref().filter(|n| !n.is_empty());
        let block_hasher = &self.hashers[hasher as usize].2;
        let with_media = event.extra_keys.as_ref().is_some_and(|keys| {
            keys.iter()
                .flatten()
                .flatten()
                .any(|key| is_media(key, lora))
        });
        self.block_hashes.clear();
        let mut infos: Vec<Option<BlockExtraInfo>> = Vec::new();
        if with_media {
            let keys = event.extra_keys.as_deref().unwrap_or_default();
            for (window, keys) in event.token_ids.chunks_exact(block_size).zip(keys) {
                self.media.clear();
                for key in keys.iter().flatten() {
                    if let Some(id) = media_of(key, lora) {
                        // A block holds each media object once, as on the request side.
                        if !self.media.contains(&id) {
                            self.media.push(id);
                        }
                    }
                }
                self.block_hashes
                    .push(block_hasher.hash_block(window, &self.media));
                infos.push((!self.media.is_empty()).then(|| {
                    BlockExtraInfo {
                        mm_objects: self
                            .media
                            .iter()
                            .map(|&mm_hash| BlockMmObjectInfo {
                                mm_hash,
                                offsets: Vec::new(),
                            })
                            .collect(),
                    }
                }));
            }
        } else {
            block_hasher.block_hashes_into(&event.token_ids, &NoMedia, &mut self.block_hashes);
        }
        let mut chain = parent.map(|p| p.sequence);
        let mut out = Vec::with_capacity(blocks);
        let mut infos = infos.into_iter();
        let hashed = std::mem::take(&mut self.block_hashes);
        for (&engine, &block) in event.block_hashes.iter().zip(&hashed) {
            let sequence = sequence_hash(chain, block);
            chain = Some(sequence);
            let previous = self.known.insert(engine, Known { sequence, hasher });
            if previous.map(|p| p.sequence) != Some(sequence) {
                if let Some(previous) = previous {
                    self.release(previous.sequence);
                }
                *self.refs.entry(sequence).or_insert(0) += 1;
            }
            out.push(KvCacheStoredBlockData {
                block_hash: sequence,
                tokens_hash: block,
                mm_extra_info: infos.next().flatten(),
            });
        }
        self.block_hashes = hashed;
        Ok(KvCacheStoreData {
            parent_hash: parent.map(|p| p.sequence),
            start_position: None,
            blocks: out,
        })
    }

    fn removed(&mut self, event: &EngineRemoved) -> Result<KvCacheRemoveData, EngineSkip> {
        self.check_tier(event.medium.as_deref(), event.group_idx)?;
        let mut block_hashes = Vec::with_capacity(event.block_hashes.len());
        for engine in &event.block_hashes {
            if let Some(known) = self.known.remove(engine) {
                if self.release(known.sequence) {
                    block_hashes.push(known.sequence);
                }
            }
        }
        Ok(KvCacheRemoveData { block_hashes })
    }

    /// Drops one engine block's claim on `sequence`; true when it was the last.
    fn release(&mut self, sequence: SequenceHash) -> bool {
        match self.refs.entry(sequence) {
            Entry::Occupied(mut count) if *count.get() > 1 => {
                *count.get_mut() -= 1;
                false
            }
            Entry::Occupied(count) => {
                count.remove();
                true
            }
            Entry::Vacant(_) => false,
        }
    }

    /// The hasher of a sequence start: its LoRA, and the namespace its first block's
    /// `extra_keys` (vLLM) or its `cache_salt` (SGLang) carries.
    fn hasher_for(&mut self, event: &EngineStored) -> Result<u32, EngineSkip> {
        let lora = event.lora_name.clone().filter(|n| !n.is_empty());
        // SGLang's own field: taken whole, as Dynamo does, or without the tag a router put on.
        let namespace = event
            .cache_salt
            .as_deref()
            .map(|salt| salt.strip_prefix(CACHE_SALT_PREFIX).unwrap_or(salt))
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .or_else(|| cache_namespace(event, lora.as_deref()).map(str::to_owned));
        if lora.is_none() && namespace.is_none() {
            return Ok(0);
        }
        if let Some(i) = self
            .hashers
            .iter()
            .position(|(l, n, _)| *l == lora && *n == namespace)
        {
            return Ok(i as u32);
        }
        if self.hashers.len() >= MAX_HASHERS {
            self.clear();
            return Err(EngineSkip::Overflow);
        }
        let mut builder = BlockHasher::builder(self.config.block_size);
        if let Some(lora) = &lora {
            builder = builder.lora_name(lora);
        }
        if let Some(namespace) = &namespace {
            builder = builder.cache_namespace(namespace);
        }
        // The block size was accepted when the plain hasher was built.
        let hasher = builder
            .build()
            .map_err(|_| EngineSkip::Inconsistent("block size"))?;
        self.hashers.push((lora, namespace, hasher));
        Ok(self.hashers.len() as u32 - 1)
    }
}

/// Dynamo 1.7's rule: in the first block's `extra_keys`, the first bare string equal to the
/// LoRA name is the LoRA; a bare string with [`CACHE_SALT_PREFIX`] names the namespace; any
/// other bare string (an untagged salt, a legacy identifier) is no namespace.
fn cache_namespace<'a>(event: &'a EngineStored, lora: Option<&str>) -> Option<&'a str> {
    let first = event.extra_keys.as_ref()?.first()?.as_ref()?;
    let mut unmatched_lora = lora;
    first.iter().find_map(|key| {
        let ExtraKey::Str(value) = key else {
            return None;
        };
        if unmatched_lora == Some(value.as_str()) {
            unmatched_lora = None;
            return None;
        }
        value
            .strip_prefix(CACHE_SALT_PREFIX)
            .filter(|namespace| !namespace.is_empty())
    })
}

/// The media id an `extra_keys` entry names, as Dynamo 1.7 reads it: `[identifier, offset]`
/// always names one; a bare string (vLLM 0.18) only when it is a 64-hex-digit identifier and
/// not the LoRA name.
fn media_of(key: &ExtraKey, lora: Option<&str>) -> Option<MediaId> {
    match key {
        ExtraKey::Media(identifier, _) => media_id_from_identifier(identifier),
        ExtraKey::Str(s) if Some(s.as_str()) == lora => None,
        ExtraKey::Str(s) if s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit()) => {
            media_id_from_identifier(s)
        }
        ExtraKey::Str(_) | ExtraKey::Bytes(_) | ExtraKey::Other => None,
    }
}

fn is_media(key: &ExtraKey, lora: Option<&str>) -> bool {
    media_of(key, lora).is_some()
}
