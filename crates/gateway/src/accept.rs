//! The accept loop shared by the gateway and the simulated worker of `kvroute-sim`, with the
//! connection limits of an internet-facing server.

use crate::body::{BoxError, GatewayBody};
use bytes::Bytes;
use http::{HeaderValue, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use metrics::{counter, gauge};
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};

/// What one client connection may hold, and for how long.
///
/// ```
/// use kvroute_gateway::ConnectionLimits;
/// use std::time::Duration;
///
/// let limits = ConnectionLimits::default().with_idle_timeout(Duration::from_secs(5));
/// assert_eq!(limits.idle_timeout, Duration::from_secs(5));
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct ConnectionLimits {
    /// Open connections; one more is accepted and closed at once.
    pub max_connections: usize,
    /// Largest request head in bytes (HTTP/1 read buffer, HTTP/2 header list; at least 8192).
    pub max_header_bytes: usize,
    /// Time a client has to send a request's headers.
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight.
    pub idle_timeout: Duration,
    /// Requests on one HTTP/1 connection before the server closes it.
    pub max_requests_per_connection: u64,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 4096,
            max_header_bytes: 64 << 10,
            header_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            max_requests_per_connection: 10_000,
        }
    }
}

impl ConnectionLimits {
    /// Sets the connection limit.
    pub fn with_max_connections(mut self, connections: usize) -> Self {
        self.max_connections = connections.max(1);
        self
    }

    /// Sets the largest request head.
    pub fn with_max_header_bytes(mut self, bytes: usize) -> Self {
        self.max_header_bytes = bytes.max(crate::config::MIN_HEADER_BYTES);
        self
    }

    /// Sets the time a client has to send a request's headers.
    pub fn with_header_read_timeout(mut self, timeout: Duration) -> Self {
        self.header_read_timeout = timeout;
        self
    }

    /// Sets the time a connection may stay open with nothing in flight.
    pub fn with_idle_timeout(mut self, timeout: Duration) -> Self {
        self.idle_timeout = timeout;
        self
    }

    /// Sets the requests served per HTTP/1 connection.
    pub fn with_max_requests_per_connection(mut self, requests: u64) -> Self {
        self.max_requests_per_connection = requests.max(1);
        self
    }
}

/// Serves HTTP/1.1 and HTTP/2 on `listener`, each request through `handle`, until `shutdown`
/// completes; then stops accepting and waits for in-flight requests. When `kill` turns true,
/// every connection is dropped at once instead (a simulated crash). Connections get the
/// default [`ConnectionLimits`] (see [`serve_http_with`]).
///
/// ```no_run
/// use kvroute_gateway::{json_response, serve_http};
/// use http::StatusCode;
///
/// # async fn run() -> std::io::Result<()> {
/// let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
/// let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
/// # drop(stop);
/// serve_http(listener, async { let _ = stopped.await; }, None, |_request| async {
///     json_response(StatusCode::OK, &serde_json::json!({"status": "ok"}))
/// })
/// .await
/// # }
/// ```
pub async fn serve_http<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    kill: Option<watch::Receiver<bool>>,
    handle: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    serve_http_with(
        listener,
        shutdown,
        kill,
        ConnectionLimits::default(),
        handle,
    )
    .await
}

/// [`serve_http`] with these connection limits. Connections past `max_connections` are
/// closed as soon as they are accepted (counted in `kvroute_connections_refused_total`); the
/// open ones are the `kvroute_connections` gauge.
pub async fn serve_http_with<H, F>(
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
    kill: Option<watch::Receiver<bool>>,
    limits: ConnectionLimits,
    handle: H,
) -> std::io::Result<()>
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    let builder = connection_builder(&limits);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    // Out of file descriptors, typically: back off instead of spinning.
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            // Refused fast: the client sees the connection close at once.
            counter!("kvroute_connections_refused_total").increment(1);
            drop(stream);
            continue;
        };
        // Streamed chunks must not wait for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let activity = Arc::new(Activity::new());
        let service = counted_service(
            handle.clone(),
            Arc::clone(&activity),
            limits.max_requests_per_connection,
        );
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        let idle_timeout = limits.idle_timeout;
        let killed = killed(kill.clone());
        tokio::spawn(async move {
            let _slot = slot;
            gauge!("kvroute_connections").increment(1.0);
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = killed => {}
                () = activity.idle_for(idle_timeout) => {
                    counter!("kvroute_connections_idle_closed_total").increment(1);
                }
            }
            gauge!("kvroute_connections").decrement(1.0);
        });
    }
    graceful.shutdown().await;
    Ok(())
}

/// HTTP/1 and HTTP/2 with the limits' header bounds and header read timeout.
fn connection_builder(limits: &ConnectionLimits) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(crate::config::MIN_HEADER_BYTES));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// `handle` as a connection's service: each request counted in `activity` until its response
/// body is sent, and `connection: close` on the HTTP/1 response that reaches
/// `max_requests`.
fn counted_service<H, F>(
    handle: H,
    activity: Arc<Activity>,
    max_requests: u64,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = Response<GatewayBody>,
    Error = std::convert::Infallible,
    Future = impl Future<Output = Result<Response<GatewayBody>, std::convert::Infallible>>
                 + Send
                 + 'static,
> + Clone
       + Send
       + 'static
where
    H: Fn(Request<Incoming>) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<GatewayBody>> + Send + 'static,
{
    service_fn(move |request: Request<Incoming>| {
        let close = activity.start() >= max_requests && request.version() <= Version::HTTP_11;
        let guard = InFlight(Arc::clone(&activity));
        let response = handle(request);
        async move {
            let mut response = response.await;
            if close {
                response
                    .headers_mut()
                    .insert(http::header::CONNECTION, HeaderValue::from_static("close"));
            }
            // The request is in flight until its body is sent (a stream can be long).
            Ok(response.map(|body| {
                Tracked {
                    inner: body,
                    _guard: guard,
                }
                .boxed_unsync()
            }))
        }
    })
}

/// Completes when `kill` turns true; never without one.
async fn killed(kill: Option<watch::Receiver<bool>>) {
    match kill {
        Some(mut kill) => {
            let _ = kill.wait_for(|killed| *killed).await;
        }
        None => std::future::pending().await,
    }
}

/// A connection's requests: how many were started, how many are in flight, and when the
/// last one ended.
struct Activity {
    opened: Instant,
    started: AtomicU64,
    in_flight: AtomicUsize,
    /// Milliseconds after `opened` when the connection last had nothing in flight.
    idle_since_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            opened: Instant::now(),
            started: AtomicU64::new(0),
            in_flight: AtomicUsize::new(0),
            idle_since_ms: AtomicU64::new(0),
        }
    }

    /// Counts a request in; returns how many this connection has started.
    fn start(&self) -> u64 {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.started.fetch_add(1, Ordering::Relaxed) + 1
    }

    fn end(&self) {
        let now = u64::try_from(self.opened.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.idle_since_ms.store(now, Ordering::SeqCst);
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
    }

    /// Completes once the connection has had nothing in flight for `timeout`.
    async fn idle_for(&self, timeout: Duration) {
        loop {
            let since =
                self.opened + Duration::from_millis(self.idle_since_ms.load(Ordering::SeqCst));
            let deadline = since + timeout;
            if self.in_flight.load(Ordering::SeqCst) == 0 && Instant::now() >= deadline {
                return;
            }
            // Busy (or not yet due): look again one timeout from the last idle moment, or
            // one timeout from now when a request is in flight.
            let wake = if self.in_flight.load(Ordering::SeqCst) == 0 {
                deadline
            } else {
                Instant::now() + timeout
            };
            tokio::time::sleep_until(wake.into()).await;
        }
    }
}

/// Ends a request's time in flight when dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// A response body that keeps its request counted in flight until it is sent or dropped.
struct Tracked {
    inner: GatewayBody,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
