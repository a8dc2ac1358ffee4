//! Proxy processes sharing one Redis Cluster (the races and outages every store shares are in
//! `stores/`).

use std::sync::Arc;

use reqwest::StatusCode;
use test_fixtures::{RedisCluster, unique};

use crate::support::{Proxy, Upstream, config};

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
