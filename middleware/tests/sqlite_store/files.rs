//! The database file: what connecting creates and migrates, what survives reopening, corrupt
//! rows, and the ways to open a store (a path, memory, the application's pool).

use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use test_fixtures::records::{
    CORRUPT_RESPONSES, acquire, assert_corrupt, assert_taken_over_as_attempt_2, complete,
    fingerprint, key, replayed, response,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, LeaseToken, SqliteStore, StoreError};

use super::url;

#[tokio::test]
async fn the_file_is_created_in_wal_mode_with_its_tables() {
    let dir = TempDir::new().expect("temporary directory");
    let path = dir.path().join("idempotency.db");
    assert!(!path.exists());
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    assert!(path.exists(), "the database file must be created");
    store.ping().await.expect("ping");
    assert!(format!("{store:?}").contains("idempotency.db"));

    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    let mode: String = sqlx::query_scalar("PRAGMA journal_mode")
        .fetch_one(&mut conn)
        .await
        .expect("journal mode");
    assert_eq!(mode, "wal");
    let applied: Vec<i64> = sqlx::query_scalar("SELECT version FROM idempotency_migrations")
        .fetch_all(&mut conn)
        .await
        .expect("bookkeeping table");
    assert_eq!(applied, [1, 2, 3]);
}

/// A database written before 0002 (no attempt or checkpoint columns) is migrated on connect,
/// and its rows keep working: a lapsed lease is taken over as attempt 2 and takes checkpoints.
#[tokio::test]
async fn a_database_from_before_checkpoints_is_migrated() {
    let dir = TempDir::new().expect("temporary directory");
    let mut conn = SqliteConnection::connect(&format!("{}?mode=rwc", url(&dir)))
        .await
        .expect("create");
    // What 0001 left, applied the way the store applies it, and one lapsed lease.
    let migrator = sqlx::migrate!("../migrations/sqlite");
    let mut only_first = sqlx::migrate::Migrator::with_migrations(
        migrator
            .iter()
            .filter(|m| m.version == 1)
            .cloned()
            .collect(),
    );
    only_first.dangerous_set_table_name("idempotency_migrations");
    only_first.run(&mut conn).await.expect("0001");
    let lapsed = key("from-0001");
    sqlx::query(
        "INSERT INTO idempotency_records (key, fingerprint, token, response, expires_at) \
         VALUES (?1, ?2, 7, NULL, 0)",
    )
    .bind(&lapsed.as_bytes()[..])
    .bind(&fingerprint(1).as_bytes()[..])
    .execute(&mut conn)
    .await
    .expect("an old lease");
    sqlx::query("UPDATE idempotency_tokens SET last = 7")
        .execute(&mut conn)
        .await
        .expect("the counter that issued it");
    conn.close().await.expect("close");

    let store = SqliteStore::connect(&url(&dir))
        .await
        .expect("migrate on open");
    assert_taken_over_as_attempt_2(&store, &lapsed, LeaseToken(7)).await;
}

#[tokio::test]
async fn records_survive_reopening_the_file() {
    let dir = TempDir::new().expect("temporary directory");
    let first = SqliteStore::connect(&url(&dir)).await.expect("open");
    let token = complete(&first, "durable", LONG).await;
    let running = acquire(&first, &key("running"), LONG).await;
    drop(first);

    // A new store (a restarted process) on the same file: migrations find the work done, the
    // completed record replays, the lease still holds, and tokens keep growing.
    let second = SqliteStore::connect(&url(&dir)).await.expect("reopen");
    assert_eq!(
        replayed(&second, &key("durable")).await,
        Some(response("durable"))
    );
    assert_eq!(
        second
            .begin(&key("running"), &fingerprint(1), LONG)
            .await
            .unwrap(),
        Begin::InFlight
    );
    second
        .complete(&key("running"), running, &response("finished"), LONG)
        .await
        .expect("the lease taken before the restart still completes");
    let next = acquire(&second, &key("new"), LONG).await;
    assert!(next > token && next > running);
}

#[tokio::test]
async fn a_corrupt_stored_response_is_an_error_not_a_panic() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    for (name, corrupt) in CORRUPT_RESPONSES {
        complete(&store, name, LONG).await;
        sqlx::query("UPDATE idempotency_records SET response = ?2 WHERE key = ?1")
            .bind(&key(name).as_bytes()[..])
            .bind(corrupt)
            .execute(&mut conn)
            .await
            .expect("corrupt the row");
        assert_corrupt(&store, name).await;
    }
}

#[tokio::test]
async fn an_unusable_path_is_an_error() {
    let dir = TempDir::new().expect("temporary directory");
    let url = format!(
        "sqlite://{}",
        dir.path().join("missing-dir/idempotency.db").display()
    );
    assert!(matches!(
        SqliteStore::connect(&url).await,
        Err(StoreError::Backend(_))
    ));
}

#[tokio::test]
async fn an_in_memory_database_works_for_tests_and_development() {
    let store = SqliteStore::connect("sqlite::memory:").await.expect("open");
    let token = complete(&store, "in-memory", LONG).await;
    assert_eq!(
        replayed(&store, &key("in-memory")).await,
        Some(response("in-memory"))
    );
    assert!(acquire(&store, &key("other"), LONG).await > token);
}

#[tokio::test]
async fn auto_migrate_off_leaves_migrating_to_an_explicit_migrate() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::builder(url(&dir))
        .auto_migrate(false)
        .connect()
        .await
        .expect("open");
    assert!(
        store
            .begin(&key("before"), &fingerprint(1), LONG)
            .await
            .is_err(),
        "auto_migrate(false) must leave the tables uncreated"
    );
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    acquire(&store, &key("after"), LONG).await;
}

#[tokio::test]
async fn from_pool_serves_from_the_applications_own_pool() {
    let dir = TempDir::new().expect("temporary directory");
    let options = url(&dir)
        .parse::<sqlx::sqlite::SqliteConnectOptions>()
        .expect("options")
        .create_if_missing(true);
    let pool = sqlx::SqlitePool::connect_with(options)
        .await
        .expect("the application's pool");
    let store = SqliteStore::from_pool(pool.clone())
        .connect()
        .await
        .expect("open on the pool");
    complete(&store, "pooled", LONG).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&pool)
        .await
        .expect("count through the application's pool");
    assert_eq!(rows, 1);
}
