//! The MP4 header reader against what vLLM's default video loader (OpenCV over FFmpeg) reads
//! from the same files (tests/fixtures/videos, made by make_videos.py beside them).

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{probe_video, QwenVideo, VideoError};
use serde_json::Value;

fn dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/videos")
}

#[test]
fn headers_match_opencv_and_counts_match_vllm_defaults() {
    let expected: Value =
        serde_json::from_str(&std::fs::read_to_string(dir().join("expected.json")).unwrap())
            .unwrap();
    let mut mp4s = 0;
    for (name, entry) in expected.as_object().unwrap() {
        let Some(tokens) = entry.get("qwen2_vl_tokens_vllm_default") else {
            continue;
        };
        let bytes = std::fs::read(dir().join(name)).unwrap();
        let info = probe_video(&bytes).unwrap_or_else(|e| panic!("{name}: {e}"));
        let opencv = &entry["opencv"];
        assert_eq!(info.frames, opencv["frames"].as_u64().unwrap(), "{name}");
        assert_eq!(
            u64::from(info.width),
            opencv["width"].as_u64().unwrap(),
            "{name}"
        );
        assert_eq!(
            u64::from(info.height),
            opencv["height"].as_u64().unwrap(),
            "{name}"
        );
        let fps = info.fps().unwrap();
        assert!(
            (fps - opencv["fps"].as_f64().unwrap()).abs() < 1e-6,
            "{name}: {fps}"
        );
        assert_eq!(
            QwenVideo::QWEN2_VL.tokens(&info).unwrap(),
            tokens.as_u64().unwrap(),
            "{name}"
        );
        mp4s += 1;
    }
    assert_eq!(mp4s, 5);
}

#[test]
fn other_containers_and_cut_files_are_refused() {
    let mkv = std::fs::read(dir().join("bars_320x240_30f.mkv")).unwrap();
    assert_eq!(probe_video(&mkv), Err(VideoError::NotMp4));
    let mp4 = std::fs::read(dir().join("bars_320x240_30f.mp4")).unwrap();
    // The muxer writes the moov box last: every proper prefix lacks it or cuts it.
    for len in (0..mp4.len()).step_by(97) {
        assert!(probe_video(&mp4[..len]).is_err(), "{len}");
    }
}
