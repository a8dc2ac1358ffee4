//! Checks the contract's **Independence** point: work on one key (completing, releasing, a
//! token) never affects another, also with hundreds of keys in use concurrently (on a cluster,
//! spread over every node).

use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};

use super::LONG;
use super::support::{acquire, assert_lease_lost, begin, completed, key, response};
use crate::record::StoredResponse;
use crate::store::{Begin, IdempotencyStore};

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
    assert_eq!(begin(&store, &a, 1).await, completed(response(b"a")));
    assert_lease_lost(store.renew(&a, token_b, LONG).await, "another key's token");
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
                assert_eq!(begin(&*store, &key, 1).await, completed(stored));
            })
        })
        .collect();
    for task in tasks {
        task.await
            .unwrap_or_else(|error| panic!("task failed: {error}"));
    }
}
