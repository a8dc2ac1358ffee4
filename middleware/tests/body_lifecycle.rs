//! Response bodies that break, in a real axum app behind the layer: the outcome is unknown, so
//! nothing is stored and the key stays locked until `lock_ttl`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::routing::post;
use futures_util::StreamExt;
use reqwest::StatusCode;
use tower_idempotency::{BodyTimeout, BoxError, IdempotencyLayer, MemoryStore, Policy};

type Runs = Arc<AtomicUsize>;

/// A body that sends `part`, waits `pause`, then fails with `error`.
fn breaking(part: &'static str, pause: Duration, error: fn() -> BoxError) -> Body {
    let frames = futures_util::stream::iter([Ok(Bytes::from(part)), Err(())]).then(
        move |frame| async move {
            match frame {
                Ok(data) => Ok(data),
                Err(()) => {
                    if !pause.is_zero() {
                        tokio::time::sleep(pause).await;
                    }
                    Err(error())
                }
            }
        },
    );
    Body::from_stream(frames)
}

fn broken() -> BoxError {
    "the handler's body broke".into()
}

fn stalled() -> BoxError {
    Box::new(BodyTimeout(Duration::from_millis(10)))
}

fn count(runs: &Runs) {
    runs.fetch_add(1, Ordering::SeqCst);
}

async fn start() -> (String, Runs) {
    let runs = Runs::default();
    let app = Router::new()
        .route(
            "/at-once",
            post(|State(runs): State<Runs>| async move {
                count(&runs);
                breaking("", Duration::ZERO, broken)
            }),
        )
        .route(
            "/stalls",
            post(|State(runs): State<Runs>| async move {
                count(&runs);
                breaking("", Duration::ZERO, stalled)
            }),
        )
        .route(
            "/after-the-head",
            post(|State(runs): State<Runs>| async move {
                count(&runs);
                breaking("partial", Duration::from_millis(200), broken)
            }),
        )
        .with_state(runs.clone())
        .layer(
            IdempotencyLayer::new(MemoryStore::new())
                .policy(Policy::default().with_lock_ttl(Duration::from_millis(600))),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a free port");
    let base = format!("http://{}", listener.local_addr().expect("local addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (base, runs)
}

async fn post_keyed(base: &str, path: &str) -> reqwest::Response {
    reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("idempotency-key", path)
        .send()
        .await
        .expect("response head")
}

fn problem_type(body: &[u8]) -> String {
    let json: serde_json::Value = serde_json::from_slice(body).expect("problem json");
    json["type"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_fails_before_the_head_is_a_problem_and_keeps_the_key_locked() {
    let (base, runs) = start().await;
    let first = post_keyed(&base, "/at-once").await;
    assert_eq!(first.status(), StatusCode::BAD_GATEWAY);
    assert!(problem_type(&first.bytes().await.expect("body")).ends_with("#upstream-unavailable"));
    let early = post_keyed(&base, "/at-once").await;
    assert_eq!(early.status(), StatusCode::CONFLICT, "not released");
    assert_eq!(runs.load(Ordering::SeqCst), 1);

    let stalled = post_keyed(&base, "/stalls").await;
    assert_eq!(stalled.status(), StatusCode::GATEWAY_TIMEOUT);
    assert!(problem_type(&stalled.bytes().await.expect("body")).ends_with("#upstream-timeout"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_body_that_fails_after_the_head_keeps_the_key_locked_until_lock_ttl() {
    let (base, runs) = start().await;
    let first = post_keyed(&base, "/after-the-head").await;
    assert_eq!(first.status(), StatusCode::OK);
    assert!(first.bytes().await.is_err(), "the client sees the break");
    let early = post_keyed(&base, "/after-the-head").await;
    assert_eq!(
        early.status(),
        StatusCode::CONFLICT,
        "the operation ran: an immediate retry must not run it again"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = post_keyed(&base, "/after-the-head").await;
    assert_eq!(
        late.status(),
        StatusCode::OK,
        "nothing was stored: it runs again"
    );
    assert_eq!(runs.load(Ordering::SeqCst), 2);
}
