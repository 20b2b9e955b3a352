//! Sending a request to the chosen worker, with retries on another worker before the first
//! byte, circuit breaking, and a streamed response.

use crate::registry::{Eligible, LoadGuard, Registry, Worker};
use crate::Candidate;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use std::time::{Duration, Instant};

/// Forwarding settings.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardConfig {
    /// TCP connect timeout per attempt.
    pub connect_timeout: Duration,
    /// How long to wait for a worker's response headers before trying another.
    pub response_timeout: Duration,
    /// Workers tried per request (the first choice plus retries elsewhere).
    pub max_attempts: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            response_timeout: Duration::from_secs(60),
            max_attempts: 3,
        }
    }
}

/// Why no worker answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No worker was eligible (none registered, or every circuit open).
    #[error("no worker is available")]
    NoWorkers,
    /// Every attempt failed before a response arrived.
    #[error("{attempts} worker(s) failed; last: {last}")]
    AllFailed {
        /// Workers tried.
        attempts: usize,
        /// The last failure.
        last: String,
    },
}

/// A worker's response, streaming, with the load guard to drop when the stream ends.
#[derive(Debug)]
#[non_exhaustive]
pub struct Forwarded {
    /// The worker that answered.
    pub worker: Worker,
    /// Its response; the body streams as the worker writes it.
    pub response: Response<Incoming>,
    /// Counts the request in the worker's load until dropped.
    pub guard: LoadGuard,
    /// Workers tried (1 when the first choice answered).
    pub attempts: usize,
}

/// Request headers passed to workers.
const FORWARDED_HEADERS: [&str; 4] = ["authorization", "accept", "x-request-id", "traceparent"];

/// A pooled HTTP/1 client to the workers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Forwarder {
    client: Client<HttpConnector, Full<Bytes>>,
    config: ForwardConfig,
}

impl Forwarder {
    /// A forwarder with its own connection pool. Creating it does no I/O; sending needs a
    /// Tokio runtime.
    pub fn new(config: ForwardConfig) -> Self {
        let mut connector = HttpConnector::new();
        // Without TCP_NODELAY the first streamed chunk can wait for a delayed ACK (~40 ms).
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(config.connect_timeout));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { client, config }
    }

    /// Posts `body` to `path` on the first candidate that answers, in order. Connection
    /// errors, timeouts and 5xx responses (before any body byte reached the client) count
    /// against that worker's circuit breaker and move on to the next candidate; any other
    /// response is returned as is.
    pub async fn post(
        &self,
        registry: &Registry,
        candidates: impl IntoIterator<Item = (Eligible, Candidate)>,
        path: &str,
        client_headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Forwarded, ForwardError> {
        let mut attempts = 0;
        let mut last = None;
        for (candidate, row) in candidates.into_iter().take(self.config.max_attempts) {
            attempts += 1;
            let worker = candidate.worker().clone();
            let guard = candidate.start_request(&row);
            let request = build_request(&worker, path, client_headers, body.clone());
            let outcome =
                tokio::time::timeout(self.config.response_timeout, self.client.request(request))
                    .await;
            match outcome {
                Ok(Ok(response)) if !response.status().is_server_error() => {
                    registry.record_success(worker.id);
                    return Ok(Forwarded {
                        worker,
                        response,
                        guard,
                        attempts,
                    });
                }
                Ok(Ok(response)) => {
                    last = Some(format!(
                        "worker {} answered {}",
                        worker.id,
                        response.status()
                    ));
                }
                Ok(Err(error)) => {
                    last = Some(format!("worker {}: {error}", worker.id));
                }
                Err(_) => {
                    last = Some(format!(
                        "worker {} sent no response within {:?}",
                        worker.id, self.config.response_timeout
                    ));
                }
            }
            registry.record_failure(worker.id, Instant::now());
        }
        match last {
            None => Err(ForwardError::NoWorkers),
            Some(last) => Err(ForwardError::AllFailed { attempts, last }),
        }
    }
}

fn build_request(
    worker: &Worker,
    path: &str,
    client_headers: &HeaderMap,
    body: Bytes,
) -> Request<Full<Bytes>> {
    let mut request = Request::new(Full::new(body));
    *request.method_mut() = Method::POST;
    *request.uri_mut() = match format!("{}{path}", worker.url).parse() {
        Ok(uri) => uri,
        // Registered URLs are validated when workers are added; an unparsable one fails the
        // attempt like an unreachable worker.
        Err(_) => http::Uri::from_static("http://invalid.invalid/"),
    };
    let headers = request.headers_mut();
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for name in FORWARDED_HEADERS {
        if let Some(value) = client_headers.get(name) {
            headers.insert(name, value.clone());
        }
    }
    request
}
