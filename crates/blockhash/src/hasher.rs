//! The block hasher: one per (block size, LoRA, namespace, Eagle), shared by every request.

use crate::media::BlockMedia;
use crate::sequence::sequence_hash;
use crate::xxh3::SeededXxh3;
use crate::{HashError, BASE_SEED};
use kvroute_protocol::{BlockHash, MediaId, SequenceHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// Salt for LoRA adapter names and cache namespaces: each is hashed with its own inner seed and
/// added (wrapping) to [`BASE_SEED`].
const LORA_SALT_SEED: u64 = 0;
const NAMESPACE_SALT_SEED: u64 = 1;

/// One hashed block: its content hash and its position-dependent sequence hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct HashedBlock {
    /// Content of the block alone (Dynamo's `tokens_hash`).
    pub block: BlockHash,
    /// The block and everything before it (Dynamo's `block_hash`, the radix key).
    pub sequence: SequenceHash,
}

/// Configures a [`BlockHasher`]: LoRA adapter, cache namespace, Eagle windows.
///
/// ```
/// use kvroute_blockhash::BlockHasher;
///
/// let hasher = BlockHasher::builder(16).lora_name("my-lora").build()?;
/// let tokens: Vec<u32> = (0..16).collect();
/// assert_eq!(hasher.block_hashes(&tokens, &kvroute_blockhash::NoMedia)[0].get(), 7774427462321301335);
/// # Ok::<(), kvroute_blockhash::HashError>(())
/// ```
#[derive(Clone, Debug)]
#[must_use]
pub struct BlockHasherBuilder {
    block_size: u32,
    seed: u64,
    eagle: bool,
}

impl BlockHasherBuilder {
    /// Salts every block hash with a LoRA adapter name. An empty name means no adapter.
    pub fn lora_name(mut self, name: &str) -> Self {
        if !name.is_empty() {
            self.seed = self
                .seed
                .wrapping_add(xxh3_64_with_seed(name.as_bytes(), LORA_SALT_SEED));
        }
        self
    }

    /// Salts every block hash with a cache namespace (tenant isolation). Empty means none.
    pub fn cache_namespace(mut self, namespace: &str) -> Self {
        if !namespace.is_empty() {
            self.seed = self
                .seed
                .wrapping_add(xxh3_64_with_seed(namespace.as_bytes(), NAMESPACE_SALT_SEED));
        }
        self
    }

    /// Eagle speculative decoding: block `i` hashes the `block_size + 1` tokens from
    /// `i * block_size`, so a block is complete only once the next block's first token exists.
    pub fn eagle(mut self, eagle: bool) -> Self {
        self.eagle = eagle;
        self
    }

    /// Builds the hasher, deriving its XXH3 secret once.
    pub fn build(self) -> Result<BlockHasher, HashError> {
        if self.block_size == 0 {
            return Err(HashError::ZeroBlockSize);
        }
        Ok(BlockHasher {
            block_size: self.block_size,
            eagle: self.eagle,
            xxh3: SeededXxh3::new(self.seed),
        })
    }
}

/// Hashes token sequences into Dynamo-compatible block and sequence hashes.
///
/// Cheap to clone (no heap data) and `Sync`: build one per configuration and share it.
///
/// ```
/// use kvroute_blockhash::{BlockHasher, MediaId, MediaSpan};
///
/// let hasher = BlockHasher::new(16)?;
/// let tokens: Vec<u32> = (0..32).collect();
/// // An image whose placeholder tokens sit at positions 4..8 belongs to block 0 only.
/// let image = [MediaSpan::new(4, 4, MediaId(0xDEADBEEF))];
/// let blocks = hasher.block_hashes(&tokens, &image[..]);
/// assert_eq!(blocks[0].get(), 10080518416733111448);
/// assert_eq!(blocks[1].get(), 15292316782987903195);
/// # Ok::<(), kvroute_blockhash::HashError>(())
/// ```
#[derive(Clone)]
pub struct BlockHasher {
    block_size: u32,
    eagle: bool,
    xxh3: SeededXxh3,
}

impl std::fmt::Debug for BlockHasher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockHasher")
            .field("block_size", &self.block_size)
            .field("eagle", &self.eagle)
            .field("seed", &self.seed())
            .finish_non_exhaustive()
    }
}

impl BlockHasher {
    /// A hasher for plain blocks of `block_size` tokens (no LoRA, no namespace, no Eagle).
    pub fn new(block_size: u32) -> Result<Self, HashError> {
        Self::builder(block_size).build()
    }

    /// Starts configuring a hasher for blocks of `block_size` tokens.
    pub fn builder(block_size: u32) -> BlockHasherBuilder {
        BlockHasherBuilder {
            block_size,
            seed: BASE_SEED,
            eagle: false,
        }
    }

    /// Tokens per block.
    pub fn block_size(&self) -> u32 {
        self.block_size
    }

    /// Whether blocks are hashed as Eagle windows of `block_size + 1` tokens.
    pub fn is_eagle(&self) -> bool {
        self.eagle
    }

    /// The XXH3 seed of block hashes: [`BASE_SEED`] plus the LoRA and namespace salts.
    pub fn seed(&self) -> u64 {
        self.xxh3.seed()
    }

    /// Tokens hashed per block: `block_size`, or `block_size + 1` in Eagle mode.
    pub fn window_len(&self) -> usize {
        self.block_size as usize + usize::from(self.eagle)
    }

    /// How many complete blocks `token_count` tokens make (a trailing partial block has none).
    pub fn block_count(&self, token_count: usize) -> usize {
        let tokens = if self.eagle {
            token_count.saturating_sub(1)
        } else {
            token_count
        };
        tokens / self.block_size as usize
    }

    /// Hashes one block: `window` is its tokens ([`Self::window_len`] of them for a block of a
    /// sequence) and `media` the ids of the media objects it contains, in any order.
    pub fn hash_block(&self, window: &[u32], media: &[MediaId]) -> BlockHash {
        let mut scratch = Scratch::default();
        scratch.media.extend_from_slice(media);
        self.hash_window(window, &mut scratch)
    }

    /// Appends the block hash of every complete block of `tokens` to `out`.
    pub fn block_hashes_into<M: BlockMedia + ?Sized>(
        &self,
        tokens: &[u32],
        media: &M,
        out: &mut Vec<BlockHash>,
    ) {
        self.extend_blocks(tokens, 0, media, &mut Scratch::default(), out, |block| {
            block
        });
    }

    /// Appends the sequence hash of every complete block of `tokens` to `out`: what an index
    /// lookup needs.
    pub fn sequence_hashes_into<M: BlockMedia + ?Sized>(
        &self,
        tokens: &[u32],
        media: &M,
        out: &mut Vec<SequenceHash>,
    ) {
        let mut parent = None;
        self.extend_blocks(tokens, 0, media, &mut Scratch::default(), out, |block| {
            let sequence = sequence_hash(parent, block);
            parent = Some(sequence);
            sequence
        });
    }

    /// Appends both hashes of every complete block of `tokens` to `out`: what a KV event needs.
    pub fn hash_sequence_into<M: BlockMedia + ?Sized>(
        &self,
        tokens: &[u32],
        media: &M,
        out: &mut Vec<HashedBlock>,
    ) {
        let mut parent = None;
        self.extend_blocks(tokens, 0, media, &mut Scratch::default(), out, |block| {
            let sequence = sequence_hash(parent, block);
            parent = Some(sequence);
            HashedBlock { block, sequence }
        });
    }

    /// The block hashes of `tokens`, in a new vector.
    pub fn block_hashes<M: BlockMedia + ?Sized>(
        &self,
        tokens: &[u32],
        media: &M,
    ) -> Vec<BlockHash> {
        let mut out = Vec::new();
        self.block_hashes_into(tokens, media, &mut out);
        out
    }

    /// Both hashes of every block of `tokens`, in a new vector.
    pub fn hash_sequence<M: BlockMedia + ?Sized>(
        &self,
        tokens: &[u32],
        media: &M,
    ) -> Vec<HashedBlock> {
        let mut out = Vec::new();
        self.hash_sequence_into(tokens, media, &mut out);
        out
    }

    /// Hashes every complete window of `tokens`, whose first token is block `first_block`'s
    /// first token, appends `finish(block hash)` for each to `out` in order, and returns how
    /// many tokens the hashed blocks advanced over.
    #[inline]
    pub(crate) fn extend_blocks<M: BlockMedia + ?Sized, T>(
        &self,
        tokens: &[u32],
        first_block: usize,
        media: &M,
        scratch: &mut Scratch,
        out: &mut Vec<T>,
        mut finish: impl FnMut(BlockHash) -> T,
    ) -> usize {
        #[cfg(target_endian = "little")]
        if !self.eagle && media.is_text_only() {
            return self.extend_text_blocks(tokens, out, finish);
        }
        out.reserve(self.block_count(tokens.len()));
        let stride = self.block_size as usize;
        let window_len = self.window_len();
        let mut start = 0;
        let mut index = first_block;
        while start + window_len <= tokens.len() {
            let block_start = index * stride;
            media.block_media(index, block_start..block_start + stride, &mut scratch.media);
            out.push(finish(
                self.hash_window(&tokens[start..start + window_len], scratch),
            ));
            start += stride;
            index += 1;
        }
        start
    }

    /// Text-only blocks, hashed straight from the token slice. The common block sizes get a
    /// loop of their own, so the block length is a constant and XXH3's length dispatch and
    /// bounds checks fold away; `extend` over an exact-size iterator writes without a capacity
    /// check per block.
    #[cfg(target_endian = "little")]
    #[inline]
    fn extend_text_blocks<T>(
        &self,
        tokens: &[u32],
        out: &mut Vec<T>,
        finish: impl FnMut(BlockHash) -> T,
    ) -> usize {
        match self.block_size {
            16 => self.extend_fixed_blocks::<16, T>(tokens, out, finish),
            32 => self.extend_fixed_blocks::<32, T>(tokens, out, finish),
            64 => self.extend_fixed_blocks::<64, T>(tokens, out, finish),
            128 => self.extend_fixed_blocks::<128, T>(tokens, out, finish),
            block_size => {
                let blocks = tokens.chunks_exact(block_size as usize);
                let consumed = tokens.len() - blocks.remainder().len();
                out.extend(
                    blocks
                        .map(|block| BlockHash(self.xxh3.hash(bytemuck::cast_slice(block))))
                        .map(finish),
                );
                consumed
            }
        }
    }

    #[cfg(target_endian = "little")]
    #[inline]
    fn extend_fixed_blocks<const B: usize, T>(
        &self,
        tokens: &[u32],
        out: &mut Vec<T>,
        finish: impl FnMut(BlockHash) -> T,
    ) -> usize {
        let (blocks, _) = tokens.as_chunks::<B>();
        out.extend(
            blocks
                .iter()
                .map(|block| BlockHash(self.xxh3.hash(bytemuck::cast_slice(block.as_slice()))))
                .map(finish),
        );
        blocks.len() * B
    }

    /// Hashes one window with the media ids collected in `scratch.media` (which it empties).
    #[inline]
    pub(crate) fn hash_window(&self, window: &[u32], scratch: &mut Scratch) -> BlockHash {
        if scratch.media.is_empty() {
            #[cfg(target_endian = "little")]
            return BlockHash(self.xxh3.hash(bytemuck::cast_slice(window)));
        }
        scratch.media.sort_unstable();
        let bytes = &mut scratch.bytes;
        bytes.clear();
        #[cfg(target_endian = "little")]
        bytes.extend_from_slice(bytemuck::cast_slice(window));
        #[cfg(not(target_endian = "little"))]
        for token in window {
            bytes.extend_from_slice(&token.to_le_bytes());
        }
        for id in &scratch.media {
            bytes.extend_from_slice(&id.0.to_le_bytes());
        }
        scratch.media.clear();
        BlockHash(self.xxh3.hash(bytes))
    }
}

/// Reusable buffers for blocks with media; empty (and unallocated) for text-only sequences.
#[derive(Default, Debug, Clone)]
pub(crate) struct Scratch {
    pub(crate) media: Vec<MediaId>,
    pub(crate) bytes: Vec<u8>,
}
