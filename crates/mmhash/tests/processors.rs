//! Visual token counts and placeholder expansions against each family's Hugging Face processor
//! (tests/fixtures/processors: the processors run on synthetic images of 400 sizes by
//! visual_tokens.py; see its README for the configurations and their sources). Where the
//! fixture spells the replacement out (`runs`: Llama 4's tiles and separators), it is compared
//! token by token.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{expand, ImageTokens, MediaId, PlaceholderTokens, VisionTokenRule};
use serde_json::json;
use serde_json::Value;
use std::collections::HashMap;

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/processors/visual_tokens.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The fixture's family names are `model_type`s, but for Qwen2.5-VL (the Qwen2-VL processor).
const FAMILIES: [&str; 12] = [
    "qwen2_vl",
    "qwen2_5_vl",
    "qwen3_vl",
    "llava",
    "llava_next",
    "llava_onevision",
    "gemma3",
    "internvl",
    "mistral3",
    "pixtral",
    "llama4",
    "phi4_multimodal",
];

#[test]
fn every_family_counts_and_expands_as_its_processor() {
    let json = fixture();
    let sizes = json["sizes"].as_array().unwrap();
    assert!(sizes.len() >= 400, "{} sizes", sizes.len());
    let families = json["families"].as_object().unwrap();
    assert_eq!(families.len(), FAMILIES.len());
    for family in FAMILIES {
        let rule = VisionTokenRule::for_model_type(family).unwrap();
        // Distinct ids for the placeholder's tokens; the count is what is checked.
        let tokens = PlaceholderTokens::for_model_type(family).unwrap();
        let mut texts = vec![tokens.placeholder, tokens.pad];
        texts.extend(tokens.prefix);
        texts.extend(tokens.suffix);
        texts.extend(tokens.row_break);
        texts.extend(
            tokens
                .tiles
                .iter()
                .flat_map(|t| [t.column, t.row, t.global]),
        );
        texts.sort_unstable();
        texts.dedup();
        let ids: HashMap<&str, u32> = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32 + 1))
            .collect();
        let spec = tokens.resolve(|t| ids.get(t).copied()).unwrap();
        let text: HashMap<u32, &str> = ids.iter().map(|(&t, &id)| (id, t)).collect();
        let cases = families[family].as_array().unwrap();
        assert_eq!(cases.len(), sizes.len(), "{family}");
        let (mut counted, mut refused) = (0, 0);
        for (size, case) in sizes.iter().zip(cases) {
            let (width, height) = (
                size[0].as_u64().unwrap() as u32,
                size[1].as_u64().unwrap() as u32,
            );
            let got = rule.layout(width, height);
            if case.get("error").is_some() {
                assert!(
                    got.is_err(),
                    "{family} {width}x{height}: {got:?}, processor: {case}"
                );
                refused += 1;
                continue;
            }
            let layout = got.unwrap_or_else(|e| panic!("{family} {width}x{height}: {e}"));
            let pads = layout.tokens().unwrap();
            assert_eq!(
                pads as u64,
                case["pads"].as_u64().unwrap(),
                "{family} {width}x{height}"
            );
            assert_eq!(
                rule.tokens(width, height).unwrap() as usize,
                pads,
                "{family} {width}x{height}: tokens and layout"
            );
            let image = ImageTokens {
                id: MediaId(1),
                layout,
            };
            let out = expand(&[spec.placeholder], &spec, &[image]).unwrap();
            assert_eq!(
                out.tokens.len() as u64,
                case["total"].as_u64().unwrap(),
                "{family} {width}x{height}: whole replacement"
            );
            if let Some(runs) = case.get("runs") {
                assert_eq!(
                    &runs_of(&out.tokens, &text),
                    runs,
                    "{family} {width}x{height}: the replacement token by token"
                );
            }
            counted += 1;
        }
        assert!(
            counted >= 380,
            "{family}: {counted} counted, {refused} refused"
        );
    }
}

/// The tokens as `[text, repeats]` runs, as the fixture spells them.
fn runs_of(tokens: &[u32], text: &HashMap<u32, &str>) -> Value {
    let mut runs: Vec<(&str, u64)> = Vec::new();
    for token in tokens {
        let t = text[token];
        match runs.last_mut() {
            Some((last, n)) if *last == t => *n += 1,
            _ => runs.push((t, 1)),
        }
    }
    json!(runs)
}
