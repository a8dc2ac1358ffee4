//! Checks the contract's **Replay** point, and **Expiry is enforced on read** for completed
//! records: a completed response comes back exactly (status, every header value in order, body,
//! large ones included) until `ttl` passes, and then the key is free again; each replay says how
//! long the record is still kept.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};

use super::support::{MARGIN, acquire, begin, completed, fingerprint, key, response};
use super::{LONG, SHORT_LOCK};
use crate::record::StoredResponse;
use crate::scope::RecordKey;
use crate::store::{Begin, IdempotencyStore};

/// A completed response is replayed exactly: status, every header value in order, body.
pub async fn completed_response_is_replayed(store: impl IdempotencyStore) {
    let key = key("replay");
    let token = acquire(&store, &key, 1, LONG).await;
    let stored = response(b"{\"id\":1}\0\xff");
    store
        .complete(&key, token, &stored, LONG)
        .await
        .expect("complete");
    assert_eq!(begin(&store, &key, 1).await, completed(stored.clone()));
    assert_eq!(
        begin(&store, &key, 1).await,
        completed(stored),
        "replays repeat"
    );

    let empty_key = self::key("replay-empty");
    let token = acquire(&store, &empty_key, 1, LONG).await;
    let no_content = StoredResponse::new(StatusCode::NO_CONTENT, HeaderMap::new(), Bytes::new());
    store
        .complete(&empty_key, token, &no_content, LONG)
        .await
        .expect("complete");
    assert_eq!(begin(&store, &empty_key, 1).await, completed(no_content));
}

/// A completed record is replayed until its TTL passes, then the key is free.
pub async fn completed_record_expires_after_ttl(store: impl IdempotencyStore) {
    let key = key("ttl");
    let token = acquire(&store, &key, 1, LONG).await;
    store
        .complete(&key, token, &response(b"x"), SHORT_LOCK)
        .await
        .expect("complete");
    assert!(matches!(
        begin(&store, &key, 1).await,
        Begin::Completed { .. }
    ));
    tokio::time::sleep(SHORT_LOCK + MARGIN).await;
    acquire(&store, &key, 2, LONG).await;
}

/// A replay says how long the record is still kept: no longer than the `ttl` given to
/// `complete`, and less as time passes.
pub async fn replays_say_how_long_the_record_is_kept(store: impl IdempotencyStore) {
    async fn left(store: &impl IdempotencyStore, key: &RecordKey) -> Duration {
        match store.begin(key, &fingerprint(1), LONG).await {
            Ok(Begin::Completed { expires_in, .. }) => expires_in,
            other => panic!("expected a replay, got {other:?}"),
        }
    }
    let key = key("expires-in");
    let ttl = Duration::from_secs(5);
    let token = acquire(&store, &key, 1, LONG).await;
    store
        .complete(&key, token, &response(b"x"), ttl)
        .await
        .expect("complete");
    let first = left(&store, &key).await;
    assert!(
        first <= ttl && first > ttl - Duration::from_secs(2),
        "just completed with a ttl of {ttl:?}, the record has {first:?} left"
    );
    let pause = MARGIN * 2;
    tokio::time::sleep(pause).await;
    let later = left(&store, &key).await;
    assert!(
        later < first && later + pause <= first + Duration::from_millis(50),
        "{pause:?} later the record has {later:?} left, after {first:?}"
    );
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
    assert_eq!(begin(&store, &key, 1).await, completed(stored));
}
