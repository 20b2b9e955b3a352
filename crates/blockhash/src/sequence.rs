//! Sequence hashes: chaining blocks, one-shot or incrementally as tokens arrive.

use crate::hasher::{BlockHasher, HashedBlock, Scratch};
use crate::media::BlockMedia;
use crate::BASE_SEED;
use kvroute_protocol::{BlockHash, SequenceHash};
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The sequence hash of `block` after `parent` (`None` for the first block of a sequence).
///
/// `seq[0] = block[0]`, `seq[i] = XXH3-64(seed 1337, le64(seq[i-1]) || le64(block[i]))`. The
/// chain seed is always 1337: LoRA and namespace enter through the block hashes only.
///
/// ```
/// use kvroute_blockhash::{sequence_hash, BlockHash, SequenceHash};
///
/// let first = sequence_hash(None, BlockHash(15310707395893867146));
/// assert_eq!(first, SequenceHash(15310707395893867146));
/// let second = sequence_hash(Some(first), BlockHash(15292316782987903195));
/// assert_eq!(second, SequenceHash(13769157705258532664));
/// ```
#[inline]
pub fn sequence_hash(parent: Option<SequenceHash>, block: BlockHash) -> SequenceHash {
    match parent {
        None => SequenceHash(block.0),
        Some(parent) => {
            let mut bytes = [0u8; 16];
            bytes[..8].copy_from_slice(&parent.0.to_le_bytes());
            bytes[8..].copy_from_slice(&block.0.to_le_bytes());
            SequenceHash(xxh3_64_with_seed(&bytes, BASE_SEED))
        }
    }
}

/// Appends the sequence hashes of `blocks`, chained after `parent`, to `out`.
pub fn sequence_hashes_into(
    parent: Option<SequenceHash>,
    blocks: &[BlockHash],
    out: &mut Vec<SequenceHash>,
) {
    out.reserve(blocks.len());
    let mut parent = parent;
    for &block in blocks {
        let sequence = sequence_hash(parent, block);
        parent = Some(sequence);
        out.push(sequence);
    }
}

/// Chains `block` after `last`, counting it.
#[inline]
fn chain(last: &mut Option<SequenceHash>, blocks: &mut usize, block: BlockHash) -> HashedBlock {
    let sequence = sequence_hash(*last, block);
    *last = Some(sequence);
    *blocks += 1;
    HashedBlock { block, sequence }
}

/// Hashes a sequence incrementally: feed tokens as they arrive (prompt, then decoded tokens)
/// and get each block's hashes once the block is complete, without rehashing earlier blocks.
///
/// Produces exactly what [`BlockHasher::hash_sequence_into`] produces for the concatenation of
/// everything fed so far.
///
/// ```
/// use kvroute_blockhash::{BlockHasher, NoMedia, SequenceHasher};
///
/// let hasher = BlockHasher::new(16)?;
/// let tokens: Vec<u32> = (0..48).collect();
/// let mut incremental = SequenceHasher::new(hasher.clone());
/// let mut blocks = Vec::new();
/// incremental.extend(&tokens[..20], &NoMedia, &mut blocks); // one full block, 4 pending
/// incremental.extend(&tokens[20..], &NoMedia, &mut blocks); // two more
/// assert_eq!(blocks, hasher.hash_sequence(&tokens, &NoMedia));
/// assert_eq!(incremental.token_count(), 48);
/// # Ok::<(), kvroute_blockhash::HashError>(())
/// ```
#[derive(Clone, Debug)]
pub struct SequenceHasher {
    hasher: BlockHasher,
    /// Tokens from the start of the first incomplete block, always fewer than a window.
    pending: Vec<u32>,
    blocks: usize,
    last: Option<SequenceHash>,
    scratch: Scratch,
}

impl SequenceHasher {
    /// Starts an empty sequence.
    pub fn new(hasher: BlockHasher) -> Self {
        let pending = Vec::with_capacity(hasher.window_len());
        Self {
            hasher,
            pending,
            blocks: 0,
            last: None,
            scratch: Scratch::default(),
        }
    }

    /// Feeds `tokens` (which follow everything fed before) and appends every block they
    /// complete to `out`. `media` is asked about blocks by their index in the whole sequence.
    pub fn extend<M: BlockMedia + ?Sized>(
        &mut self,
        tokens: &[u32],
        media: &M,
        out: &mut Vec<HashedBlock>,
    ) {
        let stride = self.hasher.block_size() as usize;
        let window_len = self.hasher.window_len();
        let mut rest = tokens;

        if !self.pending.is_empty() {
            let missing = window_len - self.pending.len();
            if rest.len() < missing {
                self.pending.extend_from_slice(rest);
                return;
            }
            self.pending.extend_from_slice(&rest[..missing]);
            let block_start = self.blocks * stride;
            media.block_media(
                self.blocks,
                block_start..block_start + stride,
                &mut self.scratch.media,
            );
            let block = self.hasher.hash_window(&self.pending, &mut self.scratch);
            out.push(chain(&mut self.last, &mut self.blocks, block));
            // The next block starts `stride` tokens into this window; in Eagle mode its first
            // token was the last one of this window.
            rest = &rest[missing - (window_len - stride)..];
            self.pending.clear();
        }

        let Self {
            hasher,
            blocks,
            last,
            scratch,
            ..
        } = self;
        let first_block = *blocks;
        let consumed = hasher.extend_blocks(rest, first_block, media, scratch, out, |block| {
            chain(last, blocks, block)
        });
        self.pending.extend_from_slice(&rest[consumed..]);
    }

    /// Complete blocks hashed so far.
    pub fn block_count(&self) -> usize {
        self.blocks
    }

    /// Tokens fed so far.
    pub fn token_count(&self) -> usize {
        self.blocks * self.hasher.block_size() as usize + self.pending.len()
    }

    /// The sequence hash of the last complete block, the parent of the next one.
    pub fn last_sequence_hash(&self) -> Option<SequenceHash> {
        self.last
    }

    /// The hasher this sequence uses.
    pub fn hasher(&self) -> &BlockHasher {
        &self.hasher
    }
}
