//! SSRF protections of URL fetching, against a local HTTP server on 127.0.0.1. Private and
//! metadata addresses are only ever named in URLs that must be refused before connecting: no
//! test sends traffic anywhere but the loopback server.

#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use kvroute_mmhash::{
    fetch, FetchError, FetchPolicy, ImageFormat, MediaConfig, MediaError, MediaProcessor,
};
use std::net::IpAddr;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const CAP: u64 = 256 << 10;

fn png() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../tests/fixtures/images/coffee_tiny_40x30.png"
    );
    std::fs::read(path).unwrap()
}

/// Starts the test server; returns its port. It lives as long as the test's runtime.
async fn server() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            tokio::spawn(respond(stream, port));
        }
    });
    port
}

async fn respond(mut stream: TcpStream, port: u16) {
    let mut request = Vec::new();
    let mut chunk = [0u8; 1024];
    while !request.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => request.extend_from_slice(&chunk[..n]),
        }
        if request.first() == Some(&0x16) {
            // A TLS ClientHello: answer in plain text, as a plain HTTP server would.
            let _ = stream.write_all(b"HTTP/1.1 400 Bad Request\r\n\r\n").await;
            return;
        }
    }
    let text = String::from_utf8_lossy(&request);
    let path = text.split_whitespace().nth(1).unwrap_or("/").to_owned();
    let redirect =
        |to: &str| format!("HTTP/1.1 302 Found\r\nLocation: {to}\r\nContent-Length: 0\r\n\r\n");
    let head = match path.as_str() {
        "/ok" => {
            let body = png();
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes()).await;
            let _ = stream.write_all(&body).await;
            return;
        }
        "/big" => {
            // No Content-Length: only counting while streaming can stop it.
            let head = "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nConnection: close\r\n\r\n";
            let _ = stream.write_all(head.as_bytes()).await;
            let chunk = vec![0u8; 64 << 10];
            for _ in 0..64 {
                if stream.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            return;
        }
        "/big-declared" => "HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n".to_owned(),
        "/to-loopback-ip" => redirect(&format!("http://127.0.0.1:{port}/ok")),
        "/to-private" => redirect("http://10.255.255.1/image.png"),
        "/to-metadata" => redirect("http://169.254.169.254/latest/meta-data/"),
        "/relative" => redirect("ok"),
        "/loop" => redirect("/loop"),
        "/slow" => {
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
        _ => "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n".to_owned(),
    };
    let _ = stream.write_all(head.as_bytes()).await;
}

fn trusted_localhost() -> FetchPolicy {
    FetchPolicy::enabled().trust_private_host("localhost")
}

fn forbidden(result: Result<impl std::fmt::Debug, FetchError>) -> IpAddr {
    match result {
        Err(FetchError::ForbiddenAddress { addr, .. }) => addr,
        other => panic!("expected ForbiddenAddress, got {other:?}"),
    }
}

#[tokio::test]
async fn fetching_is_disabled_by_default() {
    let port = server().await;
    let url = format!("http://localhost:{port}/ok");
    let result = MediaProcessor::default().load(&url, None).await;
    assert_eq!(result.unwrap_err(), MediaError::Fetch(FetchError::Disabled));
}

#[tokio::test]
async fn loopback_is_refused_unless_trusted() {
    let port = server().await;
    let policy = FetchPolicy::enabled();
    for url in [
        format!("http://127.0.0.1:{port}/ok"),
        format!("http://localhost:{port}/ok"),
        format!("http://[::1]:{port}/ok"),
        format!("http://[::ffff:127.0.0.1]:{port}/ok"),
    ] {
        assert!(
            forbidden(fetch(&url, &policy, CAP).await)
                .to_canonical()
                .is_loopback(),
            "{url}"
        );
    }

    let processor = MediaProcessor::new(MediaConfig::default().with_fetch(trusted_localhost()));
    let loaded = processor
        .load(&format!("http://localhost:{port}/ok"), None)
        .await
        .unwrap();
    assert_eq!(loaded.bytes, png());
    assert_eq!(loaded.image.info.format, ImageFormat::Png);
    assert_eq!(
        (loaded.image.info.width, loaded.image.info.height),
        (40, 30)
    );

    let by_ip = FetchPolicy::enabled().trust_private_host("127.0.0.1");
    let fetched = fetch(&format!("http://127.0.0.1:{port}/ok"), &by_ip, CAP)
        .await
        .unwrap();
    assert_eq!(fetched.content_type.as_deref(), Some("image/png"));
}

#[tokio::test]
async fn private_link_local_and_metadata_addresses_are_refused() {
    let policy = FetchPolicy::enabled();
    for url in [
        "http://10.0.0.1/a.png",
        "http://172.16.5.4/a.png",
        "http://192.168.1.1/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://100.100.100.200/latest/meta-data/",
        "http://0.0.0.0/a.png",
        "http://[fd00:ec2::254]/latest/meta-data/",
        "http://[fe80::1]/a.png",
        "https://10.1.2.3/a.png",
        "https://169.254.169.254/latest/meta-data/",
    ] {
        forbidden(fetch(url, &policy, CAP).await);
    }
}

#[tokio::test]
async fn redirects_are_checked_like_the_first_request() {
    let port = server().await;
    let policy = trusted_localhost();
    let url = |path: &str| format!("http://localhost:{port}{path}");
    // Trusting "localhost" does not extend to another name for the same address.
    assert!(forbidden(fetch(&url("/to-loopback-ip"), &policy, CAP).await).is_loopback());
    let private = forbidden(fetch(&url("/to-private"), &policy, CAP).await);
    assert_eq!(private, "10.255.255.1".parse::<IpAddr>().unwrap());
    let metadata = forbidden(fetch(&url("/to-metadata"), &policy, CAP).await);
    assert_eq!(metadata, "169.254.169.254".parse::<IpAddr>().unwrap());

    let followed = fetch(&url("/relative"), &policy, CAP).await.unwrap();
    assert_eq!(followed.bytes, png());
    assert_eq!(followed.url, url("/ok"));
    assert_eq!(
        fetch(&url("/loop"), &policy.clone().with_max_redirects(2), CAP).await,
        Err(FetchError::TooManyRedirects(2))
    );
}

#[tokio::test]
async fn oversized_bodies_are_cut_off() {
    let port = server().await;
    let policy = trusted_localhost();
    for path in ["/big", "/big-declared"] {
        let result = fetch(&format!("http://localhost:{port}{path}"), &policy, CAP).await;
        assert_eq!(
            result,
            Err(FetchError::BodyTooLarge { max_bytes: CAP }),
            "{path}"
        );
    }
    // The MediaConfig byte cap is the one load() applies.
    let config = MediaConfig::default()
        .with_fetch(policy)
        .with_max_bytes(1000);
    let result = MediaProcessor::new(config)
        .load(&format!("http://localhost:{port}/ok"), None)
        .await;
    assert_eq!(
        result,
        Err(MediaError::Fetch(FetchError::BodyTooLarge {
            max_bytes: 1000
        }))
    );
}

#[tokio::test]
async fn allow_list_timeout_status_and_scheme() {
    let port = server().await;
    let url = |path: &str| format!("http://localhost:{port}{path}");
    let listed = trusted_localhost().allow_host("images.example.com");
    assert_eq!(
        fetch(&url("/ok"), &listed, CAP).await,
        Err(FetchError::HostNotAllowed("localhost".to_owned()))
    );
    let impatient = trusted_localhost().with_timeout(Duration::from_millis(300));
    assert_eq!(
        fetch(&url("/slow"), &impatient, CAP).await,
        Err(FetchError::Timeout)
    );
    assert_eq!(
        fetch(&url("/missing"), &trusted_localhost(), CAP).await,
        Err(FetchError::Status(404))
    );
    assert!(matches!(
        fetch("ftp://localhost/a.png", &trusted_localhost(), CAP).await,
        Err(FetchError::UnsupportedScheme(_))
    ));
    assert!(matches!(
        fetch("http://user@localhost/a.png", &trusted_localhost(), CAP).await,
        Err(FetchError::InvalidUrl(_))
    ));
}

#[tokio::test]
async fn https_goes_through_tls() {
    let port = server().await;
    // The local server speaks plain HTTP: the TLS handshake fails, nothing is read as a body.
    let result = fetch(
        &format!("https://localhost:{port}/ok"),
        &trusted_localhost(),
        CAP,
    )
    .await;
    assert!(
        matches!(&result, Err(FetchError::Http(message)) if message.starts_with("TLS")),
        "{result:?}"
    );
}
