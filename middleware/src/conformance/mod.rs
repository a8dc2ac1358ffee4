//! The store contract suite: one set of tests every [`IdempotencyStore`] must pass.
//!
//! Each check is a public async function taking a fresh, empty store, so a backend (ours or a
//! third party's) runs the whole suite with one macro call and a factory that returns an isolated
//! store (its own schema, key prefix or file).
//!
//! The suite is behind the `conformance` feature, so applications do not compile it. A crate
//! with its own store enables it for its tests only:
//!
//! ```toml
//! [dev-dependencies]
//! tower-idempotency = { version = "0.1", features = ["conformance"] }
//! tokio = { version = "1", features = ["macros", "rt-multi-thread"] }
//! ```
//!
//! and runs it from a test file, for example `tests/conformance.rs` (the
//! [`IdempotencyStore`] docs implement a complete store and run the suite on it):
//!
//! ```
//! mod memory_store {
//!     tower_idempotency::store_conformance_tests!(|| async {
//!         tower_idempotency::MemoryStore::new()
//!     });
//! }
//! ```
//!
//! The checks use real time (leases of a few hundred milliseconds), because the stores under test
//! keep time on their own clocks: a database server's `now()`, Redis' `TIME`.
//!
//! [`IdempotencyStore`]: crate::store::IdempotencyStore

use std::time::Duration;

mod begin;
mod checkpoints;
mod independence;
mod inspect_forget;
mod leases;
mod model;
mod notify;
mod replay;
mod support;

pub use begin::{
    begin_acquires_a_free_key, concurrent_begins_acquire_once,
    concurrent_begins_with_different_fingerprints_acquire_once, in_flight_key_is_reported,
    reused_key_is_a_mismatch,
};
pub use checkpoints::{
    a_first_run_is_attempt_one_without_a_recovery_point,
    a_takeover_counts_the_attempt_and_resumes_from_the_last_checkpoint,
    another_request_taking_over_starts_at_attempt_one, settled_records_drop_their_checkpoints,
    stale_holder_cannot_checkpoint_after_takeover,
};
pub use independence::{keys_are_independent, many_keys_complete_and_replay_concurrently};
pub use inspect_forget::{
    forced_forget_ends_the_lease_and_fences_its_holder, forget_deletes_a_completed_record,
    forget_leaves_a_lease_unless_forced, inspect_shows_in_flight_and_completed_records,
};
pub use leases::{
    a_settled_lease_cannot_be_used_again, expired_lease_is_taken_over_with_a_larger_token,
    release_frees_the_key, renewal_keeps_the_lease, stale_holder_cannot_complete_after_takeover,
    stale_holder_cannot_release_or_renew_after_takeover,
    stale_token_is_refused_after_the_record_expired_and_was_reacquired,
};
pub use model::{MODEL_SHORT, MODEL_SLEEP, ModelOp, TokenChoice, check_model};
pub use notify::{
    subscribers_are_woken_by_complete, subscribers_are_woken_by_release,
    watch_tells_whether_a_key_is_still_in_flight,
};
pub use replay::{
    completed_record_expires_after_ttl, completed_response_is_replayed, large_responses_round_trip,
    replays_say_how_long_the_record_is_kept,
};

/// The lease used by checks that wait for one to expire.
pub const SHORT_LOCK: Duration = Duration::from_millis(400);
/// Long enough that a check never sees it expire.
pub const LONG: Duration = Duration::from_secs(600);

/// Generates one `#[tokio::test]` per contract check, each on a fresh store from `$factory`, an
/// expression callable as `$factory().await` that returns the store.
#[macro_export]
macro_rules! store_conformance_tests {
    ($factory:expr) => {
        $crate::__conformance_checks!(__conformance_test_fns; $factory);
    };
}

/// Runs every contract check one after another, each on a fresh store from `$factory`; evaluates
/// to a future. For fixtures too costly to build once per test, such as a Redis Cluster:
///
/// ```
/// # #[tokio::main] async fn main() {
/// tower_idempotency::store_conformance_run_all!(|| async {
///     tower_idempotency::MemoryStore::new()
/// })
/// .await;
/// # }
/// ```
#[macro_export]
macro_rules! store_conformance_run_all {
    ($factory:expr) => {
        $crate::__conformance_checks!(__conformance_sequence; $factory)
    };
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_test_fns {
    ($factory:expr; $($check:ident),*) => {$(
        #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
        async fn $check() {
            let store = ($factory)().await;
            $crate::conformance::$check(store).await;
        }
    )*};
}

#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_sequence {
    ($factory:expr; $($check:ident),*) => {
        async {
            $(
                $crate::conformance::$check(($factory)().await).await;
            )*
        }
    };
}

/// The one list of checks, so the per-test and the sequential forms never drift apart.
#[doc(hidden)]
#[macro_export]
macro_rules! __conformance_checks {
    ($then:ident; $factory:expr) => {
        $crate::$then! { $factory;
            begin_acquires_a_free_key,
            concurrent_begins_acquire_once,
            concurrent_begins_with_different_fingerprints_acquire_once,
            completed_response_is_replayed,
            in_flight_key_is_reported,
            reused_key_is_a_mismatch,
            release_frees_the_key,
            completed_record_expires_after_ttl,
            replays_say_how_long_the_record_is_kept,
            expired_lease_is_taken_over_with_a_larger_token,
            stale_holder_cannot_complete_after_takeover,
            stale_holder_cannot_release_or_renew_after_takeover,
            stale_token_is_refused_after_the_record_expired_and_was_reacquired,
            renewal_keeps_the_lease,
            a_settled_lease_cannot_be_used_again,
            subscribers_are_woken_by_complete,
            subscribers_are_woken_by_release,
            watch_tells_whether_a_key_is_still_in_flight,
            keys_are_independent,
            large_responses_round_trip,
            many_keys_complete_and_replay_concurrently,
            a_first_run_is_attempt_one_without_a_recovery_point,
            a_takeover_counts_the_attempt_and_resumes_from_the_last_checkpoint,
            another_request_taking_over_starts_at_attempt_one,
            stale_holder_cannot_checkpoint_after_takeover,
            settled_records_drop_their_checkpoints,
            inspect_shows_in_flight_and_completed_records,
            forget_deletes_a_completed_record,
            forget_leaves_a_lease_unless_forced,
            forced_forget_ends_the_lease_and_fences_its_holder
        }
    };
}
