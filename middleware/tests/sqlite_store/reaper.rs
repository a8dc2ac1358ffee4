//! The reaper: expired rows go in batches, live rows and leases stay, and the background task
//! runs on its own.

use std::time::Duration;

use tempfile::TempDir;
use test_fixtures::eventually;
use test_fixtures::records::{SHORT, acquire, complete, fingerprint, key, replayed, response};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, SqliteStore};

use super::{row_count, url};

#[tokio::test]
async fn the_reaper_deletes_expired_rows_in_batches_and_spares_live_ones() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::builder(url(&dir))
        .reaper_interval(Duration::ZERO)
        .reaper_batch(7)
        .connect()
        .await
        .expect("open");
    for i in 0..20 {
        complete(&store, &format!("expired-{i}"), SHORT).await;
    }
    for i in 0..5 {
        acquire(&store, &key(&format!("dead-lease-{i}")), SHORT).await;
    }
    for i in 0..10 {
        complete(&store, &format!("live-{i}"), LONG).await;
    }
    acquire(&store, &key("live-lease"), LONG).await;
    tokio::time::sleep(SHORT * 2).await;

    assert_eq!(store.reap_expired().await.expect("reap"), 25);
    assert_eq!(row_count(&dir).await, 11);
    assert_eq!(store.reap_expired().await.expect("reap"), 0);
    for i in 0..10 {
        let live = format!("live-{i}");
        assert_eq!(replayed(&store, &key(&live)).await, Some(response(&live)));
    }
    assert_eq!(
        store
            .begin(&key("live-lease"), &fingerprint(1), LONG)
            .await
            .unwrap(),
        Begin::InFlight
    );

    // A token issued after the old rows are gone is still larger than theirs.
    let old = complete(&store, "reacquired", SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    assert_eq!(store.reap_expired().await.expect("reap"), 1);
    assert!(acquire(&store, &key("reacquired"), LONG).await > old);
}

#[tokio::test]
async fn the_background_reaper_runs_on_its_own() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::builder(url(&dir))
        .reaper_interval(Duration::from_millis(100))
        .connect()
        .await
        .expect("open");
    complete(&store, "short-lived", SHORT).await;
    complete(&store, "long-lived", LONG).await;
    eventually(
        Duration::from_secs(5),
        "the reaper to delete the expired row",
        async || row_count(&dir).await <= 1,
    )
    .await;
    assert_eq!(row_count(&dir).await, 1, "the live row stays");
}
