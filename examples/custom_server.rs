//! `kvroute serve` plus an embedder's own policy and middleware, in one screen: the server is
//! kvroute-gateway's composition root ([`Server::builder`]); only the policy and the
//! middleware are this program's. docs/embedding.md walks through it.
//!
//! ```sh
//! cargo run -p kvroute-examples --example custom_server -- \
//!     --config kvroute.toml --client-key secret
//! ```

use clap::Parser;
use http::{HeaderValue, Request, Response, StatusCode};
use hyper::body::Incoming;
use kvroute_dispatch::{decision_row, Candidate, CandidateInput, Decision, RoutingPolicy};
use kvroute_gateway::{error_response, GatewayBody, Next, Server, ServerBuilder, ServerConfig};
use kvroute_protocol::ErrorBody;
use std::error::Error;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// kvroute with a cache-first policy and a client key.
#[derive(Parser, Debug)]
pub struct Args {
    /// A kvroute configuration file (`kvroute config example` prints one).
    #[arg(long)]
    config: Option<PathBuf>,
    /// The bearer token clients must send.
    #[arg(long)]
    client_key: String,
}

/// The worker holding the longest cached prefix, then the one with the fewest requests in
/// flight: an operator who would rather queue than recompute.
#[derive(Debug, Default)]
pub struct CacheFirst;

impl CacheFirst {
    fn order(candidates: &[CandidateInput]) -> Vec<CandidateInput> {
        let mut ordered = candidates.to_vec();
        ordered.sort_by_key(|c| {
            (
                std::cmp::Reverse(c.overlap_blocks),
                c.active_requests,
                c.worker,
            )
        });
        ordered
    }
}

impl RoutingPolicy for CacheFirst {
    fn name(&self) -> &str {
        "cache-first"
    }

    fn choose(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Option<Candidate> {
        let best = *Self::order(candidates).first()?;
        decision_row(prompt_blocks, best)
    }

    fn decide(&mut self, prompt_blocks: usize, candidates: &[CandidateInput]) -> Decision {
        let mut decision = Decision::without_candidates(prompt_blocks);
        decision.table = Self::order(candidates)
            .into_iter()
            .filter_map(|c| decision_row(prompt_blocks, c))
            .collect();
        decision
    }
}

/// Refuses requests without the client key, except health checks; numbers the others.
async fn authenticate(
    key: Arc<str>,
    served: Arc<AtomicU64>,
    request: Request<Incoming>,
    next: Next,
) -> Response<GatewayBody> {
    let path = request.uri().path();
    let open = matches!(path, "/health" | "/ready");
    let sent = request
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    if !open && sent != Some(&*key) {
        let body = ErrorBody::new(
            "invalid_request_error",
            "missing or wrong client key",
            None,
            "invalid_api_key",
        );
        return error_response(StatusCode::UNAUTHORIZED, &body);
    }
    let number = served.fetch_add(1, Ordering::Relaxed);
    let policy = next.gateway().config().policy.name();
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    headers.insert("x-request-number", HeaderValue::from(number));
    if let Ok(policy) = HeaderValue::from_str(&policy) {
        headers.insert("x-routing-policy", policy);
    }
    response
}

/// The server this program runs: kvroute's, with the policy and the middleware above.
pub fn builder(config: ServerConfig, client_key: &str) -> ServerBuilder {
    let key: Arc<str> = client_key.into();
    let served = Arc::new(AtomicU64::new(0));
    Server::builder(config)
        .policy(|_routing| Box::new(CacheFirst))
        .middleware(move |request, next| authenticate(key.clone(), served.clone(), request, next))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn Error>> {
    let args = Args::parse();
    let config = match &args.config {
        Some(path) => ServerConfig::from_file(path)?,
        None => ServerConfig::default(),
    };
    let server = builder(config, &args.client_key).start().await?;
    println!("custom kvroute server on http://{}", server.local_addr());
    let reload_from = args.config.clone();
    server
        .run_until_signal(|| match &reload_from {
            Some(path) => ServerConfig::from_file(path),
            None => Ok(ServerConfig::default()),
        })
        .await?;
    Ok(())
}
