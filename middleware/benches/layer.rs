//! The layer's cost per request, in process: the same trivial axum handler with and without
//! `IdempotencyLayer` (memory store), for requests without a key, with a new key each time, and
//! replaying one key, at three body sizes. No sockets: what is measured is the layer itself.
//!
//! `cargo bench -p tower-idempotency --bench layer`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::http::Request;
use axum::routing::post;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use http_body_util::BodyExt;
use tower::ServiceExt;
use tower_idempotency::{IdempotencyLayer, MemoryStore, Policy};

/// Echoes the request body, so the response is as large as the request.
async fn echo(body: Bytes) -> Bytes {
    body
}

fn request(key: Option<String>, body: &Bytes) -> Request<Body> {
    let mut request = Request::post("/echo");
    if let Some(key) = key {
        request = request.header("idempotency-key", key);
    }
    request.body(Body::from(body.clone())).expect("request")
}

async fn round_trip(app: &Router, request: Request<Body>) {
    let response = app.clone().oneshot(request).await.expect("response");
    let body = response.into_body().collect().await.expect("body");
    std::hint::black_box(body.to_bytes());
}

fn layer_overhead(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .expect("runtime");
    let plain = Router::new().route("/echo", post(echo));
    // Records expire within milliseconds and are swept as fast, so a benchmark that writes
    // millions of them measures the layer, not the allocator under a growing heap.
    let layered = runtime.block_on(async {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_millis(5))
            .build();
        let policy = Policy::default()
            .with_ttl(Duration::from_millis(5))
            .with_max_request_body(1024 * 1024usize);
        plain
            .clone()
            .layer(IdempotencyLayer::new(store).policy(policy))
    });
    let replaying = runtime.block_on(async {
        let policy = Policy::default().with_max_request_body(1024 * 1024usize);
        plain
            .clone()
            .layer(IdempotencyLayer::new(MemoryStore::new()).policy(policy))
    });
    let next_key = AtomicU64::new(0);

    for size in [100usize, 1024, 64 * 1024] {
        let body = Bytes::from(vec![b'x'; size]);
        let mut group = c.benchmark_group(format!("body {size} B"));
        group.throughput(Throughput::Elements(1));
        group.bench_function(BenchmarkId::from_parameter("without layer"), |b| {
            b.to_async(&runtime)
                .iter(|| round_trip(&plain, request(None, &body)));
        });
        group.bench_function(BenchmarkId::from_parameter("layer, no key"), |b| {
            b.to_async(&runtime)
                .iter(|| round_trip(&layered, request(None, &body)));
        });
        group.bench_function(BenchmarkId::from_parameter("layer, new key"), |b| {
            b.to_async(&runtime).iter(|| {
                let key = next_key.fetch_add(1, Ordering::Relaxed).to_string();
                round_trip(&layered, request(Some(key), &body))
            });
        });
        runtime.block_on(round_trip(
            &replaying,
            request(Some(format!("replay-{size}")), &body),
        ));
        group.bench_function(BenchmarkId::from_parameter("layer, replay"), |b| {
            b.to_async(&runtime)
                .iter(|| round_trip(&replaying, request(Some(format!("replay-{size}")), &body)));
        });
        group.finish();
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2))
        .sample_size(30);
    targets = layer_overhead
}
criterion_main!(benches);
