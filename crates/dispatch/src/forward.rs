//! Sending a request to the chosen worker, with retries on another worker before the first
//! byte, circuit breaking, and a streamed response.

use crate::pool::{Pool, WorkerBody};
use crate::registry::{Eligible, LoadGuard, Registry, Worker};
use crate::Candidate;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, Uri};
use hyper::body::{Body, Frame, SizeHint};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// Forwarding settings.
///
/// Only a failure to connect, a broken connection or a 5xx counts against a worker's circuit
/// breaker and moves on to another worker. A timeout waiting for the first byte, or later for
/// the stream, does not: a long generation is slow, not broken, and sending it again elsewhere
/// would only run it twice.
///
/// ```
/// use kvroute_dispatch::ForwardConfig;
/// use std::time::Duration;
///
/// // Non-streaming generations of up to ten minutes.
/// let config = ForwardConfig::default()
///     .with_first_byte_timeout(Duration::from_secs(600))
///     .with_total_timeout(Some(Duration::from_secs(900)));
/// assert_eq!(config.connect_timeout, Duration::from_secs(2));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ForwardConfig {
    /// TCP connect timeout per attempt.
    pub connect_timeout: Duration,
    /// How long to wait for a worker's response headers. A non-streaming response's headers
    /// come with its whole body, so this bounds its generation time.
    pub first_byte_timeout: Duration,
    /// Longest silence between two body chunks of a worker's response (`None`: no limit).
    pub stream_idle_timeout: Option<Duration>,
    /// Longest time from sending a request to the end of its response (`None`: no limit).
    pub total_timeout: Option<Duration>,
    /// Workers tried per request (the first choice plus retries elsewhere).
    pub max_attempts: usize,
}

impl Default for ForwardConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(2),
            first_byte_timeout: Duration::from_secs(300),
            stream_idle_timeout: Some(Duration::from_secs(120)),
            total_timeout: Some(Duration::from_secs(1800)),
            max_attempts: 3,
        }
    }
}

impl ForwardConfig {
    /// Sets the TCP connect timeout.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// Sets how long to wait for a worker's response headers.
    pub fn with_first_byte_timeout(mut self, timeout: Duration) -> Self {
        self.first_byte_timeout = timeout;
        self
    }

    /// Sets the longest silence inside a response body.
    pub fn with_stream_idle_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.stream_idle_timeout = timeout;
        self
    }

    /// Sets the longest time a whole request may take.
    pub fn with_total_timeout(mut self, timeout: Option<Duration>) -> Self {
        self.total_timeout = timeout;
        self
    }

    /// Sets how many workers a request tries.
    pub fn with_max_attempts(mut self, attempts: usize) -> Self {
        self.max_attempts = attempts.max(1);
        self
    }
}

/// Why no worker answered.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ForwardError {
    /// No worker was eligible (none registered, or every circuit open).
    #[error("no worker is available")]
    NoWorkers,
    /// The worker sent no response headers within the first-byte timeout. Not retried and
    /// not counted against the worker's breaker (the generation may simply be long).
    #[error("worker {worker} sent no response within {timeout:?}")]
    Timeout {
        /// The worker waited for.
        worker: kvroute_protocol::WorkerId,
        /// The first-byte timeout.
        timeout: Duration,
    },
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
    pub response: Response<WorkerBody>,
    /// Counts the request in the worker's load until dropped.
    pub guard: LoadGuard,
    /// Workers tried (1 when the first choice answered).
    pub attempts: usize,
}

/// A request body for [`Forwarder::post`]: bytes in chunks, sent in order and never joined,
/// so a large body with a few bytes inserted goes out without being copied. Cheap to clone
/// (each retry sends a clone).
///
/// ```
/// use bytes::Bytes;
/// use kvroute_dispatch::ForwardBody;
///
/// let client = Bytes::from_static(br#"{"a":1}"#);
/// let body = ForwardBody::from_chunks([client.slice(..1), Bytes::from_static(br#""b":2,"#), client.slice(1..)]);
/// assert_eq!(body.len(), 13);
/// assert_eq!(ForwardBody::from(client).len(), 7);
/// ```
#[derive(Clone, Debug, Default)]
pub struct ForwardBody {
    /// The chunks not yet sent, in order.
    chunks: Vec<Bytes>,
    /// The first chunk not yet sent.
    next: usize,
}

impl ForwardBody {
    /// The chunks sent one after the other (empty ones are skipped).
    pub fn from_chunks(chunks: impl IntoIterator<Item = Bytes>) -> Self {
        Self {
            chunks: chunks
                .into_iter()
                .filter(|chunk| !chunk.is_empty())
                .collect(),
            next: 0,
        }
    }

    /// Bytes not yet sent.
    pub fn len(&self) -> usize {
        let unsent = self.chunks.get(self.next..).unwrap_or_default();
        unsent.iter().map(Bytes::len).sum()
    }

    /// Whether every byte was sent (or there were none).
    pub fn is_empty(&self) -> bool {
        self.next >= self.chunks.len()
    }
}

impl From<Bytes> for ForwardBody {
    fn from(bytes: Bytes) -> Self {
        Self::from_chunks([bytes])
    }
}

impl Body for ForwardBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        let Some(chunk) = this.chunks.get_mut(this.next).map(std::mem::take) else {
            return Poll::Ready(None);
        };
        this.next += 1;
        Poll::Ready(Some(Ok(Frame::data(chunk))))
    }

    fn is_end_stream(&self) -> bool {
        self.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len() as u64)
    }
}

/// Request headers passed to workers.
const FORWARDED_HEADERS: [&str; 4] = ["authorization", "accept", "x-request-id", "traceparent"];

/// A pooled HTTP/1 client to the workers. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Forwarder {
    pool: Arc<Pool>,
    config: ForwardConfig,
}

impl Forwarder {
    /// A forwarder with its own connection pool. Creating it does no I/O; sending needs a
    /// Tokio runtime.
    pub fn new(config: ForwardConfig) -> Self {
        Self {
            pool: Arc::new(Pool::new(config.connect_timeout)),
            config,
        }
    }

    /// Posts `body` to `path` on the first candidate that answers, in order. Connection
    /// errors and 5xx responses (before any body byte reached the client) count against that
    /// worker's circuit breaker and move on to the next candidate; a first-byte timeout ends
    /// the request ([`ForwardError::Timeout`]) without either; any other response is returned
    /// as is.
    pub async fn post(
        &self,
        registry: &Registry,
        candidates: impl IntoIterator<Item = (Eligible, Candidate)>,
        path: &str,
        client_headers: &HeaderMap,
        body: impl Into<ForwardBody>,
    ) -> Result<Forwarded, ForwardError> {
        let body = body.into();
        let mut attempts = 0;
        let mut last = None;
        for (candidate, row) in candidates.into_iter().take(self.config.max_attempts) {
            attempts += 1;
            let worker = candidate.worker().clone();
            let guard = candidate.start_request(&row);
            let Some((address, request)) =
                build_request(&worker, path, client_headers, body.clone())
            else {
                // Registered URLs are validated when workers are added; one that still makes
                // no request fails the attempt like an unreachable worker.
                last = Some(format!(
                    "worker {}: unusable URL {:?}",
                    worker.id, worker.url
                ));
                registry.record_failure(worker.id, Instant::now());
                continue;
            };
            let timeout = self.config.first_byte_timeout;
            let outcome = tokio::time::timeout(timeout, self.pool.send(&address, request)).await;
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
                    return Err(ForwardError::Timeout {
                        worker: worker.id,
                        timeout,
                    })
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

/// The worker's socket address (`host:port`) and the request to send it: origin-form target
/// under the worker's base path, `Host`, the JSON content type and the forwarded headers.
/// `None` when the worker's URL makes no request.
fn build_request(
    worker: &Worker,
    path: &str,
    client_headers: &HeaderMap,
    body: ForwardBody,
) -> Option<(Arc<str>, Request<ForwardBody>)> {
    let url: Uri = format!("{}{path}", worker.url).parse().ok()?;
    let host = url.host()?;
    let port = url.port_u16().unwrap_or(80);
    let address: Arc<str> = format!("{host}:{port}").into();
    let mut request = Request::new(body);
    *request.method_mut() = Method::POST;
    *request.uri_mut() = Uri::from(url.path_and_query()?.clone());
    let headers = request.headers_mut();
    // The authority without any user information.
    let host_header = url.authority()?.as_str().rsplit('@').next()?;
    headers.insert(http::header::HOST, HeaderValue::from_str(host_header).ok()?);
    headers.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    for name in FORWARDED_HEADERS {
        if let Some(value) = client_headers.get(name) {
            headers.insert(name, value.clone());
        }
    }
    Some((address, request))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every frame of `body`, polled to the end.
    fn frames(mut body: ForwardBody) -> Vec<Bytes> {
        let mut context = Context::from_waker(std::task::Waker::noop());
        let mut frames = Vec::new();
        while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut context) {
            if let Ok(data) = frame.into_data() {
                frames.push(data);
            }
        }
        assert!(body.is_end_stream());
        // Polled again after its end, it stays ended and empty.
        assert!(matches!(
            Pin::new(&mut body).poll_frame(&mut context),
            Poll::Ready(None)
        ));
        assert_eq!(body.size_hint().exact(), Some(0));
        assert_eq!(body.len(), 0);
        frames
    }

    #[test]
    fn requests_are_origin_form_with_the_host_of_the_worker() {
        let headers = HeaderMap::new();
        for (url, address, target, host) in [
            (
                "http://127.0.0.1:8001",
                "127.0.0.1:8001",
                "/v1/chat/completions",
                "127.0.0.1:8001",
            ),
            (
                "http://user@worker-3",
                "worker-3:80",
                "/v1/chat/completions",
                "worker-3",
            ),
            (
                "http://[::1]:9000/engine",
                "[::1]:9000",
                "/engine/v1/chat/completions",
                "[::1]:9000",
            ),
        ] {
            let worker = Worker::new(kvroute_protocol::WorkerId(1), url).unwrap();
            let (to, request) = build_request(
                &worker,
                "/v1/chat/completions",
                &headers,
                ForwardBody::default(),
            )
            .unwrap();
            assert_eq!(&*to, address, "{url}");
            assert_eq!(request.uri(), target, "{url}");
            assert_eq!(request.headers()[http::header::HOST], host, "{url}");
        }
    }

    #[test]
    fn a_chunked_body_sends_its_chunks_in_order() {
        let client = Bytes::from_static(b"{\"a\":1}");
        let body = ForwardBody::from_chunks([
            client.slice(..1),
            Bytes::new(),
            Bytes::from_static(b"\"b\":2,"),
            client.slice(1..),
        ]);
        assert_eq!(body.size_hint().exact(), Some(13));
        assert!(!body.is_end_stream());
        let retry = body.clone();
        let sent: Vec<u8> = frames(body).concat();
        assert_eq!(sent, b"{\"b\":2,\"a\":1}");
        assert_eq!(frames(retry).concat(), sent);
        assert!(ForwardBody::from(Bytes::new()).is_end_stream());
        assert_eq!(frames(ForwardBody::default()), Vec::<Bytes>::new());
    }
}
