//! The PostgreSQL store: one table shared by a fleet of processes.
//!
//! Everything about it (table layout, statements, concurrency) is documented on [`PostgresStore`].
//! This module holds the store, its accessors and its [`IdempotencyStore`] implementation; the
//! submodules hold the builder and connecting (`builder`), the SQL texts of the store's own
//! statements (`statements`), the migrations (`migrate`), the `LISTEN`ing connection
//! (`listener`), group commit (`batch`), inspect and forget (`records`) and the calls inside the
//! application's transaction (`tx`).

mod batch;
mod builder;
mod listener;
mod migrate;
mod records;
mod replan;
mod statements;
mod tx;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use self::batch::{BeginCall, CompleteCall};
use self::statements::Statements;
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::RecordKey;
use crate::store::batch::Batcher;
use crate::store::sql::{self, Reap};
use crate::store::{
    Begin, CompletionNotifier, ForgetFeed, ForgetSender, Forgotten, IdempotencyStore, LeaseToken,
    RecordInfo, StoreError, Subscription,
};

pub use builder::PostgresStoreBuilder;

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
/// `postgres/batch.rs`). There is no timer: a lone call runs the single-request statement above at
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
///     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))
/// ```
///
/// (`ORDER BY` makes the plan walk the `expires_at` index at any table size: without statistics,
/// PostgreSQL guesses that a third of the rows have expired and reads the table from the start,
/// all of it when none has.)
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
///
/// [`Migration`]: sqlx::migrate::Migration
/// [`Migrator`]: sqlx::migrate::Migrator
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
    /// The batch statements' plan generation, which a reaper pass renews when the table has
    /// doubled (see `replan`).
    replan: Arc<replan::Replan>,
    notifier: CompletionNotifier,
    /// Group commit of `begin` and `complete` (see `batch`).
    begins: Batcher<batch::Begins>,
    completes: Batcher<batch::Completes>,
    forgets: ForgetSender,
    records: records::RecordStatements,
    // Dropped with the last clone of the store, which stops the listener task.
    _stop_listener: oneshot::Sender<()>,
}

impl PostgresStore {
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
    fn notifier(&self) -> &CompletionNotifier {
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
        // The table's size, for the batch statements' plans (see `replan`): an error here
        // leaves them as they are, it does not fail the pass.
        let size: Result<i64, _> = sqlx::query_scalar("SELECT pg_relation_size($1::regclass)")
            .bind(&self.statements.table)
            .fetch_one(&self.pool)
            .await;
        match size {
            Ok(bytes) => self.replan.table_is(u64::try_from(bytes).unwrap_or(0)),
            Err(error) => tracing::debug!(%error, "reading the records table's size failed"),
        }
        sql::reap_in_batches("postgres", self.reaper_batch, || async {
            // Planned with the table as it is on every pass (an unnamed statement: a pass runs
            // once a reaper interval, so planning costs nothing that shows). A plan cached
            // while the table was small deletes through a sequential scan of the whole table.
            let deleted = sqlx::query(self.statements.reap.clone())
                .persistent(false)
                .bind(i64::from(self.reaper_batch))
                .execute(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            Ok(deleted.rows_affected())
        })
        .await
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
        // Merged with concurrent begins into one statement (see `batch`), which also runs
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
        let token = sql::token_column(token)?;
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
        let token = sql::token_column(token)?;
        let stored = sqlx::query(self.inner.statements.checkpoint.clone())
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
        let token = sql::token_column(token)?;
        let renewed = sqlx::query(self.inner.statements.renew.clone())
            .bind(&key.as_bytes()[..])
            .bind(token)
            .bind(sql::micros(lock_ttl))
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
