//! The PostgreSQL store against a real server: the contract suite, then what only a shared SQL
//! store has to get right (several processes, LISTEN/NOTIFY, the reaper, migrations, replays
//! that write nothing).
//!
//! Reads `DATABASE_URL` (default `postgres://postgres@127.0.0.1:5432/test`). Every test works in
//! a schema of its own with a random name, so tests run in parallel; schemas left behind by
//! earlier runs are dropped after ten minutes.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sqlx::{AssertSqlSafe, Connection, PgConnection};
use test_fixtures::{database_url, test_schema};
use tokio::sync::OnceCell;
use tower_idempotency::store::PostgresStoreBuilder;
use tower_idempotency::{Begin, PostgresStore};

mod group_commit;
mod plans;
mod processes;
mod reaper;
mod rows;
mod setup;

/// Test schemas older than this are left over from an earlier run and dropped.
const STALE_SCHEMA_AGE: Duration = Duration::from_secs(600);

mod conformance {
    tower_idempotency::store_conformance_tests!(|| async { super::fresh_store().await.0 });
}

/// The URL without its password, for messages.
fn shown_url() -> String {
    let url = database_url();
    let Some((scheme, rest)) = url.split_once("://") else {
        return url;
    };
    match rest.split_once('@') {
        Some((user_info, host)) if user_info.contains(':') => {
            let user = user_info.split(':').next().unwrap_or_default();
            format!("{scheme}://{user}:***@{host}")
        }
        _ => url,
    }
}

fn unreachable(error: impl std::fmt::Display) -> ! {
    panic!(
        "PostgreSQL is unreachable at {} ({error}). Start it with \
         `pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start`, \
         or point DATABASE_URL at a server.",
        shown_url()
    )
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

async fn admin() -> PgConnection {
    PgConnection::connect(&database_url())
        .await
        .unwrap_or_else(|error| unreachable(error))
}

/// Drops the test schemas of runs that ended long ago, once per test binary.
async fn sweep_stale_schemas() {
    static SWEPT: OnceCell<()> = OnceCell::const_new();
    SWEPT
        .get_or_init(|| async {
            let mut conn = admin().await;
            let schemas: Vec<String> = sqlx::query_scalar(
                "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 'idem\\_test\\_%'",
            )
            .fetch_all(&mut conn)
            .await
            .expect("list test schemas");
            let cutoff = unix_secs().saturating_sub(STALE_SCHEMA_AGE.as_secs());
            for schema in schemas {
                let created = schema
                    .split('_')
                    .nth(2)
                    .and_then(|secs| secs.parse::<u64>().ok());
                if created.is_some_and(|created| created < cutoff) {
                    // Another test binary may be dropping it too: failing here is fine.
                    let _ = sqlx::query(AssertSqlSafe(format!(
                        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
                    )))
                    .execute(&mut conn)
                    .await;
                }
            }
        })
        .await;
}

async fn drop_schema(schema: &str) {
    let mut conn = admin().await;
    sqlx::query(AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS \"{schema}\" CASCADE"
    )))
    .execute(&mut conn)
    .await
    .expect("drop the test schema");
}

/// A builder that leaves migrating to the test, which calls `migrate` itself.
fn builder(schema: &str) -> PostgresStoreBuilder {
    PostgresStore::builder(database_url())
        .schema(schema)
        .max_connections(8)
        .auto_migrate(false)
}

async fn connect(builder: PostgresStoreBuilder) -> PostgresStore {
    builder
        .connect()
        .await
        .unwrap_or_else(|error| unreachable(error))
}

/// A migrated store in a schema of its own.
async fn fresh_store() -> (PostgresStore, String) {
    sweep_stale_schemas().await;
    let schema = test_schema();
    let store = connect(builder(&schema)).await;
    store.migrate().await.expect("migrate");
    (store, schema)
}

async fn row_count(store: &PostgresStore) -> i64 {
    let mut conn = admin().await;
    sqlx::query_scalar(AssertSqlSafe(format!(
        "SELECT count(*) FROM \"{}\".\"{}\"",
        store.schema(),
        store.table()
    )))
    .fetch_one(&mut conn)
    .await
    .expect("count rows")
}

fn count(outcomes: &[Begin], what: fn(&Begin) -> bool) -> usize {
    outcomes.iter().filter(|begun| what(begun)).count()
}
