//! A holder frozen (`SIGSTOP`) past `lock_ttl` is taken over by another app process; when it
//! thaws, its checkpoint or its completing transaction is refused by the record's fencing check
//! inside its own transaction, which rolls back with its effect rows: the effects exist once.

mod support;

use std::time::Duration;

use axum_payments::rides::Booked;
use reqwest::StatusCode;
use support::{LOCK_TTL, World, book, retry_until_answered};

/// Freezes the holder at `step`, lets another process take over and finish, thaws the holder.
async fn stalled_at(step: &str, resumed_from: &str) {
    let world = World::new().await;
    let stalled = world.start(Some(step));
    let other = world.start(None);
    let url = stalled.url.clone();
    let stale = tokio::spawn(async move { book(&url).await });
    world.reached(step).await;
    stalled.signal("STOP");
    world.release(step);
    // No renewal runs in a frozen process: the lease lapses after lock_ttl.
    tokio::time::sleep(LOCK_TTL + Duration::from_millis(500)).await;

    let (status, replayed, body) = retry_until_answered(&other).await;
    assert_eq!((status, replayed), (StatusCode::CREATED, false), "{body}");
    let booked: Booked = serde_json::from_str(&body).expect("a booking");
    assert_eq!(
        (booked.attempt, booked.resumed_from.as_str()),
        (2, resumed_from),
        "{body}"
    );

    stalled.signal("CONT");
    let stale = stale
        .await
        .expect("task")
        .expect("the stale holder answers");
    assert_eq!(stale.status(), StatusCode::CONFLICT);
    let detail = stale.text().await.expect("body");
    assert!(detail.contains("took it over"), "{detail}");

    world.assert_effects_once(&booked).await;
    for app in [&stalled, &other] {
        let replay = book(&app.url).await.expect("replay");
        assert_eq!(replay.headers()["idempotent-replayed"], "true");
        assert_eq!(
            replay.text().await.expect("body"),
            body,
            "the takeover's answer stands"
        );
    }
    drop((stalled, other));
    world.drop_schema().await;
}

/// Frozen after phase 1 committed: the takeover charges and finishes; the thawed holder's
/// `checkpoint_in("charged")` is refused and its `UPDATE rides` rolls back with it.
#[tokio::test]
async fn a_stalled_holders_checkpoint_is_refused_after_takeover() {
    stalled_at("ride_committed", "ride_created").await;
}

/// Frozen inside phase 3 with its receipt row written but not committed: the takeover writes its
/// own receipt and completes; the thawed holder's `complete_in` is refused and its receipt rolls
/// back.
#[tokio::test]
async fn a_stalled_holders_transaction_rolls_back_after_takeover() {
    stalled_at("receipt_inserted", "charged").await;
}
