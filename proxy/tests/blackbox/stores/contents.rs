//! What the store holds and how it is set up: digests only, never keys or credentials; the
//! schema from `idempotency-proxy migrate`; the SQL stores' batch sizes on `/metrics`.

use reqwest::StatusCode;

use super::{Kind, Store};
use crate::support::{Proxy, Upstream, config};

/// The store holds digests of keys and credentials, never the values themselves; and one
/// caller's key never replays to another caller.
pub async fn keys_and_credentials_are_stored_only_as_digests(kind: Kind) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &store.section()));
    let as_caller = |token: &str| {
        proxy
            .post("/headers", "key-3f9a7c")
            .header("authorization", format!("Bearer {token}"))
            .body("x")
    };
    assert!(!proxy.send(as_caller("token-8d2e41")).await.replayed());
    assert!(proxy.send(as_caller("token-8d2e41")).await.replayed());
    assert!(
        !proxy.send(as_caller("token-other")).await.replayed(),
        "another caller, no replay"
    );
    let dump = store.dump();
    assert!(
        dump.contains("headers seen"),
        "the dump shows the stored responses: {dump:?}"
    );
    for secret in ["key-3f9a7c", "token-8d2e41", "token-other"] {
        assert!(
            !dump.contains(secret),
            "{secret} is stored in clear: {dump:?}"
        );
    }
}

/// `auto_migrate = false`: the proxy does not create the PostgreSQL table (a keyed request meets
/// a store error, `503`), and `idempotency-proxy migrate` with the same file does.
#[tokio::test(flavor = "multi_thread")]
async fn without_auto_migrate_the_schema_comes_from_the_migrate_command() {
    let store = Store::new(Kind::Postgres);
    let upstream = Upstream::start().await;
    let section = format!("{}auto_migrate = false\n", store.section());
    let proxy = Proxy::start(&config(&upstream.url, &section));
    let before = proxy.send(proxy.post("/payments", "before")).await;
    assert_eq!(
        before.status,
        StatusCode::SERVICE_UNAVAILABLE,
        "{}",
        before.text()
    );

    let migrated = std::process::Command::new(crate::support::PROXY_BIN)
        .arg("migrate")
        .arg("--config")
        .arg(proxy.dir.path().join("proxy.toml"))
        .env_remove("IDEMPOTENCY_STORE_URL")
        .output()
        .expect("run migrate");
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let after = proxy.send(proxy.post("/payments", "after")).await;
    assert!(after.status.is_success(), "{after:?}");
    let retry = proxy.send(proxy.post("/payments", "after")).await;
    assert!(retry.replayed(), "{retry:?}");
}

/// The SQL stores merge concurrent begins and completes (group commit) and the proxy exports the
/// batch sizes on its admin `/metrics`.
async fn the_batch_sizes_of_a_sql_store_are_exported(kind: Kind, expected: &[&str]) {
    let store = Store::new(kind);
    let upstream = Upstream::start().await;
    let proxy = Proxy::start(&config(&upstream.url, &store.section()));
    let reply = proxy
        .send(proxy.post("/payments", "batched").body("x"))
        .await;
    assert!(reply.status.is_success(), "{reply:?}");
    let metrics = proxy.admin_get("/metrics").await.text();
    for line in expected {
        assert!(metrics.contains(line), "missing {line:?} in:\n{metrics}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn the_sqlite_stores_batch_sizes_are_exported() {
    the_batch_sizes_of_a_sql_store_are_exported(
        Kind::Sqlite,
        &[
            "idempotency_store_batch_size_bucket{backend=\"sqlite\",operation=\"write\",le=\"1\"} 2",
            "# HELP idempotency_store_batch_size",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_postgres_stores_batch_sizes_are_exported() {
    the_batch_sizes_of_a_sql_store_are_exported(
        Kind::Postgres,
        &[
            "idempotency_store_batch_size_bucket{backend=\"postgres\",operation=\"begin\",le=\"1\"} 1",
            "idempotency_store_batch_size_bucket{backend=\"postgres\",operation=\"complete\",le=\"1\"} 1",
        ],
    )
    .await;
}
