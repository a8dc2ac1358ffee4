//! Inspecting and forgetting records of the SQLite store (see
//! [`IdempotencyStore::inspect`](crate::IdempotencyStore::inspect)).

use bytes::Bytes;
use sqlx::Row;

use super::SqliteStore;
use crate::fingerprint::Fingerprint;
use crate::scope::RecordKey;
use crate::store::{Forgotten, LeaseToken, RecordInfo, RecordState, StoreError, sql, unix_millis};

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
        let fingerprint: Vec<u8> = row.try_get(0).map_err(StoreError::backend)?;
        let fingerprint = <[u8; 32]>::try_from(fingerprint)
            .map(Fingerprint::from_bytes)
            .map_err(|_| StoreError::backend("stored fingerprint is not 32 bytes"))?;
        let token: i64 = row.try_get(1).map_err(StoreError::backend)?;
        let response: Option<Vec<u8>> = row.try_get(2).map_err(StoreError::backend)?;
        let expires_at = unix_millis(row.try_get(3).map_err(StoreError::backend)?);
        let attempt: i64 = row.try_get(4).map_err(StoreError::backend)?;
        let checkpoint: Option<String> = row.try_get(5).map_err(StoreError::backend)?;
        match response {
            Some(response) => {
                RecordInfo::completed(fingerprint, expires_at, Bytes::from(response)).map(Some)
            }
            None => Ok(Some(RecordInfo::new(
                fingerprint,
                expires_at,
                RecordState::InFlight {
                    token: LeaseToken(sql::token_from_column(token)?),
                    attempt: u32::try_from(attempt.max(1)).unwrap_or(u32::MAX),
                    checkpoint,
                },
            ))),
        }
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
        let forgotten = match deleted {
            Some(row) => {
                let token: i64 = row.try_get(0).map_err(StoreError::backend)?;
                let in_flight: bool = row.try_get(1).map_err(StoreError::backend)?;
                let attempt: i64 = row.try_get(2).map_err(StoreError::backend)?;
                if in_flight {
                    Forgotten::LeaseEnded {
                        token: LeaseToken(sql::token_from_column(token)?),
                        attempt: u32::try_from(attempt.max(1)).unwrap_or(u32::MAX),
                    }
                } else {
                    Forgotten::Completed
                }
            }
            // Nothing deleted: either nothing is live, or a lease holds the key and no force.
            None => match self.inspect_record(key).await? {
                Some(RecordInfo {
                    state: RecordState::InFlight { token, attempt, .. },
                    ..
                }) => Forgotten::InFlight { token, attempt },
                _ => Forgotten::NotFound,
            },
        };
        if forgotten.deleted() {
            self.inner.notifier.notify(key);
            self.inner.forgets.forgot(key);
        }
        Ok(forgotten)
    }
}
