//! The admin listener: `/healthz`, `/readyz`, `/metrics` and `/records/{key}` (see
//! [`crate::admin_records`]).

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;

use crate::admin_records::{self, RecordsState};
use metrics_exporter_prometheus::PrometheusHandle;
use tower_idempotency::IdempotencyStore;
use tower_idempotency::problem::{Problem, ProblemKind};

use crate::telemetry;
use tower_idempotency::store::DynStore;

/// How long `/readyz` waits for the store before calling it unreachable.
const READINESS_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone)]
struct AdminState {
    store: DynStore,
    metrics: PrometheusHandle,
}

/// The admin routes. Serve them with `into_make_service_with_connect_info::<SocketAddr>()`: the
/// record endpoints look at the peer address.
pub fn router(store: DynStore, metrics: PrometheusHandle, records: RecordsState) -> Router {
    let records = Router::new()
        .route(
            "/records/{key}",
            get(admin_records::show).delete(admin_records::forget),
        )
        .with_state(records);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(render_metrics))
        .with_state(AdminState { store, metrics })
        .merge(records)
}

/// The process is up and serving.
async fn healthz() -> &'static str {
    "ok\n"
}

/// The store answers: the proxy can protect requests.
async fn readyz(State(state): State<AdminState>) -> Response {
    let reason = match tokio::time::timeout(READINESS_TIMEOUT, state.store.ping()).await {
        Ok(Ok(())) => return (StatusCode::OK, "ready\n").into_response(),
        Ok(Err(error)) => format!("the idempotency store is unreachable: {error}"),
        Err(_) => format!("the idempotency store did not answer within {READINESS_TIMEOUT:?}"),
    };
    telemetry::readiness_failure();
    tracing::warn!(%reason, "not ready");
    Problem::new(ProblemKind::StoreUnavailable, reason).into_response(axum::body::Body::from)
}

async fn render_metrics(State(state): State<AdminState>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        state.metrics.render(),
    )
        .into_response()
}
