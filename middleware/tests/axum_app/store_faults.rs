//! A store that fails: an outage rejects or forwards per route, a slow store counts as one, and
//! a `begin` the layer gave up on does not leave its key locked.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::http::StatusCode;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::record::StoredResponse;
use tower_idempotency::store::Subscription;
use tower_idempotency::{
    Begin, IdempotencyLayer, IdempotencyStore, LeaseToken, MemoryStore, OnStoreError, Policy,
    RecordKey, StoreError,
};

use super::App;

/// A real memory store with faults to switch on: an outage (every call fails as an unreachable
/// store's would), a `begin` that never answers, or a `begin` whose first reply arrives late
/// after the store acted (a stalled network, or a process paused right after the call).
#[derive(Clone, Default)]
struct Faulty {
    store: MemoryStore,
    down: Arc<AtomicBool>,
    stalled_begin: bool,
    /// How long the first `begin`'s reply takes to arrive after the store acted.
    first_reply_delay: Option<Duration>,
    begins: Arc<AtomicUsize>,
}

impl Faulty {
    fn check(&self) -> Result<(), StoreError> {
        if self.down.load(Ordering::SeqCst) {
            return Err(StoreError::backend("connection refused"));
        }
        Ok(())
    }
}

#[async_trait]
impl IdempotencyStore for Faulty {
    async fn begin(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lock: Duration,
    ) -> Result<Begin, StoreError> {
        self.check()?;
        if self.stalled_begin {
            return std::future::pending().await;
        }
        let begun = self.store.begin(key, fp, lock).await;
        if let Some(delay) = self.first_reply_delay
            && self.begins.fetch_add(1, Ordering::SeqCst) == 0
        {
            tokio::time::sleep(delay).await;
        }
        begun
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.complete(key, token, response, ttl).await
    }
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.check()?;
        self.store.release(key, token).await
    }
    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &tower_idempotency::Checkpoint,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.checkpoint(key, token, checkpoint).await
    }
    async fn renew(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        lock: Duration,
    ) -> Result<(), StoreError> {
        self.check()?;
        self.store.renew(key, token, lock).await
    }
    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.store.subscribe(key)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_outage_rejects_or_forwards_per_route() {
    let store = Faulty::default();
    let layer = IdempotencyLayer::new(store.clone()).route(
        "/feed",
        Policy::default().with_on_store_error(OnStoreError::Forward),
    );
    let app = App::start(layer).await;
    store.down.store(true, Ordering::SeqCst);

    let rejected = app.send(app.post("/payments", "o").body("x")).await;
    assert_eq!(rejected.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rejected.problem_type(), "store-unavailable");
    assert!(rejected.headers.contains_key("retry-after"));
    assert_eq!(
        app.counters.runs(),
        0,
        "a reject route never runs unprotected"
    );

    let forwarded = app.send(app.post("/feed", "o").body("x")).await;
    assert_eq!(forwarded.status, StatusCode::CREATED);
    assert_eq!(app.counters.runs(), 1);

    store.down.store(false, Ordering::SeqCst);
    let recovered = app.send(app.post("/payments", "o").body("x")).await;
    assert_eq!(recovered.status, StatusCode::CREATED);
    assert!(
        app.send(app.post("/payments", "o").body("x"))
            .await
            .replayed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_store_counts_as_an_outage() {
    let stalled = Faulty {
        stalled_begin: true,
        ..Faulty::default()
    };
    let layer = IdempotencyLayer::new(stalled).store_timeout(Duration::from_millis(100));
    let app = App::start(layer).await;
    let reply = app.send(app.post("/payments", "t").body("x")).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(app.counters.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_begin_abandoned_by_the_store_timeout_does_not_leave_the_key_locked() {
    let slow = Faulty {
        first_reply_delay: Some(Duration::from_millis(300)),
        ..Faulty::default()
    };
    let layer = IdempotencyLayer::new(slow)
        .store_timeout(Duration::from_millis(100))
        .policy(Policy::default().with_lock_ttl(Duration::from_secs(600)));
    let app = App::start(layer).await;
    let timed_out = app
        .send(app.post("/payments", "slow-begin").body("x"))
        .await;
    assert_eq!(timed_out.status, StatusCode::SERVICE_UNAVAILABLE);
    // The store still acquired the lease after the layer gave up on the call; the abandoned call
    // is finished in the background and its lease released, not left for lock_ttl (10 minutes).
    tokio::time::sleep(Duration::from_millis(500)).await;
    let retry = app
        .send(app.post("/payments", "slow-begin").body("x"))
        .await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert_eq!(app.counters.runs(), 1);
}

/// The first request's lease is granted, then its process stalls past `lock_ttl` before running
/// it (the reply arrives late, as after a GC pause or SIGSTOP); meanwhile a retry takes the key
/// over and runs. The stalled request must not run as well: it is answered with the retry's
/// stored response.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_taken_over_before_its_request_ran_never_runs_it_a_second_time() {
    // The retry, sent 400 ms in, has a second to take the lapsed key over before the stalled
    // reply arrives, even on a loaded machine.
    let stalled = Faulty {
        first_reply_delay: Some(Duration::from_millis(1400)),
        ..Faulty::default()
    };
    let layer = IdempotencyLayer::new(stalled)
        .policy(Policy::default().with_lock_ttl(Duration::from_millis(300)));
    let app = Arc::new(App::start(layer).await);
    let first = {
        let app = app.clone();
        tokio::spawn(async move { app.send(app.post("/payments", "paused").body("x")).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    let retry = app.send(app.post("/payments", "paused").body("x")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    let first = first.await.expect("first request");
    assert!(first.replayed(), "answered as a duplicate: {first:?}");
    assert_eq!(first.body, retry.body);
    assert_eq!(app.counters.runs(), 1, "the request ran once");
}

/// The same stall with nobody taking the key over: the lapsed lease is renewed (its token still
/// holds it) and the request runs, once.
#[tokio::test(flavor = "multi_thread")]
async fn a_lease_that_lapsed_untaken_before_its_request_ran_is_renewed_and_runs_once() {
    let stalled = Faulty {
        first_reply_delay: Some(Duration::from_millis(500)),
        ..Faulty::default()
    };
    let layer = IdempotencyLayer::new(stalled)
        .policy(Policy::default().with_lock_ttl(Duration::from_millis(300)));
    let app = App::start(layer).await;
    let first = app.send(app.post("/payments", "stalled").body("x")).await;
    assert_eq!(first.status, StatusCode::CREATED, "{first:?}");
    let retry = app.send(app.post("/payments", "stalled").body("x")).await;
    assert!(retry.replayed(), "{retry:?}");
    assert_eq!(app.counters.runs(), 1);
}
