//! Races, crashes, pauses and outages with real proxy processes on every durable store: SQLite
//! (one process per file), PostgreSQL and Redis (shared by two proxies).
//!
//! Each check is written once and run per store by `store_checks!`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::StatusCode;
use test_fixtures::{
    Fault, FaultProxy, PostgresServer, RedisServer, database_url, redis_url, require_postgres,
    require_redis, test_schema, unique,
};

use crate::support::{Proxy, Reply, Upstream, config, eventually};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
    Redis,
}

/// One store for one test: its own SQLite file, Postgres schema or Redis prefix.
struct Store {
    kind: Kind,
    dir: tempfile::TempDir,
    name: String,
}

impl Store {
    fn new(kind: Kind) -> Self {
        match kind {
            Kind::Postgres => require_postgres(&database_url()),
            Kind::Redis => require_redis(&redis_url()),
            Kind::Sqlite => {}
        }
        Self {
            kind,
            dir: tempfile::tempdir().expect("temp dir"),
            name: match kind {
                Kind::Postgres => test_schema(),
                _ => unique("blackbox"),
            },
        }
    }

    /// The `[store]` section, reaching the server at `url` (the shared one by default).
    fn section_at(&self, url: Option<&str>) -> String {
        match self.kind {
            Kind::Sqlite => format!(
                "[store]\nbackend = \"sqlite\"\nurl = \"sqlite://{}\"\n",
                self.dir.path().join("idempotency.db").display()
            ),
            Kind::Postgres => format!(
                "[store]\nbackend = \"postgres\"\nurl = \"{}\"\nschema = \"{}\"\n",
                url.map_or_else(database_url, str::to_owned),
                self.name
            ),
            Kind::Redis => format!(
                "[store]\nbackend = \"redis\"\nurl = \"{}\"\nprefix = \"{}\"\n",
                url.map_or_else(redis_url, str::to_owned),
                self.name
            ),
        }
    }

    fn section(&self) -> String {
        self.section_at(None)
    }

    /// Everything the store holds for this test, as text: SQLite's files, the Postgres table (bytes
    /// rendered with `encode(.., 'escape')`, which keeps printable ASCII as is), the Redis keys
    /// and values.
    fn dump(&self) -> String {
        let run = |program: &str, args: &[&str]| {
            let output = std::process::Command::new(program)
                .args(args)
                .output()
                .unwrap_or_else(|error| panic!("run {program}: {error}"));
            assert!(
                output.status.success(),
                "{program} {args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
            String::from_utf8_lossy(&output.stdout).into_owned()
        };
        match self.kind {
            Kind::Sqlite => ["idempotency.db", "idempotency.db-wal"]
                .iter()
                .filter_map(|file| std::fs::read(self.dir.path().join(file)).ok())
                .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
                .collect(),
            Kind::Postgres => run(
                "psql",
                &[
                    &database_url(),
                    "-Atc",
                    &format!(
                        "SELECT encode(key, 'escape'), encode(fingerprint, 'escape'), \
                         encode(coalesce(response, ''::bytea), 'escape') \
                         FROM \"{}\".idempotency_records",
                        self.name
                    ),
                ],
            ),
            Kind::Redis => {
                let url = redis_url();
                let keys = run(
                    "redis-cli",
                    &[
                        "-u",
                        &url,
                        "--scan",
                        "--pattern",
                        &format!("{}:*", self.name),
                    ],
                );
                let mut dump = keys.clone();
                for key in keys.lines() {
                    dump.push_str(&run("redis-cli", &["-u", &url, "GET", key]));
                }
                dump
            }
        }
    }

    /// Proxies that may share this store at once: one per SQLite file.
    fn processes(&self) -> usize {
        if self.kind == Kind::Sqlite { 1 } else { 2 }
    }
}

fn start_proxies(upstream: &Upstream, store: &Store, rest: &str) -> Vec<Proxy> {
    let text = config(&upstream.url, &format!("{}\n{rest}", store.section()));
    (0..store.processes())
        .map(|_| Proxy::start(&text))
        .collect()
}

fn delayed(proxy: &Proxy, key: &str, delay_ms: u64) -> reqwest::RequestBuilder {
    proxy
        .post("/payments", key)
        .header("x-delay-ms", delay_ms.to_string())
        .body("x")
}

/// 500 concurrent requests over 50 keys (10 duplicates each), spread over the proxies: every key
/// runs once and every client gets its key's one response.
async fn each_key_runs_once_under_500_concurrent_requests(kind: Kind) {
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

async fn fifty_duplicates_across_two_proxies_run_once_rejecting(kind: Kind) {
    fifty_duplicates_across_two_proxies_run_once(kind, "reject").await;
}

async fn fifty_duplicates_across_two_proxies_run_once_waiting(kind: Kind) {
    fifty_duplicates_across_two_proxies_run_once(kind, "wait").await;
}

/// A proxy killed with SIGKILL and started again replays what it completed before it died.
async fn a_restarted_proxy_replays_what_completed_before_it_was_killed(kind: Kind) {
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
async fn a_killed_proxys_lease_is_taken_over_after_lock_ttl(kind: Kind) {
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
    eventually(
        Duration::from_secs(10),
        "the request to reach the upstream",
        async || upstream.started_of("orphan") == 1,
    )
    .await;
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
async fn a_paused_holders_late_result_is_refused(kind: Kind) {
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
    eventually(
        Duration::from_secs(10),
        "the request to reach the upstream",
        async || upstream.started_of("paused") == 1,
    )
    .await;
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
async fn a_long_upstream_call_keeps_its_lease_by_renewal(kind: Kind) {
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

/// Latency, black holes and resets between the proxy and the store: no request hangs past the
/// store timeout, nothing runs twice, and the proxy recovers when the network does.
async fn store_network_faults_never_hang_or_double_execute(kind: Kind) {
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

/// The store holds digests of keys and credentials, never the values themselves; and one
/// caller's key never replays to another caller.
async fn keys_and_credentials_are_stored_only_as_digests(kind: Kind) {
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

/// Generates one test per check and store.
macro_rules! store_checks {
    ($($check:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::Sqlite).await;
            })*
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::Postgres).await;
            })*
        }
        mod redis {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::Redis).await;
            })*
        }
    };
}

store_checks!(
    keys_and_credentials_are_stored_only_as_digests,
    each_key_runs_once_under_500_concurrent_requests,
    a_restarted_proxy_replays_what_completed_before_it_was_killed,
    a_killed_proxys_lease_is_taken_over_after_lock_ttl,
    a_long_upstream_call_keeps_its_lease_by_renewal,
);

/// Checks that need two processes on one store, or a store on the network.
macro_rules! shared_store_checks {
    ($($check:ident),* $(,)?) => {
        mod shared_postgres {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::Postgres).await;
            })*
        }
        mod shared_redis {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::Redis).await;
            })*
        }
    };
}

shared_store_checks!(
    fifty_duplicates_across_two_proxies_run_once_rejecting,
    fifty_duplicates_across_two_proxies_run_once_waiting,
    a_paused_holders_late_result_is_refused,
    store_network_faults_never_hang_or_double_execute,
);

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
