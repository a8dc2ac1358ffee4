//! Group commit: the writes that queue while the writer is busy share one transaction, and a
//! statement failing in a batch fails all of it.

use std::time::Duration;

use sqlx::{Connection, SqliteConnection};
use tempfile::TempDir;
use test_fixtures::batch_sizes;
use test_fixtures::records::{
    acquire, assert_the_batch_failed_whole, fingerprint, key, response, spawn_begin,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::{Begin, IdempotencyStore, LeaseToken, SqliteStore, StoreError};

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
    // 42 begins, 40 completes and the 40 replays just read: every `begin` goes to the writer.
    assert_eq!(writes, 122.0, "every write counted once: {seen:?}");
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

/// One batch holding every kind of write: new keys, a key another call of the batch's
/// predecessor acquired, completes (one of a lease that no longer exists), and a key that is
/// taken over and completed by its lapsed holder in the same batch. Each call gets the answer it
/// would get alone, in queue order, and the batch is one transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_of_every_kind_of_write_answers_each_as_if_sequential() {
    let dir = TempDir::new().expect("temporary directory");
    let sizes = batch_sizes::Sizes::default();
    let store = store_recording(&dir, &sizes).await;
    let completed = acquire(&store, &key("completed"), LONG).await;
    let lapsed = acquire(&store, &key("lapsed"), Duration::from_millis(50)).await;
    tokio::time::sleep(Duration::from_millis(120)).await;

    let lock = hold_write_lock(&dir).await;
    // The first call occupies the writer, waiting for the lock; the others queue behind it, in
    // this order, and form the next batch.
    let first = spawn_begin(&store, key("contended"));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut calls = Vec::new();
    let in_order = Duration::from_millis(20);
    calls.push(tokio::spawn(begin_as(&store, "contended", 1)));
    tokio::time::sleep(in_order).await;
    calls.push(tokio::spawn(complete_as(&store, "completed", completed)));
    tokio::time::sleep(in_order).await;
    calls.push(tokio::spawn(complete_as(
        &store,
        "never-begun",
        LeaseToken(999_999),
    )));
    tokio::time::sleep(in_order).await;
    calls.push(tokio::spawn(begin_as(&store, "lapsed", 2)));
    tokio::time::sleep(in_order).await;
    calls.push(tokio::spawn(complete_as(&store, "lapsed", lapsed)));
    for new in ["new-1", "new-2"] {
        tokio::time::sleep(in_order).await;
        calls.push(tokio::spawn(begin_as(&store, new, 1)));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    unlock(lock).await;

    let first = first.await.expect("task").expect("begin");
    let Begin::Acquired { token: first, .. } = first else {
        panic!("the lone first call acquires its key: {first:?}");
    };
    let mut answers = Vec::new();
    for call in calls {
        answers.push(call.await.expect("task"));
    }
    let [
        contended,
        complete,
        never_begun,
        taken_over,
        late_complete,
        new_1,
        new_2,
    ] = &answers[..]
    else {
        panic!("seven answers: {answers:?}");
    };
    assert!(
        matches!(contended, Ok(Written::Begun(Begin::InFlight))),
        "{contended:?}"
    );
    assert!(matches!(complete, Ok(Written::Completed)), "{complete:?}");
    assert!(
        matches!(never_begun, Err(StoreError::LeaseLost)),
        "{never_begun:?}"
    );
    let Ok(Written::Begun(Begin::Acquired {
        token: takeover,
        attempt: 1,
        ..
    })) = taken_over
    else {
        panic!("another request takes the lapsed key over: {taken_over:?}");
    };
    assert!(
        matches!(late_complete, Err(StoreError::LeaseLost)),
        "the lapsed holder, queued after the takeover, has lost its lease: {late_complete:?}"
    );
    let mut tokens = vec![first.0, takeover.0];
    for new in [new_1, new_2] {
        let Ok(Written::Begun(Begin::Acquired {
            token, attempt: 1, ..
        })) = new
        else {
            panic!("a new key is acquired: {new:?}");
        };
        tokens.push(token.0);
    }
    assert!(tokens.iter().all(|token| *token > lapsed.0), "{tokens:?}");
    tokens.sort_unstable();
    tokens.dedup();
    assert_eq!(tokens.len(), 4, "every lease has a token of its own");
    assert!(
        sizes.seen().contains(&7.0),
        "the seven queued calls were one batch: {:?}",
        sizes.seen()
    );
    assert!(matches!(
        store.begin(&key("completed"), &fingerprint(1), LONG).await,
        Ok(Begin::Completed { response: stored, .. }) if stored.body == "ok".as_bytes()
    ));
    assert!(matches!(
        store.begin(&key("lapsed"), &fingerprint(2), LONG).await,
        Ok(Begin::InFlight)
    ));
}

/// What a call of [`a_batch_of_every_kind_of_write_answers_each_as_if_sequential`] got.
#[derive(Debug)]
enum Written {
    Begun(Begin),
    Completed,
}

fn begin_as(
    store: &SqliteStore,
    name: &str,
    tag: u8,
) -> impl Future<Output = Result<Written, StoreError>> + use<> {
    let (store, key) = (store.clone(), key(name));
    async move {
        store
            .begin(&key, &fingerprint(tag), LONG)
            .await
            .map(Written::Begun)
    }
}

fn complete_as(
    store: &SqliteStore,
    name: &str,
    token: LeaseToken,
) -> impl Future<Output = Result<Written, StoreError>> + use<> {
    let (store, key) = (store.clone(), key(name));
    async move {
        let stored = store.complete(&key, token, &response("ok"), LONG).await;
        stored.map(|()| Written::Completed)
    }
}
