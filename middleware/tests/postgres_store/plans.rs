//! Query plans that stay right as the table grows: sqlx prepares each statement once per
//! connection and PostgreSQL caches a generic plan after five runs, so a plan made while the
//! table was empty must not go on scanning the whole table once it holds many rows (see
//! `store/postgres/replan.rs`).

use std::str::FromStr;
use std::time::Duration;

use sqlx::AssertSqlSafe;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use test_fixtures::records::{fingerprint, key, response};
use test_fixtures::{database_url, unique};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, PostgresStore};

use super::{admin, drop_schema, sweep_stale_schemas, test_schema, unreachable};

/// Rows put into the table between the two phases: one sequential scan reads them all.
const GROWN_TO: i64 = 20_000;

/// Concurrent calls per round: enough to form batches.
const PER_ROUND: usize = 16;

/// A reaper pass that finds the table doubled has the batch statements planned anew.
const REAPER_INTERVAL: Duration = Duration::from_millis(200);

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn batch_statements_never_scan_the_table() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    // One connection, named, so that every statement shares one plan cache and the test can end
    // it to have its statistics flushed.
    let application = unique("plans");
    let options = PgConnectOptions::from_str(&database_url())
        .expect("DATABASE_URL")
        .application_name(&application);
    let pool = PgPoolOptions::new()
        .max_connections(1)
        .connect_with(options)
        .await
        .unwrap_or_else(|error| unreachable(error));
    let store = PostgresStore::from_pool(pool)
        .schema(&schema)
        .reaper_interval(REAPER_INTERVAL)
        .connect()
        .await
        .unwrap_or_else(|error| unreachable(error));
    let table = format!("\"{schema}\".\"{}\"", store.table());
    let mut admin = admin().await;
    // No statistics refreshed behind the test's back: what autovacuum would do, it may never
    // get to (it is off on some servers, and runs only every minute on the others).
    sqlx::query(AssertSqlSafe(format!(
        "ALTER TABLE {table} SET (autovacuum_enabled = false)"
    )))
    .execute(&mut admin)
    .await
    .expect("turn autovacuum off for the table");

    // While the table is small, the batch statements run often enough to have generic plans.
    for round in 0..10 {
        new_keys_in_batches(&store, &format!("small-{round}")).await;
    }
    // The table grows, its statistics stay those of a small table.
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO {table} (key, fingerprint, response, expires_at) \
         SELECT sha256(int8send(n)), sha256(int8send(-n)), '\\x00', now() + interval '1 hour' \
         FROM generate_series(1, {GROWN_TO}) AS n"
    )))
    .execute(&mut admin)
    .await
    .expect("grow the table");
    tokio::time::sleep(3 * REAPER_INTERVAL).await;
    for round in 0..4 {
        new_keys_in_batches(&store, &format!("grown-{round}")).await;
    }

    // Ending the store's connections flushes their statistics.
    sqlx::query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .execute(&mut admin)
    .await
    .expect("end the store's connections");
    test_fixtures::eventually(
        Duration::from_secs(10),
        "the store's connections to end",
        async || {
            let left: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            )
            .bind(&application)
            .fetch_one(&mut admin)
            .await
            .expect("count connections");
            left == 0
        },
    )
    .await;
    let read: i64 = sqlx::query_scalar(
        "SELECT coalesce(seq_tup_read, 0) FROM pg_stat_user_tables \
         WHERE schemaname = $1 AND relname = $2",
    )
    .bind(&schema)
    .bind(store.table())
    .fetch_one(&mut admin)
    .await
    .expect("read the table's statistics");
    assert!(
        read < GROWN_TO,
        "the store's statements read {read} rows by sequential scans: at least one scanned \
         the whole grown table of {GROWN_TO} rows"
    );
    drop(store);
    drop_schema(&schema).await;
}

/// Begins and completes [`PER_ROUND`] new keys at once, each phase held back by a lock until all
/// its calls are queued, so that they run as batch statements; then replays them in a batch.
async fn new_keys_in_batches(store: &PostgresStore, round: &str) {
    let keys: Vec<_> = (0..PER_ROUND)
        .map(|n| key(&format!("{round}-{n}")))
        .collect();
    let begun = held_back(
        store,
        keys.iter().map(|key| {
            let (store, key) = (store.clone(), *key);
            async move { store.begin(&key, &fingerprint(1), LONG).await }
        }),
    )
    .await;
    let tokens: Vec<_> = begun
        .into_iter()
        .map(|begun| match begun.expect("begin") {
            Begin::Acquired { token, .. } => token,
            other => panic!("a new key must be acquired: {other:?}"),
        })
        .collect();
    let completed = held_back(
        store,
        keys.iter().zip(tokens).map(|(key, token)| {
            let (store, key) = (store.clone(), *key);
            async move { store.complete(&key, token, &response("ok"), LONG).await }
        }),
    )
    .await;
    for complete in completed {
        complete.expect("complete");
    }
    let replayed = held_back(
        store,
        keys.iter().map(|key| {
            let (store, key) = (store.clone(), *key);
            async move { store.begin(&key, &fingerprint(1), LONG).await }
        }),
    )
    .await;
    for replay in replayed {
        assert!(matches!(replay.expect("replay"), Begin::Completed { .. }));
    }
}

/// Runs `calls` at once while another transaction locks the store's table, and returns their
/// answers once the lock is gone: the calls queue behind the first ones and form a batch.
async fn held_back<T: Send + 'static>(
    store: &PostgresStore,
    calls: impl Iterator<Item = impl Future<Output = T> + Send + 'static>,
) -> Vec<T> {
    let table = format!("\"{}\".\"{}\"", store.schema(), store.table());
    let mut lock = admin().await;
    sqlx::raw_sql(AssertSqlSafe(format!(
        "BEGIN; LOCK TABLE {table} IN EXCLUSIVE MODE"
    )))
    .execute(&mut lock)
    .await
    .expect("lock the table");
    let tasks: Vec<_> = calls.map(tokio::spawn).collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    sqlx::raw_sql("COMMIT")
        .execute(&mut lock)
        .await
        .expect("unlock the table");
    let mut answers = Vec::with_capacity(tasks.len());
    for task in tasks {
        answers.push(task.await.expect("task"));
    }
    answers
}
