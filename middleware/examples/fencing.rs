//! Fencing the handler's own writes with the lease token, against SQLite.
//!
//! Run: `cargo run -p tower-idempotency --example fencing --features sqlite`
//!
//! A holder stalls past `lock_ttl` (a GC pause, a stuck VM), the retry takes its lease over with a
//! larger token and debits the account; when the stalled holder wakes, its debit is refused by
//! the `last_fence` column, in the same statement as the write. The token comes from the lease:
//! in a handler, `Extension<Lease>` (or the `Lease` extractor with feature `axum`) and
//! `lease.token()`; here the two holders call the store directly so the stall is deterministic.

use std::time::Duration;

use sqlx::SqlitePool;
use tower_idempotency::fingerprint::Fingerprint;
use tower_idempotency::{Begin, IdempotencyStore, LeaseToken, RecordKey, Scope, SqliteStore};

/// The fenced write: 0 rows means a newer run of this key already wrote, and this one must stop.
const DEBIT: &str = "UPDATE accounts SET balance = balance - ?1, last_fence = ?2 \
                     WHERE id = 1 AND last_fence < ?2";

async fn debit(db: &SqlitePool, token: LeaseToken, amount: i64) -> sqlx::Result<bool> {
    let token = i64::try_from(token.0).expect("tokens fit a signed 64-bit column");
    let done = sqlx::query(DEBIT)
        .bind(amount)
        .bind(token)
        .execute(db)
        .await?;
    Ok(done.rows_affected() == 1)
}

async fn acquire(store: &SqliteStore, key: &RecordKey, lock: Duration) -> (LeaseToken, u32) {
    let request = Fingerprint::from_bytes([7; 32]);
    match store.begin(key, &request, lock).await.expect("begin") {
        Begin::Acquired { token, attempt, .. } => (token, attempt),
        other => panic!("expected to acquire, got {other:?}"),
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let dir = tempfile::tempdir()?;
    let url = format!("sqlite://{}", dir.path().join("app.db").display());
    let store = SqliteStore::connect(&url).await?;
    let db = SqlitePool::connect(&url).await?;
    sqlx::query(
        "CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL, \
         last_fence INTEGER NOT NULL DEFAULT 0)",
    )
    .execute(&db)
    .await?;
    sqlx::query("INSERT INTO accounts (id, balance) VALUES (1, 100)")
        .execute(&db)
        .await?;

    let key = RecordKey::new(&Scope::anonymous(), b"debit-30");
    let lock_ttl = Duration::from_millis(200);
    let (stalled, _) = acquire(&store, &key, lock_ttl).await;
    println!("holder 1 runs with token {stalled} ... and stalls");
    tokio::time::sleep(lock_ttl * 2).await;

    let (current, attempt) = acquire(&store, &key, lock_ttl).await;
    println!("holder 2 takes over with token {current}, attempt {attempt}");
    assert!(
        debit(&db, current, 30).await?,
        "the takeover's debit applies"
    );

    let refused = !debit(&db, stalled, 30).await?;
    println!("holder 1 wakes: its debit refused by last_fence: {refused}");
    assert!(refused);
    let balance: i64 = sqlx::query_scalar("SELECT balance FROM accounts WHERE id = 1")
        .fetch_one(&db)
        .await?;
    println!("balance {balance}: debited once");
    assert_eq!(balance, 70);
    Ok(())
}
