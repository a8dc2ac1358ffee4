//! Who the caller is: session cookies as scope credentials, refusing anonymous keyed requests,
//! and in-flight limits per client address for callers without credentials.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use axum::Router;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::post;
use futures_util::future::join_all;

use crate::support::{Proxy, Upstream, config};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

/// An upstream that logs the caller in: it answers with the session it saw and sets a cookie
/// only that caller may receive.
async fn session_upstream() -> (String, Arc<AtomicUsize>) {
    let runs = Arc::new(AtomicUsize::new(0));
    let counted = runs.clone();
    let app = Router::new().route(
        "/orders",
        post(move |headers: HeaderMap| {
            let run = counted.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                let cookies = headers
                    .get_all(header::COOKIE)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .collect::<Vec<_>>()
                    .join("; ");
                let session = cookies
                    .split(';')
                    .filter_map(|pair| pair.trim().strip_prefix("session="))
                    .next()
                    .unwrap_or("none")
                    .to_owned();
                (
                    StatusCode::CREATED,
                    [(header::SET_COOKIE, format!("receipt={session}-{run}"))],
                    format!("order {run} for {session}"),
                )
                    .into_response()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, runs)
}

#[tokio::test(flavor = "multi_thread")]
async fn session_cookies_scope_keys_and_other_cookies_do_not() {
    let (url, runs) = session_upstream().await;
    let proxy = Proxy::start(&config(
        &url,
        &format!("{MEMORY}\n[idempotency]\nscope_cookies = [\"session\"]\n"),
    ));
    let order = |cookie: &str| {
        proxy
            .post("/orders", "cart-42")
            .header("cookie", cookie.to_owned())
            .body("1 book")
    };
    let alice = proxy.send(order("session=alice; tracking=1")).await;
    let bob = proxy.send(order("tracking=2; session=bob")).await;
    assert_eq!(alice.status, 201);
    assert_eq!(bob.status, 201);
    assert!(!bob.replayed(), "bob must never get alice's response");
    assert!(bob.text().contains("for bob"), "{}", bob.text());
    assert!(
        bob.headers[header::SET_COOKIE]
            .to_str()
            .unwrap()
            .starts_with("receipt=bob-"),
        "bob never gets alice's Set-Cookie: {:?}",
        bob.headers
    );
    // Alice retries with a tracking cookie that changed meanwhile, in a second Cookie header.
    let retry = proxy
        .send(
            proxy
                .post("/orders", "cart-42")
                .header("cookie", "tracking=99")
                .header("cookie", "session=alice")
                .body("1 book"),
        )
        .await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, alice.body);
    assert_eq!(
        retry.headers[header::SET_COOKIE],
        alice.headers[header::SET_COOKIE]
    );
    // An empty session is a caller of its own, not the same as no session at all.
    let empty = proxy.send(order("session=")).await;
    let none = proxy.send(order("tracking=3")).await;
    assert!(!empty.replayed() && !none.replayed());
    assert_eq!(runs.load(Ordering::SeqCst), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_keyed_requests_are_refused_where_the_route_says_so() {
    let (url, runs) = session_upstream().await;
    let proxy = Proxy::start(&config(
        &url,
        &format!(
            "{MEMORY}\n[idempotency]\nscope_cookies = [\"session\"]\n\n[[route]]\npath = \"/orders\"\nanonymous = \"reject\"\n"
        ),
    ));
    let refused = proxy
        .send(
            proxy
                .post("/orders", "k")
                .header("cookie", "tracking=1")
                .body("x"),
        )
        .await;
    assert_eq!(refused.status, 403);
    assert_eq!(refused.problem(), "credentials-required");
    assert_eq!(
        runs.load(Ordering::SeqCst),
        0,
        "a refused request never runs"
    );
    let with_session = proxy
        .send(
            proxy
                .post("/orders", "k")
                .header("cookie", "session=s")
                .body("x"),
        )
        .await;
    assert_eq!(with_session.status, 201);
    let with_token = proxy
        .send(
            proxy
                .post("/orders", "k")
                .header("authorization", "Bearer t")
                .body("x"),
        )
        .await;
    assert_eq!(with_token.status, 201, "a scope header is a credential too");
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}

#[test]
fn check_warns_about_routes_that_rely_on_the_default_scope() {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("proxy.toml");
    std::fs::write(
        &file,
        "[proxy]\nlisten = \"127.0.0.1:0\"\nupstream = \"http://127.0.0.1:1\"\n\n\
         [[route]]\npath = \"/orders/**\"\n\n\
         [[route]]\npath = \"/sessions/**\"\nscope_cookies = [\"session\"]\n\n\
         [[route]]\npath = \"/feed/**\"\nenabled = false\n",
    )
    .expect("write config");
    let output = std::process::Command::new(crate::support::PROXY_BIN)
        .args(["check", "--config"])
        .arg(&file)
        .output()
        .expect("run check");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let warnings: Vec<_> = stderr
        .lines()
        .filter(|l| l.starts_with("warning:"))
        .collect();
    assert!(
        warnings.iter().any(|w| w.contains("route /orders/**")),
        "{stderr}"
    );
    assert!(
        warnings.iter().any(|w| w.contains("every other path")),
        "{stderr}"
    );
    assert!(
        !warnings
            .iter()
            .any(|w| w.contains("/sessions") || w.contains("/feed")),
        "{stderr}"
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("scope_cookies        session"), "{stdout}");
}

/// A client whose connections come from `127.0.0.{last}`.
fn client_from(last: u8) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(IpAddr::V4(Ipv4Addr::new(127, 0, 0, last)))
        .build()
        .expect("client")
}

#[tokio::test(flavor = "multi_thread")]
async fn anonymous_callers_are_counted_per_client_address() {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(
        &upstream.url,
        &format!("{MEMORY}\n[idempotency]\nmax_in_flight_per_caller = 100\n"),
    ));
    let send = |client: reqwest::Client, key: String| {
        let url = format!("{}/payments?ms=1500", proxy.base);
        async move {
            client
                .post(url)
                .header("idempotency-key", key)
                .body("x")
                .send()
                .await
                .expect("request")
                .status()
        }
    };
    // 105 different people without credentials, at once.
    let statuses = join_all((0..105u8).map(|i| send(client_from(2 + i), format!("p{i}")))).await;
    assert!(
        statuses.iter().all(|s| *s == StatusCode::CREATED),
        "{statuses:?}"
    );
    // One address with 101 requests in progress is over its limit.
    let crowd = client_from(200);
    let statuses = join_all((0..101).map(|i| send(crowd.clone(), format!("c{i}")))).await;
    let throttled = statuses
        .iter()
        .filter(|s| **s == StatusCode::TOO_MANY_REQUESTS)
        .count();
    assert_eq!(throttled, 1, "{statuses:?}");
}
