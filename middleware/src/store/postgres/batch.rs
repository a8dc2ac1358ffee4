//! Group commit for [`PostgresStore`](super::PostgresStore): the `begin`s and `complete`s that
//! arrive while a batch is in flight run as one statement each, over `unnest` of arrays.
//!
//! A batch of one runs the store's single-request statement (the one documented on
//! `PostgresStore`), so a lone request costs what it always did. A larger batch runs the same
//! logic row by row in one statement:
//!
//! * `begin`: `existing` reads each key's live row from the statement's snapshot; the `INSERT
//!   ... SELECT ... ON CONFLICT DO UPDATE ... WHERE expires_at <= now()` acquires or takes over
//!   the others, each row with its own fencing token from the identity sequence. Rows are
//!   inserted in key order, so two concurrent batches wait on each other's keys in one order and
//!   cannot deadlock. A row that lost the race (a concurrent statement committed the key after
//!   our snapshot) comes back with neither a token nor an existing row and runs again in the
//!   next statement, as the single-request path does.
//! * `complete`: `UPDATE ... FROM unnest(...)` with the fencing condition per row (`key`, `token`,
//!   `response IS NULL`); the keys it returns are the calls that completed, every other call
//!   lost its lease. Watched rows are notified in the same statement.
//!
//! Each statement is its own transaction: it commits (with `synchronous_commit` as the server
//! has it) before any of its calls is answered, or fails and none of them is.

use sqlx::postgres::PgPool;
use sqlx::{Row, SqlStr};
use std::sync::Arc;

use super::replan::{Replan, Replanned};
use super::statements::{MAX_BEGIN_ATTEMPTS, read_begin};
use crate::store::batch::Execute;
use crate::store::{Begin, StoreError};

/// How many batches of each operation may be in flight at once. Two keep a batch gathering
/// while another is on the wire, and leave the rest of the pool to `renew`, `release`, `watch`
/// and the other operation.
pub(super) const BATCHES_IN_FLIGHT: usize = 2;

/// How long a batch may take before its calls fail and its worker moves on (the layer's default
/// store timeout: its callers have given up by then).
pub(super) const BATCH_DEADLINE: std::time::Duration = std::time::Duration::from_secs(5);

/// One `begin`: key, fingerprint, lock TTL in microseconds.
pub(super) struct BeginCall {
    pub key: [u8; 32],
    pub fingerprint: [u8; 32],
    pub ttl_micros: i64,
}

/// One `complete`: key, stored token, encoded response, TTL in microseconds.
pub(super) struct CompleteCall {
    pub key: [u8; 32],
    pub token: i64,
    pub response: Vec<u8>,
    pub ttl_micros: i64,
}

/// Runs batches of `begin`.
pub(super) struct Begins {
    pub pool: PgPool,
    /// The single-request statement.
    pub single: SqlStr,
    pub batch: Replanned,
}

/// Runs batches of `complete`; answers `true` when the call's lease completed the record.
pub(super) struct Completes {
    pub pool: PgPool,
    pub single: SqlStr,
    pub batch: Replanned,
    pub channel: String,
}

/// The batch statements on table `t` (a quoted, validated `"schema"."table"`), planned anew as
/// `replan` says.
pub(super) fn statements(t: &str, replan: &Arc<Replan>) -> (Replanned, Replanned) {
    let sql = |text: String| Replanned::new(text, Arc::clone(replan));
    // Must match the takeover of the single-request `begin` in `statements.rs`.
    let same_run = "r.response IS NULL AND r.fingerprint = excluded.fingerprint";
    let begin = sql(format!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::bytea[], $2::bytea[], $3::bigint[]) \
                 WITH ORDINALITY AS i(key, fingerprint, ttl, n) \
         ), \
         existing AS ( \
             SELECT i.n, r.fingerprint = i.fingerprint AS same_request, \
                    r.response IS NULL AS in_flight, \
                    CASE WHEN r.fingerprint = i.fingerprint THEN r.response END AS response, \
                    (extract(epoch FROM r.expires_at - now()) * 1000000)::bigint AS expires_in \
             FROM input i JOIN {t} r ON r.key = i.key AND r.expires_at > now() \
         ), \
         acquired AS ( \
             INSERT INTO {t} AS r (key, fingerprint, response, expires_at) \
             SELECT i.key, i.fingerprint, NULL, now() + i.ttl * interval '1 microsecond' \
             FROM input i WHERE NOT EXISTS (SELECT FROM existing e WHERE e.n = i.n) \
             ORDER BY i.key \
             ON CONFLICT (key) DO UPDATE \
                 SET fingerprint = excluded.fingerprint, token = excluded.token, \
                     response = NULL, expires_at = excluded.expires_at, \
                     attempt = CASE WHEN {same_run} THEN r.attempt + 1 ELSE 1 END, \
                     checkpoint_name = CASE WHEN {same_run} THEN r.checkpoint_name END, \
                     checkpoint_data = CASE WHEN {same_run} THEN r.checkpoint_data END \
                 WHERE r.expires_at <= now() \
             RETURNING r.key, r.token, r.attempt::bigint AS attempt, r.checkpoint_name, \
                       r.checkpoint_data \
         ) \
         SELECT a.token, e.same_request, e.in_flight, e.response, a.attempt, \
                a.checkpoint_name, a.checkpoint_data, i.n, e.expires_in \
         FROM input i \
         LEFT JOIN acquired a ON a.key = i.key \
         LEFT JOIN existing e ON e.n = i.n \
         ORDER BY i.n"
    ));
    let complete = sql(format!(
        "WITH input AS ( \
             SELECT * FROM unnest($1::bytea[], $2::bigint[], $3::bytea[], $4::bigint[]) \
                 AS i(key, token, response, ttl) \
         ), \
         completed AS ( \
             UPDATE {t} AS r \
             SET response = i.response, expires_at = now() + i.ttl * interval '1 microsecond' \
             FROM input i \
             WHERE r.key = i.key AND r.token = i.token AND r.response IS NULL \
             RETURNING r.key, r.watched \
         ) \
         SELECT completed.key, CASE WHEN watched \
                     THEN (SELECT 1 FROM pg_notify($5, encode(completed.key, 'hex'))) \
                     ELSE 1 END \
         FROM completed"
    ));
    (begin, complete)
}

impl Execute for Begins {
    type Request = BeginCall;
    type Response = Begin;

    fn record_key(request: &BeginCall) -> Option<[u8; 32]> {
        Some(request.key)
    }

    /// The same request again (a hot key's replays, a client's duplicates) shares the batch: the
    /// statement runs once for the key, and the others are answered from its row.
    fn may_share(first: &BeginCall, later: &BeginCall) -> bool {
        first.fingerprint == later.fingerprint
    }

    async fn execute(
        &self,
        batch: Vec<BeginCall>,
    ) -> Result<Vec<Result<Begin, StoreError>>, StoreError> {
        let mut answers: Vec<Option<Result<Begin, StoreError>>> =
            batch.iter().map(|_| None).collect();
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        for attempt in 0..MAX_BEGIN_ATTEMPTS {
            let round = match self.round(&batch, &pending).await {
                Ok(round) => round,
                // The first statement failed: nothing of the batch was written.
                Err(error) if attempt == 0 => return Err(error),
                // A retry failed: the calls answered before stand (they committed), the others
                // fail.
                Err(error) => {
                    let message = error.to_string();
                    for at in pending.drain(..) {
                        answers[at] = Some(Err(StoreError::backend(message.clone())));
                    }
                    break;
                }
            };
            let mut lost = Vec::new();
            for (at, answer) in pending.iter().zip(round) {
                match answer {
                    Ok(None) => lost.push(*at),
                    Ok(Some(begun)) => answers[*at] = Some(Ok(begun)),
                    Err(error) => answers[*at] = Some(Err(error)),
                }
            }
            if lost.is_empty() {
                break;
            }
            tracing::trace!(lost = lost.len(), "batched begin raced; retrying");
            pending = lost;
        }
        Ok(answers
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    Err(StoreError::backend(format!(
                        "begin lost the race for a key {MAX_BEGIN_ATTEMPTS} times in a row"
                    )))
                })
            })
            .collect())
    }
}

impl Begins {
    /// One statement for the calls at `pending`: per call, its answer or `None` for a lost race.
    /// A key the batch holds more than once (always for the same request: see `may_share`) goes
    /// into the statement once; the repeats get the answer a call right after it would get.
    async fn round(
        &self,
        batch: &[BeginCall],
        pending: &[usize],
    ) -> Result<Vec<Result<Option<Begin>, StoreError>>, StoreError> {
        if let [_] = pending {
            // The common case at low load: nothing to share.
            return self.statement(batch, pending).await;
        }
        let mut leaders = Vec::with_capacity(pending.len());
        let mut leader_of = std::collections::HashMap::with_capacity(pending.len());
        // For each pending call, its key's place in `leaders`.
        let places: Vec<usize> = pending
            .iter()
            .map(|&at| {
                *leader_of.entry(batch[at].key).or_insert_with(|| {
                    leaders.push(at);
                    leaders.len() - 1
                })
            })
            .collect();
        let answers = self.statement(batch, &leaders).await?;
        let mut out: Vec<Option<Result<Option<Begin>, StoreError>>> =
            places.iter().map(|_| None).collect();
        // Where each key's first call sits in `pending`; the repeats are answered from its row.
        let mut first_at = vec![None; leaders.len()];
        for (at, &place) in places.iter().enumerate() {
            if first_at[place].is_none() {
                first_at[place] = Some(at);
            } else {
                out[at] = Some(repeat_of(&answers[place]));
            }
        }
        for (answer, at) in answers.into_iter().zip(first_at) {
            if let Some(at) = at {
                out[at] = Some(answer);
            }
        }
        Ok(out
            .into_iter()
            .map(|answer| {
                answer
                    .unwrap_or_else(|| Err(StoreError::backend("a batched begin went unanswered")))
            })
            .collect())
    }

    /// One statement for the calls at `pending`, whose keys are distinct.
    async fn statement(
        &self,
        batch: &[BeginCall],
        pending: &[usize],
    ) -> Result<Vec<Result<Option<Begin>, StoreError>>, StoreError> {
        if let [only] = pending {
            let call = &batch[*only];
            let row = sqlx::query(self.single.clone())
                .bind(&call.key[..])
                .bind(&call.fingerprint[..])
                .bind(call.ttl_micros)
                .fetch_one(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            return Ok(vec![read_begin(&row)]);
        }
        let calls = pending.iter().map(|at| &batch[*at]);
        let keys: Vec<Vec<u8>> = calls.clone().map(|call| call.key.to_vec()).collect();
        let fingerprints: Vec<Vec<u8>> = calls.clone().map(|c| c.fingerprint.to_vec()).collect();
        let ttls: Vec<i64> = calls.map(|call| call.ttl_micros).collect();
        let rows = sqlx::query(self.batch.next())
            .bind(keys)
            .bind(fingerprints)
            .bind(ttls)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        if rows.len() != pending.len() {
            return Err(StoreError::backend(format!(
                "a batched begin of {} calls returned {} rows",
                pending.len(),
                rows.len()
            )));
        }
        // Rows come back in input order (`ORDER BY i.n`).
        Ok(rows.iter().map(read_begin).collect())
    }
}

/// What the same request gets right after a call answered `answer`: the lease it acquired is
/// in flight; a replay, a conflict or a mismatch is the same again; a lost race is run again.
fn repeat_of(answer: &Result<Option<Begin>, StoreError>) -> Result<Option<Begin>, StoreError> {
    match answer {
        Ok(Some(Begin::Acquired { .. })) => Ok(Some(Begin::InFlight)),
        Ok(begun) => Ok(begun.clone()),
        Err(error) => Err(StoreError::backend(error.to_string())),
    }
}

impl Execute for Completes {
    type Request = CompleteCall;
    type Response = bool;

    fn record_key(request: &CompleteCall) -> Option<[u8; 32]> {
        Some(request.key)
    }

    async fn execute(
        &self,
        batch: Vec<CompleteCall>,
    ) -> Result<Vec<Result<bool, StoreError>>, StoreError> {
        if let [call] = &batch[..] {
            let completed = sqlx::query(self.single.clone())
                .bind(&call.key[..])
                .bind(call.token)
                .bind(&call.response[..])
                .bind(call.ttl_micros)
                .bind(&self.channel)
                .fetch_optional(&self.pool)
                .await
                .map_err(StoreError::backend)?;
            return Ok(vec![Ok(completed.is_some())]);
        }
        let keys: Vec<Vec<u8>> = batch.iter().map(|call| call.key.to_vec()).collect();
        let tokens: Vec<i64> = batch.iter().map(|call| call.token).collect();
        let ttls: Vec<i64> = batch.iter().map(|call| call.ttl_micros).collect();
        let responses: Vec<Vec<u8>> = batch.into_iter().map(|call| call.response).collect();
        let rows = sqlx::query(self.batch.next())
            .bind(&keys)
            .bind(tokens)
            .bind(responses)
            .bind(ttls)
            .bind(&self.channel)
            .fetch_all(&self.pool)
            .await
            .map_err(StoreError::backend)?;
        let mut completed = std::collections::HashSet::with_capacity(rows.len());
        for row in &rows {
            let key: Vec<u8> = row.try_get(0).map_err(StoreError::backend)?;
            completed.insert(key);
        }
        // Keys are distinct within a batch (see `record_key`), so the key names the call.
        Ok(keys.iter().map(|key| Ok(completed.contains(key))).collect())
    }
}
