//! The store the three proxies share, started by the run on free ports in temp dirs so that the
//! nemesis can kill it: PostgreSQL and Redis behind a fault proxy (to cut or slow the
//! connection), a Redis Cluster without one (its clients follow the nodes' own addresses).

use std::fmt;
use std::str::FromStr;

use test_fixtures::{Fault, FaultProxy, PostgresServer, RedisCluster, RedisServer};

/// Which store a run uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StoreKind {
    Postgres,
    Redis,
    RedisCluster,
}

impl StoreKind {
    pub(crate) const ALL: [StoreKind; 3] = [
        StoreKind::Postgres,
        StoreKind::Redis,
        StoreKind::RedisCluster,
    ];

    /// The store's connection goes through the fault proxy (cut, partition, latency).
    pub(crate) fn has_fault_proxy(self) -> bool {
        self != StoreKind::RedisCluster
    }
}

impl fmt::Display for StoreKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            StoreKind::Postgres => "postgres",
            StoreKind::Redis => "redis",
            StoreKind::RedisCluster => "redis-cluster",
        })
    }
}

impl FromStr for StoreKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        StoreKind::ALL
            .into_iter()
            .find(|kind| kind.to_string() == text)
            .ok_or_else(|| format!("unknown store {text:?}: postgres, redis or redis-cluster"))
    }
}

enum Servers {
    Postgres(PostgresServer),
    Redis(RedisServer),
    Cluster(RedisCluster),
}

/// The running store and, for PostgreSQL and Redis, the fault proxy in front of it.
pub(crate) struct Store {
    servers: Servers,
    fault_proxy: Option<FaultProxy>,
}

impl Store {
    /// Starts durable servers (Redis: `appendfsync always`; PostgreSQL: `synchronous_commit`),
    /// so a store restart must lose nothing acknowledged.
    pub(crate) async fn start(kind: StoreKind) -> Self {
        let servers = tokio::task::spawn_blocking(move || match kind {
            StoreKind::Postgres => Servers::Postgres(PostgresServer::start_durable()),
            StoreKind::Redis => Servers::Redis(RedisServer::start_durable()),
            StoreKind::RedisCluster => Servers::Cluster(RedisCluster::start_durable()),
        })
        .await
        .expect("start the store");
        let target = match &servers {
            Servers::Postgres(server) => Some(server.port),
            Servers::Redis(server) => Some(server.port),
            Servers::Cluster(_) => None,
        };
        let fault_proxy = match target {
            Some(port) => Some(FaultProxy::start(([127, 0, 0, 1], port).into()).await),
            None => None,
        };
        Self {
            servers,
            fault_proxy,
        }
    }

    /// The `[store]` section of the proxies' configuration.
    pub(crate) fn config(&self) -> String {
        let through = || self.fault_proxy.as_ref().expect("fault proxy").addr;
        match &self.servers {
            Servers::Postgres(_) => format!(
                "backend = \"postgres\"\nurl = \"postgres://postgres@{}/postgres\"\n",
                through()
            ),
            Servers::Redis(_) => {
                format!("backend = \"redis\"\nurl = \"redis://{}\"\n", through())
            }
            Servers::Cluster(cluster) => format!(
                "backend = \"redis-cluster\"\nurls = [{}]\n",
                cluster
                    .urls()
                    .iter()
                    .map(|url| format!("\"{url}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }

    /// How many servers can be killed one at a time (the cluster's nodes).
    pub(crate) fn nodes(&self) -> usize {
        match &self.servers {
            Servers::Cluster(cluster) => cluster.nodes.len(),
            _ => 1,
        }
    }

    /// `kill -9` of the server (node `node` of a cluster).
    pub(crate) fn kill(&mut self, node: usize) {
        match &mut self.servers {
            Servers::Postgres(server) => server.kill(),
            Servers::Redis(server) => server.kill(),
            Servers::Cluster(cluster) => cluster.nodes[node].kill(),
        }
    }

    /// Restarts a killed server on its port and its data.
    pub(crate) fn restart(&mut self, node: usize) {
        match &mut self.servers {
            Servers::Postgres(server) => server.restart(),
            Servers::Redis(server) => server.restart(),
            Servers::Cluster(cluster) => cluster.nodes[node].restart(),
        }
    }

    /// Sets the fault on the store connection (no-op without a fault proxy).
    pub(crate) fn set_fault(&self, fault: Fault) {
        if let Some(proxy) = &self.fault_proxy {
            proxy.set(fault);
        }
    }
}
