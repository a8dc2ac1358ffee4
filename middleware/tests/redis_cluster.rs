//! `RedisStore` on a real three-master Redis Cluster, started for the test on free loopback ports
//! (needs `redis-server` and `redis-cli` on PATH): the whole store contract suite, then the
//! cluster-specific promises: records spread over every shard, completions published on one
//! shard reach a subscriber connected to another, and scripts survive `SCRIPT FLUSH` everywhere.
//!
//! Starting a cluster takes a few seconds, so one test runs every phase on one cluster.

mod redis_support;

use std::collections::BTreeMap;

use test_fixtures::records::{NOTIFY_WITHIN, acquire, key, replayed, response};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{IdempotencyStore, RecordKey, RedisStore};

use redis_support::{RedisCluster, raw_connection, unique_prefix};

async fn connect(urls: &[String], prefix: &str) -> RedisStore {
    RedisStore::cluster_builder(urls)
        .prefix(prefix)
        .connect()
        .await
        .unwrap_or_else(|error| panic!("cannot connect to the test cluster {urls:?}: {error}"))
}

/// The record keys of `prefix` held by each node (KEYS only sees the node it is sent to).
async fn keys_per_node(cluster: &RedisCluster, prefix: &str) -> Vec<Vec<RecordKey>> {
    let mut per_node = Vec::new();
    for node in &cluster.nodes {
        let names: Vec<String> = redis::cmd("KEYS")
            .arg(format!("{prefix}:*"))
            .query_async(&mut raw_connection(&node.url()).await)
            .await
            .expect("KEYS");
        per_node.push(
            names
                .iter()
                .filter_map(|name| RecordKey::from_hex(name.strip_prefix(&format!("{prefix}:"))?))
                .collect(),
        );
    }
    per_node
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_store_contract_holds_on_a_three_master_cluster() {
    let cluster = RedisCluster::start();
    let urls = cluster.urls();

    // Phase 1: the whole contract, each check on a store with a prefix of its own.
    tower_idempotency::store_conformance_run_all!(|| {
        let urls = urls.clone();
        async move { connect(&urls, &unique_prefix("cluster-conformance")).await }
    })
    .await;

    // Phase 2: one key per record means records spread over every master (the contract's 200
    // concurrent keys are still there: their TTL is ten minutes).
    let mut sizes = BTreeMap::new();
    for node in &cluster.nodes {
        let size: i64 = redis::cmd("DBSIZE")
            .query_async(&mut raw_connection(&node.url()).await)
            .await
            .expect("DBSIZE");
        sizes.insert(node.port, size);
    }
    assert!(
        sizes.values().all(|size| *size > 0),
        "every master holds records: {sizes:?}"
    );

    // Phase 3: the subscriber listens on one node, yet completions of keys owned by every
    // master reach it (classic PUBLISH is forwarded over the cluster bus).
    let prefix = unique_prefix("cluster-notify");
    let waiter = connect(&urls, &prefix).await;
    let worker = connect(&urls, &prefix).await;
    let mut tokens = BTreeMap::new();
    for i in 0..32 {
        let key = key(&format!("notify-{i}"));
        tokens.insert(key, acquire(&worker, &key, LONG).await);
    }
    let per_node = keys_per_node(&cluster, &prefix).await;
    assert!(
        per_node.iter().all(|keys| !keys.is_empty()),
        "32 keys land on every master: {:?}",
        per_node.iter().map(Vec::len).collect::<Vec<_>>()
    );
    for keys in &per_node {
        let key = keys[0];
        let subscription = waiter.subscribe(&key);
        let woken = subscription.notified();
        assert!(waiter.watch(&key).await.expect("watch"));
        worker
            .complete(&key, tokens[&key], &response("done"), LONG)
            .await
            .expect("complete");
        tokio::time::timeout(NOTIFY_WITHIN, woken)
            .await
            .expect("a completion on any master must reach the subscriber");
        assert_eq!(replayed(&waiter, &key).await, Some(response("done")));
    }

    // Phase 4: after every node forgot the scripts, calls routed to each master reload them.
    for node in &cluster.nodes {
        let () = redis::cmd("SCRIPT")
            .arg("FLUSH")
            .query_async(&mut raw_connection(&node.url()).await)
            .await
            .expect("SCRIPT FLUSH");
    }
    for keys in &per_node {
        let key = keys[1];
        worker
            .release(&key, tokens[&key])
            .await
            .expect("release after SCRIPT FLUSH");
        let token = acquire(&worker, &key, LONG).await;
        worker
            .complete(&key, token, &response("again"), LONG)
            .await
            .expect("complete after SCRIPT FLUSH");
    }

    worker.ping().await.expect("every master answers PING");
    assert!(format!("{worker:?}").contains("cluster"));
}
