//! Hostile engine frames cannot make the decoder allocate more than a small multiple of the
//! frame (8 bytes per byte at most: a one-byte token id becomes a `u32`, a one-byte hash a
//! `u64`), whatever lengths they claim. One test in its own binary: the allocator's peak is
//! process-wide.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_events::decode_engine_batch;
use peak_alloc::PeakAlloc;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

#[test]
fn hostile_lengths_allocate_no_more_than_the_frame_allows() {
    const HEAD: &[u8] =
        b"\x93\xcb\x41\xda\x55\x6e\x40\xa0\x00\x00\x91\xde\x00\x03\xa4type\xabBlockStored";
    let frames: Vec<Vec<u8>> = [
        // 4 billion tokens claimed, 64 KiB present.
        &b"\xa9token_ids\xdd\xff\xff\xff\xff"[..],
        // 4 billion hashes claimed.
        &b"\xacblock_hashes\xdd\xff\xff\xff\xff"[..],
        // 4 billion blocks of extra keys claimed.
        &b"\xaaextra_keys\xdd\xff\xff\xff\xff"[..],
        // A 4 GiB string claimed.
        &b"\xa9lora_name\xdb\xff\xff\xff\xff"[..],
    ]
    .iter()
    .map(|field| {
        let mut frame = HEAD.to_vec();
        frame.extend_from_slice(field);
        frame.extend(std::iter::repeat_n(0x01u8, 64 << 10));
        frame
    })
    .collect();
    for frame in &frames {
        let before = ALLOCATOR.current_usage();
        ALLOCATOR.reset_peak_usage();
        assert!(decode_engine_batch(frame).is_err());
        let peak = ALLOCATOR.peak_usage().saturating_sub(before);
        assert!(
            peak <= 8 * frame.len(),
            "peak {peak} bytes for a {} byte frame",
            frame.len()
        );
    }
}
