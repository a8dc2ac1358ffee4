//! Connecting and staying connected: scripts reloaded after `SCRIPT FLUSH`, a stalled server,
//! configuration refused up front, the application's own client, TLS URLs, an unreachable
//! server, and clones sharing one store.

use std::time::Duration;

use test_fixtures::records::{acquire, fingerprint, key, replayed, response};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, RedisStore, StoreError};

use super::redis_support::{
    self, RedisServer, eventually, raw_connection, redis_url, store_at, unique_prefix,
};

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
    let token = acquire(&store, &completed, LONG).await;
    flush().await;
    store.renew(&completed, token, LONG).await.expect("renew");
    flush().await;
    store
        .complete(&completed, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    flush().await;
    assert_eq!(replayed(&store, &completed).await, Some(response(b"x")));
    let token = acquire(&store, &released, LONG).await;
    flush().await;
    store.release(&released, token).await.expect("release");
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
    acquire(&store, &key("after-the-stall"), LONG).await;
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
    let found = store.begin(&key("k"), &fingerprint(1), LONG).await;
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
    let token = acquire(&store, &key, LONG).await;
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
