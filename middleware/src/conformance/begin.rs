//! Checks the contract's **Atomic begin** point: a free key is acquired; while its lease is live,
//! a second `begin` sees `InFlight` (same fingerprint) or `Mismatch` (another fingerprint), also
//! once the record completed; and of many concurrent `begin` calls exactly one acquires.

use std::sync::Arc;

use tokio::sync::Barrier;

use super::LONG;
use super::support::{acquire, begin, fingerprint, key, response};
use crate::store::{Begin, IdempotencyStore};

/// A free key is acquired.
pub async fn begin_acquires_a_free_key(store: impl IdempotencyStore) {
    acquire(&store, &key("free"), 1, LONG).await;
}

/// Of 64 concurrent begins on one key, exactly one acquires; the others see it in flight.
pub async fn concurrent_begins_acquire_once(store: impl IdempotencyStore) {
    let outcomes = race(store, 64, |_| 1).await;
    let acquired = outcomes
        .iter()
        .filter(|b| matches!(b, Begin::Acquired { .. }))
        .count();
    let in_flight = outcomes
        .iter()
        .filter(|b| matches!(b, Begin::InFlight))
        .count();
    assert_eq!((acquired, in_flight), (1, 63), "outcomes: {outcomes:?}");
}

/// Concurrent begins with two fingerprints: one acquires, the rest see in-flight or mismatch.
pub async fn concurrent_begins_with_different_fingerprints_acquire_once(
    store: impl IdempotencyStore,
) {
    let outcomes = race(store, 64, |i| 1 + (i % 2) as u8).await;
    let acquired = outcomes
        .iter()
        .filter(|b| matches!(b, Begin::Acquired { .. }))
        .count();
    let mismatched = outcomes
        .iter()
        .filter(|b| matches!(b, Begin::Mismatch))
        .count();
    assert_eq!(acquired, 1, "outcomes: {outcomes:?}");
    assert_eq!(
        mismatched, 32,
        "the other fingerprint's half must all mismatch: {outcomes:?}"
    );
}

async fn race(store: impl IdempotencyStore, callers: usize, tag: fn(usize) -> u8) -> Vec<Begin> {
    let store = Arc::new(store);
    let start = Arc::new(Barrier::new(callers));
    let tasks: Vec<_> = (0..callers)
        .map(|i| {
            let (store, start) = (store.clone(), start.clone());
            tokio::spawn(async move {
                start.wait().await;
                store.begin(&key("race"), &fingerprint(tag(i)), LONG).await
            })
        })
        .collect();
    let mut outcomes = Vec::with_capacity(callers);
    for task in tasks {
        let begun = task
            .await
            .unwrap_or_else(|error| panic!("task failed: {error}"));
        outcomes.push(begun.unwrap_or_else(|error| panic!("begin failed: {error}")));
    }
    outcomes
}

/// A second begin while the lease is live sees the request in flight.
pub async fn in_flight_key_is_reported(store: impl IdempotencyStore) {
    let key = key("in-flight");
    acquire(&store, &key, 1, LONG).await;
    assert_eq!(begin(&store, &key, 1).await, Begin::InFlight);
}

/// A key reused with another fingerprint is a mismatch, in flight and completed.
pub async fn reused_key_is_a_mismatch(store: impl IdempotencyStore) {
    let key = key("mismatch");
    let token = acquire(&store, &key, 1, LONG).await;
    assert_eq!(begin(&store, &key, 2).await, Begin::Mismatch);
    store
        .complete(&key, token, &response(b"x"), LONG)
        .await
        .expect("complete");
    assert_eq!(begin(&store, &key, 2).await, Begin::Mismatch);
}
