//! Response bodies: small JSON bodies, and a worker's streamed body passed through.

use crate::usage::{cached_tokens, PredictionOutcome};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use kvroute_dispatch::{LoadGuard, WorkerBody};
use kvroute_protocol::ErrorBody;
use metrics::counter;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::time::Sleep;

/// Any error a response body can end with.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body type of every gateway response.
pub type GatewayBody = UnsyncBoxBody<Bytes, BoxError>;

/// A complete body.
pub fn full(bytes: impl Into<Bytes>) -> GatewayBody {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed_unsync()
}

/// A JSON response.
pub fn json_response(status: StatusCode, value: &impl serde::Serialize) -> Response<GatewayBody> {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    let mut response = Response::new(full(bytes));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// An OpenAI-style error response.
pub fn error_response(status: StatusCode, body: &ErrorBody) -> Response<GatewayBody> {
    json_response(status, body)
}

/// Called once when a worker's body fails mid-stream.
pub type StreamErrorHook = Box<dyn FnOnce(&hyper::Error) + Send>;

/// A worker's response body on its way to the client.
///
/// Keeps the request counted in the worker's load until the body ends (or the client goes
/// away and hyper drops it, which also drops the upstream connection and so cancels the
/// request on the worker), marks the prefill done at the first byte, and, if the worker dies
/// mid-stream, ends an SSE stream with an OpenAI-style error event instead of a silent cut.
pub struct Passthrough {
    inner: WorkerBody,
    /// The longest silence allowed between two chunks, and the timer of the current one.
    idle: Option<(Duration, Pin<Box<Sleep>>)>,
    /// The end of the request's total time.
    deadline: Option<Pin<Box<Sleep>>>,
    guard: Option<LoadGuard>,
    first_byte: bool,
    sse: bool,
    on_error: Option<StreamErrorHook>,
    predicted_cached_tokens: u64,
    reported_cached_tokens: Option<u64>,
}

impl Passthrough {
    /// Wraps `inner`; `sse` says whether the client asked for a stream; `on_error` is called
    /// once if the worker fails mid-body. At the end of the body, the cached tokens the worker
    /// reports (if it does) are compared with `predicted_cached_tokens` in the metrics.
    pub fn new(
        inner: WorkerBody,
        guard: LoadGuard,
        sse: bool,
        on_error: StreamErrorHook,
        predicted_cached_tokens: u64,
    ) -> Self {
        Self {
            inner,
            idle: None,
            deadline: None,
            guard: Some(guard),
            first_byte: false,
            sse,
            on_error: Some(on_error),
            predicted_cached_tokens,
            reported_cached_tokens: None,
        }
    }
}

impl Passthrough {
    /// Ends the body when the worker stays silent for `idle`, or at `deadline`. Neither counts
    /// against the worker's breaker: a slow generation is not a failed worker.
    pub fn with_timeouts(mut self, idle: Option<Duration>, deadline: Option<Instant>) -> Self {
        self.idle = idle.map(|idle| (idle, Box::pin(tokio::time::sleep(idle))));
        self.deadline = deadline.map(|at| Box::pin(tokio::time::sleep_until(at.into())));
        self
    }

    /// Which timeout, if any, has run out.
    fn timed_out(&mut self, cx: &mut Context<'_>) -> Option<&'static str> {
        if let Some(deadline) = self.deadline.as_mut() {
            if deadline.as_mut().poll(cx).is_ready() {
                return Some("total");
            }
        }
        if let Some((_, idle)) = self.idle.as_mut() {
            if idle.as_mut().poll(cx).is_ready() {
                return Some("stream_idle");
            }
        }
        None
    }

    /// Ends the body with an error: an SSE error event for a stream, a cut otherwise.
    fn fail(
        &mut self,
        message: String,
        code: &str,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.guard = None;
        if self.sse {
            let event = serde_json::json!({"error": {
                "message": message,
                "type": "server_error",
                "param": null,
                "code": code,
            }});
            Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                "data: {event}\n\ndata: [DONE]\n\n"
            ))))))
        } else {
            Poll::Ready(Some(Err(message.into())))
        }
    }
}

impl Drop for Passthrough {
    /// Compares prediction and report here: hyper stops polling a body that says it has ended,
    /// so the end is not always seen in `poll_frame`.
    fn drop(&mut self) {
        if let Some(reported) = self.reported_cached_tokens {
            let outcome = PredictionOutcome::of(self.predicted_cached_tokens, reported);
            counter!("kvroute_reported_cached_tokens_total").increment(reported);
            counter!("kvroute_cache_prediction_checks_total", "outcome" => outcome.as_str())
                .increment(1);
        }
    }
}

impl Body for Passthrough {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.guard.is_none() {
            return Poll::Ready(None);
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => match this.timed_out(cx) {
                None => Poll::Pending,
                Some(which) => {
                    counter!("kvroute_upstream_timeouts_total", "phase" => which).increment(1);
                    this.fail(
                        format!("the worker's response ran past the {which} timeout"),
                        "worker_timeout",
                    )
                }
            },
            Poll::Ready(Some(Ok(frame))) => {
                if let Some((idle, timer)) = this.idle.as_mut() {
                    timer.as_mut().reset(tokio::time::Instant::now() + *idle);
                }
                if let Some(data) = frame.data_ref() {
                    if !this.first_byte {
                        this.first_byte = true;
                        if let Some(guard) = this.guard.as_mut() {
                            guard.prefill_done();
                        }
                    }
                    if let Some(reported) = cached_tokens(data) {
                        this.reported_cached_tokens = Some(reported);
                    }
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(error))) => {
                if let Some(on_error) = this.on_error.take() {
                    on_error(&error);
                }
                this.fail(
                    format!("the worker failed mid-stream: {error}"),
                    "worker_failed",
                )
            }
            Poll::Ready(None) => {
                this.guard = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.guard.is_none() || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl From<Passthrough> for GatewayBody {
    fn from(body: Passthrough) -> Self {
        body.boxed_unsync()
    }
}
