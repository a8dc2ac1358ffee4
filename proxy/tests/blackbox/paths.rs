//! Which path the proxy matches routes against, fingerprints and forwards: the RFC 3986
//! normalised one, never the raw bytes an attacker chose.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Proxy, Upstream, config, config_with_proxy};

const ROUTES: &str = "[store]\nbackend = \"memory\"\n\n[[route]]\npath = \"/payments/**\"\nrequired = true\n\n[[route]]\npath = \"/feed/**\"\nenabled = false\n";

/// A reply read off a raw socket.
pub struct RawReply {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl RawReply {
    pub fn problem(&self) -> String {
        assert!(
            self.head
                .to_ascii_lowercase()
                .contains("content-type: application/problem+json"),
            "expected a problem answer, got {}\n{}",
            self.head,
            self.body
        );
        let json: serde_json::Value = serde_json::from_str(&self.body).expect("problem json");
        assert_eq!(json["status"], self.status, "{json}");
        json["type"]
            .as_str()
            .and_then(|t| t.rsplit('#').next())
            .unwrap_or_default()
            .to_owned()
    }

    pub fn replayed(&self) -> bool {
        self.head
            .to_ascii_lowercase()
            .contains("idempotent-replayed: true")
    }
}

/// Sends `POST target` byte for byte (an HTTP client library would clean the path up first).
pub async fn raw_post(proxy: &Proxy, target: &str, key: Option<&str>, body: &str) -> RawReply {
    let addr = proxy.base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let key = key.map_or(String::new(), |k| format!("idempotency-key: {k}\r\n"));
    let request = format!(
        "POST {target} HTTP/1.1\r\nhost: {addr}\r\n{key}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut reply = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut reply))
        .await
        .expect("reply in time")
        .expect("read");
    let reply = String::from_utf8_lossy(&reply).into_owned();
    let (head, body) = reply.split_once("\r\n\r\n").expect("a whole reply");
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    RawReply {
        status,
        head: head.to_owned(),
        body: body.to_owned(),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_encoded_path_cannot_skip_a_required_key() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, ROUTES));
    for target in ["/%70ayments", "/pay%6dents", "/payments/%2E", "//payments"] {
        let reply = raw_post(&proxy, target, None, "10 EUR").await;
        assert_eq!(reply.status, 400, "{target}: {}", reply.body);
        assert_eq!(reply.problem(), "missing-key", "{target}");
    }
    assert_eq!(upstream.runs(), 0, "nothing was charged");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dot_segment_cannot_reach_a_protected_route_through_a_disabled_one() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, ROUTES));
    let first = raw_post(&proxy, "/feed/../payments", Some("dot"), "10 EUR").await;
    assert_eq!(first.status, 201, "{}", first.body);
    let retry = raw_post(&proxy, "/feed/%2e%2E/payments", Some("dot"), "10 EUR").await;
    assert_eq!(retry.status, 201, "{}", retry.body);
    assert!(retry.replayed(), "the retry is a replay: {}", retry.head);
    let plain = raw_post(&proxy, "/payments", Some("dot"), "10 EUR").await;
    assert!(plain.replayed(), "one path, one fingerprint");
    assert_eq!(upstream.runs_of("dot"), 1, "charged once");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_gets_the_normalised_path() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, ROUTES));
    // The upstream's router knows only "/payments": it answers 201 only if the proxy forwarded
    // the path it matched its routes against.
    for (target, key) in [("/x/./../payments", "a"), ("//%70ayments", "b")] {
        let reply = raw_post(&proxy, target, Some(key), "x").await;
        assert_eq!(reply.status, 201, "{target}: {}", reply.body);
    }
    assert_eq!(upstream.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn ambiguous_paths_are_refused_with_400() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, ROUTES));
    for target in [
        "/feed/x%2F..%2F..%2Fpayments",
        "/feed/x%2f..",
        "/feed/x%5C..%5Cpayments",
        "/feed/a%00",
        "/feed/%zz",
        "/feed/%2",
        "/../payments",
        "/feed/../../payments",
    ] {
        for key in [Some("k"), None] {
            let reply = raw_post(&proxy, target, key, "x").await;
            assert_eq!(reply.status, 400, "{target}: {}", reply.body);
            assert_eq!(reply.problem(), "invalid-target", "{target}");
        }
    }
    assert_eq!(upstream.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn merge_slashes_can_be_turned_off() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "merge_slashes = false",
        ROUTES,
    ));
    // "//payments" is not "/payments" then: no route matches, and the upstream gets it as sent.
    let reply = raw_post(&proxy, "//payments", None, "x").await;
    assert_eq!(reply.status, 404, "{}", reply.body);
    let dots = raw_post(&proxy, "/feed/../payments", None, "x").await;
    assert_eq!(dots.status, 400, "dot segments are still removed");
    assert_eq!(dots.problem(), "missing-key");
}
