//! Checks the contract's **Attempts and recovery points** point: a first run is attempt 1 with
//! nothing to resume; a takeover by the same request counts the attempt and gets the last
//! checkpoint; a takeover by another request starts afresh; a stale or settled token cannot
//! checkpoint; `complete` and `release` drop the recovery point.

use super::support::{MARGIN, acquire_run, assert_lease_lost, begin, checkpoint, key, response};
use super::{LONG, SHORT_LOCK};
use crate::lease::MAX_CHECKPOINT_DATA;
use crate::store::{Begin, IdempotencyStore};

/// A fresh key is the request's first run: attempt 1, nothing to resume.
pub async fn a_first_run_is_attempt_one_without_a_recovery_point(store: impl IdempotencyStore) {
    let (_, attempt, point) = acquire_run(&store, &key("first-run"), 1, LONG).await;
    assert_eq!((attempt, point), (1, None));
}

/// A takeover of the same request's lapsed lease is its next attempt and gets the last checkpoint
/// stored (binary data of the largest size included), through every takeover.
pub async fn a_takeover_counts_the_attempt_and_resumes_from_the_last_checkpoint(
    store: impl IdempotencyStore,
) {
    let key = key("resume");
    let (first, _, _) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    let large: Vec<u8> = (0..MAX_CHECKPOINT_DATA).map(|i| (i % 256) as u8).collect();
    store
        .checkpoint(&key, first, &checkpoint("ride_created", b"\0ride\xff"))
        .await
        .expect("checkpoint");
    store
        .checkpoint(&key, first, &checkpoint("charged", &large))
        .await
        .expect("a second checkpoint replaces the first");
    assert_eq!(begin(&store, &key, 1).await, Begin::InFlight, "still held");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;

    let (second, attempt, point) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    assert!(second > first, "takeover token {second} after {first}");
    assert_eq!(attempt, 2);
    assert_eq!(point, Some(checkpoint("charged", &large)));

    // A takeover that stores nothing passes the checkpoint on to the next one.
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (third, attempt, point) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    assert_eq!(attempt, 3);
    assert_eq!(point, Some(checkpoint("charged", &large)));
    store
        .checkpoint(&key, third, &checkpoint("receipt_sent", b""))
        .await
        .expect("checkpoint");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (_, attempt, point) = acquire_run(&store, &key, 1, LONG).await;
    assert_eq!(attempt, 4);
    assert_eq!(point, Some(checkpoint("receipt_sent", b"")));
}

/// A lapsed lease taken over by a different request (another fingerprint) is not that request's
/// earlier run: attempt 1, and the other request's checkpoint is not handed over.
pub async fn another_request_taking_over_starts_at_attempt_one(store: impl IdempotencyStore) {
    let key = key("resume-other");
    let (first, _, _) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    store
        .checkpoint(&key, first, &checkpoint("step", b"data"))
        .await
        .expect("checkpoint");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (second, attempt, point) = acquire_run(&store, &key, 2, LONG).await;
    assert!(second > first);
    assert_eq!((attempt, point), (1, None));
}

/// A holder whose lease was taken over cannot checkpoint: refused with `LeaseLost`, and the
/// takeover's recovery point is untouched.
pub async fn stale_holder_cannot_checkpoint_after_takeover(store: impl IdempotencyStore) {
    let key = key("stale-checkpoint");
    let (stale, _, _) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    store
        .checkpoint(&key, stale, &checkpoint("one", b"1"))
        .await
        .expect("checkpoint while held");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (current, _, point) = acquire_run(&store, &key, 1, SHORT_LOCK).await;
    assert_eq!(point, Some(checkpoint("one", b"1")));
    assert_lease_lost(
        store
            .checkpoint(&key, stale, &checkpoint("stale", b"x"))
            .await,
        "stale checkpoint",
    );
    store
        .checkpoint(&key, current, &checkpoint("two", b"2"))
        .await
        .expect("the current holder checkpoints");
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (_, attempt, point) = acquire_run(&store, &key, 1, LONG).await;
    assert_eq!(attempt, 3);
    assert_eq!(
        point,
        Some(checkpoint("two", b"2")),
        "the stale checkpoint changed nothing"
    );
}

/// After `complete` or `release` the token cannot checkpoint, and the key's next run starts
/// afresh: a settled record's checkpoint is never handed to a new run.
pub async fn settled_records_drop_their_checkpoints(store: impl IdempotencyStore) {
    let released = key("released-checkpoint");
    let (token, _, _) = acquire_run(&store, &released, 1, LONG).await;
    store
        .checkpoint(&released, token, &checkpoint("step", b"1"))
        .await
        .expect("checkpoint");
    store.release(&released, token).await.expect("release");
    assert_lease_lost(
        store
            .checkpoint(&released, token, &checkpoint("late", b"x"))
            .await,
        "checkpoint after release",
    );
    let (_, attempt, point) = acquire_run(&store, &released, 1, LONG).await;
    assert_eq!((attempt, point), (1, None));

    let completed = key("completed-checkpoint");
    let (token, _, _) = acquire_run(&store, &completed, 1, LONG).await;
    store
        .checkpoint(&completed, token, &checkpoint("step", b"1"))
        .await
        .expect("checkpoint");
    store
        .complete(&completed, token, &response(b"done"), SHORT_LOCK)
        .await
        .expect("complete");
    assert_lease_lost(
        store
            .checkpoint(&completed, token, &checkpoint("late", b"x"))
            .await,
        "checkpoint after complete",
    );
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    let (_, attempt, point) = acquire_run(&store, &completed, 1, LONG).await;
    assert_eq!((attempt, point), (1, None));
}
