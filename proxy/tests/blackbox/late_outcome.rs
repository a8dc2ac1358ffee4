//! The late result of an unknown outcome: an upstream that answers after `upstream_timeout` but
//! within `lock_ttl` has its answer stored, replayed to retries and handed to waiting
//! duplicates; the upstream ran once.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;

use crate::support::{Proxy, Reply, Upstream, config_with_proxy, eventually};

const MEMORY: &str = "[store]\nbackend = \"memory\"\n";

/// The proxy times out after 300 ms and keeps the key for `lock_ttl`.
async fn start(lock_ttl: &str, idempotency: &str) -> (Upstream, Proxy) {
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config_with_proxy(
        &upstream.url,
        "upstream_timeout = \"300ms\"",
        &format!("{MEMORY}\n[idempotency]\nlock_ttl = \"{lock_ttl}\"\n{idempotency}"),
    ));
    (upstream, proxy)
}

/// A payment that takes `delay_ms` at the upstream (the delay is not part of the fingerprint).
fn payment(proxy: &Proxy, key: &str, delay_ms: u64) -> reqwest::RequestBuilder {
    proxy
        .post("/payments", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body("10 EUR")
}

fn assert_pending(reply: &Reply, retry_after: &str) {
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT, "{reply:?}");
    assert_eq!(reply.problem(), "outcome-pending");
    assert_eq!(reply.headers["retry-after"], retry_after, "{reply:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_answer_is_stored_and_replayed_and_the_upstream_runs_once() {
    let (upstream, proxy) = start("3s", "").await;
    let started = Instant::now();
    let first = proxy.send(payment(&proxy, "late", 1000)).await;
    assert_pending(&first, "3");
    assert!(
        started.elapsed() < Duration::from_millis(900),
        "answered at the timeout"
    );

    eventually(
        Duration::from_secs(5),
        "the upstream to finish its slow run",
        async || upstream.runs_of("late") == 1,
    )
    .await;
    // The answer is stored moments after the upstream sent it; until then a retry conflicts.
    let mut retry = proxy.send(payment(&proxy, "late", 0)).await;
    while retry.status == StatusCode::CONFLICT && started.elapsed() < Duration::from_secs(3) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        retry = proxy.send(payment(&proxy, "late", 0)).await;
    }
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed(), "the late answer is replayed: {retry:?}");
    assert_eq!(retry.text(), "charge 1 for anonymous: 10 EUR");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "replayed before lock_ttl could have expired"
    );
    assert_eq!(upstream.started_of("late"), 1, "the upstream ran once");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_waiting_duplicate_is_woken_with_the_late_answer() {
    let (upstream, proxy) = start("5s", "on_conflict = \"wait\"\nwait_timeout = \"10s\"\n").await;
    let proxy = Arc::new(proxy);
    let started = Instant::now();
    let first = proxy.send(payment(&proxy, "woken", 1200)).await;
    assert_pending(&first, "5");

    // Sent while the late answer is awaited: it waits for it rather than running again.
    let duplicate = proxy.send(payment(&proxy, "woken", 0)).await;
    assert_eq!(duplicate.status, StatusCode::CREATED, "{duplicate:?}");
    assert!(duplicate.replayed(), "{duplicate:?}");
    assert_eq!(duplicate.text(), "charge 1 for anonymous: 10 EUR");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "woken by the late answer, not by the lease expiring: {:?}",
        started.elapsed()
    );
    assert_eq!(upstream.started_of("woken"), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_upstream_slower_than_the_window_runs_again_after_lock_ttl() {
    let (upstream, proxy) = start("1s", "").await;
    let first = proxy.send(payment(&proxy, "slower", 3000)).await;
    assert_pending(&first, "1");
    // Within the window the key is held: a retry neither runs alongside nor replays.
    let early = proxy.send(payment(&proxy, "slower", 0)).await;
    assert_eq!(early.status, StatusCode::CONFLICT, "{early:?}");
    // The window (lock_ttl past the timeout) ends without an answer: the key runs again.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let retry = proxy.send(payment(&proxy, "slower", 0)).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(!retry.replayed());
    assert_eq!(upstream.started_of("slower"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_late_answer_that_may_not_be_stored_releases_the_key() {
    // The upstream's 201 is in never_store here: a late answer follows the same storage rules.
    let (upstream, proxy) = start("5s", "never_store = [201]\n").await;
    let started = Instant::now();
    let first = proxy.send(payment(&proxy, "unstorable", 800)).await;
    assert_pending(&first, "5");
    eventually(
        Duration::from_secs(5),
        "the upstream to finish its slow run",
        async || upstream.runs_of("unstorable") == 1,
    )
    .await;
    let mut retry = proxy.send(payment(&proxy, "unstorable", 0)).await;
    while retry.status == StatusCode::CONFLICT && started.elapsed() < Duration::from_secs(4) {
        tokio::time::sleep(Duration::from_millis(50)).await;
        retry = proxy.send(payment(&proxy, "unstorable", 0)).await;
    }
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(
        !retry.replayed(),
        "never_store is never replayed: {retry:?}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "released when the late answer came, not left to expire"
    );
    assert_eq!(upstream.started_of("unstorable"), 2);
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_waits_for_a_pending_late_answer_and_stores_it() {
    let records = tempfile::tempdir().expect("temp dir");
    let upstream = Upstream::start().await;
    let text = config_with_proxy(
        &upstream.url,
        "upstream_timeout = \"300ms\"",
        &format!(
            "[store]\nbackend = \"sqlite\"\nurl = \"sqlite://{}\"\n\n[idempotency]\nlock_ttl = \"5s\"\n",
            records.path().join("idempotency.db").display()
        ),
    );
    let mut proxy = Proxy::start(&text);
    let first = proxy.send(payment(&proxy, "sigterm-late", 1500)).await;
    assert_pending(&first, "5");
    // The client has its answer; only the pending late result holds the proxy now.
    proxy.signal("TERM");
    let status = proxy.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "stderr:\n{}", proxy.stderr());
    assert_eq!(
        upstream.runs_of("sigterm-late"),
        1,
        "stderr:\n{}",
        proxy.stderr()
    );

    let restarted = Proxy::start(&text);
    let retry = restarted.send(payment(&restarted, "sigterm-late", 0)).await;
    assert_eq!(retry.status, StatusCode::CREATED, "{retry:?}");
    assert!(retry.replayed(), "stored before exit: {retry:?}");
    assert_eq!(upstream.started_of("sigterm-late"), 1);
}
