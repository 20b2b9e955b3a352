//! The decompression bomb (a 48 KB PNG declaring 20000x20000 pixels, 1.2 GB as RGB8) is refused
//! in every id mode without allocating its pixels. Its own test binary, so the counting global
//! allocator sees this test alone.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{probe, IdMode, ImageError, MediaConfig, MediaProcessor};
use peak_alloc::PeakAlloc;

#[global_allocator]
static ALLOCATOR: PeakAlloc = PeakAlloc;

/// Far below one row of pixels of the bomb as RGB8 (60 KB) times anything.
const PEAK_LIMIT_BYTES: usize = 1 << 20;

#[test]
fn bomb_is_refused_without_allocating_pixels() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/bomb_20000x20000.png"
    );
    let bytes = std::fs::read(path).unwrap();
    let info = probe(&bytes, Some("image/png")).unwrap();
    assert_eq!((info.width, info.height), (20_000, 20_000));

    for mode in [IdMode::Bytes, IdMode::Pixels] {
        let processor = MediaProcessor::new(MediaConfig::default().with_id_mode(mode));
        let before = ALLOCATOR.current_usage();
        ALLOCATOR.reset_peak_usage();
        let prepared = processor.prepare(&bytes, None, None);
        let digest = processor.pixel_digest(&bytes, None);
        let peak = ALLOCATOR.peak_usage().saturating_sub(before);
        assert!(
            matches!(
                prepared,
                Err(ImageError::TooManyPixels {
                    width: 20_000,
                    height: 20_000,
                    ..
                })
            ),
            "{prepared:?}"
        );
        assert!(
            matches!(digest, Err(ImageError::TooManyPixels { .. })),
            "{digest:?}"
        );
        assert!(peak < PEAK_LIMIT_BYTES, "{mode:?}: peak {peak} bytes");
    }

    // Control: the allocator does see a real decode (the 16 MP PNG is 48 MB as RGB8).
    let solid = std::fs::read(path.replace("bomb_20000x20000", "solid_4624x3472")).unwrap();
    let before = ALLOCATOR.current_usage();
    ALLOCATOR.reset_peak_usage();
    MediaProcessor::default()
        .pixel_digest(&solid, None)
        .unwrap();
    assert!(ALLOCATOR.peak_usage().saturating_sub(before) >= 4624 * 3472 * 3);
}
