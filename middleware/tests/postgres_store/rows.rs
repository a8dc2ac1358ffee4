//! What the rows show: replays and conflicts neither write nor lock them, and a corrupt stored
//! response is an error.

use sqlx::{AssertSqlSafe, PgConnection, Row};
use test_fixtures::records::{
    CORRUPT_RESPONSES, acquire, assert_corrupt, complete, fingerprint, key, replayed, response,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, PostgresStore, RecordKey};

use super::{admin, drop_schema, fresh_store};

/// The row's physical identity: `ctid` moves on an update, `xmin` is the writing transaction,
/// and `xmax` is set by a delete, an update or merely a row lock.
async fn row_version(
    conn: &mut PgConnection,
    store: &PostgresStore,
    key: &RecordKey,
) -> (String, String, String) {
    let row = sqlx::query(AssertSqlSafe(format!(
        "SELECT ctid::text, xmin::text, xmax::text FROM \"{}\".\"{}\" WHERE key = $1",
        store.schema(),
        store.table()
    )))
    .bind(&key.as_bytes()[..])
    .fetch_one(conn)
    .await
    .expect("read the row version");
    (row.get(0), row.get(1), row.get(2))
}

#[tokio::test]
async fn replays_and_conflicts_write_nothing() {
    let (store, schema) = fresh_store().await;
    let mut conn = admin().await;

    complete(&store, "replayed", LONG).await;
    let settled = key("replayed");
    let before = row_version(&mut conn, &store, &settled).await;
    assert_eq!(before.2, "0", "a settled row carries no lock");
    for _ in 0..20 {
        assert_eq!(replayed(&store, &settled).await, Some(response("replayed")));
        assert_eq!(
            store.begin(&settled, &fingerprint(2), LONG).await.unwrap(),
            Begin::Mismatch
        );
    }
    assert_eq!(
        row_version(&mut conn, &store, &settled).await,
        before,
        "replays must neither update nor lock the row"
    );

    let running = key("running");
    acquire(&store, &running, LONG).await;
    let before = row_version(&mut conn, &store, &running).await;
    for _ in 0..20 {
        assert_eq!(
            store.begin(&running, &fingerprint(1), LONG).await.unwrap(),
            Begin::InFlight
        );
    }
    assert_eq!(
        row_version(&mut conn, &store, &running).await,
        before,
        "in-flight answers must neither update nor lock the row"
    );

    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn a_corrupt_stored_response_is_an_error_not_a_panic() {
    let (store, schema) = fresh_store().await;
    let mut conn = admin().await;
    for (name, corrupt) in CORRUPT_RESPONSES {
        complete(&store, name, LONG).await;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{schema}\".idempotency_records SET response = $2 WHERE key = $1"
        )))
        .bind(&key(name).as_bytes()[..])
        .bind(corrupt)
        .execute(&mut conn)
        .await
        .expect("corrupt the row");
        assert_corrupt(&store, name).await;
    }
    drop(store);
    drop_schema(&schema).await;
}
