//! `PostgresStore::complete_in`, `checkpoint_in` and `fence_in` against the shared PostgreSQL:
//! the record and the handler's effect rows commit together or not at all, a stale holder is
//! refused inside its transaction, a takeover waits for a transaction that holds the record,
//! and the layer stores nothing more for a response completed this way.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::routing::post;
use axum::{Extension, Router};
use sqlx::PgPool;
use test_fixtures::{database_url, require_postgres, test_schema};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::Subscription;
use tower_idempotency::{
    Begin, Checkpoint, IdempotencyLayer, IdempotencyStore, Lease, LeaseToken, Policy,
    PostgresStore, RecordKey, Scope, StoreError, StoredResponse,
};

struct Db {
    pool: PgPool,
    store: PostgresStore,
    schema: String,
}

impl Db {
    async fn new() -> Self {
        require_postgres(&database_url());
        let pool = PgPool::connect(&database_url()).await.expect("connect");
        let schema = test_schema();
        let store = PostgresStore::from_pool(pool.clone())
            .schema(&schema)
            .connect()
            .await
            .expect("store");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE TABLE \"{schema}\".effects (id bigserial PRIMARY KEY, token bigint NOT NULL)"
        )))
        .execute(&pool)
        .await
        .expect("effects table");
        Self {
            pool,
            store,
            schema,
        }
    }

    async fn acquire(&self, key: &RecordKey, lock_ttl: Duration) -> Lease {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        match self.store.begin(key, &fingerprint, lock_ttl).await {
            Ok(Begin::Acquired {
                token,
                attempt,
                recovery_point,
            }) => Lease::new(
                Arc::new(self.store.clone()),
                *key,
                (token, attempt, recovery_point),
                false,
            ),
            other => panic!("expected to acquire, got {other:?}"),
        }
    }

    async fn begin(&self, key: &RecordKey) -> Begin {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        self.store
            .begin(key, &fingerprint, Duration::from_secs(30))
            .await
            .expect("begin")
    }

    async fn effect(&self, conn: &mut sqlx::PgConnection, lease: &Lease) {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO \"{}\".effects (token) VALUES ($1)",
            self.schema
        )))
        .bind(i64::try_from(lease.token().0).expect("token"))
        .execute(conn)
        .await
        .expect("effect");
    }

    async fn effects(&self) -> i64 {
        sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT count(*) FROM \"{}\".effects",
            self.schema
        )))
        .fetch_one(&self.pool)
        .await
        .expect("count")
    }

    async fn drop(self) {
        let sql = format!("DROP SCHEMA \"{}\" CASCADE", self.schema);
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.pool)
            .await;
    }
}

fn created(body: &'static str) -> http::Response<&'static str> {
    http::Response::builder()
        .status(201)
        .body(body)
        .expect("response")
}

#[tokio::test]
async fn the_record_commits_with_the_effects_or_neither_does() {
    let db = Db::new().await;
    let key = RecordKey::new(&Scope::anonymous(), b"rolled-back");
    let lease = db.acquire(&key, Duration::from_secs(30)).await;

    let mut tx = db.pool.begin().await.expect("tx");
    db.effect(&mut tx, &lease).await;
    let marked: http::Response<bytes::Bytes> = db
        .store
        .complete_in(&mut tx, &lease, created("first"))
        .await
        .expect("complete_in");
    assert!(
        marked
            .extensions()
            .get::<tower_idempotency::CompletedByHandler>()
            .is_some()
    );
    tx.rollback().await.expect("rollback");
    assert_eq!(db.effects().await, 0);
    assert_eq!(
        db.begin(&key).await,
        Begin::InFlight,
        "no record was stored"
    );

    let mut tx = db.pool.begin().await.expect("tx");
    db.effect(&mut tx, &lease).await;
    let _: http::Response<bytes::Bytes> = db
        .store
        .complete_in(&mut tx, &lease, created("second"))
        .await
        .expect("complete_in");
    tx.commit().await.expect("commit");
    assert_eq!(db.effects().await, 1);
    match db.begin(&key).await {
        Begin::Completed {
            response: stored, ..
        } => assert_eq!(&stored.body[..], b"second"),
        other => panic!("expected the stored response, got {other:?}"),
    }
    db.drop().await;
}

#[tokio::test]
async fn outside_a_transaction_nothing_is_written() {
    let db = Db::new().await;
    let key = RecordKey::new(&Scope::anonymous(), b"autocommit");
    let lease = db.acquire(&key, Duration::from_secs(30)).await;
    let mut conn = db.pool.acquire().await.expect("connection");
    let refused = db
        .store
        .complete_in::<bytes::Bytes>(&mut conn, &lease, created("x"))
        .await
        .expect_err("refused");
    assert!(
        refused.to_string().contains("in a transaction"),
        "{refused}"
    );
    let refused = db
        .store
        .checkpoint_in(&mut conn, &lease, "step", "x")
        .await
        .expect_err("refused");
    assert!(!refused.is_lease_lost(), "{refused}");
    assert_eq!(db.begin(&key).await, Begin::InFlight);
    db.drop().await;
}

#[tokio::test]
async fn a_stale_holder_is_refused_inside_its_transaction() {
    let db = Db::new().await;
    let key = RecordKey::new(&Scope::anonymous(), b"stale");
    let lock_ttl = Duration::from_millis(200);
    let stale = db.acquire(&key, lock_ttl).await;
    tokio::time::sleep(lock_ttl * 2).await;
    let current = db.acquire(&key, lock_ttl).await;
    assert!(current.token() > stale.token());

    let mut tx = db.pool.begin().await.expect("tx");
    db.effect(&mut tx, &stale).await;
    let error = db
        .store
        .checkpoint_in(&mut tx, &stale, "charged", "x")
        .await
        .expect_err("stale checkpoint");
    assert!(error.is_lease_lost(), "{error}");
    assert!(matches!(
        db.store.fence_in(&mut tx, &stale).await,
        Err(StoreError::LeaseLost)
    ));
    assert!(matches!(
        db.store
            .complete_in::<bytes::Bytes>(&mut tx, &stale, created("stale"))
            .await,
        Err(StoreError::LeaseLost)
    ));
    drop(tx); // rolls back, with the stale effect
    assert_eq!(db.effects().await, 0);

    let mut tx = db.pool.begin().await.expect("tx");
    db.store.fence_in(&mut tx, &current).await.expect("held");
    db.store
        .checkpoint_in(&mut tx, &current, "charged", "y")
        .await
        .expect("current checkpoint");
    tx.commit().await.expect("commit");
    db.drop().await;
}

#[tokio::test]
async fn a_takeover_waits_for_the_transaction_holding_the_record() {
    let db = Db::new().await;
    let key = RecordKey::new(&Scope::anonymous(), b"held");
    let lock_ttl = Duration::from_millis(200);
    let lease = db.acquire(&key, lock_ttl).await;
    let mut tx = db.pool.begin().await.expect("tx");
    db.store.fence_in(&mut tx, &lease).await.expect("held");
    db.effect(&mut tx, &lease).await;
    // The lease lapses while the transaction runs: a takeover must wait for it, not run.
    tokio::time::sleep(lock_ttl * 2).await;
    let store = db.store.clone();
    let takeover = tokio::spawn(async move {
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        store.begin(&key, &fingerprint, lock_ttl).await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !takeover.is_finished(),
        "the takeover waits for the row lock"
    );
    let _: http::Response<bytes::Bytes> = db
        .store
        .complete_in(&mut tx, &lease, created("held"))
        .await
        .expect("the lapsed holder still completes: nobody took over");
    tx.commit().await.expect("commit");
    match takeover.await.expect("task").expect("begin") {
        Begin::Completed {
            response: stored, ..
        } => assert_eq!(&stored.body[..], b"held"),
        other => panic!("the takeover must see the committed record, got {other:?}"),
    }
    assert_eq!(db.effects().await, 1);
    db.drop().await;
}

/// The Postgres store, counting the layer's own `complete` and `release` calls.
#[derive(Clone)]
struct Counting {
    inner: PostgresStore,
    completes: Arc<AtomicUsize>,
    releases: Arc<AtomicUsize>,
}

#[async_trait]
impl IdempotencyStore for Counting {
    async fn begin(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lock: Duration,
    ) -> Result<Begin, StoreError> {
        self.inner.begin(key, fp, lock).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.completes.fetch_add(1, Ordering::SeqCst);
        self.inner.complete(key, token, response, ttl).await
    }
    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        self.inner.checkpoint(key, token, checkpoint).await
    }
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.releases.fetch_add(1, Ordering::SeqCst);
        self.inner.release(key, token).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock: Duration,
    ) -> Result<(), StoreError> {
        self.inner.renew(key, token, lock).await
    }
    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.inner.subscribe(key)
    }
    async fn watch(&self, key: &RecordKey) -> Result<bool, StoreError> {
        self.inner.watch(key).await
    }
}

async fn pay(
    State((db, store)): State<(PgPool, PostgresStore)>,
    Extension(lease): Extension<Lease>,
) -> Result<axum::response::Response, String> {
    let _ = &db;
    let mut tx = db.begin().await.map_err(|e| e.to_string())?;
    let response = http::Response::builder()
        .status(201)
        .header("content-type", "text/plain")
        .body(format!("paid under attempt {}", lease.attempt()))
        .map_err(|e| e.to_string())?;
    let response = store
        .complete_in(&mut tx, &lease, response)
        .await
        .map_err(|e| e.to_string())?;
    tx.commit().await.map_err(|e| e.to_string())?;
    Ok(response)
}

#[tokio::test]
async fn the_layer_stores_nothing_more_for_a_response_completed_in_the_handlers_transaction() {
    let db = Db::new().await;
    let counting = Counting {
        inner: db.store.clone(),
        completes: Arc::default(),
        releases: Arc::default(),
    };
    let app = Router::new()
        .route("/pay", post(pay))
        .with_state((db.pool.clone(), db.store.clone()))
        .layer(
            IdempotencyLayer::new(counting.clone())
                .policy(Policy::default().with_ttl(Duration::from_secs(90))),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/pay", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let client = reqwest::Client::new();
    let send = || client.post(&url).header("idempotency-key", "k1").send();

    let first = send().await.expect("first");
    assert_eq!(first.status(), 201);
    assert!(first.headers().get("idempotent-replayed").is_none());
    assert_eq!(first.text().await.expect("body"), "paid under attempt 1");
    let retry = send().await.expect("retry");
    assert_eq!(retry.headers()["idempotent-replayed"], "true");
    assert_eq!(retry.headers()["content-type"], "text/plain");
    assert_eq!(retry.text().await.expect("body"), "paid under attempt 1");
    assert_eq!(
        counting.completes.load(Ordering::SeqCst),
        0,
        "stored once, by the handler"
    );
    assert_eq!(counting.releases.load(Ordering::SeqCst), 0);
    // The route's ttl reached the handler's completion.
    let left: f64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
        "SELECT extract(epoch FROM expires_at - now())::float8 FROM \"{}\".idempotency_records",
        db.schema
    )))
    .fetch_one(&db.pool)
    .await
    .expect("expiry");
    assert!((80.0..=90.0).contains(&left), "{left}");
    db.drop().await;
}
