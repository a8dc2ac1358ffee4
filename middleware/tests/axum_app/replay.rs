//! Replays: a retry gets the stored response without running the handler, concurrent
//! duplicates run once (rejected or waiting), a reused key is refused, and what is not stored
//! (a 5xx, a body over the limit) runs again.

use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use tower_idempotency::{OnConflict, Policy};

use super::{App, memory};

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_is_replayed_without_running_the_handler() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/payments", "k1").body("10 EUR")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "charge 1 for 10 EUR");
    assert!(!first.replayed());

    let retry = app.send(app.post("/payments", "k1").body("10 EUR")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["x-charge-id"], "1");
    assert!(retry.replayed());
    assert_eq!(app.counters.runs(), 1);

    let quoted = app
        .send(app.post("/payments", "\"k1\"").body("10 EUR"))
        .await;
    assert!(quoted.replayed(), "a quoted key names the same operation");
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_duplicates_run_once() {
    let app = App::start(memory()).await;
    let replies = app
        .send_together((0..50).map(|_| app.post("/payments?ms=200", "dup").body("x")))
        .await;
    assert_eq!(app.counters.runs(), 1);
    let created = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    let conflicts: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!(created + conflicts.len(), 50, "{replies:?}");
    assert!(created >= 1);
    for conflict in conflicts {
        assert_eq!(conflict.problem_type(), "in-flight");
        assert!(conflict.headers.contains_key("retry-after"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_mode_gives_every_duplicate_the_one_response() {
    // A poll interval longer than the test shows the waiters are woken by notification.
    let layer = memory()
        .policy(Policy::default().with_on_conflict(OnConflict::Wait))
        .poll_interval(Duration::from_secs(60));
    let app = App::start(layer).await;
    let replies = app
        .send_together((0..50).map(|_| app.post("/payments?ms=300", "wait").body("x")))
        .await;
    assert_eq!(app.counters.runs(), 1);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert_eq!(reply.body, "charge 1 for x");
    }
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_mode_gives_up_after_its_timeout() {
    let layer = memory().policy(
        Policy::default()
            .with_on_conflict(OnConflict::Wait)
            .with_wait_timeout(Duration::from_millis(200)),
    );
    let app = Arc::new(App::start(layer).await);
    let slow = {
        let app = app.clone();
        tokio::spawn(async move {
            app.send(app.post("/payments?ms=1500", "slow").body("x"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = app
        .send(app.post("/payments?ms=1500", "slow").body("x"))
        .await;
    assert_eq!(waiter.status, StatusCode::CONFLICT);
    assert_eq!(waiter.problem_type(), "in-flight");
    assert_eq!(slow.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_for_another_request_is_refused() {
    let app = App::start(memory()).await;
    app.send(app.post("/payments", "k").body("10 EUR")).await;
    let other_body = app.send(app.post("/payments", "k").body("99 EUR")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.problem_type(), "key-reused");
    let other_path = app
        .send(app.post("/payments?x=1", "k").body("10 EUR"))
        .await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_is_not_stored_so_the_retry_runs_again() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/fail", "f")).await;
    let second = app.send(app.post("/fail", "f")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!second.replayed());
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_still_gets_a_replay_on_retry() {
    let app = App::start(memory()).await;
    let gave_up = app
        .post("/payments?ms=500", "gone")
        .body("5 EUR")
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client must time out and disconnect");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.counters.runs(), 1, "the handler ran to completion");
    let retry = app
        .send(app.post("/payments?ms=500", "gone").body("5 EUR"))
        .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "charge 1 for 5 EUR");
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_response_is_stored_whole_and_replayed() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/stream", "s")).await;
    let expected: String = (0..5).map(|i| format!("run 1 chunk {i};")).collect();
    assert_eq!(first.body, expected);
    let retry = app.send(app.post("/stream", "s")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, expected);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_over_the_storage_limit_reaches_the_client_whole_and_is_not_replayed() {
    let layer = memory().policy(Policy::default().with_max_response_body(64 * 1024usize));
    let app = App::start(layer).await;
    let first = app.send(app.post("/big?size=200000", "big")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 200_000, "never truncated");
    let retry = app.send(app.post("/big?size=200000", "big")).await;
    assert!(!retry.replayed());
    assert_eq!(retry.body.len(), 200_000);
    assert_eq!(app.counters.runs(), 2);

    let small = app.send(app.post("/big?size=1000", "small")).await;
    assert_eq!(small.body.len(), 1000);
    assert!(
        app.send(app.post("/big?size=1000", "small"))
            .await
            .replayed()
    );
}
