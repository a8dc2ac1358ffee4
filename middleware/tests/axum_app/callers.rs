//! What a request must bring, and who it belongs to: invalid, missing and repeated keys, bodies
//! over the limit, per-route policies, methods that pass through, caller scopes, the per-caller
//! bound, and upgrades.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::Request;
use axum::http::StatusCode;
use axum::middleware::{Next, from_fn};
use reqwest::header::AUTHORIZATION;
use tower_idempotency::{Policy, Scope};

use super::{App, memory, routes};

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
