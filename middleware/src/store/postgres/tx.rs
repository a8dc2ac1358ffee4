//! The record's fencing check and completion inside the application's own transaction.
//!
//! A handler whose effects live in the PostgreSQL database that holds the records commits them
//! together with its recovery point ([`PostgresStore::checkpoint_in`]) or with the stored
//! response ([`PostgresStore::complete_in`]): both or neither. Each statement is conditional on
//! the lease (`key`, `token`, still in flight), like the store's own, and takes the record row's
//! lock until the transaction ends, so a takeover waits for the transaction and then sees its
//! outcome; a holder whose lease was taken over changes nothing and gets
//! [`StoreError::LeaseLost`], and its transaction must roll back (drop it, or `?`).

use std::sync::Arc;

use bytes::Bytes;
use sqlx::{AssertSqlSafe, Connection, PgConnection, SqlSafeStr, SqlStr};

use super::PostgresStore;
use crate::lease::{Checkpoint, CheckpointError, CompletedByHandler, Lease};
use crate::record::StoredResponse;
use crate::store::{StoreError, sql};

impl PostgresStore {
    /// Completes the record of `lease` inside the caller's transaction, storing `response`
    /// for the lease's [`ttl`](Lease::ttl), and returns the response marked
    /// [`CompletedByHandler`] so the layer does not store it a second time.
    ///
    /// `conn` must be in a transaction (`&mut tx` for a `sqlx::Transaction<'_, Postgres>` from
    /// `pool.begin()`) on the database that holds this store's table: the stored response then
    /// commits with the transaction's other writes, or rolls back with them. The statement is
    /// the record's fencing check: it changes the row only while `lease` still holds it, and
    /// locks it until the transaction ends (a takeover waits, then replays the committed
    /// response, or takes over a transaction that rolled back). Errors:
    ///
    /// * [`StoreError::LeaseLost`]: a newer run of the request took the lease over (this one
    ///   stalled past `lock_ttl`), or it was already completed. Roll back: the newer run's
    ///   effects are the ones that count.
    /// * [`StoreError::Backend`]: `conn` is not in a transaction (nothing was written), or the
    ///   database failed; the transaction is then aborted and must be rolled back.
    ///
    /// If the commit itself fails, answer the request with a `5xx` (or return an error): the
    /// layer then releases the lease, a release that is itself fenced by `response IS NULL`, so
    /// a commit that did land keeps its record and the retry replays it, and one that did not
    /// leaves the key free for the retry.
    ///
    /// The response is stored as given (status, end-to-end headers, body), whatever its status:
    /// layers between the idempotency layer and the handler that rewrite responses would make
    /// replays differ from the first answer. In READ COMMITTED (PostgreSQL's default) the check
    /// sees the newest row version; at REPEATABLE READ or SERIALIZABLE, a lease renewal that
    /// committed after the transaction's snapshot makes it fail with a serialization error
    /// (retry the transaction).
    ///
    /// ```no_run
    /// # async fn run(pool: sqlx::PgPool, store: tower_idempotency::PostgresStore,
    /// #     lease: tower_idempotency::Lease) -> Result<(), Box<dyn std::error::Error>> {
    /// let mut tx = pool.begin().await?;
    /// sqlx::query("INSERT INTO receipts (ride) VALUES ($1)").bind(17_i64).execute(&mut *tx).await?;
    /// let response = http::Response::builder()
    ///     .status(201)
    ///     .header("content-type", "application/json")
    ///     .body(r#"{"receipt": 1}"#)?;
    /// // In an axum handler, ask for an `axum::response::Response`: any body type `From<Bytes>`.
    /// let marked: http::Response<bytes::Bytes> = store.complete_in(&mut tx, &lease, response).await?;
    /// tx.commit().await?; // the receipt and the stored response, or neither
    /// # drop(marked); Ok(()) }
    /// ```
    pub async fn complete_in<B: From<Bytes>>(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        response: http::Response<impl Into<Bytes>>,
    ) -> Result<http::Response<B>, StoreError> {
        in_transaction(conn, "complete_in")?;
        let (mut parts, body) = response.into_parts();
        let body: Bytes = body.into();
        let stored = StoredResponse::new(parts.status, parts.headers.clone(), body.clone());
        let token = sql::token_column(lease.token())?;
        let completed = sqlx::query(self.statement(COMPLETE))
            .bind(&lease.key().as_bytes()[..])
            .bind(token)
            .bind(&stored.encode()[..])
            .bind(sql::micros(lease.ttl()))
            .bind(self.channel())
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        if completed.is_none() {
            return Err(StoreError::LeaseLost);
        }
        parts.extensions.insert(CompletedByHandler::new(
            *lease.key(),
            lease.token(),
            Some(self.notifier().clone()),
        ));
        Ok(http::Response::from_parts(parts, B::from(body)))
    }

    /// Stores a recovery point for `lease` inside the caller's transaction: the checkpoint
    /// commits with the transaction's effect rows, or neither does (an atomic phase, in the
    /// rocket-rides sense). Fenced and locking like [`complete_in`](Self::complete_in): a
    /// holder whose lease was taken over gets an error for which
    /// [`CheckpointError::is_lease_lost`] is true, and must roll back.
    pub async fn checkpoint_in(
        &self,
        conn: &mut PgConnection,
        lease: &Lease,
        name: impl Into<String>,
        data: impl Into<Bytes>,
    ) -> Result<(), CheckpointError> {
        let checkpoint = Checkpoint::new(name, data)?;
        in_transaction(conn, "checkpoint_in")?;
        let token = sql::token_column(lease.token())?;
        let stored = sqlx::query(self.statement(CHECKPOINT))
            .bind(&lease.key().as_bytes()[..])
            .bind(token)
            .bind(checkpoint.name())
            .bind(&checkpoint.data()[..])
            .execute(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        sql::fenced(stored.rows_affected())?;
        Ok(())
    }

    /// Checks, inside the caller's transaction, that `lease` still holds its record, and locks
    /// the record row until the transaction ends: from here on a takeover waits for this
    /// transaction. Call it first to learn of a lost lease before doing the transaction's work;
    /// [`StoreError::LeaseLost`] means a newer run holds the request.
    pub async fn fence_in(&self, conn: &mut PgConnection, lease: &Lease) -> Result<(), StoreError> {
        in_transaction(conn, "fence_in")?;
        let token = sql::token_column(lease.token())?;
        let held = sqlx::query(self.statement(FENCE))
            .bind(&lease.key().as_bytes()[..])
            .bind(token)
            .fetch_optional(&mut *conn)
            .await
            .map_err(StoreError::backend)?;
        held.map(|_| ()).ok_or(StoreError::LeaseLost)
    }

    /// One of the statements below with this store's table filled in. sqlx prepares and caches
    /// it per connection by its text, so building the text per call costs no round trip.
    fn statement(&self, template: &str) -> SqlStr {
        // Safe to interpolate: both names passed `sql::validate_identifier` at connect.
        let table = format!("\"{}\".\"{}\"", self.schema(), self.table());
        AssertSqlSafe(Arc::<str>::from(template.replace("{t}", &table))).into_sql_str()
    }
}

/// Like the store's own `complete`, with `statement_timestamp()` for `now()`: inside a
/// transaction `now()` is the time the transaction began.
const COMPLETE: &str = "WITH completed AS ( \
         UPDATE {t} \
         SET response = $3, expires_at = statement_timestamp() + $4 * interval '1 microsecond' \
         WHERE key = $1 AND token = $2 AND response IS NULL \
         RETURNING key, watched \
     ) \
     SELECT CASE WHEN watched \
                 THEN (SELECT 1 FROM pg_notify($5, encode(completed.key, 'hex'))) \
                 ELSE 1 END \
     FROM completed";

const CHECKPOINT: &str = "UPDATE {t} SET checkpoint_name = $3, checkpoint_data = $4 \
     WHERE key = $1 AND token = $2 AND response IS NULL";

const FENCE: &str = "SELECT 1 FROM {t} \
     WHERE key = $1 AND token = $2 AND response IS NULL FOR UPDATE";

/// Refuses a connection outside a transaction: the statement would commit on its own, and the
/// promise (effects and record together) would silently not hold.
fn in_transaction(conn: &PgConnection, what: &str) -> Result<(), StoreError> {
    if conn.is_in_transaction() {
        Ok(())
    } else {
        Err(StoreError::backend(format!(
            "PostgresStore::{what} needs a connection in a transaction (`pool.begin()`), so that \
             the record commits with the transaction's effects; nothing was written"
        )))
    }
}
