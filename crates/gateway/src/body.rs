//! Response bodies: small JSON bodies, and a worker's streamed body passed through.

use crate::usage::{cached_tokens, PredictionOutcome};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode};
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Body, Frame, SizeHint};
use kvroute_dispatch::{LoadGuard, WorkerBody};
use kvroute_protocol::ErrorBody;
use metrics::counter;
use std::pin::Pin;
use std::task::{Context, Poll};

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
            guard: Some(guard),
            first_byte: false,
            sse,
            on_error: Some(on_error),
            predicted_cached_tokens,
            reported_cached_tokens: None,
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
            Poll::Pending => Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => {
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
                this.guard = None;
                if this.sse {
                    let event = serde_json::json!({"error": {
                        "message": format!("the worker failed mid-stream: {error}"),
                        "type": "server_error",
                        "param": null,
                        "code": "worker_failed",
                    }});
                    Poll::Ready(Some(Ok(Frame::data(Bytes::from(format!(
                        "data: {event}\n\ndata: [DONE]\n\n"
                    ))))))
                } else {
                    Poll::Ready(Some(Err(Box::new(error))))
                }
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
