//! The layer in a real axum app, served on a real socket, driven by a real HTTP client. This
//! file holds the app (handlers, routes, a client); the tests are in a module per theme.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use futures_util::StreamExt;
use reqwest::header::HeaderValue;
use serde::Deserialize;
use tower_idempotency::{
    IdempotencyLayer, IdempotencyStore, LateOutcome, MemoryStore, OutcomeUnknown,
};

mod callers;
mod leases;
mod outcomes;
mod replay;
mod replay_cache;
mod store_faults;

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

    /// Sends every request at once; the replies come in the requests' order.
    async fn send_together(
        &self,
        requests: impl IntoIterator<Item = reqwest::RequestBuilder>,
    ) -> Vec<Reply> {
        futures_util::future::join_all(requests.into_iter().map(|request| self.send(request))).await
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

    /// The whole seconds `Idempotency-TTL` says the record is still kept.
    fn kept_for(&self) -> u64 {
        let value = self
            .headers
            .get("idempotency-ttl")
            .unwrap_or_else(|| panic!("expected Idempotency-TTL on {self:?}"));
        value.to_str().expect("ascii").parse().expect("seconds")
    }
}

fn memory() -> IdempotencyLayer<MemoryStore> {
    IdempotencyLayer::new(MemoryStore::new())
}
