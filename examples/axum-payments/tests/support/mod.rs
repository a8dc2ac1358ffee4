//! The example app as a real process on a real socket, against the shared PostgreSQL.
// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::net::{Ipv4Addr, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum_payments::rides::Booked;
use reqwest::StatusCode;
use sqlx::PgPool;
use test_fixtures::{database_url, free_port, require_postgres, test_schema};

/// `lock_ttl` of every app the tests start: short, so a killed holder's lease lapses quickly.
pub(crate) const LOCK_TTL: Duration = Duration::from_secs(1);

/// One schema (the app's tables and its records) and a barrier directory, dropped at the end.
pub(crate) struct World {
    schema: String,
    barrier: tempfile::TempDir,
    db: PgPool,
}

impl World {
    pub(crate) async fn new() -> Self {
        require_postgres(&database_url());
        let db = PgPool::connect(&database_url()).await.expect("connect");
        Self {
            schema: test_schema(),
            barrier: tempfile::tempdir().expect("tempdir"),
            db,
        }
    }

    /// Starts the app; with `pause_at`, its handler stops at that step (see `src/pause.rs`).
    pub(crate) fn start(&self, pause_at: Option<&str>) -> AppProcess {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_axum-payments"));
        command
            .env("DATABASE_URL", database_url())
            .env("PAYMENTS_SCHEMA", &self.schema)
            .env("PORT", port.to_string())
            .env("LOCK_TTL_MS", LOCK_TTL.as_millis().to_string())
            .env("PAYMENTS_PAUSE_DIR", self.barrier.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        if let Some(step) = pause_at {
            command.env("PAYMENTS_PAUSE_AT", step);
        }
        let child = command.spawn().expect("start the example app");
        let deadline = Instant::now() + Duration::from_secs(30);
        while TcpStream::connect((Ipv4Addr::LOCALHOST, port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "the app did not open port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        AppProcess {
            child,
            url: format!("http://127.0.0.1:{port}/rides"),
        }
    }

    /// Waits until a handler reached `step` and stopped there.
    pub(crate) async fn reached(&self, step: &str) {
        let file = self.barrier.path().join(step);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !file.exists() {
            assert!(
                Instant::now() < deadline,
                "the handler never reached {step}"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Lets a handler stopped at `step` go on.
    pub(crate) fn release(&self, step: &str) {
        let go: PathBuf = self.barrier.path().join(format!("{step}.go"));
        std::fs::write(go, b"").expect("barrier");
    }

    async fn count(&self, table: &str) -> i64 {
        let sql = format!("SELECT count(*) FROM \"{}\".{table}", self.schema);
        sqlx::query_scalar(sqlx::AssertSqlSafe(sql))
            .fetch_one(&self.db)
            .await
            .expect("count")
    }

    /// Exactly one ride, one charge at the processor and one receipt, and `booked` names them.
    pub(crate) async fn assert_effects_once(&self, booked: &Booked) {
        assert_eq!(self.count("rides").await, 1, "rides");
        assert_eq!(self.count("provider_charges").await, 1, "charges");
        assert_eq!(self.count("receipts").await, 1, "receipts");
        let s = &self.schema;
        let (ride, charge): (i64, Option<String>) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, charge_id FROM \"{s}\".rides"
        )))
        .fetch_one(&self.db)
        .await
        .expect("ride");
        let (receipt, receipt_ride): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT id, ride_id FROM \"{s}\".receipts"
        )))
        .fetch_one(&self.db)
        .await
        .expect("receipt");
        let provider: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT id FROM \"{s}\".provider_charges"
        )))
        .fetch_one(&self.db)
        .await
        .expect("charge");
        assert_eq!(booked.ride, ride, "{booked:?}");
        assert_eq!(
            charge.as_deref(),
            Some(booked.charge.as_str()),
            "{booked:?}"
        );
        assert_eq!(booked.charge, format!("ch_{provider}"), "{booked:?}");
        assert_eq!(
            (booked.receipt, receipt_ride),
            (receipt, ride),
            "{booked:?}"
        );
    }

    pub(crate) async fn drop_schema(self) {
        let sql = format!("DROP SCHEMA IF EXISTS \"{}\" CASCADE", self.schema);
        let _ = sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&self.db)
            .await;
    }
}

/// A running app process; killed (`kill -9`) when dropped.
pub(crate) struct AppProcess {
    child: Child,
    pub(crate) url: String,
}

impl AppProcess {
    /// `kill -9`.
    pub(crate) fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// `kill -STOP` / `kill -CONT`: a stall no code in the process can notice or prevent.
    pub(crate) fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .arg(format!("-{signal}"))
            .arg(self.child.id().to_string())
            .status()
            .expect("kill");
        assert!(status.success());
    }
}

impl Drop for AppProcess {
    fn drop(&mut self) {
        // A stopped process still dies of SIGKILL; it only needs no SIGCONT.
        self.kill();
    }
}

/// The one request of every test: same key, caller and body on every try.
pub(crate) async fn book(url: &str) -> reqwest::Result<reqwest::Response> {
    reqwest::Client::new()
        .post(url)
        .header("idempotency-key", "ride-to-orly")
        .header("authorization", "Bearer alice")
        .json(&serde_json::json!({"origin": "Gare du Nord", "destination": "Orly", "amount": 4200}))
        .timeout(Duration::from_secs(30))
        .send()
        .await
}

/// Retries as a client would until the answer is not `409` (the key in flight): the crashed or
/// stalled holder's lease lapses after `lock_ttl`.
pub(crate) async fn retry_until_answered(url: &str) -> (StatusCode, bool, String) {
    let deadline = Instant::now() + LOCK_TTL * 15;
    loop {
        let response = book(url).await.expect("the retry reaches the app");
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").is_some();
        let body = response.text().await.expect("body");
        if status != StatusCode::CONFLICT {
            return (status, replayed, body);
        }
        assert!(Instant::now() < deadline, "still in flight: {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
