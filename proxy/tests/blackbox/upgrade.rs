//! Protocol upgrades (WebSocket handshakes): tunnelled on methods the layer does not cover,
//! refused with a problem on methods it does; SIGTERM gives open tunnels `shutdown_timeout`.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http_body_util::Empty;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{Proxy, config, config_with_proxy};

/// A real upstream that accepts any upgrade, greets with `hello`, then answers every chunk it
/// reads in upper case. Counts the requests that reach it.
struct EchoUpstream {
    url: String,
    requests: Arc<AtomicUsize>,
    server: tokio::task::JoinHandle<()>,
}

impl EchoUpstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("address"));
        let requests = Arc::new(AtomicUsize::new(0));
        let counted = requests.clone();
        let server = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let counted = counted.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        counted.fetch_add(1, Ordering::SeqCst);
                        accept_upgrade(request)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .with_upgrades()
                        .await;
                });
            }
        });
        Self {
            url,
            requests,
            server,
        }
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

async fn accept_upgrade(
    mut request: Request<Incoming>,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let Some(protocol) = request.headers().get("upgrade").cloned() else {
        let mut refusal = Response::new(Empty::new());
        *refusal.status_mut() = StatusCode::UPGRADE_REQUIRED;
        return Ok(refusal);
    };
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let Ok(upgraded) = upgrade.await else { return };
        let mut io = TokioIo::new(upgraded);
        if io.write_all(b"hello").await.is_err() {
            return;
        }
        let mut buffer = [0u8; 64];
        while let Ok(read) = io.read(&mut buffer).await {
            if read == 0 {
                return;
            }
            let upper = buffer[..read].to_ascii_uppercase();
            if io.write_all(&upper).await.is_err() {
                return;
            }
        }
    });
    let mut switching = Response::new(Empty::new());
    *switching.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    switching.headers_mut().insert("upgrade", protocol);
    switching
        .headers_mut()
        .insert("connection", "upgrade".parse().expect("value"));
    Ok(switching)
}

/// A WebSocket handshake on `GET`, a method the layer does not cover.
const WEBSOCKET_HANDSHAKE: &str = "GET /chat HTTP/1.1\r\nHost: chat.example\r\nConnection: Upgrade\r\n\
     Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
     Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";

/// Sends a request head over raw TCP and reads the response head.
async fn handshake(proxy: &Proxy, head: &str) -> (TcpStream, String) {
    let address = proxy.base.trim_start_matches("http://");
    let mut stream = TcpStream::connect(address).await.expect("connect");
    stream.write_all(head.as_bytes()).await.expect("send head");
    let mut received = Vec::new();
    let mut byte = [0u8; 1];
    while !received.ends_with(b"\r\n\r\n") {
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut byte))
            .await
            .expect("a response head within 5s")
            .expect("read");
        assert!(
            read == 1,
            "connection closed after {:?}",
            String::from_utf8_lossy(&received)
        );
        received.push(byte[0]);
    }
    (stream, String::from_utf8_lossy(&received).into_owned())
}

async fn read_exactly(stream: &mut TcpStream, len: usize) -> String {
    let mut buffer = vec![0u8; len];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut buffer))
        .await
        .expect("bytes within 5s")
        .expect("read");
    String::from_utf8_lossy(&buffer).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_uncovered_upgrade_is_tunnelled_both_ways() {
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, "[store]\nbackend = \"memory\"\n"));
    let (mut stream, head) = handshake(&proxy, WEBSOCKET_HANDSHAKE).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    let lower = head.to_ascii_lowercase();
    assert!(lower.contains("upgrade: websocket"), "{head}");
    assert!(lower.contains("connection: upgrade"), "{head}");
    assert_eq!(
        read_exactly(&mut stream, 5).await,
        "hello",
        "upstream to client"
    );
    stream.write_all(b"ping").await.expect("send");
    assert_eq!(
        read_exactly(&mut stream, 4).await,
        "PING",
        "client to upstream and back"
    );
    stream.write_all(b"again").await.expect("send");
    assert_eq!(read_exactly(&mut stream, 5).await, "AGAIN");
    assert_eq!(upstream.requests.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_on_a_covered_method_is_refused_with_a_problem() {
    let upstream = EchoUpstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, "[store]\nbackend = \"memory\"\n"));
    let (mut stream, head) = handshake(
        &proxy,
        "POST /chat HTTP/1.1\r\nHost: x\r\nIdempotency-Key: up-1\r\nConnection: Upgrade\r\n\
         Upgrade: websocket\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{head}"
    );
    let length: usize = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse().ok())?
        })
        .expect("content-length");
    let body = read_exactly(&mut stream, length).await;
    assert!(body.contains("#upgrade-not-allowed"), "{body}");
    assert_eq!(
        upstream.requests.load(Ordering::SeqCst),
        0,
        "nothing forwarded"
    );
}

/// A proxy in front of `upstream` that gives work in flight `shutdown_timeout` on SIGTERM.
fn proxy_draining_for(upstream: &EchoUpstream, shutdown_timeout: &str) -> Proxy {
    Proxy::start(&config_with_proxy(
        &upstream.url,
        &format!("shutdown_timeout = \"{shutdown_timeout}\""),
        "[store]\nbackend = \"memory\"\n",
    ))
}

/// A tunnel through `proxy`, greeted by the upstream.
async fn open_tunnel(proxy: &Proxy) -> TcpStream {
    let (mut stream, head) = handshake(proxy, WEBSOCKET_HANDSHAKE).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert_eq!(read_exactly(&mut stream, 5).await, "hello");
    stream
}

/// hyper stops counting a connection once it switched protocols, so a graceful shutdown used to
/// exit at once and cut every WebSocket: the proxy now waits for open tunnels as for requests in
/// flight, and exits as soon as the last one closes (well before its 30 s `shutdown_timeout`).
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_lets_an_open_tunnel_go_on_until_it_closes() {
    let upstream = EchoUpstream::start().await;
    let mut proxy = proxy_draining_for(&upstream, "30s");
    let mut stream = open_tunnel(&proxy).await;
    proxy.signal("TERM");
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.write_all(b"still").await.expect("send");
    assert_eq!(
        read_exactly(&mut stream, 5).await,
        "STILL",
        "the tunnel works on after SIGTERM; stderr:\n{}",
        proxy.stderr()
    );
    drop(stream);
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
}

/// A tunnel still open when `shutdown_timeout` passes is cut, and the proxy exits.
#[tokio::test(flavor = "multi_thread")]
async fn a_tunnel_open_past_the_shutdown_timeout_is_cut() {
    let upstream = EchoUpstream::start().await;
    let mut proxy = proxy_draining_for(&upstream, "1s");
    let mut stream = open_tunnel(&proxy).await;
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
    assert!(
        proxy.stderr().contains("WebSocket tunnels"),
        "the timeout is reported: {}",
        proxy.stderr()
    );
    let mut buffer = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buffer))
        .await
        .expect("the cut is seen within 5s");
    assert!(
        matches!(read, Ok(0) | Err(_)),
        "the tunnel is closed: {read:?}"
    );
}
