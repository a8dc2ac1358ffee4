//! `RedisStore` against a real Redis server at `REDIS_URL` (default `redis://127.0.0.1:6379`):
//! the store contract suite, then what is specific to Redis (key layout, TTLs, scripts, pub/sub).
//!
//! Every test uses its own key prefix, so they run in parallel on one server. The tests that act
//! server-wide (`SCRIPT FLUSH`, `CLIENT KILL`, `CLIENT PAUSE`) start a private `redis-server`
//! instead, so they never disturb the others.

#[path = "../redis_support/mod.rs"]
mod redis_support;

mod connection;
mod layout;
mod notifications;

use redis::aio::MultiplexedConnection;
use test_fixtures::records::key;
use tower_idempotency::{RecordKey, RedisStore};

use redis_support::{raw_connection, redis_url, store_at, unique_prefix};

mod conformance {
    tower_idempotency::store_conformance_tests!(|| async {
        let url = super::redis_support::redis_url();
        super::redis_support::store_at(&url, &super::redis_support::unique_prefix("conformance"))
            .await
    });
}

/// One record on the shared server: a store under a prefix of its own, the record's key and its
/// Redis key, and a plain connection to read and write that key behind the store's back.
struct RawRecord {
    url: String,
    prefix: String,
    store: RedisStore,
    raw: MultiplexedConnection,
    key: RecordKey,
    name: String,
}

impl RawRecord {
    async fn new(tag: &str) -> Self {
        let url = redis_url();
        let prefix = unique_prefix(tag);
        let store = store_at(&url, &prefix).await;
        let raw = raw_connection(&url).await;
        let key = key(tag);
        let name = format!("{prefix}:{}", key.to_hex());
        Self {
            url,
            prefix,
            store,
            raw,
            key,
            name,
        }
    }
}

/// Writes `value` under `name` behind the store's back, expiring in `px` milliseconds.
async fn set_px(connection: &mut MultiplexedConnection, name: &str, value: Vec<u8>, px: u64) {
    let () = redis::cmd("SET")
        .arg(name)
        .arg(value)
        .arg("PX")
        .arg(px)
        .query_async(connection)
        .await
        .expect("SET");
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
