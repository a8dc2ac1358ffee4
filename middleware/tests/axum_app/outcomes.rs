//! What the layer tells about each response: its outcome (extension and hook), observe mode,
//! the records it made, and how long a stored response is kept (`Idempotency-TTL`).

use std::sync::Arc;
use std::time::Duration;

use axum::extract::Request;
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{Next, from_fn};
use axum::response::Response;
use reqwest::header::{AUTHORIZATION, HeaderValue};
use tower_idempotency::Policy;

use super::{App, Reply, memory, routes};

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

#[tokio::test(flavor = "multi_thread")]
async fn stored_responses_say_how_long_the_key_is_kept() {
    let ttl = Policy::default().with_ttl(Duration::from_secs(3));
    let app = App::start(memory().policy(ttl)).await;

    let first = app.send(app.post("/payments", "t1").body("x")).await;
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.kept_for(), 2, "3 s less the time storing took");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let replay = app.send(app.post("/payments", "t1").body("x")).await;
    assert!(replay.replayed());
    assert_eq!(replay.kept_for(), 1, "counts down on replays");

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
