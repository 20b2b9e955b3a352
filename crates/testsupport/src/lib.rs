//! Test support shared by kvroute's integration tests (never published, never a dependency of
//! a library): a `nats-server -js` of the test's own on a free port with a temporary store
//! ([`NatsServer`]) or a cluster of three ([`NatsCluster`]), a small JSON-over-HTTP client
//! ([`HttpClient`]) and a gateway under test ([`Router`]), child processes killed however a
//! test ends ([`Processes`]), and request fixtures ([`image_chat_request`]).
//!
//! It panics on failure by design: a test that cannot set up must fail loudly.
//!
//! ```no_run
//! # async fn run() {
//! let server = kvroute_testsupport::NatsServer::start().await;
//! let client = kvroute_testsupport::HttpClient::new();
//! # let _ = (server.url(), client);
//! # }
//! ```

#![allow(clippy::unwrap_used, clippy::expect_used)] // test support fails loudly by design

mod edge;
mod http_client;
mod nats;
mod process;

pub use edge::{closed_within, connect_and_send, SlowWorker};
pub use http_client::{assert_cut_stream, wait_for_port, HttpClient, Reply, Router};
pub use nats::{free_port, nats_server_binary, NatsCluster, NatsServer};
pub use process::{kvroute_command, Processes};

use base64::Engine;
use std::path::PathBuf;

/// The repository's `tests/fixtures` directory.
pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures")
}

/// A `data:` URL of the fixture image `tests/fixtures/images/{name}`.
pub fn image_data_url(name: &str) -> String {
    let path = fixtures_dir().join("images").join(name);
    let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mime = match path.extension().and_then(|e| e.to_str()) {
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("webp") => "image/webp",
        _ => "image/png",
    };
    format!(
        "data:{mime};base64,{}",
        base64::engine::general_purpose::STANDARD.encode(bytes)
    )
}

/// A one-token chat request for model `m` with the fixture image `image` followed by `text`.
pub fn image_chat_request(image: &str, text: &str) -> serde_json::Value {
    serde_json::json!({"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": image_data_url(image)}},
        {"type": "text", "text": text}]}]})
}
