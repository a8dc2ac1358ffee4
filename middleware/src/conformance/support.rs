//! Helpers shared by the checks: keys and fingerprints, a response that exercises header and body
//! encoding, `begin` wrappers that fail the check on an unexpected answer, and the margins the
//! checks wait by.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::LONG;
use crate::fingerprint::Fingerprint;
use crate::lease::Checkpoint;
use crate::record::StoredResponse;
use crate::scope::{RecordKey, Scope};
use crate::store::{Begin, IdempotencyStore, LeaseToken, StoreError};

/// How long after a deadline a check waits before relying on it having passed.
pub(super) const MARGIN: Duration = Duration::from_millis(300);
/// How long a notification may take before the check fails.
pub(super) const NOTIFY_WITHIN: Duration = Duration::from_secs(5);

pub(super) fn key(name: &str) -> RecordKey {
    RecordKey::new(&Scope::from_bytes(b"conformance"), name.as_bytes())
}

pub(super) fn fingerprint(tag: u8) -> Fingerprint {
    Fingerprint::from_bytes([tag; 32])
}

/// A response with repeated headers, a binary header value and a binary body.
pub(super) fn response(body: &'static [u8]) -> StoredResponse {
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

pub(super) async fn acquire(
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

pub(super) async fn begin(store: &impl IdempotencyStore, key: &RecordKey, tag: u8) -> Begin {
    store
        .begin(key, &fingerprint(tag), LONG)
        .await
        .map(comparable)
        .unwrap_or_else(|error| panic!("begin failed: {error}"))
}

/// The longest `ttl` a check stores a record with.
const LONGEST_TTL: Duration = Duration::from_secs(LONG.as_secs() * 2);

/// `begin`'s answer as the checks compare it: a completed record's `expires_in` must be within
/// the longest `ttl` the suite stores, and is then set aside (zeroed), so that answers compare
/// with `==`. `replays_say_how_long_the_record_is_kept` checks the time itself.
pub(super) fn comparable(begun: Begin) -> Begin {
    match begun {
        Begin::Completed {
            response,
            expires_in,
        } => {
            assert!(
                expires_in <= LONGEST_TTL,
                "a record is kept no longer than its ttl, yet {expires_in:?} are left"
            );
            completed(response)
        }
        other => other,
    }
}

/// A completed answer, as [`comparable`] makes it.
pub(super) fn completed(response: StoredResponse) -> Begin {
    Begin::Completed {
        response,
        expires_in: Duration::ZERO,
    }
}

/// `begin` that must acquire; returns token, attempt and recovery point.
pub(super) async fn acquire_run(
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

pub(super) fn checkpoint(name: &str, data: &[u8]) -> Checkpoint {
    Checkpoint::new(name, Bytes::copy_from_slice(data)).expect("a valid checkpoint")
}

pub(super) fn assert_lease_lost(result: Result<(), StoreError>, what: &str) {
    assert!(
        matches!(result, Err(StoreError::LeaseLost)),
        "{what} must be refused with LeaseLost, got {result:?}"
    );
}
