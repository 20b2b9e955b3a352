//! Golden vectors produced by NVIDIA Dynamo 1.6.1 itself (see tests/fixtures/vectors/README.md).
//!
//! `KVROUTE_BLOCK_HASH_VECTORS` may name more files of the same schema (colon-separated), so
//! held-out vector sets run through the same checks.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_blockhash::{BlockHasher, HashedBlock, NoMedia, SequenceHasher};
use kvroute_protocol::BlockExtraInfo;
use serde::Deserialize;
use std::path::{Path, PathBuf};

#[derive(Deserialize)]
struct VectorFile {
    cases: Vec<Case>,
    #[serde(default)]
    error_cases: Vec<serde_json::Value>,
}

#[derive(Deserialize)]
struct Case {
    name: String,
    #[serde(flatten)]
    input: Input,
    expected_block_hashes: Vec<u64>,
    expected_sequence_hashes: Vec<u64>,
}

/// The inputs of Dynamo's `compute_block_hash_for_seq`, typed as strictly as Dynamo parses them.
#[derive(Deserialize)]
struct Input {
    tokens: Vec<u32>,
    block_size: u32,
    block_mm_infos: Option<Vec<Option<BlockExtraInfo>>>,
    lora_name: Option<String>,
    cache_namespace: Option<String>,
    is_eagle: Option<bool>,
}

impl Input {
    fn hasher(&self) -> Result<BlockHasher, kvroute_blockhash::HashError> {
        BlockHasher::builder(self.block_size)
            .lora_name(self.lora_name.as_deref().unwrap_or(""))
            .cache_namespace(self.cache_namespace.as_deref().unwrap_or(""))
            .eagle(self.is_eagle.unwrap_or(false))
            .build()
    }

    fn hash(&self, hasher: &BlockHasher) -> Vec<HashedBlock> {
        match &self.block_mm_infos {
            Some(infos) => hasher.hash_sequence(&self.tokens, infos),
            None => hasher.hash_sequence(&self.tokens, &NoMedia),
        }
    }
}

fn vector_files() -> Vec<PathBuf> {
    let mut files = vec![Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/vectors/dynamo_block_hash.json")];
    if let Ok(extra) = std::env::var("KVROUTE_BLOCK_HASH_VECTORS") {
        files.extend(
            extra
                .split(':')
                .filter(|p| !p.is_empty())
                .map(PathBuf::from),
        );
    }
    files
}

fn load(path: &Path) -> VectorFile {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
fn every_golden_case_matches_dynamo() {
    let mut checked = 0;
    for path in vector_files() {
        for case in load(&path).cases {
            let hasher = case.input.hasher().unwrap();
            let hashed = case.input.hash(&hasher);
            let blocks: Vec<u64> = hashed.iter().map(|h| h.block.get()).collect();
            let sequences: Vec<u64> = hashed.iter().map(|h| h.sequence.get()).collect();
            assert_eq!(
                blocks, case.expected_block_hashes,
                "{}: block hashes",
                case.name
            );
            assert_eq!(
                sequences, case.expected_sequence_hashes,
                "{}: sequence hashes",
                case.name
            );

            // Every other entry point agrees with the one above.
            let media: &dyn Fn(&BlockHasher) -> Vec<u64> = &|h| match &case.input.block_mm_infos {
                Some(infos) => h
                    .block_hashes(&case.input.tokens, infos)
                    .iter()
                    .map(|b| b.get())
                    .collect(),
                None => h
                    .block_hashes(&case.input.tokens, &NoMedia)
                    .iter()
                    .map(|b| b.get())
                    .collect(),
            };
            assert_eq!(
                media(&hasher),
                case.expected_block_hashes,
                "{}: block_hashes",
                case.name
            );
            for chunk in [1, 5, 16, 1000] {
                let mut incremental = SequenceHasher::new(hasher.clone());
                let mut out = Vec::new();
                for part in case.input.tokens.chunks(chunk) {
                    match &case.input.block_mm_infos {
                        Some(infos) => incremental.extend(part, infos, &mut out),
                        None => incremental.extend(part, &NoMedia, &mut out),
                    }
                }
                assert_eq!(
                    out, hashed,
                    "{}: incremental in chunks of {chunk}",
                    case.name
                );
            }
            checked += 1;
        }
    }
    assert!(checked >= 20, "only {checked} golden cases ran");
}

/// Inputs Dynamo refuses are refused here too: either the typed input cannot even be parsed
/// (negative or oversized numbers, a media object without offsets, ...) or the hasher rejects it.
#[test]
fn every_error_case_is_refused() {
    let mut checked = 0;
    for path in vector_files() {
        for case in load(&path).error_cases {
            let name = case["name"].as_str().unwrap_or("?").to_owned();
            let refused = match serde_json::from_value::<Input>(case) {
                Err(_) => true,
                Ok(input) => input.hasher().is_err(),
            };
            assert!(
                refused,
                "{name}: Dynamo refuses this input, kvroute accepted it"
            );
            checked += 1;
        }
    }
    assert!(checked >= 4, "only {checked} error cases ran");
}
