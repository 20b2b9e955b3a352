//! `kvroute config`: the example is the defaults, and a file and the flags (or environment
//! variables, prefixed or not) give the same effective configuration.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::process::Command;

fn kvroute(args: &[&str], env: &[(&str, &str)]) -> String {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kvroute"));
    command.args(args);
    // Only what the test sets: a developer's own KVROUTE_* must not leak in.
    for (name, _) in std::env::vars() {
        if name.starts_with("KVROUTE_") || ALIASES.contains(&name.as_str()) {
            command.env_remove(name);
        }
    }
    command.envs(env.iter().copied());
    let output = command.output().unwrap();
    assert!(
        output.status.success(),
        "kvroute {args:?}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout).unwrap()
}

const ALIASES: &[&str] = &[
    "MODEL",
    "BLOCK_SIZE",
    "WORKERS",
    "NO_DISCOVERY",
    "NATS_URL",
    "API_PORT",
];

const FILE: &str = r#"
listen = "127.0.0.1:9100"
drain_timeout_secs = 7

[model]
name = "org/model"
block_size = 16
max_prompt_tokens = 5000

[routing]
policy = "least-loaded"
prefill_weight = 2.0
decode_weight = 0.5
active_blocks_weight = 0.25
temperature = 0.1

[breaker]
failures = 5
cooldown_secs = 9

[[workers]]
id = 1
url = "http://10.0.0.1:8000"

[[workers]]
id = 2
url = "http://10.0.0.2:8000"

[events]
source = "dynamo"
approximate_ttl_secs = 30
snapshots = false
snapshot_interval_secs = 15

[nats]
url = "nats://10.0.0.9:4222"
namespace = "prod"
component = "vllm"
endpoint = "chat"
discovery = false
registration_ttl_secs = 20
replicas = 3

[replica_sync]
enabled = true
name = "gw-1"
interval_ms = 20
heartbeat_ms = 500
expiry_ms = 2000

[limits]
max_connections = 100
max_header_bytes = 16384
max_body_bytes = 1000000
header_read_timeout_secs = 3
body_read_timeout_secs = 4
idle_timeout_secs = 5
max_requests_per_connection = 6
preprocess_threads = 7
preprocess_queue = 8

[timeouts]
connect_ms = 500
first_byte_secs = 900
stream_idle_secs = 0
total_secs = 3600

[auth]
keys_file = "KEYS_FILE"
routing_headers = true

[[auth.keys]]
key = "k1"

[[auth.keys]]
key = "k2"
admin = true
"#;

const FLAGS: &[&str] = &[
    "--listen=127.0.0.1:9100",
    "--drain-timeout-secs=7",
    "--model=org/model",
    "--block-size=16",
    "--max-prompt-tokens=5000",
    "--policy=least-loaded",
    "--prefill-weight=2",
    "--decode-weight=0.5",
    "--active-blocks-weight=0.25",
    "--temperature=0.1",
    "--breaker-failures=5",
    "--breaker-cooldown-secs=9",
    "--worker=1=http://10.0.0.1:8000",
    "--worker=2=http://10.0.0.2:8000",
    "--event-wire=dynamo",
    "--approximate-ttl-secs=30",
    "--no-snapshots",
    "--snapshot-interval-secs=15",
    "--nats-url=nats://10.0.0.9:4222",
    "--namespace=prod",
    "--component=vllm",
    "--endpoint=chat",
    "--no-discovery",
    "--registration-ttl-secs=20",
    "--max-connections=100",
    "--max-header-bytes=16384",
    "--max-body-bytes=1000000",
    "--header-read-timeout-secs=3",
    "--body-read-timeout-secs=4",
    "--idle-timeout-secs=5",
    "--max-requests-per-connection=6",
    "--preprocess-threads=7",
    "--preprocess-queue=8",
    "--connect-timeout-ms=500",
    "--first-byte-timeout-secs=900",
    "--stream-idle-timeout-secs=0",
    "--total-timeout-secs=3600",
    "--api-keys-file=KEYS_FILE",
    "--routing-headers",
    "--api-key=k1",
    "--admin-key=k2",
    "--nats-replicas=3",
    "--replica-sync",
    "--replica-name=gw-1",
    "--replica-interval-ms=20",
    "--replica-heartbeat-ms=500",
    "--replica-expiry-ms=2000",
];

/// FILE in `dir`, its keys file next to it; (FILE's path, the keys file's).
fn write_config(dir: &tempfile::TempDir) -> (std::path::PathBuf, String) {
    let keys = dir.path().join("keys.toml");
    std::fs::write(&keys, "[[keys]]\nkey = \"k3\"\ntenant = \"t\"\n").unwrap();
    let keys = keys.to_str().unwrap().to_owned();
    let path = dir.path().join("kvroute.toml");
    std::fs::write(&path, FILE.replace("KEYS_FILE", &keys)).unwrap();
    (path, keys)
}

#[test]
fn a_file_and_the_flags_give_the_same_configuration() {
    let dir = tempfile::tempdir().unwrap();
    let (path, keys) = write_config(&dir);
    let keys = keys.as_str();
    let from_file = kvroute(&["config", "check", path.to_str().unwrap()], &[]);
    let flags: Vec<String> = FLAGS.iter().map(|f| f.replace("KEYS_FILE", keys)).collect();
    let mut check = vec!["config", "check"];
    check.extend(flags.iter().map(String::as_str));
    let from_flags = kvroute(&check, &[]);
    assert_eq!(from_file, from_flags);
    // Every setting differs from its default: the comparison covers them all.
    let defaults = kvroute(&["config", "check", "--worker=1=http://10.0.0.1:8000"], &[]);
    for line in from_file.lines().filter(|l| l.contains(" = ")) {
        if !line.starts_with("id = 1") && !line.contains("10.0.0.1:8000") {
            assert!(!defaults.contains(line), "{line:?} is a default");
        }
    }
}

#[test]
fn flags_override_the_file_and_the_environment_fills_in() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = write_config(&dir);
    let path = path.to_str().unwrap();
    let config = kvroute(
        &["config", "check", path, "--block-size=64"],
        &[("KVROUTE_MODEL", "env/model")],
    );
    assert!(config.contains("block_size = 64"), "{config}");
    assert!(config.contains("name = \"env/model\""), "{config}");
    assert!(config.contains("namespace = \"prod\""), "{config}");
}

#[test]
fn unprefixed_environment_names_still_work() {
    let config = kvroute(
        &["config", "check"],
        &[
            ("MODEL", "old/name"),
            ("BLOCK_SIZE", "8"),
            ("WORKERS", "3=http://h:1,4=http://h:2"),
            ("NO_DISCOVERY", "1"),
        ],
    );
    assert!(config.contains("name = \"old/name\""), "{config}");
    assert!(config.contains("block_size = 8"), "{config}");
    assert!(config.contains("id = 4"), "{config}");
    assert!(config.contains("discovery = false"), "{config}");
    // The prefixed name wins over the alias.
    let config = kvroute(
        &["config", "check", "--worker=1=http://h:1"],
        &[("MODEL", "old"), ("KVROUTE_MODEL", "new")],
    );
    assert!(config.contains("name = \"new\""), "{config}");
}

#[test]
fn the_example_parses_to_the_defaults_and_mistakes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("example.toml");
    std::fs::write(&path, kvroute(&["config", "example"], &[])).unwrap();
    let example = kvroute(&["config", "check", path.to_str().unwrap()], &[]);
    let defaults = kvroute(&["config", "check"], &[]);
    assert_eq!(example, defaults);

    std::fs::write(&path, "[model]\nblock_sise = 16\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["config", "check", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("block_sise"), "{stderr}");
}

#[test]
fn worker_event_endpoints_select_the_engine_source() {
    let flags = kvroute(
        &[
            "config",
            "check",
            "--worker=1=http://h:8000",
            "--worker-events=1=tcp://h:5557",
        ],
        &[],
    );
    assert!(flags.contains("source = \"engines\""), "{flags}");
    assert!(flags.contains("events = \"tcp://h:5557\""), "{flags}");
    let env = kvroute(
        &["config", "check"],
        &[
            ("KVROUTE_WORKERS", "1=http://h:8000"),
            ("KVROUTE_WORKER_EVENTS", "1=tcp://h:5557"),
        ],
    );
    assert_eq!(flags, env);

    let output = Command::new(env!("CARGO_BIN_EXE_kvroute"))
        .args(["config", "check", "--worker=1=http://h:8000"])
        .arg("--worker-events=2=tcp://h:5557")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("names worker 2"), "{stderr}");
}
