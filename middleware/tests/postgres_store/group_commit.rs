//! Group commit: concurrent begins and completes run as one statement per batch, and a batch
//! that fails, or whose connection is cut, fails every call in it and writes nothing.

use std::time::Duration;

use sqlx::{AssertSqlSafe, PgConnection};
use test_fixtures::batch_sizes;
use test_fixtures::records::{
    assert_the_batch_failed_whole, fingerprint, key, response, spawn_begin,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, StoreError};

use super::{
    admin, builder, connect, count, drop_schema, fresh_store, row_count, sweep_stale_schemas,
    test_schema,
};

/// Runs `admin_sql` on a connection of its own inside a transaction that stays open (holding
/// its locks) until [`unlock`].
async fn hold(admin_sql: String) -> PgConnection {
    let mut conn = admin().await;
    sqlx::raw_sql("BEGIN")
        .execute(&mut conn)
        .await
        .expect("begin");
    sqlx::query(AssertSqlSafe(admin_sql))
        .execute(&mut conn)
        .await
        .expect("lock");
    conn
}

async fn unlock(mut conn: PgConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("commit");
}

/// Waits until `count` statements on `schema` wait for a lock.
async fn statements_waiting_for_a_lock(schema: &str, count: i64) {
    let mut conn = admin().await;
    test_fixtures::eventually(
        Duration::from_secs(10),
        "statements to wait for the lock",
        async || {
            let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity \
             WHERE wait_event_type = 'Lock' AND position($1 in query) > 0",
            )
            .bind(schema)
            .fetch_one(&mut conn)
            .await
            .expect("count waiting statements");
            waiting >= count
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_begins_on_distinct_keys_share_statements_and_each_acquire() {
    let (store, schema) = fresh_store().await;
    let table = format!("\"{schema}\".\"{}\"", store.table());
    // Hold inserts back while the calls queue, so that they gather into batches.
    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let calls: Vec<_> = (0..48)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = key(&format!("distinct-{i}"));
                let begun = store.begin(&key, &fingerprint(1), LONG).await;
                (key, begun)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    let mut tokens = Vec::new();
    let mut keys = Vec::new();
    for call in calls {
        let (key, begun) = call.await.expect("task");
        match begun.expect("begin") {
            Begin::Acquired { token, attempt, .. } => {
                assert_eq!(attempt, 1);
                tokens.push(token);
                keys.push(key);
            }
            other => panic!("a fresh key must be acquired: {other:?}"),
        }
    }
    let mut distinct = tokens.clone();
    distinct.sort_unstable();
    distinct.dedup();
    assert_eq!(distinct.len(), 48, "every lease has a token of its own");

    // Rows written by one statement share its transaction id: fewer transactions than calls.
    let mut conn = admin().await;
    let transactions: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(DISTINCT xmin::text) FROM {table}"
    )))
    .fetch_one(&mut conn)
    .await
    .expect("count transactions");
    assert!(
        transactions < 48,
        "{transactions} transactions for 48 begins"
    );

    // Completed together, each by its own lease; a stale token in the same batch loses.
    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let completes: Vec<_> = keys
        .iter()
        .zip(&tokens)
        .map(|(key, token)| {
            let (store, key, token) = (store.clone(), *key, *token);
            tokio::spawn(async move { store.complete(&key, token, &response("ok"), LONG).await })
        })
        .collect();
    let stale = {
        let (store, key, token) = (store.clone(), key("distinct-stale"), tokens[0]);
        tokio::spawn(async move { store.complete(&key, token, &response("no"), LONG).await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    for complete in completes {
        complete.await.expect("task").expect("complete");
    }
    assert!(matches!(
        stale.await.expect("task"),
        Err(StoreError::LeaseLost)
    ));
    for key in &keys {
        match store
            .begin(key, &fingerprint(1), LONG)
            .await
            .expect("begin")
        {
            Begin::Completed {
                response: stored, ..
            } => assert_eq!(stored.body, "ok".as_bytes()),
            other => panic!("expected the stored response, got {other:?}"),
        }
    }
    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_begins_on_one_key_in_one_process_acquire_once() {
    let (store, schema) = fresh_store().await;
    let table = format!("\"{schema}\".\"{}\"", store.table());
    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let the_key = key("one-key");
    let calls: Vec<_> = (0..48u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.begin(&the_key, &fingerprint(1 + i % 2), LONG).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.expect("task").expect("begin"));
    }
    let acquired = count(&outcomes, |b| matches!(b, Begin::Acquired { .. }));
    let in_flight = count(&outcomes, |b| matches!(b, Begin::InFlight));
    let mismatch = count(&outcomes, |b| matches!(b, Begin::Mismatch));
    assert_eq!(acquired, 1, "{outcomes:?}");
    assert_eq!(acquired + in_flight + mismatch, 48);
    assert!(in_flight >= 23 && mismatch >= 23, "{outcomes:?}");
    drop(store);
    drop_schema(&schema).await;
}

/// The same request many times at once (a hot key's replays) runs as one statement: the
/// repeats share the batch and are answered from its row. A lease it takes is in flight for the
/// repeats, as if they ran right after.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn repeats_of_one_request_share_a_batch_and_get_its_answer() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let sizes = batch_sizes::Sizes::default();
    let store = batch_sizes::recording(&sizes, connect(builder(&schema)));
    store.migrate().await.expect("migrate");
    let table = format!("\"{schema}\".\"{}\"", store.table());
    let hot = key("hot");
    let together = |store: &tower_idempotency::PostgresStore| {
        (0..40)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.begin(&hot, &fingerprint(1), LONG).await })
            })
            .collect::<Vec<_>>()
    };

    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let calls = together(&store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    let mut outcomes = Vec::new();
    for call in calls {
        outcomes.push(call.await.expect("task").expect("begin"));
    }
    let token = match outcomes
        .iter()
        .find(|b| matches!(b, Begin::Acquired { .. }))
    {
        Some(Begin::Acquired { token, .. }) => *token,
        _ => panic!("one call acquires: {outcomes:?}"),
    };
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::Acquired { .. })), 1);
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::InFlight)), 39);
    store
        .complete(&hot, token, &response("hot"), LONG)
        .await
        .expect("complete");

    let before = sizes.seen().len();
    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let replays = together(&store);
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    for replay in replays {
        let begun = replay.await.expect("task").expect("begin");
        assert_eq!(begun.completed(), Some(&response("hot")), "{begun:?}");
    }
    let batches = sizes.seen()[before..].to_vec();
    assert!(
        batches.len() < 10 && batches.iter().any(|size| *size >= 10.0),
        "40 replays of one key ran in {} batches: {batches:?}",
        batches.len()
    );
    drop(store);
    drop_schema(&schema).await;
}

/// A statement that fails in the middle of a batch (here: a trigger that refuses one key) fails
/// every call of that batch, and none of their rows is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failing_batch_fails_every_call_and_writes_nothing() {
    let (store, schema) = fresh_store().await;
    let table = format!("\"{schema}\".\"{}\"", store.table());
    let poison = key("poison");
    let mut conn = admin().await;
    sqlx::query(AssertSqlSafe(format!(
        "CREATE FUNCTION \"{schema}\".refuse() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF NEW.key = '\\x{}'::bytea THEN RAISE EXCEPTION 'refused'; END IF; \
         RETURN NEW; END $$",
        poison.to_hex()
    )))
    .execute(&mut conn)
    .await
    .expect("create the trigger function");
    sqlx::query(AssertSqlSafe(format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON {table} \
         FOR EACH ROW EXECUTE FUNCTION \"{schema}\".refuse()"
    )))
    .execute(&mut conn)
    .await
    .expect("create the trigger");

    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    // Two calls occupy the two batches in flight (blocked by the lock), one each: the second is
    // sent once the first waits for the lock, so that they cannot gather into one batch ...
    let mut openers = Vec::new();
    for i in 0..2 {
        openers.push(spawn_begin(&store, key(&format!("opener-{i}"))));
        statements_waiting_for_a_lock(&schema, i + 1).await;
    }
    // ... while these gather into the next one, with the poison among them.
    let mut members: Vec<_> = (0..10)
        .map(|i| spawn_begin(&store, key(&format!("member-{i}"))))
        .collect();
    members.push(spawn_begin(&store, poison));
    tokio::time::sleep(Duration::from_millis(200)).await;
    unlock(lock).await;
    assert_the_batch_failed_whole(openers, members).await;
    assert_eq!(row_count(&store).await, 2, "only the openers' rows exist");
    // Nothing was left behind: the members' keys are free.
    assert!(matches!(
        store.begin(&key("member-3"), &fingerprint(1), LONG).await,
        Ok(Begin::Acquired { .. })
    ));
    drop(store);
    drop_schema(&schema).await;
}

/// The connection is cut while a batch is in flight: every call of it fails, nothing is
/// acknowledged, and the store serves again afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_batch_whose_connection_is_cut_fails_every_call() {
    let (store, schema) = fresh_store().await;
    let table = format!("\"{schema}\".\"{}\"", store.table());
    let lock = hold(format!("LOCK TABLE {table} IN SHARE MODE")).await;
    let calls: Vec<_> = (0..24)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .begin(&key(&format!("cut-{i}")), &fingerprint(1), LONG)
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Every statement of this store waiting on the lock is a batch in flight: cut them.
    let mut conn = admin().await;
    let cut: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
         WHERE wait_event_type = 'Lock' AND query LIKE '%\"{schema}\"%'"
    )))
    .fetch_one(&mut conn)
    .await
    .expect("terminate");
    assert!(cut >= 1, "batches were waiting on the lock");
    unlock(lock).await;
    let mut failed = 0;
    for call in calls {
        match call.await.expect("task") {
            Err(StoreError::Backend(_)) => failed += 1,
            // A call queued after the cut ran on a fresh connection.
            Ok(Begin::Acquired { .. }) => {}
            other => panic!("{other:?}"),
        }
    }
    assert!(failed >= 1, "the cut batches failed");
    // Only the calls answered `Acquired` have rows: no failed call was half-applied.
    assert_eq!(row_count(&store).await, 24 - failed);
    assert!(matches!(
        store.begin(&key("after-cut"), &fingerprint(1), LONG).await,
        Ok(Begin::Acquired { .. })
    ));
    drop(store);
    drop_schema(&schema).await;
}
