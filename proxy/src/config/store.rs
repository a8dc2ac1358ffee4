//! `[store]`: the settings every backend shares, and one variant per backend with only its own.
//!
//! The file's table stays flat (`backend = "postgres"` beside `url`, `schema`...). It is read
//! first into [`StoreTable`], which knows every key of every backend, so that serde's errors (an
//! unknown key, a value of the wrong type, an unknown backend) keep the line toml gives them;
//! [`StoreTable::into_config`] then dispatches on `backend`, refusing by name a key that belongs
//! to another backend. (serde's internally tagged enums buffer the table first, and their errors
//! lose the key and its line.)

use std::time::Duration;

use bytesize::ByteSize;
use serde::Deserialize;
use tower_idempotency::ReplayCacheLimits;

use super::errors::{KeyPath, KeySegment, Problem, problem};
use super::{STORE_URL_ENV, expand};

/// Which store backend to use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Backend {
    /// In-process: fast, forgotten on restart, one proxy only.
    #[default]
    Memory,
    /// An embedded SQLite file: durable, one proxy process per file.
    Sqlite,
    /// PostgreSQL: shared by many proxies.
    Postgres,
    /// A standalone Redis server: shared by many proxies.
    Redis,
    /// A Redis Cluster: shared by many proxies.
    RedisCluster,
}

impl Backend {
    /// The name used in the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Sqlite => "sqlite",
            Self::Postgres => "postgres",
            Self::Redis => "redis",
            Self::RedisCluster => "redis-cluster",
        }
    }
}

/// `[store]`: the backend with its own settings, and the settings every backend shares.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// `backend = "memory" | "sqlite" | "postgres" | "redis" | "redis-cluster"` and the keys
    /// only that backend takes.
    pub backend: StoreBackend,
    /// Longest a single store call may take before it counts as a store error.
    pub timeout: Duration,
    /// How often a request waiting on an in-flight key (`on_conflict = "wait"`) looks at the
    /// store without a notification; this is what finds a lease whose holder died.
    pub poll_interval: Duration,
    /// Most bytes (bodies, headers, bookkeeping) of completed records this process keeps to
    /// answer replays without a store call (default `"16MiB"`); `0` turns the replay cache off.
    /// Only stores that report forgets to every process can use it (all built-in ones do).
    pub replay_cache_bytes: ByteSize,
    /// Most completed records kept in the replay cache (default 10000); `0` turns it off.
    pub replay_cache_entries: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            backend: StoreBackend::Memory,
            timeout: defaults::timeout(),
            poll_interval: defaults::poll_interval(),
            replay_cache_bytes: defaults::replay_cache_bytes(),
            replay_cache_entries: defaults::replay_cache_entries(),
        }
    }
}

/// The store backend and the keys only it takes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreBackend {
    /// `memory`: in-process, no settings.
    Memory,
    /// `sqlite`: an embedded SQLite file.
    Sqlite(SqliteConfig),
    /// `postgres`: PostgreSQL.
    Postgres(PostgresConfig),
    /// `redis`: a standalone Redis server.
    Redis(RedisConfig),
    /// `redis-cluster`: a Redis Cluster.
    RedisCluster(RedisClusterConfig),
}

impl StoreBackend {
    /// Which backend this is.
    pub fn kind(&self) -> Backend {
        match self {
            Self::Memory => Backend::Memory,
            Self::Sqlite(_) => Backend::Sqlite,
            Self::Postgres(_) => Backend::Postgres,
            Self::Redis(_) => Backend::Redis,
            Self::RedisCluster(_) => Backend::RedisCluster,
        }
    }
}

/// `sqlite` and `postgres`: deleting expired records.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReaperConfig {
    /// `reaper_interval`: how often expired records are deleted (`0s` disables); absent: the
    /// store's default.
    pub interval: Option<Duration>,
    /// `reaper_batch`: rows deleted per reaper statement; absent: the store's default.
    pub batch: Option<u32>,
}

/// `backend = "sqlite"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SqliteConfig {
    /// `sqlite://file.db` (created if missing). `${VAR}` is replaced by the environment variable
    /// `VAR`, and `IDEMPOTENCY_STORE_URL`, when set, replaces the whole value.
    pub url: String,
    /// `reaper_interval`, `reaper_batch`.
    pub reaper: ReaperConfig,
}

/// `backend = "postgres"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PostgresConfig {
    /// `postgres://user:pass@host/db`, expanded and overridden like [`SqliteConfig::url`].
    pub url: String,
    /// Schema of the records table; absent: the store's default.
    pub schema: Option<String>,
    /// Name of the records table; absent: the store's default.
    pub table: Option<String>,
    /// Size of the connection pool; absent: the store's default.
    pub max_connections: Option<u32>,
    /// `reaper_interval`, `reaper_batch`.
    pub reaper: ReaperConfig,
    /// Apply the schema at start-up (as `idempotency-proxy migrate` does). Turn off when the
    /// proxy's database role may not change the schema. Default `true`.
    pub auto_migrate: bool,
}

/// `backend = "redis"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// `redis://host:port` (`rediss://`, `redis+unix://`, `unix://` too), expanded and
    /// overridden like [`SqliteConfig::url`].
    pub url: String,
    /// Prefix of every key the store writes; absent: the store's default.
    pub prefix: Option<String>,
}

/// `backend = "redis-cluster"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisClusterConfig {
    /// `urls`: node URLs, any subset of the cluster's nodes (`${VAR}` expanded).
    pub urls: Vec<String>,
    /// Prefix of every key the store writes; absent: the store's default.
    pub prefix: Option<String>,
}

/// `[store]` as the file spells it: every key of every backend, each `None` when left out.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct StoreTable {
    #[serde(default)]
    backend: Backend,
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    urls: Option<Vec<String>>,
    #[serde(default, with = "humantime_serde")]
    timeout: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    poll_interval: Option<Duration>,
    #[serde(default)]
    schema: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    max_connections: Option<u32>,
    #[serde(default, with = "humantime_serde")]
    reaper_interval: Option<Duration>,
    #[serde(default)]
    reaper_batch: Option<u32>,
    #[serde(default)]
    prefix: Option<String>,
    #[serde(default)]
    auto_migrate: Option<bool>,
    replay_cache_bytes: Option<ByteSize>,
    replay_cache_entries: Option<usize>,
    /// `url` came from `IDEMPOTENCY_STORE_URL`, not the file.
    #[serde(skip)]
    url_from_env: bool,
}

fn key(field: &str) -> KeyPath {
    KeyPath::of(&["store", field])
}

impl StoreTable {
    /// Expands `${VAR}` in `url` and `urls`, then lets `IDEMPOTENCY_STORE_URL` replace `url`.
    pub(super) fn expand_environment(
        &mut self,
        env: &impl Fn(&str) -> Option<String>,
    ) -> Result<(), Problem> {
        if let Some(url) = &mut self.url {
            *url = expand(url, env).map_err(|m| problem(key("url"), m))?;
        }
        if let Some(url) = env(STORE_URL_ENV).filter(|url| !url.is_empty()) {
            self.url = Some(url);
            self.url_from_env = true;
        }
        for (i, url) in self.urls.iter_mut().flatten().enumerate() {
            *url = expand(url, env).map_err(|m| {
                let mut path = key("urls");
                path.0.push(KeySegment::Index(i));
                problem(path, m)
            })?;
        }
        Ok(())
    }

    /// Every backend-specific key: whether the file sets it, and the backends that take it.
    fn backend_keys(&self) -> [(&'static str, bool, &'static [Backend]); 9] {
        use Backend::*;
        [
            ("url", self.url.is_some(), &[Sqlite, Postgres, Redis]),
            ("urls", self.urls.is_some(), &[RedisCluster]),
            ("schema", self.schema.is_some(), &[Postgres]),
            ("table", self.table.is_some(), &[Postgres]),
            (
                "max_connections",
                self.max_connections.is_some(),
                &[Postgres],
            ),
            (
                "reaper_interval",
                self.reaper_interval.is_some(),
                &[Sqlite, Postgres],
            ),
            (
                "reaper_batch",
                self.reaper_batch.is_some(),
                &[Sqlite, Postgres],
            ),
            ("auto_migrate", self.auto_migrate.is_some(), &[Postgres]),
            ("prefix", self.prefix.is_some(), &[Redis, RedisCluster]),
        ]
    }

    /// The typed `[store]`: the first key set for another backend than `backend` is an error
    /// naming it, as is a missing `url` or `urls`.
    pub(super) fn into_config(self) -> Result<StoreConfig, Problem> {
        let kind = self.backend;
        for (field, set, backends) in self.backend_keys() {
            if set && !backends.contains(&kind) {
                let message = if field == "url" && self.url_from_env {
                    format!(
                        "{STORE_URL_ENV} is set, but the {} backend takes no url",
                        kind.as_str()
                    )
                } else {
                    format!(
                        "only applies to the {}, not {}",
                        backend_names(backends),
                        kind.as_str()
                    )
                };
                return Err(problem(key(field), message));
            }
        }
        let url = || {
            self.url.clone().ok_or_else(|| {
                problem(
                    key("url"),
                    format!("the {} backend needs a url", kind.as_str()),
                )
            })
        };
        let reaper = ReaperConfig {
            interval: self.reaper_interval,
            batch: self.reaper_batch,
        };
        let backend = match kind {
            Backend::Memory => StoreBackend::Memory,
            Backend::Sqlite => StoreBackend::Sqlite(SqliteConfig {
                url: url()?,
                reaper,
            }),
            Backend::Postgres => StoreBackend::Postgres(PostgresConfig {
                url: url()?,
                schema: self.schema,
                table: self.table,
                max_connections: self.max_connections,
                reaper,
                auto_migrate: self.auto_migrate.unwrap_or(true),
            }),
            Backend::Redis => StoreBackend::Redis(RedisConfig {
                url: url()?,
                prefix: self.prefix,
            }),
            Backend::RedisCluster => StoreBackend::RedisCluster(RedisClusterConfig {
                urls: self
                    .urls
                    .ok_or_else(|| problem(key("urls"), "the redis-cluster backend needs urls"))?,
                prefix: self.prefix,
            }),
        };
        Ok(StoreConfig {
            backend,
            timeout: self.timeout.unwrap_or_else(defaults::timeout),
            poll_interval: self.poll_interval.unwrap_or_else(defaults::poll_interval),
            replay_cache_bytes: self
                .replay_cache_bytes
                .unwrap_or_else(defaults::replay_cache_bytes),
            replay_cache_entries: self
                .replay_cache_entries
                .unwrap_or_else(defaults::replay_cache_entries),
        })
    }
}

/// `the postgres backend`, `the sqlite and postgres backends`.
fn backend_names(backends: &[Backend]) -> String {
    match backends {
        [one] => format!("{} backend", one.as_str()),
        [first @ .., last] => {
            let first: Vec<_> = first.iter().map(|b| b.as_str()).collect();
            format!("{} and {} backends", first.join(", "), last.as_str())
        }
        [] => "no backend".to_owned(),
    }
}

impl StoreConfig {
    /// The replay cache's bounds: [`ReplayCacheLimits::OFF`] when either key is `0`.
    pub fn replay_cache_limits(&self) -> ReplayCacheLimits {
        let max_bytes = usize::try_from(self.replay_cache_bytes.as_u64()).unwrap_or(usize::MAX);
        if max_bytes == 0 || self.replay_cache_entries == 0 {
            return ReplayCacheLimits::OFF;
        }
        ReplayCacheLimits {
            max_entries: self.replay_cache_entries,
            max_bytes,
        }
    }
}

mod defaults {
    use std::time::Duration;

    use bytesize::ByteSize;
    use tower_idempotency::ReplayCacheLimits;

    pub(super) fn timeout() -> Duration {
        Duration::from_secs(5)
    }
    pub(super) fn poll_interval() -> Duration {
        Duration::from_secs(1)
    }

    pub(super) fn replay_cache_bytes() -> ByteSize {
        ByteSize::b(u64::try_from(ReplayCacheLimits::DEFAULT.max_bytes).unwrap_or(u64::MAX))
    }

    pub(super) fn replay_cache_entries() -> usize {
        ReplayCacheLimits::DEFAULT.max_entries
    }
}
