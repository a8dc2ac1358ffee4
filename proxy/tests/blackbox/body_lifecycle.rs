//! The edges of a body's life: an upstream body cut short or stalled, a streamed response, a
//! request body that never finishes, and statuses that must not be replayed.

use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::raw::{RawUpstream, Step, write};
use crate::support::{Proxy, Upstream, config, config_with_proxy};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

/// A `201` that promises 100 bytes and sends 10.
fn partial_head() -> Step {
    write("HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n0123456789")
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_body_cut_short_is_an_unknown_outcome() {
    let upstream = RawUpstream::start(|_| vec![partial_head(), Step::Close]).await;
    let proxy = Proxy::start(&config(
        &upstream.url,
        &format!("{MEMORY}\n[idempotency]\nlock_ttl = \"1s\"\n"),
    ));
    let first = proxy.send(proxy.post("/payments", "cut").body("x")).await;
    // The head arrived, so the upstream ran it; the client has nothing yet and gets a problem.
    assert_eq!(first.status, StatusCode::BAD_GATEWAY, "{first:?}");
    assert_eq!(first.problem(), "upstream-unavailable");
    // Not released: an immediate retry must not run it a second time...
    let early = proxy.send(proxy.post("/payments", "cut").body("x")).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{early:?}");
    assert_eq!(upstream.requests(), 1);
    // ...and after lock_ttl the retry runs (nothing was stored).
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let late = proxy.send(proxy.post("/payments", "cut").body("x")).await;
    assert_eq!(late.status, StatusCode::BAD_GATEWAY, "{late:?}");
    assert_eq!(upstream.requests(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_body_that_stalls_before_the_head_gets_504_and_unlocks_after_lock_ttl() {
    let upstream =
        RawUpstream::start(|_| vec![partial_head(), Step::Pause(Duration::from_secs(30))]).await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "upstream_body_timeout = \"500ms\"",
        &format!("{MEMORY}\n[idempotency]\nlock_ttl = \"1s\"\n"),
    ));
    let started = Instant::now();
    let first = proxy.send(proxy.post("/payments", "stall").body("x")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT, "{first:?}");
    assert_eq!(first.problem(), "upstream-timeout");
    assert!(started.elapsed() < Duration::from_secs(5));
    let early = proxy.send(proxy.post("/payments", "stall").body("x")).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{early:?}");
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let late = proxy.send(proxy.post("/payments", "stall").body("x")).await;
    assert_eq!(late.status, StatusCode::GATEWAY_TIMEOUT, "{late:?}");
    assert_eq!(upstream.requests(), 2, "after lock_ttl the key runs again");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_body_that_stalls_after_the_head_cuts_the_connection() {
    let upstream = RawUpstream::start(|_| {
        vec![
            write("HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"),
            Step::Pause(Duration::from_secs(30)),
        ]
    })
    .await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "upstream_body_timeout = \"500ms\"",
        &format!("{MEMORY}\n[idempotency]\nlock_ttl = \"1s\"\n"),
    ));
    let response = proxy
        .post("/payments", "stall-late")
        .body("x")
        .send()
        .await
        .expect("head");
    assert_eq!(response.status(), StatusCode::CREATED);
    let body = tokio::time::timeout(Duration::from_secs(5), response.bytes())
        .await
        .expect("the connection is cut, not left hanging");
    assert!(body.is_err(), "a stalled body must not look complete");
    let early = proxy
        .send(proxy.post("/payments", "stall-late").body("x"))
        .await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{early:?}");
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_keyed_response_forwards_each_chunk_as_it_arrives() {
    let upstream = RawUpstream::start(|_| {
        vec![
            write("HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nfirst\r\n"),
            Step::Pause(Duration::from_millis(2500)),
            write("6\r\nsecond\r\n0\r\n\r\n"),
        ]
    })
    .await;
    let proxy = Proxy::start(&config(&upstream.url, MEMORY));
    let started = Instant::now();
    let mut response = proxy
        .post("/payments", "sse")
        .body("x")
        .send()
        .await
        .expect("head");
    let first = response.chunk().await.expect("first chunk").expect("data");
    assert_eq!(first, "first");
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "the first chunk took {:?}",
        started.elapsed()
    );
    let mut rest = Vec::new();
    while let Some(chunk) = response.chunk().await.expect("rest") {
        rest.extend_from_slice(&chunk);
    }
    assert_eq!(rest, b"second");
    // Holding back only the end of the stream keeps the promise: the client had the whole body,
    // so the retry is a replay.
    let retry = proxy.send(proxy.post("/payments", "sse").body("x")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, "firstsecond");
    assert_eq!(upstream.requests(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_request_body_that_stalls_gets_408_and_leaves_no_lease() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &upstream.url,
        &format!(
            "{MEMORY}\n[idempotency]\nbody_read_timeout = \"500ms\"\nmax_in_flight_per_caller = 1\n"
        ),
    ));
    let address = proxy.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    stream
        .write_all(
            b"POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: slow-body\r\n\
              Content-Length: 100\r\n\r\n0123456789",
        )
        .await
        .expect("partial body");
    let mut reply = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut chunk = [0; 4096];
        while !String::from_utf8_lossy(&reply).contains("body-read-timeout\"") {
            match stream.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => reply.extend_from_slice(&chunk[..n]),
            }
        }
    })
    .await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(read.is_ok(), "no answer to a stalled body: {reply}");
    assert!(reply.starts_with("HTTP/1.1 408"), "{reply}");
    assert!(
        reply
            .to_ascii_lowercase()
            .contains("content-type: application/problem+json"),
        "{reply}"
    );
    assert_eq!(upstream.runs(), 0, "nothing ran");
    // No lease and no in-flight slot left behind: the same caller's retry with the same key runs
    // at once, although the stalled connection is still open.
    let retry = proxy
        .send(proxy.post("/payments", "slow-body").body(vec![b'x'; 100]))
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(upstream.runs(), 1);
    drop(stream);
}

/// `429` on the first request, `200 ok` on every other.
async fn throttled_once() -> RawUpstream {
    RawUpstream::start(|n| {
        if n == 1 {
            vec![write(
                "HTTP/1.1 429 Too Many Requests\r\nRetry-After: 1\r\nContent-Length: 4\r\n\r\nslow",
            )]
        } else {
            vec![write("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")]
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_429_is_delivered_not_stored_and_the_retry_runs() {
    let upstream = throttled_once().await;
    let proxy = Proxy::start(&config(&upstream.url, MEMORY));
    let first = proxy.send(proxy.post("/payments", "busy").body("x")).await;
    assert_eq!(first.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(first.body, "slow");
    let retry = proxy.send(proxy.post("/payments", "busy").body("x")).await;
    assert_eq!(retry.status, StatusCode::OK, "{retry:?}");
    assert!(!retry.replayed());
    let again = proxy.send(proxy.post("/payments", "busy").body("x")).await;
    assert!(again.replayed(), "the 200 is stored");
    assert_eq!(upstream.requests(), 2);

    // A route can choose to store them.
    let upstream = throttled_once().await;
    let proxy = Proxy::start(&config(
        &upstream.url,
        &format!("{MEMORY}\n[[route]]\npath = \"/payments\"\nnever_store = []\n"),
    ));
    proxy.send(proxy.post("/payments", "busy").body("x")).await;
    let retry = proxy.send(proxy.post("/payments", "busy").body("x")).await;
    assert_eq!(retry.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(retry.replayed());
    assert_eq!(upstream.requests(), 1);
}
