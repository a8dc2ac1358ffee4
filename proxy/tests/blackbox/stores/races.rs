//! Races between many clients and between proxies on one store: every key runs once.

use std::sync::Arc;

use reqwest::StatusCode;

use super::{Kind, Store, delayed, start_proxies};
use crate::support::{Reply, Upstream};

/// 500 concurrent requests over 50 keys (10 duplicates each), spread over the proxies: every key
/// runs once and every client gets its key's one response.
pub async fn each_key_runs_once_under_500_concurrent_requests(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let proxies = Arc::new(start_proxies(
        &upstream,
        &store,
        // One anonymous caller sends all 500: lift the per-caller bound this test is not about.
        "[idempotency]\non_conflict = \"wait\"\nwait_timeout = \"60s\"\nmax_in_flight_per_caller = 0\n",
    ));
    let replies = futures_util::future::join_all((0..500).map(|i| {
        let proxies = proxies.clone();
        async move {
            let proxy = &proxies[i % proxies.len()];
            let key = format!("key-{}", i % 50);
            let reply = proxy.send(delayed(proxy, &key, 50)).await;
            (key, reply)
        }
    }))
    .await;
    for key in (0..50).map(|i| format!("key-{i}")) {
        assert_eq!(upstream.runs_of(&key), 1, "{key} must run exactly once");
        let bodies: Vec<&Reply> = replies
            .iter()
            .filter(|(k, _)| *k == key)
            .map(|(_, r)| r)
            .collect();
        assert_eq!(bodies.len(), 10);
        for reply in &bodies {
            assert_eq!(reply.status, StatusCode::CREATED, "{key}: {reply:?}");
            assert_eq!(
                reply.body, bodies[0].body,
                "{key}: every client gets the same response"
            );
        }
    }
    assert_eq!(upstream.runs(), 50);
}

/// 50 concurrent duplicates of one request, alternating between two proxies on one store: the
/// upstream runs once. Rejecting, the others get 409 or the replay; waiting, they all get the one
/// response.
async fn fifty_duplicates_across_two_proxies_run_once(kind: Kind, on_conflict: &str) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let proxies = start_proxies(
        &upstream,
        &store,
        &format!("[idempotency]\non_conflict = \"{on_conflict}\"\n"),
    );
    let replies = futures_util::future::join_all((0..50).map(|i| {
        let proxy = &proxies[i % proxies.len()];
        async move { proxy.send(delayed(proxy, "dup", 300)).await }
    }))
    .await;
    assert_eq!(upstream.runs(), 1);
    let created: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    assert!(created.iter().all(|r| r.body == created[0].body));
    if on_conflict == "wait" {
        assert_eq!(created.len(), 50, "{replies:?}");
        assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
    } else {
        assert!(
            replies
                .iter()
                .all(|r| r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT)
        );
    }
    for proxy in &proxies {
        let retry = proxy.send(delayed(proxy, "dup", 300)).await;
        assert!(
            retry.replayed(),
            "every proxy replays the one stored response"
        );
        assert_eq!(retry.body, created[0].body);
    }
    assert_eq!(upstream.runs(), 1);
}

pub async fn fifty_duplicates_across_two_proxies_run_once_rejecting(kind: Kind) {
    fifty_duplicates_across_two_proxies_run_once(kind, "reject").await;
}

pub async fn fifty_duplicates_across_two_proxies_run_once_waiting(kind: Kind) {
    fifty_duplicates_across_two_proxies_run_once(kind, "wait").await;
}
