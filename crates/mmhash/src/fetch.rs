//! Guarded fetching of http(s) image URLs with hyper (TLS by rustls with Mozilla's roots).
//!
//! Every hop (the first request and each redirect) is checked the same way: scheme, host
//! allow-list, then DNS resolution and a check of *every* resolved address; the connection then
//! goes to an address that passed, so a second DNS answer cannot slip a private address in
//! between check and use. The byte cap is enforced while the body streams in; the timeout
//! covers the whole fetch, redirects included.

use crate::error::FetchError;
use http::{header, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use rustls::{ClientConfig, RootCertStore};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::{Arc, OnceLock};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

/// Whether and how image URLs are fetched. Disabled by default.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct FetchPolicy {
    /// Fetch http(s) URLs at all. `false` by default: a gateway then accepts data URLs only.
    pub enabled: bool,
    /// Hosts that may be fetched from; empty means any host. An entry is a host name or IP
    /// literal matched case-insensitively, or `*.example.com` for any subdomain.
    pub allowed_hosts: Vec<String>,
    /// Hosts (same syntax) trusted to resolve to loopback, private, link-local or other
    /// non-public addresses, such as an internal image store. Every other host must resolve
    /// to public unicast addresses only.
    pub private_hosts: Vec<String>,
    /// Redirects followed at most.
    pub max_redirects: u8,
    /// Time allowed for the whole fetch, redirects and body included.
    pub timeout: Duration,
}

impl Default for FetchPolicy {
    fn default() -> Self {
        Self {
            enabled: false,
            allowed_hosts: Vec::new(),
            private_hosts: Vec::new(),
            max_redirects: 3,
            timeout: Duration::from_secs(10),
        }
    }
}

impl FetchPolicy {
    /// Fetching enabled, public addresses of any host, default limits.
    pub fn enabled() -> Self {
        Self {
            enabled: true,
            ..Self::default()
        }
    }

    /// This policy, also trusting `host` to resolve to non-public addresses.
    pub fn trust_private_host(mut self, host: impl Into<String>) -> Self {
        self.private_hosts.push(host.into());
        self
    }

    /// This policy, with `host` added to the allow-list (which then stops being "any host").
    pub fn allow_host(mut self, host: impl Into<String>) -> Self {
        self.allowed_hosts.push(host.into());
        self
    }

    /// This policy with another timeout.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// This policy following at most `max_redirects` redirects.
    pub fn with_max_redirects(mut self, max_redirects: u8) -> Self {
        self.max_redirects = max_redirects;
        self
    }
}

/// A fetched body.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct Fetched {
    /// The body, at most the byte cap.
    pub bytes: Vec<u8>,
    /// The `Content-Type` the server declared, if any.
    pub content_type: Option<String>,
    /// The URL finally fetched, after redirects.
    pub url: String,
}

/// Fetches `url` under `policy`, reading at most `max_bytes` of body.
///
/// Must be awaited inside a Tokio runtime with its I/O and time drivers enabled (what
/// `#[tokio::main]` builds); outside any Tokio runtime it fails with [`FetchError::Http`].
pub async fn fetch(url: &str, policy: &FetchPolicy, max_bytes: u64) -> Result<Fetched, FetchError> {
    if !policy.enabled {
        return Err(FetchError::Disabled);
    }
    if tokio::runtime::Handle::try_current().is_err() {
        return Err(FetchError::Http(
            "fetching needs a Tokio runtime".to_owned(),
        ));
    }
    tokio::time::timeout(policy.timeout, follow(url, policy, max_bytes))
        .await
        .unwrap_or(Err(FetchError::Timeout))
}

async fn follow(url: &str, policy: &FetchPolicy, max_bytes: u64) -> Result<Fetched, FetchError> {
    let mut uri: Uri = url
        .parse()
        .map_err(|_| FetchError::InvalidUrl(url.to_owned()))?;
    for _ in 0..=policy.max_redirects {
        let target = Target::new(&uri)?;
        if !policy.allowed_hosts.is_empty() && !host_matches(&policy.allowed_hosts, &target.host) {
            return Err(FetchError::HostNotAllowed(target.host));
        }
        let addrs = resolve(&target, host_matches(&policy.private_hosts, &target.host)).await?;
        let response = request(&addrs, &target, &uri).await?;
        let status = response.status();
        if matches!(
            status,
            StatusCode::MOVED_PERMANENTLY
                | StatusCode::FOUND
                | StatusCode::SEE_OTHER
                | StatusCode::TEMPORARY_REDIRECT
                | StatusCode::PERMANENT_REDIRECT
        ) {
            let location = response
                .headers()
                .get(header::LOCATION)
                .and_then(|value| value.to_str().ok())
                .ok_or(FetchError::BadRedirect)?;
            uri = join(&uri, location)?;
            continue;
        }
        if !status.is_success() {
            return Err(FetchError::Status(status.as_u16()));
        }
        let content_type = response
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned);
        let bytes = read_capped(response.into_body(), max_bytes).await?;
        return Ok(Fetched {
            bytes,
            content_type,
            url: uri.to_string(),
        });
    }
    Err(FetchError::TooManyRedirects(policy.max_redirects))
}

/// The parts of an absolute http(s) URL a request needs.
struct Target {
    tls: bool,
    host: String,
    port: u16,
    authority: String,
}

impl Target {
    fn new(uri: &Uri) -> Result<Self, FetchError> {
        let invalid = || FetchError::InvalidUrl(uri.to_string());
        let scheme = uri.scheme_str().ok_or_else(invalid)?;
        let tls = if scheme.eq_ignore_ascii_case("https") {
            true
        } else if scheme.eq_ignore_ascii_case("http") {
            false
        } else {
            return Err(FetchError::UnsupportedScheme(scheme.to_owned()));
        };
        let authority = uri.authority().ok_or_else(invalid)?;
        if authority.as_str().contains('@') {
            return Err(invalid());
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid());
        }
        Ok(Self {
            tls,
            host: host.to_ascii_lowercase(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_owned(),
        })
    }
}

fn host_matches(patterns: &[String], host: &str) -> bool {
    patterns.iter().any(|pattern| {
        let pattern = pattern.trim_start_matches('[').trim_end_matches(']');
        match pattern.strip_prefix("*.") {
            Some(suffix) => {
                let (host, suffix) = (host.as_bytes(), suffix.as_bytes());
                host.len() > suffix.len() + 1
                    && host[host.len() - suffix.len()..].eq_ignore_ascii_case(suffix)
                    && host[host.len() - suffix.len() - 1] == b'.'
            }
            None => pattern.eq_ignore_ascii_case(host),
        }
    })
}

/// Resolves the host and refuses it when any address is not public, unless trusted.
async fn resolve(target: &Target, trusted: bool) -> Result<Vec<SocketAddr>, FetchError> {
    let resolve_error = |message: String| FetchError::Resolve {
        host: target.host.clone(),
        message,
    };
    let addrs: Vec<SocketAddr> = match target.host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, target.port)],
        Err(_) => tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .map_err(|error| resolve_error(error.to_string()))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(resolve_error("no addresses".to_owned()));
    }
    if !trusted {
        if let Some(bad) = addrs.iter().find(|addr| !is_public(addr.ip())) {
            return Err(FetchError::ForbiddenAddress {
                host: target.host.clone(),
                addr: bad.ip(),
            });
        }
    }
    Ok(addrs)
}

/// Whether `ip` is a public unicast address: not loopback, private, link-local (cloud
/// metadata services live there), shared (CGNAT), unspecified, multicast, broadcast,
/// documentation, benchmarking or reserved; IPv6 must be global unicast (2000::/3), and
/// addresses embedding IPv4 (mapped, NAT64, 6to4) are judged by the embedded address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => is_public_v6(v6),
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    !(a == 0
        || a == 10
        || a == 127
        || (a == 100 && (64..128).contains(&b))
        || (a == 169 && b == 254)
        || (a == 172 && (16..32).contains(&b))
        || (a == 192 && b == 168)
        || (a == 192 && b == 0 && (c == 0 || c == 2))
        || (a == 198 && (b == 18 || b == 19))
        || (a == 198 && b == 51 && c == 100)
        || (a == 203 && b == 0 && c == 113)
        || a >= 224)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_public_v4(v4);
    }
    let s = ip.segments();
    let embedded = |hi: u16, lo: u16| Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo));
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        return is_public_v4(embedded(s[6], s[7]));
    }
    if s[0] == 0x2002 {
        return is_public_v4(embedded(s[1], s[2]));
    }
    // Global unicast, minus IETF protocol assignments (Teredo among them) and documentation.
    (s[0] & 0xE000) == 0x2000
        && !(s[0] == 0x2001 && s[1] < 0x0200)
        && !(s[0] == 0x2001 && s[1] == 0x0db8)
}

type Response = http::Response<hyper::body::Incoming>;

async fn request(addrs: &[SocketAddr], target: &Target, uri: &Uri) -> Result<Response, FetchError> {
    let mut last_error = None;
    for addr in addrs {
        match TcpStream::connect(addr).await {
            Ok(stream) => {
                stream.set_nodelay(true).map_err(|e| http_error(&e))?;
                if !target.tls {
                    return send(stream, target, uri).await;
                }
                let name = ServerName::try_from(target.host.clone()).map_err(|e| http_error(&e))?;
                let tls = TlsConnector::from(tls_config()?)
                    .connect(name, stream)
                    .await
                    .map_err(|e| FetchError::Http(format!("TLS: {e}")))?;
                return send(tls, target, uri).await;
            }
            Err(error) => last_error = Some(error),
        }
    }
    Err(FetchError::Http(
        last_error.map_or_else(|| "no address".to_owned(), |e| e.to_string()),
    ))
}

fn http_error(error: &dyn std::fmt::Display) -> FetchError {
    FetchError::Http(error.to_string())
}

/// TLS client settings: Mozilla's root store (webpki-roots), ring, TLS 1.2 and 1.3. Built once.
fn tls_config() -> Result<Arc<ClientConfig>, FetchError> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let roots = RootCertStore {
                roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
            };
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map(|builder| {
                    Arc::new(builder.with_root_certificates(roots).with_no_client_auth())
                })
                .map_err(|error| error.to_string())
        })
        .clone()
        .map_err(|error| FetchError::Http(format!("TLS setup: {error}")))
}

async fn send<IO>(io: IO, target: &Target, uri: &Uri) -> Result<Response, FetchError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| http_error(&e))?;
    tokio::spawn(connection);
    let path = uri.path_and_query().map_or("/", |pq| pq.as_str());
    let request = http::Request::get(path)
        .header(header::HOST, target.authority.as_str())
        .header(
            header::USER_AGENT,
            concat!("kvroute-mmhash/", env!("CARGO_PKG_VERSION")),
        )
        .header(header::ACCEPT, "image/*")
        .body(Empty::<Bytes>::new())
        .map_err(|e| http_error(&e))?;
    sender
        .send_request(request)
        .await
        .map_err(|e| http_error(&e))
}

async fn read_capped(
    mut body: hyper::body::Incoming,
    max_bytes: u64,
) -> Result<Vec<u8>, FetchError> {
    use hyper::body::Body as _;
    if body.size_hint().lower() > max_bytes {
        return Err(FetchError::BodyTooLarge { max_bytes });
    }
    let mut bytes = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| FetchError::Http(e.to_string()))?;
        if let Some(data) = frame.data_ref() {
            if (bytes.len() + data.len()) as u64 > max_bytes {
                return Err(FetchError::BodyTooLarge { max_bytes });
            }
            bytes.extend_from_slice(data);
        }
    }
    Ok(bytes)
}

/// Resolves a `Location` header against the URL that answered with it.
fn join(base: &Uri, location: &str) -> Result<Uri, FetchError> {
    let location = location.split('#').next().unwrap_or_default().trim();
    let bad = || FetchError::BadRedirect;
    let scheme = base.scheme_str().ok_or_else(bad)?;
    let authority = base.authority().ok_or_else(bad)?;
    let absolute = if location.contains("://") {
        location.to_owned()
    } else if let Some(rest) = location.strip_prefix("//") {
        format!("{scheme}://{rest}")
    } else if location.starts_with('/') {
        format!("{scheme}://{authority}{location}")
    } else {
        let path = base.path();
        let dir = &path[..path.rfind('/').map_or(0, |slash| slash + 1)];
        format!(
            "{scheme}://{authority}{}{location}",
            if dir.is_empty() { "/" } else { dir }
        )
    };
    absolute.parse().map_err(|_| bad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn public_addresses() {
        for public in [
            "8.8.8.8",
            "1.1.1.1",
            "2606:4700:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(is_public(public.parse().unwrap()), "{public}");
        }
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fd00:ec2::254",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a00:1",
            "2002:c0a8:101::1",
            "2001:db8::1",
            "2001::1",
        ] {
            assert!(!is_public(private.parse().unwrap()), "{private}");
        }
    }

    #[test]
    fn host_patterns() {
        let patterns = vec!["images.example.com".to_owned(), "*.cdn.example".to_owned()];
        assert!(host_matches(&patterns, "images.example.com"));
        assert!(host_matches(&patterns, "a.b.cdn.example"));
        assert!(!host_matches(&patterns, "cdn.example"));
        assert!(!host_matches(&patterns, "evilcdn.example"));
        assert!(!host_matches(&patterns, "images.example.com.evil"));
    }

    #[test]
    fn redirect_locations() {
        let base: Uri = "http://a.example:8080/x/y.png?q=1".parse().unwrap();
        let cases = [
            ("http://b.example/z", "http://b.example/z"),
            ("//c.example/z", "http://c.example/z"),
            ("/z?k=v#frag", "http://a.example:8080/z?k=v"),
            ("z.png", "http://a.example:8080/x/z.png"),
        ];
        for (location, expected) in cases {
            assert_eq!(join(&base, location).unwrap().to_string(), expected);
        }
    }
}
