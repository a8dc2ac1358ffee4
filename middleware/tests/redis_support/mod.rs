//! Shared by the Redis test binaries: the server under test, unique key prefixes, and private
//! `redis-server` processes (a standalone server for tests that disturb every connection, and a
//! three-master cluster).

// Each test binary uses a different part of this module.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use redis::aio::MultiplexedConnection;
use tower_idempotency::{RedisStore, StoreError};

pub(crate) const DEFAULT_REDIS_URL: &str = "redis://127.0.0.1:6379";
const START_REDIS: &str =
    "redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save \"\" --appendonly no";

/// The server the tests run against: `REDIS_URL`, or a local default.
pub(crate) fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| DEFAULT_REDIS_URL.to_owned())
}

/// A key prefix no other test (or earlier run) uses, so tests share one server in parallel.
pub(crate) fn unique_prefix(tag: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_nanos());
    format!(
        "idem-test:{tag}:{}-{nanos:x}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Connects a store with a fresh prefix to the server under test, or fails the test saying how
/// to start one: a missing server is a broken test environment, never a reason to skip.
pub(crate) async fn store_at(url: &str, prefix: &str) -> RedisStore {
    RedisStore::builder()
        .prefix(prefix)
        .connect(url)
        .await
        .unwrap_or_else(|error| unreachable(url, &error))
}

pub(crate) fn unreachable(url: &str, error: &dyn std::fmt::Display) -> ! {
    panic!(
        "cannot use Redis at {url} ({error}). The Redis tests need a running server: start one \
         with `{START_REDIS}`, or point REDIS_URL at one."
    )
}

/// A plain connection for looking at what the store wrote.
pub(crate) async fn raw_connection(url: &str) -> MultiplexedConnection {
    let client = redis::Client::open(url).unwrap_or_else(|error| unreachable(url, &error));
    client
        .get_multiplexed_async_connection()
        .await
        .unwrap_or_else(|error| unreachable(url, &error))
}

/// Polls `check` every 20 ms until it holds, failing the test after `within`.
pub(crate) async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A `redis-server` child process in a directory of its own, killed when dropped.
pub(crate) struct RedisServer {
    pub(crate) port: u16,
    pub(crate) dir: PathBuf,
    child: Child,
}

impl RedisServer {
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts a private standalone server on a free port.
    pub(crate) async fn standalone(root: &Path) -> Self {
        Self::start(root, &[]).await
    }

    /// Starts a server in cluster mode (not yet part of a cluster).
    pub(crate) async fn cluster_node(root: &Path) -> Self {
        Self::start(
            root,
            &[
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
            ],
        )
        .await
    }

    /// Picks a free port and starts the server there, retrying on another port if it does not
    /// come up (another process may take the port between our probe and the server's bind).
    async fn start(root: &Path, extra: &[&str]) -> Self {
        let mut failures = Vec::new();
        for _ in 0..5 {
            let port = free_port();
            let dir = root.join(format!("node-{port}"));
            std::fs::create_dir_all(&dir).expect("create the node directory");
            let spawned = Command::new("redis-server")
                .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
                .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
                .args(["--logfile", "redis.log"])
                .args(extra)
                .current_dir(&dir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn();
            let child = match spawned {
                Ok(child) => child,
                Err(error) => panic!(
                    "cannot run redis-server ({error}); these tests start private servers and \
                     need it on PATH (e.g. `apt-get install redis-server`)"
                ),
            };
            let mut server = Self { port, dir, child };
            if server.answers_within(Duration::from_secs(5)).await {
                return server;
            }
            failures.push(format!("port {port}: {}", server.log_tail()));
        }
        panic!("redis-server did not start: {failures:#?}")
    }

    async fn answers_within(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let client = match redis::Client::open(self.url()) {
            Ok(client) => client,
            Err(_) => return false,
        };
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok(mut connection) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING")
                    .query_async::<String>(&mut connection)
                    .await
                    .is_ok()
            {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    pub(crate) fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(10)..].join("\n")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free loopback port below 55535 whose cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    for _ in 0..100 {
        let Ok(listener) = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)) else {
            continue;
        };
        let Ok(port) = listener.local_addr().map(|address| address.port()) else {
            continue;
        };
        if port < 55535 && TcpListener::bind((Ipv4Addr::LOCALHOST, port + 10000)).is_ok() {
            return port;
        }
    }
    panic!("found no free loopback port pair (port, port + 10000)")
}

/// Three masters, no replicas, every slot assigned; killed when dropped.
pub(crate) struct RedisCluster {
    pub(crate) nodes: Vec<RedisServer>,
    _root: tempfile::TempDir,
}

impl RedisCluster {
    pub(crate) async fn start() -> Self {
        let root = tempfile::tempdir().expect("create a temporary directory");
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(RedisServer::cluster_node(root.path()).await);
        }
        let addresses: Vec<String> = nodes
            .iter()
            .map(|node| format!("127.0.0.1:{}", node.port))
            .collect();
        let create = tokio::task::spawn_blocking(move || {
            Command::new("redis-cli")
                .arg("--cluster")
                .arg("create")
                .args(&addresses)
                .args(["--cluster-replicas", "0", "--cluster-yes"])
                .output()
        })
        .await
        .expect("the redis-cli task")
        .unwrap_or_else(|error| panic!("cannot run redis-cli ({error}): it must be on PATH"));
        assert!(
            create.status.success(),
            "redis-cli --cluster create failed: {}\n{}",
            String::from_utf8_lossy(&create.stdout),
            String::from_utf8_lossy(&create.stderr)
        );
        let cluster = Self { nodes, _root: root };
        for node in &cluster.nodes {
            let connection = raw_connection(&node.url()).await;
            eventually(
                Duration::from_secs(20),
                "every node reports cluster_state:ok",
                || {
                    let mut connection = connection.clone();
                    async move {
                        redis::cmd("CLUSTER")
                            .arg("INFO")
                            .query_async::<String>(&mut connection)
                            .await
                            .is_ok_and(|info| info.contains("cluster_state:ok"))
                    }
                },
            )
            .await;
            // Every node must also agree that all three masters own slots, or the client may
            // read a partial slot map from it.
            eventually(
                Duration::from_secs(20),
                "every node sees three masters with slots",
                || {
                    let mut connection = connection.clone();
                    async move {
                        redis::cmd("CLUSTER")
                            .arg("SLOTS")
                            .query_async::<Vec<redis::Value>>(&mut connection)
                            .await
                            .is_ok_and(|slots| slots.len() == 3)
                    }
                },
            )
            .await;
        }
        cluster
    }

    pub(crate) fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

/// Shorthand for an expected store error in assertions.
pub(crate) fn is_lease_lost<T>(result: &Result<T, StoreError>) -> bool {
    matches!(result, Err(StoreError::LeaseLost))
}
