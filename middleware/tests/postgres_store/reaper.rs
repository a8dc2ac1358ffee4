//! The reaper: expired rows go in batches, live rows and leases stay, rows other transactions
//! hold are skipped, and tokens keep growing after their rows are gone.

use std::time::Duration;

use sqlx::{AssertSqlSafe, Connection};
use test_fixtures::eventually;
use test_fixtures::records::{SHORT, acquire, complete, fingerprint, key, replayed, response};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore};

use super::{
    admin, builder, connect, drop_schema, fresh_store, row_count, sweep_stale_schemas, test_schema,
};

#[tokio::test]
async fn the_reaper_deletes_expired_rows_in_batches_and_spares_live_ones() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let store = connect(
        builder(&schema)
            .reaper_interval(Duration::ZERO)
            .reaper_batch(7),
    )
    .await;
    store.migrate().await.expect("migrate");

    for i in 0..20 {
        complete(&store, &format!("expired-{i}"), SHORT).await;
    }
    for i in 0..5 {
        acquire(&store, &key(&format!("dead-lease-{i}")), SHORT).await;
    }
    for i in 0..10 {
        complete(&store, &format!("live-{i}"), LONG).await;
    }
    for i in 0..3 {
        acquire(&store, &key(&format!("live-lease-{i}")), LONG).await;
    }
    tokio::time::sleep(SHORT * 2).await;

    // 25 expired rows take four batches of at most 7.
    assert_eq!(store.reap_expired().await.expect("reap"), 25);
    assert_eq!(row_count(&store).await, 13);
    assert_eq!(store.reap_expired().await.expect("reap"), 0);
    for i in 0..10 {
        let name = format!("live-{i}");
        assert_eq!(replayed(&store, &key(&name)).await, Some(response(&name)));
    }
    for i in 0..3 {
        assert_eq!(
            store
                .begin(&key(&format!("live-lease-{i}")), &fingerprint(1), LONG)
                .await
                .unwrap(),
            Begin::InFlight
        );
    }

    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn the_reaper_skips_rows_other_transactions_hold() {
    let (store, schema) = fresh_store().await;
    complete(&store, "held", SHORT).await;
    complete(&store, "free", SHORT).await;
    tokio::time::sleep(SHORT * 2).await;

    let mut holder = admin().await;
    let mut tx = holder.begin().await.expect("begin");
    sqlx::query(AssertSqlSafe(format!(
        "SELECT 1 FROM \"{schema}\".idempotency_records WHERE key = $1 FOR UPDATE"
    )))
    .bind(&key("held").as_bytes()[..])
    .fetch_one(&mut *tx)
    .await
    .expect("lock the row");

    let reaped = tokio::time::timeout(Duration::from_secs(5), store.reap_expired())
        .await
        .expect("the reaper must not wait for a locked row")
        .expect("reap");
    assert_eq!(reaped, 1);
    tx.commit().await.expect("commit");
    assert_eq!(store.reap_expired().await.expect("reap"), 1);
    assert_eq!(row_count(&store).await, 0);

    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn the_background_reaper_runs_on_its_own() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let store = connect(builder(&schema).reaper_interval(Duration::from_millis(100))).await;
    store.migrate().await.expect("migrate");
    complete(&store, "short-lived", SHORT).await;
    complete(&store, "long-lived", LONG).await;
    eventually(
        Duration::from_secs(5),
        "the reaper to delete the expired row",
        async || row_count(&store).await <= 1,
    )
    .await;
    assert_eq!(row_count(&store).await, 1, "the live row stays");

    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn tokens_keep_increasing_after_the_row_was_reaped() {
    let (store, schema) = fresh_store().await;
    let old = complete(&store, "reaped", SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!(store.reap_expired().await.expect("reap"), 1);
    assert_eq!(row_count(&store).await, 0);
    let new = acquire(&store, &key("reaped"), LONG).await;
    assert!(new > old, "token {new} must be larger than {old}");
    drop(store);
    drop_schema(&schema).await;
}
