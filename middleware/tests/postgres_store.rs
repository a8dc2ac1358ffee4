//! The PostgreSQL store against a real server: the contract suite, then what only a shared SQL
//! store has to get right (several processes, LISTEN/NOTIFY, the reaper, migrations, replays
//! that write nothing).
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Every test works in
//! a schema of its own with a random name, so tests run in parallel; schemas left behind by
//! earlier runs are dropped after ten minutes.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use sqlx::{AssertSqlSafe, Connection, PgConnection, Row};
use tokio::sync::{Barrier, OnceCell};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::PostgresStoreBuilder;
use tower_idempotency::{
    Begin, IdempotencyStore, PostgresStore, RecordKey, Scope, StoreError, StoredResponse,
};

const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_millis(150);
const NOTIFY_WITHIN: Duration = Duration::from_secs(5);
/// Test schemas older than this are left over from an earlier run and dropped.
const STALE_SCHEMA_AGE: Duration = Duration::from_secs(600);

mod conformance {
    tower_idempotency::store_conformance_tests!(|| async { super::fresh_store().await.0 });
}

fn database_url() -> String {
    test_fixtures::database_url()
}

/// The URL without its password, for messages.
fn shown_url() -> String {
    let url = database_url();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    match rest.split_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url,
    }
}

fn unreachable(error: impl std::fmt::Display) -> ! {
    panic!(
        "PostgreSQL is unreachable at {} ({error}). Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or point DATABASE_URL at a server.",
        shown_url()
    )
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

fn fresh_schema() -> String {
    test_fixtures::test_schema()
}

async fn admin() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .unwrap_or_else(|error| unreachable(error))
}

/// Drops the test schemas of runs that ended long ago, once per test binary.
async fn sweep_stale_schemas() {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let mut conn = admin().await;
            let schemas: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'idem\\_test\\_%'",
            )
            .fetch_all(&mut conn)
            .await
            .expect("list test schemas");
            let cutoff = unix_secs().saturating_sub(STALE_SCHEMA_AGE.as_secs());
            for schema in schemas {
                let created = schema
                    .split('_')
                    .nth(2)
                    .and_then(|secs| secs.parse::<u64>().ok());
                if created.is_some_and(|created| created < cutoff) {
                    // Another test binary may be dropping it too: failing here is fine.
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            }
        })
        .await;
}

async fn drop_schema(schema: &str) {
    let mut conn = admin().await;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop the test schema");
}

/// A builder that leaves migrating to the test, which calls `migrate` itself.
fn builder(schema: &str) -> PostgresStoreBuilder {
    PostgresStore::builder(database_url())
        .schema(schema)
        .max_connections(8)
        .auto_migrate(false)
}

async fn connect(builder: PostgresStoreBuilder) -> PostgresStore {
    builder
        .connect()
        .await
        .unwrap_or_else(|error| unreachable(error))
}

/// A migrated store in a schema of its own.
async fn fresh_store() -> (PostgresStore, String) {
    sweep_stale_schemas().await;
    let schema = fresh_schema();
    let store = connect(builder(&schema)).await;
    store.migrate().await.expect("migrate");
    (store, schema)
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(&Scope::from_bytes(b"postgres-tests"), name.as_bytes())
}

fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

fn response(body: &str) -> StoredResponse {
    StoredResponse::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::copy_from_slice(body.as_bytes()),
    )
}

async fn acquire(store: &PostgresStore, key: &RecordKey, lock: Duration) -> u64 {
    match store.begin(key, &fingerprint(1), lock).await {
        Ok(Begin::Acquired { token, .. }) => token.0,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

async fn complete(store: &PostgresStore, name: &str, ttl: Duration) -> u64 {
    let key = key(name);
    let token = acquire(store, &key, LONG).await;
    store
        .complete(
            &key,
            tower_idempotency::LeaseToken(token),
            &response(name),
            ttl,
        )
        .await
        .expect("complete");
    token
}

async fn row_count(store: &PostgresStore) -> i64 {
    let mut conn = admin().await;
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".\"{}\"",
        store.schema(),
        store.table()
    )))
    .fetch_one(&mut conn)
    .await
    .expect("count rows")
}

/// Begins racing on one key from `stores` (one per simulated process), `callers` in all.
async fn race(
    stores: &[PostgresStore],
    key: &RecordKey,
    callers: usize,
    tag: fn(usize) -> u8,
) -> Vec<Begin> {
    let start = Arc::new(Barrier::new(callers));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (start, key) = (start.clone(), *key);
            tokio::spawn(async move {
                start.wait().await;
                store.begin(&key, &fingerprint(tag(i)), LONG).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(callers);
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("begin"));
    }
    outcomes
}

fn count(outcomes: &[Begin], what: fn(&Begin) -> bool) -> usize {
    outcomes.iter().filter(|begun| what(begun)).count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_is_atomic_across_processes() {
    let (first, schema) = fresh_store().await;
    let mut stores = vec![first];
    for _ in 0..3 {
        stores.push(connect(builder(&schema)).await);
    }

    // A fresh key: one insert wins, the others conflict with a row their snapshot may not see.
    let outcomes = race(&stores, &key("fresh"), 64, |_| 1).await;
    let acquired = count(&outcomes, |b| matches!(b, Begin::Acquired { .. }));
    let in_flight = count(&outcomes, |b| matches!(b, Begin::InFlight));
    assert_eq!((acquired, in_flight), (1, 63), "{outcomes:?}");

    // Two fingerprints: one acquires, the other half all mismatch.
    let outcomes = race(&stores, &key("mixed"), 64, |i| 1 + (i % 2) as u8).await;
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::Acquired { .. })), 1);
    assert_eq!(
        count(&outcomes, |b| matches!(b, Begin::Mismatch)),
        32,
        "{outcomes:?}"
    );

    // An expired lease: exactly one caller takes it over, with a larger token.
    let expired = key("expired");
    let old = acquire(&stores[0], &expired, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    let outcomes = race(&stores, &expired, 64, |_| 1).await;
    let tokens: Vec<u64> = outcomes
        .iter()
        .filter_map(|b| match b {
            Begin::Acquired { token, .. } => Some(token.0),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 1, "{outcomes:?}");
    assert!(tokens[0] > old);
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::InFlight)), 63);

    drop(stores);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_and_release_in_one_process_wake_waiters_in_another() {
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;

    let completed = key("wake-complete");
    let token = acquire(&a, &completed, LONG).await;
    let subscription = b.subscribe(&completed);
    let woken = subscription.notified();
    assert_eq!(
        b.begin(&completed, &fingerprint(1), LONG).await.unwrap(),
        Begin::InFlight
    );
    assert!(b.watch(&completed).await.expect("watch"));
    a.complete(
        &completed,
        tower_idempotency::LeaseToken(token),
        &response("done"),
        LONG,
    )
    .await
    .expect("complete");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a completion in another process must wake the waiter");
    assert_eq!(
        b.begin(&completed, &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response("done"))
    );

    let released = key("wake-release");
    let token = acquire(&a, &released, LONG).await;
    let subscription = b.subscribe(&released);
    let woken = subscription.notified();
    assert!(b.watch(&released).await.expect("watch"));
    a.release(&released, tower_idempotency::LeaseToken(token))
        .await
        .expect("release");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a release in another process must wake the waiter");

    // Another table's completions do not reach this one's waiters.
    let other_table = connect(builder(&schema).table("other_records")).await;
    other_table
        .migrate()
        .await
        .expect("migrate the other table");
    assert_ne!(other_table.channel(), a.channel());
    let shared_name = key("same-key-other-table");
    let token = acquire(&other_table, &shared_name, LONG).await;
    let subscription = b.subscribe(&shared_name);
    let woken = subscription.notified();
    assert!(other_table.watch(&shared_name).await.expect("watch"));
    other_table
        .complete(
            &shared_name,
            tower_idempotency::LeaseToken(token),
            &response("x"),
            LONG,
        )
        .await
        .expect("complete");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), woken)
            .await
            .is_err(),
        "a completion in another table must not wake this table's waiters"
    );

    drop((a, b, other_table));
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_wakes_waiters_after_losing_its_connection() {
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;
    let application = format!("tower-idempotency listener {}", b.channel());
    let mut conn = admin().await;
    let listeners = async |conn: &mut PgConnection| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&application)
            .fetch_one(conn)
            .await
            .expect("count listeners")
    };
    assert_eq!(listeners(&mut conn).await, 2, "one listener per store");

    // A waiter armed before the connection drops: whatever it missed, it is woken on reconnect.
    let pending = key("pending-across-reconnect");
    acquire(&a, &pending, LONG).await;
    let subscription = b.subscribe(&pending);
    let woken_on_reconnect = subscription.notified();

    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .fetch_all(&mut conn)
    .await
    .expect("terminate the listeners");
    assert_eq!(terminated, [true, true]);

    tokio::time::timeout(NOTIFY_WITHIN, woken_on_reconnect)
        .await
        .expect("waiters must be woken once the listener is back");
    tokio::time::timeout(NOTIFY_WITHIN, async {
        while listeners(&mut conn).await < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both listeners must reconnect");

    // And notifications flow again.
    let after = key("after-reconnect");
    let token = acquire(&a, &after, LONG).await;
    let subscription = b.subscribe(&after);
    let woken = subscription.notified();
    assert!(b.watch(&after).await.expect("watch"));
    a.complete(
        &after,
        tower_idempotency::LeaseToken(token),
        &response("x"),
        LONG,
    )
    .await
    .expect("complete");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("the reconnected listener must deliver notifications");

    drop((a, b));
    drop_schema(&schema).await;
}

#[tokio::test]
async fn the_reaper_deletes_expired_rows_in_batches_and_spares_live_ones() {
    sweep_stale_schemas().await;
    let schema = fresh_schema();
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
        assert_eq!(
            store
                .begin(&key(&name), &fingerprint(1), LONG)
                .await
                .unwrap()
                .completed()
                .cloned(),
            Some(response(&name))
        );
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
    let schema = fresh_schema();
    let store = connect(builder(&schema).reaper_interval(Duration::from_millis(100))).await;
    store.migrate().await.expect("migrate");
    complete(&store, "short-lived", SHORT).await;
    complete(&store, "long-lived", LONG).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while row_count(&store).await > 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the reaper must delete the expired row");
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
    let schema = fresh_schema();
    let table = "t".repeat(63);
    let store = connect(builder(&schema).table(&table)).await;
    store.migrate().await.expect("migrate");
    store.migrate().await.expect("migrate again");
    complete(&store, "long-names", LONG).await;
    assert_eq!(
        store
            .begin(&key("long-names"), &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response("long-names"))
    );
    drop(store);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrating_twice_or_concurrently_is_harmless() {
    sweep_stale_schemas().await;
    let schema = fresh_schema();
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
    let Begin::Acquired {
        token,
        attempt,
        recovery_point,
    } = store.begin(&lapsed, &fingerprint(1), LONG).await.unwrap()
    else {
        panic!("the lapsed lease must be taken over");
    };
    assert_eq!((attempt, recovery_point), (2, None));
    let point = tower_idempotency::Checkpoint::new("step", Bytes::from_static(b"1")).unwrap();
    store
        .checkpoint(&lapsed, token, &point)
        .await
        .expect("checkpoint on a migrated row");
    drop(store);
    drop_schema(&schema).await;
}

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
    let replayed = key("replayed");
    let before = row_version(&mut conn, &store, &replayed).await;
    assert_eq!(before.2, "0", "a settled row carries no lock");
    for _ in 0..20 {
        assert!(
            store
                .begin(&replayed, &fingerprint(1), LONG)
                .await
                .unwrap()
                .completed()
                .is_some()
        );
        assert_eq!(
            store.begin(&replayed, &fingerprint(2), LONG).await.unwrap(),
            Begin::Mismatch
        );
    }
    assert_eq!(
        row_version(&mut conn, &store, &replayed).await,
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
    for (name, corrupt) in [
        ("unknown-version", &b"\x09\x00\xc8\x00\x00"[..]),
        ("truncated", &b"\x01\x00"[..]),
    ] {
        complete(&store, name, LONG).await;
        sqlx::query(AssertSqlSafe(format!(
            "UPDATE \"{schema}\".idempotency_records SET response = $2 WHERE key = $1"
        )))
        .bind(&key(name).as_bytes()[..])
        .bind(corrupt)
        .execute(&mut conn)
        .await
        .expect("corrupt the row");
        let begun = store.begin(&key(name), &fingerprint(1), LONG).await;
        assert!(
            matches!(begun, Err(StoreError::Corrupt(_))),
            "{name}: {begun:?}"
        );
    }
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
    let schema = fresh_schema();
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
    let schema = fresh_schema();
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

// Group commit: concurrent begins and completes run as one statement per batch.

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
        hex(poison.as_bytes())
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
    let spawn_begin = |name: String| {
        let store = store.clone();
        tokio::spawn(async move { store.begin(&key(&name), &fingerprint(1), LONG).await })
    };
    // Two calls occupy the two batches in flight (blocked by the lock) ...
    let openers: Vec<_> = (0..2).map(|i| spawn_begin(format!("opener-{i}"))).collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while these gather into the next one, with the poison among them.
    let mut members: Vec<_> = (0..10)
        .map(|i| spawn_begin(format!("member-{i}")))
        .collect();
    members.push({
        let store = store.clone();
        tokio::spawn(async move { store.begin(&poison, &fingerprint(1), LONG).await })
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    unlock(lock).await;
    for opener in openers {
        assert!(matches!(
            opener.await.expect("task"),
            Ok(Begin::Acquired { .. })
        ));
    }
    for member in members {
        let failed = member.await.expect("task");
        assert!(
            matches!(&failed, Err(StoreError::Backend(error)) if error.to_string().contains("refused")),
            "{failed:?}"
        );
    }
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

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
/// Forgets go through NOTIFY: a forget in one process reaches another's forget feed, and a
/// forced forget wakes the other's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_in_one_process_reaches_anothers_feed() {
    use tower_idempotency::store::{ForgetEvent, Forgotten};
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;
    let mut feed = b
        .forget_feed()
        .expect("the PostgreSQL store has a forget feed");

    let completed = key("forget-across");
    let token = acquire(&a, &completed, LONG).await;
    a.complete(
        &completed,
        tower_idempotency::LeaseToken(token),
        &response("x"),
        LONG,
    )
    .await
    .expect("complete");
    assert_eq!(
        a.forget(&completed, false).await.unwrap(),
        Forgotten::Completed
    );
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(
        heard.expect("in time").ok(),
        Some(ForgetEvent::Key(completed))
    );

    let stuck = key("forget-stuck-across");
    acquire(&a, &stuck, LONG).await;
    let subscription = b.subscribe(&stuck);
    let woken = subscription.notified();
    assert!(matches!(
        a.forget(&stuck, true).await.unwrap(),
        Forgotten::LeaseEnded { .. }
    ));
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("a forced forget wakes waiters in other processes, watched or not");
    let heard = tokio::time::timeout(NOTIFY_WITHIN, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Key(stuck)));

    drop((a, b));
    drop_schema(&schema).await;
}

/// A listener that lost its connection may have missed forgets: its feed says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnect_tells_the_feed_forgets_may_be_missed() {
    use tower_idempotency::store::ForgetEvent;
    let (store, schema) = fresh_store().await;
    let mut feed = store.forget_feed().expect("a forget feed");
    let application = format!("tower-idempotency listener {}", store.channel());
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .fetch_all(&mut admin().await)
    .await
    .expect("terminate the listener");
    assert_eq!(terminated, [true]);
    let heard = tokio::time::timeout(NOTIFY_WITHIN * 3, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Unknown));
    drop(store);
    drop_schema(&schema).await;
}
