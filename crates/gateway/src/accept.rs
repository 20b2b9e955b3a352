//! The accept loop shared by the gateway and the simulated worker of `kvroute-sim`.

use crate::body::GatewayBody;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use std::future::Future;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves HTTP/1.1 and HTTP/2 on `listener`, each request through `handle`, until `shutdown`
/// completes; then stops accepting and waits for in-flight requests. When `kill` turns true,
/// every connection is dropped at once instead (a simulated crash).
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
    let graceful = GracefulShutdown::new();
    let builder = auto::Builder::new(TokioExecutor::new());
    tokio::pin!(shutdown);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(%error, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        // Streamed chunks must not wait for the peer's delayed ACK.
        let _ = stream.set_nodelay(true);
        let handle = handle.clone();
        let service = service_fn(move |request| {
            let response = handle(request);
            async move { Ok::<_, std::convert::Infallible>(response.await) }
        });
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        let mut kill = kill.clone();
        tokio::spawn(async move {
            let killed = async {
                match kill.as_mut() {
                    Some(kill) => {
                        let _ = kill.wait_for(|killed| *killed).await;
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                result = connection => {
                    if let Err(error) = result {
                        tracing::debug!(%error, "connection ended with an error");
                    }
                }
                () = killed => {}
            }
        });
    }
    graceful.shutdown().await;
    Ok(())
}
