//! Properties of block hashing against a deliberately naive reference written from the
//! specification (tests/fixtures/vectors/README.md), with no shared code.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::{BlockHasher, HashedBlock, MediaId, MediaSpan, SequenceHasher};
use proptest::prelude::*;
use xxhash_rust::xxh3::xxh3_64_with_seed;

#[derive(Debug, Clone)]
struct Input {
    tokens: Vec<u32>,
    block_size: u32,
    spans: Vec<MediaSpan>,
    lora: String,
    namespace: String,
    eagle: bool,
}

fn input() -> impl Strategy<Value = Input> {
    (1u32..=80, 0usize..400).prop_flat_map(|(block_size, len)| {
        let span = (0..len.max(1), 0usize..100, 0u64..6).prop_map(|(start, len, id)| {
            MediaSpan::new(start, len, MediaId(id.wrapping_mul(0x9E37_79B9_7F4A_7C15)))
        });
        (
            prop::collection::vec(any::<u32>(), len),
            prop::collection::vec(span, 0..4),
            prop_oneof![Just(String::new()), "[a-z-]{1,10}"],
            prop_oneof![Just(String::new()), "\\PC{1,6}"],
            any::<bool>(),
        )
            .prop_map(move |(tokens, spans, lora, namespace, eagle)| Input {
                tokens,
                block_size,
                spans,
                lora,
                namespace,
                eagle,
            })
    })
}

fn hasher(input: &Input) -> BlockHasher {
    BlockHasher::builder(input.block_size)
        .lora_name(&input.lora)
        .cache_namespace(&input.namespace)
        .eagle(input.eagle)
        .build()
        .unwrap()
}

/// The specification, spelled out with allocations everywhere.
fn reference(input: &Input) -> Vec<(u64, u64)> {
    let mut seed = 1337u64;
    if !input.lora.is_empty() {
        seed = seed.wrapping_add(xxh3_64_with_seed(input.lora.as_bytes(), 0));
    }
    if !input.namespace.is_empty() {
        seed = seed.wrapping_add(xxh3_64_with_seed(input.namespace.as_bytes(), 1));
    }
    let b = input.block_size as usize;
    let window = if input.eagle { b + 1 } else { b };
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut i = 0;
    while i * b + window <= input.tokens.len() {
        let mut bytes = Vec::new();
        for t in &input.tokens[i * b..i * b + window] {
            bytes.extend(t.to_le_bytes());
        }
        let mut ids: Vec<u64> = Vec::new();
        for span in &input.spans {
            let (start, end) = (span.start, span.start + span.len);
            if start.max(i * b) < end.min(i * b + b) && !ids.contains(&span.id.0) {
                ids.push(span.id.0);
            }
        }
        ids.sort();
        for id in ids {
            bytes.extend(id.to_le_bytes());
        }
        let block = xxh3_64_with_seed(&bytes, seed);
        let sequence = match out.last() {
            None => block,
            Some(&(_, parent)) => {
                let mut pair = parent.to_le_bytes().to_vec();
                pair.extend(block.to_le_bytes());
                xxh3_64_with_seed(&pair, 1337)
            }
        };
        out.push((block, sequence));
        i += 1;
    }
    out
}

fn pairs(hashed: &[HashedBlock]) -> Vec<(u64, u64)> {
    hashed
        .iter()
        .map(|h| (h.block.get(), h.sequence.get()))
        .collect()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn matches_the_reference(input in input()) {
        let hasher = hasher(&input);
        let hashed = hasher.hash_sequence(&input.tokens, input.spans.as_slice());
        prop_assert_eq!(pairs(&hashed), reference(&input));

        let mut sequences = Vec::new();
        hasher.sequence_hashes_into(&input.tokens, input.spans.as_slice(), &mut sequences);
        prop_assert_eq!(sequences, hashed.iter().map(|h| h.sequence).collect::<Vec<_>>());
        prop_assert_eq!(hashed.len(), hasher.block_count(input.tokens.len()));
    }

    #[test]
    fn incremental_equals_one_shot(input in input(), cuts in prop::collection::vec(0usize..400, 0..8)) {
        let hasher = hasher(&input);
        let one_shot = hasher.hash_sequence(&input.tokens, input.spans.as_slice());

        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(input.tokens.len())).collect();
        cuts.push(0);
        cuts.push(input.tokens.len());
        cuts.sort_unstable();
        let mut incremental = SequenceHasher::new(hasher.clone());
        let mut out = Vec::new();
        for pair in cuts.windows(2) {
            incremental.extend(&input.tokens[pair[0]..pair[1]], input.spans.as_slice(), &mut out);
        }
        prop_assert_eq!(&out, &one_shot);
        prop_assert_eq!(incremental.token_count(), input.tokens.len());
        prop_assert_eq!(incremental.block_count(), one_shot.len());
        prop_assert_eq!(incremental.last_sequence_hash(), one_shot.last().map(|h| h.sequence));
    }

    #[test]
    fn changing_a_token_changes_its_blocks_and_every_later_sequence_hash(
        input in input(), position in any::<prop::sample::Index>(), delta in 1u32..,
    ) {
        prop_assume!(!input.tokens.is_empty());
        let hasher = hasher(&input);
        let before = hasher.hash_sequence(&input.tokens, input.spans.as_slice());
        let position = position.index(input.tokens.len());
        let mut changed = input.clone();
        changed.tokens[position] = changed.tokens[position].wrapping_add(delta);
        let after = hasher.hash_sequence(&changed.tokens, changed.spans.as_slice());

        let b = input.block_size as usize;
        for (i, (x, y)) in before.iter().zip(&after).enumerate() {
            let window = i * b..i * b + hasher.window_len();
            let first_affected = position / b - usize::from(input.eagle && position % b == 0 && position > 0);
            if window.contains(&position) {
                prop_assert_ne!(x.block, y.block, "block {} holds the changed token", i);
            } else {
                prop_assert_eq!(x.block, y.block, "block {} does not", i);
            }
            if i >= first_affected {
                prop_assert_ne!(x.sequence, y.sequence, "sequence hash {} follows the change", i);
            } else {
                prop_assert_eq!(x.sequence, y.sequence, "sequence hash {} precedes it", i);
            }
        }
    }

    #[test]
    fn changing_a_media_id_changes_its_blocks_and_every_later_sequence_hash(
        input in input(), which in any::<prop::sample::Index>(),
    ) {
        prop_assume!(!input.spans.is_empty());
        let hasher = hasher(&input);
        let before = hasher.hash_sequence(&input.tokens, input.spans.as_slice());
        let which = which.index(input.spans.len());
        let mut changed = input.clone();
        // An id no other span uses, so the block's set of ids really changes.
        changed.spans[which].id = MediaId(u64::MAX - which as u64);
        let after = hasher.hash_sequence(&changed.tokens, changed.spans.as_slice());

        let b = input.block_size;
        let span = input.spans[which];
        let touched = |i: usize| span.touches(i * b as usize..(i + 1) * b as usize);
        let first = (0..before.len()).find(|&i| touched(i));
        for i in 0..before.len() {
            if touched(i) {
                prop_assert_ne!(before[i].block, after[i].block);
            } else {
                prop_assert_eq!(before[i].block, after[i].block);
            }
            match first {
                Some(first) if i >= first => prop_assert_ne!(before[i].sequence, after[i].sequence),
                _ => prop_assert_eq!(before[i].sequence, after[i].sequence),
            }
        }
    }

    #[test]
    fn changing_the_lora_name_changes_every_block(
        input in input(), other in "[a-z]{1,10}",
    ) {
        prop_assume!(other != input.lora);
        let before = hasher(&input).hash_sequence(&input.tokens, input.spans.as_slice());
        let changed = Input { lora: other, ..input.clone() };
        let after = hasher(&changed).hash_sequence(&input.tokens, input.spans.as_slice());
        for (x, y) in before.iter().zip(&after) {
            prop_assert_ne!(x.block, y.block);
            prop_assert_ne!(x.sequence, y.sequence);
        }
    }
}

#[test]
fn zero_block_size_is_refused() {
    assert_eq!(
        BlockHasher::new(0).unwrap_err(),
        kvroute_blockhash::HashError::ZeroBlockSize
    );
}

#[test]
fn media_order_does_not_matter_but_duplicates_do() {
    let hasher = BlockHasher::new(4).unwrap();
    let tokens = [1, 2, 3, 4];
    let (a, b) = (MediaId(7), MediaId(3));
    assert_eq!(
        hasher.hash_block(&tokens, &[a, b]),
        hasher.hash_block(&tokens, &[b, a])
    );
    assert_ne!(
        hasher.hash_block(&tokens, &[a]),
        hasher.hash_block(&tokens, &[a, a])
    );
    assert_ne!(
        hasher.hash_block(&tokens, &[a]),
        hasher.hash_block(&tokens, &[])
    );
}
