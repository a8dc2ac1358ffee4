//! `kill -9` of the app at every step of the three-phase handler (create ride -> charge -> send
//! receipt), then a restarted app and the client's retry: exactly one ride, one charge and one
//! receipt, and the retry's answer names them. Each phase's rows commit with its recovery point
//! (`checkpoint_in`) and the last with the stored response (`complete_in`), so the retry resumes
//! after the last committed phase and nothing uncommitted survives the crash.

mod support;

use axum_payments::rides::Booked;
use reqwest::StatusCode;
use support::{World, book, retry_until_answered};

/// Kills the app stopped at `step`, restarts it and retries; the retry must be run `attempt`
/// resumed from `resumed_from`.
async fn killed_at(step: &str, attempt: u32, resumed_from: &str) {
    let world = World::new().await;
    let mut first = world.start(Some(step));
    let url = first.url.clone();
    let client = tokio::spawn(async move { book(&url).await });
    world.reached(step).await;
    first.kill();
    assert!(
        client.await.expect("task").is_err(),
        "the killed app answered nothing"
    );

    let restarted = world.start(None);
    let (status, replayed, body) = retry_until_answered(&restarted).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let booked: Booked = serde_json::from_str(&body).expect("a booking");
    assert_eq!(
        (booked.attempt, booked.resumed_from.as_str()),
        (attempt, resumed_from),
        "killed at {step}: {body}"
    );
    // Killed after the commit: the record was complete, the retry is its replay.
    assert_eq!(replayed, step == "committed", "{body}");
    world.assert_effects_once(&booked).await;

    let again = book(&restarted.url).await.expect("replay");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.text().await.expect("body"), body);
    drop(restarted);
    world.drop_schema().await;
}

#[tokio::test]
async fn killed_before_anything() {
    killed_at("started", 2, "start").await;
}

#[tokio::test]
async fn killed_between_the_ride_row_and_its_commit() {
    killed_at("ride_inserted", 2, "start").await;
}

#[tokio::test]
async fn killed_after_the_ride_committed() {
    killed_at("ride_committed", 2, "ride_created").await;
}

#[tokio::test]
async fn killed_after_the_processor_charged() {
    killed_at("charge_requested", 2, "ride_created").await;
}

#[tokio::test]
async fn killed_between_recording_the_charge_and_its_commit() {
    killed_at("charge_recorded", 2, "ride_created").await;
}

#[tokio::test]
async fn killed_after_the_charge_committed() {
    killed_at("charged", 2, "charged").await;
}

#[tokio::test]
async fn killed_between_the_receipt_row_and_its_commit() {
    killed_at("receipt_inserted", 2, "charged").await;
}

#[tokio::test]
async fn killed_between_complete_in_and_the_commit() {
    killed_at("completed", 2, "charged").await;
}

#[tokio::test]
async fn killed_after_the_commit_before_answering() {
    killed_at("committed", 1, "start").await;
}
