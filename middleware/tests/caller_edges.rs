//! The layer in a real axum app: the path it acts on, and who the caller is.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request};
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn};
use axum::routing::post;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tower::Layer;
use tower_idempotency::{Anonymous, ClientIp, IdempotencyLayer, MemoryStore, Policy, Scope};

/// An app whose only route is `/payments`, counting its runs.
async fn serve(layer: IdempotencyLayer<MemoryStore>) -> (SocketAddr, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let client_ip = from_fn(
        |ConnectInfo(peer): ConnectInfo<SocketAddr>, mut request: Request, next: Next| async move {
            request.extensions_mut().insert(ClientIp(peer.ip()));
            next.run(request).await
        },
    );
    let app = Router::new().route(
        "/payments",
        post(move || {
            let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                (StatusCode::CREATED, format!("charge {run}"))
            }
        }),
    );
    // Around the whole router, so that axum routes the normalised path (`Router::layer` would
    // run the layer after routing).
    let app = Router::new()
        .fallback_service(layer.layer(app))
        .layer(client_ip);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        axum::serve(
            listener,
            app.into_make_service_with_connect_info::<SocketAddr>(),
        )
        .await
    });
    (addr, runs)
}

/// `POST target` byte for byte, from `127.0.0.{from}`; the status and body.
async fn raw_post(addr: SocketAddr, from: u8, target: &str, key: Option<&str>) -> (u16, String) {
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket
        .bind(SocketAddr::new(
            IpAddr::V4(Ipv4Addr::new(127, 0, 0, from)),
            0,
        ))
        .expect("bind the client address");
    let mut stream = socket.connect(addr).await.expect("connect");
    let key = key.map_or(String::new(), |k| format!("idempotency-key: {k}\r\n"));
    let request = format!(
        "POST {target} HTTP/1.1\r\nhost: app\r\n{key}content-length: 1\r\nconnection: close\r\n\r\nx"
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    stream.read_to_end(&mut reply).await.expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let status = reply[9..12].parse().expect("status");
    (status, reply)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_layer_routes_and_hands_on_the_normalised_path() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .route("/feed/**", Policy::default().with_enabled(false))
        .route("/payments", Policy::default().with_required(true));
    let (addr, runs) = serve(layer).await;
    let (status, reply) = raw_post(addr, 1, "/%70ayments", None).await;
    assert_eq!(status, 400, "{reply}");
    assert!(reply.contains("missing-key"), "{reply}");
    // axum's router knows only "/payments": 201 means the layer handed on the normalised path.
    let (status, reply) = raw_post(addr, 1, "/feed/../payments", Some("k")).await;
    assert_eq!(status, 201, "{reply}");
    let (_, retry) = raw_post(addr, 1, "/feed/%2E%2e//payments", Some("k")).await;
    assert!(retry.contains("idempotent-replayed: true"), "{retry}");
    for ambiguous in [
        "/feed/x%2F..%2F..%2Fpayments",
        "/feed/%5C",
        "/../payments",
        "/a%0",
    ] {
        let (status, reply) = raw_post(addr, 1, ambiguous, Some("k2")).await;
        assert_eq!(status, 400, "{ambiguous}: {reply}");
        assert!(reply.contains("invalid-target"), "{reply}");
    }
    assert_eq!(runs.load(Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_callers_are_limited_per_client_ip_from_connect_info() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .policy(Policy::default().with_max_in_flight_per_caller(1usize));
    let (addr, _) = serve(layer).await;
    let first = tokio::spawn(raw_post(addr, 2, "/payments", Some("a")));
    let other = tokio::spawn(raw_post(addr, 3, "/payments", Some("b")));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (status, reply) = raw_post(addr, 2, "/payments", Some("c")).await;
    assert_eq!(status, 429, "{reply}");
    assert_eq!(first.await.unwrap().0, 201);
    assert_eq!(
        other.await.unwrap().0,
        201,
        "another address has a place of its own"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_scope_that_finds_no_principal_is_anonymous() {
    let layer = IdempotencyLayer::new(MemoryStore::new())
        .policy(Policy::default().with_anonymous(Anonymous::Reject))
        .scope_with(|_| Scope::anonymous());
    let (addr, runs) = serve(layer).await;
    let (status, reply) = raw_post(addr, 1, "/payments", Some("k")).await;
    assert_eq!(status, 403, "{reply}");
    assert!(reply.contains("credentials-required"), "{reply}");
    assert_eq!(runs.load(Ordering::SeqCst), 0);
}
