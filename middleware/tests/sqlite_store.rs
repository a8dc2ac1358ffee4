//! The SQLite store against real database files: the contract suite, then durability across
//! reopening, the reaper and corrupt records. Every test uses a fresh file in a temporary
//! directory of its own.

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::Subscription;
use tower_idempotency::{
    Begin, IdempotencyStore, LeaseToken, RecordKey, Scope, SqliteStore, StoreError, StoredResponse,
};

const LONG: Duration = Duration::from_secs(600);
const SHORT: Duration = Duration::from_millis(150);

/// A store and the directory holding its file, removed when the store is dropped.
struct TempStore {
    store: SqliteStore,
    _dir: TempDir,
}

impl TempStore {
    async fn new() -> Self {
        let dir = TempDir::new().expect("temporary directory");
        let store = SqliteStore::connect(&url(&dir))
            .await
            .expect("open the store");
        Self { store, _dir: dir }
    }
}

#[async_trait]
impl IdempotencyStore for TempStore {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.store.begin(key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.complete(key, token, response, ttl).await
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.store.release(key, token).await
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &tower_idempotency::Checkpoint,
    ) -> Result<(), StoreError> {
        self.store.checkpoint(key, token, checkpoint).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.store.renew(key, token, lock_ttl).await
    }

    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.store.subscribe(key)
    }

    async fn ping(&self) -> Result<(), StoreError> {
        self.store.ping().await
    }

    async fn inspect(
        &self,
        key: &RecordKey,
    ) -> Result<Option<tower_idempotency::store::RecordInfo>, StoreError> {
        self.store.inspect(key).await
    }

    async fn forget(
        &self,
        key: &RecordKey,
        force: bool,
    ) -> Result<tower_idempotency::store::Forgotten, StoreError> {
        self.store.forget(key, force).await
    }

    fn forget_feed(&self) -> Option<tower_idempotency::store::ForgetFeed> {
        self.store.forget_feed()
    }
}

mod conformance {
    tower_idempotency::store_conformance_tests!(super::TempStore::new);
}

mod model_ops;

mod model {
    use proptest::prelude::*;
    use tower_idempotency::conformance::check_model;

    proptest! {
        // SQLite keeps time on its own clock, so every sleep in a sequence is a real 450 ms:
        // fewer, shorter cases than the memory store's.
        #![proptest_config(ProptestConfig::with_cases(12))]

        /// Random sequences of begin/complete/release/renew/expiry agree with the contract's
        /// model on a real database file.
        #[test]
        fn the_sqlite_store_follows_the_contract_model(ops in super::model_ops::sequence(24)) {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            runtime.block_on(async { check_model(super::TempStore::new().await, &ops).await });
        }
    }
}

fn url(dir: &TempDir) -> String {
    format!("sqlite://{}", dir.path().join("idempotency.db").display())
}

fn key(name: &str) -> RecordKey {
    RecordKey::new(&Scope::from_bytes(b"sqlite-tests"), name.as_bytes())
}

fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

fn response(body: &'static str) -> StoredResponse {
    StoredResponse::new(
        StatusCode::OK,
        HeaderMap::new(),
        Bytes::from_static(body.as_bytes()),
    )
}

async fn acquire(store: &SqliteStore, key: &RecordKey, lock: Duration) -> LeaseToken {
    match store.begin(key, &fingerprint(1), lock).await {
        Ok(Begin::Acquired { token, .. }) => token,
        other => panic!("expected to acquire, got {other:?}"),
    }
}

async fn complete(
    store: &SqliteStore,
    name: &str,
    body: &'static str,
    ttl: Duration,
) -> LeaseToken {
    let key = key(name);
    let token = acquire(store, &key, LONG).await;
    store
        .complete(&key, token, &response(body), ttl)
        .await
        .expect("complete");
    token
}

async fn row_count(dir: &TempDir) -> i64 {
    let mut conn = SqliteConnection::connect(&url(dir)).await.expect("open");
    sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&mut conn)
        .await
        .expect("count rows")
}

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
    assert_eq!(applied, [1, 2]);
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
    let Begin::Acquired {
        token,
        attempt,
        recovery_point,
    } = store.begin(&lapsed, &fingerprint(1), LONG).await.unwrap()
    else {
        panic!("the lapsed lease must be taken over");
    };
    assert!(token.0 > 7);
    assert_eq!((attempt, recovery_point), (2, None));
    let point = tower_idempotency::Checkpoint::new("step", Bytes::from_static(b"1")).unwrap();
    store
        .checkpoint(&lapsed, token, &point)
        .await
        .expect("checkpoint on a migrated row");
}

#[tokio::test]
async fn records_survive_reopening_the_file() {
    let dir = TempDir::new().expect("temporary directory");
    let first = SqliteStore::connect(&url(&dir)).await.expect("open");
    let token = complete(&first, "durable", "kept", LONG).await;
    let running = acquire(&first, &key("running"), LONG).await;
    drop(first);

    // A new store (a restarted process) on the same file: migrations find the work done, the
    // completed record replays, the lease still holds, and tokens keep growing.
    let second = SqliteStore::connect(&url(&dir)).await.expect("reopen");
    assert_eq!(
        second
            .begin(&key("durable"), &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response("kept"))
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
async fn the_reaper_deletes_expired_rows_in_batches_and_spares_live_ones() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::builder(url(&dir))
        .reaper_interval(Duration::ZERO)
        .reaper_batch(7)
        .connect()
        .await
        .expect("open");
    for i in 0..20 {
        complete(&store, &format!("expired-{i}"), "x", SHORT).await;
    }
    for i in 0..5 {
        acquire(&store, &key(&format!("dead-lease-{i}")), SHORT).await;
    }
    for i in 0..10 {
        complete(&store, &format!("live-{i}"), "live", LONG).await;
    }
    acquire(&store, &key("live-lease"), LONG).await;
    tokio::time::sleep(SHORT * 2).await;

    assert_eq!(store.reap_expired().await.expect("reap"), 25);
    assert_eq!(row_count(&dir).await, 11);
    assert_eq!(store.reap_expired().await.expect("reap"), 0);
    for i in 0..10 {
        assert_eq!(
            store
                .begin(&key(&format!("live-{i}")), &fingerprint(1), LONG)
                .await
                .unwrap()
                .completed()
                .cloned(),
            Some(response("live"))
        );
    }
    assert_eq!(
        store
            .begin(&key("live-lease"), &fingerprint(1), LONG)
            .await
            .unwrap(),
        Begin::InFlight
    );

    // A token issued after the old rows are gone is still larger than theirs.
    let old = complete(&store, "reacquired", "x", SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!(store.reap_expired().await.expect("reap"), 1);
    assert!(acquire(&store, &key("reacquired"), LONG).await > old);
}

#[tokio::test]
async fn the_background_reaper_runs_on_its_own() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::builder(url(&dir))
        .reaper_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("open");
    complete(&store, "short-lived", "x", SHORT).await;
    complete(&store, "long-lived", "x", LONG).await;
    tokio::time::timeout(Duration::from_secs(5), async {
        while row_count(&dir).await > 1 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
    .expect("the reaper must delete the expired row");
    assert_eq!(row_count(&dir).await, 1, "the live row stays");
}

#[tokio::test]
async fn a_corrupt_stored_response_is_an_error_not_a_panic() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    for (name, corrupt) in [
        ("unknown-version", &b"\x09\x00\xc8\x00\x00"[..]),
        ("truncated", &b"\x01\x00"[..]),
    ] {
        complete(&store, name, "x", LONG).await;
        sqlx::query("UPDATE idempotency_records SET response = ?2 WHERE key = ?1")
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
    let token = complete(&store, "in-memory", "kept", LONG).await;
    assert_eq!(
        store
            .begin(&key("in-memory"), &fingerprint(1), LONG)
            .await
            .unwrap()
            .completed()
            .cloned(),
        Some(response("kept"))
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
    complete(&store, "pooled", "body", LONG).await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&pool)
        .await
        .expect("count through the application's pool");
    assert_eq!(rows, 1);
}

// Group commit: the writes that queue while the writer is busy share one transaction.

mod batch_sizes {
    //! A recorder of the batch-size histogram of one store.
    use std::sync::{Arc, Mutex};

    use metrics::{
        Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString,
        Unit,
    };

    #[derive(Default, Clone)]
    pub(crate) struct Sizes(Arc<Mutex<Vec<f64>>>);

    impl Sizes {
        pub(crate) fn seen(&self) -> Vec<f64> {
            self.0.lock().expect("sizes").clone()
        }
    }

    impl HistogramFn for Sizes {
        fn record(&self, value: f64) {
            self.0.lock().expect("sizes").push(value);
        }
    }

    impl Recorder for Sizes {
        fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
        fn register_counter(&self, _: &Key, _: &Metadata<'_>) -> Counter {
            Counter::noop()
        }
        fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
            Gauge::noop()
        }
        fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
            if key.name() == tower_idempotency::store::STORE_BATCH_SIZE {
                Histogram::from_arc(Arc::new(self.clone()))
            } else {
                Histogram::noop()
            }
        }
    }
}

/// Opens a store whose batch sizes `sizes` records (the histogram handle is taken when the
/// store starts its writer).
async fn store_recording(dir: &TempDir, sizes: &batch_sizes::Sizes) -> SqliteStore {
    let url = url(dir);
    tokio::task::block_in_place(|| {
        metrics::with_local_recorder(sizes, || {
            tokio::runtime::Handle::current().block_on(SqliteStore::connect(&url))
        })
    })
    .expect("open the store")
}

/// Holds SQLite's write lock from a connection of its own until [`unlock`].
async fn hold_write_lock(dir: &TempDir) -> SqliteConnection {
    let mut conn = SqliteConnection::connect(&url(dir)).await.expect("open");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .expect("take the write lock");
    conn
}

async fn unlock(mut conn: SqliteConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_while_the_writer_is_busy_share_one_transaction() {
    let dir = TempDir::new().expect("temporary directory");
    let sizes = batch_sizes::Sizes::default();
    let store = store_recording(&dir, &sizes).await;
    let lock = hold_write_lock(&dir).await;
    // Forty distinct keys, and the first of them twice more from two fingerprints. The three
    // calls on that key race, so which one wins is up to the scheduler: exactly one is acquired,
    // a loser with the winner's fingerprint sees it in flight and one with the other a mismatch.
    let calls: Vec<_> = (0..40u8)
        .map(|i| (i, 1u8))
        .chain([(0, 1), (0, 2)])
        .map(|(i, tag)| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = key(&format!("distinct-{i}"));
                (key, tag, store.begin(&key, &fingerprint(tag), LONG).await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    let mut leases = Vec::new();
    let mut same_key = Vec::new();
    for call in calls {
        let (key, tag, begun) = call.await.expect("task");
        let begun = begun.expect("begin");
        if key == self::key("distinct-0") {
            same_key.push((tag, begun));
        } else if let Begin::Acquired { token, .. } = begun {
            leases.push((key, tag, token));
        } else {
            panic!("a fresh key must be acquired: {begun:?}");
        }
    }
    let winners: Vec<_> = same_key
        .iter()
        .filter_map(|(tag, begun)| match begun {
            Begin::Acquired { token, .. } => Some((*tag, *token)),
            _ => None,
        })
        .collect();
    let [(winning_tag, token)] = winners[..] else {
        panic!("exactly one call on a key is acquired: {same_key:?}");
    };
    leases.push((key("distinct-0"), winning_tag, token));
    for (tag, begun) in &same_key {
        match begun {
            Begin::Acquired { .. } => {}
            Begin::InFlight => assert_eq!(*tag, winning_tag, "{same_key:?}"),
            Begin::Mismatch => assert_ne!(*tag, winning_tag, "{same_key:?}"),
            other => panic!("a loser is in flight or a mismatch: {other:?}"),
        }
    }
    let mut tokens: Vec<_> = leases.iter().map(|(_, _, token)| token.0).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 40, "every lease has a token of its own");
    let completes: Vec<_> = leases
        .iter()
        .map(|(key, _, token)| {
            let (store, key, token) = (store.clone(), *key, *token);
            tokio::spawn(async move { store.complete(&key, token, &response("ok"), LONG).await })
        })
        .collect();
    for complete in completes {
        complete.await.expect("task").expect("complete");
    }
    for (key, tag, _) in &leases {
        assert!(matches!(
            store.begin(key, &fingerprint(*tag), LONG).await,
            Ok(Begin::Completed { response: stored, .. }) if stored.body == "ok".as_bytes()
        ));
    }
    let seen = sizes.seen();
    let writes: f64 = seen.iter().sum();
    assert_eq!(writes, 82.0, "every write counted once: {seen:?}");
    assert!(
        seen.iter().any(|size| *size >= 10.0),
        "the queued writes shared transactions: {seen:?}"
    );
}

/// A statement that fails in the middle of a batch (a trigger refusing one key) rolls the whole
/// transaction back: every call of the batch fails and none of its rows is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_fails_every_call_and_writes_nothing() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let poison = key("poison");
    let hex: String = poison
        .as_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_records \
         WHEN NEW.key = x'{hex}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )))
    .execute(&mut conn)
    .await
    .expect("create the trigger");

    let lock = hold_write_lock(&dir).await;
    let spawn_begin = |key: RecordKey| {
        let store = store.clone();
        tokio::spawn(async move { store.begin(&key, &fingerprint(1), LONG).await })
    };
    // The first call occupies the writer (waiting for the lock) ...
    let opener = spawn_begin(key("opener"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while these gather into the next batch, the poison among them.
    let mut members: Vec<_> = (0..8)
        .map(|i| spawn_begin(key(&format!("m-{i}"))))
        .collect();
    members.push(spawn_begin(poison));
    tokio::time::sleep(Duration::from_millis(200)).await;
    unlock(lock).await;
    assert!(matches!(
        opener.await.expect("task"),
        Ok(Begin::Acquired { .. })
    ));
    for member in members {
        let failed = member.await.expect("task");
        assert!(
            matches!(&failed, Err(StoreError::Backend(error)) if error.to_string().contains("refused")),
            "{failed:?}"
        );
    }
    assert_eq!(row_count(&dir).await, 1, "only the opener's row exists");
    assert!(matches!(
        store.begin(&key("m-3"), &fingerprint(1), LONG).await,
        Ok(Begin::Acquired { .. })
    ));
}
