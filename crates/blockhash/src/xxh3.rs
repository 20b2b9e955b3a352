//! Seeded XXH3-64 with everything that depends on the seed computed once per hasher.
//!
//! Bit-exact with `xxhash_rust::xxh3::xxh3_64_with_seed`, the function Dynamo calls (checked
//! over every length up to 1 KiB and random seeds and inputs by tests). Where the time goes:
//!
//! * 17 to 240 bytes (blocks of 5 to 60 tokens): the reference adds the seed to every secret
//!   word on every call; here the mixed words are computed once per hasher.
//! * over 240 bytes (blocks of 61 tokens and more): the reference derives a 192-byte secret
//!   from the seed on every call and runs the baseline-SSE2 build of its loop; here the secret
//!   is derived once and twox-hash runs the loop, with AVX2 when the CPU has it.
//! * up to 16 bytes: the reference itself.

use twox_hash::XxHash3_64;
use xxhash_rust::const_xxh3::const_custom_default_secret;
use xxhash_rust::xxh3::xxh3_64_with_seed;

const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME_MX1: u64 = 0x1656_6791_9E37_79F9;
/// Inputs up to this length hash with the seed and the default secret; longer ones with a
/// secret derived from the seed.
const MID_SIZE_MAX: usize = 240;
/// Byte offset into the secret of the second half of the 129..=240 rounds.
const MID_SIZE_START_OFFSET: usize = 3;
/// Byte offset into the secret of the 129..=240 path's last 16 input bytes (136 - 17).
const MID_SIZE_LAST_OFFSET: usize = 119;

/// XXH3-64 for one seed.
#[derive(Clone)]
pub(crate) struct SeededXxh3 {
    seed: u64,
    /// Secret words 0..16 (bytes 0..128), the seed added to even and subtracted from odd ones:
    /// the keys of the 17..=128 path and of the first 8 rounds of the 129..=240 path.
    keys: [u64; 16],
    /// Keys of rounds 8..15 of the 129..=240 path (secret bytes 3..115).
    late_keys: [u64; 14],
    /// Keys of the 129..=240 path's last 16 input bytes (secret bytes 119..135).
    last_keys: [u64; 2],
    /// The secret for inputs longer than [`MID_SIZE_MAX`].
    secret: [u8; 192],
}

impl SeededXxh3 {
    pub(crate) fn new(seed: u64) -> Self {
        let default = const_custom_default_secret(0);
        let key = |offset: usize, word: usize| {
            let raw = read64(&default, offset + 8 * word);
            if word.is_multiple_of(2) {
                raw.wrapping_add(seed)
            } else {
                raw.wrapping_sub(seed)
            }
        };
        Self {
            seed,
            keys: std::array::from_fn(|w| key(0, w)),
            late_keys: std::array::from_fn(|w| key(MID_SIZE_START_OFFSET, w)),
            last_keys: std::array::from_fn(|w| key(MID_SIZE_LAST_OFFSET, w)),
            secret: const_custom_default_secret(seed),
        }
    }

    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    #[inline(always)]
    pub(crate) fn hash(&self, input: &[u8]) -> u64 {
        match input.len() {
            0..=16 => xxh3_64_with_seed(input, self.seed),
            17..=128 => self.hash_17_to_128(input),
            129..=MID_SIZE_MAX => self.hash_129_to_240(input),
            _ => self.hash_long(input),
        }
    }

    /// Long inputs go to twox-hash, which picks AVX2 at run time where the CPU has it (the
    /// reference is compiled for the baseline SSE2), with the secret derived once.
    #[inline(never)]
    fn hash_long(&self, input: &[u8]) -> u64 {
        // The only error is a secret shorter than XXH3's minimum of 136 bytes; ours has 192.
        XxHash3_64::oneshot_with_secret(&self.secret, input)
            .unwrap_or_else(|_| xxh3_64_with_seed(input, self.seed))
    }

    #[inline(always)]
    fn hash_17_to_128(&self, input: &[u8]) -> u64 {
        let len = input.len();
        let k = &self.keys;
        let mut acc = (len as u64).wrapping_mul(PRIME64_1);
        if len > 32 {
            if len > 64 {
                if len > 96 {
                    acc = acc.wrapping_add(mix16(input, 48, k[12], k[13]));
                    acc = acc.wrapping_add(mix16(input, len - 64, k[14], k[15]));
                }
                acc = acc.wrapping_add(mix16(input, 32, k[8], k[9]));
                acc = acc.wrapping_add(mix16(input, len - 48, k[10], k[11]));
            }
            acc = acc.wrapping_add(mix16(input, 16, k[4], k[5]));
            acc = acc.wrapping_add(mix16(input, len - 32, k[6], k[7]));
        }
        acc = acc.wrapping_add(mix16(input, 0, k[0], k[1]));
        acc = acc.wrapping_add(mix16(input, len - 16, k[2], k[3]));
        avalanche(acc)
    }

    #[inline(always)]
    fn hash_129_to_240(&self, input: &[u8]) -> u64 {
        let len = input.len();
        let mut acc = (len as u64).wrapping_mul(PRIME64_1);
        for round in 0..8 {
            let (lo, hi) = (self.keys[2 * round], self.keys[2 * round + 1]);
            acc = acc.wrapping_add(mix16(input, 16 * round, lo, hi));
        }
        let mut acc_end = mix16(input, len - 16, self.last_keys[0], self.last_keys[1]);
        acc = avalanche(acc);
        for round in 8..len / 16 {
            let (lo, hi) = (
                self.late_keys[2 * (round - 8)],
                self.late_keys[2 * (round - 8) + 1],
            );
            acc_end = acc_end.wrapping_add(mix16(input, 16 * round, lo, hi));
        }
        avalanche(acc.wrapping_add(acc_end))
    }
}

#[inline(always)]
fn read64(bytes: &[u8], offset: usize) -> u64 {
    let mut word = [0u8; 8];
    word.copy_from_slice(&bytes[offset..offset + 8]);
    u64::from_le_bytes(word)
}

#[inline(always)]
fn mix16(input: &[u8], offset: usize, key_lo: u64, key_hi: u64) -> u64 {
    let product =
        u128::from(read64(input, offset) ^ key_lo) * u128::from(read64(input, offset + 8) ^ key_hi);
    (product as u64) ^ ((product >> 64) as u64)
}

#[inline(always)]
fn avalanche(mut h: u64) -> u64 {
    h ^= h >> 37;
    h = h.wrapping_mul(PRIME_MX1);
    h ^ (h >> 32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_length_up_to_1k_matches_the_reference() {
        let data: Vec<u8> = (0..1024u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        for seed in [
            0,
            1,
            1337,
            1337u64.wrapping_add(0xDEAD_BEEF_0000_0001),
            u64::MAX,
        ] {
            let hasher = SeededXxh3::new(seed);
            for len in 0..=data.len() {
                assert_eq!(
                    hasher.hash(&data[..len]),
                    xxh3_64_with_seed(&data[..len], seed),
                    "seed {seed}, length {len}"
                );
            }
        }
    }

    proptest! {
        #[test]
        fn random_inputs_and_seeds_match_the_reference(
            seed in any::<u64>(), data in prop::collection::vec(any::<u8>(), 0..600),
        ) {
            prop_assert_eq!(SeededXxh3::new(seed).hash(&data), xxh3_64_with_seed(&data, seed));
        }
    }
}
