//! Configuring and connecting a [`PostgresStore`]: [`PostgresStoreBuilder`] and the
//! constructors that return one.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPool, PgPoolOptions};
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;

use super::listener::{channel_name, listen, open_listener};
use super::replan::Replan;
use super::statements::Statements;
use super::{Inner, PostgresStore, batch, records};
use crate::store::batch::Batcher;
use crate::store::{CompletionNotifier, ForgetSender, StoreError, sql};

/// A pooled connection idle this long is pinged before it is used.
const PING_WHEN_IDLE_FOR: Duration = Duration::from_secs(1);

/// The schema used unless configured otherwise.
const DEFAULT_SCHEMA: &str = "public";
/// The table used unless configured otherwise.
const DEFAULT_TABLE: &str = "idempotency_records";

/// Configures and connects a [`PostgresStore`]; from [`PostgresStore::builder`] or
/// [`PostgresStore::from_pool`].
#[derive(Clone)]
#[must_use = "a builder does nothing until `.connect().await`"]
pub struct PostgresStoreBuilder {
    source: Source,
    schema: String,
    table: String,
    max_connections: Option<u32>,
    reaper_interval: Duration,
    reaper_batch: u32,
    auto_migrate: bool,
}

/// Where the store's connections come from.
#[derive(Clone)]
enum Source {
    Url(String),
    /// The application's own pool, used as it is.
    Pool(PgPool),
}

impl fmt::Debug for PostgresStoreBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The URL is left out: it may hold a password.
        f.debug_struct("PostgresStoreBuilder")
            .field("schema", &self.schema)
            .field("table", &self.table)
            .field("max_connections", &self.max_connections)
            .field("reaper_interval", &self.reaper_interval)
            .field("reaper_batch", &self.reaper_batch)
            .field("auto_migrate", &self.auto_migrate)
            .finish_non_exhaustive()
    }
}

impl PostgresStoreBuilder {
    /// The schema holding the table (default `public`). [`PostgresStore::migrate`] creates it if
    /// missing. Must match `[a-z_][a-z0-9_]*`, at most 63 bytes; checked by
    /// [`connect`](Self::connect).
    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }

    /// The records table (default `idempotency_records`). Same rules as
    /// [`schema`](Self::schema).
    pub fn table(mut self, table: impl Into<String>) -> Self {
        self.table = table.into();
        self
    }

    /// The size of the connection pool (default: twice the number of cores, plus two). The
    /// notification listener uses one more connection of its own, and [`PostgresStore::migrate`]
    /// one more while it runs.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max.max(1));
        self
    }

    /// How often the reaper deletes expired rows (default 60 s; zero disables it, for instance
    /// when a single dedicated process or a cron job calls [`PostgresStore::reap_expired`]).
    pub fn reaper_interval(mut self, interval: Duration) -> Self {
        self.reaper_interval = interval;
        self
    }

    /// How many rows one reaper statement deletes at most (default 1000, at least 1). Smaller
    /// batches hold their row locks for less time; a pass runs batches until one comes back
    /// short.
    pub fn reaper_batch(mut self, batch: u32) -> Self {
        self.reaper_batch = batch.max(1);
        self
    }

    /// Whether [`connect`](Self::connect) applies the migrations (default `true`), as
    /// [`PostgresStore::migrate`] does. Set `false` when the serving role may not create tables:
    /// migrate once with another role (`idempotency-proxy migrate`, or `migrate()`).
    pub fn auto_migrate(mut self, auto_migrate: bool) -> Self {
        self.auto_migrate = auto_migrate;
        self
    }

    /// Validates the names, connects the pool (or takes the one given to
    /// [`PostgresStore::from_pool`]) and the notification listener, applies the migrations
    /// unless [`auto_migrate(false)`](Self::auto_migrate), and starts the reaper.
    ///
    /// Fails if a name is invalid, the URL cannot be parsed, the server cannot be reached or a
    /// migration fails. Must be called inside a tokio runtime.
    pub async fn connect(self) -> Result<PostgresStore, StoreError> {
        sql::validate_identifier("schema", &self.schema).map_err(StoreError::backend)?;
        sql::validate_identifier("table", &self.table).map_err(StoreError::backend)?;
        let (pool, options) = match self.source {
            Source::Pool(pool) => {
                let options = (*pool.connect_options()).clone();
                (pool, options)
            }
            Source::Url(url) => {
                let options = PgConnectOptions::from_str(&url).map_err(StoreError::backend)?;
                // One direct connection first: a pool retries a refused connection until its
                // acquire timeout (30 s) and then reports only that it timed out, where this
                // fails at once and says why.
                let probe = PgConnection::connect_with(&options)
                    .await
                    .map_err(StoreError::backend)?;
                if let Err(error) = probe.close().await {
                    tracing::debug!(%error, "closing the probe connection failed");
                }
                let pool = PgPoolOptions::new()
                    .max_connections(self.max_connections.unwrap_or_else(sql::default_pool_size))
                    // sqlx pings every connection it hands out, a round trip before each
                    // statement; only one that sat idle may have gone stale (a restarted
                    // server, a cut network), so only such a one is pinged. The price: a
                    // connection that broke less than that ago fails the statement it is
                    // given (one batch: 503 or release), and sqlx replaces it.
                    .test_before_acquire(false)
                    .before_acquire(|conn, meta| {
                        Box::pin(async move {
                            if meta.idle_for >= PING_WHEN_IDLE_FOR {
                                conn.ping().await?;
                            }
                            Ok(true)
                        })
                    })
                    .connect_with(options.clone())
                    .await
                    .map_err(StoreError::backend)?;
                (pool, options)
            }
        };

        let channel = channel_name(&self.schema, &self.table);
        let notifier = CompletionNotifier::new();
        let forgets = ForgetSender::default();
        // Listening before `connect` returns: a subscription made right after is already served.
        let listener = open_listener(&options, &channel)
            .await
            .map_err(StoreError::backend)?;
        let (stop_listener, stopped) = oneshot::channel();
        tokio::spawn(listen(
            listener,
            options,
            channel.clone(),
            notifier.clone(),
            forgets.clone(),
            stopped,
        ));

        let statements = Statements::new(&self.schema, &self.table);
        let replan = Arc::new(Replan::default());
        let (begin_batch, complete_batch) = batch::statements(&statements.table, &replan);
        let begins = Batcher::spawn(
            batch::Begins {
                pool: pool.clone(),
                single: statements.begin.clone(),
                batch: begin_batch,
            },
            "postgres",
            "begin",
            batch::BATCHES_IN_FLIGHT,
            batch::BATCH_DEADLINE,
        );
        let completes = Batcher::spawn(
            batch::Completes {
                pool: pool.clone(),
                single: statements.complete.clone(),
                batch: complete_batch,
                channel: channel.clone(),
            },
            "postgres",
            "complete",
            batch::BATCHES_IN_FLIGHT,
            batch::BATCH_DEADLINE,
        );
        let inner = Arc::new(Inner {
            pool,
            statements,
            begins,
            completes,
            records: records::RecordStatements::new(&self.schema, &self.table),
            schema: self.schema,
            table: self.table,
            channel,
            reaper_batch: self.reaper_batch,
            replan,
            notifier,
            forgets,
            _stop_listener: stop_listener,
        });
        sql::spawn_reaper(Arc::downgrade(&inner), self.reaper_interval, "postgres");
        let store = PostgresStore { inner };
        if self.auto_migrate {
            store.migrate().await?;
        }
        Ok(store)
    }
}

impl PostgresStore {
    /// A builder for a store on `url` (`postgres://user:password@host:port/database?...`; every
    /// option sqlx's [`PgConnectOptions`] parses, including `sslmode`).
    pub fn builder(url: impl Into<String>) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source: Source::Url(url.into()),
            schema: DEFAULT_SCHEMA.to_owned(),
            table: DEFAULT_TABLE.to_owned(),
            max_connections: None,
            reaper_interval: sql::DEFAULT_REAPER_INTERVAL,
            reaper_batch: sql::DEFAULT_REAPER_BATCH,
            auto_migrate: true,
        }
    }

    /// A builder for a store in the application's own pool (its tables may live in the same
    /// database; give the store a schema or table of its own). The pool is used as it is, so
    /// [`max_connections`](PostgresStoreBuilder::max_connections) does not apply; the
    /// notification listener and [`migrate`](Self::migrate) open connections of their own with
    /// the pool's connect options.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::PostgresStore;
    ///
    /// let pool = sqlx::PgPool::connect("postgres://app@db.internal/app").await?;
    /// let store = PostgresStore::from_pool(pool.clone())
    ///     .schema("idempotency")
    ///     .connect()
    ///     .await?;
    /// # drop(store); Ok(()) }
    /// ```
    pub fn from_pool(pool: PgPool) -> PostgresStoreBuilder {
        PostgresStoreBuilder {
            source: Source::Pool(pool),
            ..Self::builder(String::new())
        }
    }

    /// Connects with every default: `public.idempotency_records`, a pool sized for the machine,
    /// the reaper every 60 s. See [`PostgresStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }
}
