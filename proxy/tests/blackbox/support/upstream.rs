//! A real HTTP service that counts what reaches it: the upstream the proxy runs in front of.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use serde::Deserialize;

/// `Idempotency-Lease-Token` and `Idempotency-Attempt` as a request carried them.
pub type LeaseHeaders = (Option<u64>, Option<u32>);

#[derive(Default)]
struct Counts {
    total: AtomicUsize,
    by_key: Mutex<HashMap<String, usize>>,
    started_by_key: Mutex<HashMap<String, usize>>,
    last_version: Mutex<Option<axum::http::Version>>,
    last_headers: Mutex<Option<HeaderMap>>,
    /// Per key, the `Idempotency-Lease-Token` and `Idempotency-Attempt` of every `charge` started.
    leases_by_key: Mutex<HashMap<String, Vec<LeaseHeaders>>>,
}

/// The upstream server, shut down when dropped.
pub struct Upstream {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    counts: Arc<Counts>,
    server: tokio::task::JoinHandle<()>,
}

#[derive(Deserialize, Default)]
struct Params {
    /// How long to work before answering.
    #[serde(default)]
    ms: u64,
    /// Size of the body to answer with.
    #[serde(default)]
    size: usize,
}

impl Upstream {
    /// Starts the upstream on a free port.
    pub async fn start() -> Self {
        let counts = Arc::new(Counts::default());
        let app = Router::new()
            .route("/payments", post(charge).get(charge).patch(charge))
            .route("/payments/{*rest}", post(charge))
            .route("/feed/{*rest}", post(charge))
            .route("/fail", post(fail))
            .route("/big", post(big))
            .route("/headers", any(headers))
            .route("/count", get(count))
            .with_state(counts.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the upstream");
        let url = format!(
            "http://{}",
            listener.local_addr().expect("upstream address")
        );
        let server = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            url,
            counts,
            server,
        }
    }

    /// How many requests ran in total.
    pub fn runs(&self) -> usize {
        self.counts.total.load(Ordering::SeqCst)
    }

    /// How many requests with `key` ran.
    pub fn runs_of(&self, key: &str) -> usize {
        self.counts
            .by_key
            .lock()
            .expect("counts")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// How many requests with `key` have started (reached the upstream), finished or not.
    pub fn started_of(&self, key: &str) -> usize {
        self.counts
            .started_by_key
            .lock()
            .expect("counts")
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Waits until one request with `key` has reached the upstream (its call is running), failing
    /// the test after ten seconds.
    pub async fn wait_until_reached(&self, key: &str) {
        let what = format!("the request {key} to reach the upstream");
        test_fixtures::eventually(Duration::from_secs(10), &what, async || {
            self.started_of(key) == 1
        })
        .await;
    }

    /// Every key and how often it ran.
    pub fn runs_by_key(&self) -> HashMap<String, usize> {
        self.counts.by_key.lock().expect("counts").clone()
    }

    /// The lease headers (token, attempt) of every request with `key` that started, in order.
    pub fn leases_of(&self, key: &str) -> Vec<LeaseHeaders> {
        self.counts
            .leases_by_key
            .lock()
            .expect("leases")
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    /// The HTTP version of the last request to `/headers`.
    pub fn last_version(&self) -> axum::http::Version {
        self.counts
            .last_version
            .lock()
            .expect("version")
            .expect("a request reached /headers")
    }

    /// The headers of the last request to `/headers`.
    pub fn last_headers(&self) -> HeaderMap {
        self.counts
            .last_headers
            .lock()
            .expect("headers")
            .clone()
            .expect("a request reached /headers")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn key_of(headers: &HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned()
}

fn record(counts: &Counts, headers: &HeaderMap) -> usize {
    let run = counts.total.fetch_add(1, Ordering::SeqCst) + 1;
    let key = key_of(headers);
    *counts
        .by_key
        .lock()
        .expect("counts")
        .entry(key)
        .or_default() += 1;
    run
}

async fn charge(
    State(counts): State<Arc<Counts>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    *counts
        .started_by_key
        .lock()
        .expect("counts")
        .entry(key_of(&headers))
        .or_default() += 1;
    let number = |name: &str| headers.get(name)?.to_str().ok()?.parse().ok();
    let lease = (
        number("idempotency-lease-token"),
        number("idempotency-attempt").and_then(|n: u64| u32::try_from(n).ok()),
    );
    counts
        .leases_by_key
        .lock()
        .expect("leases")
        .entry(key_of(&headers))
        .or_default()
        .push(lease);
    // The delay comes from the query (part of the fingerprint) or from `x-delay-ms` (not part of
    // it), so a retry can be fast while being the same request.
    let delay = headers
        .get("x-delay-ms")
        .and_then(|v| v.to_str().ok()?.parse().ok())
        .unwrap_or(params.ms);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    let run = record(&counts, &headers);
    let caller = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("anonymous");
    let mut response = (
        StatusCode::CREATED,
        format!(
            "charge {run} for {caller}: {}",
            String::from_utf8_lossy(&body)
        ),
    )
        .into_response();
    response
        .headers_mut()
        .insert("x-charge-id", HeaderValue::from(run));
    response
}

async fn fail(State(counts): State<Arc<Counts>>, headers: HeaderMap) -> StatusCode {
    record(&counts, &headers);
    StatusCode::INTERNAL_SERVER_ERROR
}

async fn big(
    State(counts): State<Arc<Counts>>,
    Query(params): Query<Params>,
    headers: HeaderMap,
) -> Body {
    let run = record(&counts, &headers);
    // Streamed in 16 KiB chunks with a distinct first byte per run, so a truncated or mixed-up
    // replay cannot pass for the original.
    let marker = b'a' + (run % 26) as u8;
    let mut remaining = params.size;
    let chunks = std::iter::from_fn(move || {
        if remaining == 0 {
            return None;
        }
        let len = remaining.min(16 * 1024);
        remaining -= len;
        Some(Ok::<_, std::io::Error>(Bytes::from(vec![marker; len])))
    });
    Body::from_stream(futures_util::stream::iter(chunks))
}

async fn headers(
    State(counts): State<Arc<Counts>>,
    version: axum::http::Version,
    headers: HeaderMap,
) -> Response {
    record(&counts, &headers);
    *counts.last_version.lock().expect("version") = Some(version);
    *counts.last_headers.lock().expect("headers") = Some(headers);
    let mut response = "headers seen".into_response();
    let reply = response.headers_mut();
    // Hop-by-hop headers the proxy must not pass back to the client, and one it must.
    reply.insert("connection", HeaderValue::from_static("x-upstream-hop"));
    reply.insert("x-upstream-hop", HeaderValue::from_static("1"));
    reply.insert("keep-alive", HeaderValue::from_static("timeout=5"));
    reply.insert("proxy-authenticate", HeaderValue::from_static("Basic"));
    reply.insert("x-end-to-end", HeaderValue::from_static("1"));
    response
}

async fn count(State(counts): State<Arc<Counts>>) -> String {
    counts.total.load(Ordering::SeqCst).to_string()
}
