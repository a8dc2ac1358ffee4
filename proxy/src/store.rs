//! Opening the configured store.

use tower_idempotency::store::DynStore;
use tower_idempotency::{MemoryStore, StoreError};

use crate::config::{Backend, StoreConfig};

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
    let url = config.url.as_deref().unwrap_or_default();
    #[cfg(not(any(feature = "sqlite", feature = "postgres", feature = "redis")))]
    let _ = url;
    match config.backend {
        Backend::Memory => Ok(DynStore::new(MemoryStore::new())),
        #[cfg(feature = "sqlite")]
        Backend::Sqlite => {
            let mut builder = tower_idempotency::SqliteStore::builder(url);
            if let Some(interval) = config.reaper_interval {
                builder = builder.reaper_interval(interval);
            }
            if let Some(batch) = config.reaper_batch {
                builder = builder.reaper_batch(batch);
            }
            let store = builder.connect().await.map_err(failed(config.backend))?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let store = postgres(config, url, config.auto_migrate).await?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "redis")]
        Backend::Redis => {
            let store = redis_builder(tower_idempotency::RedisStore::builder(url), config)
                .connect()
                .await
                .map_err(failed(config.backend))?;
            Ok(DynStore::new(store))
        }
        #[cfg(feature = "redis")]
        Backend::RedisCluster => {
            let store = redis_builder(
                tower_idempotency::RedisStore::cluster_builder(&config.urls),
                config,
            )
            .connect()
            .await
            .map_err(failed(config.backend))?;
            Ok(DynStore::new(store))
        }
        #[allow(
            unreachable_patterns,
            reason = "reachable only when a backend is left out"
        )]
        other => Err(not_compiled(other)),
    }
}

/// Applies the store's schema, for `idempotency-proxy migrate`. Returns what was done.
pub async fn migrate(config: &StoreConfig) -> Result<String, OpenError> {
    match config.backend {
        #[cfg(feature = "postgres")]
        Backend::Postgres => {
            let url = config.url.as_deref().unwrap_or_default();
            // Connecting applies the migrations, whatever `auto_migrate` says for serving.
            postgres(config, url, true).await?;
            Ok("postgres schema is up to date".to_owned())
        }
        Backend::Sqlite => {
            // Opening a SQLite store applies its migrations.
            open(config).await?;
            Ok("sqlite schema is up to date".to_owned())
        }
        Backend::Memory | Backend::Redis | Backend::RedisCluster => Ok(format!(
            "the {} backend has no schema to migrate",
            config.backend.as_str()
        )),
        #[allow(
            unreachable_patterns,
            reason = "reachable only when a backend is left out"
        )]
        other => Err(not_compiled(other)),
    }
}

#[cfg(feature = "postgres")]
async fn postgres(
    config: &StoreConfig,
    url: &str,
    migrate: bool,
) -> Result<tower_idempotency::PostgresStore, OpenError> {
    let mut builder = tower_idempotency::PostgresStore::builder(url).auto_migrate(migrate);
    if let Some(schema) = &config.schema {
        builder = builder.schema(schema);
    }
    if let Some(table) = &config.table {
        builder = builder.table(table);
    }
    if let Some(connections) = config.max_connections {
        builder = builder.max_connections(connections);
    }
    if let Some(interval) = config.reaper_interval {
        builder = builder.reaper_interval(interval);
    }
    if let Some(batch) = config.reaper_batch {
        builder = builder.reaper_batch(batch);
    }
    builder.connect().await.map_err(failed(config.backend))
}

#[cfg(feature = "redis")]
fn redis_builder(
    mut builder: tower_idempotency::store::RedisStoreBuilder,
    config: &StoreConfig,
) -> tower_idempotency::store::RedisStoreBuilder {
    if let Some(prefix) = &config.prefix {
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
