//! Checks the contract's **Notification** point: `complete` and `release` wake a subscription
//! armed before them, the completion is visible once the wake-up arrives, and `watch` answers
//! for in-flight, completed and free keys without failing.

use std::sync::Arc;
use std::time::Duration;

use super::LONG;
use super::support::{NOTIFY_WITHIN, acquire, begin, completed, key, response};
use crate::scope::RecordKey;
use crate::store::{Begin, IdempotencyStore, LeaseToken, Subscription};

/// A key leased by fingerprint 1, seen in flight by `begin` and `watch`, with a subscription to it
/// taken while it is in flight.
async fn in_flight_and_subscribed(
    store: &impl IdempotencyStore,
    name: &str,
) -> (RecordKey, LeaseToken, Subscription) {
    let key = key(name);
    let token = acquire(store, &key, 1, LONG).await;
    let subscription = store.subscribe(&key);
    assert_eq!(begin(store, &key, 1).await, Begin::InFlight);
    assert!(
        store.watch(&key).await.expect("watch"),
        "the key is in flight"
    );
    (key, token, subscription)
}

/// A subscriber armed before the completion is woken by it.
pub async fn subscribers_are_woken_by_complete(store: impl IdempotencyStore) {
    let store = Arc::new(store);
    let (key, token, subscription) = in_flight_and_subscribed(&*store, "notify-complete").await;
    let woken = subscription.notified();
    let completer = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        completer.complete(&key, token, &response(b"x"), LONG).await
    });
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("complete must wake the subscriber");
    // Wake-ups may be spurious; the completion must be visible by the time a real one arrives.
    let deadline = tokio::time::Instant::now() + NOTIFY_WITHIN;
    loop {
        let woken = subscription.notified();
        if matches!(begin(&*store, &key, 1).await, Begin::Completed { .. }) {
            break;
        }
        tokio::time::timeout_at(deadline, woken)
            .await
            .expect("the completion must become visible after its notification");
    }
}

/// A subscriber armed before a release is woken by it.
pub async fn subscribers_are_woken_by_release(store: impl IdempotencyStore) {
    let store = Arc::new(store);
    let (key, token, subscription) = in_flight_and_subscribed(&*store, "notify-release").await;
    let woken = subscription.notified();
    let releaser = store.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        releaser.release(&key, token).await
    });
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("release must wake the subscriber");
}

/// `watch` answers `true` for an in-flight key (stores that notify in process alone may always
/// answer `true`); for one that completed or was released, a store that tracks watchers says
/// `false`, so the waiter looks again at once instead of waiting for a notification that already
/// went out.
pub async fn watch_tells_whether_a_key_is_still_in_flight(store: impl IdempotencyStore) {
    let key = key("watch");
    let token = acquire(&store, &key, 1, LONG).await;
    assert!(store.watch(&key).await.expect("watch"));
    assert!(
        store.watch(&key).await.expect("watch twice"),
        "watching twice is harmless"
    );
    store
        .complete(&key, token, &response(b"x"), LONG)
        .await
        .expect("complete after watch");
    assert_eq!(begin(&store, &key, 1).await, completed(response(b"x")));
    // Either answer is allowed once it completed; what matters is that neither call fails.
    store.watch(&key).await.expect("watch a completed key");
    store
        .watch(&self::key("watch-free"))
        .await
        .expect("watch a free key");
}
