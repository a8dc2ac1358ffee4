//! Group commit for [`SqliteStore`]: one writer task runs the writes that arrive while it is
//! busy in one `BEGIN IMMEDIATE` transaction, so one write lock and one fsync
//! (`synchronous = FULL`) serve the whole batch.
//!
//! Inside the transaction the batch's `complete`s run as one `UPDATE ... FROM (VALUES ...)` and
//! its `begin`s as one many-row `INSERT ... ON CONFLICT DO UPDATE`: each statement is one hand-off
//! to sqlx's connection thread, which is what a SQLite write costs most (a batch of 16 new keys
//! took some 70 hand-offs when every call ran its own statements, and now takes five). A later
//! call on a key already in the batch, and a `begin` whose key has a live row (held by another
//! request, or completed: a replay), run the single-request statements after them, one by one in queue order, so two calls on one key
//! behave as if sequential. The calls of one batch were all waiting at once, so running the
//! completes before the begins is an order they could have had.
//!
//! Nothing is answered before `COMMIT` returns; a statement that fails (other than a stored
//! record that cannot be decoded, which is that call's answer) rolls the transaction back and
//! fails every call of the batch.

use std::collections::HashSet;
use std::fmt::Write as _;

use sqlx::sqlite::{SqliteConnection, SqlitePool, SqliteRow};
use sqlx::{AssertSqlSafe, Row};

use super::batch::Execute;
use super::sqlite::{
    ACQUIRE, COMPLETE, SqliteStore, TAKE_TOKENS, now_ms, on_conflict_take_over, same_run,
};
use super::{Begin, LeaseToken, StoreError, sql};
use crate::fingerprint::Fingerprint;
use crate::scope::RecordKey;

/// A write the writer task runs.
pub(super) enum WriteCall {
    /// A `begin`: acquires the key, or is answered from its live row (a replay, a key in flight,
    /// a mismatch), read in the writer's transaction.
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

impl WriteCall {
    fn key(&self) -> [u8; 32] {
        match self {
            Self::Begin { key, .. } | Self::Complete { key, .. } => *key,
        }
    }
}

/// The answer to a [`WriteCall`].
pub(super) enum Written {
    Begin(Begin),
    /// Whether the lease completed the record.
    Complete(bool),
}

type Answers = Vec<Option<Result<Written, StoreError>>>;

/// Many-row statements of up to this many rows stay prepared on their connection (sqlx's
/// statement cache); larger ones, rarer and each prepared for many calls, are prepared afresh.
const PREPARED_UP_TO: usize = 8;

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
        let mut answers: Answers = batch.iter().map(|_| None).collect();
        // The first call on each key goes into the many-row statements; the others follow.
        let mut seen = HashSet::with_capacity(batch.len());
        let (mut completes, mut begins, mut repeats) = (Vec::new(), Vec::new(), Vec::new());
        for (at, call) in batch.iter().enumerate() {
            match call {
                _ if !seen.insert(call.key()) => repeats.push(at),
                WriteCall::Complete { .. } => completes.push(at),
                WriteCall::Begin { .. } => begins.push(at),
            }
        }
        // Any `?` below drops `tx`, which rolls the whole batch back.
        complete_all(&mut tx, &batch, &completes, &mut answers).await?;
        let held = acquire_all(&mut tx, &batch, &begins, &mut answers).await?;
        for at in held.into_iter().chain(repeats) {
            answers[at] = Some(run_one(&mut tx, &batch[at]).await?);
        }
        tx.commit().await.map_err(StoreError::backend)?;
        Ok(answers
            .into_iter()
            .map(|answer| {
                answer
                    .unwrap_or_else(|| Err(StoreError::backend("a batched write went unanswered")))
            })
            .collect())
    }
}

/// Completes the calls at `at` (distinct keys) in one statement.
async fn complete_all(
    conn: &mut SqliteConnection,
    batch: &[WriteCall],
    at: &[usize],
    answers: &mut Answers,
) -> Result<(), StoreError> {
    if at.is_empty() {
        return Ok(());
    }
    let mut statement =
        String::from("UPDATE idempotency_records SET response = v.column3, expires_at = ");
    statement.push_str(now_ms!());
    statement.push_str(" + v.column4 FROM (VALUES ");
    push_tuples(&mut statement, at.len(), "(?, ?, ?, ?)");
    statement.push_str(
        ") AS v WHERE idempotency_records.key = v.column1 \
         AND idempotency_records.token = v.column2 AND idempotency_records.response IS NULL \
         RETURNING key",
    );
    let mut query = sqlx::query(AssertSqlSafe(statement)).persistent(at.len() <= PREPARED_UP_TO);
    for &call in at {
        if let WriteCall::Complete {
            key,
            token,
            response,
            ttl_millis,
        } = &batch[call]
        {
            query = query
                .bind(&key[..])
                .bind(*token)
                .bind(&response[..])
                .bind(*ttl_millis);
        }
    }
    let rows = query.fetch_all(conn).await.map_err(StoreError::backend)?;
    let completed = returned_keys(&rows)?;
    for &call in at {
        let done = completed.contains(&batch[call].key()[..]);
        answers[call] = Some(Ok(Written::Complete(done)));
    }
    Ok(())
}

/// Acquires the keys of the `begin`s at `at` (distinct keys) in one statement, each with a token
/// of its own. Returns the calls whose key another request holds live (they take the
/// single-request path, which answers them from that row).
async fn acquire_all(
    conn: &mut SqliteConnection,
    batch: &[WriteCall],
    at: &[usize],
    answers: &mut Answers,
) -> Result<Vec<usize>, StoreError> {
    if at.is_empty() {
        return Ok(Vec::new());
    }
    let count = i64::try_from(at.len()).map_err(StoreError::backend)?;
    // Tokens `last - count + 1 ..= last`: one update of the counter for the whole batch.
    let last = take_tokens(conn, count).await?;
    let mut statement = String::from(
        "INSERT INTO idempotency_records (key, fingerprint, token, response, expires_at) VALUES ",
    );
    let tuple = format!("(?, ?, ?, NULL, {} + ?)", now_ms!());
    push_tuples(&mut statement, at.len(), &tuple);
    statement.push(' ');
    statement.push_str(on_conflict_take_over!());
    statement.push_str("RETURNING key, token, attempt, checkpoint_name, checkpoint_data");
    let mut query = sqlx::query(AssertSqlSafe(statement)).persistent(at.len() <= PREPARED_UP_TO);
    for (&call, token) in at.iter().zip(last - count + 1..) {
        if let WriteCall::Begin {
            key,
            fingerprint,
            ttl_millis,
        } = &batch[call]
        {
            query = query
                .bind(&key[..])
                .bind(&fingerprint[..])
                .bind(token)
                .bind(*ttl_millis);
        }
    }
    let rows = query.fetch_all(conn).await.map_err(StoreError::backend)?;
    let mut acquired = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let key: Vec<u8> = row.try_get(0).map_err(StoreError::backend)?;
        let token: i64 = row.try_get(1).map_err(StoreError::backend)?;
        acquired.insert(key, lease(row, token, 2));
    }
    let mut held = Vec::new();
    for &call in at {
        match acquired.remove(&batch[call].key()[..]) {
            Some(begun) => answers[call] = Some(begun),
            None => held.push(call),
        }
    }
    Ok(held)
}

/// Runs one call with the single-request statements, as if alone.
async fn run_one(
    conn: &mut SqliteConnection,
    call: &WriteCall,
) -> Result<Result<Written, StoreError>, StoreError> {
    match call {
        WriteCall::Begin {
            key,
            fingerprint,
            ttl_millis,
        } => {
            let record = RecordKey::from_bytes(*key);
            let request = Fingerprint::from_bytes(*fingerprint);
            // Another call (in this batch or before it) may have acquired the key.
            if let Some(answer) = live_row(conn, &record, &request).await? {
                return Ok(answer);
            }
            let token = take_tokens(conn, 1).await?;
            let acquired = sqlx::query(ACQUIRE)
                .bind(&key[..])
                .bind(&fingerprint[..])
                .bind(token)
                .bind(*ttl_millis)
                .fetch_optional(&mut *conn)
                .await
                .map_err(StoreError::backend)?;
            if let Some(row) = acquired {
                return Ok(lease(&row, token, 0));
            }
            // The row is live after all (the clock stepped back since `live_row` read it):
            // answered from it, as that read would have been.
            live_row(conn, &record, &request).await?.ok_or_else(|| {
                StoreError::backend("a begin found its key's row neither live nor free")
            })
        }
        WriteCall::Complete {
            key,
            token,
            response,
            ttl_millis,
        } => {
            let completed = sqlx::query(COMPLETE)
                .bind(&key[..])
                .bind(*token)
                .bind(&response[..])
                .bind(*ttl_millis)
                .execute(&mut *conn)
                .await
                .map_err(StoreError::backend)?;
            Ok(Ok(Written::Complete(completed.rows_affected() > 0)))
        }
    }
}

/// The answer a `begin` gets from its key's live row, if there is one. A stored record that
/// cannot be decoded is that call's answer; any other error fails the batch.
async fn live_row(
    conn: &mut SqliteConnection,
    record: &RecordKey,
    request: &Fingerprint,
) -> Result<Option<Result<Written, StoreError>>, StoreError> {
    match SqliteStore::lookup(&mut *conn, record, request).await {
        Ok(found) => Ok(found.map(|begun| Ok(Written::Begin(begun)))),
        Err(error @ StoreError::Corrupt(_)) => Ok(Some(Err(error))),
        Err(error) => Err(error),
    }
}

/// Draws `count` fencing tokens; returns the last (the others are the `count - 1` before it).
async fn take_tokens(conn: &mut SqliteConnection, count: i64) -> Result<i64, StoreError> {
    sqlx::query_scalar(TAKE_TOKENS)
        .bind(count)
        .fetch_one(&mut *conn)
        .await
        .map_err(StoreError::backend)
}

/// `count` copies of `tuple`, comma-separated.
fn push_tuples(statement: &mut String, count: usize, tuple: &str) {
    for n in 0..count {
        let comma = if n == 0 { "" } else { ", " };
        let _ = write!(statement, "{comma}{tuple}");
    }
}

/// The keys in column 0 of `rows`.
fn returned_keys(rows: &[SqliteRow]) -> Result<HashSet<Vec<u8>>, StoreError> {
    rows.iter()
        .map(|row| row.try_get::<Vec<u8>, _>(0).map_err(StoreError::backend))
        .collect()
}

/// The lease acquired under `token`, its attempt and recovery point from column `at` of `row`.
fn lease(row: &SqliteRow, token: i64, at: usize) -> Result<Written, StoreError> {
    let (attempt, recovery_point) = sql::run_from_row(row, at)?;
    Ok(Written::Begin(Begin::Acquired {
        token: LeaseToken(sql::token_from_column(token)?),
        attempt,
        recovery_point,
    }))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use sqlx::sqlite::SqlitePoolOptions;

    use super::*;
    use crate::scope::Scope;

    /// A migrated in-memory database on one connection.
    async fn database() -> SqlitePool {
        let pool = SqlitePoolOptions::new()
            .max_connections(1)
            .connect("sqlite::memory:")
            .await
            .expect("open an in-memory database");
        super::super::sqlite::migrate(&pool).await.expect("migrate");
        pool
    }

    fn key(n: u8) -> [u8; 32] {
        *RecordKey::new(&Scope::anonymous(), &[n]).as_bytes()
    }

    fn begin(n: u8) -> WriteCall {
        WriteCall::Begin {
            key: key(n),
            fingerprint: [1; 32],
            ttl_millis: 60_000,
        }
    }

    fn acquired_token(answer: Option<&Result<Written, StoreError>>) -> i64 {
        match answer {
            Some(Ok(Written::Begin(Begin::Acquired {
                token, attempt: 1, ..
            }))) => i64::try_from(token.0).expect("token"),
            _ => panic!("expected a lease"),
        }
    }

    #[tokio::test]
    async fn the_many_row_statements_acquire_and_complete_every_call_they_can() {
        let pool = database().await;
        let mut conn = pool.acquire().await.expect("connection");
        let batch = [begin(1), begin(2), begin(3)];
        let mut answers: Answers = batch.iter().map(|_| None).collect();
        let held = acquire_all(&mut conn, &batch, &[0, 1, 2], &mut answers)
            .await
            .expect("acquire");
        assert!(held.is_empty(), "three free keys are all acquired at once");
        let tokens: Vec<i64> = answers.iter().map(|a| acquired_token(a.as_ref())).collect();
        let mut distinct = tokens.clone();
        distinct.sort_unstable();
        distinct.dedup();
        assert_eq!(distinct.len(), 3, "a token of its own each: {tokens:?}");

        // Key 1 is now held live: left to the single-request path. Key 4 is free.
        let batch = [begin(1), begin(4)];
        let mut answers: Answers = batch.iter().map(|_| None).collect();
        let held = acquire_all(&mut conn, &batch, &[0, 1], &mut answers)
            .await
            .expect("acquire");
        assert_eq!(held, [0]);
        assert!(answers[0].is_none());
        assert!(acquired_token(answers[1].as_ref()) > *distinct.last().expect("tokens"));

        let complete = |n: u8, token: i64| WriteCall::Complete {
            key: key(n),
            token,
            response: b"stored".to_vec(),
            ttl_millis: Duration::from_secs(60).as_millis().try_into().expect("ttl"),
        };
        let batch = [complete(2, tokens[1]), complete(3, tokens[2] + 100)];
        let mut answers: Answers = batch.iter().map(|_| None).collect();
        complete_all(&mut conn, &batch, &[0, 1], &mut answers)
            .await
            .expect("complete");
        assert!(matches!(answers[0], Some(Ok(Written::Complete(true)))));
        assert!(
            matches!(answers[1], Some(Ok(Written::Complete(false)))),
            "another token than the lease's completes nothing"
        );
    }
}
