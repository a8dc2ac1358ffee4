//! The SQL texts of the store's single-request statements, built once per table at connect
//! time, and the reading of `begin`'s result row (shared with group commit, `batch`).

use std::sync::Arc;

use bytes::Bytes;
use sqlx::postgres::PgRow;
use sqlx::{AssertSqlSafe, Row, SqlSafeStr, SqlStr};

use crate::record::StoredResponse;
use crate::store::{Begin, LeaseToken, StoreError, sql};

/// How many times `begin` runs its statement when it keeps losing the race described in the
/// `PostgresStore` docs. Each lost race means another request committed the key in between,
/// after which the next attempt sees that row; needing more than two is already unusual.
pub(super) const MAX_BEGIN_ATTEMPTS: usize = 8;

/// The statements, with the table name filled in once at connect time. sqlx prepares each one
/// once per connection and caches it, keyed by this text.
pub(super) struct Statements {
    /// The table, `"schema"."table"`, as every statement names it.
    pub(super) table: String,
    pub(super) begin: SqlStr,
    pub(super) complete: SqlStr,
    pub(super) checkpoint: SqlStr,
    pub(super) renew: SqlStr,
    pub(super) release: SqlStr,
    pub(super) watch: SqlStr,
    pub(super) reap: SqlStr,
}

impl Statements {
    pub(super) fn new(schema: &str, table: &str) -> Self {
        // Safe to interpolate: both names passed `sql::validate_identifier`.
        let t = format!("\"{schema}\".\"{table}\"");
        let sql = |text: String| AssertSqlSafe(Arc::<str>::from(text)).into_sql_str();
        // The row taken over is a lapsed lease of the same request: the new lease is its next
        // attempt and inherits its recovery point.
        let same_run = "r.response IS NULL AND r.fingerprint = excluded.fingerprint";
        Self {
            table: t.clone(),
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
                     ORDER BY expires_at LIMIT $1 FOR UPDATE SKIP LOCKED))"
            )),
        }
    }
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
