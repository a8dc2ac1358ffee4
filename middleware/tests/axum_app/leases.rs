//! The lease while the handler runs: renewed for a long request, released by a panic, kept
//! until `lock_ttl` for an unknown outcome, counted while detached, and held for a late outcome.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tower_idempotency::Policy;

use super::{App, memory};

#[tokio::test(flavor = "multi_thread")]
async fn a_long_request_keeps_its_lease_by_renewal() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_millis(300)));
    let app = Arc::new(App::start(layer).await);
    let long = {
        let app = app.clone();
        tokio::spawn(async move {
            app.send(app.post("/payments?ms=1200", "long").body("x"))
                .await
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let duplicate = app
            .send(app.post("/payments?ms=1200", "long").body("x"))
            .await;
        assert_eq!(
            duplicate.status,
            StatusCode::CONFLICT,
            "the lease is still held"
        );
    }
    assert_eq!(long.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_releases_its_lease() {
    let app =
        App::start(memory().policy(Policy::default().with_lock_ttl(Duration::from_secs(600))))
            .await;
    let crashed = app.post("/panics", "p").send().await;
    assert!(
        crashed.is_err(),
        "the connection is dropped, as without the layer"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = app.send(app.post("/panics", "p")).await;
    assert_eq!(
        retry.status,
        StatusCode::OK,
        "the retry ran instead of waiting out lock_ttl"
    );
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_outcome_keeps_the_key_locked_until_lock_ttl() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_millis(600)));
    let app = App::start(layer).await;
    let first = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let early = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(
        early.status,
        StatusCode::CONFLICT,
        "not released: it may still be running"
    );
    assert_eq!(app.counters.runs(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(
        late.status,
        StatusCode::GATEWAY_TIMEOUT,
        "not stored: it runs again"
    );
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_in_flight_counts_a_detached_request_until_it_is_stored() {
    let layer = memory();
    let leases = layer.leases_in_flight();
    let app = App::start(layer).await;
    let gave_up = app
        .post("/payments?ms=600", "detached")
        .body("5 EUR")
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client must time out and disconnect");
    assert_eq!(
        leases.count(),
        1,
        "the detached request still holds its lease"
    );
    tokio::time::timeout(Duration::from_secs(5), leases.idle())
        .await
        .expect("the lease settles once the response is stored");
    assert_eq!(app.counters.runs(), 1);
    let retry = app
        .send(app.post("/payments?ms=600", "detached").body("5 EUR"))
        .await;
    assert!(retry.replayed(), "{retry:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_outcome_is_awaited_stored_and_replayed() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_secs(5)));
    let leases = layer.leases_in_flight();
    let app = App::start(layer).await;
    let first = app.send(app.post("/answers-late", "late")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.problem_type(), "outcome-pending");
    assert_eq!(first.headers["retry-after"], "5");
    assert_eq!(leases.count(), 1, "the pending late result holds its lease");
    tokio::time::timeout(Duration::from_secs(3), leases.idle())
        .await
        .expect("settled once the late result is stored");
    let retry = app.send(app.post("/answers-late", "late")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"late 1");
    assert_eq!(app.counters.runs(), 1);
}
