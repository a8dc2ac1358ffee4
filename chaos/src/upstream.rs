//! The recording upstream: one listener per proxy (so it knows which proxy forwarded each
//! execution), logging every execution the moment it arrives, as a side effect would happen.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::IntoResponse;

use crate::clock::Clock;
use crate::history::Execution;
use crate::rng::Rng;

/// The upstream's shared state: the log and the delay the nemesis sets.
#[derive(Clone)]
pub(crate) struct Recorder {
    clock: Clock,
    next_id: Arc<AtomicU64>,
    log: Arc<Mutex<Vec<Execution>>>,
    /// Milliseconds every response is delayed (the "slow upstream" fault); 0: none.
    pub(crate) delay_ms: Arc<AtomicU64>,
}

/// A running upstream: its ports, one per proxy.
pub(crate) struct Upstream {
    pub(crate) ports: Vec<u16>,
    pub(crate) recorder: Recorder,
}

impl Upstream {
    pub(crate) async fn start(clock: Clock, proxies: usize) -> Self {
        let recorder = Recorder {
            clock,
            next_id: Arc::new(AtomicU64::new(1)),
            log: Arc::new(Mutex::new(Vec::new())),
            delay_ms: Arc::new(AtomicU64::new(0)),
        };
        let mut ports = Vec::new();
        for proxy in 0..proxies {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind the recording upstream");
            ports.push(listener.local_addr().expect("upstream address").port());
            let app = axum::Router::new()
                .fallback(record)
                .with_state((recorder.clone(), proxy));
            tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            });
        }
        Self { ports, recorder }
    }

    /// Every execution so far, in arrival order.
    pub(crate) fn executions(&self) -> Vec<Execution> {
        self.recorder.log.lock().expect("log").clone()
    }
}

/// Logs the execution at once, then answers `{"exec": id}` after the nemesis's delay. If the
/// proxy goes away first, hyper drops this future and the entry keeps `end: None`.
async fn record(
    State((recorder, proxy)): State<(Recorder, usize)>,
    headers: HeaderMap,
    body: String,
) -> impl IntoResponse {
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|value| value.to_str().ok())
            .map(str::to_owned)
    };
    let id = recorder.next_id.fetch_add(1, Ordering::Relaxed);
    let index = {
        let mut log = recorder.log.lock().expect("log");
        log.push(Execution {
            id,
            proxy,
            scope: header("authorization").unwrap_or_default(),
            key: header("idempotency-key").unwrap_or_default(),
            body,
            start: recorder.clock.now(),
            end: None,
            lease_token: header("idempotency-lease-token"),
            attempt: header("idempotency-attempt"),
        });
        log.len() - 1
    };
    // A real service takes a while, so crashes and pauses find requests in flight: 20-300 ms,
    // or the nemesis's delay past upstream_timeout.
    let service = Rng::fork(0, 5, id).range(20, 300);
    let delay = recorder.delay_ms.load(Ordering::Relaxed).max(service);
    tokio::time::sleep(Duration::from_millis(delay)).await;
    recorder.log.lock().expect("log")[index].end = Some(recorder.clock.now());
    (
        [("content-type", "application/json")],
        format!("{{\"exec\":{id}}}"),
    )
}
