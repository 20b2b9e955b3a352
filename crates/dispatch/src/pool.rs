//! HTTP/1 connections to the workers, kept open between requests.
//!
//! A connection goes back to the pool when the response body that used it has been read to its
//! end (in [`WorkerBody`]'s `Drop`), and is checked for readiness when it is taken out again.
//! Unlike a pool that watches each connection with a task of its own until it is idle again,
//! this spawns nothing per request: one task per connection drives it for its whole life.

use crate::forward::ForwardBody;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::client::conn::http1::{self, SendRequest};
use hyper_util::rt::TokioIo;
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// Idle connections older than this are closed rather than reused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle connections kept per worker; more are closed when they come back.
const MAX_IDLE_PER_WORKER: usize = 256;
/// How long a connection taken from the pool may take to be ready for the next request (it is
/// at once, unless the connection is broken).
const READY_TIMEOUT: Duration = Duration::from_secs(1);

/// Every this many returned connections, idle ones that closed or expired are dropped for all
/// workers (those of workers that left would stay otherwise).
const SWEEP_EVERY: u32 = 1024;

/// Open connections per worker address (`host:port`).
#[derive(Debug)]
pub(crate) struct Pool {
    connect_timeout: Duration,
    idle: Mutex<IdleConnections>,
}

#[derive(Debug, Default)]
struct IdleConnections {
    by_address: HashMap<Arc<str>, Vec<Idle>>,
    checkins_since_sweep: u32,
}

#[derive(Debug)]
struct Idle {
    sender: SendRequest<ForwardBody>,
    since: Instant,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SendError {
    #[error("connect to {address}: {source}")]
    Connect {
        address: Arc<str>,
        source: std::io::Error,
    },
    #[error("connect to {address}: no connection within {timeout:?}")]
    ConnectTimeout {
        address: Arc<str>,
        timeout: Duration,
    },
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

impl Pool {
    pub(crate) fn new(connect_timeout: Duration) -> Self {
        Self {
            connect_timeout,
            idle: Mutex::default(),
        }
    }

    /// Sends `request` to the worker at `address` on an idle connection, or a new one. A
    /// request that an idle connection closed before taking (the worker closed it meanwhile)
    /// is sent again on another.
    pub(crate) async fn send(
        self: &Arc<Self>,
        address: &Arc<str>,
        mut request: Request<ForwardBody>,
    ) -> Result<Response<WorkerBody>, SendError> {
        loop {
            let (mut sender, reused) = match self.checkout(address).await {
                Some(sender) => (sender, true),
                None => (self.connect(address).await?, false),
            };
            match sender.try_send_request(request).await {
                Ok(response) => {
                    let checkin = Checkin {
                        sender,
                        pool: Arc::clone(self),
                        address: Arc::clone(address),
                    };
                    return Ok(response.map(|inner| WorkerBody {
                        inner,
                        ended: false,
                        checkin: Some(checkin),
                    }));
                }
                Err(mut error) => match error.take_message() {
                    Some(unsent) if reused => request = unsent,
                    _ => return Err(error.into_error().into()),
                },
            }
        }
    }

    /// The most recently returned idle connection to `address` that is ready for a request.
    async fn checkout(&self, address: &Arc<str>) -> Option<SendRequest<ForwardBody>> {
        loop {
            let idle = self
                .idle
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .by_address
                .get_mut(address)?
                .pop()?;
            if !idle.usable() {
                continue;
            }
            let mut sender = idle.sender;
            if let Ok(Ok(())) = tokio::time::timeout(READY_TIMEOUT, sender.ready()).await {
                return Some(sender);
            }
        }
    }

    async fn connect(&self, address: &Arc<str>) -> Result<SendRequest<ForwardBody>, SendError> {
        let stream =
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address.as_ref()))
                .await
            {
                Ok(Ok(stream)) => stream,
                Ok(Err(source)) => {
                    return Err(SendError::Connect {
                        address: Arc::clone(address),
                        source,
                    })
                }
                Err(_) => {
                    return Err(SendError::ConnectTimeout {
                        address: Arc::clone(address),
                        timeout: self.connect_timeout,
                    })
                }
            };
        // Without TCP_NODELAY the first streamed chunk can wait for a delayed ACK (~40 ms).
        stream
            .set_nodelay(true)
            .map_err(|source| SendError::Connect {
                address: Arc::clone(address),
                source,
            })?;
        let (sender, connection) = http1::handshake(TokioIo::new(stream)).await?;
        // Its errors reach the request or the response body being read.
        tokio::spawn(async move {
            let _ = connection.await;
        });
        Ok(sender)
    }

    fn checkin(&self, address: Arc<str>, sender: SendRequest<ForwardBody>) {
        if sender.is_closed() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.checkins_since_sweep += 1;
        if idle.checkins_since_sweep >= SWEEP_EVERY {
            idle.checkins_since_sweep = 0;
            idle.by_address.retain(|_, connections| {
                connections.retain(Idle::usable);
                !connections.is_empty()
            });
        }
        let connections = idle.by_address.entry(address).or_default();
        if connections.len() < MAX_IDLE_PER_WORKER {
            connections.push(Idle {
                sender,
                since: Instant::now(),
            });
        }
    }

    /// Idle connections to `address` (for tests).
    #[cfg(test)]
    fn idle_count(&self, address: &str) -> usize {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_address
            .get(address)
            .map_or(0, Vec::len)
    }
}

impl Idle {
    /// Not closed by either side, and not idle for too long.
    fn usable(&self) -> bool {
        !self.sender.is_closed() && self.since.elapsed() <= IDLE_TIMEOUT
    }
}

/// Where a connection goes back when its response has been read.
#[derive(Debug)]
struct Checkin {
    sender: SendRequest<ForwardBody>,
    pool: Arc<Pool>,
    address: Arc<str>,
}

/// A worker's response body, streamed as it arrives. Its connection is reused for another
/// request once the body has been read to the end; a body dropped before that closes it.
#[derive(Debug)]
pub struct WorkerBody {
    inner: Incoming,
    ended: bool,
    checkin: Option<Checkin>,
}

impl Body for WorkerBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let frame = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(None) = frame {
            self.ended = true;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for WorkerBody {
    /// Here rather than in `poll_frame`: a server stops polling a body that says it has ended
    /// (a body with a length), so its end is not always seen there.
    fn drop(&mut self) {
        if self.ended || self.inner.is_end_stream() {
            if let Some(Checkin {
                sender,
                pool,
                address,
            }) = self.checkin.take()
            {
                pool.checkin(address, sender);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A worker that answers every request on a connection with `answer`, counting the
    /// connections it accepts; with `close_after_one`, it closes each connection after one
    /// answer without saying so.
    async fn worker(answer: &'static [u8], close_after_one: bool) -> (Arc<str>, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Arc<str> = listener.local_addr().unwrap().to_string().into();
        let accepted = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&accepted);
        tokio::spawn(async move {
            loop {
                let (mut socket, _) = listener.accept().await.unwrap();
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut request = Vec::new();
                    let mut buffer = [0u8; 4096];
                    loop {
                        let Ok(n) = socket.read(&mut buffer).await else {
                            return;
                        };
                        if n == 0 {
                            return;
                        }
                        request.extend_from_slice(&buffer[..n]);
                        // Requests here have a two-byte body after the head.
                        if let Some(end) = request.windows(4).position(|w| w == b"\r\n\r\n") {
                            if request.len() >= end + 4 + 2 {
                                request.drain(..end + 4 + 2);
                                if socket.write_all(answer).await.is_err() || close_after_one {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        (address, accepted)
    }

    const FIXED: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
    const CHUNKED: &[u8] =
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nok\r\n1\r\n!\r\n0\r\n\r\n";

    fn request(address: &str) -> Request<ForwardBody> {
        Request::post(format!("http://{address}/v1/chat/completions"))
            .body(ForwardBody::from(Bytes::from_static(b"{}")))
            .unwrap()
    }

    async fn read(response: Response<WorkerBody>) -> Vec<u8> {
        response
            .into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn sequential_requests_share_one_connection() {
        for (answer, body) in [(FIXED, &b"ok"[..]), (CHUNKED, &b"ok!"[..])] {
            let (address, accepted) = worker(answer, false).await;
            let pool = Arc::new(Pool::new(Duration::from_secs(1)));
            for _ in 0..5 {
                let response = pool.send(&address, request(&address)).await.unwrap();
                assert_eq!(read(response).await, body);
                assert_eq!(pool.idle_count(&address), 1);
            }
            assert_eq!(accepted.load(Ordering::SeqCst), 1);
        }
    }

    #[tokio::test]
    async fn concurrent_requests_open_more_and_all_come_back() {
        let (address, accepted) = worker(FIXED, false).await;
        let pool = Arc::new(Pool::new(Duration::from_secs(1)));
        let responses = send_unread(&pool, &address, 3).await;
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
        for response in responses {
            assert_eq!(read(response).await, b"ok");
        }
        assert_eq!(pool.idle_count(&address), 3);
    }

    async fn send_unread(
        pool: &Arc<Pool>,
        address: &Arc<str>,
        n: usize,
    ) -> Vec<Response<WorkerBody>> {
        let mut responses = Vec::new();
        for _ in 0..n {
            // Held unread, so the next request cannot reuse the connection.
            responses.push(pool.send(address, request(address)).await.unwrap());
        }
        responses
    }

    #[tokio::test]
    async fn a_body_dropped_before_its_end_does_not_come_back() {
        let (address, accepted) = worker(CHUNKED, false).await;
        let pool = Arc::new(Pool::new(Duration::from_secs(1)));
        drop(pool.send(&address, request(&address)).await.unwrap());
        assert_eq!(pool.idle_count(&address), 0);
        let response = pool.send(&address, request(&address)).await.unwrap();
        assert_eq!(read(response).await, b"ok!");
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn connections_the_worker_closed_are_replaced() {
        let (address, accepted) = worker(FIXED, true).await;
        let pool = Arc::new(Pool::new(Duration::from_secs(1)));
        for _ in 0..3 {
            let response = pool.send(&address, request(&address)).await.unwrap();
            assert_eq!(read(response).await, b"ok");
            // Give the connection's task the chance to see the close, as a worker's idle
            // timeout would.
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(accepted.load(Ordering::SeqCst), 3);
    }

    #[tokio::test]
    async fn unreachable_workers_fail_to_connect() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address: Arc<str> = listener.local_addr().unwrap().to_string().into();
        drop(listener);
        let pool = Arc::new(Pool::new(Duration::from_secs(1)));
        let error = pool.send(&address, request(&address)).await.unwrap_err();
        assert!(matches!(error, SendError::Connect { .. }), "{error}");
    }
}
