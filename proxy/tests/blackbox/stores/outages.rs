//! The network to the store fails, or the store process dies mid-load: no request hangs or
//! runs twice, reject routes answer 503, forward routes run, and the proxy recovers by itself.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use test_fixtures::{
    Fault, FaultProxy, PostgresServer, RedisServer, database_url, redis_url, unique,
};

use super::{Kind, Store, delayed};
use crate::support::{Proxy, Upstream, config, eventually};

/// Latency, black holes and resets between the proxy and the store: no request hangs past the
/// store timeout, nothing runs twice, and the proxy recovers when the network does.
pub async fn store_network_faults_never_hang_or_double_execute(kind: Kind) {
    let store = Store::new(kind);
    let target = match kind {
        Kind::Postgres => database_url(),
        Kind::Redis => redis_url(),
        Kind::Sqlite => return,
    };
    let port = target
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next()?.parse::<u16>().ok())
        .expect("the store URL names a port");
    let faults = FaultProxy::start(([127, 0, 0, 1], port).into()).await;
    let url = target.replacen(&format!(":{port}"), &format!(":{}", faults.addr.port()), 1);
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!(
            "{}timeout = \"1s\"\n\n[idempotency]\nlock_ttl = \"2s\"\n",
            store.section_at(Some(&url))
        ),
    );
    let proxy = Proxy::start(&text);
    assert_eq!(
        proxy.send(delayed(&proxy, "warm", 0)).await.status,
        StatusCode::CREATED
    );

    faults.set(Fault::Latency(Duration::from_millis(20)));
    assert_eq!(
        proxy.send(delayed(&proxy, "slow", 0)).await.status,
        StatusCode::CREATED
    );

    for (fault, key) in [(Fault::Blackhole, "blackhole"), (Fault::Reset, "reset")] {
        faults.set(fault);
        let started = Instant::now();
        let reply = proxy.send(delayed(&proxy, key, 0)).await;
        assert_eq!(
            reply.status,
            StatusCode::SERVICE_UNAVAILABLE,
            "{fault:?}: {reply:?}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(4),
            "{fault:?} took {:?}",
            started.elapsed()
        );
        assert_eq!(
            upstream.started_of(key),
            0,
            "{fault:?}: never run unprotected"
        );
    }

    faults.set(Fault::None);
    for key in ["blackhole", "reset", "after"] {
        eventually(
            Duration::from_secs(20),
            "the proxy to recover",
            async || proxy.send(delayed(&proxy, key, 0)).await.status == StatusCode::CREATED,
        )
        .await;
        assert_eq!(upstream.started_of(key), 1, "{key} ran exactly once");
    }
}

/// The store process dies mid-load and comes back: reject routes answer 503 and never reach the
/// upstream, forward routes run, and the proxy reconnects by itself.
async fn outage_mid_load(section: String, kill: impl FnOnce(), restart: impl FnOnce()) {
    let upstream = Upstream::start().await;
    let text = config(
        &upstream.url,
        &format!(
            "{section}timeout = \"500ms\"\n\n[[route]]\npath = \"/feed/**\"\non_store_error = \"forward\"\n"
        ),
    );
    let proxy = Arc::new(Proxy::start(&text));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Four clients in a loop. A request caught between begin and complete sits out the start of
    // the outage while complete retries (three attempts of the 500 ms store timeout), then
    // answers; the outage outlasts that, so every client meets it at begin too.
    let load: Vec<_> = (0..4)
        .map(|worker| {
            let (proxy, stop) = (proxy.clone(), stop.clone());
            tokio::spawn(async move {
                let mut replies = Vec::new();
                let mut i = 0;
                while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                    let key = format!("load-{worker}-{i}");
                    let paid = proxy.send(proxy.post("/payments", &key).body("x")).await;
                    let fed = proxy
                        .send(
                            proxy
                                .post("/feed/items", &format!("feed-{worker}-{i}"))
                                .body("x"),
                        )
                        .await;
                    replies.push((key, paid, fed));
                    i += 1;
                }
                replies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    kill();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    restart();
    eventually(
        Duration::from_secs(30),
        "the proxy to recover",
        async || {
            let key = unique("recovered");
            proxy
                .send(proxy.post("/payments", &key).body("x"))
                .await
                .status
                == StatusCode::CREATED
        },
    )
    .await;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut replies = Vec::new();
    for worker in load {
        replies.extend(worker.await.expect("load task"));
    }
    let rejected = replies
        .iter()
        .filter(|(_, paid, _)| paid.status == StatusCode::SERVICE_UNAVAILABLE)
        .count();
    let statuses: Vec<u16> = replies
        .iter()
        .map(|(_, paid, _)| paid.status.as_u16())
        .collect();
    assert!(rejected > 0, "the outage was not seen: {statuses:?}");
    for (key, paid, fed) in &replies {
        match paid.status {
            StatusCode::CREATED => assert_eq!(upstream.runs_of(key), 1),
            StatusCode::SERVICE_UNAVAILABLE => {
                assert_eq!(paid.problem(), "store-unavailable");
                assert_eq!(
                    upstream.started_of(key),
                    0,
                    "{key} was rejected yet reached the upstream"
                );
            }
            other => panic!("{key}: unexpected {other}: {paid:?}"),
        }
        assert_eq!(
            fed.status,
            StatusCode::CREATED,
            "forward routes run during the outage"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_crash_mid_load_rejects_or_forwards_and_recovers() {
    let server = std::sync::Mutex::new(PostgresServer::start());
    let url = server.lock().expect("server").url();
    let section = format!("[store]\nbackend = \"postgres\"\nurl = \"{url}\"\n");
    outage_mid_load(
        section,
        || server.lock().expect("server").kill(),
        || server.lock().expect("server").restart(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_crash_mid_load_rejects_or_forwards_and_recovers() {
    let server = std::sync::Mutex::new(RedisServer::start());
    let url = server.lock().expect("server").url();
    let section = format!("[store]\nbackend = \"redis\"\nurl = \"{url}\"\n");
    outage_mid_load(
        section,
        || server.lock().expect("server").kill(),
        || server.lock().expect("server").restart(),
    )
    .await;
}
