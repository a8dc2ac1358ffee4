//! Opening the configured store.

use tower_idempotency::store::DynStore;
use tower_idempotency::{MemoryStore, StoreError};

#[cfg(feature = "postgres")]
use crate::config::PostgresConfig;
use crate::config::{Backend, StoreBackend, StoreConfig};

/// The store could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The backend was left out of this build.
    #[error("this build of idempotency-proxy has no {0} support (cargo feature `{1}`)")]
    NotCompiled(&'static str, &'static str),
    /// Connecting or migrating failed.
    #[error("cannot open the {backend} store: {source}")]
    Store {
        /// The backend.
        backend: &'static str,
        /// Why.
        source: StoreError,
    },
}

#[cfg(any(feature = "sqlite", feature = "postgres", feature = "redis"))]
fn failed(backend: Backend) -> impl FnOnce(StoreError) -> OpenError {
    move |source| OpenError::Store {
        backend: backend.as_str(),
        source,
    }
}

/// Opens (connects, and where configured migrates) the store `config` describes.
pub async fn open(config: &StoreConfig) -> Result<DynStore, OpenError> {
    match &config.backend {
        StoreBackend::Memory => Ok(DynStore::new(MemoryStore::new())),
        #[cfg(feature = "sqlite")]
        StoreBackend::Sqlite(sqlite) => {
            let mut builder = tower_idempotency::SqliteStore::builder(&sqlite.url);
            if let Some(interval) = sqlite.reaper.interval {
                builder = builder.reaper_interval(interval);
            }
            if let Some(batch) = sqlite.reaper.batch {
                builder = builder.reaper_batch(batch);
            }
            let store = builder.connect().await.map_err(failed(Backend::Sqlite))?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "postgres")]
        StoreBackend::Postgres(postgres_config) => {
            let store = postgres(postgres_config, postgres_config.auto_migrate).await?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "redis")]
        StoreBackend::Redis(redis) => {
            let store = redis_builder(
                tower_idempotency::RedisStore::builder(&redis.url),
                redis.prefix.as_deref(),
            )
            .connect()
            .await
            .map_err(failed(Backend::Redis))?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "redis")]
        StoreBackend::RedisCluster(cluster) => {
            let store = redis_builder(
                tower_idempotency::RedisStore::cluster_builder(&cluster.urls),
                cluster.prefix.as_deref(),
            )
            .connect()
            .await
            .map_err(failed(Backend::RedisCluster))?;
            Ok(DynStore::new(store))
        }
        #[allow(
            unreachable_patterns,
            reason = "reachable only when a backend is left out"
        )]
        other => Err(not_compiled(other.kind())),
    }
}

/// Applies the store's schema, for `idempotency-proxy migrate`. Returns what was done.
pub async fn migrate(config: &StoreConfig) -> Result<String, OpenError> {
    match &config.backend {
        #[cfg(feature = "postgres")]
        StoreBackend::Postgres(postgres_config) => {
            // Connecting applies the migrations, whatever `auto_migrate` says for serving.
            postgres(postgres_config, true).await?;
            Ok("postgres schema is up to date".to_owned())
        }
        StoreBackend::Sqlite(_) => {
            // Opening a SQLite store applies its migrations.
            open(config).await?;
            Ok("sqlite schema is up to date".to_owned())
        }
        StoreBackend::Memory | StoreBackend::Redis(_) | StoreBackend::RedisCluster(_) => {
            Ok(format!(
                "the {} backend has no schema to migrate",
                config.backend.kind().as_str()
            ))
        }
        #[allow(
            unreachable_patterns,
            reason = "reachable only when a backend is left out"
        )]
        other => Err(not_compiled(other.kind())),
    }
}

#[cfg(feature = "postgres")]
async fn postgres(
    config: &PostgresConfig,
    migrate: bool,
) -> Result<tower_idempotency::PostgresStore, OpenError> {
    let mut builder = tower_idempotency::PostgresStore::builder(&config.url).auto_migrate(migrate);
    if let Some(schema) = &config.schema {
        builder = builder.schema(schema);
    }
    if let Some(table) = &config.table {
        builder = builder.table(table);
    }
    if let Some(connections) = config.max_connections {
        builder = builder.max_connections(connections);
    }
    if let Some(interval) = config.reaper.interval {
        builder = builder.reaper_interval(interval);
    }
    if let Some(batch) = config.reaper.batch {
        builder = builder.reaper_batch(batch);
    }
    builder.connect().await.map_err(failed(Backend::Postgres))
}

#[cfg(feature = "redis")]
fn redis_builder(
    mut builder: tower_idempotency::store::RedisStoreBuilder,
    prefix: Option<&str>,
) -> tower_idempotency::store::RedisStoreBuilder {
    if let Some(prefix) = prefix {
        builder = builder.prefix(prefix);
    }
    builder
}

fn not_compiled(backend: Backend) -> OpenError {
    let feature = match backend {
        Backend::Redis | Backend::RedisCluster => "redis",
        Backend::Postgres => "postgres",
        Backend::Sqlite => "sqlite",
        Backend::Memory => "memory",
    };
    OpenError::NotCompiled(backend.as_str(), feature)
}
