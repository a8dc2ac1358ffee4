//! The layer in a real axum app, served on a real socket, driven by a real HTTP client.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{Next, from_fn};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use serde::Deserialize;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::record::StoredResponse;
use tower_idempotency::store::{ForgetEvent, ForgetFeed, Subscription};
use tower_idempotency::{
    Begin, IdempotencyLayer, IdempotencyStore, LateOutcome, LeaseToken, MemoryStore, OnConflict,
    OnStoreError, OutcomeUnknown, Policy, RecordKey, ReplayCacheLimits, Scope, StoreError,
};

#[derive(Clone, Default)]
struct Counters {
    runs: Arc<AtomicUsize>,
}

impl Counters {
    fn runs(&self) -> usize {
        self.runs.load(Ordering::SeqCst)
    }

    fn run(&self) -> usize {
        self.runs.fetch_add(1, Ordering::SeqCst) + 1
    }
}

#[derive(Deserialize, Default)]
struct Params {
    #[serde(default)]
    ms: u64,
    #[serde(default)]
    size: usize,
}

async fn charge(State(counters): State<Counters>, params: Query<Params>, body: Bytes) -> Response {
    tokio::time::sleep(Duration::from_millis(params.ms)).await;
    let run = counters.run();
    let mut response = (
        StatusCode::CREATED,
        format!("charge {run} for {}", String::from_utf8_lossy(&body)),
    )
        .into_response();
    response
        .headers_mut()
        .insert("x-charge-id", HeaderValue::from(run));
    response
}

async fn fail(State(counters): State<Counters>) -> StatusCode {
    counters.run();
    StatusCode::SERVICE_UNAVAILABLE
}

async fn big(State(counters): State<Counters>, params: Query<Params>) -> Vec<u8> {
    counters.run();
    vec![b'x'; params.size]
}

async fn stream(State(counters): State<Counters>) -> Body {
    let run = counters.run();
    let chunks =
        (0..5).map(move |i| Ok::<_, std::io::Error>(Bytes::from(format!("run {run} chunk {i};"))));
    let stream = futures_util::stream::iter(chunks).then(|chunk| async move {
        tokio::time::sleep(Duration::from_millis(20)).await;
        chunk
    });
    Body::from_stream(stream)
}

async fn gives_up(State(counters): State<Counters>) -> Response {
    counters.run();
    let mut response = StatusCode::GATEWAY_TIMEOUT.into_response();
    response.extensions_mut().insert(OutcomeUnknown);
    response
}

/// Gives up after 100 ms on an operation that finishes after 400 ms, handing the layer the rest.
async fn answers_late(State(counters): State<Counters>) -> Response {
    let operation = async move {
        tokio::time::sleep(Duration::from_millis(400)).await;
        let run = counters.run();
        Ok::<_, std::convert::Infallible>(
            (StatusCode::CREATED, format!("late {run}")).into_response(),
        )
    };
    let mut operation = Box::pin(operation);
    match tokio::time::timeout(Duration::from_millis(100), &mut operation).await {
        Ok(Ok(response)) => response,
        Ok(Err(never)) => match never {},
        Err(_) => {
            let mut response = StatusCode::GATEWAY_TIMEOUT.into_response();
            response.extensions_mut().insert(OutcomeUnknown);
            response
                .extensions_mut()
                .insert(LateOutcome::new(operation));
            response
        }
    }
}

async fn panics(State(counters): State<Counters>) -> StatusCode {
    if counters.run() == 1 {
        panic!("the first run fails");
    }
    StatusCode::OK
}

fn routes(counters: Counters) -> Router {
    Router::new()
        .route("/payments", post(charge).get(charge).patch(charge))
        .route("/feed", post(charge))
        .route("/fail", post(fail))
        .route("/big", post(big))
        .route("/stream", post(stream))
        .route("/panics", post(panics))
        .route("/gives-up", post(gives_up))
        .route("/answers-late", post(answers_late))
        .with_state(counters)
}

struct App {
    base: String,
    counters: Counters,
    client: reqwest::Client,
}

impl App {
    async fn start<St: IdempotencyStore>(layer: IdempotencyLayer<St>) -> Self {
        Self::start_router(|counters| routes(counters).layer(layer)).await
    }

    async fn start_router(build: impl FnOnce(Counters) -> Router) -> Self {
        let counters = Counters::default();
        let app = build(counters.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind a free port");
        let base = format!("http://{}", listener.local_addr().expect("local addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        Self {
            base,
            counters,
            client: reqwest::Client::new(),
        }
    }

    fn post(&self, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client
            .post(format!("{}{path}", self.base))
            .header("idempotency-key", key)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Reply {
        let response = request.send().await.expect("request");
        let status = response.status();
        let headers = response.headers().clone();
        let body = response.bytes().await.expect("body");
        Reply {
            status,
            headers,
            body,
        }
    }
}

#[derive(Debug, Clone)]
struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    fn problem_type(&self) -> String {
        assert_eq!(
            self.headers["content-type"], "application/problem+json",
            "expected a problem answer, got {self:?}"
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body).expect("problem json");
        assert_eq!(json["status"], self.status.as_u16());
        json["type"]
            .as_str()
            .expect("type")
            .rsplit('#')
            .next()
            .unwrap_or_default()
            .to_owned()
    }
}

fn memory() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::new())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retry_is_replayed_without_running_the_handler() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/payments", "k1").body("10 EUR")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.body, "charge 1 for 10 EUR");
    assert!(!first.replayed());

    let retry = app.send(app.post("/payments", "k1").body("10 EUR")).await;
    assert_eq!(retry.status, StatusCode::CREATED);
    assert_eq!(retry.body, first.body);
    assert_eq!(retry.headers["x-charge-id"], "1");
    assert!(retry.replayed());
    assert_eq!(app.counters.runs(), 1);

    let quoted = app
        .send(app.post("/payments", "\"k1\"").body("10 EUR"))
        .await;
    assert!(quoted.replayed(), "a quoted key names the same operation");
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_duplicates_run_once() {
    let app = Arc::new(App::start(memory()).await);
    let replies = futures_util::future::join_all((0..50).map(|_| {
        let app = app.clone();
        async move {
            app.send(app.post("/payments?ms=200", "dup").body("x"))
                .await
        }
    }))
    .await;
    assert_eq!(app.counters.runs(), 1);
    let created = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .count();
    let conflicts: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CONFLICT)
        .collect();
    assert_eq!(created + conflicts.len(), 50, "{replies:?}");
    assert!(created >= 1);
    for conflict in conflicts {
        assert_eq!(conflict.problem_type(), "in-flight");
        assert!(conflict.headers.contains_key("retry-after"));
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_mode_gives_every_duplicate_the_one_response() {
    // A poll interval longer than the test shows the waiters are woken by notification.
    let layer = memory()
        .policy(Policy::default().with_on_conflict(OnConflict::Wait))
        .poll_interval(Duration::from_secs(60));
    let app = Arc::new(App::start(layer).await);
    let replies = futures_util::future::join_all((0..50).map(|_| {
        let app = app.clone();
        async move {
            app.send(app.post("/payments?ms=300", "wait").body("x"))
                .await
        }
    }))
    .await;
    assert_eq!(app.counters.runs(), 1);
    for reply in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{reply:?}");
        assert_eq!(reply.body, "charge 1 for x");
    }
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
}

#[tokio::test(flavor = "multi_thread")]
async fn wait_mode_gives_up_after_its_timeout() {
    let layer = memory().policy(
        Policy::default()
            .with_on_conflict(OnConflict::Wait)
            .with_wait_timeout(Duration::from_millis(200)),
    );
    let app = Arc::new(App::start(layer).await);
    let slow = {
        let app = app.clone();
        tokio::spawn(async move {
            app.send(app.post("/payments?ms=1500", "slow").body("x"))
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waiter = app
        .send(app.post("/payments?ms=1500", "slow").body("x"))
        .await;
    assert_eq!(waiter.status, StatusCode::CONFLICT);
    assert_eq!(waiter.problem_type(), "in-flight");
    assert_eq!(slow.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_key_reused_for_another_request_is_refused() {
    let app = App::start(memory()).await;
    app.send(app.post("/payments", "k").body("10 EUR")).await;
    let other_body = app.send(app.post("/payments", "k").body("99 EUR")).await;
    assert_eq!(other_body.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(other_body.problem_type(), "key-reused");
    let other_path = app
        .send(app.post("/payments?x=1", "k").body("10 EUR"))
        .await;
    assert_eq!(other_path.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_keys_are_refused_before_anything_runs() {
    let app = App::start(memory()).await;
    for bad in ["", "has space", &"k".repeat(256), "\"unterminated"] {
        let reply = app.send(app.post("/payments", bad).body("x")).await;
        assert_eq!(reply.status, StatusCode::BAD_REQUEST, "key {bad:?}");
        assert_eq!(reply.problem_type(), "invalid-key");
    }
    let repeated = app
        .send(
            app.post("/payments", "a")
                .header("idempotency-key", "b")
                .body("x"),
        )
        .await;
    assert_eq!(repeated.status, StatusCode::BAD_REQUEST);
    assert_eq!(app.counters.runs(), 0);
    let longest = app
        .send(app.post("/payments", &"k".repeat(255)).body("x"))
        .await;
    assert_eq!(longest.status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_required_key_that_is_missing_is_refused() {
    let layer = memory().route("/payments/**", Policy::default().with_required(true));
    let app = App::start(layer).await;
    let reply = app
        .send(app.client.post(format!("{}/payments", app.base)).body("x"))
        .await;
    assert_eq!(reply.status, StatusCode::BAD_REQUEST);
    assert_eq!(reply.problem_type(), "missing-key");
    assert_eq!(app.counters.runs(), 0);

    let optional = app
        .send(app.client.post(format!("{}/feed", app.base)).body("x"))
        .await;
    assert_eq!(
        optional.status,
        StatusCode::CREATED,
        "keys are optional elsewhere"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_oversized_body_is_refused_and_neither_run_nor_stored() {
    let layer = memory().policy(Policy::default().with_max_request_body(1024usize));
    let app = App::start(layer).await;
    let reply = app
        .send(app.post("/payments", "big").body(vec![b'x'; 1025]))
        .await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(reply.problem_type(), "body-too-large");

    // Without a Content-Length the limit is enforced while reading.
    let chunks =
        futures_util::stream::iter((0..4).map(|_| {
            Ok::<_, std::io::Error>(http_body::Frame::data(Bytes::from(vec![b'y'; 300])))
        }));
    let body = reqwest::Body::wrap(http_body_util::StreamBody::new(chunks));
    let streamed = app
        .send(app.post("/payments", "big-stream").body(body))
        .await;
    assert_eq!(streamed.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(app.counters.runs(), 0);

    let fits = app
        .send(app.post("/payments", "big").body(vec![b'x'; 1024]))
        .await;
    assert_eq!(
        fits.status,
        StatusCode::CREATED,
        "the key was not burnt by the 413"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_error_is_not_stored_so_the_retry_runs_again() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/fail", "f")).await;
    let second = app.send(app.post("/fail", "f")).await;
    assert_eq!(first.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(second.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!second.replayed());
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_disconnects_still_gets_a_replay_on_retry() {
    let app = App::start(memory()).await;
    let gave_up = app
        .post("/payments?ms=500", "gone")
        .body("5 EUR")
        .timeout(Duration::from_millis(100))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client must time out and disconnect");
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(app.counters.runs(), 1, "the handler ran to completion");
    let retry = app
        .send(app.post("/payments?ms=500", "gone").body("5 EUR"))
        .await;
    assert!(retry.replayed());
    assert_eq!(retry.body, "charge 1 for 5 EUR");
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_get_their_own_policies() {
    let layer = memory()
        .route("/feed", Policy::default().with_enabled(false))
        .route(
            "/payments",
            Policy::default().with_methods(vec![http::Method::POST]),
        );
    let app = App::start(layer).await;
    app.send(app.post("/feed", "f").body("x")).await;
    let again = app.send(app.post("/feed", "f").body("x")).await;
    assert!(!again.replayed(), "a disabled route passes through");
    assert_eq!(app.counters.runs(), 2);

    let patch = |key| {
        app.client
            .patch(format!("{}/payments", app.base))
            .header("idempotency-key", key)
    };
    app.send(patch("p")).await;
    let patched = app.send(patch("p")).await;
    assert!(!patched.replayed(), "PATCH is not covered on this route");
    assert_eq!(app.counters.runs(), 4);
}

#[tokio::test(flavor = "multi_thread")]
async fn get_requests_pass_through() {
    let app = App::start(memory()).await;
    let get = |key| {
        app.client
            .get(format!("{}/payments", app.base))
            .header("idempotency-key", key)
    };
    app.send(get("g")).await;
    let again = app.send(get("g")).await;
    assert!(!again.replayed());
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn callers_with_different_credentials_never_share_a_record() {
    let app = App::start(memory()).await;
    let as_user = |user: &str| {
        app.post("/payments", "shared-key")
            .header(AUTHORIZATION, format!("Bearer {user}"))
            .body("x")
    };
    let alice = app.send(as_user("alice")).await;
    let bob = app.send(as_user("bob")).await;
    assert!(!bob.replayed(), "bob must not see alice's response");
    assert_ne!(alice.body, bob.body);
    assert_eq!(app.send(as_user("alice")).await.body, alice.body);
    assert_eq!(app.counters.runs(), 2);
}

#[derive(Clone)]
struct UserId(String);

#[tokio::test(flavor = "multi_thread")]
async fn a_custom_scope_can_use_the_authenticated_principal() {
    let layer = memory().scope_with(|parts| match parts.extensions.get::<UserId>() {
        Some(user) => Scope::from_bytes(user.0.as_bytes()),
        None => Scope::anonymous(),
    });
    // An auth middleware outside the idempotency layer identifies the user.
    let authenticate = from_fn(|mut request: Request, next: Next| async move {
        let user = request
            .headers()
            .get("x-user")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        request.extensions_mut().insert(UserId(user));
        next.run(request).await
    });
    let app = App::start_router(|counters| routes(counters).layer(layer).layer(authenticate)).await;
    let as_user = |user: &'static str| app.post("/payments", "k").header("x-user", user).body("x");
    app.send(as_user("alice")).await;
    assert!(!app.send(as_user("bob")).await.replayed());
    assert!(app.send(as_user("alice")).await.replayed());
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streamed_response_is_stored_whole_and_replayed() {
    let app = App::start(memory()).await;
    let first = app.send(app.post("/stream", "s")).await;
    let expected: String = (0..5).map(|i| format!("run 1 chunk {i};")).collect();
    assert_eq!(first.body, expected);
    let retry = app.send(app.post("/stream", "s")).await;
    assert!(retry.replayed());
    assert_eq!(retry.body, expected);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_response_over_the_storage_limit_reaches_the_client_whole_and_is_not_replayed() {
    let layer = memory().policy(Policy::default().with_max_response_body(64 * 1024usize));
    let app = App::start(layer).await;
    let first = app.send(app.post("/big?size=200000", "big")).await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.body.len(), 200_000, "never truncated");
    let retry = app.send(app.post("/big?size=200000", "big")).await;
    assert!(!retry.replayed());
    assert_eq!(retry.body.len(), 200_000);
    assert_eq!(app.counters.runs(), 2);

    let small = app.send(app.post("/big?size=1000", "small")).await;
    assert_eq!(small.body.len(), 1000);
    assert!(
        app.send(app.post("/big?size=1000", "small"))
            .await
            .replayed()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_long_request_keeps_its_lease_by_renewal() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_millis(300)));
    let app = Arc::new(App::start(layer).await);
    let long = {
        let app = app.clone();
        tokio::spawn(async move {
            app.send(app.post("/payments?ms=1200", "long").body("x"))
                .await
        })
    };
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let duplicate = app
            .send(app.post("/payments?ms=1200", "long").body("x"))
            .await;
        assert_eq!(
            duplicate.status,
            StatusCode::CONFLICT,
            "the lease is still held"
        );
    }
    assert_eq!(long.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_panicking_handler_releases_its_lease() {
    let app =
        App::start(memory().policy(Policy::default().with_lock_ttl(Duration::from_secs(600))))
            .await;
    let crashed = app.post("/panics", "p").send().await;
    assert!(
        crashed.is_err(),
        "the connection is dropped, as without the layer"
    );
    tokio::time::sleep(Duration::from_millis(100)).await;
    let retry = app.send(app.post("/panics", "p")).await;
    assert_eq!(
        retry.status,
        StatusCode::OK,
        "the retry ran instead of waiting out lock_ttl"
    );
    assert_eq!(app.counters.runs(), 2);
}

/// A real memory store with faults to switch on: an outage (every call fails as an unreachable
/// store's would), a `begin` that never answers, or a `begin` whose first reply arrives 300 ms
/// after the store acted (a stalled network).
#[derive(Clone, Default)]
struct Faulty {
    store: MemoryStore,
    down: Arc<AtomicBool>,
    stalled_begin: bool,
    slow_first_reply: bool,
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
        if self.slow_first_reply && self.begins.fetch_add(1, Ordering::SeqCst) == 0 {
            tokio::time::sleep(Duration::from_millis(300)).await;
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
async fn a_caller_with_too_many_requests_in_progress_gets_429() {
    let layer = memory().policy(Policy::default().with_max_in_flight_per_caller(2usize));
    let app = Arc::new(App::start(layer).await);
    let as_user = |user: &str, key: &str| {
        app.post("/payments?ms=500", key)
            .header(AUTHORIZATION, format!("Bearer {user}"))
            .body("x")
    };
    let running: Vec<_> = ["a", "b"]
        .into_iter()
        .map(|key| {
            let app = app.clone();
            let request = as_user("alice", key);
            tokio::spawn(async move { app.send(request).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let third = app.send(as_user("alice", "c")).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(third.problem_type(), "too-many-in-flight");
    assert!(third.headers.contains_key("retry-after"));
    let bob = app.send(as_user("bob", "c")).await;
    assert_eq!(
        bob.status,
        StatusCode::CREATED,
        "other callers are not held back"
    );
    for task in running {
        assert_eq!(task.await.expect("task").status, StatusCode::CREATED);
    }
    let later = app.send(as_user("alice", "c")).await;
    assert_eq!(
        later.status,
        StatusCode::CREATED,
        "finished requests free their places"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_unknown_outcome_keeps_the_key_locked_until_lock_ttl() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_millis(600)));
    let app = App::start(layer).await;
    let first = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    let early = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(
        early.status,
        StatusCode::CONFLICT,
        "not released: it may still be running"
    );
    assert_eq!(app.counters.runs(), 1);
    tokio::time::sleep(Duration::from_millis(800)).await;
    let late = app.send(app.post("/gives-up", "u")).await;
    assert_eq!(
        late.status,
        StatusCode::GATEWAY_TIMEOUT,
        "not stored: it runs again"
    );
    assert_eq!(app.counters.runs(), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_begin_abandoned_by_the_store_timeout_does_not_leave_the_key_locked() {
    let slow = Faulty {
        slow_first_reply: true,
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

#[tokio::test(flavor = "multi_thread")]
async fn replaced_routes_apply_to_the_next_requests_of_a_running_app() {
    let layer = memory();
    let handle = layer.clone();
    let app = App::start(layer).await;
    let unkeyed = || app.client.post(format!("{}/payments", app.base)).body("x");
    assert_eq!(app.send(unkeyed()).await.status, StatusCode::CREATED);

    handle.replace_routes(tower_idempotency::Routes::new(
        Policy::default().with_required(true),
    ));
    assert!(handle.routes_in_effect().default_policy().required);
    let refused = app.send(unkeyed()).await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.problem_type(), "missing-key");
    assert_eq!(app.counters.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn leases_in_flight_counts_a_detached_request_until_it_is_stored() {
    let layer = memory();
    let leases = layer.leases_in_flight();
    let app = App::start(layer).await;
    let gave_up = app
        .post("/payments?ms=600", "detached")
        .body("5 EUR")
        .timeout(Duration::from_millis(150))
        .send()
        .await;
    assert!(gave_up.is_err(), "the client must time out and disconnect");
    assert_eq!(
        leases.count(),
        1,
        "the detached request still holds its lease"
    );
    tokio::time::timeout(Duration::from_secs(5), leases.idle())
        .await
        .expect("the lease settles once the response is stored");
    assert_eq!(app.counters.runs(), 1);
    let retry = app
        .send(app.post("/payments?ms=600", "detached").body("5 EUR"))
        .await;
    assert!(retry.replayed(), "{retry:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upgrade_on_a_covered_method_is_refused_before_the_handler() {
    let app = App::start(memory()).await;
    let refused = app
        .send(
            app.post("/payments", "upgrade")
                .header("connection", "upgrade")
                .header("upgrade", "websocket")
                .body("x"),
        )
        .await;
    assert_eq!(refused.status, StatusCode::BAD_REQUEST);
    assert_eq!(refused.problem_type(), "upgrade-not-allowed");
    assert_eq!(app.counters.runs(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_outcome_is_awaited_stored_and_replayed() {
    let layer = memory().policy(Policy::default().with_lock_ttl(Duration::from_secs(5)));
    let leases = layer.leases_in_flight();
    let app = App::start(layer).await;
    let first = app.send(app.post("/answers-late", "late")).await;
    assert_eq!(first.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(first.problem_type(), "outcome-pending");
    assert_eq!(first.headers["retry-after"], "5");
    assert_eq!(leases.count(), 1, "the pending late result holds its lease");
    tokio::time::timeout(Duration::from_secs(3), leases.idle())
        .await
        .expect("settled once the late result is stored");
    let retry = app.send(app.post("/answers-late", "late")).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed());
    assert_eq!(&retry.body[..], b"late 1");
    assert_eq!(app.counters.runs(), 1);
}

/// Issue 15: an outer middleware reads the outcome extension; the hook sees every response.
#[tokio::test(flavor = "multi_thread")]
async fn every_response_carries_its_outcome_and_the_hook_sees_each_one() {
    use tower_idempotency::Outcome;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let layer = {
        let seen = seen.clone();
        memory()
            .route("/feed", Policy::default().with_required(true))
            .on_outcome(move |outcome, head| {
                seen.lock().unwrap().push(outcome);
                head.headers
                    .insert("x-hook-outcome", outcome.as_str().parse().unwrap());
            })
    };
    async fn read_extension(request: Request, next: Next) -> Response {
        let mut response = next.run(request).await;
        let outcome = response
            .extensions()
            .get::<Outcome>()
            .map_or("none", |outcome| outcome.as_str());
        let value = HeaderValue::from_static(outcome);
        response.headers_mut().insert("x-extension-outcome", value);
        response
    }
    let app =
        App::start_router(|counters| routes(counters).layer(layer).layer(from_fn(read_extension)))
            .await;
    let outcome = |reply: &Reply| {
        assert_eq!(
            reply.headers["x-hook-outcome"], reply.headers["x-extension-outcome"],
            "{reply:?}"
        );
        reply.headers["x-extension-outcome"]
            .to_str()
            .unwrap()
            .to_owned()
    };
    let cases = [
        (app.post("/payments", "k").body("1"), "executed"),
        (app.post("/payments", "k").body("1"), "replayed"),
        (app.post("/payments", "k").body("2"), "mismatch"),
        (app.post("/payments", "").body("1"), "invalid_key"),
        (
            app.client.post(format!("{}/feed", app.base)).body("1"),
            "missing_key",
        ),
        (
            app.client.post(format!("{}/payments", app.base)).body("1"),
            "unkeyed",
        ),
        (
            app.client.get(format!("{}/payments", app.base)),
            "uncovered",
        ),
        (app.post("/payments%2Fx", "k").body("1"), "invalid_target"),
    ];
    let mut expected = Vec::new();
    for (request, want) in cases {
        let reply = app.send(request).await;
        assert_eq!(outcome(&reply), want, "{reply:?}");
        expected.push(want);
    }
    let seen: Vec<&str> = seen.lock().unwrap().iter().map(|o| o.as_str()).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread")]
async fn observe_mode_runs_what_enforcement_would_replay_and_says_so() {
    use tower_idempotency::{Mode, Outcome};
    let outcomes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let layer = {
        let outcomes = outcomes.clone();
        memory()
            .policy(Policy::default().with_mode(Mode::Observe))
            .on_outcome(move |outcome, _| outcomes.lock().unwrap().push(outcome))
    };
    let app = App::start(layer).await;
    let first = app.send(app.post("/payments", "k").body("1")).await;
    let retry = app.send(app.post("/payments", "k").body("1")).await;
    assert_eq!(first.body, "charge 1 for 1");
    assert_eq!(retry.body, "charge 2 for 1");
    assert!(!retry.replayed());
    assert_eq!(app.counters.runs(), 2);
    assert_eq!(
        *outcomes.lock().unwrap(),
        [Outcome::Executed, Outcome::ObservedWouldReplay]
    );
    assert!(Outcome::ObservedWouldReplay.is_observed());
}

/// `IdempotencyLayer::records` finds the record a real request made (same scope, quoted or bare
/// key), and forgetting it makes the next retry run again; another caller's key is not touched.
#[tokio::test(flavor = "multi_thread")]
async fn records_inspects_and_forgets_the_record_a_request_made() {
    use tower_idempotency::store::{Forgotten, RecordState};
    let layer = memory();
    let records = layer.records();
    let app = App::start(layer).await;
    let alice = |request: reqwest::RequestBuilder| request.header(AUTHORIZATION, "Bearer alice");
    let first = app
        .send(alice(app.post("/payments", "order-7")).body("5 EUR"))
        .await;
    assert_eq!(first.status, StatusCode::CREATED);

    let mut credentials = HeaderMap::new();
    credentials.insert(AUTHORIZATION, HeaderValue::from_static("Bearer alice"));
    let info = records
        .inspect("/payments", &credentials, "\"order-7\"")
        .await
        .expect("inspect")
        .expect("the request's record");
    match info.state {
        RecordState::Completed { response, .. } => {
            assert_eq!(response.status, StatusCode::CREATED);
            assert_eq!(response.body, first.body);
        }
        other => panic!("expected a completed record, got {other:?}"),
    }
    assert!(
        records
            .inspect("/payments", &HeaderMap::new(), "order-7")
            .await
            .unwrap()
            .is_none(),
        "another scope (no credentials) has no record under this key"
    );

    assert_eq!(
        records
            .forget("/payments", &credentials, "order-7", false)
            .await
            .unwrap(),
        Forgotten::Completed
    );
    let retry = app
        .send(alice(app.post("/payments", "order-7")).body("5 EUR"))
        .await;
    assert!(!retry.replayed(), "a forgotten key runs again");
    assert_eq!(app.counters.runs(), 2);
    assert!(matches!(
        records.record_key("/payments", &credentials, "a b"),
        Err(tower_idempotency::RecordsError::InvalidKey(_))
    ));
}

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
    let reused = app.send(app.post("/payments", "c1").body("99 EUR")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(reused.problem_type(), "key-reused");
    assert_eq!(store.begins(), 1, "both answered from the cache");

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
    let fresh = app.send(app.post("/payments", "e1").body("x")).await;
    assert!(fresh.replayed());
    assert_eq!(store.begins(), 1, "answered from the cache");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let expired = app.send(app.post("/payments", "e1").body("x")).await;
    assert!(
        !expired.replayed(),
        "an expired record is never replayed: {expired:?}"
    );
    assert_eq!(app.counters.runs(), 2);
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

/// The whole seconds `Idempotency-TTL` says the record is still kept.
fn kept_for(reply: &Reply) -> u64 {
    let value = reply
        .headers
        .get("idempotency-ttl")
        .unwrap_or_else(|| panic!("expected Idempotency-TTL on {reply:?}"));
    value.to_str().expect("ascii").parse().expect("seconds")
}

#[tokio::test(flavor = "multi_thread")]
async fn stored_responses_say_how_long_the_key_is_kept() {
    let ttl = Policy::default().with_ttl(Duration::from_secs(3));
    let app = App::start(memory().policy(ttl)).await;

    let first = app.send(app.post("/payments", "t1").body("x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(kept_for(&first), 2, "3 s less the time storing took");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replay = app.send(app.post("/payments", "t1").body("x")).await;
    assert!(replay.replayed());
    assert_eq!(kept_for(&replay), 1, "counts down on replays");

    // Not stored, so nothing is kept: a 5xx, a streamed body (its head leaves before it is
    // stored), a conflict and an unkeyed request carry no expiry.
    let failed = app.send(app.post("/fail", "t2")).await;
    assert_eq!(failed.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(!failed.headers.contains_key("idempotency-ttl"));
    let streamed = app.send(app.post("/stream", "t3")).await;
    assert!(!streamed.headers.contains_key("idempotency-ttl"));
    let reused = app.send(app.post("/payments", "t1").body("y")).await;
    assert_eq!(reused.status, StatusCode::UNPROCESSABLE_ENTITY);
    assert!(!reused.headers.contains_key("idempotency-ttl"));
    let unkeyed = app
        .send(app.client.post(format!("{}/payments", app.base)))
        .await;
    assert!(!unkeyed.headers.contains_key("idempotency-ttl"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_expiry_header_can_be_turned_off_and_is_never_sent_when_observing() {
    let off = Policy::default().with_expiry_header(false);
    let app = App::start(memory().policy(off)).await;
    let first = app.send(app.post("/payments", "o1").body("x")).await;
    let replay = app.send(app.post("/payments", "o1").body("x")).await;
    assert!(replay.replayed());
    for reply in [&first, &replay] {
        assert!(!reply.headers.contains_key("idempotency-ttl"), "{reply:?}");
    }

    let observing = Policy::default().with_mode(tower_idempotency::Mode::Observe);
    let app = App::start(memory().policy(observing)).await;
    let first = app.send(app.post("/payments", "o2").body("x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(!first.headers.contains_key("idempotency-ttl"), "{first:?}");
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
    assert_eq!(kept_for(&from_cache), 0, "less than a second left of 2 s");

    tokio::time::sleep(Duration::from_millis(1000)).await;
    let expired = second.send(second.post("/payments", "s1").body("x")).await;
    assert!(!expired.replayed(), "never past the record's expiry");
    assert_eq!(first.counters.runs() + second.counters.runs(), 2);
}
