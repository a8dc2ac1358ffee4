//! Several processes on one database: `begin` stays atomic, and completions, releases and
//! forgets reach the other processes through LISTEN/NOTIFY, across listener reconnects.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgConnection;
use test_fixtures::records::{NOTIFY_WITHIN, SHORT, acquire, fingerprint, key, response};
use test_fixtures::shared_store::{
    completions_and_releases_wake_another_process, forgets_reach_another_process,
};
use tokio::sync::Barrier;
use tower_idempotency::conformance::LONG;
use tower_idempotency::store::ForgetEvent;
use tower_idempotency::{Begin, IdempotencyStore, PostgresStore, RecordKey};

use super::{admin, builder, connect, count, drop_schema, fresh_store};

/// Begins racing on one key from `stores` (one per simulated process), `callers` in all.
async fn race(
    stores: &[PostgresStore],
    key: &RecordKey,
    callers: usize,
    tag: fn(usize) -> u8,
) -> Vec<Begin> {
    let start = Arc::new(Barrier::new(callers));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let store = stores[i % stores.len()].clone();
            let (start, key) = (start.clone(), *key);
            tokio::spawn(async move {
                start.wait().await;
                store.begin(&key, &fingerprint(tag(i)), LONG).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(callers);
    for task in tasks {
        outcomes.push(task.await.expect("task").expect("begin"));
    }
    outcomes
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn begin_is_atomic_across_processes() {
    let (first, schema) = fresh_store().await;
    let mut stores = vec![first];
    for _ in 0..3 {
        stores.push(connect(builder(&schema)).await);
    }

    // A fresh key: one insert wins, the others conflict with a row their snapshot may not see.
    let outcomes = race(&stores, &key("fresh"), 64, |_| 1).await;
    let acquired = count(&outcomes, |b| matches!(b, Begin::Acquired { .. }));
    let in_flight = count(&outcomes, |b| matches!(b, Begin::InFlight));
    assert_eq!((acquired, in_flight), (1, 63), "{outcomes:?}");

    // Two fingerprints: one acquires, the other half all mismatch.
    let outcomes = race(&stores, &key("mixed"), 64, |i| 1 + (i % 2) as u8).await;
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::Acquired { .. })), 1);
    assert_eq!(
        count(&outcomes, |b| matches!(b, Begin::Mismatch)),
        32,
        "{outcomes:?}"
    );

    // An expired lease: exactly one caller takes it over, with a larger token.
    let expired = key("expired");
    let old = acquire(&stores[0], &expired, SHORT).await;
    tokio::time::sleep(SHORT * 2).await;
    let outcomes = race(&stores, &expired, 64, |_| 1).await;
    let tokens: Vec<u64> = outcomes
        .iter()
        .filter_map(|b| match b {
            Begin::Acquired { token, .. } => Some(token.0),
            _ => None,
        })
        .collect();
    assert_eq!(tokens.len(), 1, "{outcomes:?}");
    assert!(tokens[0] > old.0);
    assert_eq!(count(&outcomes, |b| matches!(b, Begin::InFlight)), 63);

    drop(stores);
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn completion_and_release_in_one_process_wake_waiters_in_another() {
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;
    completions_and_releases_wake_another_process(&a, &b).await;

    // Another table's completions do not reach this one's waiters.
    let other_table = connect(builder(&schema).table("other_records")).await;
    other_table
        .migrate()
        .await
        .expect("migrate the other table");
    assert_ne!(other_table.channel(), a.channel());
    let shared_name = key("same-key-other-table");
    let token = acquire(&other_table, &shared_name, LONG).await;
    let subscription = b.subscribe(&shared_name);
    let woken = subscription.notified();
    assert!(other_table.watch(&shared_name).await.expect("watch"));
    other_table
        .complete(&shared_name, token, &response("x"), LONG)
        .await
        .expect("complete");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), woken)
            .await
            .is_err(),
        "a completion in another table must not wake this table's waiters"
    );

    drop((a, b, other_table));
    drop_schema(&schema).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_reconnects_and_wakes_waiters_after_losing_its_connection() {
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;
    let application = format!("tower-idempotency listener {}", b.channel());
    let mut conn = admin().await;
    let listeners = async |conn: &mut PgConnection| -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM pg_stat_activity WHERE application_name = $1")
            .bind(&application)
            .fetch_one(conn)
            .await
            .expect("count listeners")
    };
    assert_eq!(listeners(&mut conn).await, 2, "one listener per store");

    // A waiter armed before the connection drops: whatever it missed, it is woken on reconnect.
    let pending = key("pending-across-reconnect");
    acquire(&a, &pending, LONG).await;
    let subscription = b.subscribe(&pending);
    let woken_on_reconnect = subscription.notified();

    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .fetch_all(&mut conn)
    .await
    .expect("terminate the listeners");
    assert_eq!(terminated, [true, true]);

    tokio::time::timeout(NOTIFY_WITHIN, woken_on_reconnect)
        .await
        .expect("waiters must be woken once the listener is back");
    tokio::time::timeout(NOTIFY_WITHIN, async {
        while listeners(&mut conn).await < 2 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("both listeners must reconnect");

    // And notifications flow again.
    let after = key("after-reconnect");
    let token = acquire(&a, &after, LONG).await;
    let subscription = b.subscribe(&after);
    let woken = subscription.notified();
    assert!(b.watch(&after).await.expect("watch"));
    a.complete(&after, token, &response("x"), LONG)
        .await
        .expect("complete");
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("the reconnected listener must deliver notifications");

    drop((a, b));
    drop_schema(&schema).await;
}

/// Forgets go through NOTIFY: a forget in one process reaches another's forget feed, and a
/// forced forget wakes the other's waiters.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forget_in_one_process_reaches_anothers_feed() {
    let (a, schema) = fresh_store().await;
    let b = connect(builder(&schema)).await;
    forgets_reach_another_process(&a, &b).await;
    drop((a, b));
    drop_schema(&schema).await;
}

/// A listener that lost its connection may have missed forgets: its feed says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_reconnect_tells_the_feed_forgets_may_be_missed() {
    let (store, schema) = fresh_store().await;
    let mut feed = store.forget_feed().expect("a forget feed");
    let application = format!("tower-idempotency listener {}", store.channel());
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
    )
    .bind(&application)
    .fetch_all(&mut admin().await)
    .await
    .expect("terminate the listener");
    assert_eq!(terminated, [true]);
    let heard = tokio::time::timeout(NOTIFY_WITHIN * 3, feed.recv()).await;
    assert_eq!(heard.expect("in time").ok(), Some(ForgetEvent::Unknown));
    drop(store);
    drop_schema(&schema).await;
}
