//! Shared by the Redis test binaries: the server under test, unique key prefixes, and private
//! `redis-server` processes (a standalone server for tests that disturb every connection, and a
//! three-master cluster).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use tower_idempotency::{RedisStore, StoreError};

#[allow(unused_imports, reason = "each test binary uses a different part")]
pub(crate) use test_fixtures::{RedisCluster, RedisServer, eventually, redis_url};

const START_REDIS: &str =
    "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no";

/// A key prefix no other test (or earlier run) uses, so tests share one server in parallel.
pub(crate) fn unique_prefix(tag: &str) -> String {
    format!("idem-test:{}", test_fixtures::unique(tag))
}

/// Connects a store with a fresh prefix to the server under test, or fails the test saying how
/// to start one: a missing server is a broken test environment, never a reason to skip.
pub(crate) async fn store_at(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder(url)
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|error| unreachable(url, &error))
}

pub(crate) fn unreachable(url: &str, error: &dyn std::fmt::Display) -> ! {
    panic!(
        "cannot use Redis at {url} ({error}). The Redis tests need a running server: start one \
         with `{START_REDIS}`, or point REDIS_URL at one."
    )
}

/// A plain connection for looking at what the store wrote.
pub(crate) async fn raw_connection(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|error| unreachable(url, &error));
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| unreachable(url, &error))
}

/// Shorthand for an expected store error in assertions.
pub(crate) fn is_lease_lost<T>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::LeaseLost))
}
