//! Completions, releases and forgets reach other instances over pub/sub: only watched
//! completions are published, and a subscriber whose connection is killed comes back.

use futures_util::StreamExt;
use redis::aio::MultiplexedConnection;
use test_fixtures::records::{NOTIFY_WITHIN, acquire, key, response};
use test_fixtures::shared_store::{
    completions_and_releases_wake_another_process, forgets_reach_another_process,
};
use tower_idempotency::IdempotencyStore;
use tower_idempotency::conformance::LONG;
use tower_idempotency::store::ForgetEvent;

use super::redis_support::{
    RedisServer, eventually, raw_connection, redis_url, store_at, unique_prefix,
};

/// Disconnects every pub/sub client of the server behind `connection`; returns how many.
async fn kill_subscribers(connection: &mut MultiplexedConnection) -> i64 {
    redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(connection)
        .await
        .expect("CLIENT KILL")
}

/// A completion in one process wakes the waiters of another (here: a second connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_in_another_instance_wake_subscribers() {
    let url = redis_url();
    let prefix = unique_prefix("cross");
    completions_and_releases_wake_another_process(
        &store_at(&url, &prefix).await,
        &store_at(&url, &prefix).await,
    )
    .await;
}

/// A completion nobody watches is not published: requests nobody waits for cost no message.
#[tokio::test]
async fn only_watched_completions_are_published() {
    let url = redis_url();
    let prefix = unique_prefix("unwatched");
    let store = store_at(&url, &prefix).await;
    let client = redis::Client::open(url.as_str()).expect("client");
    let mut pubsub = client.get_async_pubsub().await.expect("pubsub");
    pubsub
        .subscribe(format!("{prefix}:completed"))
        .await
        .expect("subscribe");
    let mut messages = pubsub.on_message();

    let quiet = key("unwatched");
    let token = acquire(&store, &quiet, LONG).await;
    store
        .complete(&quiet, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    let watched = key("watched");
    let token = acquire(&store, &watched, LONG).await;
    assert!(store.watch(&watched).await.expect("watch"));
    store
        .complete(&watched, token, &response(b"x"), LONG)
        .await
        .expect("complete");

    let message = tokio::time::timeout(NOTIFY_WITHIN, messages.next())
        .await
        .expect("a message")
        .expect("a message");
    assert_eq!(
        message.get_payload_bytes(),
        watched.to_hex().as_bytes(),
        "the first message is the watched key's: the unwatched completion sent none"
    );
}

/// After its connection is killed the subscriber comes back, wakes every waiter once (it may have
/// missed completions) and delivers completions again.
///
/// `CLIENT KILL TYPE pubsub` hits every subscriber on the server, so this runs on a private
/// server rather than disturb the notification checks running in parallel on the shared one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscriber_reconnects_after_its_connection_is_killed() {
    let server = RedisServer::start();
    let url = server.url();
    let prefix = unique_prefix("reconnect");
    let waiter = store_at(&url, &prefix).await;
    let worker = store_at(&url, &prefix).await;
    let mut raw = raw_connection(&url).await;

    let idle = key("never-completed");
    let idle_subscription = waiter.subscribe(&idle);
    let told_to_look_again = idle_subscription.notified();
    let killed = kill_subscribers(&mut raw).await;
    assert_eq!(killed, 2, "both stores' subscribers were connected");
    tokio::time::timeout(NOTIFY_WITHIN, told_to_look_again)
        .await
        .expect("after resubscribing, waiters are woken to look at the store again");

    let channel = format!("{prefix}:completed");
    eventually(NOTIFY_WITHIN, "both subscribers are back", || {
        let (mut raw, channel) = (raw.clone(), channel.clone());
        async move {
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(&channel)
                .query_async(&mut raw)
                .await
                .expect("PUBSUB NUMSUB");
            counts.first().is_some_and(|(_, count)| *count == 2)
        }
    })
    .await;

    let completed = key("after-reconnect");
    let token = acquire(&worker, &completed, LONG).await;
    let subscription = waiter.subscribe(&completed);
    let woken = subscription.notified();
    assert!(waiter.watch(&completed).await.expect("watch"));
    worker
        .complete(&completed, token, &response(b"again"), LONG)
        .await
        .expect("complete");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("the resubscribed listener delivers completions again");
}

/// Forgets go through the completion channel: a forget in one instance reaches another's forget
/// feed, and a forced forget wakes the other's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_in_one_instance_reaches_anothers_feed() {
    let url = redis_url();
    let prefix = unique_prefix("forget-cross");
    forgets_reach_another_process(
        &store_at(&url, &prefix).await,
        &store_at(&url, &prefix).await,
    )
    .await;
}

/// A subscriber that lost its connection may have missed forgets: its feed says so. (On a
/// private server: killing pub/sub clients would disturb other tests.)
#[tokio::test]
async fn a_resubscribe_tells_the_feed_forgets_may_be_missed() {
    let server = RedisServer::start();
    let url = server.url();
    let store = store_at(&url, &unique_prefix("forget-reconnect")).await;
    let mut feed = store.forget_feed().expect("a forget feed");
    let mut raw = raw_connection(&url).await;
    let killed = kill_subscribers(&mut raw).await;
    assert_eq!(killed, 1);
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Unknown));
}
