//! Dynamo-compatible KV block hashing.
//!
//! This crate turns a token sequence (plus the media objects inside it, a LoRA adapter name and
//! a cache namespace) into the two hashes a KV-aware router needs:
//!
//! * a [`BlockHash`] per full block: XXH3-64 over the block's tokens as `u32` little-endian,
//!   followed by the block's media ids sorted ascending as `u64` little-endian, seeded with
//!   `1337` plus the LoRA and namespace salts;
//! * a [`SequenceHash`] per block, chaining every earlier block: the radix index key.
//!
//! Both are bit-exact with NVIDIA Dynamo 1.6 (`compute_block_hash_for_seq` and
//! `compute_seq_hash_for_block`), pinned by golden vectors produced by Dynamo itself.
//!
//! It owns hashing only: where media sit in the token sequence comes from `kvroute-mmhash`
//! (as [`MediaSpan`]s), what to do with the hashes from `kvroute-index`.
//!
//! # Example
//!
//! ```
//! use kvroute_blockhash::{BlockHasher, NoMedia};
//!
//! let hasher = BlockHasher::new(16)?;
//! let tokens: Vec<u32> = (0..48).collect();
//! let hashes = hasher.hash_sequence(&tokens, &NoMedia);
//! assert_eq!(hashes.len(), 3);
//! assert_eq!(hashes[0].block.get(), 15310707395893867146);
//! assert_eq!(hashes[2].sequence.get(), 11879827756109914528);
//! # Ok::<(), kvroute_blockhash::HashError>(())
//! ```
//!
//! # Hot path
//!
//! [`BlockHasher`] is built once per (block size, LoRA, namespace, Eagle) and shared: hashing
//! takes `&self`, writes into caller-provided buffers and never allocates per block. It derives
//! the XXH3 secret for its seed once, where the plain seeded XXH3 entry point re-derives it on
//! every input longer than 240 bytes (every block of 64 tokens or more). [`SequenceHasher`]
//! extends a sequence as tokens arrive without rehashing earlier blocks.

mod hasher;
mod media;
mod sequence;
mod xxh3;

pub use hasher::{BlockHasher, BlockHasherBuilder, HashedBlock};
pub use kvroute_protocol::{BlockHash, MediaId, MediaSpan, SequenceHash};
pub use media::{media_id_from_identifier, BlockMedia, NoMedia};
pub use sequence::{sequence_hash, sequence_hashes_into, SequenceHasher};

/// The XXH3 seed of every Dynamo block and sequence hash before LoRA and namespace salts.
pub const BASE_SEED: u64 = 1337;

/// Inputs Dynamo refuses to hash.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HashError {
    /// A block size of zero tokens (Dynamo: `kv_block_size cannot be 0`).
    #[error("block size must be at least 1 token, got 0")]
    ZeroBlockSize,
}
