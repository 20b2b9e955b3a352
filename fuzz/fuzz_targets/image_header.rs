//! Image and video headers as a client sends them: `probe` (PNG, JPEG, GIF, WebP, BMP headers
//! and EXIF orientation) and `probe_video` (MP4 boxes), then the visual token count of every
//! family the gateway counts for the dimensions the header claims. Every malformed file must be
//! a typed error, never a panic or an overflow.

#![no_main]

use kvroute_mmhash::{probe, probe_video, FrameSampling, ImageFormat, QwenVideo, VisionTokenRule};
use libfuzzer_sys::fuzz_target;

const MODEL_TYPES: [&str; 9] = [
    "qwen2_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "gemma3",
    "internvl",
    "mistral3",
    "pixtral",
];

const DECLARED: [Option<&str>; 4] = [
    None,
    Some("image/png"),
    Some("image/jpeg"),
    Some("application/octet-stream"),
];

fuzz_target!(|bytes: &[u8]| {
    let sniffed = ImageFormat::sniff(bytes);
    for declared in DECLARED {
        let Ok(info) = probe(bytes, declared) else {
            continue;
        };
        assert_eq!(Some(info.format), sniffed, "probe and sniff disagree");
        assert!(
            info.width > 0 && info.height > 0,
            "a zero dimension accepted"
        );
        for model_type in MODEL_TYPES {
            let rule = VisionTokenRule::for_model_type(model_type).expect("a counted family");
            let _ = rule.tokens(info.width, info.height);
        }
    }
    if let Ok(info) = probe_video(bytes) {
        let _ = info.fps();
        let _ = QwenVideo::QWEN2_VL.tokens(&info);
        let by_fps = QwenVideo {
            sampling: FrameSampling::Fps {
                fps: 2.0,
                min_frames: 4,
                max_frames: 768,
            },
            ..QwenVideo::QWEN2_VL
        };
        let _ = by_fps.tokens(&info);
    }
});
