//! Inspecting and forgetting records of the SQLite store (see
//! [`IdempotencyStore::inspect`](crate::IdempotencyStore::inspect)), and hearing of forgets made
//! by other processes through the forget log (`migrations/sqlite/0003_forget_log.sql`).

use std::sync::Weak;
use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::SqlitePool;

use super::{Inner, SqliteStore};
use crate::scope::RecordKey;
use crate::store::{ForgetSender, Forgotten, RecordInfo, StoreError, sql, unix_millis};

const INSPECT: &str = concat!(
    "SELECT fingerprint, token, response, expires_at, attempt, checkpoint_name ",
    "FROM idempotency_records WHERE key = ?1 AND expires_at > ",
    now_ms!()
);
/// One statement, so that a lease acquired or completed in between cannot be deleted by mistake.
const FORGET: &str = concat!(
    "DELETE FROM idempotency_records WHERE key = ?1 AND expires_at > ",
    now_ms!(),
    " AND (response IS NOT NULL OR ?2) RETURNING token, response IS NULL, attempt"
);

/// How often a process reads the forget log while one of its feeds listens: the longest a forget
/// made by another process goes unheard by this one's replay cache.
pub(super) const FORGET_LOG_POLL: Duration = Duration::from_millis(100);
/// How long the reaper keeps a logged forget. A process that has not read the log for this long
/// finds a hole in it and treats every cached record as possibly forgotten.
pub(super) const FORGET_LOG_RETENTION_MS: i64 = 10 * 60 * 1000;
/// Most log rows read by one statement.
const FORGET_LOG_READ: i64 = 512;

/// The `seq` of the last forget ever logged (0: none). `sqlite_sequence` keeps it when the reaper
/// has emptied the table; the table itself is named too, so that the statement fails when the
/// log does not exist (`sqlite_sequence` may exist for another table of the file).
const LAST_FORGET: &str = "SELECT max(\
     COALESCE((SELECT seq FROM sqlite_sequence WHERE name = 'idempotency_forgets'), 0), \
     (SELECT COALESCE(max(seq), 0) FROM idempotency_forgets))";
const FORGETS_AFTER: &str =
    "SELECT seq, key FROM idempotency_forgets WHERE seq > ?1 ORDER BY seq LIMIT ?2";
/// Deletes the forgets logged more than `?1` milliseconds ago.
pub(super) const PRUNE_FORGET_LOG: &str = concat!(
    "DELETE FROM idempotency_forgets WHERE forgotten_at < ",
    now_ms!(),
    " - ?1"
);

/// The `seq` of the last logged forget; an error when the log does not exist (a store opened with
/// `auto_migrate(false)` whose migrations did not run, or ran only up to `0002`).
pub(super) async fn last_logged_forget(pool: &SqlitePool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(LAST_FORGET).fetch_one(pool).await
}

/// Reads the forget log every [`FORGET_LOG_POLL`] while a feed of the store listens, and tells the
/// feeds what other processes forgot (this process's own forgets are told at once by
/// `forget_record`, and once more from the log: a cache drops a key twice). Stops when the store
/// is dropped. `last_seen` is where the log stood when the store opened; `None` (unknown) makes
/// the first read report [`ForgetEvent::Unknown`](crate::store::ForgetEvent::Unknown).
///
/// A read that fails also reports `Unknown`: while the log cannot be read (its table missing, the
/// file unreadable) a forget by another process could go unheard, so nothing stays cached.
pub(super) fn spawn_forget_log_reader(store: Weak<Inner>, mut last_seen: Option<i64>) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(FORGET_LOG_POLL);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            ticker.tick().await;
            // The store is not kept alive across the read: dropping it stops this task.
            let Some((pool, forgets)) = store
                .upgrade()
                .filter(|inner| inner.forgets.is_heard())
                .map(|inner| (inner.pool.clone(), inner.forgets.clone()))
            else {
                if store.strong_count() == 0 {
                    return;
                }
                continue;
            };
            match read_forget_log(&pool, last_seen, &forgets).await {
                Ok(seen) => {
                    last_seen = Some(seen);
                    failing = false;
                }
                Err(error) => {
                    forgets.unknown();
                    if !failing {
                        failing = true;
                        tracing::warn!(
                            %error,
                            "reading the SQLite forget log failed; the replay cache keeps nothing \
                             until it can be read (apply the migrations if the table is missing)"
                        );
                    }
                }
            }
        }
    });
}

/// Tells `forgets` of every logged forget after `last_seen`; returns the last `seq` read.
async fn read_forget_log(
    pool: &SqlitePool,
    last_seen: Option<i64>,
    forgets: &ForgetSender,
) -> Result<i64, sqlx::Error> {
    let latest = last_logged_forget(pool).await?;
    let Some(mut last) = last_seen else {
        forgets.unknown();
        return Ok(latest);
    };
    while last < latest {
        let rows: Vec<(i64, Vec<u8>)> = sqlx::query_as(FORGETS_AFTER)
            .bind(last)
            .bind(FORGET_LOG_READ)
            .fetch_all(pool)
            .await?;
        if rows.is_empty() {
            // Logged after `last` and already reaped: what they were is lost.
            forgets.unknown();
            return Ok(latest);
        }
        for (seq, key) in rows {
            match <[u8; 32]>::try_from(key.as_slice()) {
                Ok(key) if seq == last + 1 => forgets.forgot(&RecordKey::from_bytes(key)),
                // A hole (reaped before we read it) or a row we cannot read.
                _ => forgets.unknown(),
            }
            last = seq;
        }
    }
    Ok(last)
}

impl SqliteStore {
    pub(super) async fn inspect_record(
        &self,
        key: &RecordKey,
    ) -> Result<Option<RecordInfo>, StoreError> {
        let row = sqlx::query(INSPECT)
            .bind(&key.as_bytes()[..])
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        let Some(row) = row else { return Ok(None) };
        let expires_at = unix_millis(row.try_get(3).map_err(StoreError::backend)?);
        sql::record_from_row(&row, expires_at).map(Some)
    }

    pub(super) async fn forget_record(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> Result<Forgotten, StoreError> {
        let deleted = sqlx::query(FORGET)
            .bind(&key.as_bytes()[..])
            .bind(force)
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        let forgotten = sql::forgotten(deleted, self.inspect_record(key)).await?;
        if forgotten.deleted() {
            self.inner.notifier.notify(key);
            self.inner.forgets.forgot(key);
        }
        Ok(forgotten)
    }
}
