//! The smallest use of kvroute-blockhash: the block and sequence hashes of a token sequence,
//! as a Dynamo 1.6 worker computes them for its KV events (the example of
//! crates/blockhash/README.md; tests/examples.rs checks that README's output).
//!
//! ```sh
//! cargo run -p kvroute-examples --example hash_tokens
//! ```

use kvroute_blockhash::{BlockHasher, MediaId, MediaSpan, NoMedia};
use std::error::Error;
use std::io::Write;

fn main() -> Result<(), Box<dyn Error>> {
    print_hashes(&mut std::io::stdout().lock())
}

/// Writes the hashes of 48 tokens in blocks of 16, without and with an image.
pub fn print_hashes(out: &mut impl Write) -> Result<(), Box<dyn Error>> {
    // One hasher per block size (and LoRA adapter, cache namespace); share it.
    let hasher = BlockHasher::new(16)?;
    let tokens: Vec<u32> = (0..48).collect();
    let text = hasher.hash_sequence(&tokens, &NoMedia);

    // An image whose tokens are 10..30 is part of blocks 0 and 1: their hashes change, and
    // through the chain so does the sequence hash of every later block.
    let image = [MediaSpan::new(10, 20, MediaId(81985529216486895))];
    let with_image = hasher.hash_sequence(&tokens, image.as_slice());

    for (i, (text, image)) in text.iter().zip(&with_image).enumerate() {
        let (block, sequence) = (text.block, text.sequence);
        writeln!(
            out,
            "block {i}: {block} {sequence} (with the image: {})",
            image.sequence
        )?;
    }
    Ok(())
}
