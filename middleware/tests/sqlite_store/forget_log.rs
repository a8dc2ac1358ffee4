//! Forgets across processes: two stores on one file stand for the proxy and
//! `idempotency-proxy records forget`. SQLite has no notification channel, so a forget reaches
//! the other store's feed through the forget log.

use std::time::Duration;

use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use test_fixtures::records::{acquire, key, response};
use tower_idempotency::conformance::LONG;
use tower_idempotency::store::{ForgetEvent, ForgetFeed, Forgotten};
use tower_idempotency::{IdempotencyStore, SqliteStore};

use super::url;

/// The log is read every 100 ms: a forget is heard well within this.
const HEARD_WITHIN: Duration = Duration::from_secs(2);

async fn next_event(feed: &mut ForgetFeed) -> ForgetEvent {
    tokio::time::timeout(HEARD_WITHIN, feed.recv())
        .await
        .expect("a forget event in time")
        .expect("the feed is open")
}

#[tokio::test]
async fn a_forget_in_another_process_reaches_the_feed() {
    let dir = TempDir::new().expect("temporary directory");
    let serving = SqliteStore::connect(&url(&dir)).await.expect("open");
    let other = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut feed = serving.forget_feed().expect("a forget feed");

    let released = key("released");
    let token = acquire(&serving, &released, LONG).await;
    serving.release(&released, token).await.expect("release");
    for name in ["first", "second"] {
        let completed = key(name);
        let token = acquire(&serving, &completed, LONG).await;
        serving
            .complete(&completed, token, &response(name), LONG)
            .await
            .expect("complete");
        assert_eq!(
            other.forget(&completed, false).await.expect("forget"),
            Forgotten::Completed
        );
        // A released lease is not logged (no cache holds it): the next event is this forget.
        assert_eq!(next_event(&mut feed).await, ForgetEvent::Key(completed));
    }
}

/// A reader that missed log rows the reaper deleted cannot know what they said: it reports that
/// every cached record may be forgotten.
#[tokio::test]
async fn a_hole_in_the_log_is_reported_as_unknown() {
    let dir = TempDir::new().expect("temporary directory");
    let serving = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut feed = serving.forget_feed().expect("a forget feed");

    // Rows 1 and 2 appear and row 1 is gone before the reader looks, as if reaped: one
    // transaction, so the reader sees both changes or neither.
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    let mut tx = conn.begin().await.expect("begin");
    sqlx::query(
        "INSERT INTO idempotency_forgets (key, forgotten_at) \
         VALUES (zeroblob(32), 0), (zeroblob(32), 0)",
    )
    .execute(&mut *tx)
    .await
    .expect("log two forgets");
    sqlx::query("DELETE FROM idempotency_forgets WHERE seq = 1")
        .execute(&mut *tx)
        .await
        .expect("reap one");
    tx.commit().await.expect("commit");
    assert_eq!(next_event(&mut feed).await, ForgetEvent::Unknown);
}

/// The reaper keeps the log short: rows older than ten minutes go, newer ones stay.
#[tokio::test]
async fn the_reaper_prunes_old_forgets() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    sqlx::query(
        "INSERT INTO idempotency_forgets (key, forgotten_at) VALUES \
         (zeroblob(32), CAST(unixepoch('subsec') * 1000 AS INTEGER) - 11 * 60 * 1000), \
         (zeroblob(32), CAST(unixepoch('subsec') * 1000 AS INTEGER) - 60 * 1000)",
    )
    .execute(&mut conn)
    .await
    .expect("log two forgets");
    store.reap_expired().await.expect("reap");
    let left: Vec<i64> = sqlx::query_scalar("SELECT seq FROM idempotency_forgets")
        .fetch_all(&mut conn)
        .await
        .expect("read the log");
    assert_eq!(left, [2]);
}

/// Without a readable log (migration 0003 not applied by a user who migrates by hand; here its
/// trigger and table dropped), a forget by another process could go unheard: every read reports
/// it, and the reaper still deletes expired records.
#[tokio::test]
async fn an_unreadable_log_is_reported_and_does_not_stop_the_reaper() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let mut feed = store.forget_feed().expect("a forget feed");
    acquire(&store, &key("lapses"), Duration::from_millis(50)).await;
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    sqlx::raw_sql("DROP TRIGGER idempotency_forget_logged; DROP TABLE idempotency_forgets")
        .execute(&mut conn)
        .await
        .expect("drop the log");
    assert_eq!(next_event(&mut feed).await, ForgetEvent::Unknown);
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(store.reap_expired().await.expect("reap"), 1);
}
