//! An axum payments API whose effects and idempotency records share one PostgreSQL database:
//! `POST /rides` creates a ride, charges the card and sends a receipt in three atomic phases
//! (see [`rides`]), and survives `kill -9` at any point without a second charge or receipt.
//! `README.md` tells the crash story; `tests/` proves it on the real binary.

pub mod rides;

mod pause;
mod provider;

use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::routing::post;
use sqlx::PgPool;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use tower_idempotency::{IdempotencyLayer, OnConflict, Policy, PostgresStore};

/// The application's state: its pool, and the idempotency store built on that same pool.
#[derive(Clone)]
pub struct App {
    pool: PgPool,
    store: PostgresStore,
}

/// The app's tables, in the schema its connections use (`search_path`).
const SCHEMA: &str = "\
    CREATE TABLE IF NOT EXISTS rides ( \
        id bigserial PRIMARY KEY, origin text NOT NULL, destination text NOT NULL, \
        amount bigint NOT NULL, charge_id text, created_by bigint NOT NULL); \
    CREATE TABLE IF NOT EXISTS receipts ( \
        id bigserial PRIMARY KEY, ride_id bigint NOT NULL REFERENCES rides, \
        sent_by bigint NOT NULL); \
    CREATE TABLE IF NOT EXISTS provider_charges ( \
        id bigserial PRIMARY KEY, idempotency_key text NOT NULL UNIQUE, amount bigint NOT NULL)";

impl App {
    /// Connects to `url` with every table, the idempotency records included, in `schema`
    /// (created if missing).
    pub async fn connect(url: &str, schema: &str) -> Result<Self, Box<dyn std::error::Error>> {
        let options: PgConnectOptions = url.parse()?;
        let setup = PgPoolOptions::new()
            .max_connections(1)
            .connect_with(options.clone())
            .await?;
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
            "CREATE SCHEMA IF NOT EXISTS \"{schema}\""
        )))
        .execute(&setup)
        .await?;
        setup.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .connect_with(options.options([("search_path", schema)]))
            .await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let store = PostgresStore::from_pool(pool.clone())
            .schema(schema)
            .connect()
            .await?;
        Ok(Self { pool, store })
    }

    /// The routes: `POST /rides` requires an `Idempotency-Key`; `GET /rides` lists the rides.
    pub fn router(self, lock_ttl: Duration) -> Router {
        let rides = Policy::default()
            .with_required(true)
            .with_lock_ttl(lock_ttl)
            .with_on_conflict(OnConflict::Reject);
        let layer = IdempotencyLayer::new(self.store.clone()).route("/rides", rides);
        Router::new()
            .route("/rides", post(rides::book).get(list))
            .with_state(self)
            .layer(layer)
    }
}

async fn list(State(app): State<App>) -> Result<axum::Json<serde_json::Value>, rides::AppError> {
    let rows: Vec<(i64, i64, Option<String>)> =
        sqlx::query_as("SELECT id, amount, charge_id FROM rides ORDER BY id")
            .fetch_all(&app.pool)
            .await?;
    let rides = rows
        .into_iter()
        .map(|(id, amount, charge)| serde_json::json!({"id": id, "amount": amount, "charge": charge}))
        .collect();
    Ok(axum::Json(serde_json::Value::Array(rides)))
}
