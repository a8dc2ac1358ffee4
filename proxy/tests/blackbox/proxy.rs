//! The real proxy binary in front of a real counting upstream (memory store).

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::support::{Proxy, Reply, Upstream, config, config_with_proxy, eventually};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

async fn start(rest: &str) -> (Upstream, Proxy) {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &format!("{MEMORY}\n{rest}")));
    (upstream, proxy)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_is_replayed_and_the_upstream_runs_once() {
    let (upstream, proxy) = start("").await;
    let first = proxy
        .send(proxy.post("/payments", "k").body("10 EUR"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.replayed());
    let retry = proxy
        .send(proxy.post("/payments", "k").body("10 EUR"))
        .await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert!(retry.replayed());
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["x-charge-id"], "1");
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_duplicate_of_a_running_request_gets_409() {
    let (upstream, proxy) = start("").await;
    let proxy = Arc::new(proxy);
    let slow = {
        let proxy = proxy.clone();
        tokio::spawn(async move {
            proxy
                .send(proxy.post("/payments?ms=600", "k").body("x"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let duplicate = proxy
        .send(proxy.post("/payments?ms=600", "k").body("x"))
        .await;
    assert_eq!(duplicate.status, StatusCode::CONFLICT);
    assert_eq!(duplicate.problem(), "in-flight");
    assert_eq!(duplicate.headers["retry-after"], "1");
    assert_eq!(slow.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_mode_replays_the_running_request_to_its_duplicates() {
    let (upstream, proxy) = start("[idempotency]\non_conflict = \"wait\"\n").await;
    let proxy = Arc::new(proxy);
    let replies = futures_util::future::join_all((0..20).map(|_| {
        let proxy = proxy.clone();
        async move {
            proxy
                .send(proxy.post("/payments?ms=400", "w").body("x"))
                .await
        }
    }))
    .await;
    assert_eq!(upstream.runs(), 1);
    assert!(replies.iter().all(|r| r.status == StatusCode::CREATED));
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 19);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_for_another_body_gets_422() {
    let (upstream, proxy) = start("").await;
    proxy
        .send(proxy.post("/payments", "k").body("10 EUR"))
        .await;
    let reused = proxy
        .send(proxy.post("/payments", "k").body("20 EUR"))
        .await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.problem(), "key-reused");
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_route_refuses_a_request_without_a_key() {
    let (upstream, proxy) = start("[[route]]\npath = \"/payments/**\"\nrequired = true\n").await;
    let reply = proxy
        .send(
            proxy
                .client
                .post(format!("{}/payments", proxy.base))
                .body("x"),
        )
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem(), "missing-key");
    let invalid = proxy
        .send(proxy.post("/payments", "bad key").body("x"))
        .await;
    assert_eq!(invalid.status, StatusCode::BAD_REQUEST);
    assert_eq!(invalid.problem(), "invalid-key");
    assert_eq!(upstream.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_requests_and_disabled_routes_pass_through() {
    let (upstream, proxy) = start("[[route]]\npath = \"/feed/**\"\nenabled = false\n").await;
    for _ in 0..2 {
        let get = proxy
            .client
            .get(format!("{}/payments", proxy.base))
            .header("idempotency-key", "g");
        assert!(!proxy.send(get).await.replayed());
        assert!(
            !proxy
                .send(proxy.post("/feed/items", "f").body("x"))
                .await
                .replayed()
        );
    }
    assert_eq!(upstream.runs(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_is_released_so_the_retry_runs_again() {
    let (upstream, proxy) = start("").await;
    let first = proxy.send(proxy.post("/fail", "f")).await;
    let retry = proxy.send(proxy.post("/fail", "f")).await;
    assert_eq!(first.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(retry.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert!(!retry.replayed());
    assert_eq!(upstream.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_scoped_by_authorization() {
    let (upstream, proxy) = start("").await;
    let as_caller = |token: &str| {
        proxy
            .post("/payments", "shared")
            .header("authorization", format!("Bearer {token}"))
            .body("x")
    };
    let alice = proxy.send(as_caller("alice")).await;
    let bob = proxy.send(as_caller("bob")).await;
    assert!(
        !bob.replayed(),
        "a different caller must never get a replay"
    );
    assert!(bob.text().contains("Bearer bob"), "{}", bob.text());
    let alice_again = proxy.send(as_caller("alice")).await;
    assert!(alice_again.replayed());
    assert_eq!(alice_again.body, alice.body);
    assert_eq!(upstream.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_request_body_gets_413_and_is_not_forwarded() {
    let (upstream, proxy) = start("[idempotency]\nmax_request_body = \"1KiB\"\n").await;
    let reply = proxy
        .send(proxy.post("/payments", "big").body(vec![b'x'; 1025]))
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.problem(), "body-too-large");
    assert_eq!(upstream.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_large_response_is_delivered_whole_and_never_replayed_truncated() {
    let (upstream, proxy) = start("[idempotency]\nmax_response_body = \"64KiB\"\n").await;
    let size = 1024 * 1024;
    let path = format!("/big?size={size}");
    let first = proxy.send(proxy.post(&path, "big")).await;
    assert_eq!(first.body.len(), size);
    let retry = proxy.send(proxy.post(&path, "big")).await;
    assert_eq!(retry.body.len(), size, "never a truncated replay");
    assert!(
        !retry.replayed(),
        "too large to store: the retry runs again"
    );
    assert_ne!(first.body[0], retry.body[0], "two distinct runs");
    assert_eq!(upstream.runs(), 2);

    // Under the limit, streamed in chunks, it is stored whole and replayed byte for byte.
    let small = proxy.send(proxy.post("/big?size=50000", "small")).await;
    let replay = proxy.send(proxy.post("/big?size=50000", "small")).await;
    assert!(replay.replayed());
    assert_eq!(replay.body, small.body);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_record_expires_after_its_ttl() {
    let (upstream, proxy) = start("[idempotency]\nttl = \"1s\"\n").await;
    proxy.send(proxy.post("/payments", "t").body("x")).await;
    assert!(
        proxy
            .send(proxy.post("/payments", "t").body("x"))
            .await
            .replayed()
    );
    tokio::time::sleep(Duration::from_millis(1300)).await;
    let after = proxy.send(proxy.post("/payments", "t").body("x")).await;
    assert!(!after.replayed());
    assert_eq!(upstream.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn hop_by_hop_headers_are_removed_both_ways_and_forwarding_headers_set() {
    let (upstream, proxy) = start("").await;
    let reply = proxy
        .send(
            proxy
                .client
                .get(format!("{}/headers", proxy.base))
                .header("connection", "x-client-hop")
                .header("x-client-hop", "1")
                .header("proxy-authorization", "Basic eDp5")
                .header("te", "trailers")
                .header("x-forwarded-for", "203.0.113.9")
                .header("x-end-to-end", "1"),
        )
        .await;
    let seen = upstream.last_headers();
    for hop in ["x-client-hop", "proxy-authorization", "te"] {
        assert!(
            !seen.contains_key(hop),
            "{hop} reached the upstream: {seen:?}"
        );
    }
    assert_eq!(seen["x-end-to-end"], "1");
    assert_eq!(seen["x-forwarded-for"], "203.0.113.9, 127.0.0.1");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert!(
        seen["x-forwarded-host"]
            .to_str()
            .expect("host")
            .starts_with("127.0.0.1:")
    );
    for hop in ["x-upstream-hop", "keep-alive", "proxy-authenticate"] {
        assert!(!reply.headers.contains_key(hop), "{hop} reached the client");
    }
    assert_eq!(reply.headers["x-end-to-end"], "1");
}

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_and_metrics() {
    let (_upstream, proxy) = start("").await;
    assert_eq!(proxy.admin_get("/healthz").await.status, StatusCode::OK);
    assert_eq!(proxy.admin_get("/readyz").await.status, StatusCode::OK);
    let request = |body: &'static str| {
        proxy
            .post("/payments", "key-3f9a7c")
            .header("authorization", "Bearer token-8d2e41")
            .body(body)
    };
    proxy.send(request("x")).await;
    proxy.send(request("x")).await;
    proxy.send(request("other")).await;
    let metrics = proxy.admin_get("/metrics").await.text();
    for expected in [
        "idempotency_requests_total{outcome=\"executed\"} 1",
        "idempotency_requests_total{outcome=\"replayed\"} 1",
        "idempotency_requests_total{outcome=\"mismatch\"} 1",
        "idempotency_leases_in_flight 0",
        "idempotency_store_duration_seconds_bucket{operation=\"begin\"",
        "idempotency_proxy_upstream_duration_seconds_bucket{status=\"2xx\"",
        "# HELP idempotency_requests_total",
    ] {
        assert!(
            metrics.contains(expected),
            "missing {expected:?} in:\n{metrics}"
        );
    }
    for secret in ["key-3f9a7c", "token-8d2e41", "3f9a7c", "8d2e41"] {
        assert!(
            !metrics.contains(secret),
            "metrics must never carry keys or scopes"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_upstream_gets_502_and_a_stalled_one_504() {
    let refused = Proxy::start(&config(
        &format!("http://127.0.0.1:{}", crate::support::free_port()),
        MEMORY,
    ));
    let reply = refused.send(refused.post("/payments", "r").body("x")).await;
    assert_eq!(reply.status, StatusCode::BAD_GATEWAY);
    assert_eq!(reply.problem(), "upstream-unavailable");

    // A refused connection never reached the upstream: the key is free for the retry at once.
    let retry = refused.send(refused.post("/payments", "r").body("x")).await;
    assert_eq!(
        retry.status,
        StatusCode::BAD_GATEWAY,
        "released, so the retry tried again"
    );

    let upstream = Upstream::start().await;
    let stalled = Proxy::start(&config_with_proxy(
        &upstream.url,
        "upstream_timeout = \"300ms\"",
        &format!("{MEMORY}\n[idempotency]\nlock_ttl = \"1s\"\n"),
    ));
    let slow = |delay: u64| {
        stalled
            .post("/payments", "s")
            .header("x-delay-ms", delay.to_string())
            .body("x")
    };
    let reply = stalled.send(slow(2000)).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    // Its late answer is awaited for lock_ttl (see late_outcome.rs); 2 s is too late.
    assert_eq!(reply.problem(), "outcome-pending");
    // The upstream may still be charging: a retry must not run alongside it...
    let early = stalled.send(slow(0)).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{early:?}");
    // ...and once lock_ttl has passed the retry runs (a timeout is never replayed).
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let late = stalled.send(slow(0)).await;
    assert_eq!(late.status, StatusCode::CREATED);
    assert!(!late.replayed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_client_is_cut_off_by_the_header_read_timeout() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "header_read_timeout = \"500ms\"",
        MEMORY,
    ));
    let address = proxy.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    stream
        .write_all(b"POST /payments HTTP/1.1\r\nHost: x\r\n")
        .await
        .expect("partial head");
    let started = Instant::now();
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut buffer)).await;
    assert!(
        read.is_ok(),
        "the proxy must close a connection whose head never completes"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(upstream.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_drains_a_request_in_flight_then_exits_zero() {
    let (upstream, mut proxy) = start("").await;
    let request = proxy.post("/payments?ms=800", "drain").body("x").send();
    let in_flight =
        tokio::spawn(async move { Reply::read(request.await.expect("in-flight request")).await });
    eventually(
        Duration::from_secs(5),
        "the request to reach the proxy",
        async || proxy.metric("idempotency_leases_in_flight").await >= 1.0,
    )
    .await;
    proxy.signal("TERM");
    let reply = in_flight.await.expect("task");
    assert_eq!(
        reply.status,
        StatusCode::CREATED,
        "the in-flight request completes"
    );
    let status = proxy.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_client_disconnecting_does_not_lose_the_result() {
    let (upstream, proxy) = start("").await;
    let gave_up = proxy
        .post("/payments?ms=500", "gone")
        .body("x")
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gave_up.is_err());
    eventually(
        Duration::from_secs(5),
        "the upstream to finish",
        async || upstream.runs() == 1,
    )
    .await;
    let retry = proxy
        .send(proxy.post("/payments?ms=500", "gone").body("x"))
        .await;
    assert!(retry.replayed());
    assert_eq!(upstream.runs(), 1);
}

#[test]
fn a_bad_configuration_stops_the_proxy_naming_the_key_and_line() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("proxy.toml");
    for (text, expected) in [
        (
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\n[idempotency]\nlock_ttl = \"30s\"\nttl = \"forever\"\n",
            ["line 7", "key `idempotency.ttl`"],
        ),
        (
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\nupstreem_timeout = \"1s\"\n",
            ["line 4", "upstreem_timeout"],
        ),
        (
            "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\n[store]\nbackend = \"postgres\"\n",
            ["line 5", "key `store.url`"],
        ),
    ] {
        std::fs::write(&file, text).expect("write config");
        let output = std::process::Command::new(crate::support::PROXY_BIN)
            .arg("--config")
            .arg(&file)
            .output()
            .expect("run the proxy");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(output.status.code(), Some(2), "{stderr}");
        for fragment in expected {
            assert!(
                stderr.contains(fragment),
                "{fragment:?} missing from: {stderr}"
            );
        }
    }
}

#[test]
fn check_validates_and_prints_the_policy_of_every_route() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/proxy.toml");
    let output = std::process::Command::new(crate::support::PROXY_BIN)
        .args(["check", "--config", example])
        .output()
        .expect("run check");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("configuration ok"));
    assert!(stdout.contains("route /payments/**"));
    assert!(stdout.contains("(required)"));
    assert!(stdout.contains("route /feed/**\n  disabled"));

    let version = std::process::Command::new(crate::support::PROXY_BIN)
        .arg("--version")
        .output()
        .expect("run --version");
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("idempotency-proxy "));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_header_flood_is_refused_before_it_reaches_the_layer() {
    let (upstream, proxy) = start("").await;
    let address = proxy.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&address)
        .await
        .expect("connect");
    let mut head = String::from("POST /payments HTTP/1.1\r\nHost: x\r\nIdempotency-Key: flood\r\n");
    for i in 0..500 {
        head.push_str(&format!("x-flood-{i}: {}\r\n", "v".repeat(64)));
    }
    head.push_str("Content-Length: 0\r\n\r\n");
    let _ = stream.write_all(head.as_bytes()).await;
    let mut reply = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut reply)).await;
    let reply = String::from_utf8_lossy(&reply);
    assert!(
        reply.starts_with("HTTP/1.1 431"),
        "too many headers must be refused with 431, got: {reply:?}"
    );
    assert_eq!(upstream.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upstream_can_be_spoken_to_over_h2c() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "upstream_http2 = true",
        MEMORY,
    ));
    let first = proxy.send(proxy.post("/payments", "h2c").body("x")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let retry = proxy.send(proxy.post("/payments", "h2c").body("x")).await;
    assert!(retry.replayed());
    let seen = proxy
        .send(proxy.client.get(format!("{}/headers", proxy.base)))
        .await;
    assert_eq!(seen.status, StatusCode::OK);
    assert_eq!(
        upstream.last_version(),
        http::Version::HTTP_2,
        "the upstream saw HTTP/2"
    );
}
