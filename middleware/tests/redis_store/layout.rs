//! What the store writes: one string key per record with the documented layout and TTLs,
//! values from an earlier release, a token from a clock that stepped back, and values it did not
//! write.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use test_fixtures::records::{
    NOTIFY_WITHIN, acquire, acquire_as, assert_taken_over_as_attempt_2, fingerprint, key, response,
};
use tower_idempotency::conformance::LONG;
use tower_idempotency::record::DecodeError;
use tower_idempotency::{Begin, IdempotencyStore, LeaseToken, StoreError, StoredResponse};

use super::redis_support::is_lease_lost;
use super::{RawRecord, be_u64, pttl, server_time_us, set_px, value};

/// An in-flight value written before attempts were counted (the bare 50-byte header) still works:
/// its lapsed lease is taken over as attempt 2, which then takes checkpoints.
#[tokio::test]
async fn an_in_flight_value_from_before_attempts_is_taken_over_as_attempt_2() {
    let RawRecord {
        store,
        mut raw,
        key,
        name,
        ..
    } = RawRecord::new("legacy").await;
    let mut old = vec![1u8, 1];
    old.extend_from_slice(fingerprint(1).as_bytes());
    old.extend_from_slice(&7u64.to_be_bytes());
    old.extend_from_slice(&0u64.to_be_bytes()); // a lease deadline long past
    set_px(&mut raw, &name, old, 10_000).await;
    assert_taken_over_as_attempt_2(&store, &key, LeaseToken(7)).await;
    assert_eq!(&value(&mut raw, &name).await[50..54], &2u32.to_be_bytes());
}

/// One string key per record, `{prefix}:{hex}`, with the documented header, a PX TTL in flight
/// (twice the lease) and when completed (the ttl), and a completion message carrying the hex key.
#[tokio::test]
async fn records_are_one_string_key_with_a_ttl_in_flight_and_completed() {
    let RawRecord {
        url,
        prefix,
        store,
        mut raw,
        key,
        name,
    } = RawRecord::new("layout").await;

    let before = server_time_us(&mut raw).await;
    let token = acquire(&store, &key, Duration::from_secs(10)).await;
    let after = server_time_us(&mut raw).await;

    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(format!("{prefix}:*"))
        .query_async(&mut raw)
        .await
        .expect("KEYS");
    assert_eq!(keys, vec![name.clone()], "one key per record");
    let kind: String = redis::cmd("TYPE")
        .arg(&name)
        .query_async(&mut raw)
        .await
        .expect("TYPE");
    assert_eq!(kind, "string");
    let ttl = pttl(&mut raw, &name).await;
    assert!(
        (10_000..=20_000).contains(&ttl),
        "an in-flight key lives twice the lease, got PTTL {ttl}"
    );

    let in_flight = value(&mut raw, &name).await;
    assert_eq!(
        in_flight.len(),
        54,
        "an in-flight record is its header and its attempt"
    );
    assert_eq!(&in_flight[50..], &1u32.to_be_bytes(), "the first attempt");
    assert_eq!(
        &in_flight[..2],
        &[1, 1],
        "layout version 1, state in flight"
    );
    assert_eq!(&in_flight[2..34], fingerprint(1).as_bytes());
    assert_eq!(be_u64(&in_flight[34..42]), token.0);
    assert!(
        (before..=after).contains(&token.0),
        "a fresh key's token is the server time in microseconds: {before} <= {token} <= {after}"
    );
    let deadline = be_u64(&in_flight[42..50]);
    assert!((before + 10_000_000..=after + 10_000_000).contains(&deadline));

    store
        .renew(&key, token, Duration::from_secs(30))
        .await
        .expect("renew");
    let ttl = pttl(&mut raw, &name).await;
    assert!((30_000..=60_000).contains(&ttl), "renewed PTTL {ttl}");
    let renewed = value(&mut raw, &name).await;
    assert!(be_u64(&renewed[42..50]) >= before + 30_000_000);
    assert_eq!(
        &renewed[..42],
        &in_flight[..42],
        "renewal only moves the deadline"
    );

    let mut pubsub = redis::Client::open(url.as_str())
        .expect("URL")
        .get_async_pubsub()
        .await
        .expect("pubsub");
    pubsub
        .subscribe(format!("{prefix}:completed"))
        .await
        .expect("SUBSCRIBE");

    let stored = response(b"{\"id\":7}");
    // Watched, the record is marked (state 3) and its completion is published.
    assert!(store.watch(&key).await.expect("watch"));
    assert_eq!(
        value(&mut raw, &name).await[1],
        3,
        "state in flight and watched"
    );
    store
        .complete(&key, token, &stored, Duration::from_secs(60))
        .await
        .expect("complete");
    let ttl = pttl(&mut raw, &name).await;
    assert!(
        (55_000..=60_000).contains(&ttl),
        "a completed key lives for the ttl, got PTTL {ttl}"
    );
    let completed = value(&mut raw, &name).await;
    assert_eq!(
        &completed[..2],
        &[1, 2],
        "layout version 1, state completed"
    );
    assert_eq!(
        &completed[2..42],
        &in_flight[2..42],
        "fingerprint and token kept"
    );
    assert_eq!(be_u64(&completed[42..50]), 0);
    assert_eq!(
        StoredResponse::decode(Bytes::copy_from_slice(&completed[50..])).expect("decode"),
        stored
    );
    let message = tokio::time::timeout(NOTIFY_WITHIN, pubsub.on_message().next())
        .await
        .expect("complete publishes")
        .expect("a message");
    assert_eq!(message.get_payload_bytes(), key.to_hex().as_bytes());

    let released = self::key("layout-released");
    let token = acquire(&store, &released, LONG).await;
    assert!(store.watch(&released).await.expect("watch"));
    store.release(&released, token).await.expect("release");
    let exists: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:{}", released.to_hex()))
        .query_async(&mut raw)
        .await
        .expect("EXISTS");
    assert_eq!(exists, 0, "release deletes the key");
    let message = tokio::time::timeout(NOTIFY_WITHIN, pubsub.on_message().next())
        .await
        .expect("release publishes")
        .expect("a message");
    assert_eq!(message.get_payload_bytes(), released.to_hex().as_bytes());
}

/// A takeover's token is `max(old + 1, server time)`: larger than the expired lease's token even
/// when that token is ahead of the server clock (a clock that stepped back).
#[tokio::test]
async fn a_takeover_token_outgrows_a_token_from_the_future() {
    let RawRecord {
        store,
        mut raw,
        key,
        name,
        ..
    } = RawRecord::new("clock-stepped-back").await;

    let now = server_time_us(&mut raw).await;
    let future_token = now + 3_600_000_000;
    let mut expired_lease = vec![1, 1];
    expired_lease.extend_from_slice(fingerprint(1).as_bytes());
    expired_lease.extend_from_slice(&future_token.to_be_bytes());
    expired_lease.extend_from_slice(&(now - 1).to_be_bytes());
    set_px(&mut raw, &name, expired_lease, 10_000).await;

    let token = acquire_as(&store, &key, 2, LONG).await;
    assert_eq!(token, LeaseToken(future_token + 1));
    assert!(is_lease_lost(
        &store
            .complete(&key, LeaseToken(future_token), &response(b"stale"), LONG)
            .await
    ));
    assert_eq!(
        store.begin(&key, &fingerprint(2), LONG).await.unwrap(),
        Begin::InFlight
    );
}

/// Values the store did not write are reported, never replayed, never overwritten by a lease
/// operation, and never a panic.
#[tokio::test]
async fn foreign_or_corrupt_values_are_errors_and_left_alone() {
    let RawRecord {
        prefix,
        store,
        mut raw,
        key,
        name,
        ..
    } = RawRecord::new("corrupt").await;
    let tag_one = fingerprint(1);
    let begin = || store.begin(&key, &tag_one, LONG);

    set_px(&mut raw, &name, b"not a record".to_vec(), 60_000).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Truncated))
    ));
    assert!(is_lease_lost(&store.release(&key, LeaseToken(1)).await));

    let mut header = vec![9, 1];
    header.resize(50, 0);
    set_px(&mut raw, &name, header, 60_000).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::UnknownVersion(9)))
    ));

    let mut unknown_state = vec![1, 7];
    unknown_state.resize(50, 0);
    set_px(&mut raw, &name, unknown_state, 60_000).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Invalid(_)))
    ));

    let mut truncated_response = vec![1, 2];
    truncated_response.extend_from_slice(fingerprint(1).as_bytes());
    truncated_response.resize(50, 0);
    truncated_response.extend_from_slice(&[1, 0]);
    set_px(&mut raw, &name, truncated_response.clone(), 60_000).await;
    assert!(matches!(
        begin().await,
        Err(StoreError::Corrupt(DecodeError::Truncated))
    ));
    assert_eq!(
        store.begin(&key, &fingerprint(2), LONG).await.unwrap(),
        Begin::Mismatch,
        "another fingerprint is a mismatch without reading the response"
    );
    assert!(is_lease_lost(
        &store
            .complete(&key, LeaseToken(0), &response(b"x"), LONG)
            .await
    ));
    assert_eq!(
        value(&mut raw, &name).await,
        truncated_response,
        "left alone"
    );

    let other = self::key("wrong-type");
    let () = redis::cmd("HSET")
        .arg(format!("{prefix}:{}", other.to_hex()))
        .arg("field")
        .arg("value")
        .query_async(&mut raw)
        .await
        .expect("HSET");
    assert!(matches!(
        store.begin(&other, &fingerprint(1), LONG).await,
        Err(StoreError::Backend(_))
    ));
}
