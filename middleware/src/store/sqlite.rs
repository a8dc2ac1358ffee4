//! The SQLite store: durable records in a local database file, for one process.
//!
//! Everything about it (table layout, statements, concurrency) is documented on [`SqliteStore`].

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use sqlx::Row;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteExecutor, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
};

use super::batch::Batcher;
use super::sql::{self, Reap};
use super::sqlite_batch::{WriteCall, Writer, Written};
use super::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, StoreError, Subscription,
};
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::RecordKey;

/// How long a writer waits for SQLite's write lock unless configured otherwise.
const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The sqlx bookkeeping table of this store's migrations.
const MIGRATIONS_TABLE: &str = "idempotency_migrations";

/// The current time in Unix milliseconds, in SQL. A macro so that `concat!` can build each
/// statement as one `&'static str`.
macro_rules! now_ms {
    () => {
        "CAST(unixepoch('subsec') * 1000 AS INTEGER)"
    };
}

/// The live row of key `?1`, seen by the request with fingerprint `?2`, and the milliseconds it
/// has left. The response is only read for the same request: a mismatch has no use for it.
const LOOKUP: &str = concat!(
    "SELECT fingerprint = ?2, response IS NULL, ",
    "CASE WHEN fingerprint = ?2 THEN response END, ",
    "expires_at - ",
    now_ms!(),
    " FROM idempotency_records WHERE key = ?1 AND expires_at > ",
    now_ms!()
);
/// Draws `?1` tokens at once: the new last one is returned, the others precede it.
pub(super) const TAKE_TOKENS: &str =
    "UPDATE idempotency_tokens SET last = last + ?1 WHERE id = 1 RETURNING last";
/// Whether the row being taken over is a lapsed lease of the same request: its next attempt.
macro_rules! same_run {
    () => {
        "idempotency_records.response IS NULL \
         AND idempotency_records.fingerprint = excluded.fingerprint"
    };
}
/// Takes over the key's row when the insert of a lease finds one that is no longer live (an
/// expired record, or a lapsed lease whose next attempt this is); a live row is left alone.
/// Macro so that `ACQUIRE` and the batch's many-row insert (`sqlite_batch`) share it.
macro_rules! on_conflict_take_over {
    () => {
        concat!(
            "ON CONFLICT (key) DO UPDATE SET fingerprint = excluded.fingerprint, ",
            "token = excluded.token, response = NULL, expires_at = excluded.expires_at, ",
            "attempt = CASE WHEN ",
            same_run!(),
            " THEN idempotency_records.attempt + 1 ELSE 1 END, ",
            "checkpoint_name = CASE WHEN ",
            same_run!(),
            " THEN idempotency_records.checkpoint_name END, ",
            "checkpoint_data = CASE WHEN ",
            same_run!(),
            " THEN idempotency_records.checkpoint_data END ",
            "WHERE idempotency_records.expires_at <= ",
            now_ms!(),
            " "
        )
    };
}
pub(super) use {now_ms, on_conflict_take_over, same_run};
/// Inserts the lease, or takes over the key's row; only run under the write lock, after `LOOKUP`
/// found no live row. Returns the attempt and the recovery point the new lease inherits.
pub(super) const ACQUIRE: &str = concat!(
    "INSERT INTO idempotency_records (key, fingerprint, token, response, expires_at) ",
    "VALUES (?1, ?2, ?3, NULL, ",
    now_ms!(),
    " + ?4) ",
    on_conflict_take_over!(),
    "RETURNING attempt, checkpoint_name, checkpoint_data"
);
const CHECKPOINT: &str = "UPDATE idempotency_records SET checkpoint_name = ?3, checkpoint_data = ?4 \
     WHERE key = ?1 AND token = ?2 AND response IS NULL";
pub(super) const COMPLETE: &str = concat!(
    "UPDATE idempotency_records SET response = ?3, expires_at = ",
    now_ms!(),
    " + ?4 WHERE key = ?1 AND token = ?2 AND response IS NULL"
);
const RENEW: &str = concat!(
    "UPDATE idempotency_records SET expires_at = ",
    now_ms!(),
    " + ?3 WHERE key = ?1 AND token = ?2 AND response IS NULL"
);
const RELEASE: &str =
    "DELETE FROM idempotency_records WHERE key = ?1 AND token = ?2 AND response IS NULL";
const REAP: &str = concat!(
    "DELETE FROM idempotency_records WHERE rowid IN (",
    "SELECT rowid FROM idempotency_records WHERE expires_at <= ",
    now_ms!(),
    " LIMIT ?1)"
);

/// A store in a local SQLite database file: durable across restarts, for one process.
///
/// The sections below describe the tables and how `begin` stays atomic. For several
/// processes, use the PostgreSQL or Redis store.
///
/// Cloning is cheap and shares the connection pool and the reaper, which stops when the last
/// clone is dropped.
///
/// ```no_run
/// # async fn run() -> Result<(), tower_idempotency::StoreError> {
/// use tower_idempotency::{IdempotencyLayer, SqliteStore};
///
/// // Creates the file and its tables if missing.
/// let store = SqliteStore::connect("sqlite://idempotency.db").await?;
/// let layer = IdempotencyLayer::new(store);
/// # drop(layer); Ok(()) }
/// ```
///
/// # Tables
///
/// Created by the migrations in `migrations/sqlite`, which [`SqliteStore`] applies itself when it
/// connects, unless [`SqliteStoreBuilder::auto_migrate`] says otherwise (sqlx bookkeeping in `idempotency_migrations`, so the file may also hold an
/// application's own sqlx-migrated tables):
///
/// `idempotency_records`, one row per record key:
///
/// | column | type | meaning |
/// |---|---|---|
/// | `key` | `BLOB` primary key | the [`RecordKey`], 32 bytes |
/// | `fingerprint` | `BLOB` | the [`Fingerprint`] of the request that holds or held the key |
/// | `token` | `INTEGER` | the fencing token of the lease |
/// | `response` | `BLOB` null | `NULL` while in flight; [`StoredResponse::encode`] once completed |
/// | `expires_at` | `INTEGER` | Unix ms; in flight: lease end; completed: record end |
/// | `attempt` | `INTEGER` | runs of the request so far (1, then one more per takeover) |
/// | `checkpoint_name`, `checkpoint_data` | `TEXT`, `BLOB` null | the last recovery point |
///
/// with an index on `expires_at`, and `idempotency_tokens`, one row holding the last token issued.
/// Tokens come from that counter, never reset, so a token is larger than every token issued
/// before it, even for a key whose previous row has been deleted.
///
/// A row is *live* while `expires_at` is in the future; every statement treats a row that is not
/// live as absent, whether or not the reaper has deleted it yet.
///
/// `idempotency_forgets` logs every delete of a live completed record (a forget), written by a
/// trigger in the deleting transaction: `seq` (`AUTOINCREMENT`), `key`, `forgotten_at`.
///
/// # Forgets in other processes
///
/// The file serves one process, but `idempotency-proxy records forget` (or any other program
/// using the store) may forget a record from another. While a [`ForgetFeed`] of the store
/// listens (a replay cache), the store reads the forget log every 100 ms and reports the forgets
/// logged since its last read, so another process's forget reaches this process's cache within
/// that time. The reaper deletes log rows older than ten minutes; a store that finds a hole in
/// `seq` (it did not read for that long) reports [`ForgetEvent::Unknown`].
///
/// [`ForgetEvent::Unknown`]: crate::store::ForgetEvent::Unknown
///
/// # Time
///
/// Deadlines are computed in SQL from SQLite's clock (`unixepoch('subsec')`, millisecond
/// precision): one process, one clock.
///
/// # Concurrency
///
/// The database is opened in WAL mode, so reads (`inspect`) never wait for the writer. `begin`
/// hands the call to the store's single writer task, which opens a `BEGIN IMMEDIATE`
/// transaction (taking SQLite's write lock up front, waiting up to the busy timeout) and inserts
/// the row with a new token, or takes over a row that is no longer live; a key with a live row
/// (a replay, a key in flight, a mismatch) is read in the same transaction and answered from.
/// Because SQLite admits one writer at a time, two concurrent `begin`s cannot both acquire.
/// `begin` used to read the key first outside the writer, so that replays needed no write lock;
/// that read cost every new key a hand-off to one of sqlx's connection threads, about a quarter
/// of its throughput, and replays are answered by the layer's replay cache after the first one
/// (measured side by side at 32 connections: new keys 3.4-3.8k against 4.5-4.8k req/s without
/// the read, replays with the cache off 17.7-19.9k against 13.2-14.1k).
///
/// **Group commit.** The writer runs every `begin` and `complete` queued while it was busy in
/// one transaction (the completes as one statement, the begins as one, later calls on a key of
/// the batch one by one after them, in queue order, so two calls on one key behave as if
/// sequential), and answers them only after `COMMIT`: one write lock and one fsync per batch.
/// A statement that fails rolls the whole batch back and fails every call of it. No timer: a
/// lone call finds the writer idle and runs at once. The sizes are in the
/// `idempotency_store_batch_size` histogram.
///
/// `complete`, `renew` and `release` are single statements conditional on the lease
/// (`WHERE key = ? AND token = ? AND response IS NULL`); when they change no row the call returns
/// [`StoreError::LeaseLost`]. After a successful `complete` or `release` the store wakes the
/// key's subscribers through its [`CompletionNotifier`].
///
/// # Reaper
///
/// A background task (every 60 s by default) deletes expired rows, at most a batch per statement
/// (so per write transaction), until a batch comes back short, and the forget log's rows older
/// than ten minutes; see [`SqliteStore::reap_expired`].
///
/// # Durability
///
/// sqlx's default `synchronous = FULL` is kept: a completed record survives a power loss as soon
/// as `complete` returns.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: SqlitePool,
    path: PathBuf,
    reaper_batch: u32,
    notifier: CompletionNotifier,
    /// The single writer of `begin` and `complete`, one transaction per batch (see
    /// `sqlite_batch`).
    writer: Batcher<Writer>,
    forgets: ForgetSender,
}

/// Configures and opens a [`SqliteStore`]; from [`SqliteStore::builder`] or
/// [`SqliteStore::from_pool`].
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `.connect().await`"]
pub struct SqliteStoreBuilder {
    source: Source,
    max_connections: Option<u32>,
    busy_timeout: Duration,
    reaper_interval: Duration,
    reaper_batch: u32,
    auto_migrate: bool,
}

/// Where the store's connections come from.
#[derive(Debug, Clone)]
enum Source {
    Url(String),
    /// The application's own pool, used as it is.
    Pool(SqlitePool),
}

impl SqliteStoreBuilder {
    /// The size of the connection pool (default: the number of cores, between 2 and 8). Reads
    /// run in parallel; writes take turns on SQLite's single write lock whatever the size.
    pub fn max_connections(mut self, max: u32) -> Self {
        self.max_connections = Some(max.max(1));
        self
    }

    /// How long a write waits for SQLite's write lock before failing (default 5 s).
    pub fn busy_timeout(mut self, timeout: Duration) -> Self {
        self.busy_timeout = timeout;
        self
    }

    /// How often the reaper deletes expired rows (default 60 s; zero disables it).
    pub fn reaper_interval(mut self, interval: Duration) -> Self {
        self.reaper_interval = interval;
        self
    }

    /// How many rows one reaper statement deletes at most (default 1000, at least 1): the
    /// longest the reaper holds the write lock is one such batch.
    pub fn reaper_batch(mut self, batch: u32) -> Self {
        self.reaper_batch = batch.max(1);
        self
    }

    /// Whether [`connect`](Self::connect) applies the migrations (default `true`). With `false`,
    /// call [`SqliteStore::migrate`] yourself before the first request.
    pub fn auto_migrate(mut self, auto_migrate: bool) -> Self {
        self.auto_migrate = auto_migrate;
        self
    }

    /// Opens the database (creating the file if missing) in WAL mode, or takes the pool given to
    /// [`SqliteStore::from_pool`]; applies the migrations unless
    /// [`auto_migrate(false)`](Self::auto_migrate); starts the reaper. Must be called inside a
    /// tokio runtime.
    pub async fn connect(self) -> Result<SqliteStore, StoreError> {
        let pool = match self.source {
            Source::Pool(pool) => pool,
            Source::Url(url) => {
                let options = SqliteConnectOptions::from_str(&url)
                    .map_err(StoreError::backend)?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    .busy_timeout(self.busy_timeout);
                let max_connections = self.max_connections.unwrap_or_else(|| {
                    let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
                    u32::try_from(cores.clamp(2, 8)).unwrap_or(8)
                });
                SqlitePoolOptions::new()
                    .max_connections(max_connections)
                    // A connection to a local file does not go stale as a network one can, and
                    // the ping that tests it is a hand-off to its thread on every acquire.
                    .test_before_acquire(false)
                    .connect_with(options)
                    .await
                    .map_err(StoreError::backend)?
            }
        };
        let path = pool.connect_options().get_filename().to_owned();
        if self.auto_migrate {
            migrate(&pool).await?;
        }
        // One writer: SQLite has one write lock. A batch waits at most the busy timeout for it.
        let writer = Batcher::spawn(
            Writer { pool: pool.clone() },
            "sqlite",
            "write",
            1,
            self.busy_timeout * 2,
        );
        let inner = Arc::new(Inner {
            writer,
            pool,
            path,
            reaper_batch: self.reaper_batch,
            notifier: CompletionNotifier::new(),
            forgets: ForgetSender::default(),
        });
        sql::spawn_reaper(Arc::downgrade(&inner), self.reaper_interval, "sqlite");
        // Where the forget log stands now: a forget logged later reaches this store's feeds.
        let last_forget = records::last_logged_forget(&inner.pool).await.ok();
        records::spawn_forget_log_reader(Arc::downgrade(&inner), last_forget);
        Ok(SqliteStore { inner })
    }
}

/// Applies `migrations/sqlite`.
pub(super) async fn migrate(pool: &SqlitePool) -> Result<(), StoreError> {
    let mut migrator = sqlx::migrate!("migrations/sqlite");
    migrator.dangerous_set_table_name(MIGRATIONS_TABLE);
    // A newer release may have applied migrations this one does not know (after a rollback):
    // they only ever add to the schema, so this release keeps working with it.
    migrator.set_ignore_missing(true);
    match migrator.run(pool).await {
        Ok(()) => Ok(()),
        // sqlx takes no lock around SQLite migrations: when two processes open a new file at
        // once, the slower one fails to record the version the faster one just applied. Looking
        // again then finds it applied.
        Err(first) => {
            tracing::debug!(error = %first, "sqlite migration failed; retrying once");
            migrator.run(pool).await.map_err(StoreError::backend)
        }
    }
}

impl SqliteStore {
    /// A builder for a store on `url`: `sqlite://path/to/file.db` (relative to the working
    /// directory) or `sqlite:///absolute/path.db`, with any option sqlx's
    /// [`SqliteConnectOptions`] parses.
    pub fn builder(url: impl Into<String>) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            source: Source::Url(url.into()),
            max_connections: None,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            reaper_interval: sql::DEFAULT_REAPER_INTERVAL,
            reaper_batch: sql::DEFAULT_REAPER_BATCH,
            auto_migrate: true,
        }
    }

    /// A builder for a store in the application's own pool (its tables may share the file: the
    /// store's are all named `idempotency_*`). The pool is used as it is, so
    /// [`max_connections`](SqliteStoreBuilder::max_connections) and
    /// [`busy_timeout`](SqliteStoreBuilder::busy_timeout) do not apply; open it in WAL mode with
    /// a busy timeout, as [`builder`](Self::builder) does, or writes wait on readers.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
    /// use tower_idempotency::SqliteStore;
    ///
    /// let pool = sqlx::SqlitePool::connect("sqlite://app.db").await?;
    /// let store = SqliteStore::from_pool(pool.clone()).connect().await?;
    /// # drop(store); Ok(()) }
    /// ```
    pub fn from_pool(pool: SqlitePool) -> SqliteStoreBuilder {
        SqliteStoreBuilder {
            source: Source::Pool(pool),
            ..Self::builder(String::new())
        }
    }

    /// Creates the tables or brings them up to date (sqlx bookkeeping in
    /// `idempotency_migrations`). Idempotent; [`SqliteStoreBuilder::connect`] calls it unless
    /// [`auto_migrate(false)`](SqliteStoreBuilder::auto_migrate) is set.
    pub async fn migrate(&self) -> Result<(), StoreError> {
        migrate(&self.inner.pool).await
    }

    /// Opens the store at `url` with every default; see [`SqliteStoreBuilder::connect`].
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder(url).connect().await
    }

    /// Deletes every expired row now, in batches of the configured size, then the forget log's
    /// rows older than ten minutes; returns how many records were deleted. The reaper task calls
    /// this every reaper interval (with the reaper off, the forget log is never pruned either).
    pub async fn reap_expired(&self) -> Result<u64, StoreError> {
        self.inner.reap_expired().await
    }

    /// Looks up the live row of `key` for the request `fingerprint`.
    pub(super) async fn lookup<'e>(
        executor: impl SqliteExecutor<'e>,
        key: &RecordKey,
        fingerprint: &Fingerprint,
    ) -> Result<Option<Begin>, StoreError> {
        let Some(row) = sqlx::query(LOOKUP)
            .bind(&key.as_bytes()[..])
            .bind(&fingerprint.as_bytes()[..])
            .fetch_optional(executor)
            .await
            .map_err(StoreError::backend)?
        else {
            return Ok(None);
        };
        let same_request: bool = row.try_get(0).map_err(StoreError::backend)?;
        let in_flight: bool = row.try_get(1).map_err(StoreError::backend)?;
        Ok(Some(match (same_request, in_flight) {
            (false, _) => Begin::Mismatch,
            (true, true) => Begin::InFlight,
            (true, false) => {
                let response: Vec<u8> = row.try_get(2).map_err(StoreError::backend)?;
                let expires_in_ms: i64 = row.try_get(3).map_err(StoreError::backend)?;
                Begin::Completed {
                    response: StoredResponse::decode(Bytes::from(response))?,
                    expires_in: sql::duration_from_millis(expires_in_ms),
                }
            }
        }))
    }
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("pool_size", &self.inner.pool.size())
            .field("reaper_batch", &self.inner.reaper_batch)
            .finish_non_exhaustive()
    }
}

impl Reap for Inner {
    async fn reap_expired(&self) -> Result<u64, StoreError> {
        let reaped = sql::reap_in_batches("sqlite", self.reaper_batch, || async {
            let deleted = sqlx::query(REAP)
                .bind(i64::from(self.reaper_batch))
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(deleted.rows_affected())
        })
        .await;
        // After the records, and never in their way: a log that cannot be pruned (its table
        // missing because migration 0003 was not applied) must not keep expired rows.
        if let Err(error) = sqlx::query(records::PRUNE_FORGET_LOG)
            .bind(records::FORGET_LOG_RETENTION_MS)
            .execute(&self.pool)
            .await
        {
            tracing::warn!(%error, "pruning the SQLite forget log failed");
        }
        reaped
    }
}

#[async_trait]
impl IdempotencyStore for SqliteStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        // Under the write lock, in a transaction shared with the writes queued meanwhile; a live
        // row (a replay, a key in flight, a mismatch) is read there and answered from. No read
        // first: it was a hand-off to a pool thread for every new key (see the type's docs).
        let written = self
            .inner
            .writer
            .call(WriteCall::Begin {
                key: *key.as_bytes(),
                fingerprint: *fingerprint.as_bytes(),
                ttl_millis: sql::millis(lock_ttl),
            })
            .await?;
        match written {
            Written::Begin(begun) => Ok(begun),
            Written::Complete(_) => Err(StoreError::backend("the writer answered a begin wrongly")),
        }
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = sql::token_column(token)?;
        let written = self
            .inner
            .writer
            .call(WriteCall::Complete {
                key: *key.as_bytes(),
                token,
                response: response.encode().to_vec(),
                ttl_millis: sql::millis(ttl),
            })
            .await?;
        if !matches!(written, Written::Complete(true)) {
            return Err(StoreError::LeaseLost);
        }
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        let token = sql::token_column(token)?;
        let stored = sqlx::query(CHECKPOINT)
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(checkpoint.name())
            .bind(&checkpoint.data()[..])
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        sql::fenced(stored.rows_affected())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        let token = sql::token_column(token)?;
        let released = sqlx::query(RELEASE)
            .bind(&key.as_bytes()[..])
            .bind(token)
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        sql::fenced(released.rows_affected())?;
        self.inner.notifier.notify(key);
        Ok(())
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        let token = sql::token_column(token)?;
        let renewed = sqlx::query(RENEW)
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(sql::millis(lock_ttl))
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        sql::fenced(renewed.rows_affected())
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

    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1")
            .execute(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        Ok(())
    }
}

#[path = "sqlite_records.rs"]
mod records;
