//! `RedisStore` against a real Redis server at `REDIS_URL` (default `redis://127.0.0.1:6379`):
//! the store contract suite, then what is specific to Redis (key layout, TTLs, scripts, pub/sub).
//!
//! Every test uses its own key prefix, so they run in parallel on one server. The tests that act
//! server-wide (`SCRIPT FLUSH`, `CLIENT KILL`, `CLIENT PAUSE`) start a private `redis-server`
//! instead, so they never disturb the others.

mod redis_support;

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use http::{HeaderMap, HeaderValue, StatusCode};
use redis::aio::MultiplexedConnection;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::record::DecodeError;
use tower_idempotency::{
    Begin, IdempotencyStore, LeaseToken, RecordKey, RedisStore, Scope, StoreError, StoredResponse,
};

use redis_support::{
    RedisServer, eventually, is_lease_lost, raw_connection, redis_url, store_at, unique_prefix,
};

mod conformance {
    tower_idempotency::store_conformance_tests!(|| async {
        let url = super::redis_support::redis_url();
        super::redis_support::store_at(&url, &super::redis_support::unique_prefix("conformance"))
            .await
    });
}

const LONG: Duration = Duration::from_secs(600);
const NOTIFY_WITHIN: Duration = Duration::from_secs(5);

fn key(name: &str) -> RecordKey {
    RecordKey::new(&Scope::from_bytes(b"redis-store-tests"), name.as_bytes())
}

fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

fn response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.append("content-type", HeaderValue::from_static("text/plain"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(body))
}

async fn acquire(store: &RedisStore, key: &RecordKey, tag: u8, lock: Duration) -> LeaseToken {
    match store.begin(key, &fingerprint(tag), lock).await {
        Ok(Begin::Acquired { token, .. }) => token,
        other => panic!("expected to acquire a free key, got {other:?}"),
    }
}

async fn server_time_us(connection: &mut MultiplexedConnection) -> u64 {
    let (seconds, micros): (u64, u64) = redis::cmd("TIME")
        .query_async(connection)
        .await
        .expect("TIME");
    seconds * 1_000_000 + micros
}

async fn pttl(connection: &mut MultiplexedConnection, name: &str) -> i64 {
    redis::cmd("PTTL")
        .arg(name)
        .query_async(connection)
        .await
        .expect("PTTL")
}

async fn value(connection: &mut MultiplexedConnection, name: &str) -> Vec<u8> {
    redis::cmd("GET")
        .arg(name)
        .query_async(connection)
        .await
        .expect("GET")
}

fn be_u64(bytes: &[u8]) -> u64 {
    u64::from_be_bytes(bytes.try_into().expect("8 bytes"))
}

/// An in-flight value written before attempts were counted (the bare 50-byte header) still works:
/// its lapsed lease is taken over as attempt 2, which then takes checkpoints.
#[tokio::test]
async fn an_in_flight_value_from_before_attempts_is_taken_over_as_attempt_2() {
    let url = redis_url();
    let prefix = unique_prefix("legacy");
    let store = store_at(&url, &prefix).await;
    let mut raw = raw_connection(&url).await;
    let key = key("legacy");
    let name = format!("{prefix}:{}", key.to_hex());
    let mut old = vec![1u8, 1];
    old.extend_from_slice(fingerprint(1).as_bytes());
    old.extend_from_slice(&7u64.to_be_bytes());
    old.extend_from_slice(&0u64.to_be_bytes()); // a lease deadline long past
    let _: () = redis::cmd("SET")
        .arg(&name)
        .arg(old)
        .arg("PX")
        .arg(10_000)
        .query_async(&mut raw)
        .await
        .expect("SET");
    let Begin::Acquired {
        token,
        attempt,
        recovery_point,
    } = store.begin(&key, &fingerprint(1), LONG).await.unwrap()
    else {
        panic!("the lapsed lease must be taken over");
    };
    assert!(token.0 > 7);
    assert_eq!((attempt, recovery_point), (2, None));
    let point = tower_idempotency::Checkpoint::new("step", Bytes::from_static(b"1")).unwrap();
    store
        .checkpoint(&key, token, &point)
        .await
        .expect("checkpoint");
    assert_eq!(&value(&mut raw, &name).await[50..54], &2u32.to_be_bytes());
}

/// One string key per record, `{prefix}:{hex}`, with the documented header, a PX TTL in flight
/// (twice the lease) and when completed (the ttl), and a completion message carrying the hex key.
#[tokio::test]
async fn records_are_one_string_key_with_a_ttl_in_flight_and_completed() {
    let url = redis_url();
    let prefix = unique_prefix("layout");
    let store = store_at(&url, &prefix).await;
    let mut raw = raw_connection(&url).await;
    let key = key("layout");
    let name = format!("{prefix}:{}", key.to_hex());

    let before = server_time_us(&mut raw).await;
    let token = acquire(&store, &key, 1, Duration::from_secs(10)).await;
    let after = server_time_us(&mut raw).await;

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut raw)
        .await
        .expect("KEYS");
    assert_eq!(keys, vec![name.clone()], "one key per record");
    let kind: String = redis::cmd("TYPE")
        .arg(&name)
        .query_async(&mut raw)
        .await
        .expect("TYPE");
    assert_eq!(kind, "string");
    let ttl = pttl(&mut raw, &name).await;
    assert!(
        (10_000..=20_000).contains(&ttl),
        "an in-flight key lives twice the lease, got PTTL {ttl}"
    );

    let in_flight = value(&mut raw, &name).await;
    assert_eq!(
        in_flight.len(),
        54,
        "an in-flight record is its header and its attempt"
    );
    assert_eq!(&in_flight[50..], &1u32.to_be_bytes(), "the first attempt");
    assert_eq!(
        &in_flight[..2],
        &[1, 1],
        "layout version 1, state in flight"
    );
    assert_eq!(&in_flight[2..34], fingerprint(1).as_bytes());
    assert_eq!(be_u64(&in_flight[34..42]), token.0);
    assert!(
        (before..=after).contains(&token.0),
        "a fresh key's token is the server time in microseconds: {before} <= {token} <= {after}"
    );
    let deadline = be_u64(&in_flight[42..50]);
    assert!((before + 10_000_000..=after + 10_000_000).contains(&deadline));

    store
        .renew(&key, token, Duration::from_secs(30))
        .await
        .expect("renew");
    let ttl = pttl(&mut raw, &name).await;
    assert!((30_000..=60_000).contains(&ttl), "renewed PTTL {ttl}");
    let renewed = value(&mut raw, &name).await;
    assert!(be_u64(&renewed[42..50]) >= before + 30_000_000);
    assert_eq!(
        &renewed[..42],
        &in_flight[..42],
        "renewal only moves the deadline"
    );

    let mut pubsub = redis::Client::open(url.as_str())
        .expect("URL")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub
        .subscribe(format!("{prefix}:completed"))
        .await
        .expect("SUBSCRIBE");

    let stored = response(b"{\"id\":7}");
    // Watched, the record is marked (state 3) and its completion is published.
    assert!(store.watch(&key).await.expect("watch"));
    assert_eq!(
        value(&mut raw, &name).await[1],
        3,
        "state in flight and watched"
    );
    store
        .complete(&key, token, &stored, Duration::from_secs(60))
        .await
        .expect("complete");
    let ttl = pttl(&mut raw, &name).await;
    assert!(
        (55_000..=60_000).contains(&ttl),
        "a completed key lives for the ttl, got PTTL {ttl}"
    );
    let completed = value(&mut raw, &name).await;
    assert_eq!(
        &completed[..2],
        &[1, 2],
        "layout version 1, state completed"
    );
    assert_eq!(
        &completed[2..42],
        &in_flight[2..42],
        "fingerprint and token kept"
    );
    assert_eq!(be_u64(&completed[42..50]), 0);
    assert_eq!(
        StoredResponse::decode(Bytes::copy_from_slice(&completed[50..])).expect("decode"),
        stored
    );
    let message = tokio::time::timeout(NOTIFY_WITHIN, pubsub.on_message().next())
        .await
        .expect("complete publishes")
        .expect("a message");
    assert_eq!(message.get_payload_bytes(), key.to_hex().as_bytes());

    let released = self::key("layout-released");
    let token = acquire(&store, &released, 1, LONG).await;
    assert!(store.watch(&released).await.expect("watch"));
    store.release(&released, token).await.expect("release");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:{}", released.to_hex()))
        .query_async(&mut raw)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "release deletes the key");
    let message = tokio::time::timeout(NOTIFY_WITHIN, pubsub.on_message().next())
        .await
        .expect("release publishes")
        .expect("a message");
    assert_eq!(message.get_payload_bytes(), released.to_hex().as_bytes());
}

/// `SCRIPT FLUSH` (as after a restart or failover) costs a reload, not an error.
///
/// Flushing is server-wide: on the shared server a flush could land between another test's reload
/// and its retried `EVALSHA`, so this runs on a private server.
#[tokio::test]
async fn scripts_are_reloaded_after_script_flush() {
    let server = RedisServer::start();
    let url = server.url();
    let store = store_at(&url, &unique_prefix("flush")).await;
    let mut raw = raw_connection(&url).await;
    let mut flush = async || {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw)
            .await
            .expect("SCRIPT FLUSH");
    };
    let (completed, released) = (key("flush-complete"), key("flush-release"));

    flush().await;
    let token = acquire(&store, &completed, 1, LONG).await;
    flush().await;
    store.renew(&completed, token, LONG).await.expect("renew");
    flush().await;
    store
        .complete(&completed, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    flush().await;
    assert_eq!(
        store
            .begin(&completed, &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response(b"x"))
    );
    let token = acquire(&store, &released, 1, LONG).await;
    flush().await;
    store.release(&released, token).await.expect("release");
}

/// A completion in one process wakes the waiters of another (here: a second connect).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completions_in_another_instance_wake_subscribers() {
    let url = redis_url();
    let prefix = unique_prefix("cross");
    let waiter = store_at(&url, &prefix).await;
    let worker = store_at(&url, &prefix).await;

    let completed = key("cross-complete");
    let token = acquire(&worker, &completed, 1, LONG).await;
    let subscription = waiter.subscribe(&completed);
    let woken = subscription.notified();
    assert_eq!(
        waiter
            .begin(&completed, &fingerprint(1), LONG)
            .await
            .unwrap(),
        Begin::InFlight
    );
    assert!(waiter.watch(&completed).await.expect("watch"));
    worker
        .complete(&completed, token, &response(b"done"), LONG)
        .await
        .expect("complete");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a completion in another instance must wake the waiter");
    assert_eq!(
        waiter
            .begin(&completed, &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response(b"done"))
    );

    let released = key("cross-release");
    let token = acquire(&worker, &released, 1, LONG).await;
    let subscription = waiter.subscribe(&released);
    let woken = subscription.notified();
    assert!(waiter.watch(&released).await.expect("watch"));
    worker.release(&released, token).await.expect("release");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a release in another instance must wake the waiter");
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
    let token = acquire(&store, &quiet, 1, LONG).await;
    store
        .complete(&quiet, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    let watched = key("watched");
    let token = acquire(&store, &watched, 1, LONG).await;
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
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
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
    let token = acquire(&worker, &completed, 1, LONG).await;
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

/// A server that stops answering makes store calls fail with `StoreError::Timeout` after the
/// configured response timeout, and the store works again once the server does. (`CLIENT PAUSE`
/// stalls every client, so this too runs on a private server.)
#[tokio::test]
async fn a_stalled_server_is_a_timeout_and_the_store_recovers() {
    let server = RedisServer::start();
    let url = server.url();
    let timeout = Duration::from_millis(200);
    let store = RedisStore::builder(&url)
        .prefix(unique_prefix("stall"))
        .response_timeout(timeout)
        .connect()
        .await
        .expect("connect to the private server");
    let mut raw = raw_connection(&url).await;

    let () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(1000)
        .arg("ALL")
        .query_async(&mut raw)
        .await
        .expect("CLIENT PAUSE");
    let stalled = store.begin(&key("stalled"), &fingerprint(1), LONG).await;
    assert!(
        matches!(stalled, Err(StoreError::Timeout(after)) if after == timeout),
        "{stalled:?}"
    );

    eventually(Duration::from_secs(5), "the store answers again", || {
        let store = store.clone();
        async move { store.ping().await.is_ok() }
    })
    .await;
    acquire(&store, &key("after-the-stall"), 1, LONG).await;
}

/// A takeover's token is `max(old + 1, server time)`: larger than the expired lease's token even
/// when that token is ahead of the server clock (a clock that stepped back).
#[tokio::test]
async fn a_takeover_token_outgrows_a_token_from_the_future() {
    let url = redis_url();
    let prefix = unique_prefix("clock");
    let store = store_at(&url, &prefix).await;
    let mut raw = raw_connection(&url).await;
    let key = key("clock-stepped-back");
    let name = format!("{prefix}:{}", key.to_hex());

    let now = server_time_us(&mut raw).await;
    let future_token = now + 3_600_000_000;
    let mut expired_lease = vec![1, 1];
    expired_lease.extend_from_slice(fingerprint(1).as_bytes());
    expired_lease.extend_from_slice(&future_token.to_be_bytes());
    expired_lease.extend_from_slice(&(now - 1).to_be_bytes());
    let () = redis::cmd("SET")
        .arg(&name)
        .arg(expired_lease)
        .arg("PX")
        .arg(10_000)
        .query_async(&mut raw)
        .await
        .expect("SET");

    let token = acquire(&store, &key, 2, LONG).await;
    assert_eq!(token, LeaseToken(future_token + 1));
    assert!(is_lease_lost(
        &store
            .complete(&key, LeaseToken(future_token), &response(b"stale"), LONG)
            .await
    ));
    assert_eq!(
        store.begin(&key, &fingerprint(2), LONG).await.unwrap(),
        Begin::InFlight
    );
}

/// Values the store did not write are reported, never replayed, never overwritten by a lease
/// operation, and never a panic.
#[tokio::test]
async fn foreign_or_corrupt_values_are_errors_and_left_alone() {
    let url = redis_url();
    let prefix = unique_prefix("corrupt");
    let store = store_at(&url, &prefix).await;
    let mut raw = raw_connection(&url).await;
    let key = key("corrupt");
    let name = format!("{prefix}:{}", key.to_hex());
    let mut set = async |value: Vec<u8>| {
        let () = redis::cmd("SET")
            .arg(&name)
            .arg(value)
            .arg("PX")
            .arg(60_000)
            .query_async(&mut raw)
            .await
            .expect("SET");
    };
    let tag_one = fingerprint(1);
    let begin = || store.begin(&key, &tag_one, LONG);

    set(b"not a record".to_vec()).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Truncated))
    ));
    assert!(is_lease_lost(&store.release(&key, LeaseToken(1)).await));

    let mut header = vec![9, 1];
    header.resize(50, 0);
    set(header).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::UnknownVersion(9)))
    ));

    let mut unknown_state = vec![1, 7];
    unknown_state.resize(50, 0);
    set(unknown_state).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Invalid(_)))
    ));

    let mut truncated_response = vec![1, 2];
    truncated_response.extend_from_slice(fingerprint(1).as_bytes());
    truncated_response.resize(50, 0);
    truncated_response.extend_from_slice(&[1, 0]);
    set(truncated_response.clone()).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Truncated))
    ));
    assert_eq!(
        store.begin(&key, &fingerprint(2), LONG).await.unwrap(),
        Begin::Mismatch,
        "another fingerprint is a mismatch without reading the response"
    );
    assert!(is_lease_lost(
        &store
            .complete(&key, LeaseToken(0), &response(b"x"), LONG)
            .await
    ));
    assert_eq!(
        value(&mut raw, &name).await,
        truncated_response,
        "left alone"
    );

    let other = self::key("wrong-type");
    let () = redis::cmd("HSET")
        .arg(format!("{prefix}:{}", other.to_hex()))
        .arg("field")
        .arg("value")
        .query_async(&mut raw)
        .await
        .expect("HSET");
    assert!(matches!(
        store.begin(&other, &fingerprint(1), LONG).await,
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test]
async fn invalid_configuration_is_refused_before_connecting() {
    let url = redis_url();
    for prefix in ["", "has space", "{tag}", "half{"] {
        let refused = RedisStore::builder(&url).prefix(prefix).connect().await;
        let error = refused.expect_err("an invalid prefix must be refused");
        assert!(
            matches!(error, StoreError::Backend(_)) && error.to_string().contains("prefix"),
            "{prefix:?}: {error}"
        );
    }
    assert!(RedisStore::connect_cluster(&[]).await.is_err());
    assert!(RedisStore::connect("not a url").await.is_err());
}

#[tokio::test]
async fn from_client_serves_from_the_applications_own_client() {
    let url = redis_url();
    let client = redis::Client::open(url.as_str()).expect("the application's client");
    let prefix = unique_prefix("from-client");
    let store = RedisStore::from_client(client.clone())
        .prefix(&prefix)
        .connect()
        .await
        .unwrap_or_else(|error| redis_support::unreachable(&url, &error));
    let key = RecordKey::new(&Scope::from_bytes(b"from-client"), b"k");
    let found = store
        .begin(&key, &Fingerprint::from_bytes([1; 32]), LONG)
        .await;
    assert!(matches!(found, Ok(Begin::Acquired { .. })), "{found:?}");
    // The record is on the application's server, under the store's prefix.
    let mut raw = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut raw)
        .await
        .expect("KEYS");
    assert_eq!(keys.len(), 1, "{keys:?}");
}

/// `rediss://` URLs are the `redis-tls` feature's: with it the store tries to connect (and here
/// finds nobody listening), without it the URL itself is refused.
#[tokio::test]
async fn rediss_urls_need_the_redis_tls_feature() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let error = RedisStore::connect(&format!("rediss://127.0.0.1:{port}"))
        .await
        .expect_err("nothing listens there");
    let refused_url = error.to_string().contains("invalid Redis URL");
    assert_eq!(refused_url, !cfg!(feature = "redis-tls"), "{error}");
}

#[tokio::test]
async fn an_unreachable_server_is_an_error_not_a_hang() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
        .port();
    let started = std::time::Instant::now();
    let result = RedisStore::connect(&format!("redis://127.0.0.1:{port}")).await;
    assert!(matches!(result, Err(StoreError::Backend(_))), "{result:?}");
    assert!(started.elapsed() < Duration::from_secs(10));
}

#[tokio::test]
async fn ping_reaches_the_server_and_clones_share_the_store() {
    let url = redis_url();
    let prefix = unique_prefix("ping");
    let store = store_at(&url, &prefix).await;
    store.ping().await.expect("ping");
    let debug = format!("{store:?}");
    assert!(
        debug.contains("RedisStore") && debug.contains("standalone") && debug.contains(&prefix),
        "{debug}"
    );

    let clone = store.clone();
    let key = key("clone");
    let token = acquire(&store, &key, 1, LONG).await;
    assert_eq!(
        clone.begin(&key, &fingerprint(1), LONG).await.unwrap(),
        Begin::InFlight
    );
    clone
        .complete(&key, token, &response(b"shared"), LONG)
        .await
        .expect("a clone completes the original's lease");
    drop(clone);
    store.ping().await.expect("the store outlives its clones");
}

/// Forgets go through the completion channel: a forget in one instance reaches another's forget
/// feed, and a forced forget wakes the other's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_in_one_instance_reaches_anothers_feed() {
    use tower_idempotency::store::{ForgetEvent, Forgotten};
    let url = redis_url();
    let prefix = unique_prefix("forget-cross");
    let a = store_at(&url, &prefix).await;
    let b = store_at(&url, &prefix).await;
    let mut feed = b.forget_feed().expect("the Redis store has a forget feed");

    let completed = key("forget-across");
    let token = acquire(&a, &completed, 1, LONG).await;
    a.complete(&completed, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    assert_eq!(
        a.forget(&completed, false).await.unwrap(),
        Forgotten::Completed
    );
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(
        heard.expect("in time").ok(),
        Some(ForgetEvent::Key(completed))
    );

    let stuck = key("forget-stuck-across");
    acquire(&a, &stuck, 1, LONG).await;
    let subscription = b.subscribe(&stuck);
    let woken = subscription.notified();
    assert!(matches!(
        a.forget(&stuck, true).await.unwrap(),
        Forgotten::LeaseEnded { .. }
    ));
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a forced forget wakes waiters in other instances, watched or not");
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Key(stuck)));
}

/// A subscriber that lost its connection may have missed forgets: its feed says so. (On a
/// private server: killing pub/sub clients would disturb other tests.)
#[tokio::test]
async fn a_resubscribe_tells_the_feed_forgets_may_be_missed() {
    use tower_idempotency::store::ForgetEvent;
    let server = RedisServer::start();
    let url = server.url();
    let store = store_at(&url, &unique_prefix("forget-reconnect")).await;
    let mut feed = store.forget_feed().expect("a forget feed");
    let mut raw = raw_connection(&url).await;
    let killed: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut raw)
        .await
        .expect("CLIENT KILL");
    assert_eq!(killed, 1);
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Unknown));
}
