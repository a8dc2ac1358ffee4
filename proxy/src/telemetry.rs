//! Logs and Prometheus metrics.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{Counter, Histogram, Unit, counter, describe_counter, describe_histogram, histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

/// Histogram of upstream response-head latency, labelled by status class (`2xx`... and `502`
/// or `504` for failures the proxy answered itself).
pub const UPSTREAM_DURATION_SECONDS: &str = "idempotency_proxy_upstream_duration_seconds";
/// Counter of requests the proxy answered, by status class.
pub const RESPONSES_TOTAL: &str = "idempotency_proxy_responses_total";
/// Counter of readiness probes that found the store unreachable.
pub const READINESS_FAILURES_TOTAL: &str = "idempotency_proxy_readiness_failures_total";
/// Counter of configuration reloads (SIGHUP), by `result`: `ok` or `failed`.
pub const CONFIG_RELOADS_TOTAL: &str = "idempotency_config_reloads_total";

/// Buckets of the group-commit batch sizes (calls per statement or transaction; at most 256).
const BATCH_SIZE_BUCKETS: [f64; 9] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0];
/// Seconds buckets from half a millisecond to a minute.
const LATENCY_BUCKETS: [f64; 16] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
];

/// Installs `tracing` output to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
}

/// Installs the Prometheus recorder for this process and returns the handle that renders it.
pub fn install_metrics() -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".to_owned()), &LATENCY_BUCKETS)
        .map_err(|error| error.to_string())?
        .set_buckets_for_metric(
            Matcher::Full("idempotency_store_batch_size".to_owned()),
            &BATCH_SIZE_BUCKETS,
        )
        .map_err(|error| error.to_string())?
        .install_recorder()
        .map_err(|error| error.to_string())?;
    tower_idempotency::telemetry::describe();
    register_handles();
    describe_histogram!(
        UPSTREAM_DURATION_SECONDS,
        Unit::Seconds,
        "Time to the upstream's response head, by status class"
    );
    describe_counter!(
        RESPONSES_TOTAL,
        Unit::Count,
        "Responses sent to clients, by status class"
    );
    describe_counter!(
        READINESS_FAILURES_TOTAL,
        Unit::Count,
        "Readiness probes that found the idempotency store unreachable"
    );
    describe_counter!(
        CONFIG_RELOADS_TOTAL,
        Unit::Count,
        "Configuration reloads on SIGHUP, by result (ok: routes applied; failed: old ones kept)"
    );
    // Histograms are folded into their buckets by upkeep; without it they grow until rendered.
    let upkeep = handle.clone();
    tokio::spawn(async move {
        let mut ticks = tokio::time::interval(Duration::from_secs(5));
        loop {
            ticks.tick().await;
            upkeep.run_upkeep();
        }
    });
    Ok(handle)
}

/// Status classes, as labelled.
const CLASSES: [&str; 7] = ["1xx", "2xx", "3xx", "4xx", "5xx", "502", "504"];

fn class_index(status: u16) -> usize {
    match status {
        502 => 5,
        504 => 6,
        100..=199 => 0,
        200..=299 => 1,
        300..=399 => 2,
        400..=499 => 3,
        _ => 4,
    }
}

/// Metric handles registered once at start-up, so a request does not build and look up a key.
struct Handles {
    upstream_durations: [Histogram; CLASSES.len()],
    responses: [Counter; CLASSES.len()],
    readiness_failures: Counter,
    config_reloads: [Counter; 2],
}

static HANDLES: OnceLock<Handles> = OnceLock::new();

fn register_handles() {
    HANDLES.get_or_init(|| Handles {
        upstream_durations: CLASSES
            .map(|class| histogram!(UPSTREAM_DURATION_SECONDS, "status" => class)),
        responses: CLASSES.map(|class| counter!(RESPONSES_TOTAL, "status" => class)),
        readiness_failures: counter!(READINESS_FAILURES_TOTAL),
        config_reloads: ["ok", "failed"]
            .map(|result| counter!(CONFIG_RELOADS_TOTAL, "result" => result)),
    });
}

pub(crate) fn upstream_call(took: Duration, status: u16) {
    if let Some(handles) = HANDLES.get() {
        handles.upstream_durations[class_index(status)].record(took);
    }
}

pub(crate) fn response(status: u16) {
    if let Some(handles) = HANDLES.get() {
        handles.responses[class_index(status)].increment(1);
    }
}

pub(crate) fn readiness_failure() {
    if let Some(handles) = HANDLES.get() {
        handles.readiness_failures.increment(1);
    }
}

pub(crate) fn config_reload(ok: bool) {
    if let Some(handles) = HANDLES.get() {
        handles.config_reloads[usize::from(!ok)].increment(1);
    }
}
