//! Proxies that die or stall holding a lease: what completed survives a `kill -9`, a dead
//! holder's lease is taken over after `lock_ttl`, a paused holder's late result is refused, and a
//! long call keeps its lease by renewal.

use std::time::{Duration, Instant};

use reqwest::StatusCode;

use super::{Kind, Store, delayed, start_proxies};
use crate::support::{Proxy, Reply, Upstream, config, eventually};

/// A proxy killed with SIGKILL and started again replays what it completed before it died.
pub async fn a_restarted_proxy_replays_what_completed_before_it_was_killed(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let text = config(&upstream.url, &store.section());
    let mut proxy = Proxy::start(&text);
    let first = proxy.send(delayed(&proxy, "durable", 0)).await;
    assert_eq!(first.status, StatusCode::CREATED);
    proxy.kill();
    let proxy = Proxy::start(&text);
    let replay = proxy.send(delayed(&proxy, "durable", 0)).await;
    assert!(
        replay.replayed(),
        "the record survived the crash: {replay:?}"
    );
    assert_eq!(replay.body, first.body);
    assert_eq!(upstream.runs(), 1);
}

/// A proxy killed while the upstream runs its request leaves a lease; it blocks the key until
/// `lock_ttl` passes, then another proxy takes it over and runs the request.
pub async fn a_killed_proxys_lease_is_taken_over_after_lock_ttl(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!("{}\n[idempotency]\nlock_ttl = \"1s\"\n", store.section()),
    );
    let mut doomed = Proxy::start(&text);
    let survivor = (store.processes() > 1).then(|| Proxy::start(&text));
    let request = delayed(&doomed, "orphan", 10_000).send();
    let abandoned = tokio::spawn(request);
    upstream.wait_until_reached("orphan").await;
    doomed.kill();
    let killed_at = Instant::now();
    let _ = abandoned.await;
    let survivor = survivor.unwrap_or_else(|| Proxy::start(&text));
    if store.processes() > 1 {
        let blocked = survivor.send(delayed(&survivor, "orphan", 0)).await;
        if killed_at.elapsed() < Duration::from_millis(600) {
            assert_eq!(
                blocked.status,
                StatusCode::CONFLICT,
                "the dead holder's lease still counts"
            );
        }
    }
    eventually(
        Duration::from_secs(10),
        "a takeover after lock_ttl",
        async || survivor.send(delayed(&survivor, "orphan", 0)).await.status == StatusCode::CREATED,
    )
    .await;
    assert_eq!(
        upstream.started_of("orphan"),
        2,
        "the takeover ran the request again"
    );
    assert!(
        survivor
            .send(delayed(&survivor, "orphan", 0))
            .await
            .replayed()
    );
}

/// A holder paused past `lock_ttl` (SIGSTOP) loses its lease to another proxy; when it resumes,
/// the store refuses its late result, so the takeover's response is the one replayed.
pub async fn a_paused_holders_late_result_is_refused(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!("{}\n[idempotency]\nlock_ttl = \"1s\"\n", store.section()),
    );
    let paused = Proxy::start(&text);
    let other = Proxy::start(&text);
    let request = delayed(&paused, "paused", 2500).send();
    let stale =
        tokio::spawn(async move { Reply::read(request.await.expect("stale request")).await });
    upstream.wait_until_reached("paused").await;
    paused.signal("STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let takeover = other.send(delayed(&other, "paused", 0)).await;
    assert_eq!(
        takeover.status,
        StatusCode::CREATED,
        "the lease expired: {takeover:?}"
    );
    // Let the first upstream call finish while its proxy is still stopped, then resume it.
    eventually(
        Duration::from_secs(10),
        "the first upstream call to finish",
        async || upstream.runs_of("paused") == 2,
    )
    .await;
    paused.signal("CONT");
    let stale = stale.await.expect("task");
    assert_eq!(
        stale.status,
        StatusCode::CREATED,
        "its client still gets the response it ran"
    );
    assert_ne!(stale.body, takeover.body);
    eventually(
        Duration::from_secs(5),
        "the stale proxy to try to store its result",
        async || paused.stderr().contains("lease lost"),
    )
    .await;
    for proxy in [&paused, &other] {
        let replay = proxy.send(delayed(proxy, "paused", 0)).await;
        assert!(replay.replayed());
        assert_eq!(
            replay.body, takeover.body,
            "the stale result never overwrote the takeover"
        );
    }
}

/// An upstream call three times longer than `lock_ttl` keeps its lease by renewal: duplicates
/// meanwhile are refused, and it runs once.
pub async fn a_long_upstream_call_keeps_its_lease_by_renewal(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let proxies = start_proxies(&upstream, &store, "[idempotency]\nlock_ttl = \"1s\"\n");
    let first = &proxies[0];
    let request = delayed(first, "long", 3000).send();
    let long = tokio::spawn(async move { Reply::read(request.await.expect("long request")).await });
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(1200)).await;
        let proxy = proxies.last().expect("a proxy");
        let duplicate = proxy.send(delayed(proxy, "long", 3000)).await;
        assert_eq!(
            duplicate.status,
            StatusCode::CONFLICT,
            "the lease is renewed"
        );
    }
    assert_eq!(long.await.expect("task").status, StatusCode::CREATED);
    assert_eq!(upstream.started_of("long"), 1);
}
