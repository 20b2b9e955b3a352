//! Identifier and hash newtypes.
//!
//! Every value that crosses a crate boundary gets its own type so a block hash can never be
//! passed where a sequence hash is expected (the two are easy to confuse: Dynamo's wire names
//! them `tokens_hash` and `block_hash`). All of them serialize as bare JSON numbers, exactly as
//! Dynamo writes them, and parse as integers (never through `f64`, which would corrupt values
//! above 2^53).

use serde::{Deserialize, Serialize};
use std::fmt;

macro_rules! id_newtype {
    ($(#[$meta:meta])* $name:ident($inner:ty)) => {
        $(#[$meta])*
        #[derive(
            Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub $inner);

        impl $name {
            /// The raw integer value.
            #[inline]
            pub const fn get(self) -> $inner {
                self.0
            }
        }

        impl From<$inner> for $name {
            #[inline]
            fn from(value: $inner) -> Self {
                Self(value)
            }
        }

        impl From<$name> for $inner {
            #[inline]
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(&self.0, f)
            }
        }
    };
}

id_newtype!(
    /// A worker (engine instance) as Dynamo numbers it.
    WorkerId(u64)
);
id_newtype!(
    /// A data-parallel rank inside a worker. Each rank has its own KV cache.
    DpRank(u32)
);
id_newtype!(
    /// The hash of one block's content: its tokens, its media ids and the seed (LoRA adapter,
    /// cache namespace). Position independent. Dynamo calls it `LocalBlockHash` and
    /// `tokens_hash` on the wire.
    ///
    /// `#[repr(transparent)]`: a `&[u64]` of block hashes is viewed as `&[BlockHash]` without a
    /// copy ([`BlockHash::from_raw_slice`]).
    #[repr(transparent)]
    #[derive(bytemuck::TransparentWrapper)]
    BlockHash(u64)
);
id_newtype!(
    /// The hash of a block together with everything before it: the radix index key. Dynamo
    /// calls it `ExternalSequenceBlockHash` and `block_hash` on the wire.
    ///
    /// `#[repr(transparent)]`: a `&[u64]` of sequence hashes is viewed as `&[SequenceHash]`
    /// without a copy, and back:
    ///
    /// ```
    /// use kvroute_protocol::SequenceHash;
    ///
    /// let raw: &[u64] = &[7, 8];
    /// let hashes: &[SequenceHash] = SequenceHash::from_raw_slice(raw);
    /// assert_eq!(hashes[1], SequenceHash(8));
    /// assert_eq!(SequenceHash::as_raw_slice(hashes), raw);
    /// ```
    #[repr(transparent)]
    #[derive(bytemuck::TransparentWrapper)]
    SequenceHash(u64)
);
macro_rules! raw_slices {
    ($($name:ident),*) => {$(
        impl $name {
            /// Views raw hashes as this type, without a copy.
            #[inline]
            pub fn from_raw_slice(raw: &[u64]) -> &[Self] {
                <Self as bytemuck::TransparentWrapper<u64>>::wrap_slice(raw)
            }

            /// Views these hashes as raw integers, without a copy.
            #[inline]
            pub fn as_raw_slice(hashes: &[Self]) -> &[u64] {
                <Self as bytemuck::TransparentWrapper<u64>>::peel_slice(hashes)
            }
        }
    )*};
}
raw_slices!(BlockHash, SequenceHash);

id_newtype!(
    /// The identity of one media object (an image), as carried in `mm_hash`.
    MediaId(u64)
);

/// Where one media object sits in a request's token sequence: `len` tokens from `start`.
///
/// A block "contains" a media object when their token ranges intersect, which is how Dynamo
/// builds per-block media info from request-level spans.
///
/// ```
/// use kvroute_protocol::{MediaId, MediaSpan};
///
/// let image = MediaSpan::new(10, 20, MediaId(7));
/// assert!(image.touches(0..16));
/// assert!(image.touches(16..32));
/// assert!(!image.touches(32..48));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct MediaSpan {
    /// Offset of the first token of the media object.
    pub start: usize,
    /// Number of tokens the media object occupies.
    pub len: usize,
    /// The media object's identity.
    pub id: MediaId,
}

impl MediaSpan {
    /// A span of `len` tokens starting at `start`.
    pub const fn new(start: usize, len: usize, id: MediaId) -> Self {
        Self { start, len, id }
    }

    /// One past the last token of the span (saturating, so a hostile span cannot wrap).
    #[inline]
    pub const fn end(&self) -> usize {
        self.start.saturating_add(self.len)
    }

    /// Whether the span shares at least one token with the half-open range `tokens`.
    #[inline]
    pub fn touches(&self, tokens: std::ops::Range<usize>) -> bool {
        self.len > 0 && self.start < tokens.end && self.end() > tokens.start
    }
}
