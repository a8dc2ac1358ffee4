//! Inspecting and forgetting records of the PostgreSQL store, and announcing forgets to every
//! process sharing the table (see [`IdempotencyStore::forget`](crate::IdempotencyStore::forget)).

use std::sync::Arc;

use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlStr};

use super::PostgresStore;
use crate::scope::RecordKey;
use crate::store::{Forgotten, RecordInfo, StoreError, sql, unix_micros};

/// Notifications whose payload starts with this announce a forget; the rest of the payload is
/// the record key in hex. Completions and releases carry the bare hex key, so listeners of
/// earlier versions ignore forgets (their payload is not a key) rather than misread them.
pub(super) const FORGET_PREFIX: &str = "forget:";

/// The statements, with the table name filled in once at connect time.
pub(super) struct RecordStatements {
    inspect: SqlStr,
    forget: SqlStr,
}

impl RecordStatements {
    pub(super) fn new(schema: &str, table: &str) -> Self {
        // Safe to interpolate: both names passed `sql::validate_identifier`.
        let t = format!("\"{schema}\".\"{table}\"");
        let sql = |text: String| AssertSqlSafe(Arc::<str>::from(text)).into_sql_str();
        Self {
            inspect: sql(format!(
                "SELECT fingerprint, token, response, \
                        (extract(epoch FROM expires_at) * 1000000)::bigint, \
                        attempt::bigint, checkpoint_name \
                 FROM {t} WHERE key = $1 AND expires_at > now()"
            )),
            // One statement: the row deleted is the one checked, and every process listening on
            // the channel hears of it when (and only if) the delete commits.
            forget: sql(format!(
                "WITH forgotten AS ( \
                     DELETE FROM {t} \
                     WHERE key = $1 AND expires_at > now() AND (response IS NOT NULL OR $2) \
                     RETURNING token, response IS NULL AS in_flight, attempt::bigint AS attempt \
                 ) \
                 SELECT token, in_flight, attempt, (SELECT 1 FROM pg_notify($3, $4)) \
                 FROM forgotten"
            )),
        }
    }
}

impl PostgresStore {
    pub(super) async fn inspect_record(
        &self,
        key: &RecordKey,
    ) -> Result<Option<RecordInfo>, StoreError> {
        let row = sqlx::query(self.inner.records.inspect.clone())
            .bind(&key.as_bytes()[..])
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        let Some(row) = row else { return Ok(None) };
        let expires_us: i64 = row.try_get(3).map_err(StoreError::backend)?;
        let expires_at = unix_micros(u64::try_from(expires_us).unwrap_or(0));
        sql::record_from_row(&row, expires_at).map(Some)
    }

    pub(super) async fn forget_record(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> Result<Forgotten, StoreError> {
        let deleted = sqlx::query(self.inner.records.forget.clone())
            .bind(&key.as_bytes()[..])
            .bind(force)
            .bind(&self.inner.channel)
            .bind(format!("{FORGET_PREFIX}{}", key.to_hex()))
            .fetch_optional(&self.inner.pool)
            .await
            .map_err(StoreError::backend)?;
        let forgotten = sql::forgotten(deleted, self.inspect_record(key)).await?;
        if forgotten.deleted() {
            // This process need not wait for its own notification to come back.
            self.inner.notifier.notify(key);
            self.inner.forgets.forgot(key);
        }
        Ok(forgotten)
    }
}
