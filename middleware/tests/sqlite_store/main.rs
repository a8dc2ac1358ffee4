//! The SQLite store against real database files: the contract suite, then durability across
//! reopening, the reaper, corrupt records and group commit. Every test uses a fresh file in a
//! temporary directory of its own.

use std::time::Duration;

use async_trait::async_trait;
use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::Subscription;
use tower_idempotency::{
    Begin, IdempotencyStore, LeaseToken, RecordKey, SqliteStore, StoreError, StoredResponse,
};

mod files;
mod forget_log;
mod group_commit;
mod reaper;

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

#[path = "../model_ops/mod.rs"]
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

async fn row_count(dir: &TempDir) -> i64 {
    let mut conn = SqliteConnection::connect(&url(dir)).await.expect("open");
    sqlx::query_scalar("SELECT count(*) FROM idempotency_records")
        .fetch_one(&mut conn)
        .await
        .expect("count rows")
}
