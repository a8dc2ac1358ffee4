//! What the SQL stores ([`PostgresStore`](super::PostgresStore) and
//! [`SqliteStore`](super::SqliteStore)) share: identifier validation, time conversions, the
//! decoding of the rows `begin`, `inspect` and `forget` return, and the reaper task that deletes
//! expired rows.

use std::future::Future;
use std::sync::Weak;
use std::time::{Duration, SystemTime};

use bytes::Bytes;

use super::{Forgotten, LeaseToken, RecordInfo, RecordState, StoreError};
use crate::fingerprint::Fingerprint;

/// Counter of expired records deleted by the SQL stores' reapers, labelled `backend`
/// (`postgres` or `sqlite`). Incremented after every batch, through the [`metrics`] facade.
pub const REAPED_RECORDS_TOTAL: &str = "idempotency_reaped_records_total";

/// How often the reaper runs unless configured otherwise.
pub(crate) const DEFAULT_REAPER_INTERVAL: Duration = Duration::from_secs(60);
/// Rows deleted per reaper statement unless configured otherwise.
pub(crate) const DEFAULT_REAPER_BATCH: u32 = 1000;

/// The longest TTL the stores accept; longer ones are shortened to it. A century is "forever"
/// for an idempotency record, and capping keeps `now + ttl` inside every timestamp type.
const MAX_TTL: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// PostgreSQL truncates identifiers to 63 bytes (`NAMEDATALEN - 1`).
#[cfg(feature = "postgres")]
const MAX_IDENTIFIER_LEN: usize = 63;

/// A schema or table name that is not a plain, lowercase SQL identifier.
#[cfg(feature = "postgres")]
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "invalid {kind} name {name:?}: expected a lowercase SQL identifier of at most 63 bytes \
     matching [a-z_][a-z0-9_]*"
)]
pub struct InvalidIdentifier {
    kind: &'static str,
    name: String,
}

/// Accepts `name` only if it matches `^[a-z_][a-z0-9_]{0,62}$`.
///
/// Names are interpolated into SQL (identifiers cannot be bind parameters), so this check is
/// what makes that safe: a validated name holds no quote, dot, space or other character that
/// could change a statement's meaning, and it needs no case folding.
#[cfg(feature = "postgres")]
pub fn validate_identifier(kind: &'static str, name: &str) -> Result<(), InvalidIdentifier> {
    let mut bytes = name.bytes();
    let valid = name.len() <= MAX_IDENTIFIER_LEN
        && bytes
            .next()
            .is_some_and(|first| first.is_ascii_lowercase() || first == b'_')
        && bytes.all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if valid {
        Ok(())
    } else {
        Err(InvalidIdentifier {
            kind,
            name: name.to_owned(),
        })
    }
}

/// The name of an object derived from `base` (an index, the migrations table): `base` followed
/// by `suffix`, shortened so that it fits the 63-byte identifier limit.
///
/// A shortened name keeps a prefix of `base` and adds a hash of the whole of it, so two long
/// table names that share a prefix still get distinct derived names, and the same base always
/// derives the same name (migrations look objects up by it).
#[cfg(feature = "postgres")]
pub(crate) fn derived_name(base: &str, suffix: &str) -> String {
    if base.len() + suffix.len() <= MAX_IDENTIFIER_LEN {
        return format!("{base}{suffix}");
    }
    use sha2::{Digest, Sha256};
    let hash = hex::encode(&Sha256::digest(base.as_bytes())[..4]);
    // `base` is ASCII (validated), so any byte index is a character boundary.
    let keep = MAX_IDENTIFIER_LEN - suffix.len() - hash.len() - 1;
    format!("{}_{hash}{suffix}", &base[..keep.min(base.len())])
}

/// `duration` in whole microseconds, capped at [`MAX_TTL`].
#[cfg(feature = "postgres")]
pub(crate) fn micros(duration: Duration) -> i64 {
    i64::try_from(duration.min(MAX_TTL).as_micros()).unwrap_or(i64::MAX)
}

/// `duration` in milliseconds, rounded up so that a non-zero TTL never becomes zero, capped at
/// [`MAX_TTL`].
#[cfg(feature = "sqlite")]
pub(crate) fn millis(duration: Duration) -> i64 {
    let micros = duration.min(MAX_TTL).as_micros();
    i64::try_from(micros.div_ceil(1000)).unwrap_or(i64::MAX)
}

/// The time a record has left, from a column counting milliseconds; a row the statement found
/// live has a positive count, and anything else reads as zero rather than failing the replay.
#[cfg(feature = "sqlite")]
pub(crate) fn duration_from_millis(millis: i64) -> Duration {
    Duration::from_millis(u64::try_from(millis).unwrap_or(0))
}

/// The time a record has left, from a column counting microseconds (see
/// [`duration_from_millis`]).
#[cfg(feature = "postgres")]
pub(crate) fn duration_from_micros(micros: i64) -> Duration {
    Duration::from_micros(u64::try_from(micros).unwrap_or(0))
}

/// A pool size that suits the machine: two connections per core plus two, the usual starting
/// point for a pool whose queries are short and mostly wait on the network.
#[cfg(feature = "postgres")]
pub(crate) fn default_pool_size() -> u32 {
    let cores = std::thread::available_parallelism().map_or(4, std::num::NonZeroUsize::get);
    u32::try_from(cores.saturating_mul(2).saturating_add(2)).unwrap_or(u32::MAX)
}

/// A lease token as the `bigint` column it is stored in. A token no store can have issued (above
/// `i64::MAX`) holds no lease: [`StoreError::LeaseLost`].
pub(crate) fn token_column(token: super::LeaseToken) -> Result<i64, StoreError> {
    i64::try_from(token.0).map_err(|_| StoreError::LeaseLost)
}

/// The answer of a statement fenced by the lease token: it changed no row when the token no
/// longer holds the lease.
pub(crate) fn fenced(rows_affected: u64) -> Result<(), StoreError> {
    if rows_affected == 0 {
        return Err(StoreError::LeaseLost);
    }
    Ok(())
}

/// The lease token column as a [`LeaseToken`] value. Tokens come from sequences that start at 1,
/// so a negative one means the row was written by something else.
pub(crate) fn token_from_column(token: i64) -> Result<u64, StoreError> {
    u64::try_from(token)
        .map_err(|_| StoreError::backend(format!("stored lease token {token} is negative")))
}

/// The attempt and recovery point in columns `at`, `at + 1` (name) and `at + 2` (data) of `row`:
/// what a new lease inherits.
pub(crate) fn run_from_row<R>(
    row: &R,
    at: usize,
) -> Result<(u32, Option<crate::lease::Checkpoint>), StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let attempt: i64 = row.try_get(at).map_err(StoreError::backend)?;
    let name: Option<String> = row.try_get(at + 1).map_err(StoreError::backend)?;
    let data: Option<Vec<u8>> = row.try_get(at + 2).map_err(StoreError::backend)?;
    let attempt = attempt_from_column(attempt);
    let recovery_point = match name {
        None => None,
        Some(name) => Some(
            crate::lease::Checkpoint::new(name, data.unwrap_or_default())
                .map_err(|error| StoreError::backend(format!("stored checkpoint: {error}")))?,
        ),
    };
    Ok((attempt, recovery_point))
}

/// The `attempt` column as the run count it is: at least 1 (a row written before attempts were
/// counted holds the first run).
pub(crate) fn attempt_from_column(attempt: i64) -> u32 {
    u32::try_from(attempt.max(1)).unwrap_or(u32::MAX)
}

/// The live record of an `inspect` row: columns 0 `fingerprint`, 1 `token`, 2 `response`
/// (`NULL` in flight), 4 `attempt` and 5 `checkpoint_name`. Column 3, the expiry, is stored
/// differently by each backend; the caller reads it into `expires_at`.
pub(crate) fn record_from_row<R>(row: &R, expires_at: SystemTime) -> Result<RecordInfo, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Vec<u8>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<Vec<u8>>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let fingerprint: Vec<u8> = row.try_get(0).map_err(StoreError::backend)?;
    let fingerprint = <[u8; 32]>::try_from(fingerprint)
        .map(Fingerprint::from_bytes)
        .map_err(|_| StoreError::backend("stored fingerprint is not 32 bytes"))?;
    let token: i64 = row.try_get(1).map_err(StoreError::backend)?;
    let response: Option<Vec<u8>> = row.try_get(2).map_err(StoreError::backend)?;
    let attempt: i64 = row.try_get(4).map_err(StoreError::backend)?;
    let checkpoint: Option<String> = row.try_get(5).map_err(StoreError::backend)?;
    match response {
        Some(response) => RecordInfo::completed(fingerprint, expires_at, Bytes::from(response)),
        None => Ok(RecordInfo::new(
            fingerprint,
            expires_at,
            RecordState::InFlight {
                token: LeaseToken(token_from_column(token)?),
                attempt: attempt_from_column(attempt),
                checkpoint,
            },
        )),
    }
}

/// What `forget` did, from the row its `DELETE ... RETURNING token, in_flight, attempt` returned
/// (`None`: it deleted nothing). `live` reads the record still there; it runs only when nothing
/// was deleted.
pub(crate) async fn forgotten<R>(
    deleted: Option<R>,
    live: impl Future<Output = Result<Option<RecordInfo>, StoreError>>,
) -> Result<Forgotten, StoreError>
where
    R: sqlx::Row,
    usize: sqlx::ColumnIndex<R>,
    for<'r> i64: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> bool: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let Some(row) = deleted else {
        // Nothing deleted: either nothing is live, or a lease holds the key and no force.
        return Ok(match live.await? {
            Some(RecordInfo {
                state: RecordState::InFlight { token, attempt, .. },
                ..
            }) => Forgotten::InFlight { token, attempt },
            _ => Forgotten::NotFound,
        });
    };
    let token: i64 = row.try_get(0).map_err(StoreError::backend)?;
    let in_flight: bool = row.try_get(1).map_err(StoreError::backend)?;
    let attempt: i64 = row.try_get(2).map_err(StoreError::backend)?;
    if in_flight {
        Ok(Forgotten::LeaseEnded {
            token: LeaseToken(token_from_column(token)?),
            attempt: attempt_from_column(attempt),
        })
    } else {
        Ok(Forgotten::Completed)
    }
}

/// A store whose expired rows a reaper deletes.
pub(crate) trait Reap: Send + Sync + 'static {
    /// Deletes every expired row, batch by batch; returns how many were deleted.
    fn reap_expired(&self) -> impl Future<Output = Result<u64, StoreError>> + Send;
}

/// Runs `delete_batch` (which deletes at most `batch` expired rows and returns how many it
/// deleted) until a batch comes back short, counting every batch in [`REAPED_RECORDS_TOTAL`].
///
/// Each batch is its own short statement, so the reaper never holds locks on more than `batch`
/// rows, nor for longer than one batch takes, however large the backlog.
pub(crate) async fn reap_in_batches<F, Fut>(
    backend: &'static str,
    batch: u32,
    mut delete_batch: F,
) -> Result<u64, StoreError>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let started = tokio::time::Instant::now();
        let deleted = delete_batch().await?;
        total += deleted;
        if deleted > 0 {
            metrics::counter!(REAPED_RECORDS_TOTAL, "backend" => backend).increment(deleted);
        }
        if deleted < u64::from(batch) {
            return Ok(total);
        }
        // Rest as long as the batch took before the next one: with a long backlog the reaper
        // holds the write lock at most half the time (SQLite has one writer; without the pause
        // the reaper took the lock straight back and starved requests waiting for it).
        tokio::time::sleep(started.elapsed().min(Duration::from_millis(100))).await;
    }
}

/// Spawns the reaper of a store: every `interval` (zero disables it), one
/// [`Reap::reap_expired`] pass.
///
/// The task holds only a [`Weak`] reference, so it never keeps a dropped store alive: it ends at
/// the first tick after the last clone of the store is gone.
pub(crate) fn spawn_reaper<R: Reap>(store: Weak<R>, interval: Duration, backend: &'static str) {
    if interval.is_zero() {
        return;
    }
    tokio::spawn(async move {
        // The first pass waits one interval: a store that just connected has nothing urgent.
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let Some(store) = store.upgrade() else {
                return;
            };
            match store.reap_expired().await {
                Ok(0) => {}
                Ok(deleted) => tracing::debug!(backend, deleted, "reaped expired records"),
                // The next pass retries; expiry is enforced on read in the meantime, so a
                // failing reaper only lets expired rows accumulate, never be replayed.
                Err(error) => tracing::warn!(backend, %error, "reaping expired records failed"),
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "postgres")]
    #[test]
    fn identifiers_are_plain_lowercase_names() {
        for good in ["public", "_x", "idempotency_records", "t1", &"a".repeat(63)] {
            assert_eq!(validate_identifier("table", good), Ok(()), "{good}");
        }
        for bad in [
            "",
            "1abc",
            "Records",
            "a-b",
            "a b",
            "a.b",
            "a\"b",
            "a;drop table x",
            "é",
            &"a".repeat(64),
        ] {
            assert!(validate_identifier("table", bad).is_err(), "{bad:?}");
        }
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn derived_names_fit_and_stay_distinct() {
        assert_eq!(derived_name("records", "_idx"), "records_idx");
        let long_a = format!("{}a", "x".repeat(62));
        let long_b = format!("{}b", "x".repeat(62));
        let (a, b) = (
            derived_name(&long_a, "_expires_at_idx"),
            derived_name(&long_b, "_expires_at_idx"),
        );
        assert!(a.len() <= 63 && b.len() <= 63, "{a} {b}");
        assert_ne!(a, b);
        assert!(a.ends_with("_expires_at_idx"));
        assert_eq!(a, derived_name(&long_a, "_expires_at_idx"), "deterministic");
        assert!(validate_identifier("index", &a).is_ok());
    }

    #[cfg(feature = "postgres")]
    #[test]
    fn microseconds_are_capped() {
        assert_eq!(micros(Duration::from_millis(400)), 400_000);
        assert_eq!(micros(Duration::MAX), micros(MAX_TTL));
    }

    #[cfg(feature = "sqlite")]
    #[test]
    fn milliseconds_round_up_and_are_capped() {
        assert_eq!(millis(Duration::from_millis(400)), 400);
        assert_eq!(millis(Duration::from_micros(1)), 1, "rounded up");
        assert_eq!(millis(Duration::ZERO), 0);
        assert_eq!(millis(Duration::MAX), millis(MAX_TTL));
    }
}
