//! Checks the contract's **Lease expiry and takeover**, **Fencing** and **Release** points: an
//! expired lease is taken over with a larger token; a stale, settled or foreign token is refused
//! with `LeaseLost` and changes nothing; renewal keeps a lease alive; release frees the key.

use super::support::{MARGIN, acquire, assert_lease_lost, begin, completed, key, response};
use super::{LONG, SHORT_LOCK};
use crate::store::{Begin, IdempotencyStore};

/// After release the key is free again, under a larger token.
pub async fn release_frees_the_key(store: impl IdempotencyStore) {
    let key = key("release");
    let first = acquire(&store, &key, 1, LONG).await;
    store.release(&key, first).await.expect("release");
    let second = acquire(&store, &key, 1, LONG).await;
    assert!(second > first, "token {second} must be larger than {first}");
}

/// A lease not renewed for `lock_ttl` is taken over, whatever the new request's fingerprint,
/// with a larger token.
pub async fn expired_lease_is_taken_over_with_a_larger_token(store: impl IdempotencyStore) {
    let key = key("takeover");
    let first = acquire(&store, &key, 1, SHORT_LOCK).await;
    assert_eq!(begin(&store, &key, 1).await, Begin::InFlight);
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let second = acquire(&store, &key, 2, LONG).await;
    assert!(
        second > first,
        "takeover token {second} must be larger than {first}"
    );
}

/// After a takeover the old holder's `complete` is refused and the new holder's result stands.
pub async fn stale_holder_cannot_complete_after_takeover(store: impl IdempotencyStore) {
    let key = key("stale-complete");
    let stale = acquire(&store, &key, 1, SHORT_LOCK).await;
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let current = acquire(&store, &key, 1, LONG).await;
    assert_lease_lost(
        store.complete(&key, stale, &response(b"stale"), LONG).await,
        "stale complete",
    );
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::InFlight,
        "the new lease is intact"
    );
    store
        .complete(&key, current, &response(b"current"), LONG)
        .await
        .expect("complete");
    assert_eq!(
        begin(&store, &key, 1).await,
        completed(response(b"current"))
    );
}

/// After a takeover the old holder can neither release nor renew the new lease.
pub async fn stale_holder_cannot_release_or_renew_after_takeover(store: impl IdempotencyStore) {
    let key = key("stale-release");
    let stale = acquire(&store, &key, 1, SHORT_LOCK).await;
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    acquire(&store, &key, 1, LONG).await;
    assert_lease_lost(store.release(&key, stale).await, "stale release");
    assert_lease_lost(store.renew(&key, stale, LONG).await, "stale renew");
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::InFlight,
        "the new lease is intact"
    );
}

/// A token from a record that expired and was deleted is not valid for the key's next record.
pub async fn stale_token_is_refused_after_the_record_expired_and_was_reacquired(
    store: impl IdempotencyStore,
) {
    let key = key("stale-after-expiry");
    let old = acquire(&store, &key, 1, LONG).await;
    store
        .complete(&key, old, &response(b"old"), SHORT_LOCK)
        .await
        .expect("complete");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let new = acquire(&store, &key, 1, LONG).await;
    assert!(new > old, "token {new} must be larger than {old}");
    assert_lease_lost(
        store.complete(&key, old, &response(b"old"), LONG).await,
        "stale complete",
    );
    assert_eq!(begin(&store, &key, 1).await, Begin::InFlight);
}

/// Renewing every third of `lock_ttl` keeps a lease alive well past `lock_ttl`.
pub async fn renewal_keeps_the_lease(store: impl IdempotencyStore) {
    let key = key("renew");
    let token = acquire(&store, &key, 1, SHORT_LOCK).await;
    for _ in 0..9 {
        tokio::time::sleep(SHORT_LOCK / 3).await;
        store.renew(&key, token, SHORT_LOCK).await.expect("renew");
        assert_eq!(begin(&store, &key, 1).await, Begin::InFlight);
    }
    store
        .complete(&key, token, &response(b"late"), LONG)
        .await
        .expect("complete after renewals");
    assert_eq!(begin(&store, &key, 1).await, completed(response(b"late")));
}

/// Once completed, the token can no longer complete, renew or release: the record stays.
pub async fn a_settled_lease_cannot_be_used_again(store: impl IdempotencyStore) {
    let key = key("settled");
    let token = acquire(&store, &key, 1, LONG).await;
    store
        .complete(&key, token, &response(b"first"), LONG)
        .await
        .expect("complete");
    assert_lease_lost(
        store
            .complete(&key, token, &response(b"second"), LONG)
            .await,
        "second complete",
    );
    assert_lease_lost(store.renew(&key, token, LONG).await, "renew after complete");
    assert_lease_lost(store.release(&key, token).await, "release after complete");
    assert_eq!(begin(&store, &key, 1).await, completed(response(b"first")));

    let released = self::key("settled-released");
    let token = acquire(&store, &released, 1, LONG).await;
    store.release(&released, token).await.expect("release");
    assert_lease_lost(store.release(&released, token).await, "second release");
    assert_lease_lost(
        store
            .complete(&released, token, &response(b"x"), LONG)
            .await,
        "complete after release",
    );
}
