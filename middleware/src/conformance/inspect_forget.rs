//! Checks the contract's **Inspect** and **Forget** points: `inspect` shows live records and
//! changes nothing; `forget` deletes completed records, leaves a live lease alone unless forced,
//! a forced forget fences the holder and wakes waiters, and every forget feed hears of it.

use std::time::Duration;

use super::support::{
    MARGIN, NOTIFY_WITHIN, acquire, acquire_run, assert_lease_lost, begin, checkpoint, completed,
    fingerprint, key, response,
};
use super::{LONG, SHORT_LOCK};
use crate::scope::RecordKey;
use crate::store::{Begin, ForgetEvent, Forgotten, IdempotencyStore, RecordState};

/// `inspect` shows a live lease (token, attempt, checkpoint, deadline) and a completed record
/// (response, size, expiry), and nothing for a free key; it changes nothing.
pub async fn inspect_shows_in_flight_and_completed_records(store: impl IdempotencyStore) {
    let key = key("inspect");
    assert_eq!(
        store.inspect(&key).await.expect("inspect"),
        None,
        "free key"
    );
    let before = std::time::SystemTime::now();
    let token = acquire(&store, &key, 1, LONG).await;
    store
        .checkpoint(&key, token, &checkpoint("charged", b"x"))
        .await
        .expect("checkpoint");
    let info = store.inspect(&key).await.expect("inspect").expect("live");
    assert_eq!(info.fingerprint, fingerprint(1));
    assert_eq!(
        info.state,
        RecordState::InFlight {
            token,
            attempt: 1,
            checkpoint: Some("charged".into())
        }
    );
    let lease_left = info.expires_at.duration_since(before).unwrap_or_default();
    assert!(
        lease_left > LONG - Duration::from_secs(60) && lease_left < LONG + Duration::from_secs(60),
        "the lease ends about `lock_ttl` from now: {lease_left:?}"
    );
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::InFlight,
        "inspect changed nothing"
    );

    let stored = response(b"{\"id\":7}");
    store
        .complete(&key, token, &stored, LONG * 2)
        .await
        .expect("complete");
    let info = store.inspect(&key).await.expect("inspect").expect("live");
    match &info.state {
        RecordState::Completed {
            response,
            stored_bytes,
        } => {
            assert_eq!(response, &stored);
            assert_eq!(*stored_bytes, stored.encode().len());
        }
        other => panic!("expected a completed record, got {other:?}"),
    }
    let kept = info.expires_at.duration_since(before).unwrap_or_default();
    assert!(
        kept > LONG * 2 - Duration::from_secs(60) && kept < LONG * 2 + Duration::from_secs(60),
        "the record ends `ttl` after completion: {kept:?}"
    );
    assert_eq!(begin(&store, &key, 1).await, completed(stored));

    let lapsed = self::key("inspect-lapsed");
    acquire(&store, &lapsed, 1, SHORT_LOCK).await;
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    assert_eq!(
        store.inspect(&lapsed).await.expect("inspect"),
        None,
        "a lapsed lease is not live"
    );
}

/// `forget` deletes a completed record: the next request runs again, and every forget feed of
/// the store hears of it.
pub async fn forget_deletes_a_completed_record(store: impl IdempotencyStore) {
    let key = key("forget-completed");
    let other = self::key("forget-other");
    let mut feed = store.forget_feed();
    assert_eq!(
        store.forget(&key, false).await.expect("forget"),
        Forgotten::NotFound
    );
    for key in [&key, &other] {
        let token = acquire(&store, key, 1, LONG).await;
        store
            .complete(key, token, &response(b"done"), LONG)
            .await
            .expect("complete");
    }
    assert_eq!(
        store.forget(&key, false).await.expect("forget"),
        Forgotten::Completed
    );
    assert_eq!(store.inspect(&key).await.expect("inspect"), None);
    assert!(
        matches!(begin(&store, &key, 2).await, Begin::Acquired { .. }),
        "runs afresh"
    );
    assert!(
        matches!(begin(&store, &other, 1).await, Begin::Completed { .. }),
        "other keys keep their records"
    );
    if let Some(feed) = feed.as_mut() {
        expect_forget(feed, &key).await;
    }
}

/// Without `force`, `forget` leaves a live lease alone and says who holds it.
pub async fn forget_leaves_a_lease_unless_forced(store: impl IdempotencyStore) {
    let key = key("forget-in-flight");
    let token = acquire(&store, &key, 1, LONG).await;
    assert_eq!(
        store.forget(&key, false).await.expect("forget"),
        Forgotten::InFlight { token, attempt: 1 }
    );
    store
        .complete(&key, token, &response(b"ok"), LONG)
        .await
        .expect("the lease still holds");
}

/// `forget` with `force` ends a live lease: its holder is fenced off, waiters are woken, the
/// next request runs afresh, and feeds hear of it.
pub async fn forced_forget_ends_the_lease_and_fences_its_holder(store: impl IdempotencyStore) {
    let key = key("forget-forced");
    let mut feed = store.forget_feed();
    let token = acquire(&store, &key, 1, LONG).await;
    let subscription = store.subscribe(&key);
    let woken = subscription.notified();
    assert_eq!(
        store.forget(&key, true).await.expect("forget"),
        Forgotten::LeaseEnded { token, attempt: 1 }
    );
    tokio::time::timeout(NOTIFY_WITHIN, woken)
        .await
        .expect("waiters of an ended lease must be woken");
    assert_lease_lost(
        store.complete(&key, token, &response(b"late"), LONG).await,
        "complete by the ended lease",
    );
    assert_lease_lost(
        store.renew(&key, token, LONG).await,
        "renew by the ended lease",
    );
    let (next, attempt, _) = acquire_run(&store, &key, 1, LONG).await;
    assert!(
        next > token && attempt == 1,
        "a fresh run: {next} {attempt}"
    );
    if let Some(feed) = feed.as_mut() {
        expect_forget(feed, &key).await;
    }
}

async fn expect_forget(feed: &mut crate::store::ForgetFeed, key: &RecordKey) {
    let heard = tokio::time::timeout(NOTIFY_WITHIN, async {
        loop {
            match feed.recv().await {
                Ok(ForgetEvent::Key(forgotten)) if forgotten == *key => return,
                Ok(_) => {}
                Err(error) => panic!("the forget feed failed: {error}"),
            }
        }
    })
    .await;
    assert!(
        heard.is_ok(),
        "the forget feed must announce the forgotten key"
    );
}
