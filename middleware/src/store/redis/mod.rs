//! The Redis and Redis Cluster store: [`RedisStore`], whose documentation describes the key
//! layout, the Lua scripts, the time source, notifications and cluster behaviour.

mod listener;
mod records;

use std::fmt;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;
use redis::cluster_async::ClusterConnection;
use redis::{Client, RedisError, Script, ScriptInvocation, Value};
use tokio::task::JoinHandle;

use super::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::{DecodeError, StoredResponse};
use crate::scope::RecordKey;

use listener::Listener;

const DEFAULT_PREFIX: &str = "idempotency";
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Below the layer's default store timeout (5 s), so a stuck server surfaces as this store's
/// timeout with its own message.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Reconnect attempts of the standalone connection before pending commands fail, and the
/// longest pause between two of them (see `RedisStoreBuilder::connect`).
const RECONNECT_ATTEMPTS: usize = 3;
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

/// The fixed header in front of every value; see *Key layout* in `RedisStore`'s docs.
const HEADER_LEN: usize = 50;
/// Where the request fingerprint sits in the header.
const FINGERPRINT_RANGE: std::ops::Range<usize> = 2..34;
const LAYOUT_VERSION: u8 = 1;
const STATE_IN_FLIGHT: u8 = 1;
const STATE_COMPLETED: u8 = 2;
/// The scripts compute deadlines in microseconds as Lua doubles; capping every duration at 100
/// years keeps `now + lease` far below 2^53 and inside what `PX` accepts.
const MAX_DURATION_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

static BEGIN: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("begin.lua")));
static COMPLETE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("complete.lua")));
static RENEW: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("renew.lua")));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("release.lua")));
static CHECKPOINT: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("checkpoint.lua")));
static WATCH: LazyLock<Script> = LazyLock::new(|| Script::new(include_str!("watch.lua")));

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

/// Both connections multiplex every request over shared sockets and are cheap to clone.
#[derive(Clone)]
enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    fn kind(&self) -> &'static str {
        match self {
            Self::Standalone(_) => "standalone",
            Self::Cluster(_) => "cluster",
        }
    }

    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, RedisError> {
        match self {
            Self::Standalone(connection) => invocation.invoke_async(&mut connection.clone()).await,
            Self::Cluster(connection) => invocation.invoke_async(&mut connection.clone()).await,
        }
    }

    async fn query(&self, command: &redis::Cmd) -> Result<Value, RedisError> {
        match self {
            Self::Standalone(connection) => command.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
    }

    /// Loads every script up front, so the first calls need no `NOSCRIPT` detour and a server
    /// that refuses scripts is found at start-up rather than on the first request.
    async fn load_scripts(&self) -> Result<(), RedisError> {
        for script in [
            &*BEGIN,
            &*COMPLETE,
            &*RENEW,
            &*RELEASE,
            &*WATCH,
            &*CHECKPOINT,
            &*records::INSPECT,
            &*records::FORGET,
        ] {
            match self {
                Self::Standalone(connection) => {
                    script.load_async(&mut connection.clone()).await?;
                }
                Self::Cluster(connection) => {
                    script.load_async(&mut connection.clone()).await?;
                }
            }
        }
        Ok(())
    }
}

/// Configures and connects a [`RedisStore`]: key prefix and timeouts.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// use std::time::Duration;
/// use tower_idempotency::RedisStore;
///
/// let store = RedisStore::cluster_builder(["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"])
///     .prefix("orders-idem")
///     .response_timeout(Duration::from_secs(1))
///     .connect()
///     .await?;
/// # drop(store); Ok(()) }
/// ```
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.connect().await`"]
pub struct RedisStoreBuilder {
    target: Target,
    prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
}

/// What the store connects to.
#[derive(Clone)]
enum Target {
    Url(String),
    Client(Box<Client>),
    Cluster(Vec<String>),
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // URLs are left out: they may hold a password.
        f.write_str(match self {
            Self::Url(_) | Self::Client(_) => "Standalone",
            Self::Cluster(_) => "Cluster",
        })
    }
}

impl RedisStoreBuilder {
    fn new(target: Target) -> Self {
        Self {
            target,
            prefix: DEFAULT_PREFIX.to_owned(),
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
        }
    }

    /// Sets the key prefix (default `idempotency`): records are stored at `{prefix}:{hex}` and
    /// completions published on `{prefix}:completed`. Stores with different prefixes on one
    /// server never see each other's records.
    ///
    /// The prefix must be non-empty and contain no whitespace, `{` or `}` (braces would make it a
    /// Redis Cluster hash tag and put every record in one slot); `connect` checks it.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long establishing a connection may take (default 2 seconds).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long a command may wait for its reply (default 3 seconds) before it fails with
    /// [`StoreError::Timeout`].
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// Validates the prefix, connects, loads the scripts and subscribes to the completion
    /// channel.
    ///
    /// A standalone server (or a primary behind a proxy): commands go over one multiplexed
    /// connection that reconnects by itself (redis-rs' `ConnectionManager`); completions arrive on
    /// one subscriber connection. A cluster: commands are routed to the shard that owns their
    /// key; completions arrive on one subscriber connection to the first node that answers.
    /// Fails if the prefix or a URL is invalid, no server can be reached, or it refuses to load
    /// the scripts.
    pub async fn connect(self) -> Result<RedisStore, StoreError> {
        match &self.target {
            Target::Url(url) => {
                let client = Client::open(url.as_str())
                    .map_err(|error| context("invalid Redis URL", error))?;
                self.connect_standalone(client).await
            }
            Target::Client(client) => self.connect_standalone((**client).clone()).await,
            Target::Cluster(urls) => self.connect_cluster(urls).await,
        }
    }

    async fn connect_standalone(&self, client: Client) -> Result<RedisStore, StoreError> {
        let prefix = validate_prefix(&self.prefix)?;
        // redis-rs' default reconnect policy (6 attempts, exponential from 100 ms) keeps
        // commands, and `connect` itself, waiting about ten seconds for a server that is down.
        // A store call should rather fail within the layer's store timeout so the route's
        // `on_store_error` policy applies; the next call starts a new reconnect anyway.
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(RECONNECT_ATTEMPTS)
            .set_max_delay(RECONNECT_MAX_DELAY);
        let manager = ConnectionManager::new_with_config(client.clone(), config)
            .await
            .map_err(|error| context("cannot connect to Redis", error))?;
        self.start(prefix, Connection::Standalone(manager), vec![client])
            .await
    }

    async fn connect_cluster(&self, urls: &[String]) -> Result<RedisStore, StoreError> {
        let prefix = validate_prefix(&self.prefix)?;
        if urls.is_empty() {
            return Err(StoreError::backend(ConfigError::NoClusterNodes));
        }
        let clients = urls
            .iter()
            .map(|url| Client::open(url.as_str()))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|error| context("invalid Redis URL", error))?;
        let cluster = ClusterClient::builder(urls.iter().map(String::as_str))
            .connection_timeout(self.connection_timeout)
            .response_timeout(self.response_timeout)
            .build()
            .map_err(|error| context("invalid Redis Cluster configuration", error))?;
        let connection = cluster
            .get_async_connection()
            .await
            .map_err(|error| context("cannot connect to Redis Cluster", error))?;
        self.start(prefix, Connection::Cluster(connection), clients)
            .await
    }

    async fn start(
        &self,
        prefix: &str,
        connection: Connection,
        subscriber_nodes: Vec<Client>,
    ) -> Result<RedisStore, StoreError> {
        connection
            .load_scripts()
            .await
            .map_err(|error| context("cannot load the store's Lua scripts", error))?;
        let notifier = CompletionNotifier::new();
        let forgets = ForgetSender::default();
        let channel = format!("{prefix}:completed");
        // Subscribed before the store is handed out: a completion published by another process
        // right after `connect` returns already reaches this one.
        let listener = Listener::new(
            subscriber_nodes,
            channel.clone(),
            notifier.clone(),
            forgets.clone(),
            self.connection_timeout.max(self.response_timeout),
        )
        .start()
        .await
        .map_err(|error| context("cannot subscribe to the completion channel", error))?;
        Ok(RedisStore {
            inner: Arc::new(Inner {
                connection,
                key_prefix: format!("{prefix}:"),
                channel,
                notifier,
                forgets,
                response_timeout: self.response_timeout,
                listener,
            }),
        })
    }
}

impl RedisStore {
    /// A builder for a store on a standalone Redis server (or a primary behind a proxy), for
    /// example `redis://:password@127.0.0.1:6379/0`, or `rediss://...` with the `redis-tls`
    /// feature. An invalid URL is reported by [`connect`](RedisStoreBuilder::connect).
    pub fn builder(url: impl AsRef<str>) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Url(url.as_ref().to_owned()))
    }

    /// A builder for a store on a Redis Cluster, reached through any of its nodes (`urls`, at
    /// least one), for example `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`.
    pub fn cluster_builder<U: AsRef<str>>(urls: impl IntoIterator<Item = U>) -> RedisStoreBuilder {
        let urls = urls
            .into_iter()
            .map(|url| url.as_ref().to_owned())
            .collect();
        RedisStoreBuilder::new(Target::Cluster(urls))
    }

    /// A builder for a store on the server of the application's own `redis::Client`. The store
    /// opens its own multiplexed connection and subscriber from it, with its own timeouts and
    /// reconnect policy (a store call must fail within the layer's store timeout), so it never
    /// holds up the application's connections.
    pub fn from_client(client: Client) -> RedisStoreBuilder {
        RedisStoreBuilder::new(Target::Client(Box::new(client)))
    }

    /// Connects to a standalone Redis server with the default prefix (`idempotency`); see
    /// [`RedisStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Connects to a Redis Cluster with the default prefix (`idempotency`); see
    /// [`RedisStoreBuilder::connect`].
    pub async fn connect_cluster(urls: &[String]) -> Result<Self, StoreError> {
        Self::cluster_builder(urls).connect().await
    }

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

    async fn invoke(
        &self,
        script: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        self.inner
            .connection
            .invoke(invocation)
            .await
            .map_err(|error| self.redis_error(script, error))
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

/// A duration in whole milliseconds, rounded up (a lease is never shorter than asked) and kept
/// within 1 ms (`PX 0` is an error) and [`MAX_DURATION_MS`].
fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros().div_ceil(1000))
        .unwrap_or(u64::MAX)
        .clamp(1, MAX_DURATION_MS)
}

/// Twice the lease, so a takeover still sees the expired lease's token (see *Key layout*).
fn in_flight_key_ttl(lease_ms: u64) -> u64 {
    lease_ms.saturating_mul(2)
}

/// Maps `begin`'s reply. A completed record is replayed only if the fingerprint in its header is
/// the request's: the script compared them already, but a reply paired with the wrong command (a
/// connection desynchronised by a bug anywhere between here and Redis) would otherwise hand one
/// key's response to another. Such a reply is a store error, never a replay.
fn parse_begin(reply: Value, fingerprint: &Fingerprint) -> Result<Begin, StoreError> {
    let Value::Array(mut items) = reply else {
        return Err(unexpected("begin", &reply));
    };
    match items.as_mut_slice() {
        [
            Value::Int(1),
            Value::Int(token),
            Value::Int(attempt),
            Value::BulkString(point),
        ] => match (u64::try_from(*token), u32::try_from(*attempt)) {
            (Ok(token), Ok(attempt)) => Ok(Begin::Acquired {
                token: LeaseToken(token),
                attempt,
                recovery_point: decode_recovery_point(point)?,
            }),
            _ => Err(unexpected("begin", &Value::Int(*token))),
        },
        [Value::Int(2)] => Ok(Begin::InFlight),
        [Value::Int(3)] => Ok(Begin::Mismatch),
        [Value::Int(4), Value::BulkString(value), Value::Int(pttl)] => {
            let value = Bytes::from(std::mem::take(value));
            if let Some(error) = header_error(&value, STATE_COMPLETED) {
                return Err(StoreError::Corrupt(error));
            }
            if value[FINGERPRINT_RANGE] != fingerprint.as_bytes()[..] {
                return Err(StoreError::Corrupt(DecodeError::Invalid(
                    "fingerprint: the reply belongs to another request",
                )));
            }
            // The response shares the reply's allocation; only the header is skipped.
            Ok(Begin::Completed {
                response: StoredResponse::decode(value.slice(HEADER_LEN..))?,
                // PTTL is -1 for a key without an expiry, which this store never writes.
                expires_in: Duration::from_millis(u64::try_from(*pttl).unwrap_or(0)),
            })
        }
        // The script found a header it does not understand; say what is wrong with it.
        [Value::Int(0), Value::BulkString(header)] => Err(StoreError::Corrupt(
            header_error(header, STATE_IN_FLIGHT).unwrap_or(DecodeError::Invalid("record header")),
        )),
        _ => Err(unexpected("begin", &Value::Array(items))),
    }
}

/// The recovery point as the scripts store it: empty for none, else name length u8, name, data.
fn encode_recovery_point(checkpoint: &Checkpoint) -> Vec<u8> {
    let name = checkpoint.name().as_bytes();
    let mut encoded = Vec::with_capacity(1 + name.len() + checkpoint.data().len());
    // Names are at most MAX_CHECKPOINT_NAME (64) bytes: the length fits a byte.
    encoded.push(u8::try_from(name.len()).unwrap_or(u8::MAX));
    encoded.extend_from_slice(name);
    encoded.extend_from_slice(checkpoint.data());
    encoded
}

fn decode_recovery_point(stored: &[u8]) -> Result<Option<Checkpoint>, StoreError> {
    let Some((&len, rest)) = stored.split_first() else {
        return Ok(None);
    };
    let len = usize::from(len);
    if rest.len() < len {
        return Err(StoreError::Corrupt(DecodeError::Truncated));
    }
    let name = std::str::from_utf8(&rest[..len])
        .map_err(|_| StoreError::Corrupt(DecodeError::Invalid("checkpoint name")))?;
    Checkpoint::new(name, Bytes::copy_from_slice(&rest[len..]))
        .map(Some)
        .map_err(|_| StoreError::Corrupt(DecodeError::Invalid("checkpoint")))
}

/// What is wrong with a stored value that should have a header in `expected_state`, if anything.
fn header_error(value: &[u8], expected_state: u8) -> Option<DecodeError> {
    let Some(header) = value.get(..HEADER_LEN) else {
        return Some(DecodeError::Truncated);
    };
    if header[0] != LAYOUT_VERSION {
        return Some(DecodeError::UnknownVersion(header[0]));
    }
    (header[1] != expected_state).then_some(DecodeError::Invalid("record state"))
}

/// Maps the 1 / 0 answer of `complete`, `renew` and `release`.
fn lease_outcome(script: &'static str, reply: Value) -> Result<(), StoreError> {
    match reply {
        Value::Int(1) => Ok(()),
        Value::Int(0) => Err(StoreError::LeaseLost),
        other => Err(unexpected(script, &other)),
    }
}

/// Whether `prefix` can start every key name the store writes: not empty, and without
/// whitespace, control characters or braces (a `{...}` would become a Redis Cluster hash tag and
/// put every key in one slot).
pub fn is_valid_key_prefix(prefix: &str) -> bool {
    !prefix.is_empty()
        && !prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || c == '{' || c == '}')
}

fn validate_prefix(prefix: &str) -> Result<&str, StoreError> {
    if is_valid_key_prefix(prefix) {
        Ok(prefix)
    } else {
        Err(StoreError::backend(ConfigError::InvalidPrefix(
            prefix.to_owned(),
        )))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_that_would_break_key_names_are_refused() {
        for bad in ["", "a b", "tab\there", "{tag}", "a{b", "b}", "new\nline"] {
            assert!(validate_prefix(bad).is_err(), "{bad:?} must be refused");
        }
        for good in ["idempotency", "idem", "app:idem", "a-b_c.d/e"] {
            assert_eq!(validate_prefix(good).ok(), Some(good));
        }
    }

    #[test]
    fn durations_round_up_and_stay_in_range() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(1)), 1);
        assert_eq!(millis(Duration::from_micros(1001)), 2);
        assert_eq!(millis(Duration::from_millis(400)), 400);
        assert_eq!(millis(Duration::MAX), MAX_DURATION_MS);
        assert_eq!(in_flight_key_ttl(400), 800);
    }

    fn test_fingerprint() -> Fingerprint {
        Fingerprint::from_bytes([7; 32])
    }

    /// A header carrying `test_fingerprint()`, as `begin` returns for the request it answers.
    fn header(version: u8, state: u8) -> Vec<u8> {
        let mut value = vec![version, state];
        value.extend_from_slice(test_fingerprint().as_bytes());
        value.resize(HEADER_LEN, 0);
        value
    }

    #[test]
    fn a_completed_reply_for_another_fingerprint_is_an_error_not_a_replay() {
        let response = StoredResponse::new(
            http::StatusCode::OK,
            http::HeaderMap::new(),
            Bytes::from_static(b"someone else's response"),
        );
        let mut value = header(LAYOUT_VERSION, STATE_COMPLETED);
        value.extend_from_slice(&response.encode());
        let reply = || {
            Value::Array(vec![
                Value::Int(4),
                Value::BulkString(value.clone()),
                Value::Int(90_000),
            ])
        };
        assert_eq!(
            parse_begin(reply(), &test_fingerprint()).unwrap(),
            Begin::Completed {
                response,
                expires_in: Duration::from_secs(90),
            }
        );
        assert!(matches!(
            parse_begin(reply(), &Fingerprint::from_bytes([8; 32])),
            Err(StoreError::Corrupt(DecodeError::Invalid(_)))
        ));
    }

    #[test]
    fn begin_replies_are_mapped() {
        let reply = |items: Vec<Value>| parse_begin(Value::Array(items), &test_fingerprint());
        assert_eq!(
            reply(vec![
                Value::Int(1),
                Value::Int(42),
                Value::Int(1),
                Value::BulkString(vec![])
            ])
            .unwrap(),
            Begin::Acquired {
                token: LeaseToken(42),
                attempt: 1,
                recovery_point: None,
            }
        );
        let point = Checkpoint::new("charged", Bytes::from_static(b"\0ch_1")).unwrap();
        assert_eq!(
            reply(vec![
                Value::Int(1),
                Value::Int(43),
                Value::Int(2),
                Value::BulkString(encode_recovery_point(&point))
            ])
            .unwrap(),
            Begin::Acquired {
                token: LeaseToken(43),
                attempt: 2,
                recovery_point: Some(point),
            }
        );
        assert_eq!(reply(vec![Value::Int(2)]).unwrap(), Begin::InFlight);
        assert_eq!(reply(vec![Value::Int(3)]).unwrap(), Begin::Mismatch);

        let response = StoredResponse::new(
            http::StatusCode::ACCEPTED,
            http::HeaderMap::new(),
            Bytes::from_static(b"body"),
        );
        let mut value = header(LAYOUT_VERSION, STATE_COMPLETED);
        value.extend_from_slice(&response.encode());
        assert_eq!(
            reply(vec![
                Value::Int(4),
                Value::BulkString(value),
                Value::Int(1500)
            ])
            .unwrap(),
            Begin::Completed {
                response,
                expires_in: Duration::from_millis(1500),
            }
        );
    }

    #[test]
    fn corrupt_or_unknown_replies_are_errors_not_panics() {
        let reply = |items: Vec<Value>| parse_begin(Value::Array(items), &test_fingerprint());
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(b"junk".to_vec())]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(header(7, 1))]),
            Err(StoreError::Corrupt(DecodeError::UnknownVersion(7)))
        ));
        assert!(matches!(
            reply(vec![Value::Int(0), Value::BulkString(header(1, 9))]),
            Err(StoreError::Corrupt(DecodeError::Invalid(_)))
        ));
        let mut truncated_response = header(LAYOUT_VERSION, STATE_COMPLETED);
        truncated_response.push(1);
        assert!(matches!(
            reply(vec![
                Value::Int(4),
                Value::BulkString(truncated_response),
                Value::Int(1000)
            ]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(
            reply(vec![
                Value::Int(1),
                Value::Int(-1),
                Value::Int(1),
                Value::BulkString(vec![])
            ]),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            reply(vec![
                Value::Int(1),
                Value::Int(1),
                Value::Int(2),
                Value::BulkString(vec![9, b'a'])
            ]),
            Err(StoreError::Corrupt(DecodeError::Truncated))
        ));
        assert!(matches!(reply(vec![]), Err(StoreError::Backend(_))));
        assert!(matches!(
            parse_begin(Value::Okay, &test_fingerprint()),
            Err(StoreError::Backend(_))
        ));
        assert!(matches!(
            lease_outcome("renew", Value::Int(0)),
            Err(StoreError::LeaseLost)
        ));
        assert!(matches!(
            lease_outcome("renew", Value::Nil),
            Err(StoreError::Backend(_))
        ));
    }
}
