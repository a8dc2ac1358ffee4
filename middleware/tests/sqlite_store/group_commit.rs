//! Group commit: the writes that queue while the writer is busy share one transaction, and a
//! statement failing in a batch fails all of it.

use std::time::Duration;

use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use test_fixtures::batch_sizes;
use test_fixtures::records::{
    assert_the_batch_failed_whole, fingerprint, key, response, spawn_begin,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, SqliteStore};

use super::{row_count, url};

/// Opens a store whose batch sizes `sizes` records (the histogram handle is taken when the
/// store starts its writer).
async fn store_recording(dir: &TempDir, sizes: &batch_sizes::Sizes) -> SqliteStore {
    let url = url(dir);
    batch_sizes::recording(sizes, SqliteStore::connect(&url)).expect("open the store")
}

/// Holds SQLite's write lock from a connection of its own until [`unlock`].
async fn hold_write_lock(dir: &TempDir) -> SqliteConnection {
    let mut conn = SqliteConnection::connect(&url(dir)).await.expect("open");
    sqlx::raw_sql("BEGIN IMMEDIATE")
        .execute(&mut conn)
        .await
        .expect("take the write lock");
    conn
}

async fn unlock(mut conn: SqliteConnection) {
    sqlx::raw_sql("COMMIT")
        .execute(&mut conn)
        .await
        .expect("commit");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_queued_while_the_writer_is_busy_share_one_transaction() {
    let dir = TempDir::new().expect("temporary directory");
    let sizes = batch_sizes::Sizes::default();
    let store = store_recording(&dir, &sizes).await;
    let lock = hold_write_lock(&dir).await;
    // Forty distinct keys, and the first of them twice more from two fingerprints. The three
    // calls on that key race, so which one wins is up to the scheduler: exactly one is acquired,
    // a loser with the winner's fingerprint sees it in flight and one with the other a mismatch.
    let calls: Vec<_> = (0..40u8)
        .map(|i| (i, 1u8))
        .chain([(0, 1), (0, 2)])
        .map(|(i, tag)| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = key(&format!("distinct-{i}"));
                (key, tag, store.begin(&key, &fingerprint(tag), LONG).await)
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    unlock(lock).await;
    let mut leases = Vec::new();
    let mut same_key = Vec::new();
    for call in calls {
        let (key, tag, begun) = call.await.expect("task");
        let begun = begun.expect("begin");
        if key == self::key("distinct-0") {
            same_key.push((tag, begun));
        } else if let Begin::Acquired { token, .. } = begun {
            leases.push((key, tag, token));
        } else {
            panic!("a fresh key must be acquired: {begun:?}");
        }
    }
    let winners: Vec<_> = same_key
        .iter()
        .filter_map(|(tag, begun)| match begun {
            Begin::Acquired { token, .. } => Some((*tag, *token)),
            _ => None,
        })
        .collect();
    let [(winning_tag, token)] = winners[..] else {
        panic!("exactly one call on a key is acquired: {same_key:?}");
    };
    leases.push((key("distinct-0"), winning_tag, token));
    for (tag, begun) in &same_key {
        match begun {
            Begin::Acquired { .. } => {}
            Begin::InFlight => assert_eq!(*tag, winning_tag, "{same_key:?}"),
            Begin::Mismatch => assert_ne!(*tag, winning_tag, "{same_key:?}"),
            other => panic!("a loser is in flight or a mismatch: {other:?}"),
        }
    }
    let mut tokens: Vec<_> = leases.iter().map(|(_, _, token)| token.0).collect();
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 40, "every lease has a token of its own");
    let completes: Vec<_> = leases
        .iter()
        .map(|(key, _, token)| {
            let (store, key, token) = (store.clone(), *key, *token);
            tokio::spawn(async move { store.complete(&key, token, &response("ok"), LONG).await })
        })
        .collect();
    for complete in completes {
        complete.await.expect("task").expect("complete");
    }
    for (key, tag, _) in &leases {
        assert!(matches!(
            store.begin(key, &fingerprint(*tag), LONG).await,
            Ok(Begin::Completed { response: stored, .. }) if stored.body == "ok".as_bytes()
        ));
    }
    let seen = sizes.seen();
    let writes: f64 = seen.iter().sum();
    assert_eq!(writes, 82.0, "every write counted once: {seen:?}");
    assert!(
        seen.iter().any(|size| *size >= 10.0),
        "the queued writes shared transactions: {seen:?}"
    );
}

/// A statement that fails in the middle of a batch (a trigger refusing one key) rolls the whole
/// transaction back: every call of the batch fails and none of its rows is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_batch_fails_every_call_and_writes_nothing() {
    let dir = TempDir::new().expect("temporary directory");
    let store = SqliteStore::connect(&url(&dir)).await.expect("open");
    let poison = key("poison");
    let hex = poison.to_hex();
    let mut conn = SqliteConnection::connect(&url(&dir)).await.expect("open");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER refuse BEFORE INSERT ON idempotency_records \
         WHEN NEW.key = x'{hex}' BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )))
    .execute(&mut conn)
    .await
    .expect("create the trigger");

    let lock = hold_write_lock(&dir).await;
    // The first call occupies the writer (waiting for the lock) ...
    let opener = spawn_begin(&store, key("opener"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ... while these gather into the next batch, the poison among them.
    let mut members: Vec<_> = (0..8)
        .map(|i| spawn_begin(&store, key(&format!("m-{i}"))))
        .collect();
    members.push(spawn_begin(&store, poison));
    tokio::time::sleep(Duration::from_millis(200)).await;
    unlock(lock).await;
    assert_the_batch_failed_whole(vec![opener], members).await;
    assert_eq!(row_count(&dir).await, 1, "only the opener's row exists");
    assert!(matches!(
        store.begin(&key("m-3"), &fingerprint(1), LONG).await,
        Ok(Begin::Acquired { .. })
    ));
}
