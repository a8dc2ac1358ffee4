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

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::sync::Barrier;

use crate::fingerprint::Fingerprint;
use crate::lease::{Checkpoint, MAX_CHECKPOINT_DATA};
use crate::record::StoredResponse;
use crate::scope::{RecordKey, Scope};
use crate::store::{
    Begin, ForgetEvent, Forgotten, IdempotencyStore, LeaseToken, RecordState, StoreError,
};

/// The lease used by checks that wait for one to expire.
pub const SHORT_LOCK: Duration = Duration::from_millis(400);
/// Long enough that a check never sees it expire.
pub const LONG: Duration = Duration::from_secs(600);
/// How long after a deadline a check waits before relying on it having passed.
const MARGIN: Duration = Duration::from_millis(300);
/// How long a notification may take before the check fails.
const NOTIFY_WITHIN: Duration = Duration::from_secs(5);

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

fn key(name: &str) -> RecordKey {
    RecordKey::new(&Scope::from_bytes(b"conformance"), name.as_bytes())
}

fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

/// A response with repeated headers, a binary header value and a binary body.
fn response(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.append("content-type", HeaderValue::from_static("application/json"));
    headers.append("set-cookie", HeaderValue::from_static("a=1"));
    headers.append("set-cookie", HeaderValue::from_static("b=2"));
    headers.append(
        "x-binary",
        HeaderValue::from_bytes(b"\x80\xff").expect("valid header"),
    );
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(body))
}

async fn acquire(
    store: &impl IdempotencyStore,
    key: &RecordKey,
    tag: u8,
    lock: Duration,
) -> LeaseToken {
    match store.begin(key, &fingerprint(tag), lock).await {
        Ok(Begin::Acquired { token, .. }) => token,
        other => panic!("expected to acquire a free key, got {other:?}"),
    }
}

async fn begin(store: &impl IdempotencyStore, key: &RecordKey, tag: u8) -> Begin {
    store
        .begin(key, &fingerprint(tag), LONG)
        .await
        .unwrap_or_else(|error| panic!("begin failed: {error}"))
}

/// `begin` that must acquire; returns token, attempt and recovery point.
async fn acquire_run(
    store: &impl IdempotencyStore,
    key: &RecordKey,
    tag: u8,
    lock: Duration,
) -> (LeaseToken, u32, Option<Checkpoint>) {
    match store.begin(key, &fingerprint(tag), lock).await {
        Ok(Begin::Acquired {
            token,
            attempt,
            recovery_point,
        }) => (token, attempt, recovery_point),
        other => panic!("expected to acquire, got {other:?}"),
    }
}

fn checkpoint(name: &str, data: &[u8]) -> Checkpoint {
    Checkpoint::new(name, Bytes::copy_from_slice(data)).expect("a valid checkpoint")
}

fn assert_lease_lost(result: Result<(), StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::LeaseLost)),
        "{what} must be refused with LeaseLost, got {result:?}"
    );
}

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

/// A completed response is replayed exactly: status, every header value in order, body.
pub async fn completed_response_is_replayed(store: impl IdempotencyStore) {
    let key = key("replay");
    let token = acquire(&store, &key, 1, LONG).await;
    let stored = response(b"{\"id\":1}\0\xff");
    store
        .complete(&key, token, &stored, LONG)
        .await
        .expect("complete");
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::Completed(stored.clone())
    );
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::Completed(stored),
        "replays repeat"
    );

    let empty_key = self::key("replay-empty");
    let token = acquire(&store, &empty_key, 1, LONG).await;
    let no_content = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
    store
        .complete(&empty_key, token, &no_content, LONG)
        .await
        .expect("complete");
    assert_eq!(
        begin(&store, &empty_key, 1).await,
        Begin::Completed(no_content)
    );
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

/// After release the key is free again, under a larger token.
pub async fn release_frees_the_key(store: impl IdempotencyStore) {
    let key = key("release");
    let first = acquire(&store, &key, 1, LONG).await;
    store.release(&key, first).await.expect("release");
    let second = acquire(&store, &key, 1, LONG).await;
    assert!(second > first, "token {second} must be larger than {first}");
}

/// A completed record is replayed until its TTL passes, then the key is free.
pub async fn completed_record_expires_after_ttl(store: impl IdempotencyStore) {
    let key = key("ttl");
    let token = acquire(&store, &key, 1, LONG).await;
    store
        .complete(&key, token, &response(b"x"), SHORT_LOCK)
        .await
        .expect("complete");
    assert!(matches!(begin(&store, &key, 1).await, Begin::Completed(_)));
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    acquire(&store, &key, 2, LONG).await;
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
        Begin::Completed(response(b"current"))
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
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::Completed(response(b"late"))
    );
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
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::Completed(response(b"first"))
    );

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

/// A subscriber armed before the completion is woken by it.
pub async fn subscribers_are_woken_by_complete(store: impl IdempotencyStore) {
    let store = Arc::new(store);
    let key = key("notify-complete");
    let token = acquire(&*store, &key, 1, LONG).await;
    let subscription = store.subscribe(&key);
    let woken = subscription.notified();
    assert_eq!(begin(&*store, &key, 1).await, Begin::InFlight);
    assert!(
        store.watch(&key).await.expect("watch"),
        "the key is in flight"
    );
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
        if matches!(begin(&*store, &key, 1).await, Begin::Completed(_)) {
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
    let key = key("notify-release");
    let token = acquire(&*store, &key, 1, LONG).await;
    let subscription = store.subscribe(&key);
    let woken = subscription.notified();
    assert_eq!(begin(&*store, &key, 1).await, Begin::InFlight);
    assert!(
        store.watch(&key).await.expect("watch"),
        "the key is in flight"
    );
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
    assert_eq!(
        begin(&store, &key, 1).await,
        Begin::Completed(response(b"x"))
    );
    // Either answer is allowed once it completed; what matters is that neither call fails.
    store.watch(&key).await.expect("watch a completed key");
    store
        .watch(&self::key("watch-free"))
        .await
        .expect("watch a free key");
}

/// Work on one key leaves every other key alone.
pub async fn keys_are_independent(store: impl IdempotencyStore) {
    let (a, b) = (key("independent-a"), key("independent-b"));
    let token_a = acquire(&store, &a, 1, LONG).await;
    let token_b = acquire(&store, &b, 2, LONG).await;
    store
        .complete(&a, token_a, &response(b"a"), LONG)
        .await
        .expect("complete a");
    assert_eq!(begin(&store, &b, 2).await, Begin::InFlight);
    store.release(&b, token_b).await.expect("release b");
    assert_eq!(begin(&store, &a, 1).await, Begin::Completed(response(b"a")));
    assert_lease_lost(store.renew(&a, token_b, LONG).await, "another key's token");
}

/// A 1 MiB body and a hundred headers survive storage unchanged.
pub async fn large_responses_round_trip(store: impl IdempotencyStore) {
    let key = key("large");
    let token = acquire(&store, &key, 1, LONG).await;
    let body: Vec<u8> = (0..1024 * 1024).map(|i: u32| (i % 251) as u8).collect();
    let mut headers = HeaderMap::new();
    for i in 0..100 {
        let value = HeaderValue::from_str(&format!("value-{i}")).expect("valid header");
        headers.append(
            format!("x-header-{}", i % 10)
                .parse::<http::HeaderName>()
                .expect("valid header"),
            value,
        );
    }
    let stored = StoredResponse::new(StatusCode::OK, headers, Bytes::from(body));
    store
        .complete(&key, token, &stored, LONG)
        .await
        .expect("complete");
    assert_eq!(begin(&store, &key, 1).await, Begin::Completed(stored));
}

/// 200 keys begun, completed and replayed concurrently (on a cluster: spread over every node).
pub async fn many_keys_complete_and_replay_concurrently(store: impl IdempotencyStore) {
    let store = Arc::new(store);
    let tasks: Vec<_> = (0..200)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = key(&format!("many-{i}"));
                let token = acquire(&*store, &key, 1, LONG).await;
                let body = Bytes::from(format!("response {i}"));
                let stored = StoredResponse::new(StatusCode::OK, HeaderMap::new(), body);
                store
                    .complete(&key, token, &stored, LONG)
                    .await
                    .expect("complete");
                assert_eq!(begin(&*store, &key, 1).await, Begin::Completed(stored));
            })
        })
        .collect();
    for task in tasks {
        task.await
            .unwrap_or_else(|error| panic!("task failed: {error}"));
    }
}

/// A lease or TTL that [`check_model`] lets expire at its next [`ModelOp::Sleep`].
pub const MODEL_SHORT: Duration = Duration::from_millis(200);
/// How long [`ModelOp::Sleep`] sleeps: comfortably past [`MODEL_SHORT`].
pub const MODEL_SLEEP: Duration = Duration::from_millis(450);

/// Which token a [`ModelOp`] presents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenChoice {
    /// The latest token issued for the key.
    Latest,
    /// The token issued `n` acquisitions before the latest one (wrapping around).
    Earlier(u8),
    /// A token never issued for the key.
    Bogus,
}

/// One step of [`check_model`]. Keys and fingerprints are small numbers so that random
/// sequences revisit them; `short` picks [`MODEL_SHORT`] over [`LONG`] for leases and TTLs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelOp {
    /// `begin(key, fingerprint, short or long lease)`.
    Begin {
        /// Which key.
        key: u8,
        /// Which fingerprint.
        fingerprint: u8,
        /// A short lease.
        short: bool,
    },
    /// `complete(key, token, response tagged body, short or long ttl)`.
    Complete {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
        /// A short TTL.
        short: bool,
        /// Tags the stored response.
        body: u8,
    },
    /// `release(key, token)`.
    Release {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
    },
    /// `renew(key, token, short or long lease)`.
    Renew {
        /// Which key.
        key: u8,
        /// Which token.
        token: TokenChoice,
        /// A short lease.
        short: bool,
    },
    /// Sleep [`MODEL_SLEEP`]: everything short expires.
    Sleep,
}

#[derive(Debug, Clone, Copy)]
struct ModelRecord {
    fingerprint: u8,
    token: LeaseToken,
    /// `None`: in flight; `Some(body)`: completed.
    completed: Option<u8>,
    /// The epoch (count of sleeps) at which it expires, `None` for never within a check.
    expires: Option<u64>,
}

fn model_response(body: u8) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("x-body", HeaderValue::from(u16::from(body)));
    StoredResponse::new(StatusCode::OK, headers, Bytes::from(vec![body; 3]))
}

/// Runs `ops` against `store` and against a model of the contract, failing on the first answer
/// the contract does not allow.
///
/// Where the contract leaves a choice (a lapsed lease nobody took over *may* still be completed,
/// renewed or released), either answer passes and the model follows the store. Time is
/// [`MODEL_SLEEP`] per sleep: under a paused tokio clock (the memory store) a check takes no real
/// time; with a store on its own clock it really sleeps.
pub async fn check_model(store: impl IdempotencyStore, ops: &[ModelOp]) {
    let mut records: std::collections::HashMap<u8, ModelRecord> = Default::default();
    let mut issued: std::collections::HashMap<u8, Vec<LeaseToken>> = Default::default();
    let mut epoch = 0u64;
    let model_key = |key: u8| self::key(&format!("model-{key}"));
    let lifetime = |short: bool, epoch: u64| if short { Some(epoch + 1) } else { None };
    let duration = |short: bool| if short { MODEL_SHORT } else { LONG };

    for (step, op) in ops.iter().enumerate() {
        let context = || format!("step {step} ({op:?}) of {ops:#?}");
        let live = |record: &ModelRecord| record.expires.is_none_or(|at| epoch < at);
        let token_for = |key: u8, choice: TokenChoice| {
            let tokens = issued.get(&key).map(Vec::as_slice).unwrap_or_default();
            match (choice, tokens) {
                (TokenChoice::Latest, [.., last]) => *last,
                (TokenChoice::Earlier(n), [_, ..]) => {
                    tokens[tokens.len() - 1 - usize::from(n) % tokens.len()]
                }
                _ => LeaseToken(u64::MAX / 2),
            }
        };
        match *op {
            ModelOp::Sleep => {
                tokio::time::sleep(MODEL_SLEEP).await;
                epoch += 1;
            }
            ModelOp::Begin {
                key,
                fingerprint: fp,
                short,
            } => {
                let got = store
                    .begin(&model_key(key), &fingerprint(fp), duration(short))
                    .await
                    .unwrap_or_else(|error| panic!("begin failed: {error} at {}", context()));
                match records.get(&key).filter(|record| live(record)) {
                    Some(record) if record.fingerprint != fp => {
                        assert_eq!(got, Begin::Mismatch, "{}", context());
                    }
                    Some(ModelRecord {
                        completed: Some(body),
                        ..
                    }) => {
                        assert_eq!(
                            got,
                            Begin::Completed(model_response(*body)),
                            "{}",
                            context()
                        );
                    }
                    Some(_) => assert_eq!(got, Begin::InFlight, "{}", context()),
                    None => {
                        let Begin::Acquired { token, .. } = got else {
                            panic!("expected to acquire, got {got:?} at {}", context());
                        };
                        let earlier = issued.entry(key).or_default();
                        if let Some(last) = earlier.last() {
                            assert!(token > *last, "token {token} after {last} at {}", context());
                        }
                        earlier.push(token);
                        records.insert(
                            key,
                            ModelRecord {
                                fingerprint: fp,
                                token,
                                completed: None,
                                expires: lifetime(short, epoch),
                            },
                        );
                    }
                }
            }
            ModelOp::Complete {
                key,
                token: choice,
                short,
                body,
            } => {
                let token = token_for(key, choice);
                let result = store
                    .complete(
                        &model_key(key),
                        token,
                        &model_response(body),
                        duration(short),
                    )
                    .await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(record), Ok(())) => {
                        records.insert(
                            key,
                            ModelRecord {
                                completed: Some(body),
                                expires: lifetime(short, epoch),
                                ..record
                            },
                        );
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => {
                        panic!("complete: {result:?} for {holder:?} at {}", context())
                    }
                }
            }
            ModelOp::Renew {
                key,
                token: choice,
                short,
            } => {
                let token = token_for(key, choice);
                let result = store.renew(&model_key(key), token, duration(short)).await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(record), Ok(())) => {
                        records.insert(
                            key,
                            ModelRecord {
                                expires: lifetime(short, epoch),
                                ..record
                            },
                        );
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => panic!("renew: {result:?} for {holder:?} at {}", context()),
                }
            }
            ModelOp::Release { key, token: choice } => {
                let token = token_for(key, choice);
                let result = store.release(&model_key(key), token).await;
                let holder = records
                    .get(&key)
                    .filter(|record| record.completed.is_none() && record.token == token)
                    .copied();
                match (holder, result) {
                    (Some(_), Ok(())) => {
                        records.remove(&key);
                    }
                    (Some(record), Err(StoreError::LeaseLost)) if !live(&record) => {
                        records.remove(&key);
                    }
                    (None, Err(StoreError::LeaseLost)) => {}
                    (holder, result) => {
                        panic!("release: {result:?} for {holder:?} at {}", context())
                    }
                }
            }
        }
    }
}

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
    assert_eq!(begin(&store, &key, 1).await, Begin::Completed(stored));

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
        matches!(begin(&store, &other, 1).await, Begin::Completed(_)),
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
