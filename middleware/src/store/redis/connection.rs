//! The command connection (a standalone server or a cluster) and the Lua scripts it runs:
//! loaded when the store connects, invoked by `EVALSHA` (see *Scripts* in the [`RedisStore`]
//! docs).

use std::sync::LazyLock;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{RedisError, Script, ScriptInvocation, Value};

use super::{RedisStore, records};
use crate::store::StoreError;

pub(super) static BEGIN: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("begin.lua")));
pub(super) static COMPLETE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("complete.lua")));
pub(super) static RENEW: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("renew.lua")));
pub(super) static RELEASE: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("release.lua")));
pub(super) static CHECKPOINT: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("checkpoint.lua")));
pub(super) static WATCH: LazyLock<Script> =
    LazyLock::new(|| Script::new(include_str!("watch.lua")));

/// Both connections multiplex every request over shared sockets and are cheap to clone.
#[derive(Clone)]
pub(super) enum Connection {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Connection {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Self::Standalone(_) => "standalone",
            Self::Cluster(_) => "cluster",
        }
    }

    async fn invoke(&self, invocation: &ScriptInvocation<'_>) -> Result<Value, RedisError> {
        match self {
            Self::Standalone(connection) => invocation.invoke_async(&mut connection.clone()).await,
            Self::Cluster(connection) => invocation.invoke_async(&mut connection.clone()).await,
        }
    }

    pub(super) async fn query(&self, command: &redis::Cmd) -> Result<Value, RedisError> {
        match self {
            Self::Standalone(connection) => command.query_async(&mut connection.clone()).await,
            Self::Cluster(connection) => command.query_async(&mut connection.clone()).await,
        }
    }

    /// Loads every script up front, so the first calls need no `NOSCRIPT` detour and a server
    /// that refuses scripts is found at start-up rather than on the first request.
    pub(super) async fn load_scripts(&self) -> Result<(), RedisError> {
        for script in [
            &*BEGIN,
            &*COMPLETE,
            &*RENEW,
            &*RELEASE,
            &*WATCH,
            &*CHECKPOINT,
            &*records::INSPECT,
            &*records::FORGET,
        ] {
            match self {
                Self::Standalone(connection) => {
                    script.load_async(&mut connection.clone()).await?;
                }
                Self::Cluster(connection) => {
                    script.load_async(&mut connection.clone()).await?;
                }
            }
        }
        Ok(())
    }
}

impl RedisStore {
    pub(super) async fn invoke(
        &self,
        script: &'static str,
        invocation: &ScriptInvocation<'_>,
    ) -> Result<Value, StoreError> {
        self.inner
            .connection
            .invoke(invocation)
            .await
            .map_err(|error| self.redis_error(script, error))
    }
}
