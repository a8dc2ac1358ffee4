//! Proxy processes sharing one Redis (or one Redis Cluster).

use std::sync::Arc;

use reqwest::StatusCode;
use test_fixtures::{RedisCluster, redis_url, require_redis, unique};

use crate::support::{Proxy, Reply, Upstream, config};

fn redis_store(url: &str, prefix: &str) -> String {
    format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\nprefix = \"{prefix}\"\n")
}

/// 50 concurrent duplicates, alternating between two proxies on one store.
async fn duplicates_across(proxies: &[Proxy; 2], path: &str, key: &str) -> Vec<Reply> {
    futures_util::future::join_all((0..50).map(|i| {
        let proxy = &proxies[i % 2];
        async move { proxy.send(proxy.post(path, key).body("x")).await }
    }))
    .await
}

async fn two_proxies(extra: &str) -> (Upstream, [Proxy; 2]) {
    let url = redis_url();
    require_redis(&url);
    let upstream = Upstream::start().await;
    let prefix = unique("proxy-test");
    let settings = format!("{}\n{extra}", redis_store(&url, &prefix));
    let proxies = [
        Proxy::start(&config(&upstream.url, &settings)),
        Proxy::start(&config(&upstream.url, &settings)),
    ];
    (upstream, proxies)
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_on_one_redis_run_a_key_once_in_reject_mode() {
    let (upstream, proxies) = two_proxies("").await;
    let replies = duplicates_across(&proxies, "/payments?ms=300", "dup").await;
    assert_eq!(upstream.runs(), 1);
    let created: Vec<_> = replies
        .iter()
        .filter(|r| r.status == StatusCode::CREATED)
        .collect();
    assert!(
        replies
            .iter()
            .all(|r| r.status == StatusCode::CREATED || r.status == StatusCode::CONFLICT)
    );
    assert!(created.iter().all(|r| r.body == created[0].body));
    for proxy in &proxies {
        let retry = proxy
            .send(proxy.post("/payments?ms=300", "dup").body("x"))
            .await;
        assert!(
            retry.replayed(),
            "both proxies replay the one stored response"
        );
        assert_eq!(retry.body, created[0].body);
    }
    assert_eq!(upstream.runs(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn two_proxies_on_one_redis_run_a_key_once_in_wait_mode() {
    let (upstream, proxies) = two_proxies("[idempotency]\non_conflict = \"wait\"\n").await;
    let replies = duplicates_across(&proxies, "/payments?ms=300", "dup").await;
    assert_eq!(upstream.runs(), 1);
    assert!(
        replies.iter().all(|r| r.status == StatusCode::CREATED),
        "{replies:?}"
    );
    assert!(replies.iter().all(|r| r.body == replies[0].body));
    assert_eq!(replies.iter().filter(|r| r.replayed()).count(), 49);
}

#[tokio::test(flavor = "multi_thread")]
async fn proxies_share_a_redis_cluster() {
    let cluster = RedisCluster::start();
    let urls: Vec<String> = cluster
        .urls()
        .iter()
        .map(|url| format!("\"{url}\""))
        .collect();
    let settings = format!(
        "[store]\nbackend = \"redis-cluster\"\nurls = [{}]\nprefix = \"{}\"\n\n[idempotency]\non_conflict = \"wait\"\n",
        urls.join(", "),
        unique("cluster")
    );
    let upstream = Upstream::start().await;
    let proxies = Arc::new([
        Proxy::start(&config(&upstream.url, &settings)),
        Proxy::start(&config(&upstream.url, &settings)),
    ]);
    // Twenty keys (spread over the three masters), five duplicates each, across both proxies.
    let replies = futures_util::future::join_all((0..100).map(|i| {
        let proxies = proxies.clone();
        async move {
            let proxy = &proxies[i % 2];
            let key = format!("key-{}", i % 20);
            (
                key.clone(),
                proxy
                    .send(proxy.post("/payments?ms=100", &key).body("x"))
                    .await,
            )
        }
    }))
    .await;
    for (key, reply) in &replies {
        assert_eq!(reply.status, StatusCode::CREATED, "{key}: {reply:?}");
        assert_eq!(upstream.runs_of(key), 1, "{key} ran once");
    }
    assert_eq!(upstream.runs(), 20);
    for proxy in proxies.iter() {
        assert_eq!(proxy.admin_get("/readyz").await.status, StatusCode::OK);
    }
}
