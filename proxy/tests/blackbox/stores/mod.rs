//! Races, crashes, pauses and outages with real proxy processes on every durable store: SQLite
//! (one process per file), PostgreSQL and Redis (shared by two proxies).
//!
//! Each check is written once and run per store by `store_checks!`.

//! Each check is written once (in `races`, `crashes`, `outages` and `contents`) and run per
//! store by `store_checks!`.

use test_fixtures::{
    database_url, redis_url, require_postgres, require_redis, test_schema, unique,
};

use crate::support::{Proxy, Upstream, config};

mod contents;
mod crashes;
mod outages;
mod races;

use contents::keys_and_credentials_are_stored_only_as_digests;
use crashes::{
    a_killed_proxys_lease_is_taken_over_after_lock_ttl,
    a_long_upstream_call_keeps_its_lease_by_renewal, a_paused_holders_late_result_is_refused,
    a_restarted_proxy_replays_what_completed_before_it_was_killed,
};
use outages::store_network_faults_never_hang_or_double_execute;
use races::{
    each_key_runs_once_under_500_concurrent_requests,
    fifty_duplicates_across_two_proxies_run_once_rejecting,
    fifty_duplicates_across_two_proxies_run_once_waiting,
};

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

/// Generates one test per check for each of the stores named: a module per store (`sqlite`,
/// `postgres`, ...), a test in it per check, named as the check.
macro_rules! store_checks {
    ([$($module:ident => $kind:ident),+ $(,)?] $checks:tt) => {
        $(store_checks!(@store $module $kind $checks);)+
    };
    (@store $module:ident $kind:ident [$($check:ident),+ $(,)?]) => {
        mod $module {
            $(#[tokio::test(flavor = "multi_thread")]
            async fn $check() {
                super::$check(super::Kind::$kind).await;
            })+
        }
    };
}

store_checks!([sqlite => Sqlite, postgres => Postgres, redis => Redis] [
    keys_and_credentials_are_stored_only_as_digests,
    each_key_runs_once_under_500_concurrent_requests,
    a_restarted_proxy_replays_what_completed_before_it_was_killed,
    a_killed_proxys_lease_is_taken_over_after_lock_ttl,
    a_long_upstream_call_keeps_its_lease_by_renewal,
]);

// Checks that need two processes on one store, or a store on the network.
store_checks!([shared_postgres => Postgres, shared_redis => Redis] [
    fifty_duplicates_across_two_proxies_run_once_rejecting,
    fifty_duplicates_across_two_proxies_run_once_waiting,
    a_paused_holders_late_result_is_refused,
    store_network_faults_never_hang_or_double_execute,
]);
