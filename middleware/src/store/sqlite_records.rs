//! Inspecting and forgetting records of the SQLite store (see
//! [`IdempotencyStore::inspect`](crate::IdempotencyStore::inspect)).

use sqlx::Row;

use super::SqliteStore;
use crate::scope::RecordKey;
use crate::store::{Forgotten, RecordInfo, StoreError, sql, unix_millis};

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
