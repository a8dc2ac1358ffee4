//! The lease in the handler, in a real axum app on a real socket: the `Lease` extractor, the
//! rocket-rides pattern (create ride -> charge -> send receipt) resumed by a takeover from its
//! last checkpoint, and a stalled holder whose checkpoint and fenced charge are refused.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::{Extension, Router};
use bytes::Bytes;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::store::Subscription;
use tower_idempotency::{
    Begin, Checkpoint, IdempotencyLayer, IdempotencyStore, Lease, LeaseToken, MemoryStore, Policy,
    RecordKey, StoreError, StoredResponse,
};

/// The memory store with renewals lost, as in a holder paused (GC, stalled VM) past `lock_ttl`:
/// its lease lapses while its handler still runs. Everything else goes to the real store.
#[derive(Clone)]
struct RenewalsLost(MemoryStore);

#[async_trait]
impl IdempotencyStore for RenewalsLost {
    async fn begin(
        &self,
        key: &RecordKey,
        fp: &Fingerprint,
        lock: Duration,
    ) -> Result<Begin, StoreError> {
        self.0.begin(key, fp, lock).await
    }
    async fn complete(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        response: &StoredResponse,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        self.0.complete(key, token, response, ttl).await
    }
    async fn checkpoint(
        &self,
        key: &RecordKey,
        token: LeaseToken,
        checkpoint: &Checkpoint,
    ) -> Result<(), StoreError> {
        self.0.checkpoint(key, token, checkpoint).await
    }
    async fn release(&self, key: &RecordKey, token: LeaseToken) -> Result<(), StoreError> {
        self.0.release(key, token).await
    }
    async fn renew(&self, _: &RecordKey, _: LeaseToken, _: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    fn subscribe(&self, key: &RecordKey) -> Subscription {
        self.0.subscribe(key)
    }
}

/// The application's own state: rides and charges, each charge fenced by the lease token the
/// way a database row would be (`UPDATE ... WHERE last_fence < $token`).
#[derive(Default)]
struct Ledger {
    rides: Vec<u64>,
    charges: Vec<u64>,
    last_fence: u64,
}

type Shared = Arc<Mutex<Ledger>>;

const LOCK_TTL: Duration = Duration::from_millis(300);

async fn book(State(ledger): State<Shared>, lease: Lease) -> (StatusCode, String) {
    let token = lease.token().0;
    let mut step = lease
        .recovery_point()
        .map_or("start".to_owned(), |point| point.name().to_owned());
    if step == "start" {
        ledger.lock().unwrap().rides.push(token);
        lease
            .checkpoint("ride_created", Bytes::from(token.to_string()))
            .await
            .expect("the holder checkpoints");
        step = "ride_created".to_owned();
    }
    if lease.attempt() == 1 {
        // The first run stalls past lock_ttl; a retry takes over meanwhile.
        tokio::time::sleep(LOCK_TTL * 4).await;
        if let Err(error) = lease.checkpoint("stalled", Bytes::new()).await {
            assert!(error.is_lease_lost(), "{error}");
            return (StatusCode::CONFLICT, "lease lost".to_owned());
        }
    }
    if step == "ride_created" {
        {
            let mut ledger = ledger.lock().unwrap();
            if ledger.last_fence >= token {
                return (StatusCode::CONFLICT, "fenced".to_owned());
            }
            ledger.last_fence = token;
            ledger.charges.push(token);
        }
        lease
            .checkpoint("charged", Bytes::new())
            .await
            .expect("checkpoint");
    }
    let resumed = lease.recovery_point().map(|p| p.name().to_owned());
    (
        StatusCode::CREATED,
        format!(
            "attempt {} takeover {} resumed from {resumed:?}",
            lease.attempt(),
            lease.is_takeover()
        ),
    )
}

async fn serve(ledger: Shared) -> String {
    let policy = Policy::default().with_lock_ttl(LOCK_TTL);
    let app = Router::new()
        .route("/rides", post(book))
        .route(
            "/optional",
            post(|lease: Option<Lease>| async move { format!("{:?}", lease.map(|l| l.attempt())) }),
        )
        .route(
            "/extension",
            post(|Extension(lease): Extension<Lease>| async move {
                format!("{} {}", lease.attempt(), lease.is_forwarded())
            }),
        )
        .with_state(ledger)
        .layer(IdempotencyLayer::new(RenewalsLost(MemoryStore::new())).policy(policy));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

#[tokio::test(flavor = "multi_thread")]
async fn a_takeover_resumes_from_the_last_checkpoint_and_the_stalled_holder_is_refused() {
    let ledger = Shared::default();
    let url = serve(ledger.clone()).await;
    let client = reqwest::Client::new();
    let book = || {
        client
            .post(format!("{url}/rides"))
            .header("idempotency-key", "ride-1")
    };
    let stalled = tokio::spawn(book().send());
    tokio::time::sleep(LOCK_TTL * 2).await;

    let takeover = book().send().await.unwrap();
    assert_eq!(takeover.status(), StatusCode::CREATED);
    assert_eq!(
        takeover.text().await.unwrap(),
        "attempt 2 takeover true resumed from Some(\"ride_created\")"
    );
    let stalled = stalled.await.unwrap().unwrap();
    assert_eq!(stalled.status(), StatusCode::CONFLICT);
    assert_eq!(stalled.text().await.unwrap(), "lease lost");

    let ledger = ledger.lock().unwrap();
    assert_eq!(ledger.rides.len(), 1, "the ride was created once");
    assert_eq!(
        ledger.charges.len(),
        1,
        "the charge ran once, by the takeover"
    );
    assert!(
        ledger.charges[0] > ledger.rides[0],
        "under the larger token"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_lease_is_an_extractor_and_an_extension() {
    let url = serve(Shared::default()).await;
    let client = reqwest::Client::new();
    let post = |path: &str| client.post(format!("{url}{path}"));
    let keyed = post("/optional").header("idempotency-key", "a");
    assert_eq!(keyed.send().await.unwrap().text().await.unwrap(), "Some(1)");
    let unkeyed = post("/optional").send().await.unwrap();
    assert_eq!(unkeyed.text().await.unwrap(), "None");
    let extension = post("/extension").header("idempotency-key", "b");
    assert_eq!(
        extension.send().await.unwrap().text().await.unwrap(),
        "1 false"
    );
    // A handler that requires the lease, reached without one: a wiring mistake, 500.
    let missing = post("/rides").send().await.unwrap();
    assert_eq!(missing.status(), StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(
        missing.headers()["content-type"],
        "application/problem+json"
    );
}
