//! Scale figures for `bench/run` (issue 6): memory-store bytes per record, and how fast the SQL
//! stores' reapers delete expired rows while requests keep beginning and completing.
//!
//! ```text
//! cargo run --release -p tower-idempotency --features sqlite,postgres,redis --example scale -- \
//!     memory [RECORDS] [BODY_BYTES]
//! cargo run ... -- reap-postgres URL SCHEMA [ROWS] [WORKERS] [BATCH]
//! cargo run ... -- reap-sqlite FILE [ROWS] [WORKERS] [BATCH]
//! ```
//!
//! Each prints one line `SCALE_RESULT {json}` that `bench/run` parses. Nothing here changes the
//! stores: it only drives their public API (and, to prefill expired rows quickly, one plain SQL
//! `INSERT ... SELECT` into the store's table).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::{
    Begin, IdempotencyStore, MemoryStore, PostgresStore, RecordKey, Scope, SqliteStore,
    StoredResponse,
};

const LOCK_TTL: Duration = Duration::from_secs(30);
const TTL: Duration = Duration::from_secs(24 * 3600);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let arg = |i: usize, default: &str| args.get(i).cloned().unwrap_or_else(|| default.to_owned());
    let number = |i: usize, default: u64| -> u64 {
        args.get(i)
            .map(|s| s.parse().expect("a number"))
            .unwrap_or(default)
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    match args.first().map(String::as_str) {
        Some("memory") => {
            memory(number(1, 1_000_000), number(2, 200) as usize);
        }
        Some("reap-postgres") => runtime.block_on(async {
            let url = arg(1, "postgres://postgres@127.0.0.1:5432/test");
            let schema = arg(2, "bench_scale");
            let (rows, workers, batch) = (number(3, 200_000), number(4, 8), number(5, 1000));
            let store = PostgresStore::builder(url.as_str())
                .schema(schema.as_str())
                .reaper_interval(Duration::ZERO)
                .reaper_batch(batch as u32)
                .connect()
                .await
                .expect("connect to PostgreSQL");
            let table = format!("\"{}\".\"{}\"", store.schema(), store.table());
            let pool = sqlx::postgres::PgPoolOptions::new()
                .max_connections(1)
                .connect(&url)
                .await
                .expect("connect");
            let started = Instant::now();
            sqlx::query(sqlx::AssertSqlSafe(format!(
                "INSERT INTO {table} (key, fingerprint, response, expires_at) \
                 SELECT sha256(int8send(g)), sha256(int8send(-g)), \
                        convert_to(repeat('x', 260), 'UTF8'), now() - interval '1 second' \
                 FROM generate_series(1, $1::bigint) AS g"
            )))
            .bind(rows as i64)
            .execute(&pool)
            .await
            .expect("prefill");
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM ANALYZE {table}")))
                .execute(&pool)
                .await
                .expect("analyze");
            let prefill = started.elapsed();
            let store = Arc::new(store);
            let reaper = store.clone();
            reap(
                "postgres",
                store,
                rows,
                workers,
                batch,
                prefill,
                move || {
                    let reaper = reaper.clone();
                    async move { reaper.reap_expired().await.expect("reap") }
                },
            )
            .await;
            pool.close().await;
        }),
        Some("reap-sqlite") => runtime.block_on(async {
            let file = arg(1, "/tmp/bench-scale.db");
            let (rows, workers, batch) = (number(2, 200_000), number(3, 8), number(4, 1000));
            let store = SqliteStore::builder(format!("sqlite://{file}"))
                .reaper_interval(Duration::ZERO)
                .reaper_batch(batch as u32)
                .connect()
                .await
                .expect("open SQLite");
            let pool = sqlx::sqlite::SqlitePoolOptions::new()
                .max_connections(1)
                .connect_with(
                    sqlx::sqlite::SqliteConnectOptions::new()
                        .filename(&file)
                        .busy_timeout(Duration::from_secs(30)),
                )
                .await
                .expect("open");
            let started = Instant::now();
            sqlx::query(
                "WITH RECURSIVE g(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM g WHERE x < ?1) \
                 INSERT INTO idempotency_records (key, fingerprint, token, response, expires_at) \
                 SELECT randomblob(32), randomblob(32), x, zeroblob(260), 0 FROM g",
            )
            .bind(rows as i64)
            .execute(&pool)
            .await
            .expect("prefill");
            let prefill = started.elapsed();
            pool.close().await;
            let store = Arc::new(store);
            let reaper = store.clone();
            reap("sqlite", store, rows, workers, batch, prefill, move || {
                let reaper = reaper.clone();
                async move { reaper.reap_expired().await.expect("reap") }
            })
            .await;
        }),
        _ => {
            eprintln!(
                "usage: scale memory [RECORDS] [BODY_BYTES] | \
                 reap-postgres URL SCHEMA [ROWS] [WORKERS] [BATCH] | \
                 reap-sqlite FILE [ROWS] [WORKERS] [BATCH]"
            );
            std::process::exit(2);
        }
    }
}

fn response(body_bytes: usize) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    StoredResponse::new(
        StatusCode::CREATED,
        headers,
        Bytes::from(vec![b'x'; body_bytes]),
    )
}

/// Resident set size in bytes, from /proc/self/statm.
fn rss() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("resident pages");
    pages * 4096
}

fn memory(records: u64, body_bytes: usize) {
    // A current-thread runtime: the store's sweeper is spawned but never gets to run while the
    // fill below blocks on it, so nothing is removed during the measurement.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    runtime.block_on(async move {
        let store = MemoryStore::builder()
            .sweep_interval(Duration::from_secs(3600))
            .build();
        let stored = response(body_bytes);
        let encoded_len = stored.encode().len();
        let fingerprint = Fingerprint::from_bytes([7; 32]);
        let scope = Scope::anonymous();
        let before = rss();
        let started = Instant::now();
        for i in 0..records {
            let key = RecordKey::new(&scope, format!("key-{i}").as_bytes());
            let Begin::Acquired { token, .. } = store
                .begin(&key, &fingerprint, LOCK_TTL)
                .await
                .expect("begin")
            else {
                panic!("a fresh key must be acquired");
            };
            store
                .complete(&key, token, &stored, TTL)
                .await
                .expect("complete");
        }
        let elapsed = started.elapsed();
        let after = rss();
        assert_eq!(store.len() as u64, records);
        let per_record = (after.saturating_sub(before)) as f64 / records as f64;
        println!(
            "SCALE_RESULT {{\"kind\":\"memory\",\"records\":{records},\"body_bytes\":{body_bytes},\
             \"encoded_response_bytes\":{encoded_len},\"rss_before\":{before},\"rss_after\":{after},\
             \"bytes_per_record\":{per_record:.1},\"fill_seconds\":{:.3},\
             \"begin_complete_per_second\":{:.0}}}",
            elapsed.as_secs_f64(),
            records as f64 / elapsed.as_secs_f64()
        );
    });
}

/// Runs `workers` tasks that begin and complete fresh keys without pause, measures their rate
/// alone, then runs one full reaper pass (`reap`) over the `rows` prefilled expired rows while
/// they keep going.
async fn reap<S, F, Fut>(
    backend: &str,
    store: Arc<S>,
    rows: u64,
    workers: u64,
    batch: u64,
    prefill: Duration,
    reap: F,
) where
    S: IdempotencyStore,
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = u64>,
{
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let run_id = std::process::id();
    let mut tasks = Vec::new();
    for w in 0..workers {
        let (store, done, stop) = (store.clone(), done.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            let stored = response(200);
            let fingerprint = Fingerprint::from_bytes([9; 32]);
            let scope = Scope::anonymous();
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let key = RecordKey::new(&scope, format!("live-{run_id}-{w}-{i}").as_bytes());
                if let Ok(Begin::Acquired { token, .. }) =
                    store.begin(&key, &fingerprint, LOCK_TTL).await
                {
                    let _ = store.complete(&key, token, &stored, TTL).await;
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    // Warm up, then measure the request rate without the reaper.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (n0, t0) = (done.load(Ordering::Relaxed), Instant::now());
    tokio::time::sleep(Duration::from_secs(3)).await;
    let baseline = (done.load(Ordering::Relaxed) - n0) as f64 / t0.elapsed().as_secs_f64();

    let (n1, t1) = (done.load(Ordering::Relaxed), Instant::now());
    let deleted = reap().await;
    let reap_time = t1.elapsed();
    let during = (done.load(Ordering::Relaxed) - n1) as f64 / reap_time.as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for task in tasks {
        let _ = task.await;
    }
    println!(
        "SCALE_RESULT {{\"kind\":\"reap\",\"backend\":\"{backend}\",\"rows\":{rows},\
         \"deleted\":{deleted},\"batch\":{batch},\"workers\":{workers},\
         \"prefill_seconds\":{:.3},\"reap_seconds\":{:.3},\"deleted_per_second\":{:.0},\
         \"requests_per_second_before\":{baseline:.0},\"requests_per_second_during\":{during:.0}}}",
        prefill.as_secs_f64(),
        reap_time.as_secs_f64(),
        deleted as f64 / reap_time.as_secs_f64(),
    );
}
