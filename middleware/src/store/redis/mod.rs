//! The Redis and Redis Cluster store: [`RedisStore`], whose documentation describes the key
//! layout, the Lua scripts, the time source, notifications and cluster behaviour.
//!
//! This module holds the store and its [`IdempotencyStore`] implementation; the submodules hold
//! the builder and connecting (`builder`), the command connection and the scripts it runs
//! (`connection`), the value layout and the decoding of script replies (`codec`), the subscriber
//! (`listener`), and inspect and forget (`records`).

mod builder;
mod codec;
mod connection;
mod listener;
mod records;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use redis::{RedisError, Value};
use tokio::task::JoinHandle;

use self::codec::{encode_recovery_point, in_flight_key_ttl, lease_outcome, millis, parse_begin};
use self::connection::{BEGIN, CHECKPOINT, COMPLETE, Connection, RELEASE, RENEW, WATCH};
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::RecordKey;
use crate::store::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, StoreError, Subscription,
};

pub use builder::{RedisStoreBuilder, is_valid_key_prefix};

/// A store in Redis or Redis Cluster, shared by every process that connects to it with the same
/// key prefix.
///
/// The store for a fleet that already runs Redis and can live with Redis' durability (records
/// written just before a failover may be lost with it; see *Failover* below). Connect with
/// [`RedisStore::connect`] / [`RedisStore::connect_cluster`], or through [`RedisStore::builder`],
/// [`RedisStore::cluster_builder`] or [`RedisStore::from_client`] to choose the key prefix and
/// timeouts. Cloning is cheap: clones share the connection and the
/// subscriber.
///
/// ```no_run
/// use axum::{Router, routing::post};
/// use tower_idempotency::{IdempotencyLayer, RedisStore};
///
/// async fn charge() -> &'static str { "charged once" }
///
/// #[tokio::main]
/// async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
///     // `RedisStore::connect(url)` uses the default key prefix, `idempotency`.
///     let store = RedisStore::builder("redis://127.0.0.1:6379")
///         .prefix("payments")
///         .connect()
///         .await?;
///     let app = Router::new()
///         .route("/payments", post(charge))
///         .layer(IdempotencyLayer::new(store));
///     let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
///     axum::serve(listener, app).await?;
///     Ok(())
/// }
/// ```
///
/// # Key layout
///
/// One Redis key per record, `{prefix}:{hex(record key)}`, for example
/// `idempotency:9f86d08188...` (64 hex digits). Every command and script touches exactly that one
/// key, so the store runs unchanged on Redis Cluster without hash tags: records spread over every
/// shard. (That is also why the prefix may not contain `{` or `}`: it would become a hash tag
/// and pin every record to one slot.)
///
/// The value is one binary string:
///
/// ```text
/// offset size
///  0      1   layout version = 1
///  1      1   state: 1 = in flight, 3 = in flight and watched, 2 = completed
///  2     32   request fingerprint
/// 34      8   lease token, u64 big-endian
/// 42      8   lease deadline, microseconds since the Unix epoch by the Redis server clock,
///             u64 big-endian (0 once completed)
/// 50      ..  in flight: the attempt, u32 big-endian, then the recovery point if any (name
///             length u8, name, data); completed: the response, as StoredResponse::encode()
///             writes it. (An in-flight value that ends at the header was written before
///             attempts were counted: its run was the first.)
/// ```
///
/// A string rather than a hash: a hash field holding a response (usually more than 64 bytes)
/// moves the hash out of its compact listpack encoding into a full hash table, costing a few
/// hundred bytes of overhead per record, times every record kept for the whole `ttl`. A string
/// is one allocation. The header has a fixed size, so the scripts read it with one `GETRANGE`
/// without copying the response; the response is written once, on completion; renewal patches
/// the 8-byte deadline in place with `SETRANGE`.
///
/// Every key has a TTL (`PX`): a completed record's is the `ttl` given to `complete`, so Redis
/// itself expires it (and never returns an expired key: expiry is enforced on read). An in-flight
/// record's key lives for **twice** the lease: the lease deadline inside the value decides when it
/// may be taken over, and the extra time keeps the old token visible to that takeover (see
/// *Time and tokens*) and lets a holder whose lease lapsed without a takeover still complete or
/// release, as the store contract allows. Nothing outlives its TTL, so expired records never
/// accumulate.
///
/// # Scripts
///
/// Six Lua scripts, each loaded when the store connects and then called with `EVALSHA` (if
/// Redis lost them, after a restart, a failover or `SCRIPT FLUSH`, the call reloads them and
/// retries: `redis::Script` does this). A script runs atomically, so:
///
/// * `begin` reads the header and, in the same step, answers *in flight*, *mismatch* or
///   *completed* (with the stored value), or writes a new in-flight record: a free key, an expired
///   lease (taken over whatever the fingerprint), or an expired record. One round trip always.
/// * `complete`, `renew` and `release` first check that the record is in flight and holds the
///   caller's token (compared as its 8 bytes), else answer 0, which becomes
///   [`StoreError::LeaseLost`], having changed nothing. `complete` writes the response with
///   `PX = ttl`; `renew` moves the deadline and the key TTL; `release` deletes the key.
///   `complete` and `release` `PUBLISH` the completion in the same script when the record is
///   watched.
/// * `watch` marks an in-flight record as waited for (state 3) and says whether it is in flight.
/// * `checkpoint` checks the token like `renew`, then rewrites the in-flight value with the new
///   recovery point (`SET ... KEEPTTL`: the lease and the key TTL stay). `begin` taking over the
///   same request's lapsed lease counts one more attempt and carries the recovery point over.
///
/// # Time and tokens
///
/// Every time decision uses the Redis server's clock (`TIME` inside the script), never the
/// client's, so instances with skewed clocks agree on when a lease expires.
///
/// A new lease's token is `max(old token + 1, server time in microseconds)`, where the old token
/// is the one in the record being taken over. Tokens of one key therefore grow even after a record
/// was deleted (the clock has moved on since its token was issued) and even if the clock stepped
/// back while the old record was still there. The one case this cannot cover is a server clock
/// stepping back by more than the time since the previous token was issued *after* that record
/// was deleted (released, or expired at twice its lease): fencing compares tokens for equality,
/// so a stale holder would then still need to have been issued that exact microsecond.
/// Tokens stay below 2^53 (exact in Lua's doubles) until the year 2255.
///
/// # Waking waiters
///
/// A request that waits for an in-flight key (`on_conflict = "wait"`) calls `watch`, which marks
/// the record; `complete` and `release` publish the record key (hex) on the channel
/// `{prefix}:completed` only for marked records, so the common case, a request nobody waits for,
/// costs no message and no work in any subscriber. A takeover keeps the mark.
/// Each store (and its clones) keeps one subscriber connection on that channel and fans messages
/// out to local waiters through a [`CompletionNotifier`], so a process holds one connection
/// whatever the number of waiters. The subscriber pings the server every few seconds; if its
/// connection drops it reconnects with backoff and then wakes every local waiter once, because
/// completions may have been published while it was away. The layer also polls, so a lost
/// notification costs latency, never correctness. Waiters in the completing process are woken
/// directly as well, without waiting for the message to come back.
///
/// # Redis Cluster
///
/// [`RedisStore::cluster_builder`] uses redis-rs' cluster client: scripts are routed by
/// their one key to the shard that owns it, follow `MOVED`/`ASK` during resharding, and are loaded
/// on every node. Classic (non-sharded) `PUBLISH` is forwarded by the cluster bus to every node, a
/// publish from a script included, so the subscriber connects to a single node (the first URL
/// that answers, moving on to the next one if that node goes away).
///
/// # Permissions
///
/// With Redis ACLs, the store's user needs the commands `EVALSHA`, `SCRIPT LOAD`, `SUBSCRIBE`
/// and `PING`; inside the scripts `TIME`, `GET`, `GETRANGE`, `SET`, `SETRANGE`, `PEXPIRE`, `DEL`
/// and `PUBLISH`; the keys `{prefix}:*` and the channel `{prefix}:completed`. For example:
/// `ACL SETUSER idem on >secret ~idempotency:* &idempotency:completed +evalsha +script|load
/// +subscribe +ping +time +get +getrange +set +setrange +pexpire +del +publish`.
///
/// # Failover
///
/// Redis replicates asynchronously: a record acquired or completed on a primary that fails before
/// replicating is lost, and the request may run again after the failover. Use a SQL store when
/// that is not acceptable. A reply lost in transit (timeout, dropped connection) leaves the
/// outcome unknown: a `begin` that in fact acquired leaves a lease that expires after `lock_ttl`,
/// and a `complete` that in fact stored its response answers a retry with `LeaseLost`.
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    connection: Connection,
    /// `{prefix}:`, to which the record key's hex is appended.
    key_prefix: String,
    channel: String,
    notifier: CompletionNotifier,
    forgets: ForgetSender,
    response_timeout: Duration,
    /// The subscriber task; it owns nothing of `Inner`, so it is stopped explicitly.
    listener: JoinHandle<()>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

impl RedisStore {
    /// The Redis key holding the record of `key`: `{prefix}:{hex}`.
    /// `{prefix}:{hex}`, written straight into one buffer: this runs on every call.
    fn redis_key(&self, key: &RecordKey) -> Vec<u8> {
        let prefix = self.inner.key_prefix.as_bytes();
        let mut name = vec![0; prefix.len() + 64];
        name[..prefix.len()].copy_from_slice(prefix);
        // 32 bytes always fit 64 hex digits.
        let _ = hex::encode_to_slice(key.as_bytes(), &mut name[prefix.len()..]);
        name
    }

    /// The hex record key inside a name from [`Self::redis_key`]: the completion message.
    fn message<'a>(&self, name: &'a [u8]) -> &'a [u8] {
        &name[self.inner.key_prefix.len()..]
    }

    fn redis_error(&self, what: &'static str, error: RedisError) -> StoreError {
        if error.is_timeout() {
            StoreError::Timeout(self.inner.response_timeout)
        } else {
            context(what, error)
        }
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("mode", &self.inner.connection.kind())
            .field("key_prefix", &self.inner.key_prefix)
            .field("response_timeout", &self.inner.response_timeout)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl IdempotencyStore for RedisStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        let lease = millis(lock_ttl);
        let mut invocation = BEGIN.key(self.redis_key(key));
        invocation
            .arg(&fingerprint.as_bytes()[..])
            .arg(lease)
            .arg(in_flight_key_ttl(lease));
        let reply = self.invoke("begin", &invocation).await?;
        parse_begin(reply, fingerprint)
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let encoded = response.encode();
        let name = self.redis_key(key);
        let mut invocation = COMPLETE.key(&name[..]);
        invocation
            .arg(&token.0.to_be_bytes()[..])
            .arg(millis(ttl))
            .arg(&encoded[..])
            .arg(&self.inner.channel)
            .arg(self.message(&name));
        let reply = self.invoke("complete", &invocation).await?;
        lease_outcome("complete", reply)?;
        // Local waiters need not wait for the message to come back through the server.
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let name = self.redis_key(key);
        let mut invocation = RELEASE.key(&name[..]);
        invocation
            .arg(&token.0.to_be_bytes()[..])
            .arg(&self.inner.channel)
            .arg(self.message(&name));
        let reply = self.invoke("release", &invocation).await?;
        lease_outcome("release", reply)?;
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let mut invocation = CHECKPOINT.key(self.redis_key(key));
        invocation
            .arg(&token.0.to_be_bytes()[..])
            .arg(encode_recovery_point(checkpoint));
        let reply = self.invoke("checkpoint", &invocation).await?;
        lease_outcome("checkpoint", reply)
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let lease = millis(lock_ttl);
        let mut invocation = RENEW.key(self.redis_key(key));
        invocation
            .arg(&token.0.to_be_bytes()[..])
            .arg(lease)
            .arg(in_flight_key_ttl(lease));
        let reply = self.invoke("renew", &invocation).await?;
        lease_outcome("renew", reply)
    }

    async fn inspect(&self, key: &RecordKey) -> Result<Option<RecordInfo>, StoreError> {
        self.inspect_record(key).await
    }

    async fn forget(&self, key: &RecordKey, force: bool) -> Result<Forgotten, StoreError> {
        self.forget_record(key, force).await
    }

    fn forget_feed(&self) -> Option<ForgetFeed> {
        Some(self.inner.forgets.feed())
    }

    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.inner.notifier.subscribe(key)
    }

    async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
        let invocation = WATCH.key(self.redis_key(key));
        match self.invoke("watch", &invocation).await? {
            Value::Int(1) => Ok(true),
            Value::Int(0) => Ok(false),
            other => Err(unexpected("watch", &other)),
        }
    }

    async fn ping(&self) -> Result<(), StoreError> {
        // On a cluster, PING goes to every primary: the store is ready when every shard is.
        self.inner
            .connection
            .query(&redis::cmd("PING"))
            .await
            .map(drop)
            .map_err(|error| self.redis_error("ping", error))
    }
}

fn context(what: &'static str, error: RedisError) -> StoreError {
    StoreError::backend(RedisStoreError { what, error })
}

fn unexpected(script: &'static str, reply: &Value) -> StoreError {
    StoreError::backend(ConfigError::UnexpectedReply {
        script,
        // Bounded: a stray reply may carry a whole response body.
        reply: format!("{reply:?}").chars().take(200).collect(),
    })
}

/// A Redis error and the operation it interrupted.
#[derive(Debug, thiserror::Error)]
#[error("{what}: {error}")]
struct RedisStoreError {
    what: &'static str,
    #[source]
    error: RedisError,
}

#[derive(Debug, thiserror::Error)]
enum ConfigError {
    #[error(
        "invalid Redis key prefix {0:?}: it must be non-empty, without whitespace, `{{` or `}}`"
    )]
    InvalidPrefix(String),
    #[error("a Redis Cluster store needs at least one node URL")]
    NoClusterNodes,
    #[error("unexpected reply from the {script} script: {reply}")]
    UnexpectedReply { script: &'static str, reply: String },
}
