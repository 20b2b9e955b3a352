//! Visual token counts against vectors computed by transformers itself
//! (tests/fixtures/vectors/hf_visual_tokens.json, made by hf_visual_tokens.py next to it): 400
//! sizes, edge cases first, then random ones up to 60000 px and aspect ratios past 200.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{AnyRes, SmartResize, TokenError};
use serde_json::Value;

#[test]
fn token_counts_match_transformers() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/vectors/hf_visual_tokens.json"
    );
    let json: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let cases = json["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 400);
    let class_default = SmartResize {
        max_pixels: 1_003_520,
        ..SmartResize::QWEN2_VL
    };
    let rules = [
        ("qwen2_vl", SmartResize::QWEN2_VL),
        ("qwen2_vl_class_default", class_default),
        ("qwen3_vl", SmartResize::QWEN3_VL),
    ];
    let llava_next = AnyRes::llava_v1_6();
    for case in cases {
        let width = u32::try_from(case["width"].as_u64().unwrap()).unwrap();
        let height = u32::try_from(case["height"].as_u64().unwrap()).unwrap();
        for (key, rule) in &rules {
            let got = rule.tokens(width, height);
            match case[key].as_u64() {
                Some(expected) => assert_eq!(got, Ok(expected as u32), "{key} {width}x{height}"),
                None => assert!(
                    matches!(got, Err(TokenError::AspectRatio { .. })),
                    "{key} {width}x{height}: {got:?}"
                ),
            }
        }
        let expected = case["llava_next"].as_u64().unwrap() as u32;
        assert_eq!(
            llava_next.tokens(width, height),
            Ok(expected),
            "llava_next {width}x{height}"
        );
    }
}
