//! The replay cache: replays answered in process, never past a forget or the record's expiry,
//! off for a store that cannot report forgets.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::record::StoredResponse;
use tower_idempotency::store::{ForgetEvent, ForgetFeed, Subscription};
use tower_idempotency::{
    Begin, IdempotencyLayer, IdempotencyStore, LeaseToken, MemoryStore, Policy, RecordKey,
    ReplayCacheLimits, StoreError,
};

use super::{App, memory};

/// A real [`MemoryStore`] that can forget on purpose and reports it on a [`ForgetFeed`], as the
/// fleet stores do: forgetting swaps in an empty store (every record is gone) and reports each
/// key this store completed. It also counts `begin` calls, to see which replays the cache answered.
struct Forgetting {
    records: std::sync::RwLock<Arc<MemoryStore>>,
    completed: std::sync::Mutex<Vec<RecordKey>>,
    feed: tokio::sync::broadcast::Sender<ForgetEvent>,
    begins: AtomicUsize,
}

impl Forgetting {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            records: std::sync::RwLock::new(Arc::new(MemoryStore::new())),
            completed: std::sync::Mutex::default(),
            feed: tokio::sync::broadcast::channel(16).0,
            begins: AtomicUsize::new(0),
        })
    }

    fn records(&self) -> Arc<MemoryStore> {
        self.records.read().expect("lock").clone()
    }

    fn forget_everything(&self) {
        *self.records.write().expect("lock") = Arc::new(MemoryStore::new());
        for key in self.completed.lock().expect("lock").drain(..) {
            let _ = self.feed.send(ForgetEvent::Key(key));
        }
    }

    fn begins(&self) -> usize {
        self.begins.load(Ordering::SeqCst)
    }
}

#[async_trait]
impl IdempotencyStore for Forgetting {
    async fn begin(
        &self,
        key: &RecordKey,
        fingerprint: &Fingerprint,
        lock_ttl: Duration,
    ) -> Result<Begin, StoreError> {
        self.begins.fetch_add(1, Ordering::SeqCst);
        self.records().begin(key, fingerprint, lock_ttl).await
    }

    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.records().complete(key, token, response, ttl).await?;
        self.completed.lock().expect("lock").push(*key);
        Ok(())
    }

    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.records().release(key, token).await
    }

    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &tower_idempotency::Checkpoint,
    ) -> Result<(), StoreError> {
        self.records().checkpoint(key, token, checkpoint).await
    }

    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock_ttl: Duration,
    ) -> Result<(), StoreError> {
        self.records().renew(key, token, lock_ttl).await
    }

    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.records().subscribe(key)
    }

    fn forget_feed(&self) -> Option<ForgetFeed> {
        Some(self.feed.subscribe())
    }
}

const CACHE: ReplayCacheLimits = ReplayCacheLimits {
    max_entries: 1000,
    max_bytes: 1 << 20,
};

#[tokio::test(flavor = "multi_thread")]
async fn the_replay_cache_answers_replays_and_never_replays_a_forgotten_record() {
    let store = Forgetting::new();
    let layer = IdempotencyLayer::from_shared_store(store.clone()).replay_cache(CACHE);
    assert!(layer.replay_cache_enabled());
    let app = App::start(layer).await;

    let first = app.send(app.post("/payments", "c1").body("10 EUR")).await;
    assert_eq!(first.body, "charge 1 for 10 EUR");
    assert_eq!(store.begins(), 1);
    let retry = app.send(app.post("/payments", "c1").body("10 EUR")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(retry.body, first.body);
    assert_eq!(
        store.begins(),
        2,
        "a record is cached when a replay reads it"
    );
    let again = app.send(app.post("/payments", "c1").body("10 EUR")).await;
    assert!(again.replayed(), "{again:?}");
    assert_eq!(again.body, first.body);
    let reused = app.send(app.post("/payments", "c1").body("99 EUR")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.problem_type(), "key-reused");
    assert_eq!(store.begins(), 2, "both answered from the cache");

    store.forget_everything();
    let after = app.send(app.post("/payments", "c1").body("10 EUR")).await;
    assert!(
        !after.replayed(),
        "a forgotten record is never replayed: {after:?}"
    );
    assert_eq!(after.body, "charge 2 for 10 EUR");
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replay_cache_never_replays_an_expired_record() {
    let store = Forgetting::new();
    let layer = IdempotencyLayer::from_shared_store(store.clone())
        .policy(Policy::default().with_ttl(Duration::from_millis(400)))
        .replay_cache(CACHE);
    let app = App::start(layer).await;

    app.send(app.post("/payments", "e1").body("x")).await;
    app.send(app.post("/payments", "e1").body("x")).await;
    let fresh = app.send(app.post("/payments", "e1").body("x")).await;
    assert!(fresh.replayed());
    assert_eq!(store.begins(), 2, "answered from the cache");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expired = app.send(app.post("/payments", "e1").body("x")).await;
    assert!(
        !expired.replayed(),
        "an expired record is never replayed: {expired:?}"
    );
    assert_eq!(app.counters.runs(), 2);
}

/// On by default, for a store that reports forgets; `ReplayCacheLimits::OFF` turns it off.
#[tokio::test(flavor = "multi_thread")]
async fn the_replay_cache_is_on_by_default_and_off_turns_it_off() {
    let store = Forgetting::new();
    assert!(IdempotencyLayer::from_shared_store(store.clone()).replay_cache_enabled());
    assert!(
        !IdempotencyLayer::from_shared_store(store)
            .replay_cache(ReplayCacheLimits::OFF)
            .replay_cache_enabled()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_replay_cache_stays_off_for_a_store_without_a_forget_feed() {
    // Today's memory store reports no forgets: a cache could not drop what it forgets.
    let layer = memory().replay_cache(CACHE);
    assert_eq!(
        layer.replay_cache_enabled(),
        MemoryStore::new().forget_feed().is_some()
    );
}

/// A replay read from the store is cached too, until the record's own expiry: a second process
/// sharing the store answers its later replays in process, with the time counting down.
#[tokio::test(flavor = "multi_thread")]
async fn the_replay_cache_keeps_replays_read_from_the_store_until_the_record_expires() {
    let store = Forgetting::new();
    let ttl = Policy::default().with_ttl(Duration::from_secs(2));
    let first = App::start(
        IdempotencyLayer::from_shared_store(store.clone())
            .policy(ttl.clone())
            .replay_cache(CACHE),
    )
    .await;
    let second = App::start(
        IdempotencyLayer::from_shared_store(store.clone())
            .policy(ttl)
            .replay_cache(CACHE),
    )
    .await;

    let original = first.send(first.post("/payments", "s1").body("x")).await;
    assert_eq!(store.begins(), 1);
    let from_store = second.send(second.post("/payments", "s1").body("x")).await;
    assert!(from_store.replayed());
    assert_eq!(from_store.body, original.body);
    assert_eq!(store.begins(), 2, "the second process read the record once");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let from_cache = second.send(second.post("/payments", "s1").body("x")).await;
    assert!(from_cache.replayed());
    assert_eq!(store.begins(), 2, "then answered from its cache");
    assert_eq!(from_cache.kept_for(), 0, "less than a second left of 2 s");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let expired = second.send(second.post("/payments", "s1").body("x")).await;
    assert!(!expired.replayed(), "never past the record's expiry");
    assert_eq!(first.counters.runs() + second.counters.runs(), 2);
}
