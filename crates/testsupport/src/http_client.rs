//! JSON over HTTP/1.1 for tests.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use std::time::{Duration, Instant};

/// A response read whole.
#[derive(Debug)]
pub struct Reply {
    /// The status code.
    pub status: u16,
    /// The headers.
    pub headers: http::HeaderMap,
    /// The body as JSON, or as a JSON string when it is not JSON.
    pub body: Value,
}

impl Reply {
    /// Header `name` as a string; panics when absent.
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .unwrap_or_else(|| panic!("no {name} header in {self:?}"))
            .to_str()
            .unwrap()
            .to_owned()
    }
}

/// A pooled HTTP/1.1 client.
#[derive(Clone, Debug)]
pub struct HttpClient {
    client: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        Self::new()
    }
}

impl HttpClient {
    /// A client (needs a Tokio runtime to send).
    pub fn new() -> Self {
        Self {
            client: Client::builder(TokioExecutor::new()).build_http(),
        }
    }

    /// Sends `request` as it is (any method, any headers).
    pub async fn send(&self, request: http::Request<Full<Bytes>>) -> Reply {
        Self::read(self.client.request(request).await.unwrap()).await
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> Reply {
        let response = self.client.get(url.parse().unwrap()).await.unwrap();
        Self::read(response).await
    }

    /// `POST url` with a JSON body.
    pub async fn post(&self, url: &str, body: &Value) -> Reply {
        self.post_bytes(url, body.to_string()).await
    }

    /// `POST url` with these bytes as a JSON body (malformed ones included).
    pub async fn post_bytes(&self, url: &str, body: impl Into<Bytes>) -> Reply {
        self.post_with_headers(url, body, &[]).await
    }

    /// `POST url` with a JSON body and extra headers (`authorization`, ...).
    pub async fn post_with_headers(
        &self,
        url: &str,
        body: impl Into<Bytes>,
        headers: &[(&str, &str)],
    ) -> Reply {
        let mut request = http::Request::post(url).header("content-type", "application/json");
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        self.send(request.body(Full::new(body.into())).unwrap())
            .await
    }

    /// `POST url` with a JSON body, or why no whole response came (a server killed before or
    /// while answering, say).
    pub async fn try_post(&self, url: &str, body: &Value) -> Result<Reply, String> {
        let request = http::Request::post(url)
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self
            .client
            .request(request)
            .await
            .map_err(|e| e.to_string())?;
        Self::try_read(response).await
    }

    /// `GET url`, or why no whole response came.
    pub async fn try_get(&self, url: &str) -> Result<Reply, String> {
        let response = self
            .client
            .get(url.parse().unwrap())
            .await
            .map_err(|e| e.to_string())?;
        Self::try_read(response).await
    }

    async fn read(response: http::Response<hyper::body::Incoming>) -> Reply {
        Self::try_read(response).await.unwrap()
    }

    async fn try_read(response: http::Response<hyper::body::Incoming>) -> Result<Reply, String> {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let bytes = response
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        let body = serde_json::from_slice(&bytes)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into()));
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

/// Checks the rest of a stream whose worker died mid-way: an OpenAI error event with code
/// `worker_failed`, then the end marker.
pub fn assert_cut_stream(rest: &[u8]) {
    let rest = String::from_utf8_lossy(rest);
    assert!(rest.contains("\"code\":\"worker_failed\""), "{rest}");
    assert!(rest.ends_with("data: [DONE]\n\n"), "{rest}");
}

/// Waits (up to 20 s) until something accepts connections on 127.0.0.1:`port`.
pub async fn wait_for_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "nothing listens on port {port}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A kvroute gateway under test, at `base` (`http://host:port`).
#[derive(Clone, Debug)]
pub struct Router {
    /// The gateway's base URL.
    pub base: String,
    /// The client requests go through.
    pub http: HttpClient,
}

impl Router {
    /// The gateway at `base`.
    pub fn new(base: impl Into<String>) -> Self {
        Self {
            base: base.into(),
            http: HttpClient::new(),
        }
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Reply {
        self.http.get(&format!("{}{path}", self.base)).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &Value) -> Reply {
        self.http.post(&format!("{}{path}", self.base), body).await
    }

    /// `POST path` with any body.
    pub async fn post_bytes(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.http
            .post_bytes(&format!("{}{path}", self.base), body)
            .await
    }

    /// `POST /v1/chat/completions`.
    pub async fn chat(&self, body: &Value) -> Reply {
        self.post("/v1/chat/completions", body).await
    }

    /// The dry-run decision table of `body` (`POST /v1/route`).
    pub async fn route(&self, body: &Value) -> Value {
        self.post("/v1/route", body).await.body
    }

    /// Waits up to 10 s until some worker holds `blocks` leading blocks of `body` in the
    /// router's index (events are applied asynchronously).
    pub async fn until_overlap(&self, body: &Value, blocks: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let table = self.route(body).await;
            let best = table["workers"]
                .as_array()
                .unwrap()
                .iter()
                .map(|w| w["overlap_blocks"].as_u64().unwrap())
                .max();
            if best >= Some(blocks) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the index never saw {blocks} cached blocks: {table}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Sends `body` twice: the first has no cached prefix, the repeat goes to the same worker,
    /// predicted (`x-kvroute-predicted-cached-tokens`) and reported (`usage`) as a cache hit of
    /// every full block of `block_size` tokens. Returns the repeat's reply.
    pub async fn assert_repeat_is_cache_hit(&self, body: &Value, block_size: u64) -> Reply {
        let first = self.chat(body).await;
        assert_eq!(first.status, 200, "{:?}", first.body);
        assert_eq!(first.header("x-kvroute-overlap-blocks"), "0");
        let blocks: u64 = first.header("x-kvroute-prompt-blocks").parse().unwrap();
        self.until_overlap(body, blocks).await;
        let second = self.chat(body).await;
        assert_eq!(second.status, 200, "{:?}", second.body);
        assert_eq!(
            second.header("x-kvroute-worker"),
            first.header("x-kvroute-worker")
        );
        let predicted: u64 = second
            .header("x-kvroute-predicted-cached-tokens")
            .parse()
            .unwrap();
        assert_eq!(predicted, blocks * block_size);
        assert_eq!(
            second.body["usage"]["prompt_tokens_details"]["cached_tokens"],
            predicted
        );
        second
    }

    /// Checks that no worker holds a prefix of `body` (a new image after the same text, say)
    /// and that sending it reports no cached tokens.
    pub async fn assert_cold(&self, body: &Value) {
        let table = self.route(body).await;
        for worker in table["workers"].as_array().unwrap() {
            assert_eq!(worker["overlap_blocks"], 0, "{table}");
        }
        let reply = self.chat(body).await;
        assert_eq!(reply.status, 200, "{:?}", reply.body);
        assert_eq!(
            reply.body["usage"]["prompt_tokens_details"]["cached_tokens"],
            0
        );
    }

    /// Starts a streaming chat of `body` and reads its first SSE chunk: the worker serving it
    /// (`x-kvroute-worker`) and the rest of the stream, to be read after that worker is made
    /// to fail (see [`assert_cut_stream`]).
    pub async fn open_stream(&self, body: &Value) -> (u64, hyper::body::Incoming) {
        let request = http::Request::post(format!("{}/v1/chat/completions", self.base))
            .header("content-type", "application/json")
            .body(Full::new(Bytes::from(body.to_string())))
            .unwrap();
        let response = self.http.client.request(request).await.unwrap();
        assert_eq!(response.status(), 200);
        let worker = response.headers()["x-kvroute-worker"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let mut stream = response.into_body();
        let first = stream.frame().await.unwrap().unwrap().into_data().unwrap();
        assert!(first.starts_with(b"data: "), "{first:?}");
        (worker, stream)
    }

    /// Sends `requests` one-token chats, each of a new prompt, and checks that every one
    /// succeeds on another worker than `avoided` (a dead worker, say).
    pub async fn assert_avoids(&self, avoided: u64, requests: usize) {
        for n in 0..requests {
            let body = serde_json::json!({"model": "m", "max_tokens": 1,
                "messages": [{"role": "user", "content": format!("after {n}")}]});
            let reply = self.chat(&body).await;
            assert_eq!(reply.status, 200, "{:?}", reply.body);
            assert_ne!(reply.header("x-kvroute-worker"), avoided.to_string());
        }
    }

    /// Waits up to 10 s until the dry-run table of `body` lists `workers` workers.
    pub async fn until_workers(&self, body: &Value, workers: u64) {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let table = self.route(body).await;
            let rows = table["workers"].as_array().map_or(0, Vec::len) as u64;
            if rows == workers {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "expected {workers} workers: {table}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
