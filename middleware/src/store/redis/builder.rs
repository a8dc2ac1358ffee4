//! Configuring and connecting a [`RedisStore`]: [`RedisStoreBuilder`], the constructors that
//! return one, and the check of the key prefix.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use redis::Client;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster::ClusterClient;

use super::connection::Connection;
use super::listener::Listener;
use super::{ConfigError, Inner, RedisStore, context};
use crate::store::{CompletionNotifier, ForgetSender, StoreError};

const DEFAULT_PREFIX: &str = "idempotency";
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(2);
/// Below the layer's default store timeout (5 s), so a stuck server surfaces as this store's
/// timeout with its own message.
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(3);

/// Reconnect attempts of the standalone connection before pending commands fail, and the
/// longest pause between two of them (see `RedisStoreBuilder::connect`).
const RECONNECT_ATTEMPTS: usize = 3;
const RECONNECT_MAX_DELAY: Duration = Duration::from_secs(1);

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
}
