//! The example app as a real process on a real socket, against the shared PostgreSQL.
// Each test binary uses a part of these helpers.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use axum_payments::rides::Booked;
use reqwest::StatusCode;
use sqlx::PgPool;
use test_fixtures::{database_url, require_postgres, test_schema};

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

    /// Starts the app on a port of its own choosing (0: no other process can take it between
    /// picking and binding); with `pause_at`, its handler stops at that step (see
    /// `src/pause.rs`). Its log goes to a file that failures print.
    pub(crate) fn start(&self, pause_at: Option<&str>) -> AppProcess {
        let log = tempfile::NamedTempFile::new_in(self.barrier.path()).expect("log file");
        let mut command = Command::new(env!("CARGO_BIN_EXE_axum-payments"));
        command
            .env("DATABASE_URL", database_url())
            .env("PAYMENTS_SCHEMA", &self.schema)
            .env("PORT", "0")
            .env("LOCK_TTL_MS", LOCK_TTL.as_millis().to_string())
            .env("PAYMENTS_PAUSE_DIR", self.barrier.path())
            .env("RUST_LOG", "info,tower_idempotency=debug")
            .stdout(Stdio::piped())
            .stderr(log.reopen().expect("log file"));
        if let Some(step) = pause_at {
            command.env("PAYMENTS_PAUSE_AT", step);
        }
        let mut child = command.spawn().expect("start the example app");
        let stdout = child.stdout.take().expect("stdout");
        let (address, listening) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = address.send(url.to_owned());
                }
            }
        });
        let mut app = AppProcess {
            child,
            url: String::new(),
            log,
        };
        match listening.recv_timeout(Duration::from_secs(30)) {
            Ok(base) => app.url = format!("{base}/rides"),
            Err(_) => panic!("the app did not start listening:\n{}", app.log()),
        }
        app
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
    log: tempfile::NamedTempFile,
}

impl AppProcess {
    /// What the process logged so far.
    pub(crate) fn log(&self) -> String {
        let log = std::fs::read_to_string(self.log.path()).unwrap_or_default();
        format!(
            "--- log of the app at {} ---\n{log}--- end of log ---",
            self.url
        )
    }

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
pub(crate) async fn retry_until_answered(app: &AppProcess) -> (StatusCode, bool, String) {
    let deadline = Instant::now() + LOCK_TTL * 15;
    loop {
        let response = match book(&app.url).await {
            Ok(response) => response,
            Err(error) => panic!("the retry did not reach the app: {error:?}\n{}", app.log()),
        };
        let status = response.status();
        let replayed = response.headers().get("idempotent-replayed").is_some();
        let body = response.text().await.expect("body");
        if status != StatusCode::CONFLICT {
            return (status, replayed, body);
        }
        assert!(
            Instant::now() < deadline,
            "still in flight: {body}\n{}",
            app.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
