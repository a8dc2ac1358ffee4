//! Group commit for [`SqliteStore`]: one writer task runs the writes that
//! arrive while it is busy in one `BEGIN IMMEDIATE` transaction, so one write lock and one fsync
//! (`synchronous = FULL`) serve the whole batch.
//!
//! The calls run one after the other inside the transaction, in queue order, each with the
//! statements of the single-request path: a second `begin` on a key sees the first one's row,
//! exactly as if the calls had been sequential. Nothing is answered before `COMMIT` returns; a
//! statement that fails (other than a stored record that cannot be decoded, which is that call's
//! answer) rolls the transaction back and fails every call of the batch.

use sqlx::sqlite::SqlitePool;

use super::batch::Execute;
use super::sqlite::{ACQUIRE, COMPLETE, NEXT_TOKEN, SqliteStore};
use super::{Begin, LeaseToken, StoreError, sql};

/// A write the writer task runs.
pub(super) enum WriteCall {
    /// A `begin` whose lookup found no live row: acquire it, unless a write since did.
    Begin {
        key: [u8; 32],
        fingerprint: [u8; 32],
        ttl_millis: i64,
    },
    /// A `complete`, conditional on its lease.
    Complete {
        key: [u8; 32],
        token: i64,
        response: Vec<u8>,
        ttl_millis: i64,
    },
}

/// The answer to a [`WriteCall`].
pub(super) enum Written {
    Begin(Begin),
    /// Whether the lease completed the record.
    Complete(bool),
}

/// The single writer.
pub(super) struct Writer {
    pub pool: SqlitePool,
}

impl Execute for Writer {
    type Request = WriteCall;
    type Response = Written;

    /// Calls on one key may share a batch: they run in order inside the transaction.
    fn record_key(_: &WriteCall) -> Option<[u8; 32]> {
        None
    }

    async fn execute(
        &self,
        batch: Vec<WriteCall>,
    ) -> Result<Vec<Result<Written, StoreError>>, StoreError> {
        let mut tx = self
            .pool
            .begin_with("BEGIN IMMEDIATE")
            .await
            .map_err(StoreError::backend)?;
        let mut answers = Vec::with_capacity(batch.len());
        // Any `?` below drops `tx`, which rolls the whole batch back.
        for call in batch {
            match call {
                WriteCall::Begin {
                    key,
                    fingerprint,
                    ttl_millis,
                } => {
                    let record = crate::scope::RecordKey::from_bytes(key);
                    let request = crate::fingerprint::Fingerprint::from_bytes(fingerprint);
                    // Another call (in this batch or before it) may have acquired the key.
                    match SqliteStore::lookup(&mut *tx, &record, &request).await {
                        Ok(Some(found)) => {
                            answers.push(Ok(Written::Begin(found)));
                            continue;
                        }
                        Ok(None) => {}
                        Err(error @ StoreError::Corrupt(_)) => {
                            answers.push(Err(error));
                            continue;
                        }
                        Err(error) => return Err(error),
                    }
                    let token: i64 = sqlx::query_scalar(NEXT_TOKEN)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StoreError::backend)?;
                    let row = sqlx::query(ACQUIRE)
                        .bind(&key[..])
                        .bind(&fingerprint[..])
                        .bind(token)
                        .bind(ttl_millis)
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(StoreError::backend)?;
                    answers.push(acquired(&row, token));
                }
                WriteCall::Complete {
                    key,
                    token,
                    response,
                    ttl_millis,
                } => {
                    let completed = sqlx::query(COMPLETE)
                        .bind(&key[..])
                        .bind(token)
                        .bind(&response[..])
                        .bind(ttl_millis)
                        .execute(&mut *tx)
                        .await
                        .map_err(StoreError::backend)?;
                    answers.push(Ok(Written::Complete(completed.rows_affected() > 0)));
                }
            }
        }
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(answers)
    }
}

/// The lease `ACQUIRE` returned in `row` under `token`.
fn acquired(row: &sqlx::sqlite::SqliteRow, token: i64) -> Result<Written, StoreError> {
    let (attempt, recovery_point) = sql::run_from_row(row, 0)?;
    Ok(Written::Begin(Begin::Acquired {
        token: LeaseToken(sql::token_from_column(token)?),
        attempt,
        recovery_point,
    }))
}
