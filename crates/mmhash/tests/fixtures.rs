//! Every image of tests/fixtures/images against its expected.json entry: format, dimensions,
//! Qwen2-VL token counts (checkpoint and class-default max_pixels), blake3 of the file (bytes
//! ids) and of the canonical RGB8 pixels (pixels ids), and the typed error of every bad file.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{
    blake3_digest, media_id_from_digest, probe, IdMode, IdSource, ImageError, MediaConfig,
    MediaProcessor, SmartResize, TokenError,
};
use serde_json::Value;
use std::path::PathBuf;

fn dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/images")
}

fn expected() -> Vec<(String, Value)> {
    let text = std::fs::read_to_string(dir().join("expected.json")).unwrap();
    let json: serde_json::Map<String, Value> = serde_json::from_str(&text).unwrap();
    json.into_iter().collect()
}

fn read(name: &str) -> Vec<u8> {
    std::fs::read(dir().join(name)).unwrap()
}

fn hex(bytes: &[u8; 32]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn u32_field(entry: &Value, key: &str) -> Option<u32> {
    entry
        .get(key)
        .and_then(Value::as_u64)
        .map(|v| u32::try_from(v).unwrap())
}

const CLASS_DEFAULT: SmartResize = SmartResize {
    max_pixels: 1_003_520,
    ..SmartResize::QWEN2_VL
};

/// Checks the token fields of an entry against the rule, for the given header dimensions.
fn check_tokens(name: &str, entry: &Value, width: u32, height: u32) {
    match u32_field(entry, "qwen2vl_tokens") {
        Some(tokens) => {
            let resized = SmartResize::QWEN2_VL.resize(width, height).unwrap();
            assert_eq!(
                u32_field(entry, "qwen2vl_resized_w"),
                Some(resized.width),
                "{name}"
            );
            assert_eq!(
                u32_field(entry, "qwen2vl_resized_h"),
                Some(resized.height),
                "{name}"
            );
            assert_eq!(
                SmartResize::QWEN2_VL.tokens(width, height).unwrap(),
                tokens,
                "{name}"
            );
            let at_default = u32_field(entry, "qwen2vl_tokens_at_max_pixels_1003520").unwrap();
            assert_eq!(
                CLASS_DEFAULT.tokens(width, height).unwrap(),
                at_default,
                "{name}"
            );
        }
        None if entry.get("qwen2vl_error").is_some() => {
            assert!(
                matches!(
                    SmartResize::QWEN2_VL.tokens(width, height),
                    Err(TokenError::AspectRatio { .. })
                ),
                "{name}"
            );
        }
        None => {}
    }
}

#[test]
fn every_fixture_matches_expected_json() {
    let entries = expected();
    assert_eq!(entries.len(), 19);
    let bytes_mode = MediaProcessor::new(MediaConfig::default());
    let parallel = MediaProcessor::new(MediaConfig::default().with_parallel_hash_from(Some(0)));
    for (name, entry) in &entries {
        let bytes = read(name);
        assert_eq!(
            bytes.len() as u64,
            entry["bytes"].as_u64().unwrap(),
            "{name}"
        );
        let file_hex = entry["blake3_file_hex"].as_str().unwrap();
        let digest = blake3_digest(&bytes);
        assert_eq!(hex(&digest), file_hex, "{name}");
        let expected_id = u64::from_str_radix(&file_hex[..16], 16).unwrap();
        assert_eq!(media_id_from_digest(&digest).get(), expected_id, "{name}");

        if entry.get("expect_error").is_some() {
            // Header dimensions where the header parses, then the refusal.
            if let (Some(w), Some(h)) = (
                u32_field(entry, "header_width"),
                u32_field(entry, "header_height"),
            ) {
                check_tokens(name, entry, w, h);
            }
            let error = bytes_mode.prepare(&bytes, None, None).unwrap_err();
            let expected_kind = match name.as_str() {
                "bomb_20000x20000.png" => matches!(
                    error,
                    ImageError::TooManyPixels {
                        width: 20000,
                        height: 20000,
                        ..
                    }
                ),
                "not_an_image.png" => error == ImageError::UnknownFormat,
                "rocket_truncated_header.jpg" | "rocket_truncated_midscan.jpg" => {
                    matches!(error, ImageError::Truncated { .. })
                }
                other => panic!("no expected error kind for {other}"),
            };
            assert!(expected_kind, "{name}: {error}");
            continue;
        }

        let width = u32_field(entry, "width").unwrap();
        let height = u32_field(entry, "height").unwrap();
        let info = probe(&bytes, None).unwrap();
        assert_eq!((info.width, info.height), (width, height), "{name}");
        assert_eq!(
            info.format.name(),
            entry["format"].as_str().unwrap(),
            "{name}"
        );
        check_tokens(name, entry, width, height);

        let prepared = bytes_mode
            .prepare(&bytes, Some(info.format.mime()), None)
            .unwrap();
        assert_eq!(prepared.id.get(), expected_id, "{name}");
        assert_eq!(prepared.id_source, IdSource::Content(IdMode::Bytes));
        let prepared = parallel.prepare(&bytes, None, None).unwrap();
        assert_eq!(
            prepared.id.get(),
            expected_id,
            "{name}: multi-threaded hashing"
        );
    }
}

#[test]
fn pixel_digests_match_expected_json() {
    let config = MediaConfig::default().with_id_mode(IdMode::Pixels);
    // Multi-threaded hashing from 1 MiB: the 16 MP image's 48 MB of RGB8 takes that path.
    let pixels = MediaProcessor::new(config.with_parallel_hash_from(Some(1 << 20)));
    for (name, entry) in expected() {
        if entry.get("expect_error").is_some() {
            continue;
        }
        let bytes = read(&name);
        let key = if entry["rgb8_decoder_dependent"].as_bool().unwrap() {
            "blake3_rgb8_hex_image_rs"
        } else {
            "blake3_rgb8_hex"
        };
        let digest = pixels.pixel_digest(&bytes, None).unwrap();
        assert_eq!(hex(&digest.rgb8), entry[key].as_str().unwrap(), "{name}");
        let prepared = pixels.prepare(&bytes, None, None).unwrap();
        assert_eq!(prepared.id, digest.media_id(), "{name}");
    }
}

#[test]
fn same_picture_in_two_encodings_shares_a_pixels_id() {
    let pixels = MediaProcessor::new(MediaConfig::default().with_id_mode(IdMode::Pixels));
    let bytes_mode = MediaProcessor::default();
    let id = |p: &MediaProcessor, name: &str| p.prepare(&read(name), None, None).unwrap().id;
    for (a, b) in [
        ("coffee.png", "coffee_lossless.webp"),
        ("chelsea.png", "chelsea_alpha.png"),
    ] {
        assert_eq!(id(&pixels, a), id(&pixels, b), "{a} vs {b}");
        assert_ne!(id(&bytes_mode, a), id(&bytes_mode, b), "{a} vs {b}");
    }
    // Same pixel count, different shape: different ids.
    assert_ne!(id(&pixels, "astronaut.png"), id(&pixels, "camera.png"));
}

#[test]
fn client_uuid_wins_and_is_kept() {
    let bytes = read("rocket.jpg");
    for mode in [IdMode::Bytes, IdMode::Pixels] {
        let processor = MediaProcessor::new(MediaConfig::default().with_id_mode(mode));
        let prepared = processor
            .prepare(&bytes, Some("image/jpeg"), Some("rocket-v1"))
            .unwrap();
        assert_eq!(prepared.id_source, IdSource::Client("rocket-v1".to_owned()));
        assert_eq!(prepared.id, kvroute_mmhash::media_id_from_uuid("rocket-v1"));
        assert_eq!((prepared.info.width, prepared.info.height), (640, 427));
    }
    // A client id does not excuse a broken file.
    let truncated = read("rocket_truncated_midscan.jpg");
    let processor = MediaProcessor::default();
    assert!(processor.prepare(&truncated, None, Some("x")).is_err());
}

#[test]
fn declared_type_must_agree() {
    let processor = MediaProcessor::default();
    let png = read("coffee_tiny_40x30.png");
    assert!(processor.prepare(&png, Some("image/png"), None).is_ok());
    assert!(processor
        .prepare(&png, Some("application/octet-stream"), None)
        .is_ok());
    for wrong in ["image/jpeg", "image/tiff", "text/plain"] {
        assert!(
            matches!(
                processor.prepare(&png, Some(wrong), None),
                Err(ImageError::FormatMismatch { .. })
            ),
            "{wrong}"
        );
    }
}

#[test]
fn pixel_cap_is_configurable() {
    let bytes = read("solid_4624x3472.png");
    let small = MediaProcessor::new(MediaConfig::default().with_max_pixels(4624 * 3472 - 1));
    assert!(matches!(
        small.prepare(&bytes, None, None),
        Err(ImageError::TooManyPixels {
            width: 4624,
            height: 3472,
            ..
        })
    ));
    let exact = MediaProcessor::new(MediaConfig::default().with_max_pixels(4624 * 3472));
    assert!(exact.prepare(&bytes, None, None).is_ok());
}
