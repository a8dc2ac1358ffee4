//! The PostgreSQL store: one table shared by a fleet of processes.
//!
//! Everything about it (table layout, statements, concurrency) is documented on [`PostgresStore`].

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::migrate::{Migration, Migrator};
use sqlx::postgres::{PgConnectOptions, PgListener, PgPool, PgPoolOptions, PgRow};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row, SqlSafeStr, SqlStr};
use tokio::sync::oneshot;

use super::batch::Batcher;
use super::pg_batch::{self, BeginCall, CompleteCall};
use super::sql::{self, Reap};
use super::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::RecordKey;

/// The schema used unless configured otherwise.
const DEFAULT_SCHEMA: &str = "public";
/// The table used unless configured otherwise.
const DEFAULT_TABLE: &str = "idempotency_records";

/// How many times `begin` runs its statement when it keeps losing the race described in the
/// `PostgresStore` docs. Each lost race means another request committed the key in between,
/// after which the next attempt sees that row; needing more than two is already unusual.
pub(super) const MAX_BEGIN_ATTEMPTS: usize = 8;

/// First and longest wait before re-establishing a lost listener connection.
const LISTENER_MIN_BACKOFF: Duration = Duration::from_millis(100);
const LISTENER_MAX_BACKOFF: Duration = Duration::from_secs(10);
/// How long an idle listener connection goes without a health check. A connection that died
/// without a FIN or RST (a failed-over server, a NAT that forgot it) would otherwise go
/// unnoticed for as long as the kernel's TCP timeout, with every notification lost meanwhile.
const LISTENER_HEALTH_INTERVAL: Duration = Duration::from_secs(30);
/// How long connecting the listener or its health check may take.
const LISTENER_TIMEOUT: Duration = Duration::from_secs(10);

/// A store in a PostgreSQL table, shared by every process that uses the same database, schema and
/// table.
///
/// The sections below describe the table layout, the statements and why they are
/// correct under concurrency. Connect with [`PostgresStore::connect`],
/// [`PostgresStore::builder`] or [`PostgresStore::from_pool`]; `connect` applies the schema
/// ([`PostgresStore::migrate`], idempotent) unless [`PostgresStoreBuilder::auto_migrate`] is
/// `false`.
///
/// Cloning is cheap and shares the connection pool, the notification listener and the reaper;
/// they stop when the last clone is dropped.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// use std::time::Duration;
/// use tower_idempotency::{IdempotencyLayer, PostgresStore};
///
/// let store = PostgresStore::builder("postgres://app@db.internal/app")
///     .schema("idempotency")
///     .reaper_interval(Duration::from_secs(30))
///     .connect()
///     .await?;
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer); Ok(()) }
/// ```
///
/// # Table
///
/// One row per record key, in `<schema>.<table>` (default `public.idempotency_records`), created
/// by [`PostgresStore::migrate`] from `migrations/postgres`:
///
/// | column | type | meaning |
/// |---|---|---|
/// | `key` | `bytea` primary key | the [`RecordKey`], 32 bytes |
/// | `fingerprint` | `bytea` | the [`Fingerprint`] of the request that holds or held the key |
/// | `token` | `bigint` identity | the fencing token of the lease |
/// | `response` | `bytea` null | `NULL` in flight; [`StoredResponse::encode`] once completed |
/// | `expires_at` | `timestamptz` | in flight: end of the lease; completed: end of the record |
/// | `attempt` | `integer` | runs of the request so far (1, then one more per takeover) |
/// | `checkpoint_name`, `checkpoint_data` | `text`, `bytea` null | the last recovery point |
///
/// plus an index on `expires_at` for the reaper. A row is *live* while `expires_at > now()`;
/// every statement treats a row that is not live as absent, whether or not the reaper has
/// deleted it yet.
///
/// # Time
///
/// Every deadline is computed by the database server (`now()`), never by the process: proxies
/// whose clocks disagree still agree on when a lease or a record expires. TTLs travel as a number
/// of microseconds.
///
/// # Fencing tokens
///
/// A token is drawn from the `token` column's identity sequence each time a lease is granted.
/// A sequence never hands out a value twice nor goes back, so a token is larger than every token
/// issued before it, for every key, including keys whose rows have since expired and been
/// deleted. (As with any sequence, a failover to an asynchronous replica that had not received
/// the latest sequence WAL could hand out a value again; run synchronous replication where that
/// matters.)
///
/// # `begin`, in one round trip
///
/// ```sql
/// WITH existing AS (            -- the live row, if any, as of the statement's snapshot
///     SELECT fingerprint = $2 AS same_request, response IS NULL AS in_flight,
///            CASE WHEN fingerprint = $2 THEN response END AS response
///     FROM records WHERE key = $1 AND expires_at > now()
/// ),
/// acquired AS (                 -- runs only when no live row was seen
///     INSERT INTO records AS r (key, fingerprint, response, expires_at)
///     SELECT $1, $2, NULL, now() + $3 * interval '1 microsecond'
///     WHERE NOT EXISTS (SELECT FROM existing)
///     ON CONFLICT (key) DO UPDATE
///         SET fingerprint = excluded.fingerprint, token = excluded.token,
///             response = NULL, expires_at = excluded.expires_at
///         WHERE r.expires_at <= now()          -- take over an expired row only
///     RETURNING r.token
/// )
/// SELECT acquired.token, existing.same_request, existing.in_flight, existing.response
/// FROM (SELECT) AS one LEFT JOIN acquired ON true LEFT JOIN existing ON true
/// ```
///
/// * A **live row** (replay, in flight, mismatch) is answered from `existing` and the `INSERT`
///   gets no row to insert: nothing is written, locked or WAL-logged, and no transaction id is
///   assigned, so replays cost one index lookup and scale like reads. A mismatching request is
///   not sent the stored response.
/// * **No row**: the `INSERT` adds one with a fresh token.
/// * **An expired row** (lease whose holder died, record past its TTL): the `INSERT` conflicts
///   and the `DO UPDATE` takes the row over with a fresh token.
/// * **The race.** `existing` reads the statement's snapshot, but the `ON CONFLICT` arbiter sees
///   the latest committed (or in-progress) row. When a concurrent `begin` inserted the key after
///   our snapshot was taken, or took over the same expired row first, our `INSERT` conflicts
///   with a row that is live, the `DO UPDATE`'s `WHERE` is false, and the statement returns
///   neither a token nor an existing row. Under `READ COMMITTED` the next statement takes a new
///   snapshot that sees the winner's row, so [`PostgresStore`] simply runs the statement again:
///   a second round trip, only in that race. The `ON CONFLICT` machinery is what makes `begin`
///   atomic: of any number of concurrent statements, exactly one inserts or takes over the row.
///
/// # `complete`, `renew`, `release`, `checkpoint`
///
/// Each is one statement conditional on the lease: `WHERE key = $1 AND token = $2 AND response IS
/// NULL`. That condition is the record's fencing check, and a plain statement: a handler whose
/// effects live in the same database runs it inside its own transaction with
/// [`complete_in`](PostgresStore::complete_in), [`checkpoint_in`](PostgresStore::checkpoint_in)
/// and [`fence_in`](PostgresStore::fence_in), so its effect rows and the record commit
/// together or not at all (store built with [`from_pool`](PostgresStore::from_pool) on the
/// application's pool). A concurrent takeover or a deletion makes the condition false (PostgreSQL re-checks it
/// against the newest row version after waiting for the row lock), so the statement changes no
/// row and the call returns [`StoreError::LeaseLost`]. The condition deliberately ignores
/// `expires_at`: a holder whose lease lapsed may still finish as long as nobody took over.
/// `complete` sets the response and the record's TTL; `release` deletes the row; `renew` moves
/// `expires_at`.
///
/// # Group commit
///
/// Concurrent `begin`s (and `complete`s) are merged: while a statement is in flight, the calls
/// that arrive queue, and the next free worker (two per operation) runs all of them as one
/// statement over `unnest` of arrays, the same logic row by row, fencing checked per row (see
/// `pg_batch.rs`). There is no timer: a lone call runs the single-request statement above at
/// once. Two calls on one key never share a statement (the second runs in the next one, as if
/// sequential). A statement commits before any of its calls is answered, or fails and fails
/// them all; a batch not done within 5 s fails with [`StoreError::Timeout`]. The sizes are in
/// the `idempotency_store_batch_size` histogram.
///
/// # Notifications
///
/// A request that waits for an in-flight key (`on_conflict = "wait"`) calls `watch`, which sets
/// the row's `watched` flag. `complete` and `release` call `pg_notify(channel, hex(key))` in the
/// same statement (a CTE) when the row is watched, so waking waiters costs no extra round trip,
/// the notification is sent if and only if the change commits, and the common case, a request
/// nobody waits for, sends none: `NOTIFY` stays off the hot path. The channel is derived from the schema and table names
/// ([`PostgresStore::channel`]), so stores on different tables do not wake each other. Each
/// store holds one extra connection that `LISTEN`s on it and hands every notification to its
/// [`CompletionNotifier`], whatever the number of waiters (it shows in `pg_stat_activity` with
/// the application name `tower-idempotency listener <channel>`). If that connection drops (or stops
/// answering its periodic health check), it is re-established with exponential backoff and every
/// waiter of the process is woken once, since notifications sent meanwhile were lost. Waiters
/// in the same process are also woken directly, without waiting for the round trip through the
/// server.
///
/// `NOTIFY` serializes committing transactions on a global queue lock; sending it only for watched
/// rows keeps that lock out of ordinary traffic.
///
/// # Reaper
///
/// Each store runs a background task (every 60 s by default) that deletes expired rows in small
/// batches, each one short statement:
///
/// ```sql
/// DELETE FROM records WHERE ctid = ANY(ARRAY(
///     SELECT ctid FROM records WHERE expires_at <= now()
///     LIMIT $1 FOR UPDATE SKIP LOCKED))
/// ```
///
/// `SKIP LOCKED` passes over rows another transaction is changing (a takeover in progress), so
/// the reaper never waits on, nor blocks, request traffic; the row locks it takes last one batch.
/// Several processes reaping at once split the work instead of contending. Run a pass by hand
/// with [`PostgresStore::reap_expired`].
///
/// # Migrations
///
/// sqlx migrations are static SQL, but the schema and table names are configurable. The files in
/// `migrations/postgres` are therefore templates with `{{schema}}`, `{{table}}` and
/// `{{expires_at_index}}` placeholders. [`PostgresStore::migrate`] substitutes the validated
/// names, builds sqlx [`Migration`]s from the result (checksummed over the substituted text) and
/// runs them with a sqlx [`Migrator`] whose bookkeeping table lives next to the records table:
/// `<schema>.<table>_migrations`, so every records table has its own history. It is idempotent
/// (applied versions are skipped), and safe when several processes migrate at once (the
/// migrator holds a PostgreSQL advisory lock while it runs).
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: PgPool,
    schema: String,
    table: String,
    channel: String,
    statements: Statements,
    reaper_batch: u32,
    notifier: CompletionNotifier,
    /// Group commit of `begin` and `complete` (see `pg_batch`).
    begins: Batcher<pg_batch::Begins>,
    completes: Batcher<pg_batch::Completes>,
    forgets: ForgetSender,
    records: records::RecordStatements,
    // Dropped with the last clone of the store, which stops the listener task.
    _stop_listener: oneshot::Sender<()>,
}

/// The statements, with the table name filled in once at connect time. sqlx prepares each one
/// once per connection and caches it, keyed by this text.
struct Statements {
    begin: SqlStr,
    complete: SqlStr,
    checkpoint: SqlStr,
    renew: SqlStr,
    release: SqlStr,
    watch: SqlStr,
    reap: SqlStr,
}

impl Statements {
    fn new(schema: &str, table: &str) -> Self {
        // Safe to interpolate: both names passed `sql::validate_identifier`.
        let t = format!("\"{schema}\".\"{table}\"");
        let sql = |text: String| AssertSqlSafe(Arc::<str>::from(text)).into_sql_str();
        // The row taken over is a lapsed lease of the same request: the new lease is its next
        // attempt and inherits its recovery point.
        let same_run = "r.response IS NULL AND r.fingerprint = excluded.fingerprint";
        Self {
            begin: sql(format!(
                "WITH existing AS ( \
                     SELECT fingerprint = $2 AS same_request, \
                            response IS NULL AS in_flight, \
                            CASE WHEN fingerprint = $2 THEN response END AS response, \
                            (extract(epoch FROM expires_at - now()) * 1000000)::bigint \
                                AS expires_in \
                     FROM {t} WHERE key = $1 AND expires_at > now() \
                 ), \
                 acquired AS ( \
                     INSERT INTO {t} AS r (key, fingerprint, response, expires_at) \
                     SELECT $1, $2, NULL, now() + $3 * interval '1 microsecond' \
                     WHERE NOT EXISTS (SELECT FROM existing) \
                     ON CONFLICT (key) DO UPDATE \
                         SET fingerprint = excluded.fingerprint, token = excluded.token, \
                             response = NULL, expires_at = excluded.expires_at, \
                             attempt = CASE WHEN {same_run} THEN r.attempt + 1 ELSE 1 END, \
                             checkpoint_name = CASE WHEN {same_run} \
                                                    THEN r.checkpoint_name END, \
                             checkpoint_data = CASE WHEN {same_run} \
                                                    THEN r.checkpoint_data END \
                         WHERE r.expires_at <= now() \
                     RETURNING r.token, r.attempt::bigint AS attempt, r.checkpoint_name, \
                               r.checkpoint_data \
                 ) \
                 SELECT acquired.token, existing.same_request, existing.in_flight, \
                        existing.response, acquired.attempt, acquired.checkpoint_name, \
                        acquired.checkpoint_data, existing.expires_in \
                 FROM (SELECT) AS one \
                 LEFT JOIN acquired ON true \
                 LEFT JOIN existing ON true"
            )),
            complete: sql(format!(
                "WITH completed AS ( \
                     UPDATE {t} \
                     SET response = $3, expires_at = now() + $4 * interval '1 microsecond' \
                     WHERE key = $1 AND token = $2 AND response IS NULL \
                     RETURNING key, watched \
                 ) \
                 SELECT CASE WHEN watched \
                             THEN (SELECT 1 FROM pg_notify($5, encode(completed.key, 'hex'))) \
                             ELSE 1 END \
                 FROM completed"
            )),
            checkpoint: sql(format!(
                "UPDATE {t} SET checkpoint_name = $3, checkpoint_data = $4 \
                 WHERE key = $1 AND token = $2 AND response IS NULL"
            )),
            renew: sql(format!(
                "UPDATE {t} SET expires_at = now() + $3 * interval '1 microsecond' \
                 WHERE key = $1 AND token = $2 AND response IS NULL"
            )),
            release: sql(format!(
                "WITH released AS ( \
                     DELETE FROM {t} \
                     WHERE key = $1 AND token = $2 AND response IS NULL \
                     RETURNING key, watched \
                 ) \
                 SELECT CASE WHEN watched \
                             THEN (SELECT 1 FROM pg_notify($3, encode(released.key, 'hex'))) \
                             ELSE 1 END \
                 FROM released"
            )),
            // Marks the lease waited for; true while the key is in flight. The second EXISTS
            // reads the statement's snapshot, so it also sees a row that was already marked.
            watch: sql(format!(
                "WITH marked AS ( \
                     UPDATE {t} SET watched = true \
                     WHERE key = $1 AND response IS NULL AND expires_at > now() AND NOT watched \
                     RETURNING 1 \
                 ) \
                 SELECT EXISTS (SELECT FROM marked) \
                     OR EXISTS (SELECT FROM {t} \
                                WHERE key = $1 AND response IS NULL AND expires_at > now())"
            )),
            // No `expires_at` re-check in the outer DELETE: the rows are locked by the subquery
            // and cannot change before the DELETE, and without it the planner uses a TID scan
            // instead of re-reading every expired row through the index.
            reap: sql(format!(
                "DELETE FROM {t} WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM {t} WHERE expires_at <= now() \
                     LIMIT $1 FOR UPDATE SKIP LOCKED))"
            )),
        }
    }
}

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
        let (begin_batch, complete_batch) =
            pg_batch::statements(&format!("\"{}\".\"{}\"", self.schema, self.table));
        let begins = Batcher::spawn(
            pg_batch::Begins {
                pool: pool.clone(),
                single: statements.begin.clone(),
                batch: begin_batch,
            },
            "postgres",
            "begin",
            pg_batch::BATCHES_IN_FLIGHT,
            pg_batch::BATCH_DEADLINE,
        );
        let completes = Batcher::spawn(
            pg_batch::Completes {
                pool: pool.clone(),
                single: statements.complete.clone(),
                batch: complete_batch,
                channel: channel.clone(),
            },
            "postgres",
            "complete",
            pg_batch::BATCHES_IN_FLIGHT,
            pg_batch::BATCH_DEADLINE,
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

    /// Creates the schema (if missing), the table and its index, or brings them up to date.
    ///
    /// Idempotent, and safe to run from several processes at once; see "Migrations" in the
    /// [`PostgresStore`] documentation. Needs a role that may create them; where the serving
    /// role may not, run it once with another role (`idempotency-proxy migrate`).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        // A one-connection pool of its own rather than the store's pool: sqlx's migrator takes a
        // session-level advisory lock and does not release it when a migration fails. Closing
        // this pool ends the session, which releases the lock in every case, where a pooled
        // connection would keep it and make the next `migrate` anywhere wait forever.
        let options = (*self.inner.pool.connect_options()).clone();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options)
            .await
            .map_err(StoreError::backend)?;
        let migrated = self.run_migrations(&pool).await;
        pool.close().await;
        migrated
    }

    async fn run_migrations(&self, pool: &PgPool) -> Result<(), StoreError> {
        let (schema, table) = (&self.inner.schema, &self.inner.table);
        let mut migrator = migrator(schema, table)?;
        // `CREATE SCHEMA IF NOT EXISTS` checks the CREATE privilege on the database before it
        // checks whether the schema exists, so it is only sent when the schema is missing: a
        // role that may create tables in an existing schema can then migrate.
        let schema_exists: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM pg_namespace WHERE nspname = $1)")
                .bind(schema)
                .fetch_one(pool)
                .await
                .map_err(StoreError::backend)?;
        if !schema_exists {
            migrator.create_schema(format!("\"{schema}\""));
        }
        migrator.run(pool).await.map_err(StoreError::backend)
    }

    /// Deletes every expired row now, in batches of the configured size; returns how many rows
    /// were deleted. The reaper task calls this every reaper interval.
    pub async fn reap_expired(&self) -> Result<u64, StoreError> {
        self.inner.reap_expired().await
    }

    /// The schema holding the records table.
    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The records table.
    pub fn table(&self) -> &str {
        &self.inner.table
    }

    /// Wakes this process's waiters (for `complete_in`, which cannot wake them before the
    /// caller's transaction commits).
    pub(super) fn notifier(&self) -> &CompletionNotifier {
        &self.inner.notifier
    }

    /// The `LISTEN`/`NOTIFY` channel on which completions and releases are announced, with the
    /// hex-encoded record key as payload: `idempotency_` and 16 hex digits of a hash of the schema
    /// and table names.
    pub fn channel(&self) -> &str {
        &self.inner.channel
    }
}

impl fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .field("table", &self.inner.table)
            .field("channel", &self.inner.channel)
            .field("pool_size", &self.inner.pool.size())
            .field("reaper_batch", &self.inner.reaper_batch)
            .finish_non_exhaustive()
    }
}

impl Reap for Inner {
    async fn reap_expired(&self) -> Result<u64, StoreError> {
        sql::reap_in_batches("postgres", self.reaper_batch, || async {
            let deleted = sqlx::query(self.statements.reap.clone())
                .bind(i64::from(self.reaper_batch))
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(deleted.rows_affected())
        })
        .await
    }
}

/// A lease token as the `bigint` it is stored as; `None` for a token no sequence can have issued,
/// which therefore holds no lease.
fn stored_token(token: LeaseToken) -> Option<i64> {
    i64::try_from(token.0).ok()
}

/// Reads the row the `begin` statement returns; `None` when it lost the race described in the
/// `PostgresStore` docs and must run again.
pub(super) fn read_begin(row: &PgRow) -> Result<Option<Begin>, StoreError> {
    let acquired: Option<i64> = row.try_get(0).map_err(StoreError::backend)?;
    if let Some(token) = acquired {
        let (attempt, recovery_point) = sql::run_from_row(row, 4)?;
        return Ok(Some(Begin::Acquired {
            token: LeaseToken(sql::token_from_column(token)?),
            attempt,
            recovery_point,
        }));
    }
    let same_request: Option<bool> = row.try_get(1).map_err(StoreError::backend)?;
    let in_flight: Option<bool> = row.try_get(2).map_err(StoreError::backend)?;
    match (same_request, in_flight) {
        (None, _) | (_, None) => Ok(None),
        (Some(false), _) => Ok(Some(Begin::Mismatch)),
        (Some(true), Some(true)) => Ok(Some(Begin::InFlight)),
        (Some(true), Some(false)) => {
            let response: Option<Vec<u8>> = row.try_get(3).map_err(StoreError::backend)?;
            let response = response.ok_or_else(|| {
                StoreError::backend("a completed record came back without its response")
            })?;
            let expires_in: Option<i64> = row.try_get("expires_in").map_err(StoreError::backend)?;
            Ok(Some(Begin::Completed {
                response: StoredResponse::decode(Bytes::from(response))?,
                expires_in: sql::duration_from_micros(expires_in.unwrap_or(0)),
            }))
        }
    }
}

#[async_trait]
impl IdempotencyStore for PostgresStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        // Merged with concurrent begins into one statement (see `pg_batch`), which also runs
        // again a call that lost the race for its key.
        self.inner
            .begins
            .call(BeginCall {
                key: *key.as_bytes(),
                fingerprint: *fingerprint.as_bytes(),
                ttl_micros: sql::micros(lock_ttl),
            })
            .await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = stored_token(token).ok_or(StoreError::LeaseLost)?;
        let completed = self
            .inner
            .completes
            .call(CompleteCall {
                key: *key.as_bytes(),
                token,
                response: response.encode().to_vec(),
                ttl_micros: sql::micros(ttl),
            })
            .await?;
        if !completed {
            return Err(StoreError::LeaseLost);
        }
        // Other processes learn it from the NOTIFY; waiters here need not wait for it.
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let token = stored_token(token).ok_or(StoreError::LeaseLost)?;
        let stored = sqlx::query(self.inner.statements.checkpoint.clone())
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(checkpoint.name())
            .bind(&checkpoint.data()[..])
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        if stored.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let token = stored_token(token).ok_or(StoreError::LeaseLost)?;
        let released = sqlx::query(self.inner.statements.release.clone())
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(&self.inner.channel)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        if released.is_none() {
            return Err(StoreError::LeaseLost);
        }
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = stored_token(token).ok_or(StoreError::LeaseLost)?;
        let renewed = sqlx::query(self.inner.statements.renew.clone())
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(sql::micros(lock_ttl))
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        if renewed.rows_affected() == 0 {
            return Err(StoreError::LeaseLost);
        }
        Ok(())
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
        sqlx::query_scalar(self.inner.statements.watch.clone())
            .bind(&key.as_bytes()[..])
            .fetch_one(&self.inner.pool)
            .await
            .map_err(StoreError::backend)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }
}

/// The migrations of `migrations/postgres` with the names filled in, and a migrator whose
/// bookkeeping table sits next to the records table.
fn migrator(schema: &str, table: &str) -> Result<Migrator, StoreError> {
    let templates = sqlx::migrate!("migrations/postgres");
    let migrations = templates
        .iter()
        .map(|template| {
            let sql = substitute(template.sql.as_str(), schema, table).map_err(|placeholder| {
                StoreError::backend(format!(
                    "migration {} uses the unknown placeholder {placeholder}",
                    template.version
                ))
            })?;
            Ok(Migration::new(
                template.version,
                template.description.clone(),
                template.migration_type,
                AssertSqlSafe(sql).into_sql_str(),
                template.no_tx,
            ))
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let mut migrator = Migrator::with_migrations(migrations);
    migrator.dangerous_set_table_name(format!(
        "\"{schema}\".\"{}\"",
        sql::derived_name(table, "_migrations")
    ));
    // A newer release may have applied migrations this one does not know (a rolling deploy, a
    // rollback): they only ever add to the schema, so this release keeps working with it.
    migrator.set_ignore_missing(true);
    Ok(migrator)
}

/// Fills a migration template in; `Err` names a placeholder left over.
fn substitute(template: &str, schema: &str, table: &str) -> Result<String, String> {
    let sql = template
        .replace("{{schema}}", schema)
        .replace("{{table}}", table)
        .replace(
            "{{expires_at_index}}",
            &sql::derived_name(table, "_expires_at_idx"),
        );
    match sql.find("{{") {
        None => Ok(sql),
        Some(at) => Err(sql[at..].chars().take_while(|c| *c != '}').collect()),
    }
}

/// The notification channel of a table. A hash keeps it short and unambiguous (channel names
/// are identifiers, at most 63 bytes, and `a_b`.`c` must not collide with `a`.`b_c`).
fn channel_name(schema: &str, table: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("{schema}.{table}").as_bytes());
    format!("idempotency_{}", hex::encode(&digest[..8]))
}

/// A `LISTEN`ing connection on `channel`, in a one-connection pool of its own: a listener that
/// died is dropped with its pool and replaced by a new one, never waited for.
async fn open_listener(
    options: &PgConnectOptions,
    channel: &str,
) -> Result<PgListener, sqlx::Error> {
    let connect = async {
        let options = options
            .clone()
            .application_name(&format!("tower-idempotency listener {channel}"));
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .idle_timeout(None)
            .max_lifetime(None)
            .acquire_timeout(LISTENER_TIMEOUT)
            .connect_with(options)
            .await?;
        let mut listener = PgListener::connect_with(&pool).await?;
        // Reconnecting is ours to do (see `listen`): `try_recv` then never awaits anything but
        // the socket, which keeps it safe to cancel.
        listener.eager_reconnect(false);
        listener.listen(channel).await?;
        Ok(listener)
    };
    tokio::time::timeout(LISTENER_TIMEOUT, connect)
        .await
        .unwrap_or(Err(sqlx::Error::PoolTimedOut))
}

/// The listener task: hands every notification on `channel` to `notifier` until `stop` fires
/// (the store was dropped). Re-establishes a lost connection with exponential backoff, then
/// wakes every waiter, since notifications sent while it was down are lost.
async fn listen(
    listener: PgListener,
    options: PgConnectOptions,
    channel: String,
    notifier: CompletionNotifier,
    forgets: ForgetSender,
    mut stop: oneshot::Receiver<()>,
) {
    let mut listener = Some(listener);
    let mut backoff = LISTENER_MIN_BACKOFF;
    loop {
        let Some(active) = listener.as_mut() else {
            tokio::select! {
                _ = &mut stop => return,
                () = tokio::time::sleep(backoff) => {}
            }
            let reopened = tokio::select! {
                _ = &mut stop => return,
                reopened = open_listener(&options, &channel) => reopened,
            };
            match reopened {
                Ok(reopened) => {
                    tracing::info!(channel, "notification listener reconnected");
                    listener = Some(reopened);
                    backoff = LISTENER_MIN_BACKOFF;
                    notifier.notify_all();
                    forgets.unknown();
                }
                Err(error) => {
                    tracing::warn!(
                        channel, %error, retry_in = ?backoff,
                        "notification listener cannot reconnect"
                    );
                    backoff = (backoff * 2).min(LISTENER_MAX_BACKOFF);
                }
            }
            continue;
        };
        // Cancelling `try_recv` is safe here: with eager reconnection off it only awaits the
        // socket, whose reads sqlx makes cancel-safe.
        let received = tokio::select! {
            _ = &mut stop => return,
            received = active.try_recv() => Some(received),
            () = tokio::time::sleep(LISTENER_HEALTH_INTERVAL) => None,
        };
        let healthy = match received {
            Some(Ok(Some(notification))) => {
                deliver(&notifier, &forgets, notification.payload());
                true
            }
            Some(Ok(None)) => {
                tracing::warn!(channel, "notification listener lost its connection");
                false
            }
            Some(Err(error)) => {
                tracing::warn!(channel, %error, "notification listener failed");
                false
            }
            None => {
                let check = sqlx::query("SELECT 1").execute(&mut *active);
                match tokio::time::timeout(LISTENER_TIMEOUT, check).await {
                    Ok(Ok(_)) => true,
                    Ok(Err(error)) => {
                        tracing::warn!(
                            channel, %error,
                            "notification listener failed its health check"
                        );
                        false
                    }
                    Err(_) => {
                        tracing::warn!(channel, "notification listener's health check timed out");
                        false
                    }
                }
            }
        };
        if !healthy {
            // Replaced by a fresh listener on the next turn, after a short wait; waiters are
            // woken once it is back (or right away by their own poll interval).
            listener = None;
            backoff = LISTENER_MIN_BACKOFF;
        }
    }
}

/// Wakes the subscribers of the key a notification names. A payload that is not a hex record
/// key (someone else's NOTIFY on our channel) is ignored.
fn deliver(notifier: &CompletionNotifier, forgets: &ForgetSender, payload: &str) {
    let (forgot, hex_key) = match payload.strip_prefix(records::FORGET_PREFIX) {
        Some(hex_key) => (true, hex_key),
        None => (false, payload),
    };
    let mut key = [0u8; 32];
    match hex::decode_to_slice(hex_key, &mut key) {
        Ok(()) => {
            let key = RecordKey::from_bytes(key);
            notifier.notify(&key);
            if forgot {
                forgets.forgot(&key);
            }
        }
        Err(_) => tracing::debug!(payload, "ignoring a notification that names no record key"),
    }
}

#[path = "postgres_records.rs"]
mod records;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_migration_is_fully_substituted() {
        let long_table = "t".repeat(63);
        for (schema, table) in [
            ("public", "idempotency_records"),
            ("s", long_table.as_str()),
        ] {
            let migrator = migrator(schema, table).expect("placeholders are all known");
            assert!(migrator.iter().count() >= 1);
            for migration in migrator.iter() {
                let sql = migration.sql.as_str();
                assert!(!sql.contains("{{"), "{sql}");
                assert!(sql.contains(&format!("\"{schema}\".\"{table}\"")));
            }
        }
    }

    #[test]
    fn unknown_placeholders_are_reported() {
        assert_eq!(
            substitute("CREATE TABLE {{nope}} ()", "s", "t"),
            Err("{{nope".to_owned())
        );
    }

    #[test]
    fn channels_differ_per_table_and_fit_an_identifier() {
        let a = channel_name("a_b", "c");
        let b = channel_name("a", "b_c");
        assert_ne!(a, b);
        assert!(a.len() <= 63);
        assert!(sql::validate_identifier("channel", &a).is_ok());
    }

    #[test]
    fn notifications_with_foreign_payloads_are_ignored() {
        let (notifier, forgets) = (CompletionNotifier::new(), ForgetSender::default());
        let mut feed = forgets.feed();
        deliver(&notifier, &forgets, "not hex");
        deliver(&notifier, &forgets, "abcd");
        deliver(&notifier, &forgets, "forget:abcd");
        deliver(&notifier, &forgets, &"0".repeat(64));
        assert!(feed.try_recv().is_err(), "a completion is not a forget");
    }

    #[test]
    fn forget_notifications_reach_the_feed() {
        use crate::store::ForgetEvent;
        let (notifier, forgets) = (CompletionNotifier::new(), ForgetSender::default());
        let mut feed = forgets.feed();
        let key = RecordKey::from_bytes([7; 32]);
        deliver(&notifier, &forgets, &format!("forget:{}", key.to_hex()));
        assert_eq!(feed.try_recv().ok(), Some(ForgetEvent::Key(key)));
    }
}
