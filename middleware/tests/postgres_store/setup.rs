//! Setting a store up: schema and table names, migrations (twice, concurrently, from an older
//! release, or left to the `migrate` call), the application's own pool, TLS, and a server that
//! is not there.

use std::time::Duration;

use sqlx::AssertSqlSafe;
use test_fixtures::records::{
    assert_taken_over_as_attempt_2, complete, fingerprint, key, replayed, response,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, LeaseToken, PostgresStore, StoreError};

use super::{
    admin, builder, connect, database_url, drop_schema, fresh_store, sweep_stale_schemas,
    test_schema, unreachable,
};

#[tokio::test]
async fn invalid_schema_and_table_names_are_refused() {
    let bad_names = [
        "",
        "Upper",
        "1starts_with_digit",
        "has-dash",
        "has space",
        "dotted.name",
        "quote\"d",
        "x; DROP TABLE users; --",
        "ünïcode",
        &"a".repeat(64),
    ];
    for bad in bad_names {
        for (what, builder) in [
            ("schema", PostgresStore::builder(database_url()).schema(bad)),
            ("table", PostgresStore::builder(database_url()).table(bad)),
        ] {
            match builder.connect().await {
                Err(StoreError::Backend(error)) => {
                    let message = error.to_string();
                    assert!(
                        message.contains(what) && message.contains("identifier"),
                        "unclear error for {what} {bad:?}: {message}"
                    );
                }
                other => panic!("{what} {bad:?} must be refused, got {other:?}"),
            }
        }
    }
}

#[tokio::test]
async fn names_of_the_maximum_length_work() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let table = "t".repeat(63);
    let store = connect(builder(&schema).table(&table)).await;
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    complete(&store, "long-names", LONG).await;
    assert_eq!(
        replayed(&store, &key("long-names")).await,
        Some(response("long-names"))
    );
    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrating_twice_or_concurrently_is_harmless() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let mut stores = Vec::new();
    for _ in 0..3 {
        stores.push(connect(builder(&schema)).await);
    }
    // Three processes migrating a database at once: the advisory lock lets one apply, the others
    // find the work done.
    let migrations: Vec<_> = stores
        .iter()
        .map(|store| {
            let store = store.clone();
            tokio::spawn(async move { store.migrate().await })
        })
        .collect();
    for migration in migrations {
        migration.await.expect("task").expect("concurrent migrate");
    }
    stores[0].migrate().await.expect("migrate again");

    let mut conn = admin().await;
    let applied: Vec<(i64, bool)> = sqlx::query_as(AssertSqlSafe(format!(
        "SELECT version, success FROM \"{schema}\".idempotency_records_migrations ORDER BY version"
    )))
    .fetch_all(&mut conn)
    .await
    .expect("read the bookkeeping table");
    assert_eq!(applied, [(1, true), (2, true), (3, true)]);
    // The store works on the migrated table.
    complete(&stores[1], "after-migrations", LONG).await;

    drop(stores);
    drop_schema(&schema).await;
}

/// A table from before checkpoints (migrations 1 and 2 only) holding a lapsed lease is brought up
/// to date by `migrate`, and the lease is taken over as attempt 2 and takes checkpoints.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_from_before_checkpoints_is_migrated() {
    let (store, schema) = fresh_store().await;
    let mut conn = admin().await;
    // Back to what the previous release left: no attempt or checkpoint columns, version 3 unknown.
    for statement in [
        format!(
            "ALTER TABLE \"{schema}\".idempotency_records DROP COLUMN attempt, \
             DROP COLUMN checkpoint_name, DROP COLUMN checkpoint_data"
        ),
        format!("DELETE FROM \"{schema}\".idempotency_records_migrations WHERE version = 3"),
    ] {
        sqlx::query(AssertSqlSafe(statement))
            .execute(&mut conn)
            .await
            .expect("downgrade");
    }
    let lapsed = key("from-0002");
    sqlx::query(AssertSqlSafe(format!(
        "INSERT INTO \"{schema}\".idempotency_records (key, fingerprint, response, expires_at) \
         VALUES ($1, $2, NULL, now() - interval '1 second')"
    )))
    .bind(&lapsed.as_bytes()[..])
    .bind(&fingerprint(1).as_bytes()[..])
    .execute(&mut conn)
    .await
    .expect("an old lease");

    store.migrate().await.expect("migrate the old table");
    // A fresh store: the old one's pooled connections cached statements for the old row type.
    let store = connect(builder(&schema)).await;
    // The sequence issued no token yet that the old row's lease could know of.
    assert_taken_over_as_attempt_2(&store, &lapsed, LeaseToken(0)).await;
    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn ping_debug_and_an_unreachable_server() {
    let (store, schema) = fresh_store().await;
    store.ping().await.expect("ping");
    let debug = format!("{store:?}");
    assert!(
        debug.contains(&schema) && debug.contains("idempotency_records"),
        "{debug}"
    );
    drop(store);
    drop_schema(&schema).await;

    // Nothing listens on port 1: connecting fails at once with the reason, not after a timeout.
    let refused = tokio::time::timeout(
        Duration::from_secs(5),
        PostgresStore::connect("postgres://postgres@127.0.0.1:1/test"),
    )
    .await
    .expect("a refused connection must fail fast");
    let error = refused.expect_err("nothing listens on port 1");
    assert!(
        error.to_string().to_lowercase().contains("refused"),
        "{error}"
    );
}

#[tokio::test]
async fn connect_migrates_unless_auto_migrate_is_off() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let manual = connect(builder(&schema)).await;
    assert!(
        manual
            .begin(&key("before"), &fingerprint(1), LONG)
            .await
            .is_err(),
        "auto_migrate(false) must leave the table uncreated"
    );
    drop(manual);
    let automatic = connect(builder(&schema).auto_migrate(true)).await;
    let found = automatic.begin(&key("after"), &fingerprint(1), LONG).await;
    assert!(matches!(found, Ok(Begin::Acquired { .. })), "{found:?}");
    drop(automatic);
    drop_schema(&schema).await;
}

#[tokio::test]
async fn from_pool_serves_from_the_applications_own_pool() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let pool = sqlx::PgPool::connect(&database_url())
        .await
        .expect("the application's pool");
    let store = connect(PostgresStore::from_pool(pool.clone()).schema(&schema)).await;
    complete(&store, "pooled", LONG).await;
    // The record is in the application's database, through its pool.
    let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{schema}\".idempotency_records"
    )))
    .fetch_one(&pool)
    .await
    .expect("count through the application's pool");
    assert_eq!(rows, 1);
    drop(store);
    pool.close().await;
    drop_schema(&schema).await;
}

/// TLS is the `postgres-tls` feature's: with it `sslmode=require` connects (the test server has
/// `ssl = on`), without it sqlx refuses to connect at all.
#[tokio::test]
async fn sslmode_require_needs_the_postgres_tls_feature() {
    let url = database_url();
    let separator = if url.contains('?') { '&' } else { '?' };
    let connected = PostgresStore::builder(format!("{url}{separator}sslmode=require"))
        .auto_migrate(false)
        .connect()
        .await;
    if cfg!(feature = "postgres-tls") {
        let store = connected.unwrap_or_else(|error| unreachable(error));
        store.ping().await.expect("ping over TLS");
    } else {
        let error = connected.expect_err("no TLS support compiled in");
        assert!(error.to_string().contains("TLS"), "{error}");
    }
}

/// The store's own pool pings only connections that sat idle: one whose server process ended
/// while it was idle is found broken and replaced before a statement is sent on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_that_broke_is_replaced_before_use() {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let application = test_fixtures::unique("idle");
    let url = format!("{}?application_name={application}", database_url());
    let store = connect(
        PostgresStore::builder(url)
            .schema(&schema)
            .max_connections(2),
    )
    .await;
    complete(&store, "before", LONG).await;
    let mut admin = admin().await;
    let ended: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .fetch_all(&mut admin)
    .await
    .expect("end the store's connections");
    assert!(!ended.is_empty(), "the store's connections carry its name");
    // Idle past the threshold: the next use pings first.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        matches!(
            store.begin(&key("after"), &fingerprint(1), LONG).await,
            Ok(Begin::Acquired { .. })
        ),
        "the broken idle connection was replaced, not used"
    );
    drop(store);
    drop_schema(&schema).await;
}
