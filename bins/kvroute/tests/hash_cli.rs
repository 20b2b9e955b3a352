//! `kvroute hash` end to end: the binary's output for a multimodal request equals Dynamo's
//! golden hashes, and bad input is a clear error with a non-zero exit.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn kvroute_hash(args: &[&str], stdin: &str) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .arg("hash")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn hashes_a_multimodal_request_like_dynamo() {
    let example = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/data/hash_request.json"
    );
    let out = kvroute_hash(&[example], "");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let column = |key: &str| -> Vec<u64> {
        json["blocks"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[key].as_u64().unwrap())
            .collect()
    };
    // Case mm_one_image_spanning_4_blocks_bs16 of the Dynamo golden vectors.
    assert_eq!(
        column("block_hash"),
        [
            4178317394779010145,
            3508308841714405532,
            3508308841714405532,
            9060195931522402559,
            11255422057828429104
        ]
    );
    assert_eq!(
        column("sequence_hash"),
        [
            4178317394779010145,
            5579048693534766073,
            8318368599990707890,
            4389370375424000382,
            1681487528867897669
        ]
    );
    assert_eq!(
        json["blocks"][3]["media"][0].as_u64(),
        Some(81985529216486895)
    );
    assert!(json["blocks"][4]["media"].as_array().unwrap().is_empty());
}

#[test]
fn reads_stdin_and_the_block_size_flag() {
    let tokens: Vec<u32> = (0..16).collect();
    let input = serde_json::json!({ "tokens": tokens }).to_string();
    let out = kvroute_hash(&["--block-size", "16", "--format", "text"], &input);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("15310707395893867146"));
}

#[test]
fn bad_input_is_a_clear_error() {
    for (input, message) in [
        (
            r#"{"tokens":[1,2,3],"block_size":0}"#,
            "block size must be at least 1",
        ),
        (r#"{"tokens":[1,2,3]}"#, "no block size"),
        (
            r#"{"tokens":[-1],"block_size":16}"#,
            "parsing the hash input",
        ),
        (
            r#"{"tokens":[1],"block_size":16,"media":[],"block_mm_infos":[]}"#,
            "not both",
        ),
        (
            r#"{"tokens":[1],"block_size":16,"tokenz":[]}"#,
            "unknown field",
        ),
        ("not json", "parsing the hash input"),
    ] {
        let out = kvroute_hash(&[], input);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{input} was accepted");
        assert!(stderr.contains(message), "{input}: {stderr}");
    }
}
